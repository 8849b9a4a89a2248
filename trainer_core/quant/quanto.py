"""Quantised base weights with optimum-quanto (the frozen transformer only; the LoKr trains in full precision)."""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..config.schema import ConfigError
from .scaled import SCALED_PRECISIONS, ScaledLinear, quantize_scaled

logger = logging.getLogger(__name__)

QUANTO_PRECISIONS = ("int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto")


def quantize_frozen(model: nn.Module, precision: str) -> nn.Module:
    """Quantise every Linear weight of `model` in place and freeze it. 'no_change' / 'bf16' / 'fp32' do nothing;
    'fp8-scaled' / 'int8-scaled' go to scaled.quantize_scaled (8-bit matmuls), the rest to optimum-quanto.

    Base weights are frozen after quantisation (quanto leaves requires_grad on, which would make autograd compute
    full weight gradients for nothing). A LoKr created afterwards runs in LyCORIS' bypass mode on these layers.
    """
    if precision in ("no_change", "bf16", "fp32", None):
        return model
    if precision in SCALED_PRECISIONS:  # 8-bit weights *and* matmuls (scaled.py), not optimum-quanto
        quantize_scaled(model, precision)
        return model
    if precision not in QUANTO_PRECISIONS:
        raise ConfigError(f"base_model_precision {precision!r} is not supported; use one of: no_change, "
                          f"{', '.join(QUANTO_PRECISIONS + SCALED_PRECISIONS)}")
    from optimum.quanto import freeze, qfloat8, qint2, qint4, qint8, quantize

    weights = {"int8-quanto": qint8, "int4-quanto": qint4, "int2-quanto": qint2, "fp8-quanto": qfloat8}[precision]
    if precision == "int4-quanto":
        logger.warning("int4-quanto trains far slower than int8-quanto on GPUs (its matmul dequantises per call); "
                       "int8-quanto is the recommended low-memory setting")
    quantize(model, weights=weights, exclude=_int8_unsafe_linears(model) if precision == "int8-quanto" else None)
    freeze(model)
    model.requires_grad_(False)
    return model


# torch's CPU kernel for bf16 activations x int8 weights (`torch._weight_int8pack_mm`, which optimum-quanto 0.2.7 picks
# whenever in_features % 4 == 0) segfaults for more than one row when in_features is not a multiple of 16 (torch
# 2.13; found through validation sampling on the tiny test model, whose pooled width is 40). Every Linear of a real
# HiDream-I1 or its text encoders has a multiple of 16, so only narrow odd layers are affected, and those are tiny.
INT8_INPUT_MULTIPLE = 16


def _int8_unsafe_linears(model: nn.Module) -> list[str]:
    """Names of Linear layers that stay unquantised under int8 (see INT8_INPUT_MULTIPLE)."""
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and module.in_features % INT8_INPUT_MULTIPLE]
    if names:
        logger.info("int8-quanto: %d Linear layer(s) with an input width that is not a multiple of %d stay in %s "
                    "(torch's int8 CPU kernel cannot run them): %s", len(names), INT8_INPUT_MULTIPLE,
                    next(model.parameters()).dtype, ", ".join(names[:4]) + (" ..." if len(names) > 4 else ""))
    return names


def is_quantized(module: nn.Module) -> bool:
    if isinstance(module, ScaledLinear):
        return True
    weight = getattr(module, "weight", None)
    return weight is not None and type(weight) not in (nn.Parameter, torch.Tensor)
