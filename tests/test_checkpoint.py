"""Checkpoints: exact resume, stop/save/sample commands, atomic writes, skipping incomplete checkpoints."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_train_config, write_shapes_dataset
from trainer_core.training import checkpoint as ckpt
from trainer_core.config import ConfigError
from trainer_core.adapters import load_lokr
from trainer_core.hidream import load_transformer
from trainer_core.training import EMA_LOKR_FILENAME, LOKR_FILENAME, TrainingCallbacks, train

ITEMS = [("circle", "red", "blue"), ("square", "green", "yellow"), ("circle", "yellow", "green"),
         ("square", "blue", "red")]


@pytest.fixture()
def shapes(tmp_path):
    return write_shapes_dataset(tmp_path / "shapes", ITEMS)


def _max_abs_diff(path_a, path_b) -> float:
    a, b = load_file(str(path_a)), load_file(str(path_b))
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_stopped_and_resumed_run_equals_uninterrupted_run(tiny_model_dir, shapes, tmp_path):
    """6 steps straight vs 3 steps, "stop", resume latest, 3 more: same losses, LoKr and EMA, bit for bit.

    Every random stream is in play: caption dropout (python random), noise and sigmas (torch generator), a
    shuffled multi-epoch data order (batch 2 of 4 images: 2 batches per epoch), warmup + cosine learning rate,
    AdamW moments and the EMA."""
    kw = dict(max_train_steps=6, caption_dropout_probability=0.3, use_ema=True, lr_scheduler="cosine",
              lr_warmup_steps=2, checkpoint_step_interval=2, checkpoints_total_limit=2, train_batch_size=2,
              cache_dir=tmp_path / "cache")
    full = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "full", **kw))

    seen = {"step": 0}
    stop_after_3 = TrainingCallbacks(on_step=lambda m: seen.update(step=m.step),
                                     poll_commands=lambda: ["stop"] if seen["step"] == 3 else [])
    part = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "part", **kw), callbacks=stop_after_3)
    assert part.stopped and part.steps_done == 3
    assert part.checkpoint_path == tmp_path / "part" / "checkpoint-3"
    assert (tmp_path / "part" / LOKR_FILENAME).is_file()  # the LoKr so far is usable right away

    rest = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "part", resume_from_checkpoint="latest", **kw))
    assert rest.resumed_from == tmp_path / "part" / "checkpoint-3" and not rest.stopped
    assert rest.losses == full.losses  # bit-identical on the CPU, the first 3 from the checkpoint's history
    lokr_diff = _max_abs_diff(full.lokr_path, rest.lokr_path)
    ema_diff = _max_abs_diff(full.ema_lokr_path, rest.ema_lokr_path)
    print(f"resume equivalence: max |dLoKr| = {lokr_diff}, max |dEMA| = {ema_diff}")
    assert lokr_diff == 0.0 and ema_diff == 0.0
    # checkpoints_total_limit 2 keeps the newest two; the JSONL log reads like one run
    assert sorted(p.name for p in ckpt.list_checkpoints(tmp_path / "part")) == ["checkpoint-4", "checkpoint-6"]
    steps = [json.loads(l)["step"] for l in (rest.log_dir / "scalars.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_checkpoint_contents_load_without_unpickling(tiny_model_dir, tiny_paths, shapes, tmp_path):
    result = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "out", max_train_steps=2, use_ema=True,
                                     optimizer="optimi-lion", checkpoint_step_interval=2))
    folder = tmp_path / "out" / "checkpoint-2"
    assert ckpt.verify_checkpoint(folder) is None
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {LOKR_FILENAME, EMA_LOKR_FILENAME, "training_state.pt", "config.json"}
    state = torch.load(folder / "training_state.pt", weights_only=True)  # plain tensors and numbers only
    assert state["step"] == 2 and state["optimizer"]["state"] and "ema" in state
    assert json.loads((folder / "config.json").read_text())["optimizer"] == "optimi-lion"
    # the checkpoint's LoKr (and the EMA one) load like any LoKr file
    for name in (LOKR_FILENAME, EMA_LOKR_FILENAME):
        network = load_lokr(folder / name, load_transformer(tiny_paths, dtype=torch.float32))
        assert len(network.loras) > 0
    assert result.ema_lokr_path == tmp_path / "out" / EMA_LOKR_FILENAME
    with pytest.raises(ConfigError, match="written with optimizer optimi-lion"):  # resuming with other settings is refused clearly
        train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "out", max_train_steps=4, use_ema=True,
                                optimizer="prodigy", learning_rate=1.0, resume_from_checkpoint="latest"))


def _write_dummy(folder):
    (folder / "training_state.pt").write_bytes(b"state")
    (folder / "weights.bin").write_bytes(b"weights")


def test_incomplete_or_corrupt_newest_checkpoint_is_skipped(tmp_path, caplog):
    for step in (2, 4, 6):
        ckpt.save_checkpoint(tmp_path, step, _write_dummy)
    (tmp_path / "checkpoint-6" / "manifest.json").unlink()  # a save that never finished
    (tmp_path / "checkpoint-4" / "weights.bin").write_bytes(b"weightZ")  # corrupted after the fact
    with caplog.at_level(logging.WARNING):
        assert ckpt.resolve_resume_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-2"
    assert "checkpoint-6" in caplog.text and "no manifest" in caplog.text
    assert "checkpoint-4" in caplog.text and "sha256" in caplog.text
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        ckpt.resolve_resume_checkpoint(tmp_path, "checkpoint-4")
    assert ckpt.resolve_resume_checkpoint(tmp_path, "checkpoint-2") == tmp_path / "checkpoint-2"
    with pytest.raises(ConfigError, match="checkpoint-2"):  # the message lists what exists
        ckpt.resolve_resume_checkpoint(tmp_path, "checkpoint-99")
    assert ckpt.resolve_resume_checkpoint(tmp_path / "empty", "latest") is None  # fresh start


def test_a_crash_while_saving_leaves_no_checkpoint_that_looks_complete(tmp_path):
    def crash(folder):
        _write_dummy(folder)
        raise KeyboardInterrupt("power cut")

    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 8, crash)
    assert not (tmp_path / "checkpoint-8").exists()
    assert ckpt.resolve_resume_checkpoint(tmp_path, "latest") is None
    ckpt.save_checkpoint(tmp_path, 8, _write_dummy)  # the next save of the same step cleans up and succeeds
    assert ckpt.verify_checkpoint(tmp_path / "checkpoint-8") is None
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-8"]


def test_should_stop_save_and_sample_commands(tiny_model_dir, shapes, tmp_path):
    """"sample" draws validation images at that step, "save" writes a checkpoint and the LoKr and goes on,
    should_stop ends cleanly with a checkpoint; StepMetrics carries peak memory and an ETA."""
    metrics = []
    commands = {1: ["sample"], 2: ["save", "bogus"]}
    cb = TrainingCallbacks(on_step=metrics.append, poll_commands=lambda: commands.get(len(metrics), []),
                           should_stop=lambda: len(metrics) >= 3)
    result = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "out", max_train_steps=10,
                                     validation_prompt="a red circle", disable_benchmark=True), callbacks=cb)
    assert result.stopped and result.steps_done == 3 and len(result.losses) == 3
    validation_steps = sorted({p.parent.name for p in result.validation_images})
    assert validation_steps == ["step_000001"]  # no final validation after a stop
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "out")] == ["checkpoint-2", "checkpoint-3"]
    assert result.checkpoint_path == tmp_path / "out" / "checkpoint-3"
    assert all(m.peak_memory_bytes > 10 * 2**20 for m in metrics)
    assert all(m.eta_seconds > 0 for m in metrics)  # 10 steps planned, 3 done: time is left


def test_stop_command_previews_the_lokr_it_stops_with(tiny_model_dir, shapes, tmp_path):
    """"stop" (Stop & save) ends with validation images at the step it stops, so the person sees the LoKr they
    keep; without a validation prompt (previews off) it draws nothing. should_stop (Cancel, above) draws none."""
    for prompt in ("a red circle", None):
        steps, drawn = [], []
        cb = TrainingCallbacks(on_step=lambda m: steps.append(m.step),
                               on_validation=lambda step, grid, path: drawn.append(step),
                               poll_commands=lambda: ["stop"] if steps == [1, 2] else [])
        result = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / f"out_{bool(prompt)}", max_train_steps=10,
                                         validation_prompt=prompt, disable_benchmark=True), callbacks=cb)
        assert result.stopped and result.steps_done == 2
        assert result.checkpoint_path.name == "checkpoint-2"
        assert drawn == ([2] if prompt else [])
        assert sorted({p.parent.name for p in result.validation_images}) == (["step_000002"] if prompt else [])


def test_sample_command_on_the_last_step_does_not_validate_twice(tiny_model_dir, shapes, tmp_path):
    seen = []
    result = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "out", max_train_steps=1,
                                     validation_prompt="a red circle", disable_benchmark=True),
                   callbacks=TrainingCallbacks(on_validation=lambda step, grid, path: seen.append(step),
                                               poll_commands=lambda: ["sample"]))
    assert seen == [1] and len(result.validation_images) == 2  # one image and its grid
