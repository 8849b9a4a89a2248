"""torch.compile of every transformer block: whole blocks (MoE included) as one graph each, with no graph break.

    whole block   when the block's MoE runs the grouped dispatch (static shapes, no host read) or it has none:
                  `torch.compile(fullgraph=True, dynamic=False)`: attention, LoKr (fast path), RoPE, norms,
                  modulation, gate, routing and the grouped expert GEMMs in one graph; any graph break is an error
                  that `CompiledBlock` catches on the first call: the block kind then runs eagerly for that input
                  signature and the log (and `compile_stats()["failed"]`) says why.
    regional      when its MoE keeps the sorted dispatch (LoKr on the experts, a quantised base): that dispatch reads
                  the expert sizes on the host, so the MoE feed-forward runs eagerly and the rest of the block is
                  compiled around it (the earlier `compile_blocks` behaviour), reported as such.

Static shapes: each block kind compiles once per input signature (an aspect bucket, batch size, train/eval, grad
mode); with blocks sharing code (dynamo inlines nn.Modules, parameters are graph inputs) every block of a kind uses
the same graph, so a run compiles (kinds x buckets) graphs however deep the model. A new signature is logged as a
new bucket; a recompile on a signature already seen (a guard failed) is logged as a warning.

The compile cache (inductor's FX graph and kernel caches) lives in the run's cache folder (`configure_compile_
cache`), so a second run with the same model and buckets skips code generation and pays mostly the tracing.
Gradient checkpointing wraps compiled blocks from the outside (diffusers' checkpoint calls the block): the
recomputation runs the same graph, since nothing the graph guards on differs between a forward and its
recomputation (LoadBalancingLoss.attach_gradient).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..hidream.forward import transformer_blocks
from .moe_dispatch import _GROUPED, is_moe_feed_forward

logger = logging.getLogger(__name__)

_MARK = "_hidream_compiled_block"

# (block kind, input signature) -> why it could not be compiled whole; shared by all blocks of a kind.
_FAILED: dict = {}
_SEEN: set = set()
_STATS = {"calls": 0, "new_signatures": 0, "recompiles": 0, "compile_s": 0.0}


def configure_compile_cache(cache_dir: Optional[Path]) -> Optional[str]:
    """Point inductor's caches (FX graphs, generated kernels, Triton) at `cache_dir`, unless the environment
    already chose one (TORCHINDUCTOR_CACHE_DIR set by the user). Returns the folder in use."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if cache_dir is not None and (current is None or current == os.path.abspath(default_cache_dir())):
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_dir).resolve())
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    # AOT autograd's cache skips graphs with custom autograd Functions unless allowed; ours (the fast LoKr, the
    # lean RoPE, the attached LB gradient, the frozen int8 Linear) are pure and dynamo traces their forward and
    # backward into the graph the key is made of. Measured on the CPU small config: a second run's first
    # compiled step 14 s with it, 104 s without (cold: ~165-186 s). HIDREAM_AOT_CACHE_CUSTOM_FUNCTIONS=0 opts out.
    if os.environ.get("HIDREAM_AOT_CACHE_CUSTOM_FUNCTIONS", "1") != "0":
        functorch_config.autograd_cache_allow_custom_autograd_functions = True
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR")


def _signature(args, kwargs) -> tuple:
    def one(value):
        if isinstance(value, torch.Tensor):
            return tuple(value.shape), value.dtype, value.requires_grad
        return None if value is None else type(value).__name__
    return (tuple(one(a) for a in args), tuple(sorted((k, one(v)) for k, v in kwargs.items())),
            torch.is_grad_enabled())


def _shapes(signature: tuple) -> list:
    """The tensor shapes of a signature, for the log."""
    args, kwargs, _ = signature
    return [list(v[0]) for v in (*args, *(v for _, v in kwargs)) if isinstance(v, tuple)]


def _forced_eager() -> bool:
    """torch.compiler.set_stance("force_eager") is on (counting, the payback's eager steps): run the block eagerly
    and keep no bookkeeping for the call."""
    from torch._dynamo import eval_frame

    return getattr(getattr(eval_frame, "_stance", None), "stance", "default") == "force_eager"


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompiledBlock:
    """A block's `_compiled_call_impl`: the compiled call, falling back to the eager one (and saying why) for a
    (kind, signature) that cannot be compiled whole."""

    def __init__(self, block: nn.Module, kind: str, fullgraph: bool):
        self.kind, self.fullgraph = kind, fullgraph
        self.eager = block._call_impl
        # HIDREAM_COMPILE_BACKEND: another torch.compile backend (the CPU bench test uses aot_eager: dynamo's graph
        # and AOT autograd, whose graph breaks and host reads are what it checks, without inductor's code
        # generation, which the tiny-model tests cover).
        backend = os.environ.get("HIDREAM_COMPILE_BACKEND", "inductor")
        self.compiled = torch.compile(self.eager, fullgraph=fullgraph, dynamic=False, backend=backend)

    def __call__(self, *args, **kwargs):
        key = (self.kind, self.fullgraph, _signature(args, kwargs))
        if key in _FAILED or _forced_eager():
            return self.eager(*args, **kwargs)
        first = key not in _SEEN
        before = _graphs()
        started = time.perf_counter()
        try:
            out = self.compiled(*args, **kwargs)
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.BackendCompilerFailed) as exc:
            reason = str(exc).strip().splitlines()[0][:300]
            _FAILED[key] = reason
            logger.warning("block kind %s, inputs %s: could not be compiled as one graph (%s); it runs eagerly",
                           self.kind, _shapes(key[2]), reason)
            return self.eager(*args, **kwargs)
        _STATS["calls"] += 1
        new = _graphs() - before
        if new:
            _STATS["compile_s"] += time.perf_counter() - started
        if first:
            _SEEN.add(key)
            _STATS["new_signatures"] += 1
            if new:
                logger.info("compiled block kind %s for inputs %s (%d graph%s, %.1f s)", self.kind,
                            _shapes(key[2]), new, "" if new == 1 else "s", time.perf_counter() - started)
        elif new:
            _STATS["recompiles"] += new
            logger.warning("block kind %s recompiled on inputs it had seen (a guard failed: another model in the "
                           "same process, or a changed module; TORCH_LOGS=recompiles says which)", self.kind)
        return out


def _moe_is_static(block: nn.Module) -> bool:
    moes = [m for m in block.modules() if is_moe_feed_forward(m)]
    return all(_GROUPED in m.__dict__ for m in moes)


def _keep_moe_eager(block: nn.Module) -> None:
    for module in block.modules():
        if is_moe_feed_forward(module) and not getattr(module.forward, "_hidream_eager", False):
            eager = torch.compiler.disable(module.forward)
            eager._hidream_eager = True
            module.forward = eager


def _allow_one_graph_per_block(n_blocks: int) -> None:
    """Blocks share their code, so dynamo counts every specialisation as a recompilation of the same frame; past
    the limit (8 by default) it would silently run the remaining blocks eagerly."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 2 * n_blocks + 8))
            break


def compile_blocks(transformer: nn.Module, cache_dir: Optional[Path] = None) -> dict:
    """Compile every block of `transformer` (whole where its MoE is static, else around an eager MoE). Call after
    the other speed-ups are installed (the graphs trace what they install). Returns a report for logs/bench."""
    blocks = transformer_blocks(transformer)
    _allow_one_graph_per_block(len(blocks))
    report = {"compiled_blocks": 0, "whole_blocks": 0, "regional_blocks": 0,
              "compile_cache": configure_compile_cache(cache_dir)}
    for block in blocks:
        existing = getattr(block, "_compiled_call_impl", None)
        if isinstance(existing, CompiledBlock):
            whole = existing.fullgraph
        else:
            whole = _moe_is_static(block)
            if not whole:
                _keep_moe_eager(block)
            kind = type(getattr(block, "block", block)).__name__
            block._compiled_call_impl = CompiledBlock(block, kind, fullgraph=whole)
        report["compiled_blocks"] += 1
        report["whole_blocks" if whole else "regional_blocks"] += 1
    if report["regional_blocks"]:
        logger.info("compile_blocks: %d blocks compiled whole, %d around an eager MoE (its sorted dispatch reads "
                    "expert sizes on the host: LoKr on the experts or a quantised base)", report["whole_blocks"],
                    report["regional_blocks"])
    return report


def uncompile_blocks(transformer: nn.Module) -> None:
    """Back to eager blocks (and eager-marked MoE forwards back to what they wrapped)."""
    for block in transformer_blocks(transformer):
        if isinstance(getattr(block, "_compiled_call_impl", None), CompiledBlock):
            block._compiled_call_impl = None
        for module in block.modules():
            forward = module.__dict__.get("forward")
            if getattr(forward, "_hidream_eager", False):
                wrapped = getattr(forward, "__wrapped__", None)
                if wrapped is not None:
                    module.forward = wrapped
                else:
                    module.__dict__.pop("forward")


def compile_stats() -> dict:
    """Process-wide compile figures: graphs compiled, graph breaks (dynamo's count, fullgraph failures included),
    recompiles on seen inputs, block signatures that fell back to eager, and seconds spent compiling in calls."""
    from torch._dynamo.utils import counters

    return {"graphs": _graphs(), "graph_breaks": int(sum(counters["graph_break"].values())) + len(_FAILED),
            "recompiles": _STATS["recompiles"], "signatures": _STATS["new_signatures"],
            "failed": {f"{k[0]} {_shapes(k[2])}": why for k, why in _FAILED.items()},
            "compile_s": round(_STATS["compile_s"], 2)}


def reset_compile_state() -> None:
    """Forget compiled graphs and the bookkeeping above (tests, and the benchmark between configurations)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    _FAILED.clear()
    _SEEN.clear()
    _STATS.update(calls=0, new_signatures=0, recompiles=0, compile_s=0.0)


def force_eager() -> Callable:
    """A context manager running compiled code eagerly (the same maths): for dispatch-mode counters, which compiled
    code refuses."""
    return torch.compiler.set_stance("force_eager")
