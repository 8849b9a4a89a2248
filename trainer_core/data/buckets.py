"""Aspect buckets: the training size of every image, by SimpleTuner's rules, within the transformer's token limit.

Pure maths on (width, height) pairs; `datasets.py` applies it to the files it finds.

SimpleTuner's rules (its multiaspect/image.py and image_manipulation/training_sample.py, read at bc8e6ab7), as they
are followed here:

* the image's aspect ratio is rounded to `aspect_bucket_rounding` decimals (default 2) before a bucket is chosen, so
  photos of nearly the same shape share a bucket;
* `pixel_area`: a bucket of about resolution^2 pixels with that aspect, W = R * sqrt(a), H = R / sqrt(a), each side
  rounded to the bucket step; `pixel`: the short side is the resolution, the long one R * a (or R / a) rounded;
  an aspect that rounds to 1.0 gives the square R x R;
* `crop: true` with `crop_aspect: square`: the square R x R whatever the image;
* `minimum_image_size`: with `pixel` both sides must reach it; with `pixel_area` the image's area must reach its
  square (and, for square crops, both sides too);
* `maximum_image_size` + `target_downsample_size` (only with `crop: true`): an image over the maximum is first
  resized to the target (short side, or area target^2 for `pixel_area`), then the bucket is cropped out of it.

Where this differs (docs/simpletuner.md): SimpleTuner aligns HiDream's buckets to 64 px and caps them at its 1024^2
pixel canvas; here buckets are multiples of 16 px (what the model needs: VAE 8x, patch 2x2) and capped by the
loaded transformer's own token limit (`max_resolution` x latent / patch^2: 4096 tokens = 1024x1024 px for
HiDream-I1, 1024 = 512x512 px for the tiny model), read from its config. A bucket over the limit is shrunk to the
largest bucket under it whose sides are still the aspect's nearest 16 px rounding (`fit_to_token_limit`).
"""
from __future__ import annotations

import math
import typing
from functools import lru_cache
from typing import Optional

from ..config.schema import BUCKET_STEP, ConfigError, CropAspect, ResolutionType
# Buckets further from square than this are skipped: a 20000x16 strip would become a 1-token-tall bucket wider
# than the model's positional range, and no prompt describes such an image usefully.
MAX_BUCKET_ASPECT = 4.0
DEFAULT_ASPECT_ROUNDING = 2  # SimpleTuner's aspect_bucket_rounding default
RESOLUTION_TYPES = typing.get_args(ResolutionType)
CROP_ASPECTS = typing.get_args(CropAspect)

Size = tuple[int, int]  # (width, height)


def round_to_step(value: float) -> int:
    """Nearest positive multiple of BUCKET_STEP (half rounds up, never below one step)."""
    return max(BUCKET_STEP, int(math.floor(value / BUCKET_STEP + 0.5)) * BUCKET_STEP)


def floor_to_step(value: float) -> int:
    return max(BUCKET_STEP, int(value // BUCKET_STEP) * BUCKET_STEP)


def image_tokens(size: Size) -> int:
    """How many image tokens the transformer sees for a (width, height) bucket."""
    return (size[0] // BUCKET_STEP) * (size[1] // BUCKET_STEP)


def rounded_aspect(width: int, height: int, decimals: int = DEFAULT_ASPECT_ROUNDING) -> float:
    """width / height rounded to `decimals` (SimpleTuner's aspect_bucket_rounding); never rounded to 0."""
    exact = width / height
    return round(exact, decimals) or exact


def aspect_bucket(width: int, height: int, resolution: int, resolution_type: str, crop: bool = False,
                  crop_aspect: str = "square", aspect_rounding: int = DEFAULT_ASPECT_ROUNDING) -> Size:
    """The (width, height) bucket of an image of (width, height) pixels by SimpleTuner's rules (module docstring),
    before any token limit. Both sides are positive multiples of BUCKET_STEP."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if resolution < BUCKET_STEP:
        raise ConfigError(f"resolution must be at least {BUCKET_STEP} pixels, got {resolution}")
    if resolution_type not in RESOLUTION_TYPES:
        raise ConfigError(f"resolution_type must be one of {list(RESOLUTION_TYPES)}, got {resolution_type!r}")
    if crop_aspect not in CROP_ASPECTS:
        raise ConfigError(f"crop_aspect must be one of {list(CROP_ASPECTS)}, got {crop_aspect!r}")
    edge = floor_to_step(resolution)
    if crop and crop_aspect == "square":
        return edge, edge
    aspect = rounded_aspect(width, height, aspect_rounding)
    if aspect == 1.0:
        return edge, edge
    if resolution_type == "pixel_area":
        bucket = round_to_step(edge * math.sqrt(aspect)), round_to_step(edge / math.sqrt(aspect))
    elif width >= height:  # "pixel": the short side is the resolution
        bucket = round_to_step(int(edge * aspect)), edge
    else:
        bucket = edge, round_to_step(int(edge / aspect))
    return (edge, edge) if rounded_aspect(*bucket, aspect_rounding) == 1.0 else bucket


@lru_cache(maxsize=4096)
def fit_to_token_limit(bucket: Size, aspect: float, max_tokens: int) -> Size:
    """`bucket` when it has at most `max_tokens` image tokens; else the largest bucket within the limit whose sides
    are the nearest 16 px rounding of `aspect` (width / height) for one of them, the closest aspect among equals.

    E.g. at 512 px pixel_area under the tiny model's 1024 tokens: 3:2 is 624x416 (39x26 = 1014 tokens) and fits;
    4:3 is 592x448 (37x28 = 1036) and becomes 576x432 (36x27 = 972), the same aspect.
    """
    if image_tokens(bucket) <= max_tokens:
        return bucket
    candidates = set()
    for n in range(1, max_tokens + 1):  # n token columns and the rows the aspect gives them; then n rows
        rows = max(1, math.floor(n / aspect + 0.5))
        if n * rows <= max_tokens:
            candidates.add((n, rows))
        cols = max(1, math.floor(n * aspect + 0.5))
        if cols * n <= max_tokens:
            candidates.add((cols, n))
    cols, rows = max(candidates, key=lambda c: (c[0] * c[1], -abs(math.log(c[0] / c[1] / aspect))))
    return cols * BUCKET_STEP, rows * BUCKET_STEP


def square_tokens(resolution: int) -> int:
    """Image tokens of the square bucket a resolution asks for (the smallest bucket of every resolution type)."""
    edge = floor_to_step(resolution)
    return image_tokens((edge, edge))


def largest_square_side(max_tokens: int) -> int:
    """The side in pixels of the largest square bucket within `max_tokens` image tokens."""
    return math.isqrt(max_tokens) * BUCKET_STEP


def check_resolution_fits(resolution: int, max_tokens: int, what: str) -> None:
    """A resolution whose square bucket alone is over the transformer's token limit cannot be trained at all (every
    bucket would be shrunk, most far from its resolution): a ConfigError naming the limit and the fix."""
    needed = square_tokens(resolution)
    if needed > max_tokens:
        side = largest_square_side(max_tokens)
        raise ConfigError(
            f"{what}: resolution {resolution} asks for buckets of {needed} image tokens or more, but this transformer "
            f"takes at most {max_tokens} ({side}x{side} px: its config's max_resolution latent size over its patch "
            f"size). Set resolution to {side} or less (buckets of other aspects are then fitted under the limit)")


def cover_size(width: int, height: int, bucket: Size) -> Size:
    """Smallest aspect-preserving size of a (width, height) image that covers `bucket` on both sides.

    One side equals the bucket side exactly; the other is >= its bucket side.
    """
    bucket_w, bucket_h = bucket
    # Compare bucket_w / width with bucket_h / height in integers to avoid float ties.
    if bucket_w * height >= bucket_h * width:
        return bucket_w, max(bucket_h, round(height * bucket_w / width))
    return max(bucket_w, round(width * bucket_h / height)), bucket_h


def scaled_to(width: int, height: int, target: int, resolution_type: str) -> Size:
    """(width, height) resized, aspect kept, so that its short side (`pixel`) or its area (`pixel_area`: target^2)
    is `target`."""
    scale = target / min(width, height) if resolution_type == "pixel" else target / math.sqrt(width * height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def is_over(width: int, height: int, size: int, resolution_type: str) -> bool:
    """Whether an image is larger than `size`: a side over it (`pixel`), or an area over size^2 (`pixel_area`)."""
    return max(width, height) > size if resolution_type == "pixel" else width * height > size * size


def is_under_minimum(width: int, height: int, minimum: int, resolution_type: str, square_crop: bool) -> bool:
    """SimpleTuner's minimum_image_size: both sides (`pixel`), or the area and, for square crops, both sides too
    (`pixel_area`)."""
    if not minimum:
        return False
    if resolution_type == "pixel" or square_crop:
        if min(width, height) < minimum:
            return True
    return resolution_type == "pixel_area" and width * height < minimum * minimum


def bucket_for_size(width: int, height: int, resolution: int, resolution_type: str, crop: bool, crop_aspect: str,
                    aspect_rounding: int = DEFAULT_ASPECT_ROUNDING, max_tokens: Optional[int] = None,
                    downsample_to: Optional[int] = None) -> tuple[Size, Size]:
    """The training size of an image of (width, height) pixels (already EXIF-oriented): `(bucket, resize_to)`.

    `bucket` is `aspect_bucket` fitted under `max_tokens` image tokens (None: no limit); `resize_to` the size the
    image is resized to before the bucket is cropped out of it: the smallest aspect-preserving size covering the
    bucket, or (`downsample_to`, SimpleTuner's target_downsample_size for an image over maximum_image_size) that
    size when it covers the bucket. Small images are upscaled to cover it.
    """
    bucket = aspect_bucket(width, height, resolution, resolution_type, crop, crop_aspect, aspect_rounding)
    if max_tokens is not None:
        bucket = fit_to_token_limit(bucket, rounded_aspect(*bucket, 6) if crop and crop_aspect == "square"
                                    else rounded_aspect(width, height, aspect_rounding), max_tokens)
    resize_to = cover_size(width, height, bucket)
    if downsample_to:
        wanted = scaled_to(width, height, downsample_to, resolution_type)
        if wanted[0] >= bucket[0] and wanted[1] >= bucket[1]:
            resize_to = wanted
    return bucket, resize_to
