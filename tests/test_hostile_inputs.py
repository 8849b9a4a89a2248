"""Hostile dataset files: each has a defined outcome (used, with what conversion, or skipped with its reason), and
a training run over all of them finishes."""
from __future__ import annotations

import pytest
import torch

from helpers import tiny_train_config
from hostile_corpus import EXPECTED, write_hostile_corpus
from trainer_core.config import DatasetConfig
from trainer_core.data import MAX_CAPTION_CHARS, display_path, discover_dataset, load_sample_pixels
from trainer_core.training import train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_hostile_corpus(tmp_path_factory.mktemp("hostile") / "data")


@pytest.fixture(scope="module")
def discovered(corpus):
    return discover_dataset(DatasetConfig(instance_data_dir=corpus, id="hostile", resolution=64))


def _name(path) -> str:
    return display_path(path).rsplit("/", 1)[-1]


def test_every_hostile_file_has_its_defined_outcome(discovered):
    used = {_name(s.image_path) for s in discovered.samples}
    skipped = {_name(item.path): item.reason for item in discovered.report.skipped}
    notes = {}
    for item in discovered.report.notes:
        notes.setdefault(_name(item.path), []).append(item.reason)
    assert set(used) | set(skipped) == set(EXPECTED), "every file is either used or reported"
    for name, (outcome, detail) in EXPECTED.items():
        if outcome == "used":
            assert name in used, (name, skipped.get(name))
            if detail:
                assert any(detail in note for note in notes.get(name, [])), (name, notes.get(name))
        else:
            assert name in skipped, name
            assert detail in skipped[name], (name, skipped[name])
    assert len(used) == sum(1 for outcome, _ in EXPECTED.values() if outcome == "used")  # the loop adds none


def test_used_hostile_files_decode_to_clean_rgb_tensors(discovered):
    for sample in discovered.samples:
        pixels = load_sample_pixels(sample)
        width, height = sample.bucket
        assert pixels.shape == (3, height, width)
        assert torch.isfinite(pixels).all() and pixels.min() >= -1 and pixels.max() <= 1


def test_captions_are_cleaned_capped_and_reported(discovered):
    captions = {_name(s.image_path): s.caption for s in discovered.samples}
    assert captions["caption_control.png"] == "a red[31m dog on grass"
    assert len(captions["caption_huge.png"]) <= MAX_CAPTION_CHARS
    assert captions["caption_empty.png"] == ""
    assert captions["bad_\\xff\\xfe_name.png"] == "a file whose name is not UTF-8"
    exif = next(s for s in discovered.samples if s.image_path.name == "exif_rotated.jpg")
    assert exif.bucket[1] > exif.bucket[0]  # 64x32 stored, shown rotated: portrait
    discovered.report.format().encode("utf-8")  # printable whatever the file names
    odd = next(s for s in discovered.samples if "name.png" in _name(s.image_path))
    assert display_path(odd.image_path).encode("utf-8").endswith(b"bad_\\xff\\xfe_name.png")


def test_training_over_the_hostile_corpus_finishes(tiny_model_dir, corpus, tmp_path):
    config = tiny_train_config(tiny_model_dir, corpus, tmp_path / "out", max_train_steps=3,
                               dataset_crop=False, dataset_caption_strategy="textfile")
    result = train(config)
    assert result.steps_done == 3 and all(loss == loss for loss in result.losses)
    # Every usable image is encoded once; images with the same bytes and transform share one latent (the corpus
    # has several: the same picture under hostile names), so misses count distinct (content, transform) pairs.
    from trainer_core.data import LatentCache, discover_dataset

    used = discover_dataset(config.datasets[0], seed=config.seed).samples
    assert len(used) == sum(1 for outcome, _ in EXPECTED.values() if outcome == "used")
    keys = {LatentCache(tmp_path / "keys", "any").key_for(s) for s in used}
    assert result.latent_cache.misses == len(keys) < len(used)
