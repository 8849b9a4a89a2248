"""Exact resume, configuration by configuration: SIGKILL at a step, resume, and the LoKr and its EMA are
bit-identical to an unbroken run's; then the same run extended to a larger max_train_steps is bit-identical to a
run that had the larger value from the start.

Each case is a SimpleTuner-style config run through the CLI in its own processes, on the tiny model:
    reference   12 steps unbroken, a checkpoint every 2 (its checkpoint-8 is what an 8-step run ends with)
    killed      max_train_steps 8, SIGKILLed right after the update of a step chosen per case (a crash point)
    resumed     the same config again: resume_from_checkpoint latest, from the newest checkpoint, to step 8
    extended    max_train_steps 12, resumed from that run's last checkpoint
All four share one cache folder, so only the reference encodes anything. The constant schedules used here do not
depend on the run's length; the ones that do (cosine, linear, ...) cannot be extended exactly, and say so.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import write_lycoris_config, write_shapes_dataset
from trainer_core.util.faults import ENV

ROOT = Path(__file__).resolve().parents[1]
ITEMS = [("circle", "red", "blue"), ("square", "green", "yellow"), ("circle", "yellow", "green"),
         ("square", "blue", "red"), ("circle", "green", "blue"), ("square", "red", "yellow")]
FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_ema.safetensors")
SHORT, LONG = 8, 12

# The quickstart's own lycoris_config.json (use_scalar: true), at the tiny model's factor.
QUICKSTART_LYCORIS = {"algo": "lokr", "multiplier": 1.0, "linear_dim": 16384, "linear_alpha": 1, "full_matrix": True,
                      "use_scalar": True, "factor": 4,
                      "apply_preset": {"target_module": ["Attention"], "module_algo_map": {"Attention": {"factor": 4}}}}

BASE = {"model_family": "hidream", "learning_rate": "1e-3", "train_batch_size": 1, "seed": 17,
        "mixed_precision": "no", "use_ema": True, "checkpoint_step_interval": 2, "resume_from_checkpoint": "latest",
        "report_to": "none", "device": "cpu", "distributed_timeout_seconds": 120}
# The HiDream quickstart's config.json, as far as a CPU and the tiny model allow (sizes and intervals scaled).
QUICKSTART = {"optimizer": "optimi-lion", "learning_rate": "4e-5", "mixed_precision": "bf16",
              "base_model_precision": "int8-quanto", "text_encoder_3_precision": "int8-quanto",
              "text_encoder_4_precision": "int8-quanto", "lr_scheduler": "constant_with_warmup",
              "lr_warmup_steps": 3, "gradient_checkpointing": True, "grad_clip_method": "value", "max_grad_norm": 0.01,
              "eval_steps_interval": 3, "num_eval_images": 1, "validation_prompt": "a red circle",
              "validation_resolution": "64x64", "validation_num_inference_steps": 2, "validation_step_interval": 5,
              "offload_during_startup": True, "lycoris": QUICKSTART_LYCORIS}

# Each case is four CLI runs (~8 s of imports each), so settings are combined where they do not interact: the
# quickstart case also has a held-out eval dataset, the accumulation case the other optimi optimizer in bf16.
CASES = {
    "quickstart-eval-dataset": {**QUICKSTART, "eval_dataset": True},
    "adamw-float32": {"optimizer": "adamw"},
    "prodigy": {"optimizer": "prodigy", "learning_rate": "1.0"},
    "optimi-adamw-bf16-accumulation-2-caption-dropout": {"optimizer": "optimi-adamw", "mixed_precision": "bf16",
                                                         "gradient_accumulation_steps": 2,
                                                         "caption_dropout_probability": 0.3},
    "peft-lora": {"lora_type": "standard", "lora_rank": 4, "use_ema": False},
    "two-ranks-torchrun": {"ranks": 2, "optimizer": "optimi-lion", "mixed_precision": "bf16", "learning_rate": "1e-4"},
}


def write_case(folder: Path, model_dir: Path, data: Path, case: dict, name: str, steps: int) -> Path:
    case = dict(case)
    backend = [{"id": "shapes", "type": "local", "instance_data_dir": str(data), "caption_strategy": "textfile",
                "resolution": 64, "crop": True, "crop_aspect": "square"}]
    if case.pop("eval_dataset", False):
        backend.append({"id": "held-out", "type": "local", "dataset_type": "eval", "caption_strategy": "textfile",
                        "instance_data_dir": str(folder / "eval-images"), "resolution": 64, "crop": True,
                        "crop_aspect": "square"})
        write_shapes_dataset(folder / "eval-images", [("circle", "blue", "yellow")])
    (folder / "multidatabackend.json").write_text(json.dumps(backend))
    lycoris = folder / "lycoris_config.json"
    if "lycoris" in case:
        lycoris.write_text(json.dumps(case.pop("lycoris")))
    else:
        write_lycoris_config(lycoris)
    case.pop("ranks", None)
    config = {**BASE, **case, "pretrained_model_name_or_path": str(model_dir), "output_dir": str(folder / name),
              "cache_dir": str(folder / "cache"), "lycoris_config": str(lycoris),
              "data_backend_config": str(folder / "multidatabackend.json"), "max_train_steps": steps}
    path = folder / f"{name}-{steps}.json"
    path.write_text(json.dumps(config))
    return path


def run_cli(config: Path, ranks: int, crash_at: str | None = None) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in (ENV, "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if crash_at:
        env[ENV] = crash_at
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(ranks)]
    with tempfile.TemporaryFile("w+") as err:  # a pipe nobody reads could fill up and stall the run
        proc = subprocess.run([*launcher, "-m", "trainer_core", "train", "--config", str(config)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=err, text=True, timeout=900)
        err.seek(0)
        return proc.returncode, err.read()


def assert_same_files(got: Path, expected: Path, names: tuple[str, ...], what: str) -> None:
    for name in names:
        a, b = load_file(str(got / name)), load_file(str(expected / name))
        assert a.keys() == b.keys(), f"{what}: {name} has other tensors"
        worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{what}: {name} differs (max abs diff {worst:.3g})"


@pytest.mark.parametrize("name", list(CASES))
def test_sigkill_resume_and_extend_are_exact(name, tiny_model_dir, tmp_path):
    case = CASES[name]
    ranks = case.get("ranks", 1)
    files = FILES if case.get("use_ema", BASE["use_ema"]) else FILES[:1]
    data = write_shapes_dataset(tmp_path / "shapes", ITEMS)
    kill_after = random.Random(name).randint(3, SHORT - 1)  # a checkpoint (every 2 steps) exists before it

    rc, err = run_cli(write_case(tmp_path, tiny_model_dir, data, case, "reference", LONG), ranks)
    assert rc == 0, err[-4000:]
    short = write_case(tmp_path, tiny_model_dir, data, case, "run", SHORT)
    rc, err = run_cli(short, ranks, crash_at=f"step:{kill_after}")
    killed = rc == -signal.SIGKILL if ranks == 1 else (rc != 0 and "SIGKILL" in err)
    assert killed, f"the kill after step {kill_after} did not happen as planned (exit {rc}):\n{err[-3000:]}"
    rc, err = run_cli(short, ranks)
    assert rc == 0 and "resumed from" in err, err[-4000:]
    assert_same_files(tmp_path / "run", tmp_path / "reference" / f"checkpoint-{SHORT}", files,
                      f"{name}: killed after step {kill_after} and resumed")

    rc, err = run_cli(write_case(tmp_path, tiny_model_dir, data, case, "run", LONG), ranks)
    assert rc == 0 and f"written by a run of {SHORT} steps" in err, err[-4000:]
    assert_same_files(tmp_path / "run", tmp_path / "reference", files, f"{name}: extended from {SHORT} to {LONG}")
    losses = [json.loads((tmp_path / run / "losses.json").read_text()) for run in ("run", "reference")]
    assert losses[0] == losses[1] and len(losses[0]) == LONG
    print(f"\n{name}: killed after step {kill_after}, resumed and extended {SHORT} -> {LONG}: bit-identical")
