"""Quantised base weights with optimum-quanto (the frozen transformer only; the LoKr trains in full precision)."""
from __future__ import annotations

import logging

import torch
from torch import nn

from .config import ConfigError

logger = logging.getLogger(__name__)

QUANTO_PRECISIONS = ("int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto")


def quantize_frozen(model: nn.Module, precision: str) -> nn.Module:
    """Quantise every Linear weight of `model` in place and freeze it. 'no_change' / 'bf16' / 'fp32' do nothing.

    Base weights are frozen after quantisation (quanto leaves requires_grad on, which would make autograd compute
    full weight gradients for nothing). A LoKr created afterwards runs in LyCORIS' bypass mode on these layers.
    """
    if precision in ("no_change", "bf16", "fp32", None):
        return model
    if precision not in QUANTO_PRECISIONS:
        raise ConfigError(f"base_model_precision {precision!r} is not supported; use one of: no_change, "
                          f"{', '.join(QUANTO_PRECISIONS)}")
    from optimum.quanto import freeze, qfloat8, qint2, qint4, qint8, quantize

    weights = {"int8-quanto": qint8, "int4-quanto": qint4, "int2-quanto": qint2, "fp8-quanto": qfloat8}[precision]
    if precision == "int4-quanto":
        logger.warning("int4-quanto trains far slower than int8-quanto on GPUs (its matmul dequantises per call); "
                       "int8-quanto is the recommended low-memory setting")
    quantize(model, weights=weights)
    freeze(model)
    model.requires_grad_(False)
    return model


def is_quantized(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return weight is not None and type(weight) not in (nn.Parameter, torch.Tensor)
