"""Conversions between ComfyUI's value types and the trainer core's: PIL images to IMAGE tensors, and ComfyUI's raw
Flux LATENTs to the core's scaled latents and back (the factors are the core's: trainer_core.hidream)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..trainer_core.hidream import raw_to_scaled_latents, scaled_to_raw_latents

__all__ = ["pil_to_image", "raw_to_scaled_latents", "scaled_to_raw_latents"]


def pil_to_image(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> ComfyUI IMAGE (B, H, W, 3) float32 in [0, 1]. An IMAGE batch has one size, so smaller images
    are placed top-left on a white canvas of the largest width and height."""
    width, height = max(im.width for im in images), max(im.height for im in images)
    canvases = []
    for im in images:
        canvas = Image.new("RGB", (width, height), (255, 255, 255))
        canvas.paste(im.convert("RGB"), (0, 0))
        canvases.append(torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0))
    return torch.stack(canvases)
