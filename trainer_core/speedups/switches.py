"""Switch the training/sampling speed-ups on a HiDream transformer (and its LoKr network) on and off.

Each speed-up computes what the stock stack computes (tests/test_speedups.py holds them to the reference in
float32) and has a switch in `TrainConfig`:

    fast_lokr            LoKr through its Kronecker structure in one addmm        (kron_lokr.py)
    fast_moe_dispatch    MoE training dispatch sorted by expert, one host sync    (moe_dispatch.py)
    lean_int8_backward   frozen quanto layers keep no activations for backward   (frozen_qlinear.py)
    lean_rope            rotary embedding whose backward is one inverse rotation (lean_rope.py)
    batched_lokr         fast_lokr without activation-sized copies: W1 as a batched GEMM fused with the
                         residual add (kron_lokr.py; off by default: not measured on a GPU yet)
    compile_blocks       regional torch.compile of every transformer block       (off by default: a minute or
                                                                                  more of compile time and 3 GiB
                                                                                  more peak at 1024 px)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields

from torch import nn

from ..config.schema import TrainConfig
from ..hidream.forward import transformer_blocks
from .frozen_qlinear import install_frozen_qlinear, uninstall_frozen_qlinear
from .kron_lokr import install_kron_lokr, uninstall_kron_lokr
from .lean_rope import install_lean_rope, uninstall_lean_rope
from .moe_dispatch import install_sorted_moe, is_moe_feed_forward, uninstall_sorted_moe

logger = logging.getLogger(__name__)


# The switches' defaults are TrainConfig's (its fields are the one source of truth for every setting).
_DEFAULT = {f.name: f.default for f in fields(TrainConfig)}


@dataclass(frozen=True)
class Speedups:
    fast_lokr: bool = _DEFAULT["fast_lokr"]
    fast_moe_dispatch: bool = _DEFAULT["fast_moe_dispatch"]
    lean_int8_backward: bool = _DEFAULT["lean_int8_backward"]
    compile_blocks: bool = _DEFAULT["compile_blocks"]
    lean_rope: bool = _DEFAULT["lean_rope"]
    batched_lokr: bool = _DEFAULT["batched_lokr"]

    @classmethod
    def from_config(cls, config) -> "Speedups":
        """Read the switches from a TrainConfig (or anything with those attributes; missing ones keep defaults)."""
        return cls(**{f.name: bool(getattr(config, f.name, f.default)) for f in fields(cls)})

    @classmethod
    def none(cls) -> "Speedups":
        return cls(**{f.name: False for f in fields(cls)})




def apply_speedups(transformer: nn.Module, network=None, config=None) -> dict:
    """Install the switched-on speed-ups in place; returns what was installed (for logs and the benchmark).

    Call after the LoKr network is created and hooked (`create_lokr_network` / `load_lokr`). Safe to call twice.
    `config` is a TrainConfig, a `Speedups`, or None (defaults).
    """
    options = config if isinstance(config, Speedups) else Speedups.from_config(config)
    report = {}
    if options.lean_int8_backward:
        report["lean_int8_layers"] = install_frozen_qlinear(transformer, network)
    if options.fast_lokr and network is not None:
        report["fast_lokr_modules"], report["stock_lokr_modules"] = install_kron_lokr(network, options.batched_lokr)
        report["fast_lokr_form"] = "batched" if options.batched_lokr else "einsum"
    if options.fast_moe_dispatch:
        report["sorted_moe_layers"] = install_sorted_moe(transformer)
    if options.lean_rope:
        report["lean_rope_layers"] = install_lean_rope(transformer)
    if options.compile_blocks:
        blocks = transformer_blocks(transformer)
        _allow_one_graph_per_block(len(blocks))
        _keep_moe_eager(transformer)
        for block in blocks:
            if not getattr(block, "_compiled_call_impl", None):
                block.compile(dynamic=False)  # the recomputation must pick the forward's graph
        report["compiled_blocks"] = len(blocks)
    logger.info("speed-ups: %s", report)
    return report


def _keep_moe_eager(transformer: nn.Module) -> None:
    """MoE dispatch has data-dependent shapes (how many tokens each expert gets): traced, dynamo would specialise on
    every routing it sees and recompile all through training. The feed-forward runs eagerly; the rest of each block
    (attention, LoKr, norms, RoPE, modulation) is compiled."""
    import torch

    for module in transformer.modules():
        if is_moe_feed_forward(module) and not getattr(module.forward, "_hidream_eager", False):
            eager = torch.compiler.disable(module.forward)
            eager._hidream_eager = True
            module.forward = eager


def _allow_one_graph_per_block(n_blocks: int) -> None:
    """Blocks share their code, so dynamo counts each block instance it specialises on as a recompilation of the
    same frame; past the limit (8 by default) it would silently run the remaining blocks eagerly."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 2 * n_blocks + 8))
            break


def remove_speedups(transformer: nn.Module, network=None) -> None:
    """Undo `apply_speedups` (compiled blocks stay compiled; they compute the same thing)."""
    uninstall_sorted_moe(transformer)
    uninstall_lean_rope(transformer)
    if network is not None:
        uninstall_kron_lokr(network)
    uninstall_frozen_qlinear(transformer, network)
