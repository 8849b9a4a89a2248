"""Image datasets: discovery, captions, aspect buckets, pixel loading and bucket-pure batching.

The flow is:

1. `discover_dataset` walks one folder, checks every image can really be decoded, reads its caption and
   decides (once, deterministically) its bucket, resize size and crop box -> `ImageDataset`.
2. `load_sample_pixels` turns one `TrainingSample` into a float tensor of shape (3, H, W) in [-1, 1],
   where (W, H) is the sample's bucket.
3. `BucketBatches` yields batches in which every sample shares one bucket, so a batch stacks into
   (B, 3, H, W) without padding. It is seeded and resumable.

All geometry is decided at discovery time and stored on the sample, so a latent cache keyed on
`TrainingSample.cache_key_fields()` stays valid across runs with the same seed.
"""
from __future__ import annotations

import math
import os
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image, ImageOps

from ..config.schema import ConfigError, DatasetConfig

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
# HiDream's VAE downsamples by 8 and the transformer patchifies 2x2 latents, so one token covers 16 px.
BUCKET_STEP = 16

CAPTION_EXTENSION = ".txt"
# Both HiDream text paths stop at 128 tokens; far longer captions only cost memory and cache-key hashing.
MAX_CAPTION_CHARS = 8192
# Buckets further from square than this are skipped: a 20000x16 strip would become a 1-token-tall bucket wider
# than the model's positional range, and no prompt describes such an image usefully.
MAX_BUCKET_ASPECT = 4.0
_RESOLUTION_TYPES = ("pixel_area", "pixel")
_CROP_STYLES = ("center", "random")
_CROP_ASPECTS = ("square", "preserve")
_WHITE = (255, 255, 255)


# --------------------------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CropBox:
    """A crop rectangle in the *resized* image's pixel coordinates (right/bottom exclusive, as in Pillow)."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the box."""
        return (self.right - self.left, self.bottom - self.top)

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.left, self.top, self.right, self.bottom)


@dataclass(frozen=True)
class TrainingSample:
    """One usable image and everything needed to reproduce its training pixels.

    Pixels are produced as: open -> EXIF orientation -> RGB -> resize to `resize_to` -> crop `crop`,
    which yields an image of size `bucket` (width, height).
    """

    image_path: Path
    caption: str
    dataset_id: str
    bucket: tuple[int, int]
    resize_to: tuple[int, int]
    crop: CropBox
    is_regularisation: bool

    def cache_key_fields(self) -> dict:
        """Everything except the file's bytes that changes the training pixels (JSON-serialisable).

        The caption is deliberately absent: it does not change the latent. So is the file's path: the same image
        with the same transform has the same latent wherever it lives, so a moved dataset hits the cache and the
        posterior sample seeded from the key (and with it the trained LoKr) does not depend on the folder.
        """
        return {
            "bucket": list(self.bucket),
            "resize_to": list(self.resize_to),
            "crop": list(self.crop.as_tuple()),
        }


@dataclass
class SkippedFile:
    """A file in the dataset folder that will not be trained on, and why."""

    path: Path
    reason: str


@dataclass
class DiscoveryReport:
    """What `discover_dataset` used, what it changed on the way (`notes`) and what it left out."""

    dataset_id: str
    used: int
    skipped: list[SkippedFile] = field(default_factory=list)
    notes: list[SkippedFile] = field(default_factory=list)  # used files, with what was done to them

    def format(self) -> str:
        """Human-readable summary, one skipped (then one noted) file per line."""
        noun = "image" if self.used == 1 else "images"
        head = f"dataset '{self.dataset_id}': {self.used} {noun} used, {len(self.skipped)} skipped"
        if not self.skipped and not self.notes:
            return head + "."
        lines = [f"  {display_path(item.path)}: {item.reason}" for item in self.skipped]
        lines += [f"  {display_path(item.path)} (used): {item.reason}" for item in self.notes]
        return head + ":\n" + "\n".join(lines)


@dataclass
class ImageDataset:
    """The usable images of one dataset folder. `samples` holds each image once; repeats are not expanded."""

    config: DatasetConfig
    samples: list[TrainingSample]
    report: DiscoveryReport


class _UnusableImage(Exception):
    """Internal: the file cannot be trained on; the message is the short reason for the report."""


# --------------------------------------------------------------------------------------------------------
# Bucket geometry
# --------------------------------------------------------------------------------------------------------


def _round_to_step(value: float) -> int:
    """Nearest positive multiple of BUCKET_STEP (half rounds up, never below one step)."""
    return max(BUCKET_STEP, int(math.floor(value / BUCKET_STEP + 0.5)) * BUCKET_STEP)


def _floor_to_step(value: int) -> int:
    return max(BUCKET_STEP, (value // BUCKET_STEP) * BUCKET_STEP)


def _cover_size(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """Smallest aspect-preserving size of a (width, height) image that covers `bucket` on both sides.

    One side equals the bucket side exactly; the other is >= its bucket side.
    """
    bucket_w, bucket_h = bucket
    # Compare bucket_w / width with bucket_h / height in integers to avoid float ties.
    if bucket_w * height >= bucket_h * width:
        return bucket_w, max(bucket_h, round(height * bucket_w / width))
    return max(bucket_w, round(width * bucket_h / height)), bucket_h


def bucket_for_size(
    width: int,
    height: int,
    resolution: int,
    resolution_type: str,
    crop: bool,
    crop_aspect: str,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Choose the training size of an image of (width, height) pixels (already EXIF-oriented).

    Returns `(bucket, resize_to)`, both (width, height):
      - `bucket`: the final training size; both sides are positive multiples of BUCKET_STEP.
      - `resize_to`: the size the image is resized to so it covers the bucket (aspect kept); the bucket
        is then cropped out of it.

    Rules: `crop` with `crop_aspect="square"` gives a (R, R) bucket, R = resolution floored to a multiple
    of 16. Otherwise the bucket keeps the image aspect: `pixel_area` targets an area of resolution², and
    `pixel` scales the short side to `resolution`. Small images are upscaled to cover the bucket.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if resolution < BUCKET_STEP:
        raise ConfigError(f"resolution must be at least {BUCKET_STEP} pixels, got {resolution}")
    if resolution_type not in _RESOLUTION_TYPES:
        raise ConfigError(f"resolution_type must be one of {list(_RESOLUTION_TYPES)}, got {resolution_type!r}")
    if crop_aspect not in _CROP_ASPECTS:
        raise ConfigError(f"crop_aspect must be one of {list(_CROP_ASPECTS)}, got {crop_aspect!r}")

    if crop and crop_aspect == "square":
        side = _floor_to_step(resolution)
        bucket = (side, side)
    elif resolution_type == "pixel_area":
        area = resolution * resolution
        bucket_w = _round_to_step(math.sqrt(area * width / height))
        bucket = (bucket_w, _round_to_step(area / bucket_w))
    else:  # "pixel": short side -> resolution
        short, long = min(width, height), max(width, height)
        bucket_short = _round_to_step(resolution)
        bucket_long = _round_to_step(resolution * long / short)
        bucket = (bucket_long, bucket_short) if width >= height else (bucket_short, bucket_long)

    return bucket, _cover_size(width, height, bucket)


def _crop_box(
    resize_to: tuple[int, int], bucket: tuple[int, int], style: str, rng: Optional[random.Random]
) -> CropBox:
    """Place a bucket-sized box inside the resized image: centred, or at a seeded random offset."""
    spare_w = resize_to[0] - bucket[0]
    spare_h = resize_to[1] - bucket[1]
    if style == "random" and rng is not None:
        left, top = rng.randint(0, spare_w), rng.randint(0, spare_h)
    else:
        left, top = spare_w // 2, spare_h // 2
    return CropBox(left, top, left + bucket[0], top + bucket[1])


def _limit_short_side(width: int, height: int, maximum: Optional[int]) -> tuple[int, int]:
    """Downscale (width, height) so the short side is <= `maximum`; never upscales."""
    if not maximum or min(width, height) <= maximum:
        return width, height
    scale = maximum / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


# --------------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------------


def display_path(path: Path) -> str:
    """`path` as printable UTF-8 text: bytes that are not UTF-8 in a file name become \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _walk_files(root: Path) -> list[Path]:
    """All non-hidden files under `root`, sorted by relative path.

    Directory symlinks are followed once: a directory whose real path was already visited (a symlink
    loop, or two links to one folder) is not entered again.
    """
    found: list[Path] = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        visited.add(os.path.realpath(dirpath))
        kept = []
        for name in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, name))
            if _is_hidden(name) or real in visited:
                continue
            visited.add(real)
            kept.append(name)
        # os.walk descends into whatever is left in `dirnames`, so prune it in place.
        dirnames[:] = kept
        found.extend(Path(dirpath) / name for name in filenames if not _is_hidden(name))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _probe_image(path: Path) -> tuple[int, int, int]:
    """Fully decode an image and return its (width, height) after EXIF orientation, and its frame count.

    Raises `_UnusableImage` with a short reason for anything that cannot be trained on.
    """
    try:
        if path.stat().st_size == 0:
            raise _UnusableImage("zero-byte file")
    except OSError as exc:
        raise _UnusableImage(f"cannot read: {exc.strerror or exc}") from exc

    # Decoders raise a wide mix of types (OSError, SyntaxError, ValueError, struct.error, EOFError,
    # DecompressionBombError ...) for broken files; any of them means "skip this file".
    try:
        with Image.open(path) as image:
            image.verify()
        # verify() leaves the image unusable and misses truncation, so decode a fresh copy in full.
        with Image.open(path) as image:
            image.load()
            oriented = ImageOps.exif_transpose(image)
            return (*oriented.size, getattr(image, "n_frames", 1))
    except Image.DecompressionBombError as exc:
        raise _UnusableImage(f"too large to decode safely ({exc}); downscale it first") from exc
    except Exception as exc:  # noqa: BLE001 - see comment above
        message = str(exc) or type(exc).__name__
        raise _UnusableImage(f"cannot decode: {message}") from exc


def _collapse_whitespace(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _clean_caption(text: str, notes: list[str]) -> str:
    """Control characters out (terminal escapes, NUL, bell), whitespace collapsed, length capped; what changed is
    appended to `notes` for the discovery report."""
    cleaned = _CONTROL_CHARACTERS.sub("", text)
    if cleaned != text:
        notes.append(f"{len(text) - len(cleaned)} control characters removed from the caption")
    cleaned = _collapse_whitespace(cleaned)
    if len(cleaned) > MAX_CAPTION_CHARS:
        notes.append(f"caption cut from {len(cleaned)} to {MAX_CAPTION_CHARS} characters (the text encoders read "
                     "128 tokens)")
        cleaned = cleaned[:MAX_CAPTION_CHARS].rstrip()
    if not cleaned:
        notes.append("empty caption: the image trains unconditioned, like caption dropout")
    return cleaned


def _read_caption_file(path: Path) -> str:
    data = path.read_bytes()
    try:
        if b"\x00" in data:
            raise UnicodeDecodeError("utf-8", data, data.index(b"\x00"), data.index(b"\x00") + 1, "NUL byte")
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _UnusableImage(f"caption file {path.name!r} is not UTF-8 text (byte {exc.start}: {exc.reason}); "
                             "save it as UTF-8") from exc


def _filename_caption(path: Path) -> str:
    return _collapse_whitespace(path.stem.replace("_", " "))


def _caption_for(path: Path, config: DatasetConfig, notes: list[str]) -> Optional[str]:
    """The caption of one image, or None when the `textfile` caption is missing and there is no fallback."""
    strategy = config.caption_strategy
    if strategy == "filename":
        return _clean_caption(_filename_caption(path), notes)
    if strategy == "instanceprompt":
        return _clean_caption(config.instance_prompt or "", notes)
    text_path = path.with_suffix(CAPTION_EXTENSION)
    if text_path.is_file():
        return _clean_caption(_read_caption_file(text_path), notes)
    if config.caption_fallback_to_filename:
        return _clean_caption(_filename_caption(path), notes)
    return None


def _check_dataset_config(config: DatasetConfig, root: Path) -> None:
    """Reject settings that would fail for every image, before touching any file."""
    if not root.exists():
        raise ConfigError(f"dataset '{config.id}': instance_data_dir {str(root)!r} does not exist")
    if not root.is_dir():
        raise ConfigError(f"dataset '{config.id}': instance_data_dir {str(root)!r} is not a directory")
    if config.caption_strategy not in ("filename", "textfile", "instanceprompt"):
        raise ConfigError(
            f"dataset '{config.id}': caption_strategy must be 'filename', 'textfile' or 'instanceprompt', "
            f"got {config.caption_strategy!r}"
        )
    if config.caption_strategy == "instanceprompt" and not (config.instance_prompt or "").strip():
        raise ConfigError(
            f"dataset '{config.id}': caption_strategy 'instanceprompt' needs a non-empty instance_prompt"
        )
    if config.crop_style not in _CROP_STYLES:
        raise ConfigError(
            f"dataset '{config.id}': crop_style must be one of {list(_CROP_STYLES)}, got {config.crop_style!r}"
        )
    if config.repeats < 0:
        raise ConfigError(f"dataset '{config.id}': repeats must be >= 0, got {config.repeats}")


def _missing_captions_error(config: DatasetConfig, missing: list[Path]) -> ConfigError:
    first = missing[0].with_suffix(CAPTION_EXTENSION)
    others = f" (and {len(missing) - 1} more images without one)" if len(missing) > 1 else ""
    return ConfigError(
        f"dataset '{config.id}': caption file {str(first)!r} is missing{others}. "
        "Add the .txt captions, or set `caption_fallback_to_filename: true` (or `caption_strategy: filename`) "
        "to caption from the file name."
    )


def discover_dataset(config: DatasetConfig, seed: int = 0) -> ImageDataset:
    """Find every usable image under `config.instance_data_dir` and fix its caption, bucket and crop.

    `seed` only affects `crop_style="random"` offsets, which are derived from (seed, dataset id, relative
    path) so they are identical on every run with the same seed.
    """
    root = Path(config.instance_data_dir).expanduser()
    _check_dataset_config(config, root)

    samples: list[TrainingSample] = []
    skipped: list[SkippedFile] = []
    noted: list[SkippedFile] = []
    missing_captions: list[Path] = []
    for path in _walk_files(root):
        suffix = path.suffix.lower()
        if suffix == CAPTION_EXTENSION:
            continue
        if suffix not in IMAGE_EXTENSIONS:
            skipped.append(SkippedFile(path, f"unsupported file type {suffix or '(no extension)'}"))
            continue
        notes: list[str] = []
        try:
            sample = _make_sample(path, root, config, seed, notes)
        except _UnusableImage as exc:
            skipped.append(SkippedFile(path, str(exc)))
            continue
        if sample is None:
            missing_captions.append(path)
            continue
        samples.append(sample)
        noted.extend(SkippedFile(path, note) for note in notes)

    if missing_captions:
        raise _missing_captions_error(config, missing_captions)
    report = DiscoveryReport(dataset_id=config.id, used=len(samples), skipped=skipped, notes=noted)
    if not samples:
        raise ConfigError(
            f"dataset '{config.id}': no usable images in instance_data_dir {str(root)!r} "
            f"(supported: {', '.join(IMAGE_EXTENSIONS)}).\n{report.format()}"
        )
    return ImageDataset(config=config, samples=samples, report=report)


def _make_sample(path: Path, root: Path, config: DatasetConfig, seed: int, notes: list[str]
                 ) -> Optional[TrainingSample]:
    """Build the sample for one image file; None when its caption file is missing (reported by caller).
    What was changed to make it usable (caption cleaning, first frame of an animation) goes to `notes`."""
    width, height, frames = _probe_image(path)
    if frames > 1:
        notes.append(f"animated ({frames} frames): the first frame is used")
    minimum = config.minimum_image_size or 0
    if minimum and min(width, height) < minimum:
        raise _UnusableImage(f"smaller than minimum_image_size ({width}x{height} < {minimum})")

    caption = _caption_for(path, config, notes)
    if caption is None:
        return None

    if config.maximum_image_size and config.target_downsample_size and min(width, height) > config.maximum_image_size:
        # SimpleTuner's meaning: an image over maximum_image_size is first shrunk to target_downsample_size.
        width, height = _limit_short_side(width, height, config.target_downsample_size)
    else:
        width, height = _limit_short_side(width, height, config.maximum_image_size)
    bucket, resize_to = bucket_for_size(
        width, height, config.resolution, config.resolution_type, config.crop, config.crop_aspect
    )
    aspect = max(bucket) / min(bucket)
    if aspect > MAX_BUCKET_ASPECT:
        raise _UnusableImage(f"aspect ratio {width}x{height} is beyond {MAX_BUCKET_ASPECT:g}:1; crop it, or set "
                             "crop: true with crop_aspect: square")
    relative = path.relative_to(root).as_posix()
    # A string seed is hashed with SHA-512 by `random`, so it does not depend on PYTHONHASHSEED.
    rng = random.Random(f"{seed}\0{config.id}\0{relative}") if config.crop else None
    style = config.crop_style if config.crop else "center"
    return TrainingSample(
        image_path=path,
        caption=caption,
        dataset_id=config.id,
        bucket=bucket,
        resize_to=resize_to,
        crop=_crop_box(resize_to, bucket, style, rng),
        is_regularisation=config.is_regularisation_data,
    )


# --------------------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------------------


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit grayscale ("I;16*" or "I") -> 8-bit "L" by scaling 0..65535 to 0..255.

    Pillow's own convert("L") clips these modes at 255, which turns most of the image white.
    """
    values = np.asarray(image).astype(np.float64)
    scaled = np.clip(values, 0, 65535) / 257.0
    return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")


def _float_to_l(image: Image.Image) -> Image.Image:
    """Float grayscale ("F"): values in [0, 1] are treated as normalised, anything larger as 0..255."""
    values = np.asarray(image).astype(np.float64)
    if values.size and np.nanmax(values) <= 1.0:
        values = values * 255.0
    values = np.nan_to_num(np.clip(values, 0, 255))
    return Image.fromarray(np.rint(values).astype(np.uint8), mode="L")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparent areas become white, not black."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        return _high_bit_depth_to_l(image).convert("RGB")
    if mode == "F":
        return _float_to_l(image).convert("RGB")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _pixels_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image (W, H) -> float32 tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32)
    return tensor / 127.5 - 1.0


def load_sample_pixels(sample: TrainingSample) -> torch.Tensor:
    """Decode one sample into a float32 tensor of shape (3, H, W) in [-1, 1], (W, H) = `sample.bucket`."""
    with Image.open(sample.image_path) as image:
        image = ImageOps.exif_transpose(image)
        rgb = _to_rgb(image)
        # Resize the whole image once to the size decided at discovery, so pixels match the cache key.
        resized = rgb.resize(sample.resize_to, Image.Resampling.LANCZOS)
    cropped = resized.crop(sample.crop.as_tuple())
    if cropped.size != sample.bucket:
        raise ValueError(
            f"{sample.image_path}: crop {sample.crop} of a {resized.size} image does not give bucket {sample.bucket}"
        )
    return _pixels_to_tensor(cropped)


# --------------------------------------------------------------------------------------------------------
# Sample counts and batching
# --------------------------------------------------------------------------------------------------------


def _repeats(dataset: ImageDataset) -> int:
    return max(0, int(dataset.config.repeats))


def check_enough_samples(datasets: list[ImageDataset], needed: int) -> None:
    """Raise ConfigError when all datasets together (repeats included) hold fewer than `needed` samples.

    `needed` is train_batch_size x gradient_accumulation_steps.
    """
    total = sum(len(d.samples) * (_repeats(d) + 1) for d in datasets)
    if total >= needed:
        return
    ids = [d.config.id for d in datasets]
    images = sum(len(d.samples) for d in datasets)
    # Smallest uniform `repeats` for which images x (repeats + 1) >= needed.
    suggestion = f" (e.g. repeats: {max(0, math.ceil(needed / images) - 1)})" if images else ""
    raise ConfigError(
        f"only {total} training samples were found across datasets {ids} but "
        f"train_batch_size x gradient_accumulation_steps = {needed} needs at least {needed}; "
        f"raise `repeats` in the dataset config{suggestion} or lower the batch size"
    )


class BucketBatches:
    """Seeded, resumable iterator of batches; every batch holds samples of one bucket only.

    Each epoch, every bucket's samples (repeats expanded) are shuffled and cut into full batches, the
    remainder is dropped, and the order of all batches is shuffled. Epoch `e` depends only on
    (seed, e), so `state_dict()` -> `load_state_dict()` resumes at exactly the next batch.

    Iteration is infinite and advances this object's own `epoch`/`position`, so iterate one at a time.
    """

    def __init__(self, datasets: list[ImageDataset], batch_size: int, seed: int):
        if batch_size < 1:
            raise ConfigError(f"train_batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._buckets = self._group_by_bucket(datasets)
        self._batches_per_epoch = sum(len(items) // batch_size for items in self._buckets.values())
        if self._batches_per_epoch == 0:
            raise self._no_full_batch_error(datasets)

    @staticmethod
    def _group_by_bucket(datasets: list[ImageDataset]) -> dict[tuple[int, int], list[TrainingSample]]:
        """Repeat-expanded samples per bucket, in a fixed order (sorted buckets, discovery order within)."""
        grouped: dict[tuple[int, int], list[TrainingSample]] = defaultdict(list)
        for dataset in datasets:
            for sample in dataset.samples:
                grouped[sample.bucket].extend([sample] * (_repeats(dataset) + 1))
        return {bucket: grouped[bucket] for bucket in sorted(grouped)}

    def _no_full_batch_error(self, datasets: list[ImageDataset]) -> ConfigError:
        if self._buckets:
            largest = max(self._buckets, key=lambda b: len(self._buckets[b]))
            detail = (
                f"the largest bucket {largest[0]}x{largest[1]} holds {len(self._buckets[largest])} samples "
                f"across {len(self._buckets)} buckets"
            )
        else:
            detail = "there are no samples at all"
        return ConfigError(
            f"no bucket holds train_batch_size = {self.batch_size} images (datasets "
            f"{[d.config.id for d in datasets]}: {detail}), so not a single batch can be formed. Raise "
            "`repeats` in the dataset config, use `crop: true` with `crop_aspect: square` so every image "
            "shares one bucket, or lower train_batch_size."
        )

    def batches_per_epoch(self) -> int:
        """Number of full batches in every epoch (buckets smaller than batch_size contribute none)."""
        return self._batches_per_epoch

    def _epoch_batches(self, epoch: int) -> list[list[TrainingSample]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        batches: list[list[TrainingSample]] = []
        for items in self._buckets.values():
            shuffled = list(items)
            rng.shuffle(shuffled)
            full = len(shuffled) - len(shuffled) % self.batch_size
            batches.extend(shuffled[i : i + self.batch_size] for i in range(0, full, self.batch_size))
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[TrainingSample]]:
        while True:
            batches = self._epoch_batches(self.epoch)
            while self.position < len(batches):
                batch = batches[self.position]
                # Advance before yielding: a state saved after receiving this batch resumes after it.
                self.position += 1
                yield batch
            self.epoch += 1
            self.position = 0

    def state_dict(self) -> dict:
        """{"epoch", "position"}: the next batch to yield is batch `position` of epoch `epoch`."""
        if self.position >= self._batches_per_epoch:
            return {"epoch": self.epoch + 1, "position": 0}
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`. A position past the end (the data set shrank) starts the next epoch."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or position < 0:
            raise ValueError(f"invalid BucketBatches state {state!r}")
        if position >= self._batches_per_epoch:
            epoch, position = epoch + 1, 0
        self.epoch, self.position = epoch, position
