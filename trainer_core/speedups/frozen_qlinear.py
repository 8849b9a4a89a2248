"""Frozen optimum-quanto Linear layers whose backward keeps nothing but the int8 weight.

optimum-quanto 0.2.7's `WeightQBytesLinearFunction` saves the layer *input* for backward (to form a weight gradient
that a frozen base never needs) and, on CUDA with bf16 activations, dequantises the whole weight to a bf16
temporary in the forward and again in the backward. With the base frozen, only the input gradient
gO @ dequant(W) is needed, so here the forward saves just a reference to the quantised weight (already resident)
and the backward dequantises it again through quanto's own matmul: the activations a QLinear would pin are freed,
the maths is quanto's (same kernels, forward and backward).

Applies to `QLinear` modules whose weight is a frozen quanto tensor and does not require grad; anything else keeps
quanto's forward. A QLinear that LyCORIS already hooked keeps the LoKr's forward as its `forward`; the LoKr's
`org_forward` (its base-layer call) is pointed at the lean forward instead.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

_ORIGINAL = "_hidream_stock_qlinear_forward"


class FrozenQuantizedLinearFunction(torch.autograd.Function):
    """y = x W^T + b with W a frozen quanto weight; backward returns only dL/dx = gO W."""

    @staticmethod
    def forward(ctx, x, qweight, bias):
        ctx.qweight = qweight  # the int8 tensor the module already holds: no new memory
        with torch.no_grad():
            return F.linear(x, qweight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        return torch.matmul(grad_output, ctx.qweight), None, None


def is_frozen_qlinear(module: nn.Module) -> bool:
    if type(module).__name__ != "QLinear":
        return False
    weight = getattr(module, "qweight", None)
    if weight is None or type(weight) in (nn.Parameter, torch.Tensor):
        return False
    frozen = getattr(module, "frozen", True)
    return bool(frozen) and not module.weight.requires_grad and (module.bias is None or
                                                                  not module.bias.requires_grad)


def frozen_qlinear_forward(self, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return FrozenQuantizedLinearFunction.apply(x, self.qweight, self.bias)
    return getattr(self, _ORIGINAL)(x)


def install_frozen_qlinear(model: nn.Module, network=None) -> int:
    """Patch every frozen QLinear of `model`. LoKr modules of `network` wrapping one get it as their base forward."""
    patched = {}
    for module in model.modules():
        if _ORIGINAL in module.__dict__ or not is_frozen_qlinear(module):
            continue
        stock = type(module).forward.__get__(module)
        setattr(module, _ORIGINAL, stock)
        fast = types.MethodType(frozen_qlinear_forward, module)
        if "forward" not in module.__dict__:  # not hooked by LyCORIS: replace the forward itself
            module.forward = fast
        patched[id(module)] = fast
    for lora in getattr(network, "loras", []) if network is not None else []:
        base = lora.org_module[0]
        if id(base) in patched:
            lora.org_forward = patched[id(base)]
    return len(patched)


def uninstall_frozen_qlinear(model: nn.Module, network=None) -> None:
    for module in model.modules():
        stock = module.__dict__.pop(_ORIGINAL, None)
        if stock is None:
            continue
        current = module.__dict__.get("forward")
        if getattr(current, "__func__", None) is frozen_qlinear_forward:
            module.__dict__.pop("forward")
        for lora in getattr(network, "loras", []) if network is not None else []:
            if lora.org_module[0] is module:
                lora.org_forward = stock
