"""Injected faults: NaN/inf steps are skipped without touching the weights, a run of them stops with a checkpoint,
out-of-memory switches on gradient checkpointing and retries the step (or, with nothing left to switch on, stops
with a checkpoint and advice), a full disk keeps the previous checkpoint, and the caller's model
always comes back clean."""
from __future__ import annotations

import errno

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_train_config, write_shapes_dataset
from trainer_core.training import checkpoint as ckpt
from trainer_core.util import DiskFullError
from trainer_core.training import ModelComponents, TrainingStopped, train

ITEMS = [("circle", "red", "blue"), ("square", "green", "yellow"), ("circle", "yellow", "green")]


@pytest.fixture()
def shapes(tmp_path):
    return write_shapes_dataset(tmp_path / "shapes", ITEMS)


def components_with(tiny_paths, hook_factory):
    """The tiny model as a caller would hand it over, with a fault-injecting hook on the transformer."""
    from trainer_core.data import VaeImageEncoder
    from trainer_core.hidream import component_identity, load_text_encoders, load_transformer, load_vae
    from trainer_core.hidream import latents_to_images

    transformer = load_transformer(tiny_paths, dtype=torch.float32)
    vae = load_vae(tiny_paths)
    hook_factory(transformer)
    return ModelComponents(transformer=transformer, text_encoder=load_text_encoders(tiny_paths),
                           image_encoder=VaeImageEncoder(vae, component_identity(tiny_paths.model_dir / "vae")),
                           decode_latents=lambda latents: latents_to_images(vae, latents))


def poison_forward_calls(calls: set[int], value: float = float("nan")):
    """A forward hook that replaces the transformer's output on the given (1-based) training forward calls."""
    def install(transformer):
        count = {"n": 0}

        def hook(module, args, kwargs, output):
            if not module.training:
                return output
            count["n"] += 1
            if count["n"] in calls:
                return (output[0] * value, *output[1:])
            return output

        transformer.register_forward_hook(hook, with_kwargs=True)
    return install


def test_a_nan_step_is_skipped_and_leaves_weights_and_optimizer_untouched(tiny_paths, tiny_model_dir, shapes,
                                                                         tmp_path):
    poisoned = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "poisoned", max_train_steps=2,
                                       checkpoint_step_interval=1),
                     components=components_with(tiny_paths, poison_forward_calls({2})))
    clean = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "clean", max_train_steps=1,
                                    checkpoint_step_interval=1),
                  components=components_with(tiny_paths, lambda t: None))
    assert poisoned.nonfinite_steps == 1 and poisoned.steps_done == 2
    assert poisoned.losses[0] == clean.losses[0] and poisoned.losses[1] != poisoned.losses[1]  # NaN recorded
    after_skip, after_one = load_file(str(poisoned.lokr_path)), load_file(str(clean.lokr_path))
    assert after_skip.keys() == after_one.keys()
    assert all(torch.equal(after_skip[k], after_one[k]) for k in after_one)
    skipped = ckpt.load_training_state(tmp_path / "poisoned" / "checkpoint-2")["optimizer"]
    reference = ckpt.load_training_state(tmp_path / "clean" / "checkpoint-1")["optimizer"]
    for key, value in reference["state"].items():
        for name, tensor in value.items():
            assert torch.equal(skipped["state"][key][name], tensor), (key, name)


def test_consecutive_nonfinite_steps_stop_with_a_checkpoint_and_an_explanation(tiny_paths, tiny_model_dir, shapes,
                                                                               tmp_path):
    components = components_with(tiny_paths, poison_forward_calls(set(range(2, 100)), float("inf")))
    before = {k: v.clone() for k, v in components.transformer.state_dict().items()}
    config = tiny_train_config(tiny_model_dir, shapes, tmp_path / "out", max_train_steps=20,
                               max_consecutive_nonfinite_steps=3)
    with pytest.raises(TrainingStopped) as info:
        train(config, components=components)
    message = str(info.value)
    assert "3 steps in a row" in message and "learning rate" in message and "resume_from_checkpoint" in message
    assert info.value.checkpoint == tmp_path / "out" / "checkpoint-4"
    assert ckpt.verify_checkpoint(info.value.checkpoint) is None
    state = components.transformer.state_dict()  # handed back without the LoKr, unchanged
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)


def out_of_memory_from_call(first: int, unless_checkpointing: bool = False):
    """A pre-hook that raises CUDA's out-of-memory error on every training forward from the `first` (1-based) on;
    with `unless_checkpointing`, only while the model runs without gradient checkpointing (as if that fitted)."""
    def install(transformer):
        count = {"n": 0}

        def hook(module, args, kwargs):
            if module.training:
                count["n"] += 1
                if count["n"] >= first and not (unless_checkpointing and module.is_gradient_checkpointing):
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        transformer.register_forward_pre_hook(hook, with_kwargs=True)
    return install


@pytest.mark.parametrize("checkpointing, recover", [(False, False), (True, True)])
def test_out_of_memory_stops_with_a_checkpoint_the_peak_and_what_needs_less(tiny_paths, tiny_model_dir, shapes,
                                                                            tmp_path, checkpointing, recover):
    """Recovery off, or nothing left to switch on (checkpointing already is): the run stops at the failing step."""
    components = components_with(tiny_paths, out_of_memory_from_call(3))
    was_training = components.transformer.training
    config = tiny_train_config(tiny_model_dir, shapes, tmp_path / "out", max_train_steps=10,
                               gradient_checkpointing=checkpointing, recover_from_out_of_memory=recover)
    with pytest.raises(TrainingStopped) as info:
        train(config, components=components)
    message = str(info.value)
    assert "out of memory" in message and "at step 3" in message and "GiB in use" in message
    assert "int8-quanto" in message and "offload_blocks: true" in message
    assert ("gradient_checkpointing: true" in message) is not checkpointing  # advised only when it was off
    assert info.value.checkpoint.name == "checkpoint-2" and ckpt.verify_checkpoint(info.value.checkpoint) is None
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert components.transformer.training == was_training  # handed back in its own mode
    assert not components.transformer.is_gradient_checkpointing  # as it was given, whatever the run switched on


def test_out_of_memory_switches_on_gradient_checkpointing_and_retries_the_same_step(tiny_paths, tiny_model_dir,
                                                                                     shapes, tmp_path, caplog):
    """Step 3 runs out of memory without checkpointing: it is retried with checkpointing on (same batch, same
    noise) and the run goes on, ending where an uninterrupted run ends."""
    uninterrupted = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "plain", max_train_steps=5,
                                            gradient_accumulation_steps=2, gradient_checkpointing=False))
    components = components_with(tiny_paths, out_of_memory_from_call(5, unless_checkpointing=True))
    config = tiny_train_config(tiny_model_dir, shapes, tmp_path / "out", max_train_steps=5,
                               gradient_accumulation_steps=2, gradient_checkpointing=False)
    with caplog.at_level("WARNING", logger="trainer_core.training"):
        recovered = train(config, components=components)
    # Forward 5 is step 3's first micro-batch (2 per step).
    assert "step 3 ran out of memory" in caplog.text and "gradient_checkpointing: true" in caplog.text
    assert recovered.steps_done == 5 and len(recovered.losses) == 5
    assert recovered.losses == pytest.approx(uninterrupted.losses, rel=1e-5)
    trained, reference = load_file(str(recovered.lokr_path)), load_file(str(uninterrupted.lokr_path))
    assert max((trained[k] - reference[k]).abs().max().item() for k in reference) < 1e-5
    assert not components.transformer.is_gradient_checkpointing  # the caller's model comes back as it was given


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path):
    def good(folder):
        (folder / "training_state.pt").write_bytes(b"x" * 1000)

    previous = ckpt.save_checkpoint(tmp_path, 10, good)

    def fills_the_disk(folder):
        (folder / "training_state.pt").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")  # what write() raises on a full disk

    with pytest.raises(DiskFullError) as info:
        ckpt.save_checkpoint(tmp_path, 20, fills_the_disk)
    assert "checkpoint-20" in str(info.value) and "MiB needed" in str(info.value)
    assert ckpt.verify_checkpoint(previous) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10"]
    assert ckpt.resolve_resume_checkpoint(tmp_path, "latest") == previous
