"""Will it fit? A dry run of the project's own code at HiDream-I1's full size on meta tensors (no weights, no
GPU), the memory each phase of a run needs, and the settings that make a run fit a card."""
from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "DryRun": ".dry_run", "DryRunError": ".dry_run",
    "TrainingPlanRun": ".phases", "largest_bucket": ".phases", "PHASES": ".phases", "NODE_PHASES": ".phases",
    "MemoryPlan": ".report", "PhasePlan": ".report", "Suggestion": ".report",
    "plan_training": ".planner", "suggestions": ".planner",
    "BENCH_MODES": ".bench_modes", "plan_bench_mode": ".bench_modes",
    "resolve_memory_mode": ".auto", "memory_candidates": ".auto", "available_memory": ".auto",
})
