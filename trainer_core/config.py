"""Typed settings: the one source of truth shared by the CLI, the ComfyUI nodes and the config readers.

Every option lives in exactly one dataclass here. Readers (JSON files, SimpleTuner-style configs, node widgets)
build these objects; the library only ever sees the typed objects.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

CaptionStrategy = Literal["filename", "textfile", "instanceprompt"]
ResolutionType = Literal["pixel_area", "pixel"]
CropStyle = Literal["center", "random"]
CropAspect = Literal["square", "preserve"]


class ConfigError(ValueError):
    """A setting is missing, malformed or inconsistent. The message names the setting and how to fix it."""


@dataclass(frozen=True)
class DatasetConfig:
    """One image folder and how to turn it into training samples (one entry of a multidatabackend list).

    `repeats` follows SimpleTuner: 0 means every image is seen once per epoch, N means N + 1 times.
    `resolution` is a side length in pixels: with `pixel_area` the bucket area is resolution², aspect kept;
    with `pixel` the short side is scaled to `resolution`.
    """

    instance_data_dir: Path
    id: str = "dataset"
    caption_strategy: CaptionStrategy = "textfile"
    instance_prompt: Optional[str] = None
    caption_fallback_to_filename: bool = False
    repeats: int = 0
    is_regularisation_data: bool = False
    resolution: int = 1024
    resolution_type: ResolutionType = "pixel_area"
    minimum_image_size: int = 0
    maximum_image_size: Optional[int] = None
    crop: bool = False
    crop_style: CropStyle = "center"
    crop_aspect: CropAspect = "square"


Precision = Literal["no_change", "bf16", "fp32", "int8-quanto", "int4-quanto", "fp8-quanto"]
MixedPrecision = Literal["no", "bf16"]
LrScheduler = Literal["constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial"]


@dataclass
class SamplingConfig:
    """How to draw images: validation during training and the `sample` command share it."""

    prompt: str = "a photo"
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    num_inference_steps: int = 30
    guidance: float = 5.0
    shift: float = 3.0
    seed: int = 42
    scheduler: Literal["unipc", "euler"] = "unipc"
    lokr_strength: float = 1.0

    def validate(self) -> None:
        for side, value in (("width", self.width), ("height", self.height)):
            if value <= 0 or value % 16:
                raise ConfigError(f"sampling {side} {value} must be a positive multiple of 16 "
                                  f"(try {max(16, round(value / 16) * 16)})")
        if self.num_inference_steps < 1:
            raise ConfigError("num_inference_steps must be at least 1")
        if self.scheduler not in ("unipc", "euler"):
            raise ConfigError(f"unknown sampling scheduler {self.scheduler!r}: use 'unipc' or 'euler'")


@dataclass
class TrainConfig:
    """Everything a training run needs. Field names follow SimpleTuner's config keys where one exists."""

    pretrained_model_name_or_path: Path
    datasets: list[DatasetConfig]
    output_dir: Path = Path("output/models-hidream")
    pretrained_llama_path: Optional[Path] = None
    cache_dir: Optional[Path] = None  # default: <output_dir>/cache
    lycoris_config: Optional[Path] = None  # None: the quickstart's attention-only preset
    max_train_steps: int = 100
    learning_rate: float = 1e-4
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    optimizer: str = "adamw"
    adam_weight_decay: float = 1e-2
    lr_scheduler: LrScheduler = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    grad_clip_method: Literal["norm", "value"] = "norm"
    seed: int = 42
    mixed_precision: MixedPrecision = "bf16"
    base_model_precision: Precision = "no_change"
    gradient_checkpointing: bool = False
    caption_dropout_probability: float = 0.0
    flow_schedule_shift: float = 3.0
    flow_schedule_auto_shift: bool = False
    flow_sigmoid_scale: float = 1.0
    flow_use_uniform_schedule: bool = False
    hidream_use_load_balancing_loss: bool = False
    hidream_load_balancing_loss_weight: float = 0.01
    init_lokr_norm: Optional[float] = None
    vae_batch_size: int = 1
    validation_prompt: Optional[str] = None
    validation_negative_prompt: str = ""
    validation_resolution: tuple[int, int] = (1024, 1024)
    validation_num_inference_steps: int = 20
    validation_guidance: float = 3.0
    validation_seed: int = 42
    validation_step_interval: int = 0  # 0: validate only at the end
    validation_noise_scheduler: Literal["unipc", "euler"] = "unipc"
    validation_lycoris_strength: float = 1.0
    disable_benchmark: bool = False  # False: a validation image at step 0 (the base model) to compare against
    device: Optional[str] = None  # None: cuda when available, else cpu
    # Speed-ups (trainer_core/speedups.py): each computes what the stock stack computes; these switch them off.
    fast_lokr: bool = True  # LoKr applied through its Kronecker structure (kron_lokr.py)
    fast_moe_dispatch: bool = True  # MoE training dispatch sorted by expert, no boolean masks (moe_dispatch.py)
    lean_int8_backward: bool = True  # frozen quanto layers keep no activations for backward (frozen_qlinear.py)
    compile_blocks: bool = False  # torch.compile each transformer block (compile time; not yet measured on GPU)

    def validate(self) -> None:
        if not self.datasets:
            raise ConfigError("no datasets configured: give at least one dataset with an instance_data_dir")
        for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "vae_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (self.learning_rate > 0) or self.learning_rate != self.learning_rate:
            raise ConfigError(f"learning_rate must be a positive number, got {self.learning_rate}")
        if not 0.0 <= self.caption_dropout_probability < 1.0:
            raise ConfigError("caption_dropout_probability must be in [0, 1)")
        if self.mixed_precision not in ("no", "bf16"):
            raise ConfigError(f"mixed_precision {self.mixed_precision!r} is not supported: use 'bf16' or 'no'")
        if self.grad_clip_method not in ("norm", "value"):
            raise ConfigError(f"grad_clip_method must be 'norm' or 'value', got {self.grad_clip_method!r}")
        self.validation_sampling().validate()

    def validation_sampling(self) -> SamplingConfig:
        width, height = self.validation_resolution
        return SamplingConfig(prompt=self.validation_prompt or "", negative_prompt=self.validation_negative_prompt,
                              width=width, height=height, num_inference_steps=self.validation_num_inference_steps,
                              guidance=self.validation_guidance, shift=self.flow_schedule_shift,
                              seed=self.validation_seed, scheduler=self.validation_noise_scheduler,
                              lokr_strength=self.validation_lycoris_strength)

    @property
    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.output_dir) / "cache"
