"""Exponential moving average of the adapter's trainable weights.

shadow <- decay * shadow + (1 - decay) * weight after every optimizer step. The average is saved as its own
adapter file (same keys as the trained one), which samplers load like any other.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn


class AdapterEMA:
    """EMA of every trainable parameter of `network` (float32 copies, on the parameters' devices)."""

    def __init__(self, network: nn.Module, decay: float = 0.995):
        self.decay = decay
        self.params = {name: p for name, p in network.named_parameters() if p.requires_grad}
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self, keep: Optional[torch.Tensor] = None) -> None:
        """One EMA step. `keep`: a 0-dim bool device tensor; where it is false the average stays exactly as it was
        (weight 0), so a skipped training step can be decided on the device without a host read."""
        if keep is None:
            for name, param in self.params.items():
                self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)
            return
        weight = keep.to(torch.float32) * (1.0 - self.decay)  # the float weight's value where keep is true
        for name, param in self.params.items():
            self.shadow[name].lerp_(param.detach().float(), weight.to(self.shadow[name].device))

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """Inside: the network's weights are the averages (to save or sample them); restored exactly after."""
        saved = {name: p.detach().clone() for name, p in self.params.items()}
        for name, param in self.params.items():
            param.copy_(self.shadow[name].to(param.dtype))
        try:
            yield
        finally:
            for name, param in self.params.items():
                param.copy_(saved[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().cpu().clone() for name, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} weights (first: {sorted(missing)[:3]})")
        for name, tensor in self.shadow.items():
            tensor.copy_(state[name])
