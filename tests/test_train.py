"""The training loop: reproducibility, outputs, cache reuse, options that change data, early errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import tiny_train_config, write_shapes_dataset
from trainer_core.config import ConfigError
from trainer_core.training import LOKR_FILENAME, train

ITEMS = [("circle", "red", "blue"), ("square", "green", "yellow"), ("circle", "yellow", "green"),
         ("square", "blue", "red")]


@pytest.fixture()
def shapes(tmp_path):
    return write_shapes_dataset(tmp_path / "shapes", ITEMS)


def test_same_seed_same_losses_and_second_run_hits_every_cache(tiny_model_dir, shapes, tmp_path):
    cache = tmp_path / "cache"
    first = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "a", cache_dir=cache,
                                    caption_dropout_probability=0.3, train_batch_size=2))
    assert first.text_cache.encoder_calls >= 1 and first.latent_cache.misses == len(ITEMS)
    second = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "b", cache_dir=cache,
                                     caption_dropout_probability=0.3, train_batch_size=2))
    assert second.losses == first.losses  # bit-identical on the CPU
    assert second.text_cache.encoder_calls == 0 and second.latent_cache.encoder_calls == 0
    assert second.latent_cache.hits == len(ITEMS)
    other = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "c", cache_dir=cache, seed=8,
                                    caption_dropout_probability=0.3, train_batch_size=2))
    assert other.losses != first.losses


def test_the_same_images_anywhere_train_the_same_lokr_and_hit_the_cache(tiny_model_dir, shapes, tmp_path):
    """Moving a dataset changes nothing: its latents' cache keys and posterior-sample seeds come from the images'
    bytes and transforms, never their paths (with random crops, whose offsets follow the path inside the folder)."""
    moved = tmp_path / "elsewhere" / "deeper" / "shapes"
    moved.parent.mkdir(parents=True)
    shutil.copytree(shapes, moved)
    cache = tmp_path / "cache"
    options = dict(cache_dir=cache, max_train_steps=3, train_batch_size=2, dataset_crop_style="random",
                   dataset_resolution=48)
    here = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "here", **options))
    there = train(tiny_train_config(tiny_model_dir, moved, tmp_path / "there", **options))
    assert here.latent_cache.misses == len(ITEMS)
    assert there.latent_cache.encoder_calls == 0 and there.latent_cache.hits == len(ITEMS)
    assert there.losses == here.losses
    a, b = load_file(str(here.lokr_path)), load_file(str(there.lokr_path))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_outputs_lokr_validation_image_and_loss_curve(tiny_model_dir, shapes, tmp_path):
    result = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "out", max_train_steps=4,
                                     validation_prompt="a red circle on a blue background",
                                     validation_step_interval=2, gradient_accumulation_steps=2,
                                     grad_clip_method="value", max_grad_norm=0.01,
                                     hidream_use_load_balancing_loss=True, init_lokr_norm=1e-3))
    assert result.lokr_path == tmp_path / "out" / LOKR_FILENAME
    with safe_open(str(result.lokr_path), "pt") as f:
        assert any(k.endswith(".lokr_w1") for k in f.keys())
    assert [p.relative_to(tmp_path / "out" / "validation").as_posix() for p in result.validation_images] == [
        f"step_{n:06d}/{name}" for n in (0, 2, 4) for name in ("validation_64x64.png", "grid.png")]
    assert Image.open(result.validation_images[-2]).size == (64, 64)
    assert Image.open(result.loss_curve_path).size[0] > 100
    assert json.loads((tmp_path / "out" / "losses.json").read_text()) == result.losses
    assert all(l == l for l in result.losses)


def test_gradient_checkpointing_does_not_change_the_maths(tiny_model_dir, shapes, tmp_path):
    plain = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "p", max_train_steps=3))
    ckpt = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "c", max_train_steps=3,
                                   gradient_checkpointing=True))
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-5)


def test_int8_quanto_base_trains_in_bypass(tiny_model_dir, shapes, tmp_path):
    """What runs, seen from a forward hook on every module while the run trains: each layer that carries the LoKr
    is an optimum-quanto QLinear with frozen int8 weights, and the LoKr on it is in bypass mode. The LoKr learns
    through those layers (every W2, zero at the start, moved), and the preview runs it unmerged: the last
    validation image is not the base model's (merging into quanto weights silently does nothing)."""
    seen = set()

    def record(module, args, output):
        lokr = getattr(module.__dict__.get("forward"), "__self__", None)
        if torch.is_grad_enabled() and type(lokr).__name__ == "LokrModule":
            seen.add((type(module).__name__, type(module.weight).__name__, lokr.bypass_mode))

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        result = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "q", max_train_steps=2,
                                         base_model_precision="int8-quanto", learning_rate=1e-2,
                                         validation_prompt="a red circle on a blue background"))
    finally:
        handle.remove()
    assert seen == {("QLinear", "WeightQBytesTensor", True)}
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    w2 = {k: v for k, v in load_file(str(result.lokr_path)).items() if k.endswith("lokr_w2")}
    assert w2 and all(v.abs().max() > 0 for v in w2.values())
    base, last = (np.asarray(Image.open(p), dtype=np.int16) for p in result.validation_images[::2])
    assert "step_000000" in str(result.validation_images[0])
    assert np.abs(last - base).max() >= 5  # 15 levels when written (2026-12-07); a no-op merge gives 0


def test_too_few_samples_fails_before_any_model_is_loaded(shapes, tmp_path):
    config = tiny_train_config(tmp_path / "no-such-model", shapes, tmp_path / "out", train_batch_size=2,
                               gradient_accumulation_steps=4)
    with pytest.raises(ConfigError, match="repeats"):
        train(config)


def test_missing_model_folder_is_a_clear_error(shapes, tmp_path):
    with pytest.raises(ConfigError, match="no-such-model"):
        train(tiny_train_config(tmp_path / "no-such-model", shapes, tmp_path / "out"))


def test_bf16_mixed_precision_keeps_the_lokr_in_float32(tiny_model_dir, tiny_paths, shapes, tmp_path):
    from trainer_core.adapters import LycorisConfig, create_lokr_network
    from trainer_core.hidream import load_transformer

    network = create_lokr_network(load_transformer(tiny_paths, dtype=torch.bfloat16), LycorisConfig())
    assert {p.dtype for p in network.parameters()} == {torch.float32}  # the update lives in float32
    result = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "bf16", max_train_steps=2,
                                     mixed_precision="bf16"))
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))


def test_given_components_train_like_loaded_ones_and_come_back_unchanged(tiny_model_dir, tiny_paths, shapes,
                                                                          tmp_path):
    """A front end that already holds the models (ComfyUI) passes them in: no file is read for them, the losses
    equal a run that loads them itself, and the caller's transformer comes back without LoKr and unchanged."""
    from trainer_core.data import VaeImageEncoder
    from trainer_core.hidream import component_identity, load_text_encoders, load_transformer, load_vae
    from trainer_core.hidream import latents_to_images
    from trainer_core.training import ModelComponents

    reference = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "loaded"))
    transformer = load_transformer(tiny_paths, dtype=torch.float32)
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    vae = load_vae(tiny_paths, dtype=torch.float32)
    components = ModelComponents(
        transformer=transformer, transformer_name="given",
        text_encoder=load_text_encoders(tiny_paths, dtype=torch.float32),
        image_encoder=VaeImageEncoder(vae, component_identity(tiny_paths.model_dir / "vae")),
        decode_latents=lambda latents: latents_to_images(vae, latents))
    config = tiny_train_config(tmp_path / "no-such-model", shapes, tmp_path / "given",
                               validation_prompt="a red circle", disable_benchmark=True)
    result = train(config, components=components)
    assert result.losses == reference.losses
    assert [p.name for p in result.validation_images] == ["validation_64x64.png", "grid.png"]
    assert not any("lycoris" in name.lower() for name, _ in transformer.named_modules())
    for name, value in transformer.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not transformer.is_gradient_checkpointing
