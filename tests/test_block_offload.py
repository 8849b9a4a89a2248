"""Low-memory block streaming (block_offload.py) on the tiny HiDream transformer: the same loss, LoKr gradients and
merged samples as the resident model; blocks are copied in forward order and, during checkpoint recomputation, in
reverse order; between forward calls every block points at its host copy; quantised bases are refused."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from trainer_core.speedups import BlockStreamer
from trainer_core.config import ConfigError
from trainer_core.adapters import LycorisConfig, create_lokr_network, lokr_applied
from trainer_core.quant import quantize_frozen
from trainer_core.hidream import transformer_blocks
from trainer_core.speedups import apply_speedups

from conftest import random_conditioning
from test_speedups import _loss_and_grads, _set_factors

CONFIG = LycorisConfig(factor=4)


def _trained_side(tiny_transformer, stream: bool):
    transformer = copy.deepcopy(tiny_transformer)
    network = create_lokr_network(transformer, CONFIG)
    _set_factors(network)
    apply_speedups(transformer, network)
    streamer = BlockStreamer(transformer, torch.device("cpu")) if stream else None
    return transformer, network, streamer, _loss_and_grads(transformer, network, checkpointing=True)


def _points_at_host(streamer: BlockStreamer) -> bool:
    for packed in streamer.packed:
        start = packed.host.data_ptr()
        end = start + packed.host.numel()
        if not all(start <= t.data_ptr() < end for t in packed.tensors):
            return False
    return True


def test_streamed_training_step_equals_the_resident_one(tiny_transformer):
    *_, (flow0, aux0, grads0) = _trained_side(tiny_transformer, stream=False)
    transformer, network, streamer, (flow, aux, grads) = _trained_side(tiny_transformer, stream=True)
    # Same kernels on the same values; only the weights' addresses differ (CPU GEMMs may block differently).
    assert flow == pytest.approx(flow0, rel=1e-6) and aux == pytest.approx(aux0, rel=1e-6)
    assert set(grads) == set(grads0)
    for name, g0 in grads0.items():
        torch.testing.assert_close(grads[name], g0, rtol=1e-5, atol=1e-8, msg=name)
    n = len(transformer_blocks(transformer))
    # Forward: 0..n-1, each prefetched by its predecessor; recomputation in the backward: n-1..0.
    assert streamer.load_order == [*range(n), *reversed(range(n))]
    assert _points_at_host(streamer)
    _loss_and_grads(transformer, network, checkpointing=True)  # a second step: the record is per pass, not growing
    assert streamer.load_order == [*range(n), *reversed(range(n))]


def test_merged_sampling_streams_the_merged_weights(tiny_transformer):
    transformer = copy.deepcopy(tiny_transformer).eval()
    network = create_lokr_network(transformer, CONFIG)
    _set_factors(network)
    embeds = random_conditioning(transformer, batch=1, seed=5)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(6))

    @torch.no_grad()
    def predict():
        return transformer(hidden_states=x, timesteps=torch.tensor([500.0]), encoder_hidden_states_t5=embeds.t5,
                           encoder_hidden_states_llama3=embeds.llama, pooled_embeds=embeds.pooled,
                           return_dict=False)[0]

    with lokr_applied(network) as how:
        assert how == "merged"
        resident = predict()
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    streamer = BlockStreamer(transformer, torch.device("cpu"))
    with lokr_applied(network):
        streamed = predict()
    torch.testing.assert_close(streamed, resident, rtol=1e-5, atol=1e-6)
    assert _points_at_host(streamer)
    streamer.remove()  # back to ordinary tensors, the LoKr unmerged bit for bit
    for key, value in transformer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_quantised_base_is_refused_with_the_fix(tiny_transformer):
    transformer = copy.deepcopy(tiny_transformer)
    quantize_frozen(transformer, "int8-quanto")
    with pytest.raises(ConfigError, match="base_model_precision"):
        BlockStreamer(transformer, torch.device("cpu"))


def test_training_with_offload_blocks_equals_resident_training(tiny_model_dir, tiny_paths, tmp_path):
    """`offload_blocks: true` through the whole trainer (checkpointing, validation with the LoKr merged into the
    streamed weights): the same losses and LoKr as resident training, and a caller's transformer comes back whole."""
    from safetensors.torch import load_file

    from helpers import tiny_train_config, write_shapes_dataset
    from trainer_core.hidream import load_transformer
    from trainer_core.training import ModelComponents, train

    shapes = write_shapes_dataset(tmp_path / "shapes", [("circle", "red", "blue"), ("square", "green", "yellow")])
    common = dict(max_train_steps=3, gradient_checkpointing=True, validation_prompt="a red circle",
                  validation_step_interval=2, cache_dir=tmp_path / "cache")
    resident = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "resident", **common))
    streamed = train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "streamed", offload_blocks=True, **common))
    assert streamed.losses == pytest.approx(resident.losses, rel=1e-5)
    # Adam amplifies last-bit gradient differences on near-zero entries: compare the LoKr as a whole.
    ours, theirs = load_file(streamed.lokr_path), load_file(resident.lokr_path)
    assert ours.keys() == theirs.keys()
    flat = [torch.cat([d[k].flatten().float() for k in sorted(d)]) for d in (ours, theirs)]
    assert (flat[0] - flat[1]).norm() <= 1e-4 * flat[1].norm(), ((flat[0] - flat[1]).norm() / flat[1].norm())
    assert len(streamed.validation_images) == len(resident.validation_images) == 6  # steps 0, 2, 3
    for a, b in zip(resident.validation_images, streamed.validation_images):
        diff = np.abs(np.asarray(Image.open(a), np.int16) - np.asarray(Image.open(b), np.int16))
        assert diff.max() <= 2, (a.name, diff.max())

    transformer = load_transformer(tiny_paths, dtype=torch.float32)
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    train(tiny_train_config(tiny_model_dir, shapes, tmp_path / "given", offload_blocks=True, **common),
          components=ModelComponents(transformer=transformer, transformer_name="given"))
    assert not transformer._forward_pre_hooks and not any(b._forward_pre_hooks for b in transformer.modules())
    for name, value in transformer.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("overrides, fix", [
    (dict(gradient_checkpointing=False), "gradient_checkpointing: true"),
    (dict(gradient_checkpointing=True, base_model_precision="int8-quanto"), "base_model_precision: no_change"),
    (dict(gradient_checkpointing=True, compile_blocks=True), "compile_blocks: false")])
def test_offload_blocks_clashes_name_the_fix(tmp_path, overrides, fix):
    from helpers import tiny_train_config

    config = tiny_train_config(tmp_path / "model", tmp_path / "data", tmp_path / "out", offload_blocks=True,
                               **overrides)
    with pytest.raises(ConfigError, match=fix):
        config.validate()


def test_pinning_looks_at_the_host_memory_available_first():
    """Pinned (page-locked) memory is taken only while it leaves room; blocks that must be copied off the GPU and
    cannot fit are refused before anything is copied, with the fix. The sentence says what was pinned."""
    from trainer_core.speedups.block_offload import pin_plan

    gib = 2**30
    pin, said = pin_plan(10 * gib, 40 * gib, resident=False)
    assert pin and "pinned 10.00 GiB" in said and "40.0 GiB was available" in said
    pin, said = pin_plan(35 * gib, 40 * gib, resident=True)
    assert not pin and said.startswith("not pinned") and "pageable" in said
    assert pin_plan(35 * gib, 40 * gib, resident=False)[0] is False  # fits, but unpinned
    with pytest.raises(ConfigError, match="needs 50.0 GiB of host memory.*about 40.0 GiB is available"):
        pin_plan(50 * gib, 40 * gib, resident=False)
    assert pin_plan(50 * gib, 40 * gib, resident=True)[0] is False  # already in host memory: moved, not pinned
    assert pin_plan(gib, None, resident=False) == (True, "pinned 1.00 GiB of host memory (available memory unknown)")
