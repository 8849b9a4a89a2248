"""HiDream-I1 LoKr training: data -> caches -> transformer + LoKr -> flow-matching steps -> LoKr file.

`train()` reads as its phases: prepare the data and fill the caches (prepare.py), build the model and its adapter
(model.py), build the training state or restore it from a checkpoint (state.py), loop over the steps with what is
due between them (loop.py, step.py, boundary.py), and finish (the LoKr file, a last validation, the loss curve).
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Optional

from ..adapters.ema import AdapterEMA
from ..config.schema import ConfigError, TrainConfig
from ..util import atomic
from ..util.faults import crash_point
from . import checkpoint as ckpt
from .boundary import Checkpoints, EvalLoss, StepBoundary, Validation, write_loss_curve
from .context import RunContext
from .interface import ModelComponents, TrainingCallbacks, TrainResult
from .loop import train_steps
from .model import TrainingModel, adapter_settings, build_training_model
from .optimizers import build_lr_scheduler, build_optimizer
from .prepare import TrainingData, prepare_data
from .state import TrainState
from .step import NoiseSampler, TrainStep
from .tracking import RunLog

logger = logging.getLogger(__name__)


def train(config: TrainConfig, callbacks: Optional[TrainingCallbacks] = None,
          components: Optional[ModelComponents] = None) -> TrainResult:
    """Run one training as `config` says.

    However it ends (finished, stopped, an error), hooks come off the model and files are closed; a transformer
    the caller passed in comes back without the adapter, in its original mode.
    """
    started = time.perf_counter()
    if config.memory_mode == "auto":  # the plan that resolves it runs the training code: it sits above training
        raise ConfigError("memory_mode auto is chosen by a memory plan before training starts: pass the config "
                          "through trainer_core.plan.resolve_memory_mode(config) first (the command line and the "
                          "Train node do), or set gradient_checkpointing / offload_blocks and memory_mode manual")
    callbacks, given = callbacks or TrainingCallbacks(), components or ModelComponents()
    with contextlib.ExitStack() as cleanup:
        ctx = RunContext.start(config, callbacks.on_phase, cleanup)
        lycoris = adapter_settings(config)  # checked before any data or model work
        resume_from = ckpt.resolve_resume_checkpoint(ctx.output_dir, config.resume_from_checkpoint)
        _log_accepted_settings(config)

        data = prepare_data(config, ctx, given)
        trained = build_training_model(config, ctx, given, data.model_paths, lycoris, cleanup)
        state = new_train_state(config, trained, data)
        if resume_from is not None:
            ctx.phase("resuming")
            resume(state, resume_from, callbacks)
        run_log = RunLog(ctx.output_dir / "logs" / config.tracker_run_name,
                         tensorboard=config.report_to == "tensorboard",
                         resume_step=state.step if resume_from is not None else None, enabled=ctx.is_main)
        cleanup.callback(run_log.close)
        validation = Validation(config, ctx, data, trained, state, run_log, callbacks.on_validation)
        evaluation = EvalLoss(config, ctx, data, trained, state, run_log)
        checkpoints = Checkpoints(config, ctx, state)
        step_fn = new_train_step(config, ctx, trained, state)

        ctx.phase("training")
        if state.step == 0 and not config.disable_benchmark:  # the base model's images, to compare against
            validation.run(0)
        if state.step == 0 and evaluation.enabled:
            evaluation.run(0)
        boundary = StepBoundary(validation, evaluation, checkpoints, state)
        stopped = train_steps(config, ctx, data, trained, state, step_fn, boundary, checkpoints, callbacks, run_log)

        ctx.phase("saving")
        crash_point("lokr-save")
        lokr_path, ema_path = state.write_adapter(ctx.output_dir) if ctx.is_main else (None, None)
        if not stopped:
            validation.run(state.step, resume_phase=None)
        curve_path = write_history(ctx, state)
        ctx.phase("done")
        return TrainResult(output_dir=ctx.output_dir, lokr_path=lokr_path, losses=state.losses,
                           validation_images=validation.images, loss_curve_path=curve_path,
                           text_cache=data.text_cache.stats, latent_cache=data.latent_stats, steps_done=state.step,
                           seconds=time.perf_counter() - started, total_steps=state.total_steps,
                           resumed_from=resume_from, stopped=stopped, checkpoint_path=checkpoints.latest,
                           ema_lokr_path=ema_path, eval_losses=state.eval_losses, log_dir=run_log.folder,
                           nonfinite_steps=step_fn.nonfinite_steps)


def new_train_state(config: TrainConfig, trained: TrainingModel, data: TrainingData) -> TrainState:
    """A fresh state: the optimizer over the adapter's weights, the lr schedule over the run's length, the EMA."""
    params = trained.adapter.parameters()
    optimizer = build_optimizer(config, params, params[0].device)
    return TrainState(config, trained.adapter, optimizer, build_lr_scheduler(config, optimizer, data.total_steps),
                      AdapterEMA(trained.adapter.module, config.ema_decay) if config.use_ema else None,
                      data.batches, data.total_steps, trained.base_name)


def new_train_step(config: TrainConfig, ctx: RunContext, trained: TrainingModel, state: TrainState) -> TrainStep:
    """The step function over the run's model, optimizer and random streams."""
    noise = NoiseSampler(state.noise_generator, config.noise_schedule(), ctx.ranks)
    step = TrainStep(trained.model, trained.adapter.parameters(), state.optimizer, trained.load_balancing,
                     config.step_settings(), noise, ranks=ctx.ranks, sharded=ctx.sharded, ema=state.ema,
                     lr_schedule=state.lr_schedule, lower_memory=lambda: _lower_memory_setting(config, ctx, trained),
                     adapter_off=trained.adapter.disabled)
    if config.cuda_graphs:  # each bucket's step captured once and replayed (graphed_step.py); says why if not
        from .graphed_step import GraphedTrainStep

        return GraphedTrainStep(step, trained.transformer, streamed=config.offload_blocks)
    return step


def write_history(ctx: RunContext, state: TrainState) -> Optional[Path]:
    """The loss curve and the loss list of the whole run (rank 0); returns the curve's path."""
    if not ctx.is_main:
        return None
    atomic.write_text(ctx.output_dir / "losses.json", json.dumps(state.losses))
    return write_loss_curve(state.losses, ctx.output_dir / "loss_curve.png")


# diffusers' schedules whose learning rate at a step depends on the run's total length.
LENGTH_DEPENDENT_SCHEDULES = ("cosine", "cosine_with_restarts", "linear", "polynomial")


def resume(state: TrainState, folder: Path, callbacks: TrainingCallbacks) -> None:
    """Weights, optimizer, schedule, EMA, random streams, data position and history, exactly as saved.

    A run may continue with another length (a larger max_train_steps extends it). Every random stream and the
    data order are independent of the length, so it then trains exactly what a run of the new length from the
    start trains, unless its lr schedule depends on the length: then the steps up to here followed the old
    schedule and the rest follows the new one (logged)."""
    state.read(folder)
    logger.info("resumed from %s at step %d of %d", folder, state.step, state.total_steps)
    config = state.config
    if state.written_for_steps != state.total_steps:
        logger.info("the checkpoint was written by a run of %d steps; this one runs %d", state.written_for_steps,
                    state.total_steps)
        if config.lr_scheduler in LENGTH_DEPENDENT_SCHEDULES:
            logger.warning("lr_scheduler %s depends on the run's length: steps 1-%d followed the %d-step schedule, "
                           "the rest follows the %d-step one, so this run is not the same as an unbroken %d-step "
                           "run (constant and constant_with_warmup do not depend on it)", config.lr_scheduler,
                           state.step, state.written_for_steps, state.total_steps, state.total_steps)
    if callbacks.on_resume:
        callbacks.on_resume(state.step, list(state.losses))


def _lower_memory_setting(config: TrainConfig, ctx: RunContext, trained: TrainingModel) -> Optional[str]:
    """After running out of memory: switch on, for the rest of this run, a setting that needs less; None when
    there is none (or recovery is off, or other ranks would be left waiting in a collective)."""
    if not config.recover_from_out_of_memory or ctx.ranks.enabled:
        return None
    if not trained.transformer.is_gradient_checkpointing:  # the maths is unchanged; activations about halve
        trained.transformer.enable_gradient_checkpointing()
        return "gradient_checkpointing: true"
    return None


def _log_accepted_settings(config: TrainConfig) -> None:
    """SimpleTuner settings this trainer accepts without applying them, said once at start."""
    if config.validation_torch_compile:
        logger.info("validation_torch_compile is not applied: validation merges the LoKr into the weights, which "
                    "would recompile the model at every validation")
