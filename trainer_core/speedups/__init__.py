"""Speed-ups that compute what the stock stack computes (each with a switch in TrainConfig), and the low-memory
block streaming."""
from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "BlockStreamer": ".block_offload",
    "Speedups": ".switches", "apply_speedups": ".switches", "remove_speedups": ".switches",
})
