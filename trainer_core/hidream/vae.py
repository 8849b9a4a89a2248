"""The Flux VAE HiDream-I1 uses: latent normalisation, encode and decode, latents to pictures.

Training and the caches work on *scaled* latents, (z - shift_factor) * scaling_factor, the form the transformer
sees; ComfyUI's VAE nodes and LATENT values carry the *raw* Flux latents z. Both sides use the Flux VAE's factors
(the tiny model's VAE carries the same ones in its config, so every path is the real one).
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:  # the VAE module itself is only called, never built, here
    from diffusers import AutoencoderKL

# The real HiDream-I1 (Flux) VAE's factors: ComfyUI's latent_formats.Flux, and vae/config.json of HiDream-I1-Full.
FLUX_VAE_SCALING_FACTOR = 0.3611
FLUX_VAE_SHIFT_FACTOR = 0.1159


def raw_to_scaled_latents(latents: torch.Tensor) -> torch.Tensor:
    """Raw Flux latents z (ComfyUI's LATENT, VAEEncode's output) -> the scaled latents the transformer sees."""
    return (latents - FLUX_VAE_SHIFT_FACTOR) * FLUX_VAE_SCALING_FACTOR


def scaled_to_raw_latents(latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, 16, h, w) -> raw Flux latents z (what ComfyUI's VAEDecode takes)."""
    return latents / FLUX_VAE_SCALING_FACTOR + FLUX_VAE_SHIFT_FACTOR


def vae_shift_and_scale(vae: AutoencoderKL) -> tuple[float, float]:
    shift = vae.config.shift_factor
    return (0.0 if shift is None else float(shift)), float(vae.config.scaling_factor)


@torch.no_grad()
def vae_encode(vae: AutoencoderKL, pixels: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] -> normalised latents (B, C, H/8, W/8), on the VAE's device and dtype.

    Samples the posterior (with `generator` when given) and normalises it the way the pipeline un-normalises before
    decoding: (z - shift_factor) * scaling_factor.
    """
    shift, scale = vae_shift_and_scale(vae)
    posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return (posterior.sample(generator=generator) - shift) * scale


# Training previews decode in tiles of this many pixels when larger: a 1024 px decode in float32 holds ~3.4 GiB of
# activations (1 GiB tensors of 256 channels at full size) next to the transformer and the training state, more
# than the training step itself needs above its weights (plan/ measures both); 512 px tiles need a quarter.
PREVIEW_DECODE_TILE = 512


@torch.no_grad()
def vae_decode(vae: AutoencoderKL, latents: torch.Tensor, tile: Optional[int] = None) -> torch.Tensor:
    """Normalised latents (B, C, h, w) -> pixels (B, 3, 8h, 8w) clamped to [-1, 1] (inverse of vae_encode).
    With `tile` (pixels), a larger image is decoded in overlapping tiles of that size, blended (diffusers'
    tiled_decode): far less memory, the seams blended away."""
    shift, scale = vae_shift_and_scale(vae)
    latents = latents.to(device=vae.device, dtype=vae.dtype) / scale + shift
    with _decoding_in_tiles(vae, tile):
        return vae.decode(latents, return_dict=False)[0].clamp(-1.0, 1.0)


@contextlib.contextmanager
def _decoding_in_tiles(vae, tile: Optional[int]) -> Iterator[None]:
    if tile is None:
        yield
        return
    factor = 2 ** (len(vae.config.block_out_channels) - 1)  # pixels per latent
    previous = (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size)
    vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = True, tile, tile // factor
    try:
        yield
    finally:
        vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = previous


def latents_to_images(vae, latents: torch.Tensor, tile: Optional[int] = None) -> list[Image.Image]:
    """Decode scaled latents (B, 16, h, w) to PIL images (in tiles of `tile` pixels when larger, vae_decode)."""
    pixels = vae_decode(vae, latents, tile)
    arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]
