"""MoE forwards for diffusers' HiDream `MOEFeedForwardSwiGLU`: sorted by expert (one host sync per layer), or
grouped (static shapes, no host sync: what a compiled block or a CUDA graph can hold).

Sorted dispatch (training mode only):

diffusers' training path (0.42.1) repeats every token k times, then for each expert gathers and scatters its rows
with a boolean mask: `y[idx == e] = expert(x[idx == e])`. Every boolean index is a `nonzero`, i.e. a device->host
sync, twice per expert per layer in the forward and again in the backward (the profile of the naive 1024 px step
showed the GPU idle ~40% of the time). Here:

    order  = argsort(expert of each (token, slot))          (N*k,)  stable, on the device
    xs     = x[order // k]                                   (N*k, D) one gather, rows grouped by expert
    counts = bincount(expert, E).tolist()                    the one host sync per layer (slice sizes)
    ys     = cat(expert_e(xs[slice_e]) for e)                contiguous slices, no masks; an expert with no rows
                                                             runs on a dropped zero row (a zero LoKr gradient)
    y      = (ys[inverse(order)].view(N, k, D) * topk_weight).sum(1)   diffusers' own weighting and sum

The expert modules are called as modules, so LoKr hooks on expert Linears and quantised experts keep working; the
gate is called as a module, so `LoadBalancingLoss`'s forward hooks still see its (idx, weight, aux_loss) output.
The final weighting and k-sum are diffusers' expression, in its order and dtype, so forward values and gradients
equal the stock path's (each expert sees the same rows; only the row grouping of its matmuls differs).
Inference (`eval()` or `force_inference_output`) keeps diffusers' own `moe_infer`.

Grouped dispatch (`grouped_moe_forward`, training and eval), for layers whose routed experts are plain frozen float
Linears (no LoKr/LyCORIS hook, not quantised, no bias; anything else keeps the sorted dispatch, and
`install_moe_dispatch` reports which and why):

    at set-up: the experts' weights are stacked once, W13 (E, 2H, D) = [w1; w3] and W2 (E, D, H), and every
               expert Linear's weight becomes a view into the stack (no second copy; never copied per step)
    sorted, order = sort(expert of each (token, slot))      (N*k,)  stable, on the device
    ends   = searchsorted(sorted, [0..E-1], right=True)     (E,)    int32 group ends, on the device (no .tolist())
    rows   = x[order // k]                                  (N*k, D)
    h      = grouped_mm(rows, W13^T, ends)                  one grouped GEMM for w1 and w3 of every expert
    ys     = grouped_mm(silu(h1) * h3, W2^T, ends)          one for w2
    y      = (ys[inverse(order)].view(N, k, D) * topk_weight).sum(1)    diffusers' weighting, order and dtype

Every shape is fixed by the input's (N*k rows whatever the routing), so the layer traces into one graph with no
host read. The gate is replaced by the same maths without `one_hot` (whose CPU kernel reads the indices' range on
the host): the load-balancing loss is computed from the same device tensors, with its gradient. Equal to
diffusers' MoE in float32, outputs and gradients (tests/test_moe_dispatch.py).
"""
from __future__ import annotations

import logging
import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..util.device import device_kind
from .checked import mismatch

logger = logging.getLogger(__name__)

_ORIGINAL_FORWARD = "_hidream_stock_moe_forward"
_ORIGINAL_GATE = "_hidream_stock_gate_forward"
_GROUPED = "_hidream_grouped_experts"  # the (w1, w2, w3) Linears per expert that the stacks stand for


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
        else:
            # An expert no token went to still runs, on one row of zeros whose output is dropped: a LoKr on it
            # gets a zero gradient instead of none, as in diffusers' loop. Under DDP every rank must produce a
            # gradient for every LoKr parameter (the reducer all-reduces them bucket by bucket), also a rank whose
            # batch routed nothing to this expert. (Not an empty slice: LyCORIS' own bypass cannot reshape one.)
            outputs.append(expert(rows.new_zeros(1, rows.shape[-1]))[:0].to(dtype=wtype))
        start += count
    y = torch.cat(outputs).index_select(0, inverse)  # back to (token, slot) order
    y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)
    y = y.view(*orig_shape).to(dtype=wtype)
    return y + self.shared_experts(identity)


def is_moe_feed_forward(module: nn.Module) -> bool:
    return type(module).__name__ == "MOEFeedForwardSwiGLU" and hasattr(module, "gate") and hasattr(module, "experts")


def unchecked_moe(module: nn.Module) -> Optional[str]:
    """None when `module`'s diffusers code (its forward and its gate's) is what the dispatches were checked
    against (checked.py), else why the stock forward must stay."""
    return mismatch("fast_moe_dispatch", {"MOEFeedForwardSwiGLU.forward": type(module).forward,
                                          "MoEGate.forward": type(module.gate).forward})


def install_sorted_moe(transformer: nn.Module) -> int:
    """Give every MoE feed-forward of `transformer` the sorted dispatch. Returns how many were patched."""
    patched = 0
    for module in transformer.modules():
        if is_moe_feed_forward(module) and _ORIGINAL_FORWARD not in module.__dict__ and not unchecked_moe(module):
            setattr(module, _ORIGINAL_FORWARD, module.forward)
            module.forward = types.MethodType(sorted_moe_forward, module)
            patched += 1
    return patched


def uninstall_sorted_moe(transformer: nn.Module) -> None:
    """Undo `install_sorted_moe` / `install_moe_dispatch`: diffusers' forwards, and each expert its own weight."""
    for module in transformer.modules():
        if _ORIGINAL_FORWARD in module.__dict__:
            module.__dict__.pop(_ORIGINAL_FORWARD)
            module.__dict__.pop("forward", None)
            if _GROUPED in module.__dict__:
                _unstack_experts(module)
        if _ORIGINAL_GATE in module.__dict__:
            module.__dict__.pop(_ORIGINAL_GATE)
            module.__dict__.pop("forward", None)


# --------------------------------------------------------------------------------------------- grouped dispatch

@torch.library.custom_op("hidream_lokr::grouped_linear", mutates_args=())
def grouped_linear(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows of x (M, K), grouped by expert (group e = rows ends[e-1]:ends[e], int32 on the device), times
    weight[e]^T, weight (E, N, K) in nn.Linear's layout -> (M, N). Rows past ends[-1] are left undefined.

    An opaque op to torch.compile (its maths is aten's `_grouped_mm`, one kernel on a GPU): traced, aten's own op
    only admits bf16, and the tests hold the dispatch to diffusers in float32 compiled too."""
    return F.grouped_mm(x, weight.transpose(-2, -1), offs=ends)


@grouped_linear.register_fake
def _grouped_linear_fake(x, weight, ends):
    return x.new_empty(x.shape[0], weight.shape[-2])


def _grouped_linear_setup(ctx, inputs, output):
    _, weight, ends = inputs
    ctx.save_for_backward(weight, ends)  # the frozen stack itself: no new memory


def _grouped_linear_backward(ctx, grad):
    weight, ends = ctx.saved_tensors
    # dL/dx = grad (M, N) @ weight[e] (N, K), the same op on weight^T; the frozen weight gets no gradient.
    return grouped_linear(grad.contiguous(), weight.transpose(-2, -1), ends), None, None


grouped_linear.register_autograd(_grouped_linear_backward, setup_context=_grouped_linear_setup)


def _grouped_linear_flops(x_shape, weight_shape, ends_shape, *args, out_shape=None, **kwargs) -> int:
    """Multiply-adds x 2 of the rows' GEMMs: each of the M rows meets one expert's (N, K) weight."""
    return 2 * x_shape[0] * x_shape[1] * weight_shape[-2]


def _register_flops() -> None:
    # torch's FlopCounterMode counts only ops it has a formula for; without one the benchmark's FLOPs (and
    # TFLOP/s) would leave out every routed-expert GEMM.
    from torch.utils.flop_counter import register_flop_formula

    register_flop_formula(torch.ops.hidream_lokr.grouped_linear)(_grouped_linear_flops)


_register_flops()

_GROUPED_MM_WORKS: dict = {}


def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None when aten's grouped GEMM runs on (device, dtype) (CUDA: bf16 on SM >= 8.0; CPU: any float), else why
    not. Tried once per (device, dtype) on a tiny problem with an empty group."""
    if device.type == "meta" and device_kind(device) == "cuda":  # a memory plan's stand-in for a GPU (plan/)
        return None if dtype == torch.bfloat16 else f"grouped GEMM on CUDA takes bf16, not {dtype}"
    key = (device.type, dtype)
    if key not in _GROUPED_MM_WORKS:
        try:
            x = torch.randn(24, 16, device=device, dtype=dtype)
            w = torch.randn(3, 8, 16, device=device, dtype=dtype)
            ends = torch.tensor([8, 8, 24], device=device, dtype=torch.int32)
            y = F.grouped_mm(x, w.transpose(-2, -1), offs=ends)
            ok = torch.allclose(y[8:].float(), (x[8:] @ w[2].t()).float(), rtol=2e-2, atol=2e-2)
            _GROUPED_MM_WORKS[key] = None if ok else "grouped GEMM gave wrong values"
        except Exception as exc:  # noqa: BLE001 - unsupported device/dtype/architecture: say so, keep sorted
            _GROUPED_MM_WORKS[key] = f"grouped GEMM unavailable on {device.type} {dtype}: {type(exc).__name__}: " \
                                     f"{str(exc).splitlines()[0][:120]}"
    return _GROUPED_MM_WORKS[key]


def _plain_frozen_linear(linear: nn.Module) -> Optional[str]:
    """None when `linear` is an nn.Linear the grouped GEMM can stand in for, else why not."""
    if type(linear) is not nn.Linear:
        return f"{type(linear).__name__} (quantised or otherwise special)"
    if "forward" in linear.__dict__ or linear._forward_hooks or linear._forward_pre_hooks:
        return "hooked (LoKr/LyCORIS or another adapter)"
    if linear.bias is not None or linear.weight.requires_grad:
        return "has a bias or a trainable weight"
    if not linear.weight.dtype.is_floating_point:
        return f"weight is {linear.weight.dtype}"
    if linear.weight.is_meta and device_kind(linear.weight.device) == "meta":  # no data yet; in a memory plan
        return "weight is on the meta device"  # (plan/) meta stands for a GPU, and stacks like one
    return None


def grouped_support(moe: nn.Module) -> Optional[str]:
    """None when the grouped dispatch computes `moe` exactly, else why it keeps the sorted dispatch."""
    gate = moe.gate
    if getattr(gate, "scoring_func", "softmax") != "softmax" or getattr(gate, "seq_aux", False):
        return "gate is not the softmax, whole-batch-aux MoEGate"
    if getattr(moe, "_force_inference_output", False):
        return "force_inference_output"
    linears = [getattr(expert, name) for expert in moe.experts for name in ("w1", "w2", "w3")]
    for linear in linears:
        why = _plain_frozen_linear(linear)
        if why:
            return f"routed expert Linear {why}"
    first = linears[0].weight
    if any(l.weight.dtype != first.dtype or l.weight.device != first.device for l in linears):
        return "experts differ in dtype or device"
    return grouped_mm_works(first.device, first.dtype)


def _stack_experts(moe: nn.Module) -> None:
    """W13 (E, 2H, D) and W2 (E, D, H) as non-persistent buffers; every expert weight becomes a view into them, so
    the model holds each weight once, exactly as before (state_dict keys and values unchanged)."""
    experts = list(moe.experts)
    w1 = experts[0].w1.weight
    hidden, dim = w1.shape
    w13 = torch.empty(len(experts), 2 * hidden, dim, dtype=w1.dtype, device=w1.device)
    w2 = torch.empty(len(experts), dim, hidden, dtype=w1.dtype, device=w1.device)
    for e, expert in enumerate(experts):
        with torch.no_grad():
            w13[e, :hidden].copy_(expert.w1.weight)
            w13[e, hidden:].copy_(expert.w3.weight)
            w2[e].copy_(expert.w2.weight)
        # One expert's old weights are freed as soon as its views are in: the peak is the stack plus one expert.
        expert.w1.weight = nn.Parameter(w13[e, :hidden], requires_grad=False)
        expert.w3.weight = nn.Parameter(w13[e, hidden:], requires_grad=False)
        expert.w2.weight = nn.Parameter(w2[e], requires_grad=False)
    moe.register_buffer("_grouped_w13", w13, persistent=False)
    moe.register_buffer("_grouped_w2", w2, persistent=False)
    moe.register_buffer("_grouped_expert_ids", torch.arange(len(experts), device=w1.device), persistent=False)
    moe.__dict__[_GROUPED] = [(expert.w1, expert.w2, expert.w3) for expert in experts]


def _unstack_experts(moe: nn.Module) -> None:
    """Give every expert its own weight again (one expert at a time) and drop the stacks."""
    for linears in moe.__dict__.pop(_GROUPED, []):
        for linear in linears:
            linear.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
    for name in ("_grouped_w13", "_grouped_w2", "_grouped_expert_ids"):
        moe._buffers.pop(name, None)
        moe._non_persistent_buffers_set.discard(name)


def stacks_intact(moe: nn.Module) -> bool:
    """True while every expert weight is still a view into the stacks (a `.to()` or an in-place weight swap after
    set-up would silently leave the stacks stale)."""
    linears = moe.__dict__.get(_GROUPED)
    if not linears:
        return False
    hidden = moe._grouped_w2.shape[-1]
    for e, (w1, w2, w3) in enumerate(linears):
        for linear, stacked in ((w1, moe._grouped_w13[e, :hidden]), (w3, moe._grouped_w13[e, hidden:]),
                                (w2, moe._grouped_w2[e])):
            if linear.weight.data_ptr() != stacked.data_ptr() or "forward" in linear.__dict__:
                return False
    return True


def sync_free_gate_forward(self, hidden_states: torch.Tensor):
    """diffusers' `MoEGate.forward` (softmax scores, top-k, aux loss alpha * sum_e P_e * f_e in training) with the
    expert counts taken as a comparison with [0..E-1] instead of `one_hot`: the same 0/1 matrix and mean, so the
    same values and gradient, without one_hot's host-side range check. Returns (topk_idx, topk_weight, aux|None)."""
    bsz, seq_len, h = hidden_states.shape
    hidden_states = hidden_states.view(-1, h)
    scores = F.linear(hidden_states, self.weight, None).softmax(dim=-1)
    topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
    if self.top_k > 1 and self.norm_topk_prob:
        topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
    aux_loss = None
    if self.training and self.alpha > 0.0 and not self._force_inference_output:
        experts = torch.arange(self.n_routed_experts, device=topk_idx.device)
        mask_ce = topk_idx.view(-1, 1) == experts  # (N*k, E): one_hot(topk_idx) as booleans
        ce = mask_ce.float().mean(0)
        aux_loss = (scores.mean(0) * (ce * self.n_routed_experts)).sum() * self.alpha
    return topk_idx, topk_weight, aux_loss


def grouped_moe_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Drop-in `forward` for a `MOEFeedForwardSwiGLU` whose experts were stacked. x (B, S, D) -> (B, S, D)."""
    if not torch.compiler.is_compiling() and not all(
            "forward" not in linear.__dict__ for linears in self.__dict__[_GROUPED] for linear in linears):
        # An adapter hooked an expert after set-up: the stacks would bypass it. Eager-only check (free).
        raise RuntimeError("an expert Linear of a grouped MoE layer was hooked after apply_speedups; call "
                           "remove_speedups first, or apply the speed-ups after creating the adapter")
    wtype = x.dtype
    orig_shape = x.shape
    topk_idx, topk_weight, _aux_loss = self.gate(x)  # (N, k); the aux loss reaches hooks on the gate
    k = topk_idx.shape[-1]
    flat_x = x.reshape(-1, x.shape[-1])
    flat_idx = topk_idx.reshape(-1)
    sorted_idx, order = torch.sort(flat_idx, stable=True)
    ends = torch.searchsorted(sorted_idx, self._grouped_expert_ids, right=True, out_int32=True)
    rows = flat_x.index_select(0, torch.div(order, k, rounding_mode="floor"))
    gate_up = grouped_linear(rows, self._grouped_w13, ends)  # (N*k, 2H): [w1 x, w3 x] per row's expert
    hidden = self._grouped_w2.shape[-1]
    acted = F.silu(gate_up[:, :hidden]) * gate_up[:, hidden:]
    out = grouped_linear(acted, self._grouped_w2, ends).to(dtype=wtype)  # (N*k, D), expert-sorted
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    y = out.index_select(0, inverse)  # back to (token, slot) order
    y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)
    y = y.view(*orig_shape).to(dtype=wtype)
    return y + self.shared_experts(x)


def install_moe_dispatch(transformer: nn.Module, grouped: bool = True) -> dict:
    """Give every MoE feed-forward of `transformer` the grouped dispatch where it applies (`grouped`), else the
    sorted one. Returns {"grouped_moe_layers": n, "sorted_moe_layers": n, "sorted_moe_why": {reason: n}}, and
    "moe_dispatch_off" with the reason when the installed diffusers' MoE is not the code they were checked
    against (none installed then)."""
    report = {"grouped_moe_layers": 0, "sorted_moe_layers": 0, "sorted_moe_why": {}}
    for module in transformer.modules():
        if not is_moe_feed_forward(module):
            continue
        if _ORIGINAL_FORWARD in module.__dict__:  # installed before
            key = "grouped_moe_layers" if _GROUPED in module.__dict__ else "sorted_moe_layers"
            report[key] += 1
            continue
        off = unchecked_moe(module)
        if off:  # this diffusers' MoE is not the one the dispatches compute: its own forward stays
            report["moe_dispatch_off"] = off
            continue
        why = grouped_support(module) if grouped else "grouped dispatch switched off"
        setattr(module, _ORIGINAL_FORWARD, module.forward)
        if why is None:
            _stack_experts(module)
            setattr(module.gate, _ORIGINAL_GATE, module.gate.forward)
            module.gate.forward = types.MethodType(sync_free_gate_forward, module.gate)
            module.forward = types.MethodType(grouped_moe_forward, module)
            report["grouped_moe_layers"] += 1
        else:
            module.forward = types.MethodType(sorted_moe_forward, module)
            report["sorted_moe_layers"] += 1
            report["sorted_moe_why"][why] = report["sorted_moe_why"].get(why, 0) + 1
    if report["sorted_moe_why"] and grouped:
        logger.info("MoE dispatch: %d layers grouped, %d sorted (%s)", report["grouped_moe_layers"],
                    report["sorted_moe_layers"], "; ".join(f"{n}: {why}" for why, n in report["sorted_moe_why"].items()))
    return report


def ungroup_moe_dispatch(module: nn.Module) -> int:
    """Put every grouped MoE layer under `module` back on the sorted dispatch (experts with their own weights
    again, diffusers' gate). For code that moves or swaps weights under the module (block streaming), which the
    stacks would not follow. Returns how many layers it changed."""
    changed = 0
    for moe in module.modules():
        if _GROUPED in moe.__dict__:
            _unstack_experts(moe)
            moe.gate.__dict__.pop(_ORIGINAL_GATE, None)
            moe.gate.__dict__.pop("forward", None)
            moe.forward = types.MethodType(sorted_moe_forward, moe)
            changed += 1
    return changed
