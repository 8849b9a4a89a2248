"""Every training key whose effect shows in the loss curve changes it: one 3-step baseline on the tiny model, then
one key changed at a time (3 steps: Lion's and AdamW's first updates coincide, sign(g) x lr, so an optimizer shows
from the third loss on). (Keys that change files rather than losses are checked in test_training_features,
test_checkpoint and test_simpletuner_quickstart; config-only keys in test_config_keys.)"""
from __future__ import annotations

import pytest

from helpers import tiny_train_config, write_shapes_dataset
from trainer_core.training import train

ITEMS = [("circle", "red", "blue"), ("square", "green", "yellow"), ("circle", "yellow", "green"),
         ("square", "blue", "red")]


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("key_effects")
    shapes = write_shapes_dataset(root / "shapes", ITEMS)
    baseline = train(tiny_train_config(tiny_model_dir, shapes, root / "baseline", max_train_steps=3,
                                       cache_dir=root / "cache"))
    return root, shapes, baseline.losses


@pytest.mark.parametrize("key, value, first_step_changes", [
    ("flow_schedule_shift", 1.0, True),
    ("flow_schedule_auto_shift", True, True),
    ("hidream_use_load_balancing_loss", True, True),  # the loss now includes the MoE aux loss
    ("caption_dropout_probability", 0.9, True),
    ("init_lokr_norm", 1e-2, True),
    ("seed", 8, True),
    ("train_batch_size", 2, True),
    ("gradient_accumulation_steps", 2, True),
    ("mixed_precision", "bf16", True),
    ("base_model_precision", "int8-quanto", True),
    ("base_model_precision", "int4-quanto", True),
    ("base_model_precision", "fp8-quanto", True),
    ("base_model_precision", "fp8-scaled", True),
    ("base_model_precision", "int8-scaled", True),
    ("learning_rate", 1e-1, False),  # the first step's loss is before any update
    ("optimizer", "optimi-lion", False),
    ("optimizer", "prodigy", False),
    ("max_grad_norm", 1e-8, False),
    ("lr_scheduler", "constant_with_warmup", False),  # with 2 warmup steps: lr 0 for the first update
])
def test_key_changes_the_loss_curve(tiny_model_dir, setup, key, value, first_step_changes):
    root, shapes, baseline = setup
    extra = {"lr_warmup_steps": 2} if key == "lr_scheduler" else {}
    losses = train(tiny_train_config(tiny_model_dir, shapes, root / f"{key}-{value}", max_train_steps=3,
                                     cache_dir=root / "cache", **{key: value}, **extra)).losses
    assert losses[2] != baseline[2]
    assert (losses[0] != baseline[0]) == first_step_changes


def test_load_balancing_weight_applies_once(tiny_model_dir, setup):
    root, shapes, _ = setup
    runs = {w: train(tiny_train_config(tiny_model_dir, shapes, root / f"lb{w}", max_train_steps=1,
                                       cache_dir=root / "cache", hidream_use_load_balancing_loss=True,
                                       hidream_load_balancing_loss_weight=w)).losses[0] for w in (0.01, 0.02)}
    flow_only = train(tiny_train_config(tiny_model_dir, shapes, root / "lb0", max_train_steps=1,
                                        cache_dir=root / "cache")).losses[0]
    aux_01, aux_02 = runs[0.01] - flow_only, runs[0.02] - flow_only
    assert aux_01 > 0 and aux_02 == pytest.approx(2 * aux_01, rel=1e-4)  # linear in the weight: applied once


def test_grad_clip_method_value_clips_elementwise_not_by_norm(tiny_model_dir, setup):
    root, shapes, _ = setup
    by = {method: train(tiny_train_config(tiny_model_dir, shapes, root / f"clip-{method}", max_train_steps=2,
                                          cache_dir=root / "cache", max_grad_norm=1e-4,
                                          grad_clip_method=method)).losses for method in ("norm", "value")}
    assert by["norm"][0] == by["value"][0] and by["norm"][1] != by["value"][1]
