"""The SimpleTuner HiDream quickstart's three example files (config.json, multidatabackend.json,
lycoris_config.json, copied with their quirks: string values, `num_train_epochs: 0` beside max_train_steps, a
trailing-comma LyCORIS file, `--user_prompt_library`), with paths and sizes pointed at the tiny model, train from
the command line and produce everything the quickstart promises."""
from __future__ import annotations

import json
import logging

from PIL import Image

from helpers import write_shapes_dataset
from trainer_core.training import checkpoint as ckpt
from trainer_core.cli import main

# config.json of the quickstart; only paths, sizes, step counts and intervals are changed (marked).
QUICKSTART_CONFIG = {
    "validation_torch_compile": "false",
    "validation_step_interval": 3,  # quickstart: 200
    "validation_seed": 42,
    "validation_resolution": "64x64,64x32",  # quickstart: "1024x1024" (it documents comma lists)
    "validation_prompt": "A photo-realistic image of a cat",
    "validation_num_inference_steps": "2",  # quickstart: "20"
    "validation_guidance": 3.0,
    "validation_guidance_rescale": "0.0",
    "vae_batch_size": 1,
    "train_batch_size": 1,
    "tracker_run_name": "eval_loss_test1",
    "seed": 42,
    "resume_from_checkpoint": "latest",
    "resolution": 64,  # quickstart: 1024
    "resolution_type": "pixel_area",
    "report_to": "tensorboard",
    "output_dir": "output/models-hidream",
    "optimizer": "optimi-lion",
    "num_train_epochs": 0,
    "num_eval_images": 1,
    "model_type": "lora",
    "model_family": "hidream",
    "offload_during_startup": True,
    "mixed_precision": "bf16",
    "minimum_image_size": 0,
    "max_train_steps": 6,  # quickstart: 10000
    "max_grad_norm": 0.01,
    "lycoris_config": "config/lycoris_config.json",
    "lr_warmup_steps": 2,  # quickstart: 100
    "lr_scheduler": "constant_with_warmup",
    "lora_type": "lycoris",
    "learning_rate": "4e-5",
    "gradient_checkpointing": "true",
    "grad_clip_method": "value",
    "eval_steps_interval": 2,  # quickstart: 100
    "disable_benchmark": False,
    "data_backend_config": "config/hidream/multidatabackend.json",
    "checkpoints_total_limit": 2,  # quickstart: 5
    "checkpoint_step_interval": 2,  # quickstart: 500
    "caption_dropout_probability": 0.0,
    "base_model_precision": "int8-quanto",
    "text_encoder_3_precision": "int8-quanto",
    "text_encoder_4_precision": "int8-quanto",
    "aspect_bucket_rounding": 2,
    "pretrained_model_name_or_path": "MODEL",  # not in the quickstart's example (set elsewhere there)
    "--user_prompt_library": "config/user_prompt_library.json",
}

QUICKSTART_BACKEND = [
    {"id": "pseudo-camera-10k-hidream", "type": "local", "crop": True, "crop_aspect": "square",
     "crop_style": "center", "resolution": 64, "minimum_image_size": 64, "maximum_image_size": 64,
     "target_downsample_size": 64, "resolution_type": "pixel_area",
     "cache_dir_vae": "cache/vae/hidream/pseudo-camera-10k", "instance_data_dir": "datasets/pseudo-camera-10k",
     "disabled": False, "skip_file_discovery": "", "caption_strategy": "filename", "metadata_backend": "discovery",
     "repeats": 0, "is_regularisation_data": True},
    {"id": "dreambooth-subject", "type": "local", "crop": False, "resolution": 64, "minimum_image_size": 64,
     "maximum_image_size": 64, "target_downsample_size": 64, "resolution_type": "pixel_area",
     "cache_dir_vae": "cache/vae/hidream/dreambooth-subject", "instance_data_dir": "datasets/dreambooth-subject",
     "caption_strategy": "instanceprompt", "instance_prompt": "the name of your subject goes here",
     "metadata_backend": "discovery", "repeats": 1000},
    {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
     "cache_dir": "cache/text/hidream", "disabled": False, "write_batch_size": 128},
]

# The quickstart's lycoris_config.json, trailing commas included.
QUICKSTART_LYCORIS = """{
    "algo": "lokr",
    "multiplier": 1.0,
    "linear_dim": 16384,
    "linear_alpha": 1,
    "full_matrix": true,
    "use_scalar": true,
    "factor": 16,
    "apply_preset": {
        "target_module": [
            "Attention",
        ],
        "module_algo_map": {
            "Attention": {
                "factor": 16
            },
        }
    }
}"""


def test_quickstart_configs_train_from_the_command_line(tiny_model_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)  # SimpleTuner users run from the folder holding config/ and datasets/
    write_shapes_dataset(tmp_path / "datasets/pseudo-camera-10k",
                         [("circle", "red", "blue"), ("square", "green", "yellow"), ("circle", "blue", "red")])
    write_shapes_dataset(tmp_path / "datasets/dreambooth-subject", [("square", "yellow", "green")])
    (tmp_path / "config/hidream").mkdir(parents=True)
    (tmp_path / "config/config.json").write_text(json.dumps(
        {**QUICKSTART_CONFIG, "pretrained_model_name_or_path": str(tiny_model_dir)}))
    (tmp_path / "config/hidream/multidatabackend.json").write_text(json.dumps(QUICKSTART_BACKEND))
    (tmp_path / "config/lycoris_config.json").write_text(QUICKSTART_LYCORIS)
    (tmp_path / "config/user_prompt_library.json").write_text(json.dumps(
        {"anime_<token>": "a breathtaking anime-style portrait of <token>", "man": "a powerful portrait of a man"}))

    with caplog.at_level(logging.INFO):
        assert main(["train", "--config", "config/config.json", "--device", "cpu"]) == 0
    out = tmp_path / "output/models-hidream"
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]  # total limit 2
    assert all(ckpt.verify_checkpoint(p) is None for p in ckpt.list_checkpoints(out))
    for step in ("step_000000", "step_000003", "step_000006"):
        folder = out / "validation" / step
        assert (folder / "grid.png").is_file(), step
        assert Image.open(folder / "anime_<token>_64x32.png").size == (64, 32)
    assert list((out / "logs/eval_loss_test1").glob("events.out.tfevents.*"))
    records = [json.loads(l) for l in (out / "logs/eval_loss_test1/scalars.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2, 4, 6]  # held-out slice (num_eval_images 1)
    assert sorted(p.name for p in (tmp_path / "cache/vae/hidream").iterdir()) == ["dreambooth-subject",
                                                                                 "pseudo-camera-10k"]
    assert list((tmp_path / "cache/text/hidream").rglob("*.safetensors"))
    log = caplog.text
    assert "HiDreamAttention" in log  # SimpleTuner's class name, translated and said
    assert "6 optimizer steps" in log  # num_train_epochs 0 + max_train_steps: resolved once
    assert "'pseudo-camera-10k-hidream' is regularisation data" in log  # is_regularisation_data: true
    assert "not used by this trainer" not in log  # every quickstart key is known

    # resume_from_checkpoint: latest with more steps continues from checkpoint-6
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["train", "--config", "config/config.json", "--device", "cpu", "--max-train-steps", "8"]) == 0
    assert "resumed from" in caplog.text and "at step 6 of 8" in caplog.text
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-6", "checkpoint-8"]
