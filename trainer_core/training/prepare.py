"""The data phases of a run: find the images, then fill the text-embedding and latent caches.

Everything that can be wrong with the data is found before a model is loaded. The text encoders (~25 GB for the
real model) are loaded only when a caption is missing from the cache, into CPU memory, and visit the device one at a
time (hidream.StagedTextEncoders; quantised there when text_encoder_N_precision says so); they leave memory before
the transformer arrives. The VAE stays (it is small) to
decode validation images.
"""
from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..config.schema import ConfigError, SamplingConfig, TrainConfig
from ..data.cache import CacheStats, ImageEncoder, LatentCache, TextEmbeddingCache, VaeImageEncoder
from ..data.buckets import fit_to_token_limit, image_tokens, largest_square_side
from ..data.datasets import BucketBatches, ImageDataset, TrainingSample, check_enough_samples, discover_dataset
from ..hidream.forward import hidream_transformer
from ..hidream.frozen import image_token_limit, transformer_config
from ..hidream.models import (HiDreamModelPaths, component_identity, load_text_encoders, load_vae,
                              resolve_model_paths, scheduler_shift, text_encoders_identity)
from ..hidream.text_encoders import StagedTextEncoders
from ..hidream.vae import PREVIEW_DECODE_TILE, latents_to_images
from ..util.device import release_memory
from .context import RunContext
from .interface import ModelComponents
from .validation import validation_prompts

logger = logging.getLogger(__name__)


@dataclass
class TrainingData:
    """The run's samples and their caches. `load_latents(batch)` gives a batch's latents (B, 16, h, w) float32;
    `text_cache.load(captions)` its conditioning; `decode_latents(latents)` turns sampled latents into images."""

    datasets: list[ImageDataset]
    eval_samples: list[TrainingSample]
    batches: BucketBatches
    total_steps: int
    prompts: dict[str, str]  # validation nickname -> prompt
    text_cache: TextEmbeddingCache
    latent_caches: dict[str, LatentCache]  # per dataset id
    decode_latents: Callable[[torch.Tensor], list[Image.Image]]
    model_paths: Optional[HiDreamModelPaths]  # None when the front end gave every model
    latent_stats: CacheStats = field(default_factory=CacheStats)
    sampling_shift: float = SamplingConfig.shift  # the model's own (scheduler config), what validation samples with

    def load_latents(self, batch: list[TrainingSample]) -> torch.Tensor:
        return torch.stack([self.latent_caches[s.dataset_id].load([s])[0] for s in batch])


def discover(config: TrainConfig, world_size: int = 1, max_tokens: Optional[int] = None
             ) -> tuple[list[ImageDataset], list[TrainingSample], BucketBatches]:
    """Find the training and eval samples and check there are enough, before any model is loaded.

    Buckets are fitted under `max_tokens`, the transformer's image-token limit. Eval samples come from
    dataset_type eval datasets; without one (and with eval_steps_interval set), num_eval_images training images
    are held out (seeded choice) and never trained on.
    """
    config.validate()
    found = [discover_dataset(d, seed=config.seed, max_tokens=max_tokens) for d in config.datasets]
    for ds in found:
        logger.info(ds.report.format())
        if ds.config.is_regularisation_data:
            logger.info("dataset '%s' is regularisation data (SimpleTuner's prior preservation): its images are "
                        "trained towards what the base model, adapter off, predicts for them", ds.config.id)
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


def prepare_data(config: TrainConfig, ctx: RunContext, given: ModelComponents) -> TrainingData:
    """Discover the data, resolve the run's length and fill both caches (rank 0 fills, the others then read)."""
    ctx.phase("discovering data")
    needs_files = None in (given.transformer, given.text_encoder, given.image_encoder, given.decode_latents)
    try:  # the model's files and its token limit (its config), which the buckets are fitted under
        paths = resolve_model_paths(config.pretrained_model_name_or_path, config.pretrained_llama_path,
                                    require_text_encoders=given.text_encoder is None,
                                    require_transformer=config.pretrained_transformer_model_name_or_path is None
                                    ) if needs_files else None
        max_tokens = transformer_token_limit(config, given, paths)
    except ConfigError:
        discover(config, ctx.ranks.world_size)  # what is wrong with the data is still said first
        raise
    check_validation_sizes(config, max_tokens)
    datasets, eval_samples, batches = discover(config, ctx.ranks.world_size, max_tokens)
    total_steps = resolve_total_steps(config, batches.batches_per_epoch())
    prompts = validation_prompts(config.validation_prompt, config.user_prompt_library)

    ctx.phase("caching text embeddings")
    captions = [s.caption for ds in datasets for s in ds.samples] + [s.caption for s in eval_samples]
    if prompts:
        captions += [*prompts.values(), config.validation_negative_prompt]
    text_cache = fill_text_cache(config, ctx, given, paths, captions)

    ctx.phase("caching latents")
    vae = load_vae(paths, dtype=torch.float32, device=ctx.device) if needs_files else None
    image_encoder = given.image_encoder or VaeImageEncoder(vae, component_identity(paths.model_dir / "vae"))
    samples = [s for ds in datasets for s in ds.samples] + list(eval_samples)
    latent_caches, latent_stats = fill_latent_caches(config, ctx, image_encoder, samples)
    if vae is not None and config.offload_during_startup and ctx.device.type != "cpu":
        vae.to("cpu")
    return TrainingData(datasets=datasets, eval_samples=eval_samples, batches=batches, total_steps=total_steps,
                        prompts=prompts, text_cache=text_cache, latent_caches=latent_caches,
                        decode_latents=given.decode_latents or vae_decoder(vae, config, ctx.device),
                        model_paths=paths, latent_stats=latent_stats, sampling_shift=sampling_shift(config, given))


def transformer_token_limit(config: TrainConfig, given: ModelComponents,
                            paths: Optional[HiDreamModelPaths]) -> int:
    """The image-token limit of the transformer this run trains (the one given, or the config of the one it will
    load), known before any data is cached."""
    if given.transformer is not None:
        return image_token_limit(hidream_transformer(given.transformer).config)
    return image_token_limit(transformer_config(paths, config.pretrained_transformer_model_name_or_path))


def sampling_shift(config: TrainConfig, given: ModelComponents) -> float:
    """The shift validation samples with: the model's own scheduler's (given by the front end, or read from the
    model folder), else HiDream-I1-Full's."""
    shift = given.sampling_shift or scheduler_shift(config.pretrained_model_name_or_path)
    return shift or SamplingConfig.shift


def check_validation_sizes(config: TrainConfig, max_tokens: int) -> None:
    """A non-square validation size over the transformer's limit cannot be sampled (its padding has no room):
    refused before any caching. A square one runs unpadded, beyond what the model was trained at: said once."""
    if not config.validation_prompt and not config.user_prompt_library:
        return
    for width, height in config.validation_resolutions:
        tokens = image_tokens((width, height))
        if tokens <= max_tokens:
            continue
        side = largest_square_side(max_tokens)
        if width != height:
            fits = fit_to_token_limit((width, height), width / height, max_tokens)
            raise ConfigError(f"validation_resolution {width}x{height} is {tokens} image tokens; this transformer "
                              f"pads non-square pictures to at most {max_tokens} ({side}x{side} px in area): use "
                              f"a size with width x height <= {side * side} pixels, e.g. {fits[0]}x{fits[1]}")
        logger.warning("validation_resolution %dx%d is %d image tokens, more than the %d (%dx%d px) this "
                       "transformer was made for: it samples unpadded, slowly, and may not draw well", width, height,
                       tokens, max_tokens, side, side)


def _text_encoder_precisions(config: TrainConfig) -> list[str]:
    return [getattr(config, f"text_encoder_{i}_precision") for i in range(1, 5)]


def fill_text_cache(config: TrainConfig, ctx: RunContext, given: ModelComponents,
                    paths: Optional[HiDreamModelPaths], captions: list[str]) -> TextEmbeddingCache:
    """The text cache with every caption (and the empty one) in it. The precisions are part of the cache key:
    quantised encoders give other embeddings."""
    precisions = _text_encoder_precisions(config)
    identity = given.text_encoder.identity if given.text_encoder else text_encoders_identity(paths, ctx.dtype)
    if given.text_encoder is None and any(p != "no_change" for p in precisions):
        identity += "/" + ",".join(precisions)
    text_cache = TextEmbeddingCache(config.resolved_text_cache_dir, identity)
    with ctx.ranks.main_first():  # rank 0 encodes; the others wait, then find every entry cached
        if text_cache.missing(captions):
            encoders = given.text_encoder or staged_text_encoders(paths, ctx, config)
            with tqdm(desc="text embeddings", unit="caption", disable=None) as bar:
                text_cache.fill(captions, encoders, batch_size=config.text_cache_write_batch_size,
                                progress=_progress_to(bar))
            if given.text_encoder is None:
                encoders.free()
            del encoders
            release_memory()
        else:
            text_cache.fill(captions, encoder=None)  # counts the hits; nothing to encode
    logger.info("text cache%s: %s", ctx.ranks.label, text_cache.stats)
    return text_cache


def staged_text_encoders(paths: HiDreamModelPaths, ctx: RunContext, config: TrainConfig,
                         load=load_text_encoders) -> StagedTextEncoders:
    """The four text encoders read into CPU memory, each brought to the device (quantised there, block by block,
    when text_encoder_N_precision says so) only while it encodes; with offload_blocks, a layer at a time. `load`
    stands in for load_text_encoders (a memory plan reads no weights)."""
    encoders = load(paths, dtype=ctx.dtype, device="cpu")
    return StagedTextEncoders(encoders, ctx.device, _text_encoder_precisions(config),
                              stream_blocks=config.offload_blocks)


def fill_latent_caches(config: TrainConfig, ctx: RunContext, image_encoder: ImageEncoder,
                       samples: list[TrainingSample]) -> tuple[dict[str, LatentCache], CacheStats]:
    """One latent cache per dataset, in its cache_dir_vae (default <cache_dir>/latents), each filled."""
    caches = {d.id: LatentCache(d.cache_dir_vae or config.resolved_cache_dir / "latents", image_encoder.identity)
              for d in config.datasets}
    with ctx.ranks.main_first():
        with tqdm(desc="latents", unit="image", disable=None) as bar:
            for dataset_id, cache in caches.items():
                cache.fill([s for s in samples if s.dataset_id == dataset_id], image_encoder, config.vae_batch_size,
                           progress=_progress_to(bar))
    total = CacheStats()
    for cache in caches.values():
        for name in (f.name for f in dataclasses.fields(CacheStats)):
            setattr(total, name, getattr(total, name) + getattr(cache.stats, name))
    logger.info("latent cache%s: %s", ctx.ranks.label, total)
    return caches, total


def vae_decoder(vae, config: TrainConfig, device: torch.device) -> Callable[[torch.Tensor], list[Image.Image]]:
    """Decode with the run's VAE; with offload_during_startup it visits the device only while it decodes."""

    def decode(latents: torch.Tensor) -> list[Image.Image]:
        if config.offload_during_startup:
            vae.to(device)
        images = latents_to_images(vae, latents, tile=PREVIEW_DECODE_TILE)
        if config.offload_during_startup and device.type != "cpu":
            vae.to("cpu")
        return images

    return decode
