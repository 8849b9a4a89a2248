"""The command line, run as users run it: `python -m trainer_core ...` in a subprocess."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from helpers import write_shapes_dataset

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env_path = str(ROOT)
    return subprocess.run([sys.executable, "-m", "trainer_core", *args], cwd=cwd, capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": env_path}, timeout=600)


def test_make_tiny_model_train_and_sample_from_simpletuner_style_files(tmp_path):
    made = run_cli("make-tiny-model", "models/tiny", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "models/tiny/transformer/config.json").is_file()

    write_shapes_dataset(tmp_path / "datasets/shapes", [("circle", "red", "blue"), ("square", "green", "yellow")])
    (tmp_path / "config").mkdir()
    (tmp_path / "config/multidatabackend.json").write_text(json.dumps([
        {"id": "shapes", "type": "local", "crop": True, "crop_aspect": "square", "crop_style": "center",
         "resolution": 64, "minimum_image_size": 0, "resolution_type": "pixel_area",
         "instance_data_dir": "datasets/shapes", "caption_strategy": "textfile", "metadata_backend": "discovery",
         "repeats": 0},
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
         "cache_dir": "cache/text/hidream"}]))
    (tmp_path / "config/lycoris_config.json").write_text(
        '{"algo": "lokr", "multiplier": 1.0, "linear_dim": 16384, "linear_alpha": 1, "full_matrix": true, '
        '"use_scalar": true, "factor": 16, "apply_preset": {"target_module": ["Attention",], '
        '"module_algo_map": {"Attention": {"factor": 16},}}}')
    (tmp_path / "config/config.json").write_text(json.dumps({
        "model_family": "hidream", "model_type": "lora", "lora_type": "lycoris",
        "pretrained_model_name_or_path": "models/tiny", "output_dir": "output/models-hidream",
        "data_backend_config": "config/multidatabackend.json", "lycoris_config": "config/lycoris_config.json",
        "max_train_steps": "3", "learning_rate": "4e-5", "train_batch_size": 1, "seed": 42,
        "mixed_precision": "no", "gradient_checkpointing": "true", "lr_scheduler": "constant_with_warmup",
        "lr_warmup_steps": 1, "max_grad_norm": 0.01, "grad_clip_method": "value",
        "validation_prompt": "a red circle", "validation_resolution": "64x64",
        "validation_num_inference_steps": "3", "validation_guidance": 3.0, "report_to": "none"}))
    trained = run_cli("train", "--config", "config/config.json", "--device", "cpu", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    lokr = tmp_path / "output/models-hidream/pytorch_lora_weights.safetensors"
    assert lokr.is_file()
    assert "HiDreamAttention" in trained.stderr  # the "Attention" translation is logged

    sampled = run_cli("sample", "--model", "models/tiny", "--lokr", str(lokr), "--prompt", "a red circle",
                      "--out", "out.png", "--width", "64", "--height", "48", "--steps", "3", "--precision", "fp32",
                      "--device", "cpu", cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert Image.open(tmp_path / "out.png").size == (64, 48)


def test_config_errors_are_one_clear_line_and_exit_code_2(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"model_family": "flux", "pretrained_model_name_or_path": "x"}))
    result = run_cli("train", "--config", "bad.json", cwd=tmp_path)
    assert result.returncode == 2
    assert "model_family must be 'hidream'" in result.stderr
    assert "Traceback" not in result.stderr

    bad_size = run_cli("sample", "--model", "nowhere", "--prompt", "x", "--out", "o.png", "--width", "100",
                       cwd=tmp_path)
    assert bad_size.returncode == 2 and "multiple of 16" in bad_size.stderr
