"""A loss-curve picture drawn with Pillow (no plotting library needed on a training box)."""
from __future__ import annotations

import math
from typing import Sequence

from PIL import Image, ImageDraw


def moving_average(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def loss_curve_image(losses: Sequence[float], width: int = 800, height: int = 400,
                     title: str = "training loss") -> Image.Image:
    """Raw per-step loss (light) and its moving average (dark) against the step number."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, width - 20, 30, height - 40
    draw.rectangle([left, top, right, bottom], outline=(80, 80, 80))
    draw.text((left, 8), title, fill=(0, 0, 0))
    finite = [v for v in losses if math.isfinite(v)]
    if not finite:
        draw.text((left + 10, top + 10), "no finite loss values", fill=(200, 0, 0))
        return img
    lo, hi = min(finite), max(finite)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    n = len(losses)

    def point(i: int, v: float) -> tuple[float, float]:
        x = left + (right - left) * (i / max(n - 1, 1))
        y = bottom - (bottom - top) * ((v - lo) / (hi - lo))
        return x, y

    for frac in (0.0, 0.5, 1.0):
        v = lo + (hi - lo) * frac
        y = bottom - (bottom - top) * frac
        draw.line([left - 4, y, left, y], fill=(80, 80, 80))
        draw.text((4, y - 6), f"{v:.4g}", fill=(0, 0, 0))
    draw.text((left, bottom + 8), "step 1", fill=(0, 0, 0))
    draw.text((right - 60, bottom + 8), f"step {n}", fill=(0, 0, 0))
    raw = [point(i, v) for i, v in enumerate(losses) if math.isfinite(v)]
    if len(raw) > 1:
        draw.line(raw, fill=(150, 190, 240), width=1)
    avg = moving_average(finite, max(1, n // 20))
    smooth = [point(i, v) for i, v in enumerate(avg)]
    if len(smooth) > 1:
        draw.line(smooth, fill=(20, 60, 160), width=2)
    return img
