"""Tests for trainer_core.data.datasets, on small real image files written with Pillow."""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer_core.config import ConfigError, DatasetConfig
from trainer_core.data.buckets import BUCKET_STEP, bucket_for_size
from trainer_core.data.datasets import (
    BucketBatches,
    CropBox,
    DiscoveryReport,
    ImageDataset,
    SkippedFile,
    TrainingSample,
    check_enough_samples,
    discover_dataset,
    load_sample_pixels,
)

# ---------------------------------------------------------------------------------------------- helpers


def save_image(path: Path, size=(96, 64), color=(200, 40, 40), mode="RGB", **save_kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save_kwargs)
    return path


def save_noise(path: Path, size=(96, 96), **save_kwargs) -> Path:
    """Noise does not compress, so the file is big enough to truncate meaningfully."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **save_kwargs)
    return path


def make_config(root: Path, **overrides) -> DatasetConfig:
    defaults = dict(instance_data_dir=root, id="ds", caption_strategy="filename", resolution=64)
    defaults.update(overrides)
    return DatasetConfig(**defaults)


def only_sample(root: Path, **overrides) -> TrainingSample:
    dataset = discover_dataset(make_config(root, **overrides))
    assert len(dataset.samples) == 1
    return dataset.samples[0]


def fake_dataset(buckets: dict[tuple[int, int], int], repeats: int = 0, ds_id: str = "ds") -> ImageDataset:
    """A dataset of real TrainingSample records (no files needed: batching never opens them)."""
    samples = []
    for (w, h), count in buckets.items():
        for i in range(count):
            samples.append(
                TrainingSample(
                    image_path=Path(f"/nowhere/{ds_id}/{w}x{h}_{i}.png"),
                    caption=f"img {i}",
                    dataset_id=ds_id,
                    bucket=(w, h),
                    resize_to=(w, h),
                    crop=CropBox(0, 0, w, h),
                    is_regularisation=False,
                )
            )
    config = DatasetConfig(instance_data_dir=Path("/nowhere"), id=ds_id, repeats=repeats)
    return ImageDataset(config=config, samples=samples, report=DiscoveryReport(ds_id, len(samples), []))


def to_rgb255(tensor: torch.Tensor, x: int, y: int) -> tuple[int, int, int]:
    return tuple(int(round(v)) for v in ((tensor[:, y, x] + 1.0) * 127.5).tolist())


def assert_close_rgb(actual, expected, tol=3):
    assert all(abs(a - e) <= tol for a, e in zip(actual, expected)), f"{actual} != {expected}"


# --------------------------------------------------------------------------------------------- captions


def test_filename_caption_replaces_underscores_and_collapses_whitespace(tmp_path):
    save_image(tmp_path / "a_photo__of   a_cat.png")
    assert only_sample(tmp_path).caption == "a photo of a cat"


def test_textfile_caption_is_read_and_normalised(tmp_path):
    save_image(tmp_path / "one.png")
    (tmp_path / "one.txt").write_text("  a red\n\tsquare  \n", encoding="utf-8")
    save_image(tmp_path / "two.png")
    (tmp_path / "two.txt").write_text("", encoding="utf-8")
    dataset = discover_dataset(make_config(tmp_path, caption_strategy="textfile"))
    captions = {s.image_path.name: s.caption for s in dataset.samples}
    # An empty caption file is allowed: that image simply trains unconditionally.
    assert captions == {"one.png": "a red square", "two.png": ""}
    assert dataset.report.skipped == []


def test_textfile_caption_missing_raises_with_fix(tmp_path):
    save_image(tmp_path / "lonely_image.png")
    with pytest.raises(ConfigError) as info:
        discover_dataset(make_config(tmp_path, caption_strategy="textfile"))
    message = str(info.value)
    assert str(tmp_path / "lonely_image.txt") in message
    assert "caption_fallback_to_filename: true" in message
    assert "caption_strategy: filename" in message


def test_textfile_caption_falls_back_to_filename(tmp_path):
    save_image(tmp_path / "lonely_image.png")
    sample = only_sample(tmp_path, caption_strategy="textfile", caption_fallback_to_filename=True)
    assert sample.caption == "lonely image"


def test_instanceprompt_caption_and_empty_prompt_error(tmp_path):
    save_image(tmp_path / "x.png")
    sample = only_sample(tmp_path, caption_strategy="instanceprompt", instance_prompt="a photo of sks dog")
    assert sample.caption == "a photo of sks dog"
    for prompt in (None, "   "):
        with pytest.raises(ConfigError, match="instance_prompt"):
            discover_dataset(make_config(tmp_path, caption_strategy="instanceprompt", instance_prompt=prompt))


# -------------------------------------------------------------------------------------------- discovery


def test_broken_and_unsupported_files_are_reported(tmp_path):
    save_image(tmp_path / "good.png")
    (tmp_path / "empty.png").write_bytes(b"")
    png = save_noise(tmp_path / "cut.png", format="PNG").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    jpg = save_noise(tmp_path / "cut.jpg", quality=95).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(jpg[: len(jpg) // 2])
    (tmp_path / "noise.png").write_bytes(np.random.default_rng(1).bytes(2048))
    save_image(tmp_path / "anim.gif")
    save_image(tmp_path / "old.bmp")
    (tmp_path / "notes.xyz").write_text("hi")
    (tmp_path / "good.txt").write_text("caption files are not reported")
    (tmp_path / ".DS_Store").write_bytes(b"\0\0")

    dataset = discover_dataset(make_config(tmp_path))
    assert [s.image_path.name for s in dataset.samples] == ["good.png"]
    reasons = {item.path.name: item.reason for item in dataset.report.skipped}
    assert set(reasons) == {"empty.png", "cut.png", "cut.jpg", "noise.png", "anim.gif", "old.bmp", "notes.xyz"}
    assert reasons["empty.png"] == "zero-byte file"
    for name in ("cut.png", "cut.jpg", "noise.png"):
        assert reasons[name].startswith("cannot decode: "), reasons[name]
    assert reasons["anim.gif"] == "unsupported file type .gif"
    assert reasons["old.bmp"] == "unsupported file type .bmp"
    assert reasons["notes.xyz"] == "unsupported file type .xyz"

    text = dataset.report.format()
    assert text.startswith("dataset 'ds': 1 image used, 7 skipped:\n")
    assert f"  {tmp_path / 'empty.png'}: zero-byte file" in text


def test_discovery_is_recursive_sorted_case_insensitive_and_survives_symlink_loops(tmp_path):
    save_image(tmp_path / "b" / "two.PNG")
    save_image(tmp_path / "a" / "deeper" / "one.JpEg", format="JPEG")
    save_image(tmp_path / "c.webp", format="WEBP")
    save_image(tmp_path / ".cache" / "hidden.png")
    try:
        os.symlink(tmp_path, tmp_path / "a" / "loop", target_is_directory=True)
    except (OSError, NotImplementedError):
        pass  # no symlink support here: the rest of the test still applies
    dataset = discover_dataset(make_config(tmp_path))
    names = [s.image_path.relative_to(tmp_path).as_posix() for s in dataset.samples]
    assert names == ["a/deeper/one.JpEg", "b/two.PNG", "c.webp"]
    assert dataset.report.format() == "dataset 'ds': 3 images used, 0 skipped."


def test_missing_folder_and_folder_without_images_raise(tmp_path):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(ConfigError, match="does_not_exist"):
        discover_dataset(make_config(missing))
    (tmp_path / "bad.png").write_bytes(b"")
    with pytest.raises(ConfigError) as info:
        discover_dataset(make_config(tmp_path))
    assert str(tmp_path) in str(info.value)
    assert "bad.png: zero-byte file" in str(info.value)


def test_minimum_image_size_is_simpletuners_short_side_or_area(tmp_path):
    """pixel: both sides must reach it; pixel_area: the area must reach its square (square crops: both sides too)."""
    save_image(tmp_path / "wide.png", size=(160, 40))  # area 6400 >= 64^2, short side 40 < 64
    save_image(tmp_path / "small.png", size=(60, 60))  # area 3600 < 64^2
    save_image(tmp_path / "big.png", size=(120, 100))
    by_area = discover_dataset(make_config(tmp_path, minimum_image_size=64))
    assert [s.image_path.name for s in by_area.samples] == ["big.png", "wide.png"]
    assert by_area.report.skipped == [
        SkippedFile(tmp_path / "small.png", "smaller than minimum_image_size (60x60 < 64x64 in area)")]
    by_side = discover_dataset(make_config(tmp_path, minimum_image_size=64, resolution_type="pixel"))
    assert [s.image_path.name for s in by_side.samples] == ["big.png"]
    assert [item.reason for item in by_side.report.skipped] == ["smaller than minimum_image_size (60x60 < 64)",
                                                                "smaller than minimum_image_size (160x40 < 64)"]
    square = discover_dataset(make_config(tmp_path, minimum_image_size=64, crop=True, crop_aspect="square"))
    assert [s.image_path.name for s in square.samples] == ["big.png"]


def test_maximum_image_size_resizes_crops_to_target_downsample_size_first(tmp_path):
    """SimpleTuner's pair: with crop on, an image over maximum_image_size is resized to target_downsample_size
    (here its short side, resolution_type pixel) and the bucket is cut from that; under it, or without crop, the
    image is only resized to cover the bucket. maximum_image_size alone is refused, as SimpleTuner does."""
    save_image(tmp_path / "huge.png", size=(200, 120))
    pair = dict(maximum_image_size=96, target_downsample_size=64, resolution_type="pixel", resolution=32)
    cropped = only_sample(tmp_path, crop=True, **pair)
    assert cropped.bucket == (32, 32) and cropped.resize_to == (107, 64)  # short side 64, not the covering 32
    assert load_sample_pixels(cropped).shape == (3, 32, 32)
    assert only_sample(tmp_path, crop=True, **{**pair, "maximum_image_size": 200}).resize_to == (53, 32)
    assert only_sample(tmp_path, crop=False, **pair).resize_to == only_sample(tmp_path, resolution_type="pixel",
                                                                               resolution=32).resize_to
    with pytest.raises(ConfigError, match="maximum_image_size needs target_downsample_size"):
        only_sample(tmp_path, maximum_image_size=96)


def test_exif_orientation_is_applied_to_size_bucket_and_pixels(tmp_path):
    # Stored landscape: left half red, right half blue. Orientation 6 = display rotated 90° clockwise,
    # so the displayed image is portrait with red on top.
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    image.paste((0, 0, 255), (100, 0, 200, 100))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)

    sample = only_sample(tmp_path, resolution=64)
    width, height = sample.bucket
    assert height > width
    assert sample.resize_to[1] > sample.resize_to[0]
    pixels = load_sample_pixels(sample)
    assert pixels.shape == (3, height, width)
    assert_close_rgb(to_rgb255(pixels, width // 2, 4), (255, 0, 0), tol=40)
    assert_close_rgb(to_rgb255(pixels, width // 2, height - 5), (0, 0, 255), tol=40)


# ----------------------------------------------------------------------------------------------- pixels


def _write_mode_image(path: Path, kind: str) -> tuple[int, int, int]:
    """Write a uniform 80x60 image of one kind; return the RGB colour it must load as."""
    size = (80, 60)
    if kind == "rgba_transparent":
        Image.new("RGBA", size, (0, 0, 0, 0)).save(path)
        return (255, 255, 255)
    if kind == "rgba_half":
        Image.new("RGBA", size, (0, 0, 0, 128)).save(path)
        return (127, 127, 127)
    if kind == "la_transparent":
        Image.new("LA", size, (0, 0)).save(path)
        return (255, 255, 255)
    if kind == "palette":
        image = Image.new("P", size, 1)
        image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
        image.save(path)
        return (10, 200, 30)
    if kind == "palette_transparent":
        image = Image.new("P", size, 1)
        image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
        image.save(path, transparency=1)
        return (255, 255, 255)
    if kind == "grayscale":
        Image.new("L", size, 64).save(path)
        return (64, 64, 64)
    if kind == "gray16":
        # 128 * 257: a mid grey. Clipping instead of scaling would make it white.
        array = np.full((size[1], size[0]), 128 * 257, dtype=np.uint16)
        image = Image.fromarray(array)
        assert image.mode == "I;16"
        image.save(path)
        return (128, 128, 128)
    if kind == "cmyk_jpeg":
        Image.new("CMYK", size, (0, 255, 255, 0)).save(path, quality=95)
        return (255, 0, 0)
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "rgba_transparent",
        "rgba_half",
        "la_transparent",
        "palette",
        "palette_transparent",
        "grayscale",
        "gray16",
        "cmyk_jpeg",
    ],
)
def test_load_sample_pixels_converts_every_mode_to_rgb(tmp_path, kind):
    path = tmp_path / ("img.jpg" if kind == "cmyk_jpeg" else "img.png")
    expected = _write_mode_image(path, kind)
    sample = only_sample(tmp_path, resolution=64)
    pixels = load_sample_pixels(sample)
    width, height = sample.bucket
    assert pixels.shape == (3, height, width)
    assert pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert_close_rgb(to_rgb255(pixels, width // 2, height // 2), expected, tol=4)


def test_loaded_pixels_follow_the_crop_box(tmp_path):
    # 192x64 -> square 64 bucket: the centre crop of a red|green|blue strip is all green.
    image = Image.new("RGB", (192, 64), (255, 0, 0))
    image.paste((0, 255, 0), (64, 0, 128, 64))
    image.paste((0, 0, 255), (128, 0, 192, 64))
    image.save(tmp_path / "strip.png")
    sample = only_sample(tmp_path, crop=True, crop_aspect="square", crop_style="center")
    assert sample.crop == CropBox(64, 0, 128, 64)
    pixels = load_sample_pixels(sample)
    assert pixels.shape == (3, 64, 64)
    assert_close_rgb(to_rgb255(pixels, 32, 32), (0, 255, 0))


# ---------------------------------------------------------------------------------------------- buckets


def test_square_crop_bucket_is_resolution_floored_to_16():
    for resolution_type in ("pixel_area", "pixel"):
        bucket, resize_to = bucket_for_size(300, 100, 100, resolution_type, True, "square")
        assert bucket == (96, 96)
        assert resize_to == (288, 96)


def test_pixel_area_bucket_keeps_area_and_aspect():
    bucket, resize_to = bucket_for_size(1920, 1080, 1024, "pixel_area", False, "square")
    width, height = bucket
    assert abs(width * height / 1024**2 - 1) < 0.03
    assert abs((width / height) / (16 / 9) - 1) < 0.03
    assert bucket == (1360, 768)
    assert bucket_for_size(512, 512, 1024, "pixel_area", False, "square")[0] == (1024, 1024)
    # crop with a preserved aspect uses the same aspect bucket
    assert bucket_for_size(1920, 1080, 1024, "pixel_area", True, "preserve")[0] == bucket


def test_pixel_bucket_scales_short_side_to_resolution():
    assert bucket_for_size(200, 100, 64, "pixel", False, "square")[0] == (128, 64)
    assert bucket_for_size(100, 300, 64, "pixel", False, "square")[0] == (64, 192)


def test_buckets_are_multiples_of_16_and_resize_covers_them():
    sizes = [(1, 1), (17, 3), (64, 64), (100, 37), (37, 100), (1000, 10), (333, 777), (4000, 3000)]
    modes = [("pixel_area", False, "square"), ("pixel", False, "square"), ("pixel_area", True, "square"),
             ("pixel", True, "preserve")]
    for (w, h), (resolution_type, crop, aspect), resolution in itertools.product(sizes, modes, (64, 100, 128)):
        bucket, resize_to = bucket_for_size(w, h, resolution, resolution_type, crop, aspect)
        assert all(side > 0 and side % BUCKET_STEP == 0 for side in bucket), (w, h, bucket)
        assert resize_to[0] >= bucket[0] and resize_to[1] >= bucket[1]
        assert resize_to[0] == bucket[0] or resize_to[1] == bucket[1]
        # aspect preserved within rounding of one pixel
        assert abs(resize_to[0] / resize_to[1] - w / h) <= (w / h) * (1 / min(resize_to)) + 1e-9


def test_small_images_are_upscaled_to_cover_the_bucket(tmp_path):
    save_image(tmp_path / "tiny.png", size=(20, 10))
    sample = only_sample(tmp_path, resolution=64)
    assert sample.resize_to[0] >= sample.bucket[0] and sample.resize_to[1] >= sample.bucket[1]
    assert load_sample_pixels(sample).shape == (3, sample.bucket[1], sample.bucket[0])


def test_random_crop_is_seeded_and_deterministic(tmp_path):
    for i in range(6):
        save_image(tmp_path / f"wide_{i}.png", size=(200, 100))
    config = make_config(tmp_path, crop=True, crop_aspect="square", crop_style="random")
    first = [s.crop for s in discover_dataset(config, seed=1).samples]
    again = [s.crop for s in discover_dataset(config, seed=1).samples]
    other = [s.crop for s in discover_dataset(config, seed=2).samples]
    assert first == again
    assert first != other
    for crop in first + other:
        assert crop.size == (64, 64) and crop.top == 0 and 0 <= crop.left <= 64
    # The crop is part of the cache key, so a different crop means a different cached latent; the path is not (the
    # same image with the same transform has one latent wherever it lives).
    sample = discover_dataset(config, seed=1).samples[0]
    assert sample.cache_key_fields() == {
        "bucket": [64, 64],
        "resize_to": [128, 64],
        "crop": [sample.crop.left, 0, sample.crop.left + 64, 64],
    }


def test_center_crop_is_used_without_crop(tmp_path):
    save_image(tmp_path / "img.png", size=(150, 100))
    sample = only_sample(tmp_path, crop=False, crop_style="random")
    spare_w = sample.resize_to[0] - sample.bucket[0]
    spare_h = sample.resize_to[1] - sample.bucket[1]
    assert (sample.crop.left, sample.crop.top) == (spare_w // 2, spare_h // 2)


# -------------------------------------------------------------------------------------- sample counting


def test_check_enough_samples_counts_repeats_and_suggests_them():
    datasets = [fake_dataset({(64, 64): 3}, repeats=1, ds_id="a"), fake_dataset({(64, 64): 2}, ds_id="b")]
    check_enough_samples(datasets, 8)  # 3 * 2 + 2 = 8
    with pytest.raises(ConfigError) as info:
        check_enough_samples(datasets, 16)
    message = str(info.value)
    assert "only 8 training samples" in message and "['a', 'b']" in message
    assert "= 16" in message and "repeats" in message
    # 5 images need repeats: 3 to reach 5 * 4 = 20 >= 16
    assert "repeats: 3" in message


# --------------------------------------------------------------------------------------------- batching


def _names(batch: list[TrainingSample]) -> list[str]:
    return [str(s.image_path) for s in batch]


def test_bucket_batches_are_bucket_pure_and_count_full_batches():
    dataset = fake_dataset({(64, 64): 7, (80, 48): 4, (48, 80): 1})
    batches = BucketBatches([dataset], batch_size=2, seed=0)
    # 7 -> 3 batches, 4 -> 2 batches, 1 -> dropped (smaller than batch_size)
    assert batches.batches_per_epoch() == 5
    epoch = list(itertools.islice(iter(batches), 5))
    assert all(len(batch) == 2 and len({s.bucket for s in batch}) == 1 for batch in epoch)
    assert all(batch[0].bucket != (48, 80) for batch in epoch)
    assert batches.epoch == 0
    next(iter(batches))
    assert batches.epoch == 1


def test_bucket_batches_expand_repeats():
    dataset = fake_dataset({(64, 64): 2}, repeats=2)
    batches = BucketBatches([dataset], batch_size=1, seed=0)
    assert batches.batches_per_epoch() == 6
    seen = [_names(b)[0] for b in itertools.islice(iter(batches), 6)]
    assert sorted(seen.count(name) for name in set(seen)) == [3, 3]


def test_bucket_batches_are_deterministic_per_seed():
    datasets = [fake_dataset({(64, 64): 9, (80, 48): 6}, ds_id="a"), fake_dataset({(64, 64): 5}, ds_id="b")]

    def run(seed: int) -> list[list[str]]:
        return [_names(b) for b in itertools.islice(iter(BucketBatches(datasets, 2, seed)), 30)]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_bucket_batches_resume_exactly():
    datasets = [fake_dataset({(64, 64): 9, (80, 48): 6})]
    reference = [_names(b) for b in itertools.islice(iter(BucketBatches(datasets, 2, seed=5)), 40)]
    per_epoch = BucketBatches(datasets, 2, seed=5).batches_per_epoch()
    # stop mid-epoch, exactly at an epoch boundary, and after several epochs
    for consumed in (3, per_epoch, 2 * per_epoch + 1):
        original = BucketBatches(datasets, 2, seed=5)
        iterator = iter(original)
        for _ in range(consumed):
            next(iterator)
        state = original.state_dict()
        assert set(state) == {"epoch", "position"}
        resumed = BucketBatches(datasets, 2, seed=5)
        resumed.load_state_dict(dict(state))
        tail = [_names(b) for b in itertools.islice(iter(resumed), 10)]
        assert tail == reference[consumed : consumed + 10], consumed
        assert _names(next(iterator)) == reference[consumed]  # the original is unaffected by the save


def test_bucket_batches_without_a_full_batch_raise():
    dataset = fake_dataset({(64, 64): 1, (80, 48): 1})
    with pytest.raises(ConfigError) as info:
        BucketBatches([dataset], batch_size=2, seed=0)
    message = str(info.value)
    assert "repeats" in message and "crop_aspect: square" in message


def test_discovered_images_batch_end_to_end(tmp_path):
    for i in range(3):
        save_image(tmp_path / f"wide_{i}.png", size=(128, 64))
        save_image(tmp_path / f"tall_{i}.png", size=(64, 128))
    dataset = discover_dataset(make_config(tmp_path, resolution=64, repeats=1))
    check_enough_samples([dataset], 4)
    batches = BucketBatches([dataset], batch_size=2, seed=0)
    assert batches.batches_per_epoch() == 6
    batch = next(iter(batches))
    stacked = torch.stack([load_sample_pixels(s) for s in batch])
    width, height = batch[0].bucket
    assert stacked.shape == (2, 3, height, width)
