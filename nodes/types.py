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
# ComfyUI's own training types, for its native nodes (LoraModelLoader, SaveLoRA, LossGraphNode). Newer ComfyUI
# declares them in comfy_api (io.LoraModel, io.LossMap); 0.3.75 uses io.Custom with the same names, which
# connects to the same sockets.
LoraModelType = getattr(io, "LoraModel", None) or io.Custom("LORA_MODEL")
LossMapType = getattr(io, "LossMap", None) or io.Custom("LOSS_MAP")


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

    def _comfy_cache_tensors(self) -> list:
        """The tensors this value holds, for newer ComfyUI's RAM-pressure output cache (comfy_execution/caching.py
        sizes an output by its CPU tensors or this hook; any other object counts as almost nothing, so the cache
        would misjudge what dropping a model of tens of GB frees). Plain tensors only: a quantised tensor subclass
        is given as the plain tensors it is made of."""
        modules = [self.transformer]
        modules += list(getattr(self.text_encoder, "modules", lambda: [])())
        modules.append(getattr(self.image_encoder, "vae", None))
        return [t for m in modules if m is not None for p in (*m.parameters(), *m.buffers()) for t in _plain(p)]

    def get_ram_usage(self) -> int:
        """Bytes of host memory this value holds: what ComfyUI 0.3.75's RAM-pressure cache (--cache-ram) asks an
        output for (as it asks its own ModelPatcher); each CPU storage counted once."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in self._comfy_cache_tensors() if t.device.type == "cpu"}
        return sum(storages.values())


def _plain(t) -> list:
    """`t` as plain tensors: itself, or the inner tensors of a tensor subclass (optimum-quanto's)."""
    import torch

    if type(t) in (torch.Tensor, torch.nn.Parameter):
        return [t]
    flatten = getattr(t, "__tensor_flatten__", None)
    return [inner for name in flatten()[0] for inner in _plain(getattr(t, name))] if flatten else []


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
        """The file's tensors: {"lycoris_<module path>.lokr_w1" | ".lokr_w2" | ".alpha" ...: tensor} on the CPU.
        Also ComfyUI's LORA_MODEL value (a LoRA file's keys and tensors, as its LoraModelLoader and SaveLoRA
        take them): ComfyUI maps the lycoris_ keys onto HiDream's weights itself."""
        from safetensors.torch import load_file

        return load_file(str(self.path))
