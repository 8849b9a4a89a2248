"""The weights that train: a LyCORIS LoKr (or a PEFT LoRA) on the frozen transformer, its files, its EMA."""
from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "AdapterEMA": ".ema",
    "Adapter": ".interface", "create_adapter": ".interface", "describe": ".interface",
    "LokrAdapter": ".lokr", "LycorisConfig": ".lokr", "create_lokr_network": ".lokr", "is_mergeable": ".lokr",
    "unmerged_reason": ".lokr",
    "load_lokr": ".lokr", "lokr_applied": ".lokr", "remove_lokr": ".lokr", "save_lokr": ".lokr",
    "PeftLoraAdapter": ".lora",
})
