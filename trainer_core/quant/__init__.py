"""Frozen base weights stored in fewer bits (the adapter always trains in float32): optimum-quanto (quanto.py) and
the 8-bit scaled-matmul layers fp8-scaled / int8-scaled (scaled.py)."""
from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "INT8_INPUT_MULTIPLE": ".quanto", "QUANTO_PRECISIONS": ".quanto", "is_quantized": ".quanto",
    "quantize_frozen": ".quanto", "quantize_block": ".quanto", "blocks_of": ".quanto",
    "HIGH_PRECISION_MODULES": ".scaled", "SCALED_PRECISIONS": ".scaled", "ScaledFp8Linear": ".scaled",
    "ScaledInt8Linear": ".scaled", "ScaledLinear": ".scaled", "check_precision_supported": ".scaled",
    "quantize_scaled": ".scaled",
})
