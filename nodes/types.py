"""The values that travel between this pack's nodes, and their ComfyUI socket types (declared once, here).

Every value is immutable from the graph's point of view: ComfyUI caches outputs by input signature and hands the
same object to every consumer, so no node mutates a value it received (models are patched and restored in place
only for the duration of one node's run).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from .compat import io

if TYPE_CHECKING:  # importing LyCORIS costs ComfyUI's start-up; the nodes need it only when they run
    from ..trainer_core.adapters import LycorisConfig
    from ..trainer_core.config import DatasetConfig

CATEGORY = "HiDream LoKr"

HiDreamModelType = io.Custom("HIDREAM_MODEL")
DatasetType = io.Custom("HIDREAM_DATASET")
LoKrConfigType = io.Custom("HIDREAM_LOKR_CONFIG")
LoKrType = io.Custom("HIDREAM_LOKR")


@dataclass(frozen=True, eq=False)
class HiDreamModel:
    """A HiDream-I1 the trainer core can use: the diffusers transformer plus whatever encodes text and images.

    text_encoder / image_encoder follow trainer_core.data's TextEncoder / ImageEncoder protocols (the diffusers
    encoders, or adapters over ComfyUI's CLIP and VAE); decode_latents turns scaled latents (B, 16, h, w) into PIL
    images. Any of them may be None when the graph supplies them separately.
    """

    transformer: Any
    name: str
    text_encoder: Optional[Any] = None
    image_encoder: Optional[Any] = None
    decode_latents: Optional[Callable] = None
    source: str = ""
    sampling_shift: Optional[float] = None  # its scheduler config's (None: HiDream-I1-Full's 3.0)


@dataclass(frozen=True)
class TrainingData:
    """One or more image folders to train on, and (once the cache nodes ran) the identities of the encoders that
    filled the on-disk caches in `cache_dir`. `fingerprint` changes when any image or caption file changes."""

    datasets: tuple["DatasetConfig", ...]
    cache_dir: Path
    fingerprint: str
    text_encoder: Optional[Any] = None
    image_encoder: Optional[Any] = None
    cached: tuple[str, ...] = ()  # "text", "latents": which caches a node has filled for these datasets


@dataclass(frozen=True)
class LoKrHandle:
    """A trained or loaded LoKr: a LyCORIS safetensors file (key names `lycoris_<module path>`) and what made it."""

    path: Path
    lycoris: "LycorisConfig"
    steps: int = 0
    metadata: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        from safetensors.torch import load_file

        return load_file(str(self.path))
