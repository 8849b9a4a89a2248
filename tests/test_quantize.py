"""optimum-quanto base quantisation (`quantize_frozen`) on the CPU, in the dtype the quickstart trains in (bf16)."""
from __future__ import annotations

import torch
from torch import nn

from conftest import cfg_forward
from trainer_core.quant import INT8_INPUT_MULTIPLE, is_quantized, quantize_frozen


def test_int8_bf16_base_samples_on_cpu(tiny_transformer):
    """torch's bf16 x int8 CPU kernel segfaults on a batch of rows whose width is not a multiple of 16 (the tiny
    model's pooled embedding is 40 wide): such layers stay unquantised; every other Linear is int8."""
    transformer = tiny_transformer.to(torch.bfloat16).eval()
    forward = cfg_forward(transformer, seed=3, dtype=torch.bfloat16)  # as the sampler runs it: batch 2
    reference = forward().float()
    linears = {name: m.in_features for name, m in transformer.named_modules() if isinstance(m, nn.Linear)}
    odd = {name for name, width in linears.items() if width % INT8_INPUT_MULTIPLE}
    assert odd, "the tiny model no longer has an odd-width Linear: this test would not reach the crash"

    quantize_frozen(transformer, "int8-quanto")

    modules = dict(transformer.named_modules())
    assert all(not is_quantized(modules[name]) for name in odd)
    assert all(is_quantized(modules[name]) for name in linears.keys() - odd)
    out = forward().float()  # crashed the process before the exclusion
    assert torch.isfinite(out).all()
    assert ((out - reference).norm() / reference.norm()).item() < 0.1  # int8 stays close to the bf16 model
