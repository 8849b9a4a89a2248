"""CUDA graphs per input signature: capture a function of tensors once, then replay it with new inputs copied into
its static buffers. The host then launches one graph instead of thousands of kernels.

    graphs = SignatureGraphs("train step", warmup=2)
    out = graphs.run(key, inputs, body, eager)

`body(static_inputs)` is the device work (no host read, no host-side state it must update each call: it runs once,
at capture); `eager()` runs the same work the ordinary way. The first `warmup` calls of a signature run `eager()`
(allocator, cuBLAS and compile warm-up); the next one captures (`torch.cuda.graph`, a private memory pool per
signature: graphs never share memory, so any order of replays is safe) and replays. The returned outputs are the
graph's static tensors: the caller copies what it keeps before the next replay. A signature whose capture fails
runs `eager()` from then on, and the log says why; on a CPU (or `enabled=False`) every call is `eager()`.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Sequence

import torch

from .device import release_memory

logger = logging.getLogger(__name__)


def cuda_graphs_unavailable(device: torch.device) -> Optional[str]:
    """None when CUDA graphs can be captured on `device`, else why not."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device (this run is on {device.type})"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


class CudaGraphBackend:
    """Capture with torch.cuda.graph; `replay` launches the recorded kernels (no Python runs)."""

    def capture(self, body: Callable[[list], object], static: list, device: torch.device):
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(device)
        with torch.cuda.graph(graph):
            outputs = body(static)
        torch.cuda.synchronize(device)
        return graph.replay, outputs

    def reserved(self, device: torch.device) -> int:
        return torch.cuda.memory_reserved(device)

    def release(self, device: torch.device) -> None:
        release_memory()
        torch.cuda.synchronize(device)


class SignatureGraphs:
    """One CUDA graph per input signature of one function (see the module docstring). `backend` captures and
    replays (CudaGraphBackend; the CPU tests pass one that replays by running the body again, which checks that the
    body depends on its static inputs and persistent state only)."""

    def __init__(self, name: str, warmup: int = 2, enabled: bool = True, backend=None):
        self.name, self.warmup, self.enabled = name, warmup, enabled
        self.backend = backend or CudaGraphBackend()
        self._graphs: dict = {}  # key -> (graph, static inputs, static outputs) or the reason it could not capture
        self._calls: dict = {}
        self.captures = 0
        self.replays = 0

    def failed(self, key) -> Optional[str]:
        entry = self._graphs.get(key)
        return entry if isinstance(entry, str) else None

    def refuse(self, key, why: str) -> None:
        """Run `key` eagerly from now on, saying why once."""
        if key not in self._graphs:
            logger.warning("%s: no CUDA graph for inputs %s: %s; it runs without one", self.name, key, why)
            self._graphs[key] = why

    def ready(self, key) -> bool:
        """True when the next `run` of `key` replays or captures (it has had its warm-up calls)."""
        entry = self._graphs.get(key)
        return self.enabled and not isinstance(entry, str) and (entry is not None or
                                                                 self._calls.get(key, 0) >= self.warmup)

    def run(self, key, inputs: Sequence[torch.Tensor], body: Callable[[list], object],
            eager: Callable[[], object]):
        """`body` replayed on `inputs` (captured first when due), or `eager()`; see the module docstring."""
        entry = self._graphs.get(key)
        if not self.enabled or isinstance(entry, str):
            return eager()
        if entry is None:
            self._calls[key] = self._calls.get(key, 0) + 1
            if self._calls[key] <= self.warmup:
                return eager()
            entry = self._capture(key, inputs, body)
            if entry is None:
                return eager()
        replay, static, outputs = entry
        for buffer, value in zip(static, inputs):
            buffer.copy_(value, non_blocking=True)
        replay()
        self.replays += 1
        return outputs

    def _capture(self, key, inputs: Sequence[torch.Tensor], body: Callable[[list], object]):
        started = time.perf_counter()
        device = inputs[0].device
        try:
            self.backend.release(device)  # the eager warm-up's cached blocks back: the graph's pool fits beside
            before = self.backend.reserved(device)
            static = [t.detach().clone() for t in inputs]
            replay, outputs = self.backend.capture(body, static, device)
        except Exception as exc:  # noqa: BLE001 - any capture failure: say why, run without a graph
            self.refuse(key, f"capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
            return None
        self.captures += 1
        pool_gib = (self.backend.reserved(device) - before) / 2**30
        logger.info("%s: captured a CUDA graph for inputs %s in %.1f s (its memory pool: %.2f GiB)", self.name,
                    key, time.perf_counter() - started, pool_gib)
        self._graphs[key] = (replay, static, outputs)
        return self._graphs[key]

    def clear(self) -> None:
        self._graphs.clear()
        self._calls.clear()
