"""A memory plan as people and programs read it: per phase the predicted peak on the GPU and in host memory, the
tensors that make the peak, whether it fits a card, and the changes that make it fit.

Three figures per GPU peak, from the same dry run:
    peak_gib      what torch.cuda.max_memory_allocated() would report (the benchmark's `peak_gib`)
    reserved_gib  the caching allocator's segments at that moment (allocator.reserved_bytes)
    needs_gib     reserved + the CUDA context (allocator.CUDA_CONTEXT_BYTES): what the card must have
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from . import allocator
from .dry_run import GPU, DryRun

GiB = 2**30
# Card sizes (GiB of device memory) the smallest-card answer picks from.
CARDS_GIB = (8, 10, 12, 16, 20, 24, 32, 40, 48, 80, 96, 141)


@dataclass
class PhasePlan:
    name: str
    peak_gib: float
    reserved_gib: float
    host_gib: float
    pinned_gib: float
    tensors: list[dict]  # the groups that make the GPU peak, largest first
    note: str = ""
    error: Optional[str] = None  # the code failed here at full size

    @property
    def needs_gib(self) -> float:
        return self.reserved_gib + allocator.CUDA_CONTEXT_BYTES / GiB


def phase_plan(dry: DryRun, name: str, note: str = "", top: int = 5) -> PhasePlan:
    record = dry.phases[name]
    blocks = dry.peak_blocks(name)
    tensors = [{"what": g["what"], "gib": round(g["bytes"] / GiB, 3), "tensors": g["tensors"],
                "shape": list(g["example_shape"]), "dtype": str(g["dtype"]).replace("torch.", "")}
               for g in dry.peak_tensors(name, GPU, top)]
    return PhasePlan(name, record.peak_gpu / GiB, allocator.reserved_bytes(blocks) / GiB, record.peak_host / GiB,
                     dry.pinned_at(record.peak_host_at) / GiB, tensors, note)


@dataclass
class Suggestion:
    """One change that makes the run fit (or come closer), with what the plan predicts for it."""

    change: str
    settings: dict
    peak_gib: float
    needs_gib: float
    fits: Optional[bool]
    relative_step_time: Optional[float]  # measured step time after / before, where both were measured
    speed: str  # the cost in words, with its source
    changes_training: bool  # a different computation (precision, resolution, batch), not just memory handling


@dataclass
class MemoryPlan:
    settings: dict  # what was planned
    phases: list[PhasePlan]
    gpu_memory_gib: Optional[float] = None
    host_memory_gib: Optional[float] = None
    seconds: float = 0.0
    suggestions: list[Suggestion] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def peak_gib(self) -> float:
        return max(p.peak_gib for p in self.phases)

    @property
    def needs_gib(self) -> float:
        return max(p.needs_gib for p in self.phases)

    @property
    def peak_phase(self) -> PhasePlan:
        return max(self.phases, key=lambda p: p.peak_gib)

    @property
    def host_gib(self) -> float:
        return max(p.host_gib for p in self.phases)

    @property
    def errors(self) -> list[PhasePlan]:
        return [p for p in self.phases if p.error]

    @property
    def fits(self) -> Optional[bool]:
        """None when no GPU size was given; False when a phase fails at full size."""
        if self.errors:
            return False
        if self.gpu_memory_gib is None:
            return None
        host_ok = self.host_memory_gib is None or self.host_gib <= self.host_memory_gib
        return self.needs_gib <= self.gpu_memory_gib and host_ok

    @property
    def smallest_card(self) -> Optional[int]:
        return next((c for c in CARDS_GIB if self.needs_gib <= c), None)

    def phase(self, name: str) -> Optional[PhasePlan]:
        return next((p for p in self.phases if p.name == name), None)

    def verdict(self) -> str:
        """One line: e.g. "fits in 24 GiB: needs 18.9 GiB (training step peaks at 18.0 GiB allocated)"."""
        if self.errors:
            first = self.errors[0]
            return f"fails at full size in {first.name}: {first.error}"
        peak = self.peak_phase
        what = f"needs {self.needs_gib:.1f} GiB ({peak.name} peaks at {peak.peak_gib:.1f} GiB allocated)"
        if self.fits is None:
            card = self.smallest_card
            return f"{what}; smallest card: {card} GB" if card else what
        if self.fits:
            return f"fits in {self.gpu_memory_gib:.1f} GiB: {what}"
        if self.needs_gib <= self.gpu_memory_gib:
            return (f"does not fit host memory: {self.host_gib:.1f} GiB needed, {self.host_memory_gib:.1f} GiB "
                    f"there; {what}")
        return f"does not fit {self.gpu_memory_gib:.1f} GiB: {what}"

    def to_json(self) -> dict:
        return {"peak_gib": round(self.peak_gib, 3), "needs_gib": round(self.needs_gib, 3),
                "host_peak_gib": round(self.host_gib, 3), "gpu_memory_gib": self.gpu_memory_gib,
                "host_memory_gib": self.host_memory_gib, "fits": self.fits, "smallest_card_gb": self.smallest_card,
                "verdict": self.verdict(), "settings": self.settings,
                "phases": [{**asdict(p), "needs_gib": p.needs_gib} for p in self.phases],
                "suggestions": [asdict(s) for s in self.suggestions], "notes": self.notes,
                "seconds": round(self.seconds, 1)}

    def format(self) -> str:
        """The plan as a table for a terminal."""
        lines = [f"memory plan: {', '.join(f'{k} {v}' for k, v in self.settings.items())}", ""]
        lines.append(f"{'phase':26s} {'GPU peak':>9s} {'needs':>7s} {'host':>7s} {'pinned':>7s}  largest on the GPU")
        for p in self.phases:
            if p.error:
                lines.append(f"{p.name:26s} FAILS: {p.error}")
                continue
            largest = "; ".join(f"{t['what']} {t['gib']:.2f}" for t in p.tensors[:3])
            lines.append(f"{p.name:26s} {p.peak_gib:8.2f}G {p.needs_gib:6.1f}G {p.host_gib:6.1f}G "
                         f"{p.pinned_gib:6.1f}G  {largest}")
            if p.note:
                lines.append(f"{'':26s} ({p.note})")
        lines += ["", f"verdict: {self.verdict()}"]
        if self.suggestions:
            lines.append("changes that make it fit, fastest first:")
            for s in self.suggestions:
                mark = "fits" if s.fits else "still too big" if s.fits is False else ""
                lines.append(f"  {s.change:44s} peak {s.peak_gib:5.1f} GiB, needs {s.needs_gib:5.1f} GiB {mark:13s} "
                             f"{s.speed}")
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"(planned in {self.seconds:.0f} s)")
        return "\n".join(lines)

