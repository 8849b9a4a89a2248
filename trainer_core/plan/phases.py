"""The phases of a training run, dry-run at full size: each calls the project's own code, on HiDream-I1's real
shapes, inside one DryRun (dry_run.py), so what one phase leaves behind (the VAE on the device, the optimizer's
state) is there in the next, as in a run.

    text embeddings      the four text encoders, read into CPU memory and brought to the device one at a time
                         (training.prepare.staged_text_encoders), encoding one batch of text_cache_write_batch_size
                         captions; only when captions are not cached yet
    latents              the VAE read and moved to the device (as load_vae), encoding vae_batch_size images of the
                         largest bucket (data.VaeImageEncoder)
    loading the transformer   hidream.load_frozen_transformer with the base precision (a folder or a ComfyUI file)
    model set-up         training.build_training_model: the adapter, the speed-ups, block streaming
    training step        training.new_train_state + new_train_step, a step at the largest bucket and the batch size
                         (forward, backward, clipping, optimizer, EMA) with the optimizer's state already there
    validation           the adapter applied as Validation applies it, hidream.denoise with CFG at the largest
                         validation resolution (2 sampling steps: memory does not grow with their number), the VAE
                         decoding the result
    checkpoint           TrainState.write into a temporary folder (the adapter files, the optimizer's state)

What cannot be dry-run is stood in for, and said where: the models are built from their configs instead of read
(models.py); the latents and text embeddings of a batch are tensors of their cached shapes and dtypes.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, Optional

import torch

from ..config.schema import ConfigError, TrainConfig
from ..data.cache import VaeImageEncoder
from ..data.buckets import bucket_for_size, check_resolution_fits
from ..data.datasets import discover_dataset
from ..hidream.embeds import PromptEmbeds
from ..hidream.frozen import image_token_limit, is_transformer_file, load_frozen_transformer
from ..hidream.models import HiDreamModelPaths, resolve_model_paths
from ..hidream.sample import denoise
from ..hidream.single_file import FP8_DTYPES, HIDREAM_I1_CONFIG, load_transformer_file, stored_weight_dtype
from ..hidream.text_encoders import HiDreamTextEncoders
from ..training import checkpoint as ckpt
from ..training.context import RunContext
from ..training.distributed import DistributedContext
from ..training.interface import ModelComponents
from ..training.model import adapter_settings, build_training_model
from ..training.prepare import staged_text_encoders, vae_decoder
from ..training.run import new_train_state, new_train_step
from ..training.step import MicroBatch
from ..util.quiet import quiet_libraries
from .dry_run import GPU, HOST, DryRun
from .models import (StandInSafetensors, as_read_into_host, folder_config, text_encoders_on_meta, tokenizer_folder,
                     transformer_on_meta, vae_on_meta)

logger = logging.getLogger(__name__)

PHASES = ("text embeddings", "latents", "loading the transformer", "model set-up", "training step", "validation",
          "checkpoint")
STEP = "training step"
# A run whose models a front end already holds (the Train node: ComfyUI's loaders and cache nodes did the rest).
NODE_PHASES = ("loading the transformer", "model set-up", STEP, "validation", "checkpoint")
# Common photo aspects (width:height) a multi-aspect dataset's largest bucket is looked for among, when its images
# cannot be read (the plan of a config whose dataset is elsewhere).
ASPECTS = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16))


@dataclass(frozen=True)
class Geometry:
    """The largest batch the step sees: `batch` latents of the bucket (width, height) in pixels."""

    width: int
    height: int
    batch: int
    source: str  # where the bucket comes from (the dataset, or its settings)

    def tokens(self, max_seq: int = 4096) -> int:
        """Image tokens the transformer runs on: a square bucket's own, a non-square one padded to max_seq."""
        own = (self.width // 16) * (self.height // 16)
        return own if self.width == self.height else max(own, max_seq)


def largest_bucket(config: TrainConfig, max_tokens: int) -> Geometry:
    """The bucket of the training datasets whose step needs the most memory (the most image tokens as the
    transformer sees them, then the most pixels), from the images themselves when they can be read, else from
    the datasets' settings over common aspects (the same bucket code either way, fitted under the transformer's
    `max_tokens` as training fits them)."""
    candidates, sources = [], []
    for dataset in config.datasets:
        if dataset.dataset_type != "image":
            continue
        try:
            found = discover_dataset(dataset, seed=config.seed, max_tokens=max_tokens)
            buckets = {s.bucket for s in found.samples}
            sources.append(f"dataset {dataset.id}: {len(found.samples)} images in {len(buckets)} buckets")
        except ConfigError:
            check_resolution_fits(dataset.resolution, max_tokens, f"dataset {dataset.id}")  # as training refuses it
            aspects = ASPECTS[:1] if dataset.crop and dataset.crop_aspect == "square" else ASPECTS
            buckets = {bucket_for_size(1000 * w, 1000 * h, dataset.resolution, dataset.resolution_type, dataset.crop,
                                       dataset.crop_aspect, max_tokens=max_tokens)[0] for w, h in aspects}
            sources.append(f"dataset {dataset.id}: its images unreadable here, the buckets its settings give "
                           f"{'1:1' if len(aspects) == 1 else 'common photo aspects'} at {dataset.resolution} px")
        candidates += buckets
    if not candidates:
        raise ConfigError("no training dataset to plan for: give at least one dataset of dataset_type image")
    width, height = max(candidates, key=lambda b: (Geometry(*b, 1, "").tokens(), b[0] * b[1]))
    return Geometry(width, height, config.train_batch_size, "; ".join(sources))


def precision_of(transformer: torch.nn.Module) -> str:
    """The base_model_precision a loaded transformer was loaded with, read from its layers."""
    from ..quant import ScaledFp8Linear, ScaledInt8Linear

    for module in transformer.modules():
        if isinstance(module, ScaledFp8Linear):
            return "fp8-scaled"
        if isinstance(module, ScaledInt8Linear):
            return "int8-scaled"
        qtype = getattr(getattr(module, "weight", None), "qtype", None)
        if qtype is not None:
            return {"qint8": "int8-quanto", "qint4": "int4-quanto", "qint2": "int2-quanto",
                    "qfloat8": "fp8-quanto"}.get(getattr(qtype, "name", ""), "int8-quanto")
    return "no_change"


class ModelSource:
    """Where the plan takes the models' sizes and tokenizers from: the config's model folder when it is there,
    the published HiDream-I1 configs (models.py) when not."""

    def __init__(self, config: TrainConfig):
        self.paths: Optional[HiDreamModelPaths] = None
        try:
            self.paths = resolve_model_paths(config.pretrained_model_name_or_path, config.pretrained_llama_path,
                                             require_transformer=False)
        except ConfigError as why:
            logger.debug("plan: %s; using HiDream-I1's published sizes", str(why).split(":")[0])
        folder = self.paths.model_dir if self.paths else None
        file = config.pretrained_transformer_model_name_or_path
        self.transformer_file = file if file is not None and is_transformer_file(file) else None
        self.transformer_config = folder_config(file if file is not None and not self.transformer_file else
                                                folder / "transformer" if folder else None)
        self.encoder_configs = {name: folder_config(folder / name if folder else None)
                                for name in ("text_encoder", "text_encoder_2", "text_encoder_3")}
        self.encoder_configs["text_encoder_4"] = folder_config(self.paths.llama_model_dir if self.paths else None)
        self.vae_config = folder_config(folder / "vae" if folder else None)

    def tokenizers(self) -> tuple[Path, Path]:
        """(folder with tokenizer, tokenizer_2, tokenizer_3; the Llama tokenizer's folder)."""
        if self.paths is not None:
            return self.paths.model_dir, self.paths.llama_tokenizer_dir
        folder = tokenizer_folder()
        return folder, folder / "tokenizer_4"


class TrainingPlanRun:
    """One dry run of a configuration's phases (module docstring). `run()` returns the DryRun with a PhaseMemory
    per phase that ran; `transformer` is the base as the run leaves it (for the plan's report)."""

    def __init__(self, config: TrainConfig, capability: tuple[int, int] = (9, 0), steps: int = 1,
                 phases: tuple[str, ...] = PHASES, sampling_steps: int = 2,
                 transformer: Optional[torch.nn.Module] = None):
        """`transformer`: a base the caller already holds (a ComfyUI loader's): the plan takes its size, precision
        and dtype (loading it again is planned the way those loaders load, load_frozen_transformer)."""
        config.validate()
        self.dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32
        self.source = ModelSource(config)
        if transformer is not None:
            from ..hidream.forward import compute_dtype

            self.source.transformer_config = {k: v for k, v in dict(transformer.config).items()
                                              if not k.startswith("_")}
            self.source.transformer_file = None
            config = replace(config, base_model_precision=precision_of(transformer))
            self.dtype = compute_dtype(transformer)
        self.config, self.capability, self.steps, self.sampling_steps = config, capability, steps, sampling_steps
        self.phases = phases
        self.device = torch.device("meta")
        # A ComfyUI file has no config of its own to read here: its layout is HiDream-I1's (single_file.py).
        self.geometry = largest_bucket(config, image_token_limit(self.source.transformer_config or
                                                                 HIDREAM_I1_CONFIG))
        self.notes: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.dry: Optional[DryRun] = None

    def run(self) -> DryRun:
        """Every phase asked for (and those they need), in a run's order; stops at the first that fails."""
        with self.session() as dry:
            for name, _ in self.phase_functions():
                if name in _with_requirements(self.phases) and not self.run_phase(name):
                    break  # what comes after needs what this phase did not make
            return dry

    @contextlib.contextmanager
    def session(self) -> Iterator[DryRun]:
        """The dry run the phases share (run_phase inside it); everything it made is freed when it ends."""
        with DryRun(self.capability) as dry, tempfile.TemporaryDirectory(prefix="hidream-plan-") as tmp, \
                contextlib.ExitStack() as cleanup, torch.random.fork_rng(devices=[]), quiet_libraries(), \
                _quiet_project(), torch.inference_mode(False), torch.enable_grad():  # (ComfyUI runs nodes in
            # inference mode, where nothing records gradients)
            self.dry, self.cleanup = dry, cleanup
            self.ctx = RunContext(output_dir=Path(tmp), ranks=DistributedContext(), device=self.device,
                                  dtype=self.dtype, sharded=False, phase=lambda name: None)
            torch.backends.opt_einsum.enabled, einsum = False, torch.backends.opt_einsum.enabled  # 2 operands only
            cleanup.callback(setattr, torch.backends.opt_einsum, "enabled", einsum)
            yield dry

    def run_phase(self, name: str, label: Optional[str] = None) -> bool:
        """Run phase `name` (recorded as `label`, default its name) inside `session()`; False when the code failed
        at full size (the error is in `errors`)."""
        label = label or name
        phase = dict(self.phase_functions())[name]
        with self.dry.phase(label):
            try:
                phase(self.cleanup)
            except ConfigError:
                raise  # the settings are wrong: said as they are, before any plan
            except Exception as exc:  # noqa: BLE001 - the code fails at full size: the plan's finding
                logger.debug("plan: %s failed at full size", name, exc_info=True)
                self.errors[label] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        if label != name and name in self.notes:
            self.notes[label] = self.notes[name]
        return label not in self.errors

    def max_image_tokens(self) -> int:
        """The most image tokens the transformer takes (max_resolution / patch size, squared)."""
        config = self.source.transformer_config or {}
        height, width = config.get("max_resolution", (128, 128))
        patch = config.get("patch_size", 2)
        return (height // patch) * (width // patch)

    def phase_functions(self) -> list:
        """(name, function) of every phase, in the order a run goes through them."""
        return [("text embeddings", self.text_embeddings), ("latents", self.latents),
                ("loading the transformer", self.load_transformer), ("model set-up", self.model),
                (STEP, self.training_step), ("validation", self.validation), ("checkpoint", self.checkpoint)]

    # ------------------------------------------------------------------------------------------ the phases

    def text_embeddings(self, cleanup) -> None:
        config = self.config
        encoders = staged_text_encoders(self.source.paths, self.ctx, config, load=self._read_text_encoders)
        batch = config.text_cache_write_batch_size
        if encoders.stream_blocks:  # streamed encoders cut their batches (StagedTextEncoders.stream_batch)
            batch = min(batch, encoders.stream_batch)
        for _ in encoders.encode_many(["a caption"] * batch, batch):
            pass
        encoders.free()
        self.notes["text embeddings"] = (f"one batch of {batch} captions, each encoder in turn"
                                         f"{', a block at a time' if encoders.stream_blocks else ''}; only when "
                                         "captions are not cached yet")

    def _read_text_encoders(self, paths, dtype, device) -> HiDreamTextEncoders:
        from transformers import CLIPTokenizer, PreTrainedTokenizerFast, T5Tokenizer

        folder, llama = self.source.tokenizers()
        modules = [as_read_into_host(m, dtype) for m in text_encoders_on_meta(self.source.encoder_configs)]
        for module, name in zip(modules, ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")):
            self.dry.name_modules(module, name)  # the report's "made in" (quantised layers: their block's name)
            self._label_weights_when_run(module, f"{name} weights")
        return HiDreamTextEncoders(
            tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"), text_encoder=modules[0],
            tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"), text_encoder_2=modules[1],
            tokenizer_3=T5Tokenizer.from_pretrained(folder / "tokenizer_3"), text_encoder_3=modules[2],
            tokenizer_4=PreTrainedTokenizerFast.from_pretrained(llama), text_encoder_4=modules[3],
            identity="plan")

    def _label_weights_when_run(self, encoder: torch.nn.Module, label: str) -> None:
        """Label `encoder`'s weights as its own once it (or a block of it) has run: they were moved or quantised
        onto the device outside any forward, where the dry run cannot tell whose they are."""
        from ..quant import blocks_of

        def name(module, args, output) -> None:  # before StagedTextEncoders' own hooks send a block back
            self.dry.label(module, label)

        for module in [encoder] + [block for _, block in blocks_of(encoder)]:
            module.register_forward_hook(name)

    def latents(self, cleanup) -> None:
        config, geometry = self.config, self.geometry
        self.vae = as_read_into_host(vae_on_meta(self.source.vae_config), torch.float32)
        self.dry.name_modules(self.vae, "vae")
        self.vae.to(self.device)  # load_vae: read, then moved to the device
        self.dry.label(self.vae, "VAE weights")
        batch = config.vae_batch_size
        pixels = torch.zeros(batch, 3, geometry.height, geometry.width)
        VaeImageEncoder(self.vae, "plan").encode(pixels, [torch.Generator().manual_seed(i) for i in range(batch)])
        if config.offload_during_startup:
            self.vae.to("cpu")
        self.notes["latents"] = f"{batch} image(s) of {geometry.width}x{geometry.height} (vae_batch_size)"

    def load_transformer(self, cleanup) -> None:
        config = self.config
        self.transformer = load_frozen_transformer(
            self.source.paths, config.base_model_precision, self.dtype, self.device,
            transformer_file=config.pretrained_transformer_model_name_or_path, stream_blocks=config.offload_blocks,
            read=self._read_transformer)
        self.dry.name_modules(self.transformer, "transformer")

    def _read_transformer(self, paths, dtype, home, file_precision: str, transformer_file=None):
        """The transformer as read_transformer leaves it, from stand-ins: a ComfyUI-style file through
        load_transformer_file itself (its layout: the real file's stored dtype when it is there, else fp8 when its
        name says so), a folder as from_pretrained then `.to(home)` leave it."""
        if self.source.transformer_file is not None:
            path = Path(self.source.transformer_file)
            fp8 = stored_weight_dtype(path) in FP8_DTYPES if path.is_file() else "fp8" in path.name.lower()
            opener = StandInSafetensors(fp8=fp8, dtype=dtype, config=self.source.transformer_config)
            return load_transformer_file(path, dtype=dtype, device=home, precision=file_precision, opener=opener)
        model = as_read_into_host(transformer_on_meta(self.source.transformer_config, dtype))
        return model.to(home)

    def model(self, cleanup) -> None:
        config = self.config
        if config.offload_blocks and _device_of(self.transformer).type == "cpu":  # the loader left it in host
            self.dry.rehome(self.transformer, self.device, HOST)  # memory: on meta here (util.device.host_device)
        given = ModelComponents(transformer=self.transformer, transformer_name="plan")
        self.trained = build_training_model(config, self.ctx, given, self.source.paths, adapter_settings(config),
                                            cleanup)
        if config.offload_blocks:  # BlockStreamer moved what is outside the blocks to the device
            from ..hidream.forward import transformer_blocks

            streamed = {id(t) for block in transformer_blocks(self.transformer) for t in
                        [*block.parameters(), *block.buffers()]}
            self.dry.retag([t for t in [*self.transformer.parameters(), *self.transformer.buffers()]
                            if id(t) not in streamed], GPU)
        self.dry.label(self.transformer, "frozen weights")
        self.dry.label(self.trained.adapter.module, "adapter")

    def training_step(self, cleanup) -> None:
        """The step as from the second on: the optimizer's state made first (one update on zero gradients: the
        state a first step leaves), then `steps` whole steps (their micro-batches: at most 2, the second already
        accumulating into the first's gradients, as every later one does)."""
        config, geometry = self.config, self.geometry
        data = SimpleNamespace(batches=_NoBatches(), total_steps=max(config.max_train_steps, 1))
        self.state = new_train_state(config, self.trained, data)
        step_fn = new_train_step(config, self.ctx, self.trained, self.state)
        with torch.no_grad():
            for p in self.trained.adapter.parameters():
                p.grad = torch.zeros_like(p)
            self.state.optimizer.step()
            self.state.optimizer.zero_grad(set_to_none=True)
        micro = [self._micro_batch for _ in range(min(config.gradient_accumulation_steps, 2))]
        for step in range(1, self.steps + 1):
            step_fn.launch(micro, step).result()
        self.notes[STEP] = (f"a step of batch {geometry.batch} at {geometry.width}x{geometry.height} "
                            f"({geometry.tokens(self.max_image_tokens())} image tokens), the optimizer's state "
                            f"made; {geometry.source}")

    def _micro_batch(self) -> MicroBatch:
        """A micro-batch as the loop loads one: latents from the cache (float32, moved to the device) and their
        captions' text embeddings (in the encoders' dtype, in CPU memory; the transformer call moves them)."""
        g, b, model = self.geometry, self.geometry.batch, self.transformer.config
        (t5_width, llama_width), dtype = model.caption_channels, self.dtype
        latents = torch.zeros(b, model.in_channels, g.height // 8, g.width // 8).to(self.device)
        embeds = PromptEmbeds(t5=torch.zeros(b, 128, t5_width, dtype=dtype),
                              llama=torch.zeros(_llama_depth(self.source), b, 128, llama_width, dtype=dtype),
                              pooled=torch.zeros(b, model.text_emb_dim, dtype=dtype))
        return MicroBatch(latents, embeds)

    def validation(self, cleanup) -> None:
        config = self.config
        if not config.validation_prompt:
            self.notes["validation"] = "no validation_prompt: nothing is sampled"
            return
        width, height = max(config.validation_resolutions, key=lambda r: r[0] * r[1])
        settings = replace(config.validation_sampling(), width=width, height=height,
                           num_inference_steps=self.sampling_steps)
        cond, uncond = self._micro_batch().embeds.select(0), self._micro_batch().embeds.select(0)
        with torch.random.fork_rng(devices=[]), self.trained.adapter.applied(settings.lokr_strength):
            latents = denoise(self.trained.transformer, cond, uncond, settings)
        vae_decoder(self.vae, config, self.device)(latents)
        self.notes["validation"] = (f"{width}x{height}, CFG {settings.guidance:g} (batch 2), the adapter "
                                    f"{'merged' if self.trained.adapter.mergeable else 'unmerged'}")

    def checkpoint(self, cleanup) -> None:
        ckpt.save_checkpoint(self.ctx.output_dir, self.state.step, self.state.write)


# What each phase works on was made by these.
_REQUIRES = {"model set-up": ("loading the transformer",), STEP: ("model set-up",), "sampling step": ("model set-up",),
             "validation": ("latents", "model set-up"), "checkpoint": (STEP,)}


def _with_requirements(phases) -> set[str]:
    needed, todo = set(), list(phases)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += _REQUIRES.get(name, ())
    return needed


@contextlib.contextmanager
def _quiet_project():
    """The code the plan runs says what it would say in a run (which LoKr, which dispatch...), once per phase and
    per candidate: only its errors are shown while planning; the plan itself reports."""
    root = logging.getLogger(__name__.rsplit(".plan.", 1)[0])
    previous = root.level
    root.setLevel(logging.ERROR)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.setLevel(previous)
        logger.setLevel(logging.NOTSET)


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(t for t in [*module.parameters(), *module.buffers()]).device


def _llama_depth(source: ModelSource) -> int:
    config = source.encoder_configs.get("text_encoder_4") or {}
    return int(config.get("num_hidden_layers", 32))


class _NoBatches:
    """The data order a checkpoint records (a plan draws no batches from it)."""

    def state_dict(self) -> dict:
        return {"epoch": 0, "position": 0}
