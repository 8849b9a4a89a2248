"""is_regularisation_data as SimpleTuner trains it for LoRA / LyCORIS adapters (trainer.py,
`_prepare_regularisation_parent_targets`): a regularisation sample's target is the base model's own prediction
(adapter off, no gradient) for the same noisy latents and caption, not the flow noise - x0 of its image."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_train_config, write_shapes_dataset
from trainer_core.training import train


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """Two one-picture datasets sharing a 64x64 bucket, so a batch of 2 always holds one sample of each."""
    root = tmp_path_factory.mktemp("regularisation")
    return root, [write_shapes_dataset(root / name, [item]) for name, item in
                  (("a", ("circle", "red", "blue")), ("b", ("square", "green", "yellow")))]


def run(tiny_model_dir, two_datasets, regularisation: tuple[bool, bool], steps: int = 1, **overrides):
    root, folders = two_datasets
    name = "-".join(map(str, regularisation)) + "-".join(f"{k}{v}" for k, v in overrides.items())
    config = tiny_train_config(tiny_model_dir, folders[0], root / f"run-{name}", max_train_steps=steps,
                               train_batch_size=2, cache_dir=root / "cache", **overrides)
    template = config.datasets[0]
    config.datasets = [dataclasses.replace(template, instance_data_dir=folder, id=f"ds{i}",
                                           is_regularisation_data=flag)
                       for i, (folder, flag) in enumerate(zip(folders, regularisation))]
    return train(config)


def test_regularisation_samples_are_trained_towards_the_base_models_prediction(tiny_model_dir, two_datasets):
    # At LyCORIS' initialisation (W2 = 0) the adapted model is the base model: a regularisation sample's loss is
    # exactly 0, so a batch's first loss is the mean of its other samples' flow losses, sample by sample.
    none = run(tiny_model_dir, two_datasets, (False, False)).losses[0]
    only_a = run(tiny_model_dir, two_datasets, (True, False)).losses[0]
    only_b = run(tiny_model_dir, two_datasets, (False, True)).losses[0]
    assert only_a > 0 and only_b > 0 and only_a != only_b
    assert only_a + only_b == pytest.approx(none, rel=1e-6)

    # Regularisation data alone: the target is what the adapted model already predicts, the gradient is 0, and
    # the LoKr never moves off the base model (W2 stays exactly 0, AdamW's decay included).
    both = run(tiny_model_dir, two_datasets, (True, True), steps=3)
    assert both.losses == [0.0, 0.0, 0.0]
    w2 = [t for k, t in load_file(str(both.lokr_path)).items() if k.endswith("lokr_w2")]
    assert w2 and all(not t.any() for t in w2)


def test_regularisation_pulls_a_changed_adapter_back_and_works_for_lora(tiny_model_dir, two_datasets):
    # An adapter that starts off the base model (init_lokr_norm) has a positive regularisation loss that training
    # on regularisation data alone lowers; a PEFT LoRA (B = 0 at init) starts on the base model: loss 0.
    moved = run(tiny_model_dir, two_datasets, (True, True), steps=3, init_lokr_norm=0.5, learning_rate=1e-2)
    assert moved.losses[0] > 0 and moved.losses[-1] < moved.losses[0]
    lora = run(tiny_model_dir, two_datasets, (True, True), lora_type="standard")
    assert lora.losses == [0.0]
    assert torch.isfinite(torch.tensor(moved.losses)).all()
