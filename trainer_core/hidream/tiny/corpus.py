"""The procedurally drawn, captioned corpus the drawing tiny HiDream is pretrained on (no randomness, no files).

A scene is one flat-colour shape on a flat-colour background:

    shape      circle, square, triangle, diamond, star, cross
    colour     one of PALETTE (eight named colours)
    background one of PALETTE, not the shape's colour
    position   centre (the caption says nothing), left, right, top, bottom

    caption    "a red circle on a blue background"                 (centre)
               "a red circle on a blue background, on the left"    (the other four positions)

The centred scene is exactly what `trainer_core.demo.draw_shape_image` and the tests' `write_shapes_dataset` draw,
so their datasets are in the model's distribution. HELD_OUT_PAIRS (colour, shape) never appear in pretraining, in any
background or position: they test that the model composes words it knows rather than looking captions up.

Things the transformer never sees are kept for the demo and the tests that teach a LoKr something new: the heart
and ring shapes and the colours of CONCEPT_COLOURS. The VAE, a codec, is trained on a wider set of scenes
(`vae_scene`: several shapes, any colour, size, place and rotation) that includes them, so that a learned concept
can show in pixels.
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

# red, blue, green and yellow are the demo's historical values (trainer_core.demo.COLOURS).
PALETTE: dict[str, RGB] = {
    "red": (220, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (235, 210, 40),
    "green": (40, 170, 70),
    "blue": (40, 70, 220),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
POSITIONS: tuple[str, ...] = ("centre", "left", "right", "top", "bottom")
POSITION_PHRASES: dict[str, str] = {"centre": "", "left": ", on the left", "right": ", on the right",
                                    "top": ", at the top", "bottom": ", at the bottom"}
# Centre of the shape's box, as fractions of the image side; the box is half the side, as in draw_shape_image.
POSITION_CENTRES: dict[str, tuple[float, float]] = {"centre": (0.5, 0.5), "left": (0.28, 0.5), "right": (0.72, 0.5),
                                                    "top": (0.5, 0.28), "bottom": (0.5, 0.72)}
SHAPE_FRACTION = 0.5

# (colour, shape) pairs absent from pretraining in every background and position.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (("green", "star"), ("purple", "circle"), ("orange", "square"),
                                               ("white", "triangle"))

# Never in the transformer's corpus (shapes, fills and colours for new concepts).
CONCEPT_SHAPES: tuple[str, ...] = ("heart", "ring")
CONCEPT_COLOURS: dict[str, RGB] = {"pink": (250, 120, 190), "teal": (20, 160, 160), "brown": (120, 70, 30)}


@dataclass(frozen=True)
class Scene:
    """One picture: a flat-colour shape on a flat-colour background."""

    shape: str
    colour: RGB
    background: RGB
    centre: tuple[float, float] = (0.5, 0.5)  # fractions of width, height
    extent: float = SHAPE_FRACTION  # box side as a fraction of the image side
    rotation: float = 0.0  # degrees, polygons only


@dataclass(frozen=True)
class CorpusItem:
    colour: str
    shape: str
    background: str
    position: str

    @property
    def caption(self) -> str:
        return caption_for(self.colour, self.shape, self.background, self.position)

    @property
    def scene(self) -> Scene:
        return Scene(shape=self.shape, colour=PALETTE[self.colour], background=PALETTE[self.background],
                     centre=POSITION_CENTRES[self.position])

    def draw(self, size: int) -> Image.Image:
        return draw_scene(self.scene, size)


def caption_for(colour: str, shape: str, background: str, position: str = "centre") -> str:
    return f"a {colour} {shape} on a {background} background{POSITION_PHRASES[position]}"


def all_items() -> list[CorpusItem]:
    """Every (colour, shape, background, position) of the grammar, held-out pairs included, in a fixed order."""
    return [CorpusItem(colour, shape, background, position)
            for shape, colour, background, position in itertools.product(SHAPES, PALETTE, PALETTE, POSITIONS)
            if background != colour]


def training_items() -> list[CorpusItem]:
    """What the transformer is pretrained on: everything but the held-out (colour, shape) pairs."""
    held = set(HELD_OUT_PAIRS)
    return [item for item in all_items() if (item.colour, item.shape) not in held]


def held_out_items() -> list[CorpusItem]:
    held = set(HELD_OUT_PAIRS)
    return [item for item in all_items() if (item.colour, item.shape) in held]


def tokenizer_captions() -> list[str]:
    """Captions the drawing model's tokenizers are trained on: the whole grammar, so every word is one piece."""
    return [item.caption for item in all_items()]


# ------------------------------------------------------------------------------------------------------- drawing


def _polygon(shape: str, cx: float, cy: float, half: float, rotation: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif shape == "triangle":
        pts = [(0, -1), (1, 0.8), (-1, 0.8)]
    elif shape == "diamond":
        pts = [(0, -1), (1, 0), (0, 1), (-1, 0)]
    elif shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.42
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a) + 0.1))
    elif shape == "cross":
        w = 0.36
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w),
               (-w, -w)]
    elif shape == "heart":
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 17.0, -y / 17.0 - 0.05))
    else:
        raise ValueError(f"unknown polygon shape {shape!r}")
    c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    return [(cx + half * (x * c - y * s), cy + half * (x * s + y * c)) for x, y in pts]


def shape_mask(scene: Scene, size: int) -> Image.Image:
    """The shape's pixels as an 'L' image (255 inside)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    side = scene.extent * size
    cx, cy = scene.centre[0] * size, scene.centre[1] * size
    # The same integer box as draw_shape_image for the centred half-size shape.
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    x1, y1 = int(round(cx + side / 2)), int(round(cy + side / 2))
    if scene.shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif scene.shape == "ring":
        draw.ellipse([x0, y0, x1, y1], fill=255)
        inset = max(1, int(round(side * 0.22)))
        draw.ellipse([x0 + inset, y0 + inset, x1 - inset, y1 - inset], fill=0)
    elif scene.shape == "square" and scene.rotation == 0:
        draw.rectangle([x0, y0, x1, y1], fill=255)
    else:
        draw.polygon(_polygon(scene.shape, (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, scene.rotation), fill=255)
    return mask


def draw_scene(scene: Scene, size: int) -> Image.Image:
    return draw_layers([scene], size)


# --------------------------------------------------------------------------------------------- VAE training data


def _random_colour(rng: random.Random) -> RGB:
    named = list(PALETTE.values()) + list(CONCEPT_COLOURS.values())
    if rng.random() < 0.6:
        return rng.choice(named)
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def vae_scene(rng: random.Random) -> list[Scene]:
    """A random scene for the codec: one to three shapes (any shape, fill, colour, size, place) on a background.
    Returned as layers drawn in order (the first one's background is the picture's)."""
    background = _random_colour(rng)
    layers = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        colour = _random_colour(rng)
        while colour == background:
            colour = _random_colour(rng)
        layers.append(Scene(shape=rng.choice(SHAPES + CONCEPT_SHAPES), colour=colour, background=background,
                            centre=(rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85)),
                            extent=rng.uniform(0.2, 0.7), rotation=rng.choice((0.0, 0.0, rng.uniform(0, 360)))))
    return layers


def draw_layers(layers: list[Scene], size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), layers[0].background)
    for scene in layers:
        img.paste(scene.colour, (0, 0, size, size), shape_mask(scene, size))
    return img


def to_tensor(images: list[Image.Image]):
    """PIL RGB images -> float32 (B, 3, H, W) in [-1, 1] (the trainer's pixel range)."""
    import torch

    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0
