"""`memory_mode: auto`: the fastest memory settings a plan says fit the card, chosen before anything loads.

Only settings that compute the same training are chosen among, fastest first by the benchmark's measured step
times (speed.py): no gradient checkpointing, gradient checkpointing, block offloading with checkpointing. A lower
precision, resolution or batch changes what is trained: when nothing fits, the run stops with the plan and the
changes it suggests, for the person to choose.
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Optional

import torch

from ..config.schema import ConfigError, TrainConfig
from ..util.device import resolve_device
from . import speed
from .phases import PHASES
from .planner import plan_training
from .report import MemoryPlan

logger = logging.getLogger(__name__)

GiB = 2**30
QUANTO = ("int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto")


def memory_candidates(config: TrainConfig) -> list[dict]:
    """The memory settings auto chooses among for `config`, fastest first."""
    found = [{"gradient_checkpointing": False, "offload_blocks": False},
             {"gradient_checkpointing": True, "offload_blocks": False}]
    if config.base_model_precision not in QUANTO and not config.compile_blocks:
        found.append({"gradient_checkpointing": True, "offload_blocks": True})

    def seconds(settings: dict) -> float:
        measured = speed.measured_seconds(config.base_model_precision, settings["gradient_checkpointing"],
                                          settings["offload_blocks"])
        if measured is None:  # an 8-bit base: the same order as bf16's
            measured = speed.measured_seconds("no_change", settings["gradient_checkpointing"],
                                              settings["offload_blocks"])
        return measured

    return sorted(found, key=seconds)


def available_memory(config: TrainConfig, transformer=None) -> tuple[Optional[float], Optional[float],
                                                                     tuple[int, int]]:
    """(GiB the run can have on its GPU, GiB of host memory available, the GPU's compute capability): what is free
    plus what a `transformer` the caller holds already takes there (the plan counts it in); the GPU figure is None
    on a CPU run."""
    host = host_memory_available_gib()
    device = resolve_device(config.device)
    if device.type != "cuda":
        return None, host, (9, 0)
    free, _ = torch.cuda.mem_get_info(device)
    held = 0
    if transformer is not None:
        held = sum(t.untyped_storage().nbytes() for t in {id(t): t for t in [*transformer.parameters(),
                                                                            *transformer.buffers()]}.values()
                   if t.device == device or (t.device.type == "cuda" and device.index is None))
    return (free + held) / GiB, host, torch.cuda.get_device_capability(device)


def host_memory_available_gib() -> Optional[float]:
    """MemAvailable of /proc/meminfo (Linux), else the physical memory; None where neither is known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GiB
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GiB
    except (ValueError, OSError, AttributeError):
        return None


def resolve_memory_mode(config: TrainConfig, gpu_memory_gib: Optional[float] = None,
                        host_memory_gib: Optional[float] = None, phases: tuple = PHASES,
                        capability: Optional[tuple[int, int]] = None, planned: Optional[list] = None,
                        transformer=None) -> TrainConfig:
    """`config` with memory_mode auto resolved (any other config comes back as it is): the fastest candidate
    whose plan fits `gpu_memory_gib` (default: what the run's GPU has free) and the host memory, logged with
    why. ConfigError, with the plan and what would make it fit, when none does. `planned` collects the plans;
    `transformer` is a base the caller holds (plan_training)."""
    if config.memory_mode != "auto":
        return config
    free, host, found_capability = available_memory(config, transformer)
    gpu_memory_gib = gpu_memory_gib if gpu_memory_gib is not None else free
    host_memory_gib = host_memory_gib if host_memory_gib is not None else host
    manual = replace(config, memory_mode="manual")
    if gpu_memory_gib is None:
        logger.info("memory_mode auto: a CPU run has no GPU memory to plan for; the settings stay as given")
        return manual
    tried = []
    for settings in memory_candidates(config):
        candidate = replace(manual, **settings)
        plan = plan_training(candidate, gpu_memory_gib, host_memory_gib, suggest=False, phases=phases,
                             capability=capability or found_capability, transformer=transformer)
        tried.append((settings, plan))
        if planned is not None:
            planned.append(plan)
        if plan.fits:
            _log_choice(settings, plan, tried)
            return candidate
    last = plan_training(replace(manual, **tried[-1][0]), gpu_memory_gib, host_memory_gib, phases=phases,
                         capability=capability or found_capability, transformer=transformer)
    raise ConfigError(f"memory_mode auto: no memory setting fits {gpu_memory_gib:.1f} GiB "
                      f"({'; '.join(_describe(s, p) for s, p in tried)}). The plan of the smallest:\n{last.format()}")


def _describe(settings: dict, plan: MemoryPlan) -> str:
    return f"{_words(settings)} needs {plan.needs_gib:.1f} GiB"


def _words(settings: dict) -> str:
    if settings["offload_blocks"]:
        return "offload_blocks with gradient checkpointing"
    return "gradient checkpointing" if settings["gradient_checkpointing"] else "no gradient checkpointing"


def _log_choice(settings: dict, plan: MemoryPlan, tried: list) -> None:
    faster = [f"{_words(s)} needs {p.needs_gib:.1f} GiB" for s, p in tried[:-1]]
    logger.info("memory_mode auto: %s (needs %.1f GiB of %.1f GiB; %s peaks at %.1f GiB)%s", _words(settings),
                plan.needs_gib, plan.gpu_memory_gib, plan.peak_phase.name, plan.peak_gib,
                f"; faster but too big: {', '.join(faster)}" if faster else "; the fastest setting")
