"""`compile_blocks` (regional torch.compile of every transformer block, with checkpointing and the other speed-ups)
computes the eager training step: same loss, same LoKr gradients on the tiny transformer, float32 on the CPU."""
from __future__ import annotations

import copy

import pytest
import torch

from trainer_core.adapters import create_lokr_network
from trainer_core.hidream import transformer_blocks
from trainer_core.speedups import Speedups, apply_speedups

from test_speedups import CONFIG, _loss_and_grads, _set_factors


def test_compiled_blocks_compute_the_eager_step(tiny_transformer):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # process-wide: tests compiled before this one in the same worker count too
    results = []
    for compile_blocks in (False, True):
        transformer = copy.deepcopy(tiny_transformer)
        network = create_lokr_network(transformer, CONFIG)
        _set_factors(network)
        report = apply_speedups(transformer, network, Speedups(compile_blocks=compile_blocks))
        if compile_blocks:
            assert report["compiled_blocks"] == len(transformer_blocks(transformer)) > 0
        results.append(_loss_and_grads(transformer, network, checkpointing=True))
    # One graph per block kind and input signature, however many blocks and whatever the MoE routing: traced, the
    # routing's data-dependent shapes recompiled the blocks at every step.
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 0 < graphs <= 6, graphs
    (flow0, aux0, grads0), (flow, aux, grads) = results
    assert flow == pytest.approx(flow0, rel=1e-5) and aux == pytest.approx(aux0, rel=1e-5)
    assert set(grads) == set(grads0)
    for name, g0 in grads0.items():
        torch.testing.assert_close(grads[name], g0, rtol=1e-4, atol=1e-6, msg=name)
