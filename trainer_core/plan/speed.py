"""What a memory setting costs in speed, from the benchmark's measured step times (the one place they are read from
for advice; benchmarks/README.md has the tables and the raw lines).

One NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, HiDream-I1-Full at 1024x1024, batch 1, attention LoKr factor 16,
medians of the project's step on 2026-11-28 (run 3: bf16 without checkpointing; run 4: the rest). Settings that
were not measured have no figure: the plan says so rather than guess.
"""
from __future__ import annotations

from typing import Optional

SOURCE = "H100 step medians, benchmarks/2026-11-28-NVIDIA_H100_80GB_HBM3-run3/run4"

# (base precision, gradient checkpointing, offload_blocks) -> seconds per step
MEASURED_STEP_SECONDS = {
    ("no_change", False, False): 0.805,  # bf16_nogc, run 3
    ("no_change", True, False): 1.253,  # bf16_gc, run 4
    ("int8-quanto", True, False): 1.630,  # int8_gc, run 4
    ("no_change", True, True): 1.415,  # offload_gc, run 4
}


def step_key(precision: str, checkpointing: bool, offload: bool) -> tuple[str, bool, bool]:
    return ("no_change" if precision in ("bf16", "no_change") else precision, bool(checkpointing), bool(offload))


def measured_seconds(precision: str, checkpointing: bool, offload: bool) -> Optional[float]:
    return MEASURED_STEP_SECONDS.get(step_key(precision, checkpointing, offload))


def relative_cost(before: tuple, after: tuple) -> Optional[float]:
    """The step time of the settings `after` over that of `before` (each (precision, checkpointing, offload)),
    where both were measured; None otherwise."""
    a, b = measured_seconds(*before), measured_seconds(*after)
    return b / a if a and b else None
