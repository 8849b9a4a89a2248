"""Where a step's time goes (a torch.profiler run of a few steps, summarised by kind of work) and how many kernels
it launches (`KernelCounter`, exact on any device).

`bench --profile FILE` calls `profile_steps` on each mode's project configuration. The summary (in the JSON row)
says how long the device was busy against the wall time and splits device time into matmul, attention,
elementwise, normalisation, reduction, MoE indexing/sorting and copies; the file gets torch's own table of the top
operations, for the reader who wants the kernel names. On a CPU, where there are no device kernels, the same split
is made of the operators' own CPU time.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Kernel/operator name fragments (lower case) -> kind of work; first match wins, so the order matters (a fused
# "gemm + elementwise epilogue" kernel is a matmul).
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("matmul", ("gemm", "xmma", "nvjet", "cutlass", "cublas", "aten::mm", "aten::addmm", "aten::bmm",
                "aten::_weight_int8pack_mm", "aten::linear", "matmul")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("norm", ("layer_norm", "layernorm", "rms_norm", "rmsnorm")),
    ("moe_index_sort", ("sort", "radix", "index", "scatter", "gather", "nonzero", "topk", "masked")),
    ("reduction", ("reduce", "sum", "mean", "norm")),
    ("copy", ("memcpy", "memset", "copy", "cat", "to_copy", "contiguous", "clone")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "aten::mul", "aten::add", "aten::silu", "aten::sub",
                     "aten::div", "foreach", "aten::exp", "aten::neg", "aten::where", "triton")),
)
# CUDA runtime calls that make the host wait for the device (each one drains the launch queue).
HOST_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


class KernelCounter(TorchDispatchMode):
    """Counts the aten operators dispatched below autograd that do work (views and no-ops excluded): on any device,
    the number of kernels the same code launches on a GPU, give or take fused library calls. A host-bound GPU step
    pays for each launch, so this count, exact and repeatable on a CPU, tracks what such a step costs.

        with KernelCounter() as counter:
            step()
        counter.total, counter.by_op
    """

    NO_KERNEL_OPS = frozenset((
        "view", "_unsafe_view", "reshape", "_reshape_alias", "t", "transpose", "permute", "expand", "unsqueeze",
        "squeeze", "detach", "as_strided", "alias", "split", "split_with_sizes", "chunk", "slice", "select",
        "unbind", "narrow", "lift_fresh", "is_same_size", "resolve_conj", "resolve_neg", "empty", "empty_like",
        "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense", "_record_function_enter_new",
        "_record_function_exit"))

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.NO_KERNEL_OPS:
            self.by_op[name] += 1
        return func(*args, **(kwargs or {}))


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, fragments in KINDS:
        if any(fragment in lowered for fragment in fragments):
            return kind
    return "other"


def _self_device_us(event) -> float:
    # torch >= 2.4 names it device time; older releases called it cuda time.
    return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)) or 0.0)


def profile_steps(step: Callable[[int], object], device: torch.device, steps: int = 2,
                  row_limit: int = 40) -> tuple[dict, str]:
    """Run `step(0..steps-1)` under torch.profiler; return (summary, table text).

    summary: wall_s per step, busy_s per step (device kernel time, or operator self CPU time on a CPU),
    busy_fraction, kernels and host syncs per step (CUDA only), and seconds per step by kind of work (`KINDS`).
    """
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    if on_cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        for i in range(steps):
            step(i)
        if on_cuda:
            torch.cuda.synchronize(device)
        wall = (time.perf_counter() - started) / steps

    averages = prof.key_averages()
    by_kind: dict[str, float] = {}
    busy_us = 0.0
    kernels = 0
    syncs = 0
    for avg in averages:
        if avg.key in HOST_SYNCS:
            syncs += avg.count
        if on_cuda:
            # Device kernels are the entries with device time of their own and no CPU time of their own.
            own = _self_device_us(avg)
            if own <= 0 or avg.self_cpu_time_total > 0:
                continue
            kernels += avg.count
        else:
            own = float(avg.self_cpu_time_total)
            if own <= 0 or not avg.key.startswith("aten::"):
                continue
        busy_us += own
        kind = kind_of(avg.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + own
    busy = busy_us / 1e6 / steps
    summary = {
        "steps": steps, "wall_s": wall, "busy_s": busy, "busy_fraction": busy / wall if wall > 0 else None,
        "busy_is": "device kernel time" if on_cuda else "aten operators' self CPU time",
        "kernels_per_step": kernels / steps if on_cuda else None,
        "host_syncs_per_step": syncs / steps if on_cuda else None,
        "seconds_by_kind": {k: v / 1e6 / steps for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
    }
    device_key = "self_device_time_total" if hasattr(averages[0], "self_device_time_total") else "self_cuda_time_total"
    sort_by = device_key if on_cuda else "self_cpu_time_total"
    table = averages.table(sort_by=sort_by, row_limit=row_limit, max_name_column_width=90)
    return summary, table
