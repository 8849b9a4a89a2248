"""It really learns, in latents and in pixels: data, caches, LoKr, loss sign and sampler, end to end.

One captioned picture of something the drawing tiny HiDream has no word for trains a LoKr; then its caption,
sampled with the LoKr and without it (same seeds), must land closer to the training picture: in latent space
(against the trainer's own cached latent) and in pixels, by the mean absolute error the README quotes; and the LoKr's
strength in the sampler (0, 0.5, 1) must move the picture towards it step by step. Two such pictures:

    zorb   "a zorb on a blue background": a pink ring, a colour and a shape kept out of pretraining
    blick  "a blick on a purple background": a yellow star, a scene of the model's own vocabulary, named by a new
           word (the base model draws something else for it)
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from helpers import tiny_train_config, write_lycoris_config
from trainer_core.adapters import load_lokr
from trainer_core.data import LatentCache, TextEmbeddingCache, discover_dataset
from trainer_core.demo import DEMO_RESOLUTION, concept_caption, draw_concept
from trainer_core.hidream import component_identity, load_text_encoders, load_transformer, load_vae
from trainer_core.hidream import resolve_model_paths
from trainer_core.hidream.sample import sample_image
from trainer_core.hidream.tiny import corpus
from trainer_core.training import train

STEPS, BATCH = 200, 2  # the one picture twice per step (two noise levels)
SEEDS = (0, 1)
PICTURES = {
    "zorb": (concept_caption("blue"), lambda: draw_concept("blue")),
    "blick": ("a blick on a purple background", lambda: corpus.CorpusItem("yellow", "star", "purple", "centre")
              .draw(DEMO_RESOLUTION)),
}


@pytest.fixture(scope="module", params=list(PICTURES))
def one_picture_run(request, drawing_model_dir, tmp_path_factory):
    caption, draw = PICTURES[request.param]
    folder = tmp_path_factory.mktemp(f"learning_{request.param}")
    dataset = folder / "one"
    dataset.mkdir()
    picture = draw()
    picture.save(dataset / "picture.png")
    (dataset / "picture.txt").write_text(caption)
    config = tiny_train_config(drawing_model_dir, dataset, folder / "out", max_train_steps=STEPS,
                               learning_rate=1e-2, train_batch_size=BATCH, dataset_repeats=BATCH - 1,
                               dataset_resolution=DEMO_RESOLUTION,
                               lycoris_config=write_lycoris_config(folder / "lycoris_config.json"),
                               validation_prompt=caption, validation_resolution=(DEMO_RESOLUTION, DEMO_RESOLUTION),
                               validation_num_inference_steps=20, validation_guidance=1.0)
    result = train(config)
    paths = resolve_model_paths(drawing_model_dir)
    encoders = load_text_encoders(paths)
    cond = TextEmbeddingCache(config.resolved_cache_dir / "text", encoders.identity).load([caption])
    transformer = load_transformer(paths)
    return {"name": request.param, "picture": picture, "config": config, "result": result, "paths": paths,
            "cond": cond, "transformer": transformer, "vae": load_vae(paths),
            "network": load_lokr(result.lokr_path, transformer)}


def sample(run, strength: float, seed: int):
    """(picture, latents) of CAPTION at `seed`, the LoKr merged at `strength` (0: the base model). Guidance 1:
    the conditional prediction alone, the cleanest picture of what the model learned for the caption."""
    settings = replace(run["config"].validation_sampling(), guidance=1.0, seed=seed, lokr_strength=strength)
    return sample_image(run["transformer"], run["vae"], run["cond"], None, settings, network=run["network"])


def test_the_loss_falls_and_the_lokr_moves_the_latents_towards_the_training_image(one_picture_run):
    run = one_picture_run
    losses = run["result"].losses
    first, last = losses[:20], losses[-20:]
    loss_start, loss_end = sum(first) / len(first), sum(last) / len(last)
    print(f"{run['name']}: loss: first 20 steps {loss_start:.4f}, last 20 steps {loss_end:.4f}")
    assert loss_end < 0.8 * loss_start
    assert run["network"].loras  # the file really wrapped modules

    # The training image's latent, read back from the trainer's own cache (nothing encodes it again).
    config = run["config"]
    vae_identity = component_identity(run["paths"].model_dir / "vae")
    latent_cache = LatentCache(config.resolved_cache_dir / "latents", vae_identity)
    target = latent_cache.load([discover_dataset(config.datasets[0]).samples[0]])
    assert latent_cache.stats.encoder_calls == 0
    base, lokr = (torch.mean((sample(run, strength, 0)[1] - target) ** 2).item() for strength in (0.0, 1.0))
    print(f"{run['name']}: latent MSE to the training image: base {base:.4f}, with the LoKr {lokr:.4f}")
    assert lokr < 0.7 * base


def test_the_lokr_draws_the_picture_in_pixels_and_strength_interpolates(one_picture_run):
    """Pixel mean absolute error (pixels in [0, 1]) of the caption's sample to the training picture: with the LoKr
    at most half the base model's and at most 0.12 at every seed; at strength 0, 0.5, 1 it falls step by step."""
    run = one_picture_run
    target = np.asarray(run["picture"].convert("RGB"), dtype=np.float32) / 255.0
    errors = {}
    for seed in SEEDS:
        for strength in (0.0, 0.5, 1.0):
            picture = np.asarray(sample(run, strength, seed)[0].convert("RGB"), dtype=np.float32) / 255
            errors[seed, strength] = float(np.abs(picture - target).mean())
        print(f"{run['name']}, seed {seed}: pixel MAE to the training picture at LoKr strength 0 / 0.5 / 1: "
              + " / ".join(f"{errors[seed, s]:.3f}" for s in (0.0, 0.5, 1.0)))
        assert errors[seed, 0.0] > errors[seed, 0.5] > errors[seed, 1.0], seed
        assert errors[seed, 1.0] <= 0.12, seed
    base = np.mean([errors[seed, 0.0] for seed in SEEDS])
    lokr = np.mean([errors[seed, 1.0] for seed in SEEDS])
    print(f"{run['name']}, mean over seeds {SEEDS}: base {base:.3f}, with the LoKr {lokr:.3f} ({lokr / base:.2f} x "
          "base)")
    assert lokr <= 0.5 * base
