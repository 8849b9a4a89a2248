"""Typed settings: the one source of truth shared by the CLI, the ComfyUI nodes and the config readers.

Every option lives in exactly one dataclass here. Readers (JSON files, SimpleTuner-style configs, node widgets)
build these objects; the library only ever sees the typed objects.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Optional, Union

CaptionStrategy = Literal["filename", "textfile", "instanceprompt"]
ResolutionType = Literal["pixel_area", "pixel"]
CropStyle = Literal["center", "random"]
CropAspect = Literal["square", "preserve"]
DatasetType = Literal["image", "eval"]
# HiDream's VAE downsamples by 8 and its transformer patchifies 2x2 latents: one image token is 16x16 pixels, so
# every training bucket and every sampled size is a multiple of 16.
BUCKET_STEP = 16


class ConfigError(ValueError):
    """A setting is missing, malformed or inconsistent. The message names the setting and how to fix it."""


@dataclass(frozen=True)
class DatasetConfig:
    """One image folder and how to turn it into training samples (one entry of a multidatabackend list).

    Keys and meanings are SimpleTuner's (data/buckets.py says how each shapes the buckets). `repeats`: 0 means
    every image is seen once per epoch, N means N + 1 times. `resolution` is a side length in pixels (a multiple of
    16): with `pixel_area` the bucket area is about resolution², aspect kept; with `pixel` the short side is
    `resolution`. `is_regularisation_data`: SimpleTuner's prior preservation for adapters, these images are
    trained towards what the base model (adapter off) predicts for them, not towards the image itself.
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
    minimum_image_size: int = 0  # pixel: both sides; pixel_area: the area (and both sides of square crops) ^2
    maximum_image_size: Optional[int] = None  # with crop: larger images are first resized to target_downsample_size
    crop: bool = False
    crop_style: CropStyle = "center"
    crop_aspect: CropAspect = "square"
    target_downsample_size: Optional[int] = None
    aspect_bucket_rounding: int = 2  # decimals of the aspect ratio buckets are made from (SimpleTuner's key)
    dataset_type: DatasetType = "image"  # "eval": held out, scored for eval loss, never trained on
    cache_dir_vae: Optional[Path] = None  # this dataset's latent cache (default: the run's cache dir)

    def validate(self) -> None:
        """Settings no image can make work, refused before any file is read; each error names the fix."""
        where = f"dataset '{self.id}'"
        choices = {"caption_strategy": CaptionStrategy, "resolution_type": ResolutionType, "crop_style": CropStyle,
                   "crop_aspect": CropAspect, "dataset_type": DatasetType}
        for name, kind in choices.items():
            if getattr(self, name) not in typing.get_args(kind):
                extra = (" (SimpleTuner's 'area', in megapixels, is read from config files as pixel_area)"
                         if name == "resolution_type" else "")
                raise ConfigError(f"{where}: {name} must be one of {', '.join(typing.get_args(kind))}, got "
                                  f"{getattr(self, name)!r}{extra}")
        if self.caption_strategy == "instanceprompt" and not (self.instance_prompt or "").strip():
            raise ConfigError(f"{where}: caption_strategy 'instanceprompt' needs a non-empty instance_prompt")
        if self.resolution < BUCKET_STEP or self.resolution % BUCKET_STEP:
            nearest = max(BUCKET_STEP, round(self.resolution / BUCKET_STEP) * BUCKET_STEP)
            raise ConfigError(f"{where}: resolution {self.resolution} must be a multiple of {BUCKET_STEP} pixels "
                              f"(one image token), at least {BUCKET_STEP}: try {nearest}")
        for name in ("repeats", "minimum_image_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}: {name} must be 0 or more, got {getattr(self, name)}")
        for name in ("maximum_image_size", "target_downsample_size"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{where}: {name} must be a positive number of pixels (or unset), got "
                                  f"{getattr(self, name)}")
        if self.maximum_image_size and not self.target_downsample_size:
            raise ConfigError(f"{where}: maximum_image_size needs target_downsample_size, the size images over it "
                              "are resized to before the crop (as SimpleTuner requires); set both, or neither")
        if not 1 <= self.aspect_bucket_rounding <= 9:
            raise ConfigError(f"{where}: aspect_bucket_rounding must be 1 to 9 decimals, got "
                              f"{self.aspect_bucket_rounding}")


# *-quanto: optimum-quanto weights (dequantised for every matmul); *-scaled: 8-bit weights feeding 8-bit matmuls
# (trainer_core/quant/scaled.py; fp8-scaled needs an sm89+ GPU, RTX 40xx / H100, or a CPU).
Precision = Literal["no_change", "bf16", "fp32", "int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto",
                    "fp8-scaled", "int8-scaled"]
MixedPrecision = Literal["no", "bf16"]
LrScheduler = Literal["constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial"]
LoraType = Literal["lycoris", "standard"]
ModelFlavour = Literal["full", "dev", "fast"]
ReportTo = Literal["none", "tensorboard"]
PRECISIONS = typing.get_args(Precision)
SCALED_PRECISIONS = ("fp8-scaled", "int8-scaled")  # 8-bit weights and matmuls; offload_blocks streams them
LR_SCHEDULERS = typing.get_args(LrScheduler)  # diffusers' schedule names, as SimpleTuner passes them on
# Optimizer names as SimpleTuner spells them; trainer_core/training/optimizers.py builds each.
OPTIMIZERS = ("adamw", "adamw_bf16", "torch-adamw", "optimi-adamw", "optimi-lion", "prodigy", "bnb-adamw8bit",
              "bnb-adamw-paged", "bnb-adamw8bit-paged", "bnb-lion8bit", "bnb-lion8bit-paged")


@dataclass
class SamplingConfig:
    """How to draw images: validation during training and the `sample` command share it."""

    prompt: str = "a photo"
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    num_inference_steps: int = 30
    guidance: float = 5.0
    guidance_rescale: float = 0.0  # 0..1: rescale the CFG velocity towards the conditional one's std
    shift: float = 3.0  # HiDream-I1-Full's scheduler flow_shift (its scheduler_config.json)
    seed: int = 42
    scheduler: Literal["unipc", "euler"] = "unipc"
    lokr_strength: float = 1.0
    cuda_graphs: bool = False  # replay the transformer call from a CUDA graph (CUDA only; TrainConfig.cuda_graphs)

    def validate(self) -> None:
        for side, value in (("width", self.width), ("height", self.height)):
            if value <= 0 or value % BUCKET_STEP:
                raise ConfigError(f"sampling {side} {value} must be a positive multiple of {BUCKET_STEP} "
                                  f"(try {max(BUCKET_STEP, round(value / BUCKET_STEP) * BUCKET_STEP)})")
        if self.num_inference_steps < 1:
            raise ConfigError("num_inference_steps must be at least 1")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ConfigError(f"guidance_rescale must be between 0 and 1, got {self.guidance_rescale}")
        if self.scheduler not in ("unipc", "euler"):
            raise ConfigError(f"unknown sampling scheduler {self.scheduler!r}: use 'unipc' or 'euler'")


Resolution = tuple[int, int]


@dataclass(frozen=True)
class NoiseSchedule:
    """How training draws noise levels (the `flow_*` settings): sigma = sigmoid(sigmoid_scale * n), n ~ N(0, 1)
    (or uniform), then shifted by `shift` (or by the image size, `auto_shift`)."""

    shift: float = 3.0
    auto_shift: bool = False
    sigmoid_scale: float = 1.0
    uniform: bool = False


# SimpleTuner's gradient clipping defaults: every gradient element clipped to +-2.0 ("value"; "norm" rescales the
# whole gradient to that norm instead).
DEFAULT_MAX_GRAD_NORM = 2.0
DEFAULT_GRAD_CLIP_METHOD = "value"
GradClipMethod = Literal["norm", "value"]


@dataclass(frozen=True)
class StepSettings:
    """What one optimizer step does besides the forward and backward."""

    gradient_accumulation_steps: int = 1
    caption_dropout_probability: float = 0.0
    max_grad_norm: float = DEFAULT_MAX_GRAD_NORM
    grad_clip_method: GradClipMethod = DEFAULT_GRAD_CLIP_METHOD
    use_load_balancing_loss: bool = False
    max_consecutive_nonfinite_steps: int = 5
    recover_from_out_of_memory: bool = True


@dataclass
class TrainConfig:
    """Everything a training run needs. Field names follow SimpleTuner's config keys where one exists."""

    pretrained_model_name_or_path: Path
    datasets: list[DatasetConfig]
    output_dir: Path = Path("output/models-hidream")
    # The transformer from elsewhere (SimpleTuner's key): one .safetensors file, e.g. ComfyUI's
    # hidream_i1_full_fp8.safetensors (read straight into 8-bit layers with base_model_precision fp8-scaled), or a
    # diffusers transformer folder. The VAE, text encoders and scheduler still come from pretrained_model_name_or_path.
    pretrained_transformer_model_name_or_path: Optional[Path] = None
    pretrained_llama_path: Optional[Path] = None
    cache_dir: Optional[Path] = None  # default: <output_dir>/cache
    text_cache_dir: Optional[Path] = None  # default: <cache_dir>/text (a text_embeds backend's cache_dir)
    text_cache_write_batch_size: int = 8  # captions per text-encoder call (a text_embeds backend's write_batch_size)
    model_family: str = "hidream"
    model_flavour: ModelFlavour = "full"
    model_type: Literal["lora"] = "lora"
    # Adapter: a LyCORIS LoKr (lora_type lycoris) or a PEFT LoRA (lora_type standard, lora_rank / lora_alpha).
    lora_type: LoraType = "lycoris"
    lycoris_config: Optional[Path] = None  # None: the quickstart's attention-only preset
    lora_rank: int = 16
    lora_alpha: Optional[float] = None  # None: = lora_rank (scale 1)
    init_lokr_norm: Optional[float] = None
    init_lokr_weights: Optional[Path] = None  # start from this LoKr file instead of LyCORIS' initialisation
    # Length: max_train_steps wins when > 0; otherwise num_train_epochs x optimizer steps per epoch. (SimpleTuner
    # without either trains one epoch; here, as on the Train node, 1000 steps.)
    max_train_steps: int = 1000
    num_train_epochs: int = 0
    learning_rate: float = 1e-4
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    optimizer: str = "adamw"
    adam_weight_decay: float = 1e-2
    lr_scheduler: LrScheduler = "constant_with_warmup"  # "constant" with lr_warmup_steps > 0 warms up too
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1  # cosine_with_restarts
    lr_power: float = 0.8  # polynomial
    max_grad_norm: float = DEFAULT_MAX_GRAD_NORM  # 0: no clipping
    grad_clip_method: GradClipMethod = DEFAULT_GRAD_CLIP_METHOD
    seed: int = 42
    mixed_precision: MixedPrecision = "bf16"
    base_model_precision: Precision = "no_change"
    text_encoder_1_precision: Precision = "no_change"
    text_encoder_2_precision: Precision = "no_change"
    text_encoder_3_precision: Precision = "no_change"
    text_encoder_4_precision: Precision = "no_change"
    offload_during_startup: bool = False  # keep the VAE on the CPU except while it encodes or decodes
    gradient_checkpointing: bool = False
    caption_dropout_probability: float = 0.0
    flow_schedule_shift: float = 3.0
    flow_schedule_auto_shift: bool = False
    flow_sigmoid_scale: float = 1.0
    flow_use_uniform_schedule: bool = False
    hidream_use_load_balancing_loss: bool = False
    hidream_load_balancing_loss_weight: float = 0.01
    vae_batch_size: int = 1
    use_ema: bool = False
    ema_decay: float = 0.995
    validation_prompt: Optional[str] = None
    validation_negative_prompt: str = ""
    # One (width, height), several, or SimpleTuner's "1024x1024,1280x768" string; see `validation_resolutions`.
    validation_resolution: Union[Resolution, list[Resolution], str] = (1024, 1024)
    validation_num_inference_steps: int = 20
    validation_guidance: float = 3.0
    validation_guidance_rescale: float = 0.0
    validation_seed: int = 42
    validation_step_interval: int = 100  # 0: validate only at the end
    validation_noise_scheduler: Literal["unipc", "euler"] = "unipc"
    validation_lycoris_strength: float = 1.0
    validation_torch_compile: bool = False  # compiles the transformer for validation on CUDA only
    user_prompt_library: Optional[Path] = None  # JSON {nickname: prompt}; every prompt is validated too
    disable_benchmark: bool = False  # False: a validation image at step 0 (the base model) to compare against
    num_eval_images: int = 4  # held-out training images scored for eval loss when no dataset_type eval exists
    eval_steps_interval: int = 0  # 0: no eval loss
    eval_timesteps: int = 4  # fixed sigmas, evenly spaced in (0, 1), at which each eval image is scored
    checkpoint_step_interval: int = 500  # 0: no checkpoints
    checkpoints_total_limit: Optional[int] = 5  # None: keep every checkpoint
    resume_from_checkpoint: Optional[str] = None  # "latest", a checkpoint-<step> name, or a path
    report_to: ReportTo = "none"  # a JSONL scalar log is always written; "tensorboard" adds event files
    tracker_run_name: str = "hidream-lokr"
    device: Optional[str] = None  # None: cuda when available, else cpu
    max_consecutive_nonfinite_steps: int = 5  # NaN/inf steps are skipped; this many in a row stop the run
    # Several processes (torchrun / accelerate launch): data parallel with DDP, or the frozen base sharded (FSDP2).
    distributed_mode: Literal["ddp", "fsdp"] = "ddp"
    distributed_timeout_seconds: float = 1800.0  # a rank that dies stops the others after this long at most
    # Speed-ups (trainer_core/speedups.py): each computes what the stock stack computes; these switch them off.
    fast_lokr: bool = True  # LoKr applied through its Kronecker structure (kron_lokr.py)
    fast_moe_dispatch: bool = True  # MoE training dispatch sorted by expert, no boolean masks (moe_dispatch.py)
    lean_int8_backward: bool = True  # frozen quanto layers keep no activations for backward (frozen_qlinear.py)
    # MoE layers whose routed experts are plain frozen Linears run one grouped GEMM per projection, with static
    # shapes and no host sync (moe_dispatch.py); others keep the sorted dispatch. Needs fast_moe_dispatch.
    grouped_moe_dispatch: bool = True
    # torch.compile each transformer block as one graph, MoE included (compile_blocks.py; docs/gpu-step.md). Off
    # until a GPU run measures that the compile time pays back: the log gives the compile cost and per-step saving.
    compile_blocks: bool = False
    # Capture each aspect bucket's whole training step in a CUDA graph and replay it (graphed_step.py; CUDA only,
    # single process, an optimizer that skips on the device). Off until measured on a GPU; logged when not possible.
    cuda_graphs: bool = False
    lean_rope: bool = True  # rotary embedding whose backward is one inverse rotation (lean_rope.py)
    # fast_lokr's copy-free form (W1 as a batched GEMM fused with the residual add): 17 kernels per adapted layer
    # instead of 24; off until a GPU run measures its small batched GEMMs (kron_lokr.BatchedKroneckerDelta).
    batched_lokr: bool = False
    # Low-memory mode: transformer blocks stay in pinned CPU memory and are streamed to the GPU one block ahead
    # (block_offload.py). Needs gradient_checkpointing and float or *-scaled base weights; a single process.
    offload_blocks: bool = False
    # A training step that runs out of GPU memory is retried with gradient checkpointing switched on (when it was
    # off) instead of stopping the run; single process only. Off: the run stops with a checkpoint and a message.
    recover_from_out_of_memory: bool = True
    # "auto": before anything loads, a memory plan (trainer_core/plan/) picks the fastest of no checkpointing,
    # gradient_checkpointing and offload_blocks that fits the GPU, and logs why; "manual": the settings as given.
    memory_mode: Literal["manual", "auto"] = "manual"

    def validate(self) -> None:
        if not self.datasets:
            raise ConfigError("no datasets configured: give at least one dataset with an instance_data_dir")
        if not any(d.dataset_type == "image" for d in self.datasets):
            raise ConfigError("every dataset is dataset_type eval: at least one dataset must be for training")
        for dataset in self.datasets:
            dataset.validate()
        check_model_choice(self.model_family, self.model_type, self.model_flavour, self.lora_type)
        if Path(self.pretrained_model_name_or_path).suffix.lower() in (".safetensors", ".sft"):
            raise ConfigError(
                f"pretrained_model_name_or_path {self.pretrained_model_name_or_path} is a single transformer file; "
                "the VAE, text encoders and scheduler come from a HiDream-I1 diffusers folder. Set "
                "pretrained_transformer_model_name_or_path to this file and pretrained_model_name_or_path to the "
                "diffusers folder (base_model_precision fp8-scaled keeps an fp8 file in fp8)")
        if self.optimizer.lower() not in OPTIMIZERS:
            raise ConfigError(f"optimizer {self.optimizer!r} is not supported; use one of: {', '.join(OPTIMIZERS)}")
        for name in ("train_batch_size", "gradient_accumulation_steps", "vae_batch_size", "lora_rank",
                     "text_cache_write_batch_size", "eval_timesteps", "lr_num_cycles",
                     "max_consecutive_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_train_steps", "num_train_epochs", "lr_warmup_steps", "validation_step_interval",
                     "eval_steps_interval", "checkpoint_step_interval", "num_eval_images"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.max_train_steps == 0 and self.num_train_epochs == 0:
            raise ConfigError("max_train_steps and num_train_epochs are both 0: set max_train_steps (it wins when "
                              "both are set) or num_train_epochs")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ConfigError(f"checkpoints_total_limit must be at least 1 (or unset), got "
                              f"{self.checkpoints_total_limit}")
        self._validate_ranges()
        if self.distributed_mode not in ("ddp", "fsdp"):
            raise ConfigError(f"distributed_mode must be 'ddp' or 'fsdp', got {self.distributed_mode!r}")
        if not self.distributed_timeout_seconds > 0:
            raise ConfigError(f"distributed_timeout_seconds must be positive, got {self.distributed_timeout_seconds}")
        if self.offload_blocks:
            clashes = [why for clash, why in (
                (not self.gradient_checkpointing, "gradient_checkpointing: true (without it every block's weights "
                                                  "stay on the GPU for the backward)"),
                (self.base_model_precision not in ("no_change", "bf16", "fp32", *SCALED_PRECISIONS),
                 "base_model_precision: no_change, fp8-scaled or int8-scaled (optimum-quanto weights are not "
                 "streamed)"),
                (self.compile_blocks, "compile_blocks: false (compiled blocks would trace the streaming hooks)"))
                if clash]
            if clashes:
                raise ConfigError("offload_blocks needs " + "; ".join(clashes))
        if not 0.0 <= self.caption_dropout_probability < 1.0:
            raise ConfigError("caption_dropout_probability must be in [0, 1)")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be between 0 and 1 (exclusive), got {self.ema_decay}")
        if not 0.0 <= self.validation_guidance_rescale <= 1.0:
            raise ConfigError(f"validation_guidance_rescale must be between 0 and 1, got "
                              f"{self.validation_guidance_rescale}")
        if self.mixed_precision not in ("no", "bf16"):
            raise ConfigError(f"mixed_precision {self.mixed_precision!r} is not supported: use 'bf16' or 'no'")
        if self.grad_clip_method not in ("norm", "value"):
            raise ConfigError(f"grad_clip_method must be 'norm' or 'value', got {self.grad_clip_method!r}")
        for name in ("base_model_precision", *(f"text_encoder_{i}_precision" for i in range(1, 5))):
            if getattr(self, name) not in PRECISIONS:
                raise ConfigError(f"{name} {getattr(self, name)!r} is not supported; use one of: "
                                  f"{', '.join(PRECISIONS)}")
        if self.memory_mode not in ("manual", "auto"):
            raise ConfigError(f"memory_mode must be 'manual' or 'auto', got {self.memory_mode!r}")
        if self.report_to not in ("none", "tensorboard"):
            raise ConfigError(f"report_to {self.report_to!r} is not supported: use 'tensorboard' or 'none'")
        if not self.tracker_run_name or any(c in self.tracker_run_name for c in "/\\\0") or \
                self.tracker_run_name in (".", ".."):
            raise ConfigError(f"tracker_run_name {self.tracker_run_name!r} must be a plain folder name")
        for width, height in self.validation_resolutions:
            try:
                replace(self.validation_sampling(), width=width, height=height).validate()
            except ConfigError as exc:
                raise ConfigError(f"validation settings (validation_resolution {width}x{height}): {exc}") from None

    def _validate_ranges(self) -> None:
        """Numbers no run can use (NaN fails every comparison below, so it is refused too)."""
        positive = {
            "learning_rate": "e.g. 1e-4 for AdamW, 2e-5 to 4e-5 for Lion (the quickstart's LoKr rates)",
            "flow_schedule_shift": "HiDream-I1-Full was trained with 3.0; the quickstart suggests starting near "
                                   "1.0 (shift k maps sigma to k*sigma / (1 + (k-1)*sigma): k <= 0 gives no noise)",
            "flow_sigmoid_scale": "1.0 is SimpleTuner's default (sigma = sigmoid(scale * n), n ~ N(0, 1))",
        }
        for name, hint in positive.items():
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be a positive number, got {getattr(self, name)}: {hint}")
        not_negative = {
            "max_grad_norm": "0 turns clipping off", "adam_weight_decay": "0 turns weight decay off",
            "hidream_load_balancing_loss_weight": "the quickstart's default is 0.01",
            "validation_guidance": "1 or less samples without classifier-free guidance",
        }
        for name, hint in not_negative.items():
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)} ({hint})")
        for name in ("init_lokr_norm", "lora_alpha"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive (or unset), got {getattr(self, name)}")

    @property
    def validation_resolutions(self) -> list[Resolution]:
        """Every validation size as (width, height); SimpleTuner's comma-separated string is parsed here."""
        return parse_resolutions(self.validation_resolution)

    def validation_sampling(self, shift: float = SamplingConfig.shift) -> SamplingConfig:
        """How validation samples. `shift` is the model's own sampling shift (its scheduler config, read by the run:
        `hidream.scheduler_shift`), as the pipeline samples; never the training flow_schedule_shift."""
        width, height = self.validation_resolutions[0]
        return SamplingConfig(prompt=self.validation_prompt or "", negative_prompt=self.validation_negative_prompt,
                              width=width, height=height, num_inference_steps=self.validation_num_inference_steps,
                              guidance=self.validation_guidance, guidance_rescale=self.validation_guidance_rescale,
                              shift=shift, seed=self.validation_seed,
                              scheduler=self.validation_noise_scheduler, lokr_strength=self.validation_lycoris_strength,
                              cuda_graphs=self.cuda_graphs)

    def noise_schedule(self) -> NoiseSchedule:
        return NoiseSchedule(shift=self.flow_schedule_shift, auto_shift=self.flow_schedule_auto_shift,
                             sigmoid_scale=self.flow_sigmoid_scale, uniform=self.flow_use_uniform_schedule)

    def step_settings(self) -> StepSettings:
        # As SimpleTuner: Prodigy (which sizes its own steps) is never clipped.
        clip = 0.0 if self.optimizer.lower() == "prodigy" else self.max_grad_norm
        return StepSettings(gradient_accumulation_steps=self.gradient_accumulation_steps,
                            caption_dropout_probability=self.caption_dropout_probability,
                            max_grad_norm=clip, grad_clip_method=self.grad_clip_method,
                            use_load_balancing_loss=self.hidream_use_load_balancing_loss,
                            max_consecutive_nonfinite_steps=self.max_consecutive_nonfinite_steps,
                            recover_from_out_of_memory=self.recover_from_out_of_memory)

    @property
    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.output_dir) / "cache"

    @property
    def resolved_text_cache_dir(self) -> Path:
        return Path(self.text_cache_dir) if self.text_cache_dir else self.resolved_cache_dir / "text"


def check_model_choice(model_family: str, model_type: str = "lora", model_flavour: str = "full",
                       lora_type: str = "lycoris") -> None:
    """The model and adapter this trainer can train; anything else is a ConfigError saying what is."""
    if model_family != "hidream":
        raise ConfigError(f"model_family {model_family!r} is not supported: model_family must be 'hidream' "
                          "(this trainer trains HiDream-I1 only)")
    if model_type != "lora":
        raise ConfigError(f"model_type {model_type!r} is not supported: only 'lora' (adapters); full fine-tuning "
                          "is not offered")
    if model_flavour not in ("full", "dev", "fast"):
        raise ConfigError(f"model_flavour {model_flavour!r} is not supported: use 'full' (or the distilled 'dev' / "
                          "'fast', which training breaks)")
    if lora_type not in ("lycoris", "standard"):
        raise ConfigError(f"lora_type {lora_type!r} is not supported: use 'lycoris' (LoKr) or 'standard' (LoRA)")


def parse_resolutions(value: Any, what: str = "validation_resolution") -> list[Resolution]:
    """'1024x768' (width x height), '1024', 1024, '1024x1024,1280x768', (w, h) or [(w, h), ...] -> [(w, h), ...]."""
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return [(int(value[0]), int(value[1]))]
    items = value if isinstance(value, (tuple, list)) else str(value).split(",")
    out = []
    for item in items:
        if isinstance(item, (tuple, list)) and len(item) == 2:
            out.append((int(item[0]), int(item[1])))
            continue
        text = str(item).strip().lower()
        try:
            if "x" in text:
                w, h = text.split("x")
                out.append((int(w), int(h)))
            else:
                out.append((int(float(text)),) * 2)
        except ValueError:
            raise ConfigError(f"{what}: expected WIDTHxHEIGHT such as 1024x1024 (several separated by commas), "
                              f"got {value!r}") from None
    if not out:
        raise ConfigError(f"{what}: no resolution given")
    return out
