"""The device a run uses and what it has in use: one place for device choice, memory release and peak figures."""
from __future__ import annotations

import gc
import resource
from typing import Optional

import torch


def resolve_device(name: Optional[str]) -> torch.device:
    """`name` ("cpu", "cuda", "cuda:1", ...), or CUDA when torch sees one, else the CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
