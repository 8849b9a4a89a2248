"""HiDream-I1 LoKr training: data -> caches -> transformer + LoKr -> flow-matching steps -> LoKr file.

`train()` reads top to bottom: discover data, fill the text cache (then free the text encoders), fill the latent
cache, load the transformer, wrap it with a LoKr, resume from a checkpoint if asked, loop over steps (validation,
eval loss, checkpoints and front-end commands at step boundaries), save. One step is `flow_matching_step`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import resource
import logging
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..util import atomic
from . import checkpoint as ckpt
from ..data.cache import CacheStats, ImageEncoder, LatentCache, TextEmbeddingCache, TextEncoder, VaeImageEncoder
from ..config.schema import ConfigError, TrainConfig
from .distributed import DistributedContext, average_gradients, shard_frozen_base, wrap_data_parallel
from ..data.datasets import BucketBatches, ImageDataset, TrainingSample, check_enough_samples, discover_dataset
from ..adapters.ema import AdapterEMA
from .evaluation import eval_loss
from ..util.faults import crash_point
from ..hidream.flow_matching import (LoadBalancingLoss, flow_matching_loss, flow_matching_target, noisy_latents,
                            patch_tokens_to_image, resolution_shift, sample_sigmas, shift_sigmas)
from ..adapters.interface import create_adapter, describe
from ..speedups.block_offload import BlockStreamer
from ..adapters.lokr import LycorisConfig
from ..hidream.models import (PromptEmbeds, component_identity, load_text_encoders, load_transformer, load_vae,
                     resolve_model_paths, text_encoders_identity)
from .optimizers import build_lr_scheduler, build_optimizer, load_optimizer_state
from .plot import loss_curve_image
from ..quant.quanto import quantize_frozen
from ..hidream.sample import latents_to_images
from ..speedups.switches import apply_speedups, remove_speedups
from .tracking import RunLog
from .validation import render_validation, validation_latents, validation_prompts

logger = logging.getLogger(__name__)

LOKR_FILENAME = "pytorch_lora_weights.safetensors"  # SimpleTuner's name for the trained adapter
EMA_LOKR_FILENAME = "pytorch_lora_weights_ema.safetensors"  # the EMA of the same weights, beside it
COMMANDS = ("sample", "save", "stop")  # what TrainingCallbacks.poll_commands may return


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
    peak_memory_bytes: int = 0  # CUDA: max_memory_allocated; CPU: the process' peak resident set
    eta_seconds: float = 0.0  # remaining steps x mean step time of this session


@dataclass
class TrainingCallbacks:
    """Hooks for front ends (ComfyUI nodes, progress UIs). All optional; none may change the maths.

    poll_commands is called at every step boundary and returns any of COMMANDS: "sample" (validation images now),
    "save" (a checkpoint and the LoKr file now; training goes on), "stop" (checkpoint, LoKr, clean end).
    should_stop() returning True is the same as "stop".
    """

    on_phase: Optional[Callable[[str], None]] = None
    on_step: Optional[Callable[[StepMetrics], None]] = None
    on_validation: Optional[Callable[[int, Image.Image, Path], None]] = None  # (step, grid, the grid's file)
    should_stop: Optional[Callable[[], bool]] = None
    poll_commands: Optional[Callable[[], list[str]]] = None


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
    lokr_path: Optional[Path]  # None on ranks other than 0 of a multi-process run (rank 0 writes the files)
    losses: list[float]  # one per optimizer step since step 1 (a resumed run includes the checkpoint's)
    validation_images: list[Path] = field(default_factory=list)
    loss_curve_path: Optional[Path] = None
    text_cache: CacheStats = field(default_factory=CacheStats)
    latent_cache: CacheStats = field(default_factory=CacheStats)
    steps_done: int = 0
    seconds: float = 0.0
    total_steps: int = 0
    resumed_from: Optional[Path] = None
    stopped: bool = False  # ended early by should_stop / "stop": resume with resume_from_checkpoint: latest
    checkpoint_path: Optional[Path] = None  # the newest checkpoint this run wrote
    ema_lokr_path: Optional[Path] = None
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean eval loss)
    log_dir: Optional[Path] = None
    nonfinite_steps: int = 0  # steps whose update was skipped for a NaN/inf loss or gradient


def resolve_device(name: Optional[str]) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def predict_flow(transformer, model_input: torch.Tensor, sigmas: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
    """The transformer's flow prediction (noise - x0), (B, C, h, w), for noisy latents (B, C, h, w) at sigmas (B,)."""
    _, _, h, w = model_input.shape
    dtype = next(p for p in transformer.parameters() if p.dtype.is_floating_point).dtype
    embeds = embeds.to(device=model_input.device, dtype=dtype)
    output = transformer(hidden_states=model_input.to(dtype), timesteps=sigmas * 1000.0,
                         encoder_hidden_states_t5=embeds.t5, encoder_hidden_states_llama3=embeds.llama,
                         pooled_embeds=embeds.pooled, return_dict=False)[0]
    return -patch_tokens_to_image(output, h, w)  # raw output is x0 - noise


def flow_matching_step(transformer, latents: torch.Tensor, embeds: PromptEmbeds, generator: torch.Generator,
                       config: TrainConfig, load_balancing: LoadBalancingLoss,
                       ranks: DistributedContext = DistributedContext()
                       ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Loss of this rank's slice of one batch of one bucket. latents (B, 16, h, w) float32 on the model's device.

    Noise and sigmas are drawn for the whole global batch (B x world size) and sliced, so N ranks draw exactly
    what one process with the global batch draws. Returns (loss to backpropagate, flow-matching loss,
    load-balancing loss or None).
    """
    b, _, h, w = latents.shape
    device = latents.device
    global_batch = b * ranks.world_size

    noise = ranks.shard_tensor(torch.randn((global_batch, *latents.shape[1:]), generator=generator)).to(device)
    schedule = "uniform" if config.flow_use_uniform_schedule else "logit_normal"
    sigmas = ranks.shard_tensor(sample_sigmas(global_batch, generator, schedule, config.flow_sigmoid_scale))
    shift = resolution_shift(h, w) if config.flow_schedule_auto_shift else config.flow_schedule_shift
    sigmas = shift_sigmas(sigmas, shift).to(device)

    load_balancing.clear()
    prediction = predict_flow(transformer, noisy_latents(latents, noise, sigmas), sigmas, embeds)
    flow_loss = flow_matching_loss(prediction, flow_matching_target(latents, noise))

    lb_loss = load_balancing.take()
    loss = flow_loss
    if config.hidream_use_load_balancing_loss and lb_loss is not None:
        loss = loss + lb_loss  # with its gradient, weighted once (inside LoadBalancingLoss)
    return loss, flow_loss.detach(), (lb_loss.detach() if lb_loss is not None else None)


def discover(config: TrainConfig, world_size: int = 1
             ) -> tuple[list[ImageDataset], list[TrainingSample], BucketBatches]:
    """Find the training and eval samples and check there are enough, before any model is loaded.

    Eval samples come from dataset_type eval datasets; without one (and with eval_steps_interval set),
    num_eval_images training images are held out (seeded choice) and never trained on.
    """
    config.validate()
    found = [discover_dataset(d, seed=config.seed) for d in config.datasets]
    for ds in found:
        logger.info(ds.report.format())
    datasets = [ds for ds in found if ds.config.dataset_type == "image"]
    eval_samples = [s for ds in found if ds.config.dataset_type == "eval" for s in ds.samples]
    if config.eval_steps_interval and not eval_samples and config.num_eval_images:
        # A seeded choice that never empties a dataset: each keeps at least one image to train on.
        pool = [s for ds in datasets for s in ds.samples[1:]]
        eval_samples = random.Random(config.seed).sample(pool, min(config.num_eval_images, len(pool)))
        held_ids = {id(s) for s in eval_samples}
        datasets = [dataclasses.replace(ds, samples=[s for s in ds.samples if id(s) not in held_ids])
                    for ds in datasets]
        logger.info("eval loss: no dataset_type eval dataset, so %d training images are held out for it",
                    len(eval_samples))
    global_batch = config.train_batch_size * world_size  # every rank takes its slice of each global batch
    check_enough_samples(datasets, global_batch * config.gradient_accumulation_steps)
    return datasets, eval_samples, BucketBatches(datasets, global_batch, config.seed)


def resolve_total_steps(config: TrainConfig, batches_per_epoch: int) -> int:
    """max_train_steps when > 0 (SimpleTuner's precedence: it wins over num_train_epochs), else epochs x the
    optimizer steps of one epoch. Logged once, with the other resolved length figures."""
    steps_per_epoch = max(1, batches_per_epoch // config.gradient_accumulation_steps)
    if config.max_train_steps > 0:
        total = config.max_train_steps
        if config.num_train_epochs > 0 and config.num_train_epochs * steps_per_epoch != total:
            logger.warning("max_train_steps %d and num_train_epochs %d disagree; max_train_steps wins",
                           total, config.num_train_epochs)
    else:
        total = config.num_train_epochs * steps_per_epoch
    logger.info("training length: %d optimizer steps = %.2f epochs of %d steps (batch %d x accumulation %d)",
                total, total / steps_per_epoch, steps_per_epoch, config.train_batch_size,
                config.gradient_accumulation_steps)
    return total


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


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _text_encoder_precisions(config: TrainConfig) -> list[str]:
    return [getattr(config, f"text_encoder_{i}_precision") for i in range(1, 5)]


def write_loss_curve(losses: list[float], path: Path) -> Path:
    image = loss_curve_image(losses, title=f"training loss ({len(losses)} steps)")
    return atomic.write_with(path, lambda tmp: image.save(tmp, format="PNG"))


def _config_json(config: TrainConfig) -> str:
    return json.dumps(dataclasses.asdict(config), indent=1, default=str)


class TrainingStopped(RuntimeError):
    """Training cannot go on (out of memory, or a run of non-finite losses). A checkpoint of the last good state
    was written first: `checkpoint` (resume from it once the cause is fixed)."""

    def __init__(self, message: str, checkpoint: Optional[Path]):
        super().__init__(message + (f" The last good state is in {checkpoint}: fix the cause, then resume with "
                                    "resume_from_checkpoint: latest." if checkpoint else ""))
        self.checkpoint = checkpoint


def out_of_memory_message(config: TrainConfig, device: torch.device, step: int, checkpointing: bool) -> str:
    """What ran out, how much was in use, and the settings that need less (`checkpointing`: whether the step ran
    with gradient checkpointing, which the run may have switched on itself)."""
    peak = peak_memory_bytes(device) / 2**30
    fixes = []
    if not checkpointing:
        fixes.append("gradient_checkpointing: true (about half the activation memory)")
    if config.base_model_precision == "no_change":
        fixes.append("base_model_precision: int8-quanto (half the weight memory)")
        if not config.offload_blocks:
            fixes.append("offload_blocks: true (block weights stay in CPU memory and stream to the GPU; slower)")
    fixes.append(f"a smaller resolution (now {sorted({d.resolution for d in config.datasets})}) or train_batch_size "
                 f"(now {config.train_batch_size}; raise gradient_accumulation_steps to keep the effective batch)")
    if config.validation_prompt and max(max(r) for r in config.validation_resolutions) > 1024:
        fixes.append("smaller validation_resolution")
    return (f"out of memory on {device} at step {step} (peak {peak:.1f} GiB in use). Settings that need less: "
            + "; ".join(fixes) + ".")


def train(config: TrainConfig, callbacks: Optional[TrainingCallbacks] = None,
          components: Optional[ModelComponents] = None) -> TrainResult:
    """Run one training as `config` says; see the module docstring for the phases.

    However it ends (finished, stopped, an error), hooks come off the model and files are closed; a transformer
    the caller passed in comes back without the adapter, in its original mode.
    """
    with contextlib.ExitStack() as cleanup:
        return _train(config, callbacks or TrainingCallbacks(), components or ModelComponents(), cleanup)


def _train(config: TrainConfig, cb: TrainingCallbacks, given: ModelComponents,
           cleanup: contextlib.ExitStack) -> TrainResult:
    phase = cb.on_phase or (lambda name: logger.info("phase: %s", name))
    started = time.perf_counter()
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # torchrun / accelerate launch: one process per rank. Rank 0 alone writes files; see distributed.py.
    ranks = DistributedContext.from_environment()
    device = ranks.device(config.device) if ranks.enabled else resolve_device(config.device)
    ranks.start(device, config.distributed_timeout_seconds)
    cleanup.callback(ranks.stop)
    is_main = ranks.is_main
    sharded = ranks.enabled and config.distributed_mode == "fsdp"
    if ranks.enabled:
        logger.info("rank %d of %d (%s): effective batch %d = train_batch_size %d x gradient_accumulation_steps %d "
                    "x %d ranks; the learning rate is used as given (%g), not rescaled", ranks.rank,
                    ranks.world_size, config.distributed_mode, config.train_batch_size *
                    config.gradient_accumulation_steps * ranks.world_size, config.train_batch_size,
                    config.gradient_accumulation_steps, ranks.world_size, config.learning_rate)
    dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32
    lycoris = LycorisConfig.from_file(config.lycoris_config) if config.lycoris_config else LycorisConfig()
    if config.init_lokr_weights and not Path(config.init_lokr_weights).is_file():
        raise ConfigError(f"init_lokr_weights: adapter file not found: {config.init_lokr_weights}")
    prompts = validation_prompts(config.validation_prompt, config.user_prompt_library)
    resume_from = ckpt.resolve_resume_checkpoint(output_dir, config.resume_from_checkpoint)
    if config.validation_torch_compile:
        logger.info("validation_torch_compile is not applied: validation merges the LoKr into the weights, which "
                    "would recompile the model at every validation")
    if config.aspect_bucket_rounding is not None:
        logger.info("aspect_bucket_rounding is not needed: buckets here are exact multiples of 16 pixels")

    # 1. Data: everything that can be wrong with it is found before a model is loaded.
    phase("discovering data")
    datasets, eval_samples, batches = discover(config, ranks.world_size)
    total_steps = resolve_total_steps(config, batches.batches_per_epoch())
    needs_files = None in (given.transformer, given.text_encoder, given.image_encoder, given.decode_latents)
    paths = resolve_model_paths(config.pretrained_model_name_or_path, config.pretrained_llama_path,
                                require_text_encoders=given.text_encoder is None) if needs_files else None
    cache_dir = config.resolved_cache_dir

    # 2. Text embeddings. The four encoders (~25 GB for the real model) are loaded only when a caption is missing
    #    from the cache (quantised first when text_encoder_N_precision says so), and leave memory before the
    #    transformer arrives. The precisions are part of the cache key: quantised embeddings differ.
    phase("caching text embeddings")
    captions = [s.caption for ds in datasets for s in ds.samples] + [s.caption for s in eval_samples]
    if prompts:
        captions += [*prompts.values(), config.validation_negative_prompt]
    precisions = _text_encoder_precisions(config)
    text_identity = given.text_encoder.identity if given.text_encoder else text_encoders_identity(paths, dtype)
    if given.text_encoder is None and any(p != "no_change" for p in precisions):
        text_identity += "/" + ",".join(precisions)
    text_cache = TextEmbeddingCache(config.resolved_text_cache_dir, text_identity)
    with ranks.main_first():  # rank 0 encodes; the others wait, then find every entry cached
        if text_cache.missing(captions):
            text_encoders = given.text_encoder or load_text_encoders(paths, dtype=dtype, device=device)
            if given.text_encoder is None:
                for encoder, precision in zip(text_encoders._encoders(), precisions):
                    quantize_frozen(encoder, precision)
            with tqdm(desc="text embeddings", unit="caption", disable=None) as bar:
                text_cache.fill(captions, text_encoders, batch_size=config.text_cache_write_batch_size,
                                progress=_progress_to(bar))
            if given.text_encoder is None:
                text_encoders.free()
            del text_encoders
            release_memory()
        else:
            text_cache.fill(captions, encoder=None)  # counts the hits; nothing to encode
    logger.info("text cache%s: %s", ranks.label, text_cache.stats)

    # 3. Latents, in each dataset's cache_dir_vae (default <cache_dir>/latents). The VAE stays (small) to decode
    #    validation images; offload_during_startup parks it on the CPU between uses.
    phase("caching latents")
    vae = load_vae(paths, dtype=torch.float32, device=device) if needs_files else None
    image_encoder = given.image_encoder or VaeImageEncoder(vae, component_identity(paths.model_dir / "vae"))
    latent_caches: dict[str, LatentCache] = {}
    for dataset_config in config.datasets:
        folder = dataset_config.cache_dir_vae or cache_dir / "latents"
        latent_caches[dataset_config.id] = LatentCache(folder, image_encoder.identity)
    samples = [s for ds in datasets for s in ds.samples] + list(eval_samples)
    with ranks.main_first():
        with tqdm(desc="latents", unit="image", disable=None) as bar:
            for dataset_id, cache in latent_caches.items():
                cache.fill([s for s in samples if s.dataset_id == dataset_id], image_encoder, config.vae_batch_size,
                           progress=_progress_to(bar))
    latent_stats = CacheStats()
    for cache in latent_caches.values():
        for name in (f.name for f in dataclasses.fields(CacheStats)):
            setattr(latent_stats, name, getattr(latent_stats, name) + getattr(cache.stats, name))
    logger.info("latent cache%s: %s", ranks.label, latent_stats)
    if vae is not None and config.offload_during_startup and device.type != "cpu":
        vae.to("cpu")

    def load_latents(batch: list[TrainingSample]) -> torch.Tensor:
        return torch.stack([latent_caches[s.dataset_id].load([s])[0] for s in batch])

    def decode_latents(latents: torch.Tensor) -> list[Image.Image]:
        if given.decode_latents:
            return given.decode_latents(latents)
        if config.offload_during_startup:
            vae.to(device)
        images = latents_to_images(vae, latents)
        if config.offload_during_startup and device.type != "cpu":
            vae.to("cpu")
        return images

    # 4. Transformer (frozen, optionally quantised) and the adapter that trains (LoKr, or LoRA with lora_type
    #    standard; adapters.py gives both the same interface).
    phase("loading transformer")
    if given.transformer is not None:
        transformer = given.transformer
        base_name = given.transformer_name
    else:
        # Streamed blocks are packed from CPU memory: never put the whole model on the device first.
        transformer = load_transformer(paths, dtype=dtype, device="cpu" if config.offload_blocks else device)
        quantize_frozen(transformer, config.base_model_precision)
        base_name = paths.model_dir.name
    transformer.requires_grad_(False)
    was_training, was_checkpointing = transformer.training, transformer.is_gradient_checkpointing
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()  # MoE routing stays differentiable; eval() would cut the routed experts' gradient
    adapter = create_adapter(transformer, config, lycoris)
    if config.init_lokr_weights:
        adapter.load_weights(config.init_lokr_weights)
        logger.info("adapter initialised from %s", config.init_lokr_weights)
    adapter.module.to(device)
    lokr_network = adapter.module if adapter.kind == "lokr" else None
    apply_speedups(transformer, lokr_network, config)
    if config.offload_blocks:
        if ranks.enabled:
            raise ConfigError("offload_blocks runs in a single process; under torchrun / accelerate use "
                              "distributed_mode: fsdp to spread the weights instead")
        callers_device = next(transformer.parameters()).device  # where a given transformer goes back to
        streamer = BlockStreamer(transformer, device)
        if given.transformer is not None:
            cleanup.callback(streamer.remove, callers_device)
    model = transformer  # what the training forward calls: the transformer, or DDP over it and its LoKr
    if sharded:
        shard_frozen_base(transformer)
    elif ranks.enabled:
        model = wrap_data_parallel(transformer, adapter.module, ranks, device)

    @cleanup.callback
    def hand_back_callers_model() -> None:
        if given.transformer is None:
            return  # ours: it is dropped with this function
        remove_speedups(transformer, lokr_network)
        adapter.remove()
        if not was_checkpointing and transformer.is_gradient_checkpointing:
            transformer.disable_gradient_checkpointing()
        transformer.train(was_training)

    logger.info("adapter: %s", describe(adapter))
    if sharded:
        logger.info("validation samples run the LoKr unmerged (bypass mode): the base weights are sharded")
    elif not adapter.mergeable:
        logger.warning("the base weights are quantised: a LoKr cannot be merged into them, so validation samples "
                       "run it unmerged (bypass mode)")
    params = adapter.parameters()
    optimizer = build_optimizer(config, params, device)
    lr_schedule = build_lr_scheduler(config, optimizer, total_steps)
    ema = AdapterEMA(adapter.module, config.ema_decay) if config.use_ema else None
    load_balancing = LoadBalancingLoss(transformer, config.hidream_load_balancing_loss_weight)
    cleanup.callback(load_balancing.remove)
    if config.hidream_use_load_balancing_loss:
        logger.info("MoE load-balancing loss on %d gates, weight %g, with gradient (SimpleTuner adds it detached "
                    "and weights it twice)", load_balancing.num_gates, config.hidream_load_balancing_loss_weight)

    # Noise, sigmas and caption dropout draw from their own seeded generators: same seed, same run.
    noise_generator = torch.Generator().manual_seed(config.seed)
    dropout_rng = random.Random(config.seed)
    losses: list[float] = []
    eval_losses: list[tuple[int, float]] = []
    start_step = 0

    # 5. Resume: weights, optimizer, schedule, EMA, RNG streams, data position and history, exactly as saved.
    if resume_from is not None:
        phase("resuming")
        state = ckpt.load_training_state(resume_from)
        written_by = (state.get("optimizer_name"), state.get("adapter"))
        if written_by != (config.optimizer, adapter.kind):
            raise ConfigError(f"{resume_from} was written with optimizer {written_by[0]} and a {written_by[1]} "
                              f"adapter, this run uses {config.optimizer} and a {adapter.kind}: resume with the "
                              "settings it was written with, or train into a new output_dir")
        adapter.load_weights(resume_from / LOKR_FILENAME)
        try:
            load_optimizer_state(optimizer, state["optimizer"])
            lr_schedule.load_state_dict(state["lr_scheduler"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ConfigError(f"{resume_from} was written by a run with another optimizer or adapter ({exc}); "
                              "resume with the settings it was written with, or train into a new output_dir"
                              ) from exc
        if ema is not None:
            if "ema" in state:
                ema.load_state_dict(state["ema"])
            else:
                logger.warning("%s has no EMA state: the EMA restarts from the current weights", resume_from)
        ckpt.restore_rng_state(state["rng"], noise_generator, dropout_rng)
        batches.load_state_dict(state["batches"])
        losses = [float(v) for v in state["losses"]]
        eval_losses = [(int(s), float(v)) for s, v in state["eval_losses"]]
        start_step = int(state["step"])
        logger.info("resumed from %s at step %d of %d", resume_from, start_step, total_steps)
    run_log = RunLog(output_dir / "logs" / config.tracker_run_name, tensorboard=config.report_to == "tensorboard",
                     resume_step=start_step if resume_from is not None else None, enabled=is_main)
    cleanup.callback(run_log.close)
    checkpoint_path: Optional[Path] = None

    def adapter_files(folder: Path, step: int) -> tuple[Optional[Path], Optional[Path]]:
        """Write the LoKr (and its EMA twin) into `folder` (rank 0 only; every rank holds the same weights)."""
        if not is_main:
            return None, None
        meta = {"trainer": "ComfyUI-HiDream-LoKr", "steps": step, "base_model": base_name}
        main = adapter.save(folder / LOKR_FILENAME, metadata=meta)
        if ema is None:
            return main, None
        with ema.swapped_in():
            averaged = adapter.save(folder / EMA_LOKR_FILENAME, metadata={**meta, "ema_decay": config.ema_decay})
        return main, averaged

    def save_checkpoint(step: int) -> Optional[Path]:
        """Rank 0 writes what every rank needs to resume: the random streams and data position are those of the
        global batch, identical on every rank."""
        if not is_main:
            return None

        def write(folder: Path) -> None:
            adapter_files(folder, step)
            state = {"step": step, "total_steps": total_steps, "optimizer_name": config.optimizer,
                     "adapter": adapter.kind, "optimizer": optimizer.state_dict(), "lr_scheduler": lr_schedule.state_dict(),
                     "rng": ckpt.rng_state(noise_generator, dropout_rng), "batches": batches.state_dict(),
                     "losses": list(losses), "eval_losses": [list(e) for e in eval_losses]}
            if ema is not None:
                state["ema"] = ema.state_dict()
            torch.save(state, folder / ckpt.STATE_FILE)
            (folder / "config.json").write_text(_config_json(config))  # the folder itself is published atomically

        path = ckpt.save_checkpoint(output_dir, step, write)
        ckpt.prune_checkpoints(output_dir, config.checkpoints_total_limit)
        logger.info("checkpoint written: %s", path)
        return path

    validated_steps: set[int] = set()

    def validate(step: int, resume_phase: Optional[str] = "training") -> list[Path]:
        # Rank 0 samples alone and the others wait for it in the next step's gradient all-reduce; except with FSDP,
        # where each block gathers its weights from every rank, so all ranks run the same forwards and rank 0
        # alone decodes and writes.
        if not prompts or step in validated_steps or not (is_main or sharded):
            return []
        validated_steps.add(step)
        phase("validating")
        settings = config.validation_sampling()
        if step == 0:  # the benchmark image is the base model's, whatever the LoKr's initialisation
            settings = replace(settings, lokr_strength=0.0)
        with torch.random.fork_rng(devices=[]), adapter.applied(settings.lokr_strength):
            if is_main:
                paths_, grid, grid_path = render_validation(step, prompts, config.validation_resolutions, settings,
                                                            text_cache, transformer, decode_latents,
                                                            output_dir / "validation")
            else:
                for _ in validation_latents(prompts, config.validation_resolutions, settings, text_cache,
                                            transformer):
                    pass
        if is_main:
            run_log.image("validation/grid", step, grid)
            if losses:  # the loss curve (with its moving average) is redrawn at every validation
                write_loss_curve(losses, output_dir / "loss_curve.png")
            if cb.on_validation:
                cb.on_validation(step, grid, grid_path)
        if resume_phase:
            phase(resume_phase)
        return [*paths_, grid_path] if is_main else []

    def evaluate(step: int) -> None:
        if not (is_main or sharded):  # FSDP: every rank runs the same forwards (see validate)
            return
        with torch.random.fork_rng(devices=[]):
            value = eval_loss(eval_samples, load_latents, text_cache,
                              lambda x, sigmas, embeds: predict_flow(transformer, x, sigmas, embeds),
                              config.eval_timesteps, config.seed, device)
        load_balancing.clear()
        eval_losses.append((step, value))
        run_log.scalars(step, {"eval_loss": value})
        if is_main:
            logger.info("step %d: eval loss %.5f over %d images", step, value, len(eval_samples))

    def accumulate_gradients(micro_batches: list[tuple[list[TrainingSample], list[bool]]]
                             ) -> tuple[float, float, Optional[float]]:
        """Forward and backward of every micro-batch of one step (this rank's slices); returns the step's mean
        loss, flow-matching loss and load-balancing loss (or None). The gradients are left in the LoKr."""
        step_loss = step_flow = 0.0
        step_lb: Optional[float] = None
        for micro, (batch, dropped) in enumerate(micro_batches):
            latents = load_latents(batch).to(device)
            embeds = text_cache.load(["" if drop else s.caption for s, drop in zip(batch, dropped)])
            last_micro = micro == len(micro_batches) - 1
            # DDP averages gradients once per optimizer step, not per micro-batch.
            sync = model.no_sync() if hasattr(model, "no_sync") and not last_micro else contextlib.nullcontext()
            with sync:
                loss, flow_loss, lb_loss = flow_matching_step(model, latents, embeds, noise_generator, config,
                                                              load_balancing, ranks)
                (loss / len(micro_batches)).backward()
            step_loss += loss.item() / len(micro_batches)
            step_flow += flow_loss.item() / len(micro_batches)
            if lb_loss is not None:
                step_lb = (step_lb or 0.0) + lb_loss.item() / len(micro_batches)
        return step_loss, step_flow, step_lb

    def lower_memory_setting() -> Optional[str]:
        """After running out of memory: switch on, for the rest of this run, a setting that needs less; None when
        there is none (or recovery is off, or other ranks would be left waiting in a collective)."""
        if not config.recover_from_out_of_memory or ranks.enabled:
            return None
        if not transformer.is_gradient_checkpointing:  # the maths is unchanged; activations about halve
            transformer.enable_gradient_checkpointing()
            return "gradient_checkpointing: true"
        return None

    # 6. The loop. Validation, eval loss, checkpoints and front-end commands happen between steps.
    phase("training")
    batch_iter = iter(batches)
    validation_images: list[Path] = []
    if start_step == 0 and not config.disable_benchmark:  # the base model's images, to compare the LoKr's against
        validation_images += validate(0)
    if start_step == 0 and config.eval_steps_interval and eval_samples:
        evaluate(0)
    steps_done = start_step
    stopped = False
    nonfinite_in_a_row = nonfinite_steps = 0
    session_started = time.perf_counter()
    bar = tqdm(total=total_steps, initial=start_step, desc="training", disable=None if is_main else True)
    for step in range(start_step + 1, total_steps + 1):
        if cb.should_stop and cb.should_stop():
            logger.info("stop requested before step %d", step)
            stopped = True
            break
        step_started = time.perf_counter()
        # The step's micro-batches and caption dropout are drawn before any runs, and the noise stream's state is
        # kept, so a step retried after running out of memory is the same step.
        micro_batches = []
        for _ in range(config.gradient_accumulation_steps):
            batch = next(batch_iter)  # the global batch: every rank draws for all of it, trains on its slice
            dropped = [dropout_rng.random() < config.caption_dropout_probability for _ in batch]
            micro_batches.append((ranks.shard(batch), ranks.shard(dropped)))
        noise_state = noise_generator.get_state()
        optimizer.zero_grad(set_to_none=True)
        while True:
            try:
                step_loss, step_flow, step_lb = accumulate_gradients(micro_batches)
                break
            except torch.OutOfMemoryError as exc:
                optimizer.zero_grad(set_to_none=True)  # the failed attempt's partial gradients
                load_balancing.clear()
                switched_on = lower_memory_setting()
                if switched_on is None:  # nothing left to lower: keep the last complete step, say what would fit
                    release_memory()
                    message = out_of_memory_message(config, device, step, transformer.is_gradient_checkpointing)
                    raise TrainingStopped(message, save_checkpoint(steps_done) if is_main else None) from exc
            # Past the handler its traceback, and the activations its frames pinned, are gone.
            release_memory()
            noise_generator.set_state(noise_state)
            logger.warning("step %d ran out of memory on %s (peak %.1f GiB); retrying it, and training on, with %s "
                           "(put it in the config to start with it)", step, device,
                           peak_memory_bytes(device) / 2**30, switched_on)
        if sharded:
            average_gradients(params, ranks)
        step_loss, step_flow = ranks.mean(step_loss), ranks.mean(step_flow)  # what rank 0 logs is the global mean
        step_lb = ranks.mean(step_lb) if step_lb is not None else None
        total_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        grad_norm = total_norm.item()
        if math.isfinite(step_loss) and math.isfinite(grad_norm):
            nonfinite_in_a_row = 0
            if config.grad_clip_method == "value":
                torch.nn.utils.clip_grad_value_(params, config.max_grad_norm)
            else:
                torch.nn.utils.clip_grads_with_norm_(params, config.max_grad_norm, total_norm)
            optimizer.step()
            if ema is not None:
                ema.update()
        else:
            # A NaN/inf loss or gradient would poison the weights and the optimizer's moments: skip the update.
            # The data, random streams and lr schedule still advance, so the step count keeps its meaning.
            optimizer.zero_grad(set_to_none=True)
            nonfinite_in_a_row += 1
            nonfinite_steps += 1
            logger.warning("step %d: loss %s, gradient norm %s: update skipped (%d in a row, %d in this run)",
                           step, step_loss, grad_norm, nonfinite_in_a_row, nonfinite_steps)
            if nonfinite_in_a_row >= config.max_consecutive_nonfinite_steps:
                raise TrainingStopped(
                    f"{nonfinite_in_a_row} steps in a row ended with a non-finite loss or gradient (the last at "
                    f"step {step}); the weights are those after the last finite step. Usual causes: a learning "
                    f"rate too high for {config.optimizer} (now {config.learning_rate:g}), bf16 overflow (check "
                    "with mixed_precision: no), or a broken image in the data.",
                    save_checkpoint(step) if is_main else None)
        lr_schedule.step()
        crash_point("step")
        losses.append(step_loss)
        steps_done = step

        seconds = time.perf_counter() - step_started
        mean_seconds = (time.perf_counter() - session_started) / (step - start_step)
        metrics = StepMetrics(step=step, total_steps=total_steps, loss=step_loss, flow_loss=step_flow,
                              load_balancing_loss=step_lb, learning_rate=lr_schedule.get_last_lr()[0],
                              grad_norm=grad_norm, seconds_per_step=seconds,
                              peak_memory_bytes=peak_memory_bytes(device),
                              eta_seconds=mean_seconds * (total_steps - step))
        run_log.scalars(step, {"loss": step_loss, "flow_loss": step_flow, "load_balancing_loss": step_lb,
                               "learning_rate": metrics.learning_rate, "grad_norm": grad_norm,
                               "seconds_per_step": seconds, "peak_memory_bytes": metrics.peak_memory_bytes,
                               "nonfinite_steps": nonfinite_steps})
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{metrics.learning_rate:.2e}")
        bar.update(1)
        if cb.on_step:
            cb.on_step(metrics)

        commands = [c for c in (cb.poll_commands() if cb.poll_commands else []) if c in COMMANDS]
        last = step == total_steps
        if "sample" in commands or (config.validation_step_interval and step % config.validation_step_interval == 0
                                    and not last):
            validation_images += validate(step)
        if config.eval_steps_interval and eval_samples and step % config.eval_steps_interval == 0:
            evaluate(step)
        if "stop" in commands:
            stopped = True
        if stopped or "save" in commands or (config.checkpoint_step_interval
                                            and step % config.checkpoint_step_interval == 0):
            checkpoint_path = save_checkpoint(step)
            if "save" in commands:
                adapter_files(output_dir, step)
        if stopped:
            logger.info("stopped after step %d; resume with resume_from_checkpoint: latest", step)
            break
    bar.close()
    if stopped and (checkpoint_path is None or ckpt.checkpoint_step(checkpoint_path) != steps_done):
        checkpoint_path = save_checkpoint(steps_done)

    # 7. Outputs: the LoKr (and its EMA), a final validation and the loss curve.
    phase("saving")
    crash_point("lokr-save")
    lokr_path, ema_path = adapter_files(output_dir, steps_done)
    if not stopped:
        validation_images += validate(steps_done, resume_phase=None)
    curve_path = None
    if is_main:
        curve_path = write_loss_curve(losses, output_dir / "loss_curve.png")
        atomic.write_text(output_dir / "losses.json", json.dumps(losses))
    phase("done")
    return TrainResult(output_dir=output_dir, lokr_path=lokr_path, losses=losses,
                       validation_images=validation_images, loss_curve_path=curve_path,
                       text_cache=text_cache.stats, latent_cache=latent_stats, steps_done=steps_done,
                       seconds=time.perf_counter() - started, total_steps=total_steps, resumed_from=resume_from,
                       stopped=stopped, checkpoint_path=checkpoint_path, ema_lokr_path=ema_path,
                       eval_losses=eval_losses, log_dir=run_log.folder, nonfinite_steps=nonfinite_steps)
