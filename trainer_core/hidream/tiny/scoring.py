"""How well a sample draws its caption: the scores the drawing tiny HiDream is held to.

A corpus caption names everything about its picture (shape, colour, background, place), so a sample can be compared
with the scene drawn exactly (`CorpusItem.draw`). Five scores, pixels in [0, 1]:

    pixel_mae          mean absolute error to the exact scene
    background_share   of the pixels outside the shape, the share whose nearest named colour is the background's
    shape_colour_share of the shape's pixels, the share whose nearest named colour is the shape's
    shape_iou          IoU of the drawn shape with the captioned one (see `drawn_shape_mask`)
    shape_recognised   the captioned shape matches the drawn one better than any other corpus shape in that place

Why IoU plus recognition: a circle and a square of the same box overlap by pi/4 = 0.785, so an IoU alone cannot say
which shape was drawn; recognition asks whether the drawn mask is closer to the captioned shape than to each of the
five others at the caption's place and size.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from statistics import mean

import numpy as np

from . import corpus

_NAMED = np.array(list(corpus.PALETTE.values()), dtype=np.float32) / 255.0
_NAMES = list(corpus.PALETTE)


@dataclass(frozen=True)
class DrawingScore:
    pixel_mae: float
    background_share: float
    shape_colour_share: float
    shape_iou: float
    shape_recognised: bool


def pixels(image) -> np.ndarray:
    """A PIL image -> float32 (H, W, 3) in [0, 1]."""
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def nearest_named(values: np.ndarray) -> np.ndarray:
    """(..., 3) pixels -> (...) index into corpus.PALETTE of the nearest named colour."""
    distances = ((values[..., None, :] - _NAMED) ** 2).sum(axis=-1)
    return distances.argmin(axis=-1)


def mask_of(scene: corpus.Scene, size: int) -> np.ndarray:
    """(size, size) bool: the pixels of `scene`'s shape as the corpus draws it."""
    return np.asarray(corpus.shape_mask(scene, size)) > 0


def nearer_to_first(values: np.ndarray, first, second) -> np.ndarray:
    """(..., 3) pixels -> (...) bool: nearer to colour `first` than to `second` (both in the pixels' scale)."""
    first, second = np.asarray(first, dtype=np.float32), np.asarray(second, dtype=np.float32)
    return ((values - first) ** 2).sum(axis=-1) < ((values - second) ** 2).sum(axis=-1)


def drawn_shape_mask(values: np.ndarray, item: corpus.CorpusItem) -> np.ndarray:
    """The pixels nearer to the caption's shape colour than to its background colour: the shape as drawn, whatever
    the exact shades (two-way, so a slightly off shade still counts for the nearer of the two named colours)."""
    return nearer_to_first(values, np.array(corpus.PALETTE[item.colour]) / 255.0,
                           np.array(corpus.PALETTE[item.background]) / 255.0)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def score_drawing(image, item: corpus.CorpusItem) -> DrawingScore:
    """Score one sample of `item.caption` against the exact drawing of `item`."""
    values = pixels(image)
    size = values.shape[0]
    exact = pixels(item.draw(size))
    inside = mask_of(item.scene, size)
    named = nearest_named(values)
    drawn = drawn_shape_mask(values, item)
    ious = {shape: _iou(drawn, mask_of(replace(item.scene, shape=shape), size)) for shape in corpus.SHAPES}
    return DrawingScore(
        pixel_mae=float(np.abs(values - exact).mean()),
        background_share=float((named[~inside] == _NAMES.index(item.background)).mean()),
        shape_colour_share=float((named[inside] == _NAMES.index(item.colour)).mean()),
        shape_iou=ious[item.shape],
        shape_recognised=max(ious, key=ious.get) == item.shape,
    )


def summarise(scores: list[DrawingScore]) -> dict[str, float]:
    """Means over a group of captions (shape_recognised as a share)."""
    return {"captions": len(scores),
            "pixel_mae": mean(s.pixel_mae for s in scores),
            "background_share": mean(s.background_share for s in scores),
            "shape_colour_share": mean(s.shape_colour_share for s in scores),
            "shape_iou": mean(s.shape_iou for s in scores),
            "shape_recognised": mean(float(s.shape_recognised) for s in scores)}


def format_summary(name: str, summary: dict[str, float]) -> str:
    return (f"{name} ({summary['captions']} captions): pixel MAE {summary['pixel_mae']:.3f}, background "
            f"{summary['background_share']:.0%}, shape colour {summary['shape_colour_share']:.0%}, shape IoU "
            f"{summary['shape_iou']:.2f}, shape recognised {summary['shape_recognised']:.0%}")


# ------------------------------------------------------------------------------------------- a model's samples

SEEN_CAPTIONS, HELD_OUT_CAPTIONS = 32, 16


def evaluation_groups(seen: int = SEEN_CAPTIONS, held_out: int = HELD_OUT_CAPTIONS,
                      seed: int = 0) -> dict[str, list[corpus.CorpusItem]]:
    """A fixed, seeded choice of corpus items: captions seen in pretraining and captions of the held-out colour-shape
    pairs (never in pretraining, in any background or place)."""
    import random

    rng = random.Random(seed)
    return {"seen": rng.sample(corpus.training_items(), seen),
            "held out": rng.sample(corpus.held_out_items(), held_out)}


def sample_caption(transformer, vae, encoders, caption: str, seed: int, network=None, strength: float = 1.0,
                   guidance: float = 4.0, size: int = 128):
    """One picture of `caption` with the drawing model's own sampler settings (20 UniPC steps, shift 3)."""
    from ...config.schema import SamplingConfig
    from ..sample import sample_image

    settings = SamplingConfig(prompt=caption, width=size, height=size, num_inference_steps=20, guidance=guidance,
                              shift=3.0, seed=seed, lokr_strength=strength)
    uncond = encoders.encode([""]) if guidance > 1.0 else None
    return sample_image(transformer, vae, encoders.encode([caption]), uncond, settings, network=network)[0]


def score_groups(transformer, vae, encoders, groups: dict[str, list[corpus.CorpusItem]],
                 size: int = 128) -> dict[str, dict[str, float]]:
    """Group name -> `summarise` of its captions' samples (caption i of a group sampled with seed i)."""
    return {name: summarise([score_drawing(sample_caption(transformer, vae, encoders, item.caption, seed=i,
                                                          size=size), item)
                             for i, item in enumerate(items)])
            for name, items in groups.items()}
