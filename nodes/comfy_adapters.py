"""Adapters from ComfyUI's CLIP and VAE objects to the trainer core's TextEncoder / ImageEncoder protocols.

Layouts (ComfyUI 0.3.75, comfy/text_encoders/hidream.py and latent_formats.Flux):
  ComfyUI CONDITIONING entry: [t5 (B, 128, 4096), {"pooled_output": (B, 2048),
                                                   "conditioning_llama3": (B, 32, T, 4096)}], T >= 128
  trainer core PromptEmbeds:  t5 (B, 128, D), llama (L, B, 128, D), pooled (B, D)
ComfyUI does not truncate the Llama tokens (T may exceed 128) while diffusers pads/truncates to 128: the adapter
keeps the first 128 Llama positions (and zero-pads shorter ones), so cached embeddings have the core's fixed shape.
Llama positions beyond 128 are dropped: for captions longer than 128 Llama tokens the embedding differs from what
ComfyUI's own sampling would feed the model.
  ComfyUI VAE: encode() takes IMAGE (B, H, W, 3) in [0, 1] and returns raw Flux latents z; the core caches
  (z - 0.1159) x 0.3611.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
import weakref
from typing import Optional, Sequence

import torch

from ..trainer_core.hidream import PromptEmbeds
from .convert import raw_to_scaled_latents, scaled_to_raw_latents

LLAMA_TOKENS = 128
_SESSION_IDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # objects without a better identity


def comfy_model_identity(kind: str, obj, origin: Optional[str] = None) -> str:
    """A cache-key identity for a ComfyUI CLIP or VAE object that never reads its weights (under Dynamic VRAM
    even a sample of a 16 GB Llama's values pages in scattered parts of it).

    In order of preference: `origin`, the graph that made the object (its loaders' file names, sizes and modification
    times and every setting on the way, `graph_origin`): stable across queues and restarts; else ComfyUI's own
    record of how to load the model again (`patcher.cached_patcher_init` in newer ComfyUI: the loader and its file
    paths), plus the patches added since (e.g. a LoRA on the CLIP); else this object itself for this session only
    (its caches are then not reused by a later session, never wrongly reused).
    """
    h = hashlib.sha256(kind.encode())
    patcher = getattr(obj, "patcher", None)
    init = getattr(patcher, "cached_patcher_init", None)
    if origin:
        h.update(origin.encode())
    elif init:
        h.update(json.dumps(_describe(init), sort_keys=True).encode())
        if getattr(patcher, "patches", None):
            h.update(str(getattr(patcher, "patches_uuid", "")).encode())
    else:
        h.update(_SESSION_IDS.setdefault(obj, uuid.uuid4().hex).encode())
    return f"comfy-{kind}-{h.hexdigest()[:32]}"


def _describe(value, depth: int = 0):
    """A JSON-able description of a loader argument: a file is its name, size and modification time (never its
    contents); objects are their type (never their address)."""
    if depth > 6:
        return "..."
    if isinstance(value, str):
        if os.path.isfile(value):
            stat = os.stat(value)
            return [os.path.basename(value), stat.st_size, stat.st_mtime_ns]
        return value
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_describe(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe(v, depth + 1) for k, v in value.items()}
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return type(value).__qualname__ if not isinstance(value, (torch.dtype, torch.device)) else str(value)


def graph_origin(prompt: Optional[dict], node_id: Optional[str], input_name: str) -> Optional[str]:
    """What feeds `input_name` of node `node_id` in the queued prompt, as a stable string: every upstream node's
    class and settings, with the model files its loaders name described by name, size and modification time.
    None when the prompt does not show it (no prompt, or the input is not a link)."""
    from .prompt_hook import MODEL_INPUTS

    node = (prompt or {}).get(str(node_id)) if node_id is not None else None
    link = ((node or {}).get("inputs") or {}).get(input_name)
    if not (isinstance(link, list) and len(link) == 2):
        return None
    seen: dict[str, object] = {}

    def signature(src: str, depth: int):
        if src in seen or depth > 64:
            return src
        upstream = prompt.get(src) or {}
        class_type = upstream.get("class_type", "")
        seen[src] = None
        inputs = {}
        for name, value in sorted((upstream.get("inputs") or {}).items()):
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                inputs[name] = [signature(value[0], depth + 1), value[1]]
            elif name in MODEL_INPUTS.get(class_type, {}) and isinstance(value, str):
                inputs[name] = _model_file(MODEL_INPUTS[class_type][name], value)
            else:
                inputs[name] = value
        seen[src] = [class_type, inputs]
        return seen[src]

    return json.dumps([signature(str(link[0]), 0), link[1]], sort_keys=True, default=str)


def _model_file(folder: str, name: str):
    import folder_paths

    path = folder_paths.get_full_path(folder, name)
    return _describe(path) if path else name


def conditioning_to_embeds(cond: torch.Tensor, extras: dict, llama_tokens: int | None = LLAMA_TOKENS) -> PromptEmbeds:
    """One ComfyUI HiDream conditioning entry -> PromptEmbeds.

    llama_tokens: the Llama length to cut or zero-pad to (128 for the caches, whose entries have a fixed shape);
    None keeps ComfyUI's length (for sampling, where the transformer takes any length).
    """
    if "conditioning_llama3" not in extras or "pooled_output" not in extras:
        raise ValueError("this CONDITIONING is not HiDream's (no conditioning_llama3 / pooled_output): encode with "
                         "the CLIP from QuadrupleCLIPLoader (the four HiDream text encoders)")
    llama = extras["conditioning_llama3"]  # (B, L, T, D)
    b, layers, t, d = llama.shape
    if llama_tokens is not None and t >= llama_tokens:
        llama = llama[:, :, :llama_tokens]
    elif llama_tokens is not None:
        llama = torch.cat([llama, llama.new_zeros(b, layers, llama_tokens - t, d)], dim=2)
    return PromptEmbeds(t5=cond, llama=llama.permute(1, 0, 2, 3).contiguous(), pooled=extras["pooled_output"])


class ComfyClipTextEncoder:
    """TextEncoder over ComfyUI's CLIP (QuadrupleCLIPLoader): the same text for all four encoders, as
    CLIPTextEncode does."""

    def __init__(self, clip, origin: Optional[str] = None) -> None:
        self.clip = clip
        self.identity = comfy_model_identity("clip", clip, origin)

    @torch.no_grad()
    def encode(self, prompts: list[str], max_sequence_length: int = 128) -> PromptEmbeds:
        items = []
        for prompt in prompts:
            tokens = self.clip.tokenize(prompt)
            out = self.clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
            cond = out.pop("cond")
            items.append(conditioning_to_embeds(cond, out))
        return PromptEmbeds.cat(items)


class ComfyVaeImageEncoder:
    """ImageEncoder over ComfyUI's VAE (VAELoader, ae.safetensors). ComfyUI's encode returns the posterior mode,
    so the per-image generators are not used."""

    def __init__(self, vae, origin: Optional[str] = None) -> None:
        self.vae = vae
        self.identity = comfy_model_identity("vae", vae, origin)

    def encode(self, pixels: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        image = ((pixels.float() + 1.0) / 2.0).clamp(0, 1).permute(0, 2, 3, 1)  # (B, H, W, 3) in [0, 1]
        return raw_to_scaled_latents(self.vae.encode(image).float())

    def decode_latents(self, latents: torch.Tensor):
        from PIL import Image

        images = self.vae.decode(scaled_to_raw_latents(latents.float()))
        arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return [Image.fromarray(a) for a in arrays.reshape(-1, *arrays.shape[-3:])]
