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
from .buckets import (MAX_BUCKET_ASPECT, aspect_bucket, bucket_for_size, check_resolution_fits, image_tokens,
                      is_over, is_under_minimum)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")

CAPTION_EXTENSION = ".txt"
# Both HiDream text paths stop at 128 tokens; far longer captions only cost memory and cache-key hashing.
MAX_CAPTION_CHARS = 8192
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
    """What `discover_dataset` used, what it changed on the way (`notes`, `shrunk`) and what it left out."""

    dataset_id: str
    used: int
    skipped: list[SkippedFile] = field(default_factory=list)
    notes: list[SkippedFile] = field(default_factory=list)  # used files, with what was done to them
    # (bucket by SimpleTuner's rules, the bucket it was shrunk to) -> images, when over the transformer's limit
    shrunk: dict[tuple[tuple[int, int], tuple[int, int]], int] = field(default_factory=dict)
    max_tokens: Optional[int] = None  # the transformer's image-token limit the buckets were fitted under

    def format(self) -> str:
        """Human-readable summary: each shrunk bucket once, then one skipped (then one noted) file per line."""
        noun = "image" if self.used == 1 else "images"
        head = f"dataset '{self.dataset_id}': {self.used} {noun} used, {len(self.skipped)} skipped"
        if not self.skipped and not self.notes and not self.shrunk:
            return head + "."
        lines = [f"  {count} image{'s' if count > 1 else ''}: bucket {a[0]}x{a[1]} ({image_tokens(a)} image "
                 f"tokens) shrunk to {b[0]}x{b[1]} ({image_tokens(b)}), the transformer takes at most "
                 f"{self.max_tokens}" for (a, b), count in sorted(self.shrunk.items())]
        lines += [f"  {display_path(item.path)}: {item.reason}" for item in self.skipped]
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


def _check_dataset_config(config: DatasetConfig, root: Path, max_tokens: Optional[int]) -> None:
    """Reject settings that would fail for every image, before touching any file."""
    config.validate()
    if not root.exists():
        raise ConfigError(f"dataset '{config.id}': instance_data_dir {str(root)!r} does not exist")
    if not root.is_dir():
        raise ConfigError(f"dataset '{config.id}': instance_data_dir {str(root)!r} is not a directory")
    if max_tokens is not None:
        check_resolution_fits(config.resolution, max_tokens, f"dataset '{config.id}'")


def _missing_captions_error(config: DatasetConfig, missing: list[Path]) -> ConfigError:
    first = missing[0].with_suffix(CAPTION_EXTENSION)
    others = f" (and {len(missing) - 1} more images without one)" if len(missing) > 1 else ""
    return ConfigError(
        f"dataset '{config.id}': caption file {str(first)!r} is missing{others}. "
        "Add the .txt captions, or set `caption_fallback_to_filename: true` (or `caption_strategy: filename`) "
        "to caption from the file name."
    )


def discover_dataset(config: DatasetConfig, seed: int = 0, max_tokens: Optional[int] = None) -> ImageDataset:
    """Find every usable image under `config.instance_data_dir` and fix its caption, bucket and crop.

    `seed` only affects `crop_style="random"` offsets, which are derived from (seed, dataset id, relative
    path) so they are identical on every run with the same seed. `max_tokens` is the transformer's image-token
    limit (`hidream.image_token_limit`): a bucket over it is shrunk (and said so in the report), a resolution
    whose square bucket is over it is a ConfigError; None: no limit.
    """
    root = Path(config.instance_data_dir).expanduser()
    _check_dataset_config(config, root, max_tokens)

    samples: list[TrainingSample] = []
    report = DiscoveryReport(dataset_id=config.id, used=0, max_tokens=max_tokens)
    missing_captions: list[Path] = []
    for path in _walk_files(root):
        suffix = path.suffix.lower()
        if suffix == CAPTION_EXTENSION:
            continue
        if suffix not in IMAGE_EXTENSIONS:
            report.skipped.append(SkippedFile(path, f"unsupported file type {suffix or '(no extension)'}"))
            continue
        notes: list[str] = []
        try:
            sample = _make_sample(path, root, config, seed, notes, max_tokens, report.shrunk)
        except _UnusableImage as exc:
            report.skipped.append(SkippedFile(path, str(exc)))
            continue
        if sample is None:
            missing_captions.append(path)
            continue
        samples.append(sample)
        report.notes.extend(SkippedFile(path, note) for note in notes)

    if missing_captions:
        raise _missing_captions_error(config, missing_captions)
    report.used = len(samples)
    if not samples:
        raise ConfigError(
            f"dataset '{config.id}': no usable images in instance_data_dir {str(root)!r} "
            f"(supported: {', '.join(IMAGE_EXTENSIONS)}).\n{report.format()}"
        )
    return ImageDataset(config=config, samples=samples, report=report)


def _make_sample(path: Path, root: Path, config: DatasetConfig, seed: int, notes: list[str],
                 max_tokens: Optional[int], shrunk: dict) -> Optional[TrainingSample]:
    """Build the sample for one image file; None when its caption file is missing (reported by caller).
    What was changed to make it usable (caption cleaning, first frame of an animation) goes to `notes`, a bucket
    fitted under `max_tokens` is counted in `shrunk` ((bucket, fitted) -> images)."""
    width, height, frames = _probe_image(path)
    if frames > 1:
        notes.append(f"animated ({frames} frames): the first frame is used")
    square_crop = config.crop and config.crop_aspect == "square"
    if is_under_minimum(width, height, config.minimum_image_size, config.resolution_type, square_crop):
        minimum = config.minimum_image_size
        what = f"{minimum}" if config.resolution_type == "pixel" else f"{minimum}x{minimum} in area"
        raise _UnusableImage(f"smaller than minimum_image_size ({width}x{height} < {what})")

    caption = _caption_for(path, config, notes)
    if caption is None:
        return None

    # SimpleTuner's maximum_image_size / target_downsample_size: only crops first resize a large image to the
    # target, so the bucket is cut out of that rather than out of the image just covering it.
    downsample = (config.target_downsample_size if config.crop and config.maximum_image_size and
                  is_over(width, height, config.maximum_image_size, config.resolution_type) else None)
    rules = (config.resolution, config.resolution_type, config.crop, config.crop_aspect, config.aspect_bucket_rounding)
    bucket, resize_to = bucket_for_size(width, height, *rules, max_tokens=max_tokens, downsample_to=downsample)
    if max(bucket) / min(bucket) > MAX_BUCKET_ASPECT:
        raise _UnusableImage(f"aspect ratio {width}x{height} is beyond {MAX_BUCKET_ASPECT:g}:1; crop it, or set "
                             "crop: true with crop_aspect: square")
    unlimited = aspect_bucket(width, height, *rules)
    if unlimited != bucket:
        shrunk[(unlimited, bucket)] = shrunk.get((unlimited, bucket), 0) + 1
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
