"""One optimizer step of LoKr training, the same function in the trainer's loop and in the benchmark.

    for each micro-batch:  noise, sigma -> x_sigma -> predict_flow -> (pred - (noise - x0))^2 (+ MoE aux) -> backward
                           (regularisation samples: target = the base model's own prediction, adapter off)
    then:                  gradients averaged (FSDP) -> clipped -> optimizer step (skipped if non-finite) -> EMA

The logged numbers (losses, gradient norm) stay on the device. Where the optimizer allows it (guarded_update.py:
torch's fused AdamW, optimi's Lion) the non-finite skip is decided on the device too, so nothing in the step reads
a device value on the host: `launch()` queues the step and returns a `PendingStep` whose `result()` makes the one
read, when the caller wants it (the loop: after the next step is queued where it can). Otherwise (and on the
optimizer's first update) the numbers are read once before the update, as the skip needs them.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import nn

from ..adapters.ema import AdapterEMA
from ..config.schema import NoiseSchedule, StepSettings
from ..hidream.embeds import PromptEmbeds
from ..hidream.flow_matching import (LoadBalancingLoss, flow_matching_loss, flow_matching_target, noisy_latents,
                                     resolution_shift, sample_sigmas, shift_sigmas)
from ..hidream.forward import hidream_transformer, predict_flow
from ..util.device import peak_memory_bytes, release_memory
from .distributed import DistributedContext, average_gradients
from .guarded_update import GuardedUpdate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MicroBatch:
    """This rank's slice of one micro-batch: latents (B, 16, h, w) float32 on the device and their captions'
    conditioning (captions dropped to "" already applied). `regularisation` (B,) bool marks samples of
    is_regularisation_data datasets (None: there are none)."""

    latents: torch.Tensor
    embeds: PromptEmbeds
    regularisation: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class StepOutcome:
    loss: float  # mean over the micro-batches (and ranks) of the loss that was backpropagated
    flow_loss: float
    load_balancing_loss: Optional[float]
    grad_norm: float
    updated: bool  # False: a non-finite loss or gradient, the update was skipped


class PendingStep:
    """A step queued on the device; `result()` reads its numbers (the step's one host read) and counts a skipped
    step on its TrainStep. Reading twice returns the same outcome."""

    def __init__(self, owner: "TrainStep", values: torch.Tensor, outcome: Optional[StepOutcome] = None):
        self._owner, self._values, self._outcome = owner, values, outcome

    @property
    def done(self) -> bool:
        return self._outcome is not None

    def result(self) -> StepOutcome:
        if self._outcome is None:
            loss, flow, lb, grad_norm, finite = self._values.tolist()  # the one host read
            self._outcome = self._owner._finish(loss, flow, lb, grad_norm, bool(finite))
            self._values = None
        return self._outcome


class NoiseSource(Protocol):
    """Where a step's noise comes from: `draw(latents)` -> (noise, sigmas (B,)); its state can be taken and put
    back (a step retried after running out of memory draws the same noise)."""

    def draw(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def get_state(self): ...

    def set_state(self, state) -> None: ...


class NoiseSampler:
    """The noise and noise levels of each micro-batch, from the run's own generator (never the global one).

    They are drawn for the whole global batch (B x world size) and sliced, so N ranks draw exactly what one
    process with the global batch draws.
    """

    def __init__(self, generator: torch.Generator, schedule: NoiseSchedule,
                 ranks: DistributedContext = DistributedContext()):
        self.generator, self.schedule, self.ranks = generator, schedule, ranks

    def get_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def draw(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise like `latents`, sigmas (B,)), both on the latents' device."""
        b, _, h, w = latents.shape
        global_batch = b * self.ranks.world_size
        noise = self.ranks.shard_tensor(torch.randn((global_batch, *latents.shape[1:]), generator=self.generator))
        kind = "uniform" if self.schedule.uniform else "logit_normal"
        sigmas = self.ranks.shard_tensor(sample_sigmas(global_batch, self.generator, kind,
                                                       self.schedule.sigmoid_scale))
        shift = resolution_shift(h, w) if self.schedule.auto_shift else self.schedule.shift
        return noise.to(latents.device), shift_sigmas(sigmas, shift).to(latents.device)


def flow_matching_losses(model: nn.Module, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
                         embeds: PromptEmbeds, load_balancing: LoadBalancingLoss, add_load_balancing: bool,
                         target: Optional[torch.Tensor] = None
                         ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(loss to backpropagate, flow-matching loss, MoE load-balancing loss or None) of one micro-batch.

    `target` is what the prediction is trained towards: None for the flow noise - x0 (`regularised_target` gives
    the one of a batch with regularisation samples). The load-balancing loss is added with its gradient and
    weighted once (inside LoadBalancingLoss) when `add_load_balancing`; it is computed and returned for logging
    either way.
    """
    load_balancing.clear()
    prediction = predict_flow(model, noisy_latents(latents, noise, sigmas), sigmas * 1000.0, embeds)
    flow_loss = flow_matching_loss(prediction, flow_matching_target(latents, noise) if target is None else target)
    lb_loss = load_balancing.take()
    loss = flow_loss + lb_loss if add_load_balancing and lb_loss is not None else flow_loss
    return loss, flow_loss.detach(), (lb_loss.detach() if lb_loss is not None else None)


def regularised_target(model: nn.Module, micro: MicroBatch, noise: torch.Tensor, sigmas: torch.Tensor,
                       adapter_off: Callable[[], contextlib.AbstractContextManager]) -> torch.Tensor:
    """The training target of a micro-batch holding regularisation samples, (B, C, h, w) float32: for those, what
    the base model (the adapter switched off, no gradient) predicts for the same noisy latents and caption; for
    the others, the flow noise - x0. SimpleTuner's prior preservation for LoRA / LyCORIS training
    (trainer.py, `_prepare_regularisation_parent_targets`): it keeps the adapter from changing what the model
    already draws for such captions. Run before the training forward, so the MoE gates' losses are the latter's."""
    flow = flow_matching_target(micro.latents, noise).float()
    with torch.no_grad(), adapter_off():
        # The transformer itself, not DDP around it: a forward without gradient has nothing to synchronise.
        base = predict_flow(hidream_transformer(model), noisy_latents(micro.latents, noise, sigmas), sigmas * 1000.0,
                            micro.embeds)
    return torch.where(micro.regularisation.view(-1, 1, 1, 1), base.float(), flow)


class TrainStep:
    """Forward, backward and update of the adapter for one optimizer step.

    `model` is what the forward calls (the transformer, or DDP over it); `params` the adapter's trainable
    weights; `micro_batches` are functions that load one micro-batch each. `lower_memory` is asked, after the
    device ran out of memory, for a setting that needs less (it switches it on and names it, or returns None and
    the error propagates). A step retried that way runs on the same micro-batches and noise. `adapter_off` is a
    context in which the model runs without the adapter (the regularisation samples' targets).
    """

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer,
                 load_balancing: LoadBalancingLoss, settings: StepSettings, noise: "NoiseSource",
                 ranks: DistributedContext = DistributedContext(), sharded: bool = False,
                 ema: Optional[AdapterEMA] = None, lr_schedule=None,
                 lower_memory: Optional[Callable[[], Optional[str]]] = None,
                 adapter_off: Optional[Callable[[], contextlib.AbstractContextManager]] = None):
        self.model, self.params, self.optimizer = model, list(params), optimizer
        self.load_balancing, self.settings, self.noise = load_balancing, settings, noise
        self.ranks, self.sharded, self.ema, self.lr_schedule = ranks, sharded, ema, lr_schedule
        self.lower_memory = lower_memory or (lambda: None)
        self.adapter_off = adapter_off
        self.nonfinite_in_a_row = 0
        self.nonfinite_steps = 0
        self.update = GuardedUpdate(optimizer, self.params, ema)

    def backward(self, micro_batches: Sequence[Callable[[], MicroBatch]]) -> torch.Tensor:
        """Forward and backward of every micro-batch (each loaded when its turn comes, so only one is on the
        device at a time); the gradients are left in `params`. Returns the step's (loss, flow loss,
        load-balancing loss) means as one float64 tensor on the device (NaN where there is no load-balancing
        loss)."""
        sums = None
        has_lb = False
        n = len(micro_batches)
        # The aux loss' gradient rides in the MoE's own backward (LoadBalancingLoss.attach_gradient): nothing keeps
        # graphs between the forward and the backward, and a compiled block or a CUDA graph holds the gate.
        self.load_balancing.attach_gradient(1.0 / n if self.settings.use_load_balancing_loss else 0.0)
        for i, load in enumerate(micro_batches):
            micro = load()
            device = micro.latents.device
            sums = torch.zeros(3, dtype=torch.float64, device=device) if sums is None else sums
            noise, sigmas = self.noise.draw(micro.latents)
            target = None
            if micro.regularisation is not None:
                if self.adapter_off is None:
                    raise RuntimeError("regularisation samples need the step's adapter_off context")
                target = regularised_target(self.model, micro, noise, sigmas, self.adapter_off)
            # DDP averages gradients once per optimizer step, not per micro-batch.
            sync = self.model.no_sync() if hasattr(self.model, "no_sync") and i < n - 1 else contextlib.nullcontext()
            with sync:
                loss, flow_loss, lb_loss = flow_matching_losses(
                    self.model, micro.latents, noise, sigmas, micro.embeds, self.load_balancing,
                    self.settings.use_load_balancing_loss, target)
                (loss / n).backward()
            parts = [loss.detach(), flow_loss, lb_loss if lb_loss is not None else torch.zeros((), device=device)]
            sums += torch.stack([p.to(torch.float64) for p in parts]) / n
            has_lb = has_lb or lb_loss is not None
        return sums if has_lb else torch.cat([sums[:2], sums.new_full((1,), math.nan)])

    def backward_retrying(self, micro_batches: Sequence[Callable[[], MicroBatch]], step: int) -> torch.Tensor:
        """`backward`, retried with a lower-memory setting after an out-of-memory error (same noise)."""
        noise_state = self.noise.get_state()
        while True:
            try:
                return self.backward(micro_batches)
            except torch.OutOfMemoryError:
                self.optimizer.zero_grad(set_to_none=True)  # the failed attempt's partial gradients
                self.load_balancing.clear()
                switched_on = self.lower_memory()
                if switched_on is None:
                    raise
            # Past the handler its traceback, and the activations its frames pinned, are gone.
            release_memory()
            self.noise.set_state(noise_state)
            logger.warning("step %d ran out of memory on %s (peak %.1f GiB); retrying it, and training on, with "
                           "%s (put it in the config to start with it)", step, self.device,
                           peak_memory_bytes(self.device) / 2**30, switched_on)

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def run(self, micro_batches: Sequence[Callable[[], MicroBatch]], step: int = 0) -> StepOutcome:
        """One whole optimizer step (`launch`), its numbers read at once."""
        return self.launch(micro_batches, step).result()

    def launch(self, micro_batches: Sequence[Callable[[], MicroBatch]], step: int = 0) -> PendingStep:
        """One whole optimizer step: average (FSDP), measure, check and clip the gradients, then step the
        optimizer and the EMA. A step whose loss or gradient is not finite changes no weight, no optimizer state
        and no EMA; the lr schedule advances either way. Where the skip is decided on the device nothing here
        reads a device value: the returned step's `result()` does, once."""
        if self.update.on_device:
            values = self.device_step(micro_batches, step)
            pending = PendingStep(self, values)
        else:
            values = self._gradients(micro_batches, step)
            loss, flow, lb, grad_norm = values[:4].tolist()  # the host decides the skip: one read, before the update
            finite = math.isfinite(loss) and math.isfinite(grad_norm)
            self.update.step_on_host(finite, lambda: self._clip(values[3].to(torch.float32)))
            pending = PendingStep(self, None, self._finish(loss, flow, lb, grad_norm, finite))
        if self.lr_schedule is not None:
            self.lr_schedule.step()
        return pending

    def device_step(self, micro_batches: Sequence[Callable[[], MicroBatch]], step: int = 0) -> torch.Tensor:
        """Everything of a step that runs on the device, with the skip decided there (`update.on_device`):
        returns [loss, flow, lb, grad norm, finite] (float64) on the device. No host read, no host-side state
        but the Python objects it calls: what a CUDA graph captures (graphed_step.py)."""
        values = self._gradients(micro_batches, step)
        finite = torch.isfinite(values[0::3]).all()  # the loss and the gradient norm
        self.update.step(finite, lambda: self._clip(values[3].to(torch.float32)))
        return torch.cat([values, finite.to(values.dtype).reshape(1)])

    def _gradients(self, micro_batches: Sequence[Callable[[], MicroBatch]], step: int) -> torch.Tensor:
        """Forward and backward of every micro-batch, gradients averaged; [loss, flow, lb, grad norm]."""
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.backward_retrying(micro_batches, step)
        if self.sharded:
            average_gradients(self.params, self.ranks)
        losses = self.ranks.mean_tensor(losses)  # what rank 0 logs is the global mean
        grads = [p.grad for p in self.params if p.grad is not None]
        total_norm = torch.nn.utils.get_total_norm(grads)
        return torch.cat([losses, total_norm.to(losses).reshape(1)])  # loss, flow, lb, grad norm

    def _clip(self, total_norm: torch.Tensor) -> None:
        """SimpleTuner's clipping: "value" clamps every gradient element to +-max_grad_norm, "norm" rescales the
        whole gradient to at most that norm; max_grad_norm 0 does neither."""
        if self.settings.max_grad_norm <= 0:
            return
        if self.settings.grad_clip_method == "value":
            torch.nn.utils.clip_grad_value_(self.params, self.settings.max_grad_norm)
        else:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.settings.max_grad_norm, total_norm)

    def _finish(self, loss: float, flow: float, lb: float, grad_norm: float, updated: bool) -> StepOutcome:
        """The step's outcome from its numbers; a skipped step is counted. (A NaN/inf loss or gradient would
        have poisoned the weights and the optimizer's moments: its update was skipped. The data, random streams
        and lr schedule still advanced, so the step count keeps its meaning.)"""
        if updated:
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
            self.nonfinite_steps += 1
        return StepOutcome(loss=loss, flow_loss=flow, load_balancing_loss=None if math.isnan(lb) else lb,
                           grad_norm=grad_norm, updated=updated)
