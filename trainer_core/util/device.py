"""The device a run uses and what it has in use: one place for device choice, memory release and peak figures."""
from __future__ import annotations

import contextlib
import contextvars
import gc
import resource
from typing import Iterator, Optional

import torch

# The kind of accelerator torch's `meta` device stands for while a memory plan runs the code on it (plan/dry_run.py);
# None outside a plan.
_SIMULATED = contextvars.ContextVar("hidream_simulated_accelerator", default=None)


def resolve_device(name: Optional[str]) -> torch.device:
    """`name` ("cpu", "cuda", "cuda:1", ...), or CUDA when torch sees one, else the CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_kind(device) -> str:
    """The kind of device `device` computes as: its type ("cuda", "cpu", ...); the `meta` device while a memory
    plan runs the code on it (plan/) answers the kind of accelerator planned for, so code that chooses by device
    (pinned buffers, the grouped MoE GEMM) chooses what it would there."""
    kind = torch.device(device).type
    return (_SIMULATED.get() or kind) if kind == "meta" else kind


@contextlib.contextmanager
def simulating(kind: str) -> Iterator[None]:
    """Inside, `device_kind(meta)` is `kind` (the memory plan's dry run)."""
    token = _SIMULATED.set(kind)
    try:
        yield
    finally:
        _SIMULATED.reset(token)


_PLACEHOLDERS = contextvars.ContextVar("hidream_meta_placeholders", default=False)


@contextlib.contextmanager
def meta_placeholders() -> Iterator[None]:
    """Marks code that makes `meta` tensors as placeholders, replaced before use (a model's skeleton before its
    weights are read in, a layer whose buffers are assigned next): a memory plan, where meta stands for the GPU,
    does not count them."""
    token = _PLACEHOLDERS.set(True)
    try:
        yield
    finally:
        _PLACEHOLDERS.reset(token)


def making_placeholders() -> bool:
    return _PLACEHOLDERS.get()


def host_device(device) -> torch.device:
    """Where host-side buffers for tensors on `device` live: the CPU; during a memory plan, `meta` itself (the
    plan counts them as host memory), because torch cannot point a meta parameter's data at a CPU tensor and
    block_offload swaps its weights' data between the two."""
    device = torch.device(device)
    return device if device.type == "meta" and device_kind(device) != "meta" else torch.device("cpu")


def release_memory() -> None:
    """Collect garbage and hand cached CUDA blocks back, so what was freed is really free for what comes next."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    """Wait for `device` to finish its queued work (a no-op on the CPU, whose work is done when a call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the most memory allocated on `device` since the last reset; CPU: the process' peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def accelerator_peak_gib(device: torch.device) -> Optional[float]:
    """The accelerator's peak in GiB, None on a CPU (whose resident set also holds everything else the process
    ever loaded, so it measures no one configuration)."""
    return peak_memory_bytes(device) / 2**30 if device.type == "cuda" else None
