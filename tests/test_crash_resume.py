"""SIGKILL at many points of a run (caches, validation, checkpoint writes, between steps, before the final save,
and at random moments), each time resumed with `resume_from_checkpoint: latest`: the final LoKr and its EMA are
bit-identical to those of a run that was never interrupted, and nothing on disk is ever half-written under its
real name."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from helpers import write_lycoris_config, write_shapes_dataset
from trainer_core.training import checkpoint as ckpt
from trainer_core.data import read_entry
from trainer_core.util.faults import ENV

ROOT = Path(__file__).resolve().parents[1]
ITEMS = [("circle", "red", "blue"), ("square", "green", "yellow"), ("circle", "yellow", "green"),
         ("square", "blue", "red"), ("circle", "green", "blue"), ("square", "red", "yellow")]
# In order; each process resumes from where the previous one died. (point, n-th pass in that process)
# "random": SIGKILL from outside after a random delay, wherever the run happens to be.
CRASHES = ["text-cache-write", "latent-cache-write:3", "validation", "random", "step:3", "random",
           "checkpoint-write", "validation", "step:2", "lokr-save"]


def write_config(folder: Path, model_dir: Path, data: Path, output: str) -> Path:
    config = folder / f"{output}.json"
    config.write_text(json.dumps({
        "model_family": "hidream", "pretrained_model_name_or_path": str(model_dir), "output_dir": str(folder / output),
        "lycoris_config": str(write_lycoris_config(folder / "lycoris.json")),
        "data_backend_config": str(folder / "multidatabackend.json"),
        "max_train_steps": 10, "learning_rate": "1e-3", "train_batch_size": 2, "seed": 11, "mixed_precision": "no",
        "caption_dropout_probability": 0.3, "use_ema": True, "checkpoint_step_interval": 2,
        "checkpoints_total_limit": 2, "resume_from_checkpoint": "latest", "validation_prompt": "a red circle",
        "validation_resolution": "64x64", "validation_num_inference_steps": 2, "validation_step_interval": 4,
        "report_to": "none", "device": "cpu"}))
    (folder / "multidatabackend.json").write_text(json.dumps([
        {"id": "shapes", "type": "local", "instance_data_dir": str(data), "caption_strategy": "textfile",
         "resolution": 64, "crop": True, "crop_aspect": "square"}]))
    return config


def newest_step(output: Path) -> int:
    return max((ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(output)), default=0)


def run_train(config: Path, crash_at: str | None = None, kill_mid_training: random.Random | None = None):
    """Run the CLI; with `kill_mid_training`, SIGKILL it from outside at a random moment after it has written
    its next checkpoint (so the moment falls inside training, whatever the machine's speed)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop(ENV, None)
    if crash_at:
        env[ENV] = crash_at
    output = config.with_suffix("")
    start = newest_step(output)
    with tempfile.TemporaryFile("w+") as err:  # a pipe nobody reads could fill up and stall the run
        proc = subprocess.Popen([sys.executable, "-m", "trainer_core", "train", "--config", str(config)], cwd=ROOT,
                                env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        if kill_mid_training is not None:
            while proc.poll() is None and newest_step(output) <= start:
                time.sleep(0.02)
            time.sleep(kill_mid_training.uniform(0.0, 0.5))
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=600)
        err.seek(0)
        return proc.returncode, err.read()


def assert_nothing_half_written(output: Path) -> None:
    """Every visible cache entry verifies; every visible checkpoint is complete (temporaries are hidden names)."""
    for entry in output.rglob("*.safetensors"):
        if any(part.startswith(".") for part in entry.relative_to(output).parts):
            continue
        if "cache" in entry.relative_to(output).parts:
            read_entry(entry)
        else:
            load_file(str(entry))
    for folder in ckpt.list_checkpoints(output):
        assert ckpt.verify_checkpoint(folder) is None, folder


def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_lokr(tiny_model_dir, tmp_path):
    data = write_shapes_dataset(tmp_path / "shapes", ITEMS)
    reference_config = write_config(tmp_path, tiny_model_dir, data, "reference")
    rc, err = run_train(reference_config)
    assert rc == 0, err[-3000:]

    config = write_config(tmp_path, tiny_model_dir, data, "crashed")
    output = tmp_path / "crashed"
    survived = []
    rng = random.Random(5)
    for crash in CRASHES:
        if crash == "random":
            rc, err = run_train(config, kill_mid_training=rng)
        else:
            rc, err = run_train(config, crash_at=crash)
        assert rc in (-signal.SIGKILL, 0), f"{crash}: exit {rc}\n{err[-3000:]}"
        if crash != "random":
            assert rc == -signal.SIGKILL, f"crash point {crash} was never reached"
        assert "Traceback" not in err, f"{crash}: the run before failed to resume\n{err[-3000:]}"
        assert_nothing_half_written(output)
        survived.append(crash if rc else f"{crash} (finished first)")
    rc, err = run_train(config)
    assert rc == 0, err[-3000:]
    print(f"\nkill points survived: {len(survived)}/{len(survived)} ({', '.join(survived)})")

    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_ema.safetensors"):
        expected = load_file(str(tmp_path / "reference" / name))
        resumed = load_file(str(output / name))
        assert resumed.keys() == expected.keys()
        worst = max((resumed[k] - expected[k]).abs().max().item() for k in expected)
        assert all(torch.equal(resumed[k], expected[k]) for k in expected), f"{name}: max abs diff {worst}"
