"""Pretraining of the drawing tiny HiDream: a codec (the VAE) first, then the transformer, on the CPU, from a seed.

    python -m trainer_core pretrain-tiny-model [--out trainer_core/hidream/tiny/weights]

1. Text encoders and tokenizers: the builder's (real transformers classes, seeded random weights), tokenizers trained
   on the corpus' captions; their weights are rounded to bfloat16 before anything reads them, so shipping them in
   bfloat16 is lossless.
2. VAE: a real diffusers AutoencoderKL in the Flux layout, trained to reproduce flat-colour pictures (L1 on pixels,
   plus a KL term whose prior is N(0, 1) on the *normalised* latents (z - shift_factor) * scaling_factor, so that the
   latents the trainer sees have about unit scale, as the real Flux VAE's do). Rounded to float16.
3. Transformer: a real diffusers HiDreamImageTransformer2DModel, trained by flow matching in the project's
   conventions (x_sigma = (1 - sigma) x0 + sigma noise, timesteps = 1000 sigma, raw output ~ x0 - noise) on the
   corpus latents (encoded once by the rounded VAE) and the corpus captions (encoded once by the pipeline's own
   encode_prompt), with caption dropout to the empty prompt so that classifier-free guidance works.

Everything runs in one thread, in a fixed order, from seeded generators, with deterministic algorithms: two runs
give byte-identical weight files (the manifest records their sha256).
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ...util.atomic import file_sha256
from . import corpus

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VaeRecipe:
    steps: int = 2500
    # Each step is one batch of whole 64 px pictures (GroupNorm statistics and the mid-block attention are per
    # picture): a fully convolutional codec trained at 64 px reproduces 128 and 256 px pictures as well (measured:
    # pixel MAE 0.023 / 0.019 / 0.018 at 64 / 128 / 256 px after 1500 steps).
    pixels_per_step: int = 8 * 64 * 64
    sizes: tuple[int, ...] = (64,)
    learning_rate: float = 1e-3
    final_learning_rate: float = 5e-5
    kl_weight: float = 1e-4
    initial_log_variance: float = -9.0
    seed: int = 1


def _cosine(step: int, total: int, start: float, end: float, warmup: int = 50) -> float:
    if step < warmup:
        return start * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(1.0, progress)))


def normalised_posterior(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the posterior in the trainer's normalised latent space ((z - shift) * scale)."""
    dist = vae.encode(pixels).latent_dist
    shift, scale = float(vae.config.shift_factor), float(vae.config.scaling_factor)
    return (dist.mean - shift) * scale, dist.std * scale


def vae_batch(rng: random.Random, recipe: VaeRecipe, items: list[corpus.CorpusItem]) -> torch.Tensor:
    """A batch of whole codec pictures of one size: half transformer-corpus scenes, half wider codec scenes."""
    size = rng.choice(recipe.sizes)
    count = max(1, recipe.pixels_per_step // (size * size))
    images = []
    for _ in range(count):
        if rng.random() < 0.5:
            images.append(rng.choice(items).draw(size))
        else:
            images.append(corpus.draw_layers(corpus.vae_scene(rng), size))
    return corpus.to_tensor(images)


def prepare_vae_init(vae, log_variance: float) -> None:
    """Start the posterior almost deterministic (log-variance bias `log_variance`, its weights scaled down): with
    diffusers' default init the posterior std starts at 1 in raw units and the decoder learns through that noise
    far more slowly; the recipe's weak KL term then decides how much noise the codec keeps."""
    conv = vae.encoder.conv_out
    half = conv.out_channels // 2
    with torch.no_grad():
        conv.weight[half:].mul_(0.01)
        conv.bias[half:].fill_(log_variance)


def train_vae(vae, recipe: VaeRecipe, log: Callable[[str], None] = logger.info) -> list[float]:
    """Train `vae` in place; returns the per-step pixel MAE (pixels in [0, 1])."""
    rng = random.Random(recipe.seed)
    noise = torch.Generator().manual_seed(recipe.seed)
    items = corpus.all_items()
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.learning_rate, weight_decay=0.0)
    history = []
    started = time.perf_counter()
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = _cosine(step, recipe.steps, recipe.learning_rate, recipe.final_learning_rate)
        pixels = vae_batch(rng, recipe, items)
        u, s = normalised_posterior(vae, pixels)
        u_noisy = u + s * torch.randn(u.shape, generator=noise)
        shift, scale = float(vae.config.shift_factor), float(vae.config.scaling_factor)
        decoded = vae.decode(u_noisy / scale + shift).sample
        l1 = (decoded - pixels).abs().mean()
        kl = 0.5 * (u.pow(2) + s.pow(2) - 1.0 - 2.0 * torch.log(s)).mean()
        loss = l1 + (decoded - pixels).pow(2).mean() + recipe.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        history.append(l1.item() / 2)
        if step % 100 == 0 or step == recipe.steps - 1:
            recent = history[-100:]
            log(f"vae step {step}: pixel MAE {sum(recent) / len(recent):.4f}, kl {kl.item():.3f}, "
                f"latent std {u.std().item():.3f}, posterior std {s.mean().item():.4f}, "
                f"{time.perf_counter() - started:.0f} s")
    vae.eval()
    return history



# ------------------------------------------------------------------------------------------------- transformer


@dataclass(frozen=True)
class TransformerRecipe:
    steps: int = 8000
    batch_size: int = 8
    resolution: int = 128
    learning_rate: float = 1.5e-3
    final_learning_rate: float = 3e-5
    warmup: int = 200
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    load_balancing_alpha: float = 0.01
    seed: int = 2
    corpus_stride: int = 1  # train on every n-th corpus item (1: all; the --quick check uses a few)


@dataclass
class EncodedCorpus:
    """Everything the transformer is trained on, computed once: posterior (mean, std) of each picture's normalised
    latents and the pipeline's text conditioning of each caption (row -1: the empty prompt)."""

    latent_mean: torch.Tensor  # (N, 16, h, w)
    latent_std: torch.Tensor  # (N, 16, h, w)
    t5: torch.Tensor  # (N + 1, 128, D_t5)
    llama: torch.Tensor  # (L, N + 1, 128, D_llama)
    pooled: torch.Tensor  # (N + 1, D_pooled)
    captions: list[str]

    def embeds(self, rows: torch.Tensor):
        from ..embeds import PromptEmbeds

        return PromptEmbeds(t5=self.t5[rows], llama=self.llama[:, rows], pooled=self.pooled[rows])


@torch.no_grad()
def encode_corpus(vae, encoders, items: list[corpus.CorpusItem], resolution: int, chunk: int = 64) -> EncodedCorpus:
    means, stds = [], []
    for start in range(0, len(items), chunk):
        pixels = corpus.to_tensor([item.draw(resolution) for item in items[start:start + chunk]])
        u, s = normalised_posterior(vae, pixels)
        means.append(u)
        stds.append(s)
    captions = [item.caption for item in items] + [""]
    t5, llama, pooled = [], [], []
    for start in range(0, len(captions), chunk):
        e = encoders.encode(captions[start:start + chunk])
        t5.append(e.t5.float())
        llama.append(e.llama.float())
        pooled.append(e.pooled.float())
    return EncodedCorpus(torch.cat(means), torch.cat(stds), torch.cat(t5), torch.cat(llama, dim=1),
                         torch.cat(pooled), captions)


def prepare_transformer_init(transformer) -> None:
    """adaLN-zero (as DiT): every block's modulation and the output layer start at zero, so each block starts as the
    identity and the model as 'predict nothing'; diffusers' default init makes a 64-wide HiDream train far slower."""
    for module in transformer.modules():
        mod = getattr(module, "adaLN_modulation", None)
        if mod is not None:
            torch.nn.init.zeros_(mod[-1].weight)
            torch.nn.init.zeros_(mod[-1].bias)
    torch.nn.init.zeros_(transformer.final_layer.linear.weight)
    torch.nn.init.zeros_(transformer.final_layer.linear.bias)


def train_transformer(transformer, data: EncodedCorpus, recipe: TransformerRecipe,
                      log: Callable[[str], None] = logger.info,
                      evaluate: Optional[Callable[[torch.nn.Module, int], None]] = None, eval_every: int = 0):
    """Flow-matching pretraining in the trainer's conventions; returns (EMA transformer, per-step losses)."""
    import copy

    from ..flow_matching import LoadBalancingLoss, flow_matching_loss, flow_matching_target, noisy_latents
    from ..forward import predict_flow

    g = torch.Generator().manual_seed(recipe.seed)
    n = data.latent_mean.shape[0]
    uncond_row = n  # the empty prompt
    ema = copy.deepcopy(transformer).requires_grad_(False).eval()
    ema_params = list(ema.parameters())
    transformer.train()
    balancing = LoadBalancingLoss(transformer, recipe.load_balancing_alpha)
    params = list(transformer.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.learning_rate, betas=(0.9, 0.99), weight_decay=0.0)
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = _cosine(step, recipe.steps, recipe.learning_rate, recipe.final_learning_rate, recipe.warmup)
        rows = torch.randint(0, n, (recipe.batch_size,), generator=g)
        x0 = data.latent_mean[rows] + data.latent_std[rows] * torch.randn(data.latent_mean[rows].shape, generator=g)
        dropped = torch.rand(recipe.batch_size, generator=g) < recipe.caption_dropout
        text_rows = torch.where(dropped, torch.full_like(rows, uncond_row), rows)
        # Half the batch at logit-normal sigmas, half at the same shifted by 3 (the sampler's default shift), so
        # that sampling works with either shift.
        sigmas = torch.sigmoid(torch.randn(recipe.batch_size, generator=g))
        shifted = torch.arange(recipe.batch_size) % 2 == 1
        sigmas = torch.where(shifted, 3.0 * sigmas / (1.0 + 2.0 * sigmas), sigmas)
        noise = torch.randn(x0.shape, generator=g)
        balancing.clear()
        prediction = predict_flow(transformer, noisy_latents(x0, noise, sigmas), sigmas * 1000.0,
                                 data.embeds(text_rows))
        flow_loss = flow_matching_loss(prediction, flow_matching_target(x0, noise))
        aux = balancing.take()
        loss = flow_loss + (aux if aux is not None else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        losses.append(flow_loss.item())
        if step % 100 == 0 or step == recipe.steps - 1:
            recent = losses[-100:]
            log(f"transformer step {step}: flow loss {sum(recent) / len(recent):.4f}, "
                f"{time.perf_counter() - started:.0f} s")
        if evaluate is not None and eval_every and (step + 1) % eval_every == 0:
            evaluate(ema, step + 1)
    balancing.remove()
    return ema, losses


# --------------------------------------------------------------------------------------------------- the command


def _round_(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round every weight to `dtype` and back, in place: what follows reads exactly what is shipped."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.dtype.is_floating_point:
                tensor.copy_(tensor.to(dtype).to(tensor.dtype))


def _text_encoder_classes() -> dict:
    from transformers import CLIPTextModelWithProjection, LlamaForCausalLM, T5EncoderModel

    return {"text_encoder": CLIPTextModelWithProjection, "text_encoder_2": CLIPTextModelWithProjection,
            "text_encoder_3": T5EncoderModel, "text_encoder_4": LlamaForCausalLM}


def _component_state(name: str, module: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {f"{name}/{key}": value.detach().to(dtype).contiguous() for key, value in module.state_dict().items()
            if value.dtype.is_floating_point}


PROGRESS_CAPTIONS = tuple(corpus.caption_for(*item) for item in (
    ("red", "circle", "blue"), ("yellow", "star", "purple", "top"), ("white", "cross", "black", "left"),
    ("blue", "triangle", "yellow"), ("green", "star", "white"), ("purple", "circle", "orange"),
    ("orange", "square", "green", "right"), ("white", "triangle", "blue")))  # the last four: held-out pairs


def progress_grid(transformer, vae, encoders, captions=PROGRESS_CAPTIONS, size: int = 128, steps: int = 20,
                  guidance: float = 4.0):
    """The pretrained model's pictures of `captions` side by side (the last four use held-out colour-shape pairs),
    sampled as the trainer's validation samples them."""
    from PIL import Image

    from ...config.schema import SamplingConfig
    from ..sample import denoise
    from ..vae import latents_to_images

    uncond = encoders.encode([""])
    tiles = []
    for caption in captions:
        settings = SamplingConfig(prompt=caption, width=size, height=size, num_inference_steps=steps,
                                  guidance=guidance, shift=3.0, seed=0)
        tiles.append(latents_to_images(vae, denoise(transformer, encoders.encode([caption]), uncond, settings))[0])
    grid = Image.new("RGB", (size * len(tiles), size), "white")
    for i, tile in enumerate(tiles):
        grid.paste(tile, (i * size, 0))
    return grid


def pretrain_tiny_model(weights_dir: Path, vae_recipe: VaeRecipe = VaeRecipe(),
                        transformer_recipe: TransformerRecipe = TransformerRecipe(),
                        log: Callable[[str], None] = logger.info, progress_dir: Optional[Path] = None,
                        progress_every: int = 2000) -> dict:
    """Pretrain the drawing tiny HiDream and write its weights file and manifest into `weights_dir`; with
    `progress_dir`, a grid of sample pictures every `progress_every` transformer steps (and the VAE's round trip).

    Returns the manifest. Single-threaded and deterministic: the same recipes give the same bytes.
    """
    import tempfile

    from diffusers import AutoencoderKL, HiDreamImageTransformer2DModel

    from ..models import load_text_encoders, resolve_model_paths
    from .drawing import (DRAWING_SEED, DRAWING_SIZES, MANIFEST_FILE, WEIGHTS_FILE, drawing_corpus,
                          manifest_sizes, tokenizer_fingerprint, write_weights)
    from .builder import write_model_folder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="tiny-hidream-") as tmp, torch.random.fork_rng(devices=[]):
            folder = write_model_folder(Path(tmp) / "model", seed=DRAWING_SEED, sizes=DRAWING_SIZES,
                                        corpus=drawing_corpus())
            # The text encoders keep their seeded random weights, rounded to bfloat16 in the folder before anything
            # encodes with them (the shipped file holds them in bfloat16).
            state: dict[str, torch.Tensor] = {}
            for name, cls in _text_encoder_classes().items():
                module = cls.from_pretrained(folder / name, local_files_only=True)
                _round_(module, torch.bfloat16)
                module.save_pretrained(folder / name, safe_serialization=True)
                state.update(_component_state(name, module, torch.bfloat16))
            encoders = load_text_encoders(resolve_model_paths(folder))

            log("pretraining the VAE")
            torch.manual_seed(vae_recipe.seed)
            vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True)
            prepare_vae_init(vae, vae_recipe.initial_log_variance)
            vae_history = train_vae(vae, vae_recipe, log)
            _round_(vae, torch.float16)

            log("encoding the corpus")
            items = corpus.training_items()[::transformer_recipe.corpus_stride]
            data = encode_corpus(vae, encoders, items, transformer_recipe.resolution)

            log("pretraining the transformer")
            torch.manual_seed(transformer_recipe.seed)
            transformer = HiDreamImageTransformer2DModel.from_pretrained(folder / "transformer",
                                                                         local_files_only=True)
            prepare_transformer_init(transformer)
            evaluate = None
            if progress_dir is not None:
                progress_dir = Path(progress_dir)
                progress_dir.mkdir(parents=True, exist_ok=True)

                def evaluate_progress(model, step: int) -> None:
                    from .scoring import evaluation_groups, format_summary, score_groups

                    with torch.random.fork_rng(devices=[]):
                        progress_grid(model, vae, encoders).save(progress_dir / f"step_{step:06d}.png")
                        for name, summary in score_groups(model, vae, encoders, evaluation_groups()).items():
                            log(f"transformer step {step}: {format_summary(name, summary)}")

                evaluate = evaluate_progress
            averaged, losses = train_transformer(transformer, data, transformer_recipe, log, evaluate=evaluate,
                                                 eval_every=progress_every)
            _round_(averaged, torch.bfloat16)

            state.update(_component_state("vae", vae, torch.float16))
            state.update(_component_state("transformer", averaged, torch.bfloat16))
            fingerprint = tokenizer_fingerprint(folder)
        weights_dir = Path(weights_dir)
        weights_dir.mkdir(parents=True, exist_ok=True)
        write_weights(state, weights_dir / WEIGHTS_FILE)
        manifest = {"file": WEIGHTS_FILE, "sha256": file_sha256(weights_dir / WEIGHTS_FILE),
                    "bytes": (weights_dir / WEIGHTS_FILE).stat().st_size, "seed": DRAWING_SEED,
                    "sizes": manifest_sizes(DRAWING_SIZES), "tokenizer_fingerprint": fingerprint,
                    "vae_recipe": asdict(vae_recipe), "transformer_recipe": asdict(transformer_recipe),
                    "vae_final_pixel_mae": sum(vae_history[-100:]) / max(1, len(vae_history[-100:])),
                    "transformer_final_loss": sum(losses[-100:]) / max(1, len(losses[-100:])),
                    "torch": torch.__version__, "seconds": round(time.perf_counter() - started, 1)}
        (weights_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        return manifest
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
