"""What a front end (the CLI, the ComfyUI nodes, a script) hands `train()` and what it gets back."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from PIL import Image

from ..data.cache import CacheStats, ImageEncoder, TextEncoder

# What TrainingCallbacks.poll_commands may return: "sample" (validation images now), "save" (a checkpoint and the
# LoKr file now; training goes on), "stop" (validation images of the LoKr it stops with, checkpoint, LoKr, clean
# end).
COMMANDS = ("sample", "save", "stop")

LOKR_FILENAME = "pytorch_lora_weights.safetensors"  # SimpleTuner's name for the trained adapter
EMA_LOKR_FILENAME = "pytorch_lora_weights_ema.safetensors"  # the EMA of the same weights, beside it


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

    on_resume(step, losses) is called once when a run continues from a checkpoint, with the loss history up to
    that step (a live chart draws it instead of starting empty). poll_commands is called at every step boundary
    and returns any of COMMANDS; should_stop() returning True ends the run like "stop" but at once, without its
    validation images (ComfyUI's Cancel: the person wants the run to end now).
    """

    on_phase: Optional[Callable[[str], None]] = None
    on_step: Optional[Callable[[StepMetrics], None]] = None
    on_validation: Optional[Callable[[int, Image.Image, Path], None]] = None  # (step, grid, the grid's file)
    on_resume: Optional[Callable[[int, list[float]], None]] = None
    should_stop: Optional[Callable[[], bool]] = None
    poll_commands: Optional[Callable[[], list[str]]] = None


@dataclass
class ModelComponents:
    """Models a front end already holds (ComfyUI's loaders hand over theirs); whatever is None is loaded from the
    config's model paths. The caller keeps ownership: the LoKr is removed from a given transformer after training.

    text_encoder / image_encoder fill the caches and their `identity` keys them; decode_latents turns scaled
    latents (B, 16, h, w) into images for validation; sampling_shift is the model's own sampling shift (its
    scheduler config; None: read from the config's model folder, else HiDream-I1-Full's 3.0).
    """

    transformer: Optional[torch.nn.Module] = None
    transformer_name: str = "transformer"
    text_encoder: Optional[TextEncoder] = None
    image_encoder: Optional[ImageEncoder] = None
    decode_latents: Optional[Callable[[torch.Tensor], list[Image.Image]]] = None
    sampling_shift: Optional[float] = None


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


class TrainingStopped(RuntimeError):
    """Training cannot go on (out of memory, or a run of non-finite losses). A checkpoint of the last good state
    was written first: `checkpoint` (resume from it once the cause is fixed)."""

    def __init__(self, message: str, checkpoint: Optional[Path]):
        super().__init__(message + (f" The last good state is in {checkpoint}: fix the cause, then resume with "
                                    "resume_from_checkpoint: latest." if checkpoint else ""))
        self.checkpoint = checkpoint
