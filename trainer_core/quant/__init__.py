"""Frozen base weights stored in fewer bits (the adapter always trains in float32)."""
from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "INT8_INPUT_MULTIPLE": ".quanto", "QUANTO_PRECISIONS": ".quanto", "is_quantized": ".quanto",
    "quantize_frozen": ".quanto",
})
