"""Timing configurations: median step time, peak memory, FLOPs and kernel counts, within a time budget."""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..util.device import accelerator_peak_gib, release_memory, reset_peak_memory, synchronize

logger = logging.getLogger(__name__)


def _gib_text(value: Optional[float]) -> str:
    return f"{value:.2f}" if value is not None else "n/a"


@dataclass
class Timed:
    """One configuration ready to run: `step(i)` runs step i; `close()` frees it."""

    step: Callable[[int], object]
    close: Callable[[], None] = lambda: None
    info: dict = field(default_factory=dict)
    # One extra step under the FLOP and kernel counters; skipped where a step is slow and its work is another
    # mode's (offloading moves weights, not work).
    count_flops: bool = True
    max_steps: Optional[int] = None  # cap on timed steps (a reference so slow that the run's time limit matters)
    max_warmup: Optional[int] = None  # cap on untimed steps, likewise
    # The step the counters run (default `step`): a CUDA-graph replay dispatches nothing to count, so a graphed
    # configuration counts the plain step it replays.
    count_step: Optional[Callable[[int], object]] = None
    settle: Callable[[], None] = lambda: None  # finish what a step left pending (its deferred read), uncounted
    late_info: Callable[[], dict] = dict  # figures known only after the steps ran (compile and graph counts)


class TimeBudgetSpent(RuntimeError):
    """`--time-budget` ran out before a configuration the mode cannot do without."""


def past(deadline: Optional[float]) -> bool:
    """True once `deadline` (a time.monotonic() value, None for none) has passed."""
    return deadline is not None and time.monotonic() >= deadline


def time_configs(configs: dict[str, Callable[[], Timed]], device: torch.device, steps: int, warmup: int,
                 interleave: bool, profile: Optional[Callable[[str, Timed], None]] = None,
                 deadline: Optional[float] = None) -> dict[str, dict]:
    """Median step time (and peak memory) of each configuration.

    interleave=False (GPU): one configuration lives at a time: set up, time, count FLOPs, close. Peak memory is
    per configuration. interleave=True (CPU): all configurations live together and their steps alternate (the
    order flips every round), so load from other processes on a shared CPU hits all of them alike.
    `profile(label, timed)`, when given, runs after a configuration's timed steps (untimed, before it closes).
    Past `deadline`, configurations not yet set up are left out of the result and timing stops after the first
    timed step (`step_s_all` says how many ran): a device lent for minutes keeps what was measured.
    """
    results: dict[str, dict] = {}
    if not interleave:
        for label, setup in configs.items():
            if past(deadline):
                logger.warning("time budget spent: %s not run", label)
                continue
            timed = setup()
            release_memory()
            reset_peak_memory(device)
            times = []
            timed_steps = min(steps, timed.max_steps or steps)
            timed_warmup = min(warmup, warmup if timed.max_warmup is None else timed.max_warmup)
            for i in range(timed_warmup + timed_steps):
                if i > timed_warmup and past(deadline):
                    logger.warning("time budget spent: %s timed on %d steps", label, i - timed_warmup)
                    break
                synchronize(device)
                started = time.perf_counter()
                timed.step(i)
                synchronize(device)
                times.append(time.perf_counter() - started)
                peak = accelerator_peak_gib(device)  # logged per step: a run cut short by a time limit keeps its memory too
                logger.info("%s step %d: %.3f s, peak so far %s GiB", label, i, times[-1], _gib_text(peak))
            logger.info("%s: median %.3f s, peak %s GiB", label, statistics.median(times[timed_warmup:]),
                        _gib_text(peak))
            results[label] = _configuration_result(label, timed, times, timed_warmup, peak, profile, deadline)
            timed.close()
            del timed
            release_memory()
        return results
    live = {label: setup() for label, setup in configs.items()}
    times = {label: [] for label in live}
    labels = list(live)
    for i in range(warmup + steps):
        if i > warmup and past(deadline):
            logger.warning("time budget spent: timed on %d steps", i - warmup)
            break
        for label in (labels if i % 2 == 0 else labels[::-1]):
            started = time.perf_counter()
            live[label].step(i)
            times[label].append(time.perf_counter() - started)
    for label, timed in live.items():
        results[label] = _configuration_result(label, timed, times[label], warmup, None, profile, deadline)
        timed.close()
    return results


def _configuration_result(label: str, timed: Timed, times: list[float], warmup: int, peak: Optional[float],
                          profile: Optional[Callable[[str, Timed], None]], deadline: Optional[float]) -> dict:
    """One timed configuration's figures: its step times, then (unless the time budget is spent) the profile and
    one step under the FLOP and kernel counters."""
    if profile is not None and not past(deadline):
        profile(label, timed)
    counted = timed.count_flops and not past(deadline)
    timed.settle()
    work = count_work(lambda: (timed.count_step or timed.step)(0)) if counted else WorkCount()
    timed.settle()
    return {**summarise(times, warmup, peak, work.flops), "first_step_s": times[0] if times else None,
            "flops_per_step": work.flops, "kernels_per_step": work.kernels,
            "host_syncs_per_step": work.host_syncs, "host_syncs_by_op": work.host_syncs_by_op,
            **timed.info, **timed.late_info()}


def summarise(times: list[float], warmup: int, peak: Optional[float], flops: Optional[float]) -> dict:
    timed = times[warmup:]
    med = statistics.median(timed)
    return {"step_s": med, "step_s_all": [round(t, 4) for t in times], "peak_gib": peak,
            "tflops_per_s": (flops / med / 1e12) if flops else None}


@dataclass
class WorkCount:
    """What one step dispatched: FLOPs (torch's FlopCounterMode: matmuls, attention; quanto's int8 matmul op is
    not counted), kernels (`KernelCounter`) and device-to-host reads (`HostSyncCounter`, with the ops that read)."""

    flops: Optional[float] = None
    kernels: Optional[int] = None
    host_syncs: Optional[int] = None
    host_syncs_by_op: Optional[dict] = None


def count_work(fn: Callable[[], object]) -> WorkCount:
    """FLOPs, kernels and host syncs of one run of `fn`, or an empty count when the step cannot run under the
    counters (timing matters more). Compiled code refuses dispatch modes, so it runs here with compiled regions
    forced eager: the same maths and the same host reads (a fullgraph region cannot hold one); the kernel count is
    then the eager one, an upper bound of a compiled step's."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..util.host_sync import HostSyncCounter
    from .profile import KernelCounter

    flops = FlopCounterMode(display=False)
    kernels = KernelCounter()
    syncs = HostSyncCounter()
    try:
        with torch.compiler.set_stance("force_eager"), flops, kernels, syncs:
            fn()
    except Exception as exc:  # noqa: BLE001 - a missing FLOP figure must not lose the mode's timings
        logger.warning("FLOP count failed (%s: %s); TFLOP/s left empty", type(exc).__name__, exc)
        return WorkCount()
    return WorkCount(float(flops.get_total_flops()), kernels.total, syncs.total, dict(syncs.by_op))
