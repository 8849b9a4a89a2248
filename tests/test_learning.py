"""It really learns: data, caches, LoKr, loss sign and sampler, end to end on the tiny model.

Train on one image with a fixed caption; then the LoKr-merged sampler, run with that caption, must land measurably
closer (latent MSE, same seed) to the training image's cached latent than the base model does, and the loss falls.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from helpers import tiny_train_config, write_lycoris_config, write_shapes_dataset
from trainer_core.data import discover_dataset
from trainer_core.adapters import load_lokr
from trainer_core.hidream import load_transformer
from trainer_core.hidream import denoise
from trainer_core.data import LatentCache, TextEmbeddingCache
from trainer_core.hidream import component_identity, load_text_encoders
from trainer_core.training import train

CAPTION = "a red circle on a blue background"
STEPS = 300


def test_lokr_learns_the_training_image(tiny_model_dir, tiny_paths, tmp_path):
    dataset_dir = write_shapes_dataset(tmp_path / "one", [("circle", "red", "blue")], size=128)
    config = tiny_train_config(tiny_model_dir, dataset_dir, tmp_path / "out", max_train_steps=STEPS,
                               learning_rate=1e-2, dataset_resolution=128,
                               lycoris_config=write_lycoris_config(tmp_path / "lycoris_config.json"), flow_schedule_shift=1.0,
                               validation_prompt=CAPTION, validation_resolution=(128, 128),
                               validation_num_inference_steps=20, validation_guidance=1.0)
    result = train(config)

    first, last = result.losses[:20], result.losses[-20:]
    loss_start, loss_end = sum(first) / len(first), sum(last) / len(last)
    print(f"loss: first 20 steps {loss_start:.4f}, last 20 steps {loss_end:.4f}")
    assert loss_end < 0.8 * loss_start

    # The training image's latent, read back from the trainer's own cache.
    sample = discover_dataset(config.datasets[0]).samples[0]
    latent_cache = LatentCache(config.resolved_cache_dir / "latents", component_identity(tiny_paths.model_dir / "vae"))
    target = latent_cache.load([sample])
    assert latent_cache.stats.encoder_calls == 0

    encoders = load_text_encoders(tiny_paths)
    text_cache = TextEmbeddingCache(config.resolved_cache_dir / "text", encoders.identity)
    cond = text_cache.load([CAPTION])
    settings = replace(config.validation_sampling(), guidance=1.0)

    transformer = load_transformer(tiny_paths)
    base = denoise(transformer, cond, None, settings)
    network = load_lokr(result.lokr_path, transformer)
    trained = denoise(transformer, cond, None, settings)

    base_mse = torch.mean((base - target) ** 2).item()
    lokr_mse = torch.mean((trained - target) ** 2).item()
    print(f"latent MSE to the training image: base {base_mse:.4f}, with LoKr {lokr_mse:.4f}")
    assert lokr_mse < 0.7 * base_mse
    assert network.loras  # the file really wrapped modules
