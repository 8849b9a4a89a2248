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
from typing import Sequence

import torch

from ..trainer_core.hidream import PromptEmbeds
from .convert import raw_to_scaled_latents, scaled_to_raw_latents

LLAMA_TOKENS = 128


def _object_identity(kind: str, obj) -> str:
    """A stable identity for a ComfyUI model object: the hash of its weights' names, shapes and a sample of values."""
    h = hashlib.sha256(kind.encode())
    sd = obj.get_sd() if hasattr(obj, "get_sd") else {}
    for name in sorted(sd):
        t = sd[name]
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        flat = t.detach().reshape(-1)
        if flat.numel():
            h.update(flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())
    return f"comfy-{kind}-{h.hexdigest()[:32]}"


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

    def __init__(self, clip) -> None:
        self.clip = clip
        self.identity = _object_identity("clip", clip)

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

    def __init__(self, vae) -> None:
        self.vae = vae
        self.identity = _object_identity("vae", vae)

    def encode(self, pixels: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        image = ((pixels.float() + 1.0) / 2.0).clamp(0, 1).permute(0, 2, 3, 1)  # (B, H, W, 3) in [0, 1]
        return raw_to_scaled_latents(self.vae.encode(image).float())

    def decode_latents(self, latents: torch.Tensor):
        from PIL import Image

        images = self.vae.decode(scaled_to_raw_latents(latents.float()))
        arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return [Image.fromarray(a) for a in arrays.reshape(-1, *arrays.shape[-3:])]
