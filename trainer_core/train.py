"""HiDream-I1 LoKr training: data -> caches -> transformer + LoKr -> flow-matching steps -> LoKr file.

`train()` reads top to bottom: discover data, fill the text cache (then free the text encoders), fill the latent
cache, load the transformer, wrap it with a LoKr, loop over steps, save. One step is `flow_matching_step`.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
from PIL import Image
from tqdm.auto import tqdm

from .cache import CacheStats, ImageEncoder, LatentCache, TextEmbeddingCache, TextEncoder, VaeImageEncoder
from .config import ConfigError, TrainConfig
from .data import BucketBatches, ImageDataset, check_enough_samples, discover_dataset
from .flow_matching import (LoadBalancingLoss, flow_matching_loss, flow_matching_target, noisy_latents,
                            patch_tokens_to_image, resolution_shift, sample_sigmas, shift_sigmas)
from .lokr import LycorisConfig, create_lokr_network, lokr_applied, remove_lokr, save_lokr
from .models import (PromptEmbeds, component_identity, load_text_encoders, load_transformer, load_vae,
                     resolve_model_paths, text_encoders_identity)
from .plot import loss_curve_image
from .quantize import quantize_frozen
from .sample import denoise, latents_to_images
from .speedups import apply_speedups, remove_speedups

logger = logging.getLogger(__name__)

LOKR_FILENAME = "pytorch_lora_weights.safetensors"  # SimpleTuner's name for the trained adapter


@dataclass
class StepMetrics:
    step: int
    total_steps: int
    loss: float
    flow_loss: float
    load_balancing_loss: Optional[float]
    learning_rate: float
    grad_norm: float
    seconds_per_step: float


@dataclass
class TrainingCallbacks:
    """Hooks for front ends (ComfyUI nodes, progress UIs). All optional; none may change the maths."""

    on_phase: Optional[Callable[[str], None]] = None
    on_step: Optional[Callable[[StepMetrics], None]] = None
    on_validation: Optional[Callable[[int, Image.Image], None]] = None
    should_stop: Optional[Callable[[], bool]] = None


@dataclass
class ModelComponents:
    """Models a front end already holds (ComfyUI's loaders hand over theirs); whatever is None is loaded from the
    config's model paths. The caller keeps ownership: the LoKr is removed from a given transformer after training.

    text_encoder / image_encoder fill the caches and their `identity` keys them; decode_latents turns scaled
    latents (B, 16, h, w) into images for validation.
    """

    transformer: Optional[torch.nn.Module] = None
    transformer_name: str = "transformer"
    text_encoder: Optional[TextEncoder] = None
    image_encoder: Optional[ImageEncoder] = None
    decode_latents: Optional[Callable[[torch.Tensor], list[Image.Image]]] = None


@dataclass
class TrainResult:
    output_dir: Path
    lokr_path: Path
    losses: list[float]
    validation_images: list[Path] = field(default_factory=list)
    loss_curve_path: Optional[Path] = None
    text_cache: CacheStats = field(default_factory=CacheStats)
    latent_cache: CacheStats = field(default_factory=CacheStats)
    steps_done: int = 0
    seconds: float = 0.0


def resolve_device(name: Optional[str]) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def flow_matching_step(transformer, latents: torch.Tensor, embeds: PromptEmbeds, generator: torch.Generator,
                       config: TrainConfig, load_balancing: LoadBalancingLoss
                       ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Loss of one batch of one bucket. latents (B, 16, h, w) float32 on the model's device.

    Returns (loss to backpropagate, flow-matching loss, load-balancing loss or None).
    """
    b, _, h, w = latents.shape
    device = latents.device
    dtype = next(p for p in transformer.parameters() if p.dtype.is_floating_point).dtype

    noise = torch.randn(latents.shape, generator=generator).to(device)
    schedule = "uniform" if config.flow_use_uniform_schedule else "logit_normal"
    sigmas = sample_sigmas(b, generator, schedule, config.flow_sigmoid_scale)
    shift = resolution_shift(h, w) if config.flow_schedule_auto_shift else config.flow_schedule_shift
    sigmas = shift_sigmas(sigmas, shift).to(device)
    model_input = noisy_latents(latents, noise, sigmas)

    load_balancing.clear()
    embeds = embeds.to(device=device, dtype=dtype)
    output = transformer(hidden_states=model_input.to(dtype), timesteps=sigmas * 1000.0,
                         encoder_hidden_states_t5=embeds.t5, encoder_hidden_states_llama3=embeds.llama,
                         pooled_embeds=embeds.pooled, return_dict=False)[0]
    prediction = -patch_tokens_to_image(output, h, w)  # raw output is x0 - noise
    target = flow_matching_target(latents, noise)
    flow_loss = flow_matching_loss(prediction, target)

    lb_loss = load_balancing.take()
    loss = flow_loss
    if config.hidream_use_load_balancing_loss and lb_loss is not None:
        loss = loss + lb_loss
    return loss, flow_loss.detach(), (lb_loss.detach() if lb_loss is not None else None)


def discover(config: TrainConfig) -> tuple[list[ImageDataset], BucketBatches]:
    """Find the training samples and check there are enough, before any model is loaded."""
    config.validate()
    datasets = [discover_dataset(d, seed=config.seed) for d in config.datasets]
    for ds in datasets:
        logger.info(ds.report.format())
    check_enough_samples(datasets, config.train_batch_size * config.gradient_accumulation_steps)
    return datasets, BucketBatches(datasets, config.train_batch_size, config.seed)


def _captions_to_cache(datasets: list[ImageDataset], config: TrainConfig) -> list[str]:
    captions = [s.caption for ds in datasets for s in ds.samples]
    if config.validation_prompt:
        captions += [config.validation_prompt, config.validation_negative_prompt]
    return captions


def _progress_to(bar: tqdm) -> Callable[[int, int], None]:
    """A cache-fill progress callback (done, total) that drives a tqdm bar."""

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return update


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    name = config.optimizer.lower()
    if name in ("adamw", "adamw_bf16", "torch-adamw"):
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.adam_weight_decay)
    raise ConfigError(f"optimizer {config.optimizer!r} is not available; use 'adamw'")


def train(config: TrainConfig, callbacks: Optional[TrainingCallbacks] = None,
          components: Optional[ModelComponents] = None) -> TrainResult:
    cb = callbacks or TrainingCallbacks()
    given = components or ModelComponents()
    phase = cb.on_phase or (lambda name: logger.info("phase: %s", name))
    started = time.perf_counter()
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32
    lycoris = LycorisConfig.from_file(config.lycoris_config) if config.lycoris_config else LycorisConfig()

    # 1. Data: everything that can be wrong with it is found before a model is loaded.
    phase("discovering data")
    datasets, batches = discover(config)
    needs_files = None in (given.transformer, given.text_encoder, given.image_encoder, given.decode_latents)
    paths = resolve_model_paths(config.pretrained_model_name_or_path, config.pretrained_llama_path,
                                require_text_encoders=given.text_encoder is None) if needs_files else None
    cache_dir = config.resolved_cache_dir

    # 2. Text embeddings. The four encoders (~25 GB for the real model) are loaded only when a caption is missing
    #    from the cache, and leave memory before the transformer arrives.
    phase("caching text embeddings")
    captions = _captions_to_cache(datasets, config)
    text_identity = given.text_encoder.identity if given.text_encoder else text_encoders_identity(paths, dtype)
    text_cache = TextEmbeddingCache(cache_dir / "text", text_identity)
    if text_cache.missing(captions):
        text_encoders = given.text_encoder or load_text_encoders(paths, dtype=dtype, device=device)
        with tqdm(desc="text embeddings", unit="caption", disable=None) as bar:
            text_cache.fill(captions, text_encoders, progress=_progress_to(bar))
        if given.text_encoder is None:
            text_encoders.free()
        del text_encoders
        release_memory()
    else:
        text_cache.fill(captions, encoder=None)  # counts the hits; nothing to encode
    logger.info("text cache: %s", text_cache.stats)

    # 3. Latents. The VAE stays (small) to decode validation images.
    phase("caching latents")
    vae = load_vae(paths, dtype=torch.float32, device=device) if needs_files else None
    image_encoder = given.image_encoder or VaeImageEncoder(vae, component_identity(paths.model_dir / "vae"))
    decode_latents = given.decode_latents or (lambda latents: latents_to_images(vae, latents))
    latent_cache = LatentCache(cache_dir / "latents", image_encoder.identity)
    samples = [s for ds in datasets for s in ds.samples]
    with tqdm(desc="latents", unit="image", disable=None) as bar:
        latent_cache.fill(samples, image_encoder, config.vae_batch_size, progress=_progress_to(bar))
    logger.info("latent cache: %s", latent_cache.stats)

    # 4. Transformer (frozen, optionally quantised) and the LoKr that trains.
    phase("loading transformer")
    if given.transformer is not None:
        transformer = given.transformer
        base_name = given.transformer_name
    else:
        transformer = load_transformer(paths, dtype=dtype, device=device)
        quantize_frozen(transformer, config.base_model_precision)
        base_name = paths.model_dir.name
    transformer.requires_grad_(False)
    was_training, was_checkpointing = transformer.training, transformer.is_gradient_checkpointing
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()  # MoE routing stays differentiable; eval() would cut the routed experts' gradient
    network = create_lokr_network(transformer, lycoris, seed=config.seed, init_lokr_norm=config.init_lokr_norm)
    apply_speedups(transformer, network, config)
    network.to(device)
    params = [p for p in network.parameters() if p.requires_grad]
    optimizer = build_optimizer(config, params)
    from diffusers.optimization import get_scheduler

    lr_schedule = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                num_training_steps=config.max_train_steps)
    load_balancing = LoadBalancingLoss(transformer, config.hidream_load_balancing_loss_weight)
    if config.hidream_use_load_balancing_loss:
        logger.info("MoE load-balancing loss on %d gates, weight %g, with gradient (SimpleTuner only logs it)",
                    load_balancing.num_gates, config.hidream_load_balancing_loss_weight)

    def validate(step: int, resume_phase: Optional[str] = "training") -> Optional[Path]:
        if not config.validation_prompt:
            return None
        phase("validating")
        settings = config.validation_sampling()
        if step == 0:  # the benchmark image is the base model's, whatever the LoKr's initialisation
            settings = replace(settings, lokr_strength=0.0)
        cond = text_cache.load([settings.prompt])
        uncond = text_cache.load([settings.negative_prompt])
        with lokr_applied(network, settings.lokr_strength):
            image = decode_latents(denoise(transformer, cond, uncond, settings))[0]
        path = output_dir / "validation" / f"step_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        if cb.on_validation:
            cb.on_validation(step, image)
        if resume_phase:
            phase(resume_phase)
        return path

    # 5. The loop. Noise, sigmas and caption dropout draw from their own seeded generators: same seed, same run.
    phase("training")
    noise_generator = torch.Generator().manual_seed(config.seed)
    dropout_rng = random.Random(config.seed)
    batch_iter = iter(batches)
    losses: list[float] = []
    validation_images: list[Path] = []
    if not config.disable_benchmark:  # the base model's image, to compare the LoKr's against
        benchmark = validate(0)
        if benchmark:
            validation_images.append(benchmark)
    steps_done = 0
    bar = tqdm(total=config.max_train_steps, desc="training", disable=None)
    for step in range(1, config.max_train_steps + 1):
        if cb.should_stop and cb.should_stop():
            logger.info("stop requested at step %d", step)
            break
        step_started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step_loss = step_flow = 0.0
        step_lb: Optional[float] = None
        for _ in range(config.gradient_accumulation_steps):
            batch = next(batch_iter)
            latents = latent_cache.load(batch).to(device)
            captions = ["" if dropout_rng.random() < config.caption_dropout_probability else s.caption
                        for s in batch]
            embeds = text_cache.load(captions)
            loss, flow_loss, lb_loss = flow_matching_step(transformer, latents, embeds, noise_generator, config,
                                                          load_balancing)
            (loss / config.gradient_accumulation_steps).backward()
            step_loss += loss.item() / config.gradient_accumulation_steps
            step_flow += flow_loss.item() / config.gradient_accumulation_steps
            if lb_loss is not None:
                step_lb = (step_lb or 0.0) + lb_loss.item() / config.gradient_accumulation_steps
        if config.grad_clip_method == "value":
            torch.nn.utils.clip_grad_value_(params, config.max_grad_norm)
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]).item()
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm).item()
        optimizer.step()
        lr_schedule.step()
        losses.append(step_loss)
        steps_done = step

        metrics = StepMetrics(step=step, total_steps=config.max_train_steps, loss=step_loss, flow_loss=step_flow,
                              load_balancing_loss=step_lb, learning_rate=lr_schedule.get_last_lr()[0],
                              grad_norm=grad_norm, seconds_per_step=time.perf_counter() - step_started)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{metrics.learning_rate:.2e}")
        bar.update(1)
        if cb.on_step:
            cb.on_step(metrics)
        if config.validation_step_interval and step % config.validation_step_interval == 0 \
                and step < config.max_train_steps:
            path = validate(step)
            if path:
                validation_images.append(path)
    bar.close()

    # 6. Outputs: the LoKr, a final validation image and the loss curve.
    phase("saving")
    lokr_path = save_lokr(network, output_dir / LOKR_FILENAME, lycoris,
                          metadata={"trainer": "ComfyUI-HiDream-LoKr", "steps": steps_done,
                                    "base_model": base_name})
    final = validate(steps_done, resume_phase=None)
    if final:
        validation_images.append(final)
    curve_path = output_dir / "loss_curve.png"
    loss_curve_image(losses, title=f"training loss ({steps_done} steps)").save(curve_path)
    (output_dir / "losses.json").write_text(json.dumps(losses))
    load_balancing.remove()
    if given.transformer is not None:  # hand the caller's model back as it came
        remove_speedups(transformer, network)
        remove_lokr(network)
        if not was_checkpointing and transformer.is_gradient_checkpointing:
            transformer.disable_gradient_checkpointing()
        transformer.train(was_training)
    phase("done")
    return TrainResult(output_dir=output_dir, lokr_path=lokr_path, losses=losses,
                       validation_images=validation_images, loss_curve_path=curve_path,
                       text_cache=text_cache.stats, latent_cache=latent_cache.stats, steps_done=steps_done,
                       seconds=time.perf_counter() - started)
