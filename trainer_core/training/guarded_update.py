"""The optimizer update of a training step, skipped without a trace when the step's loss or gradient is not finite,
decided on the device where the optimizer allows it (no host read: the step can run ahead of the GPU, or be
captured in a CUDA graph).

    found_inf   torch Adam/AdamW with fused kernels: the flag goes in as `found_inf` (GradScaler's mechanism): the
                fused kernel leaves weights and moments alone and the step counters are put back, bit for bit.
    snapshot    optimizers whose whole per-step state is tensors on the weights' device (optimi's Lion; torch
                optimizers in capturable mode): weights and state are copied into buffers kept for the run, the
                update runs into the real tensors, and `torch.where(finite, updated, saved)` puts them back where
                the flag is false (exact: the saved values are restored, never recomputed).
    host        anything else (optimi's AdamW keeps its step counter on the host and reads it with .item();
                Prodigy and bitsandbytes keep Python-side state): the flag is read on the host first and the update
                runs or not, as before. `why` says which and why.

Before the optimizer has state (its first update), the flag is read on the host whatever the mode: a skipped first
step then leaves no state at all rather than a zero one (what it would otherwise leave is equivalent, but "no
trace" should mean no trace). That is one host read, on one step of the run.
The EMA follows the same flag (`AdapterEMA.update(keep=...)`: weight 0 where the step is skipped).
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)


def update_mode(optimizer: torch.optim.Optimizer) -> tuple[str, str]:
    """(mode, why): how `GuardedUpdate` can skip a non-finite step of `optimizer` (module docstring)."""
    name = f"{type(optimizer).__module__.split('.')[0]}.{type(optimizer).__name__}"
    groups = optimizer.param_groups
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        if all(g.get("fused") for g in groups):
            return "found_inf", f"{name} (fused): the fused kernel skips on found_inf"
        if all(g.get("capturable") for g in groups):
            return "snapshot", f"{name} (capturable): its state, step counters included, is on the device"
        return "host", f"{name} without fused or capturable kernels keeps its step counters on the host"
    if name == "optimi.Lion":
        return "snapshot", "optimi Lion: its state is one moment per weight, on the device"
    return "host", f"{name} keeps state on the host (step counters or Python numbers), so the skip is decided there"


class GuardedUpdate:
    """`step(finite)`: clip, optimizer step and EMA update, leaving weights, optimizer state and EMA untouched where
    the device flag `finite` (0-dim bool) is false. `on_device` says whether that needs no host read."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], ema=None):
        self.optimizer, self.params, self.ema = optimizer, list(params), ema
        self.mode, self.why = update_mode(optimizer)
        self._saved: dict = {}

    @property
    def on_device(self) -> bool:
        """True when this step's skip needs no host read (the optimizer has state, and its mode allows it)."""
        return self.mode != "host" and self._has_state()

    def _has_state(self) -> bool:
        return all(p in self.optimizer.state and self.optimizer.state[p] for p in self.params)

    @torch.no_grad()
    def step(self, finite: torch.Tensor, clip: Callable[[], None]) -> None:
        """Clip (`clip()`), update and EMA for a step known finite on the device only. Call when `on_device`."""
        clip()  # on a non-finite step the clipped gradients are garbage too; the update is undone below
        if self.mode == "found_inf":
            self.optimizer.found_inf = (~finite).to(torch.float32)
            try:
                self.optimizer.step()
            finally:
                self.optimizer.found_inf = None
        else:
            tensors = self._tensors()
            for key, tensor in tensors.items():
                saved = self._saved.get(key)
                if saved is None or saved.shape != tensor.shape or saved.dtype != tensor.dtype:
                    self._saved[key] = torch.empty_like(tensor)
            torch._foreach_copy_([self._saved[key] for key in tensors], list(tensors.values()))  # one launch
            self.optimizer.step()
            for key, tensor in self._tensors().items():
                torch.where(finite, tensor, self._saved[key], out=tensor)
        if self.ema is not None:
            self.ema.update(keep=finite)

    def _tensors(self) -> dict:
        """Every tensor an update writes: the weights and each weight's optimizer state."""
        out = {}
        for i, p in enumerate(self.params):
            out[(i, None)] = p.data
            for key, value in self.optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    out[(i, key)] = value
        return out

    @torch.no_grad()
    def step_on_host(self, finite: bool, clip: Callable[[], None]) -> None:
        """The same, with the flag already read on the host."""
        if not finite:
            return
        clip()
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
