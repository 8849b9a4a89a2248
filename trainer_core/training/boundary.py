"""What happens between two optimizer steps: validation images, eval loss, checkpoints and the front end's commands.

Each action is a small object that knows its own settings and when it is due; `StepBoundary.after_step` runs
them in a fixed order. None of them draws from a training random stream (validation and eval fork the global
generator and use their own seeds), so a run with them trains exactly what a run without them trains.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import torch
from PIL import Image

from ..config.schema import TrainConfig
from ..hidream.forward import predict_flow
from ..util import atomic
from . import checkpoint as ckpt
from .context import RunContext
from .evaluation import eval_loss
from .interface import COMMANDS
from .model import TrainingModel
from .plot import loss_curve_image
from .prepare import TrainingData
from .state import TrainState
from .tracking import RunLog
from .validation import render_validation, validation_latents

logger = logging.getLogger(__name__)


def write_loss_curve(losses: list[float], path: Path) -> Path:
    image = loss_curve_image(losses, title=f"training loss ({len(losses)} steps)")
    return atomic.write_with(path, lambda tmp: image.save(tmp, format="PNG"))


class Validation:
    """Images of every validation prompt at every validation resolution, with the adapter applied.

    Rank 0 samples alone and the others wait for it in the next step's gradient all-reduce; except with FSDP,
    where each block gathers its weights from every rank, so all ranks run the same forwards and rank 0 alone
    decodes and writes. A step is validated once, however many reasons it has.
    """

    def __init__(self, config: TrainConfig, ctx: RunContext, data: TrainingData, trained: TrainingModel,
                 state: TrainState, run_log: RunLog,
                 on_validation: Optional[Callable[[int, Image.Image, Path], None]]):
        self.config, self.ctx, self.data, self.trained, self.state = config, ctx, data, trained, state
        self.run_log, self.on_validation = run_log, on_validation
        self.done: set[int] = set()
        self.images: list[Path] = []

    def due(self, step: int) -> bool:
        interval = self.config.validation_step_interval
        return bool(interval) and step % interval == 0

    def run(self, step: int, resume_phase: Optional[str] = "training") -> None:
        ctx, data = self.ctx, self.data
        if not data.prompts or step in self.done or not (ctx.is_main or ctx.sharded):
            return
        self.done.add(step)
        ctx.phase("validating")
        settings = self.config.validation_sampling(data.sampling_shift)
        if step == 0:  # the benchmark image is the base model's, whatever the LoKr's initialisation
            settings = replace(settings, lokr_strength=0.0)
        resolutions = self.config.validation_resolutions
        transformer = self.trained.transformer
        with torch.random.fork_rng(devices=[]), self.trained.adapter.applied(settings.lokr_strength):
            if ctx.is_main:
                paths, grid, grid_path = render_validation(step, data.prompts, resolutions, settings,
                                                           data.text_cache, transformer, data.decode_latents,
                                                           ctx.output_dir / "validation")
            else:
                for _ in validation_latents(data.prompts, resolutions, settings, data.text_cache, transformer):
                    pass
        if ctx.is_main:
            self.images += [*paths, grid_path]
            self.run_log.image("validation/grid", step, grid)
            if self.state.losses:  # the loss curve (with its moving average) is redrawn at every validation
                write_loss_curve(self.state.losses, ctx.output_dir / "loss_curve.png")
            if self.on_validation:
                self.on_validation(step, grid, grid_path)
        if resume_phase:
            ctx.phase(resume_phase)


class EvalLoss:
    """The flow-matching loss of the eval images at fixed noise and sigmas (evaluation.py), every interval."""

    def __init__(self, config: TrainConfig, ctx: RunContext, data: TrainingData, trained: TrainingModel,
                 state: TrainState, run_log: RunLog):
        self.config, self.ctx, self.data, self.trained, self.state = config, ctx, data, trained, state
        self.run_log = run_log

    @property
    def enabled(self) -> bool:
        return bool(self.config.eval_steps_interval and self.data.eval_samples)

    def due(self, step: int) -> bool:
        return self.enabled and step % self.config.eval_steps_interval == 0

    def run(self, step: int) -> None:
        ctx, data, transformer = self.ctx, self.data, self.trained.transformer
        if not (ctx.is_main or ctx.sharded):  # FSDP: every rank runs the same forwards (see Validation)
            return
        with torch.random.fork_rng(devices=[]):
            value = eval_loss(data.eval_samples, data.load_latents, data.text_cache,
                              lambda x, sigmas, embeds: predict_flow(transformer, x, sigmas * 1000.0, embeds),
                              self.config.eval_timesteps, self.config.seed, ctx.device)
        self.trained.load_balancing.clear()
        self.state.eval_losses.append((step, value))
        self.run_log.scalars(step, {"eval_loss": value})
        if ctx.is_main:
            logger.info("step %d: eval loss %.5f over %d images", step, value, len(data.eval_samples))


class Checkpoints:
    """Rank 0 writes what every rank needs to resume: the random streams and data position are those of the
    global batch, identical on every rank. `latest` is the newest checkpoint this run wrote."""

    def __init__(self, config: TrainConfig, ctx: RunContext, state: TrainState):
        self.config, self.ctx, self.state = config, ctx, state
        self.latest: Optional[Path] = None

    def due(self, step: int) -> bool:
        interval = self.config.checkpoint_step_interval
        return bool(interval) and step % interval == 0

    def save(self) -> Optional[Path]:
        if not self.ctx.is_main:
            return None
        path = ckpt.save_checkpoint(self.ctx.output_dir, self.state.step, self.state.write)
        ckpt.prune_checkpoints(self.ctx.output_dir, self.config.checkpoints_total_limit)
        logger.info("checkpoint written: %s", path)
        self.latest = path
        return path

    def save_unless_current(self) -> Optional[Path]:
        """A checkpoint of the current step, unless the newest one already is."""
        if self.latest is None or ckpt.checkpoint_step(self.latest) != self.state.step:
            return self.save()
        return self.latest


class StepBoundary:
    """The actions between steps, in order: validation (its interval, "sample", or "stop": a run stopped early
    ends with images of the adapter it stops with, as a finished run does), eval loss, a checkpoint (its interval,
    "save" or "stop") and, on "save", the adapter file too. The last step's validation waits for the run's end,
    where it is drawn once. Without validation prompts no images are drawn, whatever the command."""

    def __init__(self, validation: Validation, evaluation: EvalLoss, checkpoints: Checkpoints, state: TrainState):
        self.validation, self.evaluation, self.checkpoints, self.state = validation, evaluation, checkpoints, state

    def due(self, step: int) -> bool:
        """True when something (validation, eval loss, a checkpoint) is due after `step` without a command."""
        last = step == self.state.total_steps
        return (self.validation.due(step) and not last) or self.evaluation.due(step) or self.checkpoints.due(step)

    def after_step(self, commands: list[str]) -> bool:
        """Run what is due after the state's current step; True when the run should stop here."""
        step = self.state.step
        commands = [c for c in commands if c in COMMANDS]
        last = step == self.state.total_steps
        stop = "stop" in commands
        if "sample" in commands or stop or (self.validation.due(step) and not last):
            self.validation.run(step)
        if self.evaluation.due(step):
            self.evaluation.run(step)
        if stop or "save" in commands or self.checkpoints.due(step):
            self.checkpoints.save()
            if "save" in commands and self.checkpoints.ctx.is_main:
                self.state.write_adapter(self.checkpoints.ctx.output_dir)
        return stop
