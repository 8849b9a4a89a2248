"""Quantised base weights with optimum-quanto (the frozen transformer only; the LoKr trains in full precision)."""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from ..config.schema import ConfigError
from .scaled import SCALED_PRECISIONS, ScaledLinear, quantize_scaled

logger = logging.getLogger(__name__)

QUANTO_PRECISIONS = ("int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto")


def quantize_frozen(model: nn.Module, precision: str, device=None) -> nn.Module:
    """Quantise every Linear weight of `model` in place and freeze it. 'no_change' / 'bf16' / 'fp32' do nothing;
    'fp8-scaled' / 'int8-scaled' go to scaled.quantize_scaled (8-bit matmuls), the rest to optimum-quanto.

    With `device`, the model is brought to `device` as it is quantised, one block at a time (`blocks_of`), each
    block quantised there: the device never holds more than the quantised blocks and one unquantised block (a
    whole 16-bit HiDream-I1 is 32 GiB; quantising it on the device after moving it there needed all of that).

    Base weights are frozen after quantisation (quanto leaves requires_grad on, which would make autograd compute
    full weight gradients for nothing). A LoKr created afterwards runs in LyCORIS' bypass mode on these layers.
    """
    if precision in ("no_change", "bf16", "fp32", None):
        return model if device is None else model.to(device)
    if precision in SCALED_PRECISIONS:  # 8-bit weights *and* matmuls (scaled.py), not optimum-quanto
        quantize_scaled(model, precision, work_device=device)
        return model if device is None else model.to(device)
    if precision not in QUANTO_PRECISIONS:
        raise ConfigError(f"base_model_precision {precision!r} is not supported; use one of: no_change, "
                          f"{', '.join(QUANTO_PRECISIONS + SCALED_PRECISIONS)}")
    from optimum.quanto import freeze, qfloat8, qint2, qint4, qint8, quantize

    weights = {"int8-quanto": qint8, "int4-quanto": qint4, "int2-quanto": qint2, "fp8-quanto": qfloat8}[precision]
    if precision == "int4-quanto":
        logger.warning("int4-quanto trains far slower than int8-quanto on GPUs (its matmul dequantises per call); "
                       "int8-quanto is the recommended low-memory setting")
    exclude = _int8_unsafe_linears(model) if precision == "int8-quanto" else None
    if device is None:
        quantize(model, weights=weights, exclude=exclude)
        freeze(model)
        return model.requires_grad_(False)
    for name, block in blocks_of(model):
        quantize_block(model, name, block, precision, device, exclude)
    return model.to(device).requires_grad_(False)  # what is outside every block (top-level parameters)


def quantize_block(model: nn.Module, name: str, block: nn.Module, precision: str, device,
                   exclude: Optional[list[str]] = None) -> None:
    """Bring one block of `model` (`name`, `block` from blocks_of) to `device` and quantise it there as
    quantize_frozen quantises the whole model (`exclude`: its _int8_unsafe_linears, computed once)."""
    block.to(device)
    if precision in ("no_change", "bf16", "fp32", None):
        return
    if precision in SCALED_PRECISIONS:
        quantize_scaled(block, precision)
        return
    from optimum.quanto import freeze, qfloat8, qint2, qint4, qint8, quantize

    weights = {"int8-quanto": qint8, "int4-quanto": qint4, "int2-quanto": qint2, "fp8-quanto": qfloat8}[precision]
    # include/exclude are fnmatch patterns over the whole model's module names: this block's Linears only.
    quantize(model, weights=weights, include=[name, f"{name}.*"], exclude=exclude)
    freeze(block)
    block.requires_grad_(False)


def blocks_of(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """(name, module) of the pieces a model is moved and quantised in, in order: every item of the outermost
    ModuleLists (a transformer's blocks, an encoder's layers) and every other child that holds no ModuleList."""
    found = []
    for name, child in model.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, nn.ModuleList):
            found += [(f"{path}.{index}", item) for index, item in enumerate(child)]
        elif _holds_list(child):
            found += blocks_of(child, f"{path}.")
        else:
            found.append((path, child))
    return found


def _holds_list(module: nn.Module) -> bool:
    return any(isinstance(m, nn.ModuleList) for m in module.modules())


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
