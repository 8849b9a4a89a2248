"""Text and latent caches: exact pipeline encodings, content-hash keys, zero encoder calls on a second pass."""
from __future__ import annotations

import torch

from helpers import write_shapes_dataset
from trainer_core.data import LatentCache, TextEmbeddingCache, VaeImageEncoder
from trainer_core.config import DatasetConfig
from trainer_core.data import discover_dataset
from trainer_core.hidream import component_identity, load_text_encoders, load_vae


class CountingTextEncoder:
    """Wraps the real HiDream encoders and counts how often the cache asks them to encode."""

    def __init__(self, inner):
        self.inner, self.identity, self.calls, self.prompts = inner, inner.identity, 0, []

    def encode(self, prompts, max_sequence_length=128):
        self.calls += 1
        self.prompts += list(prompts)
        return self.inner.encode(prompts, max_sequence_length=max_sequence_length)


class CountingImageEncoder(VaeImageEncoder):
    calls = 0

    def encode(self, pixels, generators):
        self.calls += 1
        return super().encode(pixels, generators)


def test_text_cache_stores_pipeline_encodings_and_hits_on_second_pass(tiny_paths, tmp_path):
    encoders = load_text_encoders(tiny_paths)
    counting = CountingTextEncoder(encoders)
    captions = ["a red circle", "a blue square", "a red circle"]
    cache = TextEmbeddingCache(tmp_path / "text", encoders.identity)
    cache.fill(captions, counting, batch_size=2)
    assert counting.calls == 2 and sorted(counting.prompts) == ["", "a blue square", "a red circle"]
    assert cache.stats.misses == 3

    loaded = cache.load(["a blue square", ""])
    direct = encoders.encode(["a blue square", ""])
    assert loaded.t5.shape == direct.t5.shape and loaded.llama.shape == direct.llama.shape
    # equal up to float noise from batching the captions differently
    assert torch.allclose(loaded.t5, direct.t5.cpu().float(), atol=1e-5)
    assert torch.allclose(loaded.llama, direct.llama.cpu().float(), atol=1e-5)
    assert torch.allclose(loaded.pooled, direct.pooled.cpu().float(), atol=1e-5)

    again = TextEmbeddingCache(tmp_path / "text", encoders.identity)
    counting.calls = 0
    again.fill(captions, counting)
    assert counting.calls == 0 and again.stats.hits == 3

    other_encoder = TextEmbeddingCache(tmp_path / "text", encoders.identity + "-other")
    assert other_encoder.path_for("a red circle") != again.path_for("a red circle")
    other_length = TextEmbeddingCache(tmp_path / "text", encoders.identity, max_sequence_length=77)
    assert other_length.path_for("a red circle") != again.path_for("a red circle")


def test_latent_cache_keys_follow_pixels_crop_and_bucket(tiny_paths, tmp_path):
    folder = write_shapes_dataset(tmp_path / "imgs", [("circle", "red", "blue"), ("square", "green", "yellow")],
                                  size=96)
    vae = load_vae(tiny_paths)
    identity = component_identity(tiny_paths.model_dir / "vae")
    encoder = CountingImageEncoder(vae, identity)
    cfg = DatasetConfig(instance_data_dir=folder, caption_strategy="textfile", resolution=64, crop=True)
    samples = discover_dataset(cfg).samples

    cache = LatentCache(tmp_path / "lat", identity)
    cache.fill(samples, encoder, batch_size=2)
    assert encoder.calls == 1 and cache.stats.misses == 2
    latents = cache.load(samples)
    assert latents.shape == (2, 16, 8, 8) and latents.dtype == torch.float32

    encoder.calls = 0
    second = LatentCache(tmp_path / "lat", identity)
    second.fill(samples, encoder)
    assert encoder.calls == 0 and second.stats.hits == 2
    assert torch.equal(second.load(samples), latents)

    # A latent does not depend on its batch-mates: encoding one at a time gives the same tensor.
    alone = LatentCache(tmp_path / "lat_alone", identity)
    alone.fill(samples, encoder, batch_size=1)
    assert torch.allclose(alone.load(samples), latents, atol=1e-5)

    # Another bucket, other bytes, another VAE: other keys.
    bigger = discover_dataset(DatasetConfig(instance_data_dir=folder, caption_strategy="textfile",
                                            resolution=96, crop=True)).samples
    assert second.path_for(bigger[0]) != second.path_for(samples[0])
    assert LatentCache(tmp_path / "lat", identity + "x").path_for(samples[0]) != second.path_for(samples[0])
    before = second.path_for(samples[0])
    samples[0].image_path.write_bytes(samples[1].image_path.read_bytes())
    assert LatentCache(tmp_path / "lat", identity).path_for(samples[0]) != before
