"""An fp8-scaled / int8-scaled frozen base on the tiny HiDream transformer (CPU, where torch 2.13 runs both 8-bit
matmuls): the LoKr wraps it in bypass mode with the fast Kronecker path, checkpointing and the sorted MoE dispatch
on top; a training step and a sampling step stay within the issue's accuracy bounds of the float32 model; streamed
blocks move the 8-bit bytes.

The reference on the CPU is float32 (bf16 itself differs from float32 by a grad cosine of ~0.9999 on this model),
so each bound holds against the most exact step there is."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import cfg_forward
from test_speedups import CONFIG as EXPERTS_TOO, _loss_and_grads, _set_factors
from trainer_core.adapters import LycorisConfig, create_lokr_network, is_mergeable, lokr_applied
from trainer_core.hidream import transformer_blocks
from trainer_core.quant import HIGH_PRECISION_MODULES, ScaledFp8Linear, ScaledInt8Linear, ScaledLinear, quantize_frozen
from trainer_core.speedups import BlockStreamer, apply_speedups

CLASSES = {"fp8-scaled": ScaledFp8Linear, "int8-scaled": ScaledInt8Linear}


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([grads[k].flatten().float() for k in sorted(grads)])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


def _side(transformer, precision, config=EXPERTS_TOO):
    transformer = copy.deepcopy(transformer)
    quantize_frozen(transformer, precision)
    network = create_lokr_network(transformer, config)
    _set_factors(network)
    report = apply_speedups(transformer, network)
    return transformer, network, report


@pytest.mark.parametrize("precision", ["fp8-scaled", "int8-scaled"])
def test_lokr_wraps_the_8bit_base_in_bypass_with_every_speedup(tiny_transformer, precision):
    float_network = create_lokr_network(copy.deepcopy(tiny_transformer), EXPERTS_TOO)
    transformer, network, report = _side(tiny_transformer, precision)
    layers = [m for m in transformer.modules() if isinstance(m, ScaledLinear)]
    assert len(layers) > 100 and all(type(m) is CLASSES[precision] for m in layers)
    kept = [n for n, m in transformer.named_modules() if type(m) is nn.Linear]
    assert kept and all(n.startswith(HIGH_PRECISION_MODULES) or n.startswith("p_embedder") for n in kept)
    # the same modules as on the float model, every one around an 8-bit layer, in bypass, on the fast path
    assert sorted(l.lora_name for l in network.loras) == sorted(l.lora_name for l in float_network.loras)
    assert all(isinstance(l.org_module[0], CLASSES[precision]) and l.bypass_mode for l in network.loras)
    assert report["fast_lokr_modules"] == len(network.loras) and report["sorted_moe_layers"] > 0
    assert not is_mergeable(network)
    with lokr_applied(network, 1.0) as how:
        assert how == "bypass"
    # a class-name preset on "Linear" (LyCORIS' own default) reaches the 8-bit layers too
    every_linear = create_lokr_network(copy.deepcopy(transformer), LycorisConfig(
        factor=4, apply_preset={"target_module": ["Linear"], "module_algo_map": {}}))
    assert {type(l.org_module[0]) for l in every_linear.loras} == {CLASSES[precision], nn.Linear}


@pytest.mark.parametrize("precision", ["fp8-scaled", "int8-scaled"])
def test_training_and_sampling_steps_stay_within_the_issue_bounds(tiny_transformer, precision):
    """Loss within 2 % and LoKr-gradient cosine >= 0.99 of the float32 step (checkpointed, LoKr on attention and
    every expert, the MoE dispatch sorted); CFG sampling velocity cosine >= 0.995, the LoKr unmerged."""
    reference, ref_network, _ = _side(tiny_transformer, "no_change")
    flow0, aux0, grads0 = _loss_and_grads(reference, ref_network, checkpointing=True)
    transformer, network, _ = _side(tiny_transformer, precision)
    flow, aux, grads = _loss_and_grads(transformer, network, checkpointing=True)
    assert set(grads) == set(grads0)
    assert abs(flow - flow0) <= 0.02 * abs(flow0)
    cosine = _cosine(_flat(grads), _flat(grads0))
    assert cosine >= 0.99, cosine
    assert any(g.abs().max() > 0 for n, g in grads.items() if "_ff_i_experts_" in n)
    assert flow != flow0  # the 8-bit matmuls really ran

    reference.eval()
    transformer.eval()
    with lokr_applied(ref_network, 1.0), lokr_applied(network, 1.0):
        velocity = _cosine(cfg_forward(transformer, seed=3)(), cfg_forward(reference, seed=3)())
    assert velocity >= 0.995, velocity


def test_streaming_an_fp8_base_moves_its_8bit_bytes(tiny_transformer):
    """offload_blocks with fp8-scaled: the same loss and gradients as the resident fp8 model, blocks in forward
    then reverse order, and half the bytes per block of a bf16 base (1 byte per weight instead of 2)."""
    resident, network0, _ = _side(tiny_transformer, "fp8-scaled", LycorisConfig(factor=4))
    flow0, aux0, grads0 = _loss_and_grads(resident, network0, checkpointing=True)
    streamed, network, _ = _side(tiny_transformer, "fp8-scaled", LycorisConfig(factor=4))
    streamer = BlockStreamer(streamed, torch.device("cpu"))
    flow, aux, grads = _loss_and_grads(streamed, network, checkpointing=True)
    assert flow == pytest.approx(flow0, rel=1e-6) and aux == pytest.approx(aux0, rel=1e-6)
    for name, g0 in grads0.items():
        torch.testing.assert_close(grads[name], g0, rtol=1e-5, atol=1e-8, msg=name)
    n = len(transformer_blocks(streamed))
    assert streamer.load_order == [*range(n), *reversed(range(n))]
    assert any(t.dtype == torch.float8_e4m3fn for t in streamer.packed[0].tensors)

    from trainer_core.speedups.block_offload import packed_bytes

    bf16_blocks = transformer_blocks(copy.deepcopy(tiny_transformer).to(torch.bfloat16))
    ratio = sum(p.host.numel() for p in streamer.packed) / sum(packed_bytes(b) for b in bf16_blocks)
    assert 0.45 < ratio < 0.56, ratio
