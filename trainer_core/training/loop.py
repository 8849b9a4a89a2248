"""The training loop: draw a step's micro-batches, run the step, report it, then what is due between steps."""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, Iterator, Optional

import torch
from tqdm.auto import tqdm

from ..config.schema import TrainConfig
from ..data.datasets import TrainingSample
from ..util.device import peak_memory_bytes, release_memory
from ..util.faults import crash_point
from .boundary import Checkpoints, StepBoundary
from .context import RunContext
from .interface import StepMetrics, TrainingCallbacks, TrainingStopped
from .payback import payback_for
from .model import TrainingModel
from .prepare import TrainingData
from .state import TrainState
from .step import MicroBatch, StepOutcome, TrainStep
from .tracking import RunLog

logger = logging.getLogger(__name__)


def draw_micro_batches(batch_iter: Iterator[list[TrainingSample]], state: TrainState, data: TrainingData,
                       ctx: RunContext, accumulation: int, dropout: float) -> list[Callable[[], MicroBatch]]:
    """The step's micro-batches and caption dropout, drawn before any of them runs (a step retried after
    running out of memory is the same step). Every rank draws for the global batch and trains on its slice."""
    drawn = []
    for _ in range(accumulation):
        batch = next(batch_iter)
        dropped = [state.dropout_rng.random() < dropout for _ in batch]
        drawn.append((ctx.ranks.shard(batch), ctx.ranks.shard(dropped)))

    def loader(samples: list[TrainingSample], dropped: list[bool]) -> Callable[[], MicroBatch]:
        regularisation = [s.is_regularisation for s in samples]
        return lambda: MicroBatch(data.load_latents(samples).to(ctx.device),
                                  data.text_cache.load(["" if d else s.caption for s, d in zip(samples, dropped)]),
                                  torch.tensor(regularisation, device=ctx.device) if any(regularisation) else None)

    return [loader(samples, dropped) for samples, dropped in drawn]


def out_of_memory_message(config: TrainConfig, device: torch.device, step: int, checkpointing: bool) -> str:
    """What ran out, how much was in use, and the settings that need less (`checkpointing`: whether the step ran
    with gradient checkpointing, which the run may have switched on itself)."""
    peak = peak_memory_bytes(device) / 2**30
    fixes = []
    if not checkpointing:
        fixes.append("gradient_checkpointing: true (about half the activation memory)")
    if config.base_model_precision == "no_change":
        fixes.append("base_model_precision: fp8-scaled (RTX 40xx / H100-class GPUs), int8-scaled or int8-quanto "
                     "(half the weight memory)")
        if not config.offload_blocks:
            fixes.append("offload_blocks: true (block weights stay in CPU memory and stream to the GPU; slower)")
    fixes.append(f"a smaller resolution (now {sorted({d.resolution for d in config.datasets})}) or train_batch_size "
                 f"(now {config.train_batch_size}; raise gradient_accumulation_steps to keep the effective batch)")
    if config.validation_prompt and max(max(r) for r in config.validation_resolutions) > 1024:
        fixes.append("smaller validation_resolution")
    return (f"out of memory on {device} at step {step} (peak {peak:.1f} GiB in use). Settings that need less: "
            + "; ".join(fixes) + ".")


class StepReporter:
    """Every step's numbers to the scalar log, the progress bar and the front end's on_step."""

    def __init__(self, state: TrainState, run_log: RunLog, callbacks: TrainingCallbacks, ctx: RunContext):
        self.state, self.run_log, self.callbacks, self.ctx = state, run_log, callbacks, ctx
        self.start_step = state.step
        self.started = time.perf_counter()
        self.bar = tqdm(total=state.total_steps, initial=state.step, desc="training",
                        disable=None if ctx.is_main else True)

    def report(self, outcome: StepOutcome, seconds: float, nonfinite_steps: int) -> None:
        state = self.state
        mean_seconds = (time.perf_counter() - self.started) / (state.step - self.start_step)
        metrics = StepMetrics(step=state.step, total_steps=state.total_steps, loss=outcome.loss,
                              flow_loss=outcome.flow_loss, load_balancing_loss=outcome.load_balancing_loss,
                              learning_rate=state.lr_schedule.get_last_lr()[0], grad_norm=outcome.grad_norm,
                              seconds_per_step=seconds, peak_memory_bytes=peak_memory_bytes(self.ctx.device),
                              eta_seconds=mean_seconds * (state.total_steps - state.step))
        self.run_log.scalars(state.step, {
            "loss": outcome.loss, "flow_loss": outcome.flow_loss, "load_balancing_loss": outcome.load_balancing_loss,
            "learning_rate": metrics.learning_rate, "grad_norm": outcome.grad_norm, "seconds_per_step": seconds,
            "peak_memory_bytes": metrics.peak_memory_bytes, "nonfinite_steps": nonfinite_steps})
        self.bar.set_postfix(loss=f"{outcome.loss:.4f}", lr=f"{metrics.learning_rate:.2e}")
        self.bar.update(1)
        if self.callbacks.on_step:
            self.callbacks.on_step(metrics)

    def close(self) -> None:
        self.bar.close()


def defer_step_reads(device: torch.device) -> bool:
    """Whether the loop reads a step's numbers only after the next step is queued: on a GPU, so it never idles
    while the host logs, polls and loads the next batch (HIDREAM_DEFER_STEP_READS=1/0 overrides; the CPU gains
    nothing from it, its steps are done when they return)."""
    setting = os.environ.get("HIDREAM_DEFER_STEP_READS")
    return setting == "1" if setting in ("0", "1") else device.type == "cuda"


def train_steps(config: TrainConfig, ctx: RunContext, data: TrainingData, trained: TrainingModel, state: TrainState,
                step_fn: TrainStep, boundary: StepBoundary, checkpoints: Checkpoints, callbacks: TrainingCallbacks,
                run_log: RunLog) -> bool:
    """Train from `state.step` to `state.total_steps`; True when the run was stopped early (should_stop or the
    "stop" command), with a checkpoint of the last step written.

    A step's numbers (loss, gradient norm, whether it was skipped) are read once. With `defer_step_reads` the read
    of step N waits until step N+1 is queued, when nothing at N needs them first: no validation, eval loss or
    checkpoint due after N, no front-end command waiting, not the last step, and N could not be the non-finite
    step that stops the run. Otherwise (and always on a CPU) it is read as soon as the step returns."""
    settings = config.step_settings()
    batch_iter = iter(data.batches)
    reporter = StepReporter(state, run_log, callbacks, ctx)
    defer = defer_step_reads(ctx.device)
    payback = payback_for(config, ctx.device, state.step + 1, state.total_steps, step_fn)  # compile/graphs: worth it?
    stopped = False
    deferred = None  # (step, pending, started) of a step queued whose numbers are not read yet

    def poll() -> list[str]:
        return callbacks.poll_commands() if callbacks.poll_commands else []

    def finish(item, commands: Optional[list[str]] = None, ended: Optional[float] = None) -> bool:
        """Read a step's numbers and do what follows it (with `commands`, or those polled after the step is
        reported); True when the run should stop after it."""
        step, pending, started = item
        outcome = pending.result()
        state.step = step
        state.losses.append(outcome.loss)
        if not outcome.updated:
            _stop_if_diverged(config, step_fn, outcome, step, checkpoints)
        crash_point("step")
        reporter.report(outcome, (ended or time.perf_counter()) - started, step_fn.nonfinite_steps)
        if boundary.after_step(poll() if commands is None else commands):
            logger.info("stopped after step %d; resume with resume_from_checkpoint: latest", step)
            return True
        return False

    try:
        for step in range(state.step + 1, state.total_steps + 1):
            if callbacks.should_stop and callbacks.should_stop():
                if deferred is not None:
                    finish(deferred)
                    deferred = None
                logger.info("stop requested before step %d", step)
                stopped = True
                break
            if deferred is not None:
                commands = poll()
                if commands:  # a command acts on the step before this one: it is done first
                    item, deferred = deferred, None
                    if finish(item, commands):
                        stopped = True
                        break
            started = time.perf_counter()
            streams = state.streams()
            micro_batches = draw_micro_batches(batch_iter, state, data, ctx, settings.gradient_accumulation_steps,
                                               settings.caption_dropout_probability)
            launch = payback.launcher(step, step_fn) if payback is not None else step_fn.launch
            try:
                pending = launch(micro_batches, step)
            except torch.OutOfMemoryError as exc:  # nothing left to lower: keep the last complete step
                if deferred is not None:
                    finish(deferred, [])
                    deferred = None
                release_memory()
                message = out_of_memory_message(config, ctx.device, step, trained.transformer.is_gradient_checkpointing)
                state.rewind_streams(streams)
                raise TrainingStopped(message, checkpoints.save()) from exc
            carried: list[str] = []
            if deferred is not None:  # the previous step's numbers, read while this one is queued
                item, deferred = deferred, None
                finish(item, [], ended=started)  # nothing was due after it and the commands were polled above
                carried = poll()  # what the front end says on seeing it acts after this step, the next possible
            measured = payback is not None and payback.measuring(step)
            if measured:  # one of the first steps that say whether compile/graphs pay back: timed on its own
                payback.record(step, started, pending)
            current = (step, pending, started)
            if not carried and not measured and defer and step < state.total_steps and not boundary.due(step) and \
                    step_fn.nonfinite_in_a_row + 1 < config.max_consecutive_nonfinite_steps:
                deferred = current
            elif finish(current, carried or None):
                stopped = True
                break
        if deferred is not None:
            stopped = finish(deferred) or stopped
            deferred = None
    finally:
        reporter.close()
    if stopped:
        checkpoints.save_unless_current()
    return stopped


def _stop_if_diverged(config: TrainConfig, step_fn: TrainStep, outcome: StepOutcome, step: int,
                      checkpoints: Checkpoints) -> None:
    logger.warning("step %d: loss %s, gradient norm %s: update skipped (%d in a row, %d in this run)", step,
                   outcome.loss, outcome.grad_norm, step_fn.nonfinite_in_a_row, step_fn.nonfinite_steps)
    if step_fn.nonfinite_in_a_row >= config.max_consecutive_nonfinite_steps:
        raise TrainingStopped(
            f"{step_fn.nonfinite_in_a_row} steps in a row ended with a non-finite loss or gradient (the last at "
            f"step {step}); the weights are those after the last finite step. Usual causes: a learning "
            f"rate too high for {config.optimizer} (now {config.learning_rate:g}), bf16 overflow (check "
            "with mixed_precision: no), or a broken image in the data.", checkpoints.save())
