"""Training-mode MoE forward for diffusers' HiDream `MOEFeedForwardSwiGLU` that sorts tokens by expert.

diffusers' training path (0.42.1) repeats every token k times, then for each expert gathers and scatters its rows
with a boolean mask: `y[idx == e] = expert(x[idx == e])`. Every boolean index is a `nonzero`, i.e. a device->host
sync, twice per expert per layer in the forward and again in the backward (the profile of the naive 1024 px step
showed the GPU idle ~40% of the time). Here:

    order  = argsort(expert of each (token, slot))          (N*k,)  stable, on the device
    xs     = x[order // k]                                   (N*k, D) one gather, rows grouped by expert
    counts = bincount(expert, E).tolist()                    the one host sync per layer (slice sizes)
    ys     = cat(expert_e(xs[slice_e]) for e)                contiguous slices, no masks
    y      = (ys[inverse(order)].view(N, k, D) * topk_weight).sum(1)   diffusers' own weighting and sum

The expert modules are called as modules, so LoKr hooks on expert Linears and quantised experts keep working; the
gate is called as a module, so `LoadBalancingLoss`'s forward hooks still see its (idx, weight, aux_loss) output.
The final weighting and k-sum are diffusers' expression, in its order and dtype, so forward values and gradients
equal the stock path's (each expert sees the same rows; only the row grouping of its matmuls differs).
Inference (`eval()` or `force_inference_output`) keeps diffusers' own `moe_infer`.
"""
from __future__ import annotations

import types

import torch
from torch import nn

_ORIGINAL_FORWARD = "_hidream_stock_moe_forward"


def sorted_moe_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Drop-in `forward` for a `MOEFeedForwardSwiGLU` instance. x (B, S, D) -> (B, S, D)."""
    if not self.training or self._force_inference_output:
        return getattr(self, _ORIGINAL_FORWARD)(x)
    wtype = x.dtype
    identity = x
    orig_shape = x.shape
    topk_idx, topk_weight, _aux_loss = self.gate(x)  # (N, k) each; aux loss reaches hooks on the gate
    k = topk_idx.shape[-1]
    flat_x = x.reshape(-1, x.shape[-1])
    flat_idx = topk_idx.reshape(-1)
    order = torch.argsort(flat_idx, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    rows = flat_x.index_select(0, torch.div(order, k, rounding_mode="floor"))
    counts = torch.bincount(flat_idx, minlength=len(self.experts)).tolist()
    outputs = []
    start = 0
    for expert, count in zip(self.experts, counts):
        if count:
            outputs.append(expert(rows[start:start + count]).to(dtype=wtype))
        start += count
    y = torch.cat(outputs).index_select(0, inverse)  # back to (token, slot) order
    y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)
    y = y.view(*orig_shape).to(dtype=wtype)
    return y + self.shared_experts(identity)


def is_moe_feed_forward(module: nn.Module) -> bool:
    return type(module).__name__ == "MOEFeedForwardSwiGLU" and hasattr(module, "gate") and hasattr(module, "experts")


def install_sorted_moe(transformer: nn.Module) -> int:
    """Give every MoE feed-forward of `transformer` the sorted dispatch. Returns how many were patched."""
    patched = 0
    for module in transformer.modules():
        if is_moe_feed_forward(module) and _ORIGINAL_FORWARD not in module.__dict__:
            setattr(module, _ORIGINAL_FORWARD, module.forward)
            module.forward = types.MethodType(sorted_moe_forward, module)
            patched += 1
    return patched


def uninstall_sorted_moe(transformer: nn.Module) -> None:
    for module in transformer.modules():
        if _ORIGINAL_FORWARD in module.__dict__:
            module.__dict__.pop(_ORIGINAL_FORWARD)
            module.__dict__.pop("forward", None)
