"""Training features: eval loss, EMA, prompt-library validation at several sizes, logs, starting from a LoKr,
quantised text encoders for caching. Each runs a 2-4 step training of the tiny model at 64 px."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import tiny_train_config, write_shapes_dataset
from trainer_core.config import ConfigError, DatasetConfig
from trainer_core.training import EMA_LOKR_FILENAME, train

ITEMS = [("circle", "red", "blue"), ("square", "green", "yellow"), ("circle", "yellow", "green"),
         ("square", "blue", "red")]


@pytest.fixture()
def shapes(tmp_path):
    return write_shapes_dataset(tmp_path / "shapes", ITEMS)


@pytest.fixture()
def eval_shapes(tmp_path):
    return write_shapes_dataset(tmp_path / "eval", [("circle", "green", "red"), ("square", "red", "green")])


def test_eval_loss_is_reported_and_leaves_training_untouched(tiny_model_dir, shapes, eval_shapes, tmp_path):
    eval_set = DatasetConfig(instance_data_dir=eval_shapes, id="eval", dataset_type="eval", resolution=64,
                             crop=True)
    kw = dict(max_train_steps=4, caption_dropout_probability=0.3, cache_dir=tmp_path / "cache")
    plain = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "plain", **kw))
    config = tiny_train_config(tiny_model_dir, shapes, tmp_path / "eval_run", eval_steps_interval=2, **kw)
    config.datasets.append(eval_set)
    scored = train(config)
    assert scored.losses == plain.losses  # eval draws from its own fixed generators
    assert [s for s, _ in scored.eval_losses] == [0, 2, 4]
    values = [v for _, v in scored.eval_losses]
    assert all(np.isfinite(values)) and len(set(values)) == 3  # fixed noise: it moves only as the LoKr does
    records = [json.loads(l) for l in (scored.log_dir / "scalars.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2, 4]


def test_held_out_slice_when_no_eval_dataset(tiny_model_dir, shapes, tmp_path):
    result = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "out", max_train_steps=2,
                                     eval_steps_interval=2, num_eval_images=1))
    assert [s for s, _ in result.eval_losses] == [0, 2]
    assert result.latent_cache.misses == len(ITEMS)  # 3 trained + 1 held out, all cached


def test_ema_file_is_the_average_and_differs_from_the_trained_weights(tiny_model_dir, tiny_paths, shapes, tmp_path):
    """The EMA is s_k = d * s_(k-1) + (1 - d) * W_k after every step k, from s_0 = the LoKr's starting weights:
    checked within float error against the weights and averages every step's checkpoint holds (d = 0.8, so a
    swapped d / 1 - d fails), and the EMA file holds s_3 as the main file holds W_3."""
    from trainer_core.adapters import LycorisConfig, create_lokr_network
    from trainer_core.hidream import load_transformer

    decay = 0.8
    result = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "out", max_train_steps=3, use_ema=True,
                                     ema_decay=decay, init_lokr_norm=1e-3, checkpoint_step_interval=1))
    assert result.ema_lokr_path == tmp_path / "out" / EMA_LOKR_FILENAME
    start = create_lokr_network(load_transformer(tiny_paths), LycorisConfig(), seed=7, init_lokr_norm=1e-3)
    states = [{"adapter_parameters": {n: p.detach() for n, p in start.named_parameters() if p.requires_grad}}]
    states[0]["ema"] = states[0]["adapter_parameters"]
    states += [torch.load(tmp_path / "out" / f"checkpoint-{k}" / "training_state.pt", weights_only=True)
               for k in (1, 2, 3)]
    for before, after in zip(states, states[1:]):
        weights, ema, previous = after["adapter_parameters"], after["ema"], before["ema"]
        assert ema.keys() == weights.keys() == previous.keys()
        assert any(not torch.equal(weights[k], before["adapter_parameters"][k]) for k in weights)  # it trained
        for name, weight in weights.items():
            torch.testing.assert_close(ema[name], decay * previous[name] + (1 - decay) * weight, rtol=1e-6,
                                       atol=1e-9, msg=name)
    main, ema = load_file(str(result.lokr_path)), load_file(str(result.ema_lokr_path))
    trainable = set(states[-1]["ema"])
    assert main.keys() == ema.keys() and trainable <= set(ema)  # the file adds LyCORIS' alpha buffers
    assert all(torch.equal(ema[k], states[-1]["ema"][k]) for k in trainable)
    assert all(torch.equal(main[k], states[-1]["adapter_parameters"][k]) for k in trainable)
    w2 = [k for k in main if k.endswith("lokr_w2")]
    assert any(not torch.equal(main[k], ema[k]) for k in w2)
    no_ema = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "plain", max_train_steps=3,
                                     init_lokr_norm=1e-3))
    assert no_ema.ema_lokr_path is None and not (tmp_path / "plain" / EMA_LOKR_FILENAME).exists()
    assert no_ema.losses == result.losses  # the EMA only watches


def test_prompt_library_every_resolution_grid_and_logs(tiny_model_dir, shapes, tmp_path):
    library = tmp_path / "user_prompt_library.json"
    library.write_text(json.dumps({"anime_sks": "a yellow circle on a green background", "man": "a blue square"}))
    result = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "out", max_train_steps=2,
                                     validation_prompt="a red circle on a blue background",
                                     user_prompt_library=library, validation_resolution="64x64,64x32",
                                     validation_num_inference_steps=2, report_to="tensorboard",
                                     tracker_run_name="run1", validation_step_interval=1,
                                     disable_benchmark=True))
    step1 = tmp_path / "out" / "validation" / "step_000001"
    expected = [f"{n}_{r}.png" for n in ("validation", "anime_sks", "man") for r in ("64x64", "64x32")]
    assert sorted(p.name for p in step1.iterdir()) == sorted([*expected, "grid.png"])
    assert Image.open(step1 / "man_64x32.png").size == (64, 32)
    grid = Image.open(step1 / "grid.png")
    assert grid.width > 2 * 64 and grid.height > 3 * 64  # 3 prompts x 2 sizes
    assert {p.parent.name for p in result.validation_images} == {"step_000001", "step_000002"}
    log_dir = tmp_path / "out" / "logs" / "run1"
    assert result.log_dir == log_dir and list(log_dir.glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir)).Reload()
    assert {"loss", "learning_rate", "grad_norm", "seconds_per_step", "peak_memory_bytes"} <= set(
        events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2]
    assert "validation/grid" in events.Tags()["images"]
    assert (tmp_path / "out" / "loss_curve.png").is_file()


@pytest.mark.parametrize("nickname", ["../escape", "/abs", "a\0b", "..", "sub/dir", ".hidden"])
def test_prompt_nicknames_that_would_leave_the_folder_are_refused(tiny_model_dir, shapes, tmp_path, nickname):
    library = tmp_path / "lib.json"
    library.write_text(json.dumps({nickname: "a prompt"}))
    config = tiny_train_config(tiny_model_dir, shapes, tmp_path / "out", user_prompt_library=library)
    with pytest.raises(ConfigError, match="nickname"):
        train(config)
    assert not (tmp_path / "out" / "cache").exists()  # refused before any work


def test_training_starts_from_an_existing_lokr(tiny_model_dir, shapes, tmp_path):
    """The run starts from the file's weights exactly: one step at learning rate 0 (the first step of a 2-step
    warm-up) writes back the very tensors it loaded, and its first loss already differs from a fresh LoKr's."""
    first = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "first", max_train_steps=4,
                                    init_lokr_norm=1e-3))
    continued = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "second", max_train_steps=1,
                                        init_lokr_weights=first.lokr_path, lr_scheduler="constant_with_warmup",
                                        lr_warmup_steps=2))
    loaded, written = load_file(str(first.lokr_path)), load_file(str(continued.lokr_path))
    assert loaded.keys() == written.keys() and all(torch.equal(loaded[k], written[k]) for k in loaded)
    assert any(k.endswith("lokr_w2") and loaded[k].abs().max() > 0 for k in loaded)  # not LyCORIS' zero W2
    fresh = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "fresh", max_train_steps=1))
    assert continued.losses[0] != fresh.losses[0]  # the first step already runs with the loaded LoKr
    with pytest.raises(ConfigError, match="not found"):
        train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "x", init_lokr_weights=tmp_path / "none.safetensors"))


def _text_cache_entries(cache: Path) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """{encoder identity: {caption: {"t5", "llama", "pooled"}}} of every text-cache entry under `cache`."""
    from safetensors import safe_open

    entries: dict = {}
    for path in (cache / "text").rglob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            entries.setdefault(meta["encoder"], {})[meta["caption"]] = {k: f.get_tensor(k) for k in f.keys()}
    return entries


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_quantised_text_encoders_fill_their_own_cache_entries(tiny_model_dir, shapes, tmp_path):
    """int8-quanto T5 and Llama encode into entries of their own (keyed by the precisions), within 2 % (relative
    norm) of the float encoders' T5 and Llama embeddings, and not equal to them: the quantised matmuls ran. The
    CLIPs, left in float, give the float pooled embedding bit for bit."""
    cache = tmp_path / "cache"
    plain = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "a", max_train_steps=1, cache_dir=cache))
    quantised = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "b", max_train_steps=1, cache_dir=cache,
                                        text_encoder_3_precision="int8-quanto",
                                        text_encoder_4_precision="int8-quanto"))
    assert plain.text_cache.misses > 0 and quantised.text_cache.misses == plain.text_cache.misses
    entries = _text_cache_entries(cache)
    assert len(entries) == 2
    int8 = next(k for k in entries if k.endswith("/no_change,no_change,int8-quanto,int8-quanto"))
    float_ = next(k for k in entries if k != int8)
    assert entries[int8].keys() == entries[float_].keys() and len(entries[int8]) == plain.text_cache.misses
    errors = {"t5": [], "llama": []}
    for caption, q in entries[int8].items():
        f = entries[float_][caption]
        assert torch.equal(q["pooled"], f["pooled"])
        for name in errors:
            errors[name].append(_relative_error(q[name], f[name]))
    print(f"\nint8 vs float text embeddings, relative error per caption: {errors}")
    for name, values in errors.items():
        assert min(values) > 0 and max(values) <= 0.02, (name, values)


def test_lora_type_standard_trains_a_peft_lora_saved_in_diffusers_keys(tiny_model_dir, shapes, tmp_path):
    from trainer_core.training import TrainingCallbacks

    kw = dict(lora_type="standard", lora_rank=4, lora_alpha=2.0, max_train_steps=4, learning_rate=1e-2,
              use_ema=True, cache_dir=tmp_path / "cache")
    full = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "full", validation_prompt="a red circle",
                                   **kw))
    weights = load_file(str(full.lokr_path))
    downs = [k for k in weights if k.endswith(".lora_A.weight")]
    assert len(downs) == 32 and all(k.startswith("transformer.") for k in weights)  # 32 attention projections
    assert "transformer.double_stream_blocks.0.block.attn1.to_q.lora_A.weight" in weights
    up = weights["transformer.double_stream_blocks.0.block.attn1.to_q.lora_B.weight"]
    assert up.shape[1] == 4 and up.abs().max() > 0  # lora_B starts at zero; training moved it
    assert weights["transformer.double_stream_blocks.0.block.attn1.to_q.alpha"].item() == 2.0
    assert full.validation_images and full.ema_lokr_path.is_file()
    # diffusers loads it with the trained scale alpha / rank = 0.5 (from the file's lora_adapter_metadata)
    from diffusers import HiDreamImageTransformer2DModel
    from diffusers.loaders import HiDreamImageLoraLoaderMixin

    fresh = HiDreamImageTransformer2DModel.from_pretrained(tiny_model_dir / "transformer")
    state, metadata = HiDreamImageLoraLoaderMixin.lora_state_dict(str(full.lokr_path), return_lora_metadata=True)
    HiDreamImageLoraLoaderMixin.load_lora_into_transformer(state, transformer=fresh, metadata=metadata)
    to_q = fresh.double_stream_blocks[0].block.attn1.to_q
    x = torch.randn(3, to_q.in_features)
    prefix = "transformer.double_stream_blocks.0.block.attn1.to_q"
    delta = x @ weights[f"{prefix}.lora_A.weight"].T @ weights[f"{prefix}.lora_B.weight"].T
    with torch.no_grad():
        assert torch.allclose(to_q(x) - to_q.base_layer(x), 0.5 * delta, atol=1e-6)

    seen = {"step": 0}
    stop = TrainingCallbacks(on_step=lambda m: seen.update(step=m.step),
                             poll_commands=lambda: ["stop"] if seen["step"] == 2 else [])
    train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "part", **kw), callbacks=stop)
    rest = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "part", resume_from_checkpoint="latest",
                                   **kw))
    assert rest.losses == full.losses  # exact resume holds for the LoRA too
    resumed = load_file(str(rest.lokr_path))
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)


def test_a_given_transformer_comes_back_without_the_lora(tiny_model_dir, tiny_paths, shapes, tmp_path):
    """The ComfyUI path (ModelComponents) with lora_type standard: the caller's model leaves unchanged."""
    from trainer_core.hidream import load_transformer
    from trainer_core.training import ModelComponents

    transformer = load_transformer(tiny_paths, dtype=torch.float32)
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    result = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "out", max_train_steps=1,
                                     lora_type="standard", lora_rank=2),
                   components=ModelComponents(transformer=transformer))
    assert result.lokr_path.is_file()
    assert not any("lora" in name for name, _ in transformer.named_modules())
    assert transformer.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in transformer.state_dict().items())
