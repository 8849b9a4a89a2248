"""Validation samples as the model's pipeline samples: with its scheduler's shift (scheduler_config.json), never
the training flow_schedule_shift (which only shapes the training noise levels)."""
from __future__ import annotations

import json
import shutil

import numpy as np
from PIL import Image

from helpers import tiny_train_config, write_shapes_dataset
from trainer_core.hidream import scheduler_shift
from trainer_core.training import train


def test_validation_uses_the_models_scheduler_shift_not_the_training_shift(tiny_model_dir, tmp_path):
    assert scheduler_shift(tiny_model_dir) == 3.0  # HiDream-I1-Full's UniPC flow_shift, as the tiny model ships it
    other = tmp_path / "model-shift-1"  # the same model, its scheduler configured with shift 1.0
    shutil.copytree(tiny_model_dir, other)
    config_file = other / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "flow_shift": 1.0}))
    assert scheduler_shift(other) == 1.0
    shapes = write_shapes_dataset(tmp_path / "shapes", [("circle", "red", "blue")])

    def base_image(model, training_shift):
        out = tmp_path / f"run-{model.name}-{training_shift}"
        train(tiny_train_config(model, shapes, out, max_train_steps=1, flow_schedule_shift=training_shift,
                                validation_num_inference_steps=2,
                                validation_prompt="a red circle on a blue background", cache_dir=tmp_path / "cache"))
        return np.asarray(Image.open(out / "validation" / "step_000000" / "validation_64x64.png"), dtype=int)

    reference = base_image(tiny_model_dir, 3.0)
    assert np.array_equal(base_image(tiny_model_dir, 1.0), reference)  # the training shift does not sample
    assert np.abs(base_image(other, 3.0) - reference).mean() > 1.0  # the scheduler's shift does
