"""The trainable adapter behind one small interface, so the training loop does not care which kind it has.

* `LokrAdapter` (lora_type lycoris): a LyCORIS LoKr in bypass mode (lokr.py), saved with LyCORIS keys.
* `PeftLoraAdapter` (lora_type standard): a PEFT LoRA on the attention projections (lora.py), saved in the
  diffusers / ComfyUI key format.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional, Protocol

from torch import nn

from ..config.schema import TrainConfig
from .lokr import LokrAdapter, LycorisConfig
from .lora import PeftLoraAdapter


class Adapter(Protocol):
    """What training needs of an adapter. `parameters()` train, `module` holds them (for the EMA), `save(path)` and
    `load_weights(path)` (exact inverses for float32 weights), `applied(strength)` (a context in which the model
    samples with the adapter at that strength, merged where possible), `disabled()` (a context in which the
    training forward runs as the base model, nothing merged: regularisation targets), `remove()` (hand the model
    back without it), `mergeable` (False: sampling runs it unmerged), `kind` ("lokr" or "lora", recorded in
    checkpoints)."""

    kind: str
    module: nn.Module
    mergeable: bool

    def parameters(self) -> list[nn.Parameter]: ...

    def save(self, path: Path, metadata: Optional[dict] = None) -> Path: ...

    def load_weights(self, path: Path) -> None: ...

    def applied(self, strength: float) -> contextlib.AbstractContextManager: ...

    def disabled(self) -> contextlib.AbstractContextManager: ...

    def remove(self) -> None: ...


def create_adapter(transformer: nn.Module, config: TrainConfig, lycoris: Optional[LycorisConfig]):
    """The adapter `config.lora_type` names, attached to the frozen `transformer`."""
    if config.lora_type == "standard":
        return PeftLoraAdapter(transformer, config)
    return LokrAdapter(transformer, config, lycoris or LycorisConfig())


def describe(adapter) -> str:
    count = sum(p.numel() for p in adapter.parameters())
    return json.dumps({"type": adapter.kind, "trainable_parameters": count})
