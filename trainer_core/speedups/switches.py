"""Switch the training/sampling speed-ups on a HiDream transformer (and its LoKr network) on and off.

Each speed-up computes what the stock stack computes (tests/test_speedups.py holds them to the reference in
float32) and has a switch in `TrainConfig`:

    fast_lokr            LoKr through its Kronecker structure in one addmm        (kron_lokr.py)
    fast_moe_dispatch    MoE training dispatch sorted by expert, one host sync    (moe_dispatch.py)
    grouped_moe_dispatch MoE as grouped GEMMs over stacked frozen experts, static (moe_dispatch.py; where the
                         shapes, no host sync, training and eval                 experts are plain frozen Linears)
    lean_int8_backward   frozen quanto layers keep no activations for backward   (frozen_qlinear.py)
    lean_rope            rotary embedding whose backward is one inverse rotation (lean_rope.py)
    batched_lokr         fast_lokr without activation-sized copies: W1 as a batched GEMM fused with the
                         residual add (kron_lokr.py; off by default: not measured on a GPU yet)
    compile_blocks       torch.compile of every block as one graph, MoE included (compile_blocks.py; off by
                         (around an eager MoE where it keeps the sorted dispatch) default until a GPU run says
                                                                                  the compile time pays back)
    cuda_graphs          CUDA graph of each bucket's whole training step; read by the trainer's step
                         (training/graphed_step.py), not installed here
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

from torch import nn

from ..config.schema import TrainConfig
from .compile_blocks import compile_blocks, uncompile_blocks
from .frozen_qlinear import install_frozen_qlinear, uninstall_frozen_qlinear
from .kron_lokr import install_kron_lokr, uninstall_kron_lokr
from .lean_rope import install_lean_rope, uninstall_lean_rope
from .moe_dispatch import install_moe_dispatch, uninstall_sorted_moe

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
    grouped_moe_dispatch: bool = _DEFAULT["grouped_moe_dispatch"]
    cuda_graphs: bool = _DEFAULT["cuda_graphs"]

    @classmethod
    def from_config(cls, config) -> "Speedups":
        """Read the switches from a TrainConfig (or anything with those attributes; missing ones keep defaults)."""
        return cls(**{f.name: bool(getattr(config, f.name, f.default)) for f in fields(cls)})

    @classmethod
    def none(cls) -> "Speedups":
        return cls(**{f.name: False for f in fields(cls)})




def apply_speedups(transformer: nn.Module, network=None, config=None, compile_cache: Optional[Path] = None) -> dict:
    """Install the switched-on speed-ups in place; returns what was installed (for logs and the benchmark).

    Call after the LoKr network is created and hooked (`create_lokr_network` / `load_lokr`). Safe to call twice.
    `config` is a TrainConfig, a `Speedups`, or None (defaults). `compile_cache`: where compiled code is cached
    between runs (default: a TrainConfig's cache folder / torch-compile).
    """
    options = config if isinstance(config, Speedups) else Speedups.from_config(config)
    report = {}
    if options.lean_int8_backward:
        report["lean_int8_layers"] = install_frozen_qlinear(transformer, network)
    if options.fast_lokr and network is not None:
        report["fast_lokr_modules"], report["stock_lokr_modules"] = install_kron_lokr(network, options.batched_lokr)
        report["fast_lokr_form"] = "batched" if options.batched_lokr else "einsum"
    if options.fast_moe_dispatch:
        # Streamed (offload_blocks) or sharded (FSDP) weights are swapped under the module, which the stacked
        # experts would not follow: those runs keep the sorted dispatch.
        grouped = options.grouped_moe_dispatch and not getattr(config, "offload_blocks", False) and \
            not _fsdp_run(config)
        report.update(install_moe_dispatch(transformer, grouped=grouped))
    if options.lean_rope:
        report["lean_rope_layers"] = install_lean_rope(transformer)
    if options.compile_blocks:
        if compile_cache is None and isinstance(config, TrainConfig) and config.output_dir:
            compile_cache = config.resolved_cache_dir / "torch-compile"
        report.update(compile_blocks(transformer, compile_cache))
    logger.info("speed-ups: %s", report)
    return report


def _fsdp_run(config) -> bool:
    if getattr(config, "distributed_mode", "ddp") != "fsdp":
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def remove_speedups(transformer: nn.Module, network=None) -> None:
    """Undo `apply_speedups` (blocks back to eager, experts back to their own weights)."""
    uncompile_blocks(transformer)
    uninstall_sorted_moe(transformer)
    uninstall_lean_rope(transformer)
    if network is not None:
        uninstall_kron_lokr(network)
    uninstall_frozen_qlinear(transformer, network)
