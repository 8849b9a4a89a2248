"""Damaged cache entries are detected, rebuilt and reported; two processes can fill one cache folder at once."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import write_shapes_dataset
from trainer_core.data import CacheEntryCorrupt, LatentCache, TextEmbeddingCache, VaeImageEncoder, read_entry
from trainer_core.config import DatasetConfig
from trainer_core.data import discover_dataset
from trainer_core.hidream import component_identity, load_text_encoders, load_vae

ITEMS = [("circle", "red", "blue"), ("square", "green", "yellow"), ("circle", "yellow", "green")]
REPO = Path(__file__).resolve().parents[1]


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture()
def samples(tmp_path):
    folder = write_shapes_dataset(tmp_path / "shapes", ITEMS)
    return discover_dataset(DatasetConfig(instance_data_dir=folder, id="s", caption_strategy="textfile",
                                          resolution=64, crop=True, crop_aspect="square")).samples


def test_truncated_and_flipped_entries_are_rebuilt_on_fill(tiny_paths, samples, tmp_path):
    vae = load_vae(tiny_paths)
    encoder = VaeImageEncoder(vae, component_identity(tiny_paths.model_dir / "vae"))
    cache = LatentCache(tmp_path / "latents", encoder.identity)
    cache.fill(samples, encoder)
    originals = [read_entry(cache.path_for(s))["latents"] for s in samples]
    truncated, flipped = cache.path_for(samples[0]), cache.path_for(samples[1])
    truncated.write_bytes(truncated.read_bytes()[:100])
    _flip_last_byte(flipped)
    with pytest.raises(CacheEntryCorrupt, match="checksum"):
        read_entry(flipped)

    again = LatentCache(tmp_path / "latents", encoder.identity)
    stats = again.fill(samples, encoder)
    assert (stats.hits, stats.misses, stats.rebuilt) == (1, 2, 2)
    assert "2 damaged entries rebuilt" in str(stats)
    for sample, original in zip(samples, originals):
        assert torch.equal(read_entry(again.path_for(sample))["latents"], original)  # same seed, same latent


def test_latent_damaged_during_training_is_encoded_again_on_load(tiny_paths, samples, tmp_path):
    vae = load_vae(tiny_paths)
    encoder = VaeImageEncoder(vae, component_identity(tiny_paths.model_dir / "vae"))
    cache = LatentCache(tmp_path / "latents", encoder.identity)
    cache.fill(samples, encoder)
    expected = cache.load(samples[:2])
    _flip_last_byte(cache.path_for(samples[1]))
    assert torch.equal(cache.load(samples[:2]), expected)
    assert cache.stats.rebuilt == 1


def test_text_entry_damaged_during_training_is_deleted_and_explained(tiny_paths, tmp_path):
    encoders = load_text_encoders(tiny_paths)
    cache = TextEmbeddingCache(tmp_path / "text", encoders.identity)
    cache.fill(["a red circle"], encoders)
    path = cache.path_for("a red circle")
    _flip_last_byte(path)
    with pytest.raises(CacheEntryCorrupt) as info:
        cache.load(["a red circle"])
    assert "resume_from_checkpoint" in str(info.value) and str(path) in str(info.value)
    assert not path.exists()
    assert cache.missing(["a red circle"]) == ["a red circle"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x10\x00")  # a torn header is found by the cheap check on fill
    assert cache.missing(["a red circle"]) == ["a red circle"]
    cache.fill(["a red circle"], encoders)
    assert cache.stats.rebuilt == 1 and read_entry(path)["t5"].shape[0] == 128


FILL_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from trainer_core.data import LatentCache, TextEmbeddingCache, VaeImageEncoder
    from trainer_core.config import DatasetConfig
    from trainer_core.data import discover_dataset
    from trainer_core.hidream import component_identity, load_text_encoders, load_vae, resolve_model_paths
    model, data, cache_dir = sys.argv[1:4]
    paths = resolve_model_paths(model)
    samples = discover_dataset(DatasetConfig(instance_data_dir=data, id="s", caption_strategy="textfile",
                                             resolution=64)).samples
    vae = load_vae(paths)
    encoder = VaeImageEncoder(vae, component_identity(paths.model_dir / "vae"))
    for _ in range(3):  # keep both processes writing at the same time for a while
        latents = LatentCache(f"{cache_dir}/latents", encoder.identity)
        latents.fill(samples, encoder)
        latents.load(samples)
    encoders = load_text_encoders(paths)
    text = TextEmbeddingCache(f"{cache_dir}/text", encoders.identity)
    text.fill([s.caption for s in samples], encoders)
    text.load([s.caption for s in samples])
    print("ok", latents.stats.rebuilt, text.stats.rebuilt)
""")


def test_two_processes_filling_one_cache_folder_never_corrupt_it(tiny_model_dir, tmp_path):
    items = [(shape, colour, bg) for shape in ("circle", "square") for colour in ("red", "blue")
             for bg in ("yellow", "green")]
    data = write_shapes_dataset(tmp_path / "shapes", items)
    cache = tmp_path / "shared-cache"
    script = tmp_path / "fill.py"
    script.write_text(FILL_SCRIPT)
    procs = [subprocess.Popen([sys.executable, str(script), str(tiny_model_dir), str(data), str(cache)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-2000:]
        assert out.strip() == "ok 0 0", (out, err[-2000:])
    entries = sorted(cache.rglob("*.safetensors"))
    assert len(entries) == len(items) * 2 + 1  # latents + captions + the empty caption
    for entry in entries:
        read_entry(entry)
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]
