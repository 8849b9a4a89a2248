"""`python -m trainer_core bench`: the trainer's own step against the naive stock step, side by side."""
from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "ALL_MODES": ".modes", "BenchOptions": ".modes", "SIZES": ".modes", "run_bench": ".modes",
})
