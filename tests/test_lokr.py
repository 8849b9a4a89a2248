"""LoKr creation, targeting, persistence and merge/restore on the tiny HiDream transformer."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import cfg_forward, random_conditioning
from trainer_core.config import ConfigError
from trainer_core.adapters import (LycorisConfig, create_lokr_network, load_lokr, lokr_applied, remove_lokr,
                               save_lokr)

QUICKSTART_ATTENTION = {"algo": "lokr", "multiplier": 1.0, "linear_dim": 16384, "linear_alpha": 1,
                        "full_matrix": True, "use_scalar": True, "factor": 16,
                        "apply_preset": {"target_module": ["Attention"],
                                         "module_algo_map": {"Attention": {"factor": 16}}}}
QUICKSTART_FF = {"algo": "lokr", "multiplier": 1.0, "linear_dim": 16384, "linear_alpha": 1, "full_matrix": True,
                 "use_scalar": True, "factor": 16,
                 "apply_preset": {"name_algo_map": {p: {"factor": 16} for p in (
                     "double_stream_blocks.*.block.attn*", "double_stream_blocks.*.block.ff_t*",
                     "double_stream_blocks.*.block.ff_i.shared_experts*", "single_stream_blocks.*.block.attn*",
                     "single_stream_blocks.*.block.ff_i.shared_experts*")}, "use_fnmatch": True}}


def _forward(transformer, seed=0):
    cond = random_conditioning(transformer, seed=seed)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(seed))
    transformer.eval()
    with torch.no_grad():
        return transformer(hidden_states=x, timesteps=torch.tensor([400.0]), encoder_hidden_states_t5=cond.t5,
                           encoder_hidden_states_llama3=cond.llama, pooled_embeds=cond.pooled,
                           return_dict=False)[0]


def _randomise(network, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if p.dim() == 0 else 0.0))


def _attention_linears(transformer):
    return [n for n, m in transformer.named_modules()
            if isinstance(m, torch.nn.Linear) and ".attn1." in n]


def test_simpletuner_attention_class_resolves_to_hidream_attention(tiny_transformer, caplog):
    network = create_lokr_network(tiny_transformer, LycorisConfig.from_dict(QUICKSTART_ATTENTION))
    wrapped = {lora.lora_name for lora in network.loras}
    expected = {"lycoris_" + n.replace(".", "_") for n in _attention_linears(tiny_transformer)}
    assert wrapped == expected
    assert "HiDreamAttention" in caplog.text
    assert all(lora.bypass_mode for lora in network.loras)
    assert not any(p.requires_grad for p in tiny_transformer.parameters() if not _is_lokr(p, network))


def _is_lokr(param, network):
    return any(param is p for p in network.parameters())


def test_preset_matching_nothing_is_an_error_naming_the_classes(tiny_transformer):
    config = LycorisConfig.from_dict({**QUICKSTART_ATTENTION, "apply_preset": {"target_module": ["NoSuchBlock"]}})
    with pytest.raises(ConfigError) as err:
        create_lokr_network(tiny_transformer, config)
    assert "HiDreamAttention" in str(err.value) and "double_stream_blocks" in str(err.value)


def test_presets_do_not_leak_between_networks(tiny_paths):
    """LyCORIS presets are class attributes: a second network must not inherit the first one's targets."""
    from trainer_core.hidream import load_transformer

    ff = create_lokr_network(load_transformer(tiny_paths), LycorisConfig.from_dict(QUICKSTART_FF))
    ff_names = {l.lora_name for l in ff.loras}
    assert any("ff_t" in n for n in ff_names) and any("shared_experts" in n for n in ff_names)
    assert not any("experts_0" in n for n in ff_names)  # routed experts excluded by this preset
    attn = create_lokr_network(load_transformer(tiny_paths), LycorisConfig.from_dict(QUICKSTART_ATTENTION))
    assert all(".attn1." in l.lora_name.replace("_attn1_", ".attn1.") for l in attn.loras)
    assert len(attn.loras) == len(_attention_linears(load_transformer(tiny_paths)))


def test_save_load_round_trip_gives_identical_outputs(tiny_paths, tmp_path):
    from lycoris import create_lycoris_from_weights

    from trainer_core.hidream import load_transformer

    trained = load_transformer(tiny_paths)
    config = LycorisConfig.from_dict(QUICKSTART_ATTENTION)
    network = create_lokr_network(trained, config)
    _randomise(network)
    expected = _forward(trained)
    assert not torch.allclose(expected, _forward(load_transformer(tiny_paths)))
    path = save_lokr(network, tmp_path / "pytorch_lora_weights.safetensors", config)

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert "lycoris_double_stream_blocks_0_block_attn1_to_q.lokr_w1" in keys
    assert "lycoris_double_stream_blocks_0_block_attn1_to_q.lokr_w2" in keys
    assert "lycoris_double_stream_blocks_0_block_attn1_to_q.alpha" in keys
    assert json.loads(meta["lycoris_config"])["factor"] == 16

    # The stock LyCORIS loader, onto a fresh model, reproduces the trained network's output.
    fresh = load_transformer(tiny_paths)
    stock, _ = create_lycoris_from_weights(1.0, str(path), fresh)
    stock.apply_to()
    assert len(stock.loras) == len(network.loras)
    assert torch.allclose(_forward(fresh), expected, atol=1e-5)
    # and so does ours
    ours = load_lokr(path, load_transformer(tiny_paths))
    assert len(ours.loras) == len(network.loras)


def test_load_rejects_a_file_for_another_model(tiny_paths, tmp_path):
    from safetensors.torch import save_file

    from trainer_core.hidream import load_transformer

    save_file({"lycoris_unet_down_blocks_0_attn.lokr_w1": torch.ones(2, 2),
               "lycoris_unet_down_blocks_0_attn.lokr_w2": torch.ones(2, 2)}, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(ConfigError, match="do not match"):
        load_lokr(tmp_path / "sdxl.safetensors", load_transformer(tiny_paths))


def test_merge_matches_hooks_and_restores_base_exactly(tiny_transformer):
    before = {k: v.clone() for k, v in tiny_transformer.state_dict().items()}
    network = create_lokr_network(tiny_transformer, LycorisConfig.from_dict(QUICKSTART_FF))
    _randomise(network)
    hooked = _forward(tiny_transformer)
    with lokr_applied(network, 1.0) as mode:
        assert mode == "merged"
        merged = _forward(tiny_transformer)
        half_changed = any(not torch.equal(v, before[k]) for k, v in tiny_transformer.state_dict().items())
    assert half_changed
    assert torch.allclose(merged, hooked, atol=1e-5)
    after = tiny_transformer.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # bit-exact restore
    assert torch.allclose(_forward(tiny_transformer), hooked)  # hooks are back
    remove_lokr(network)
    with torch.no_grad():
        assert not torch.allclose(_forward(tiny_transformer), hooked)


def test_strength_scales_the_update(tiny_transformer):
    """Merged at strength s, every wrapped weight is W + s * scale * scalar * kron(W1, W2) (the delta written out
    here, not by the code under test), for several s, negative included; the model then predicts what the hooks
    predict at multiplier s, and the base weights come back bit for bit after each."""
    network = create_lokr_network(tiny_transformer, LycorisConfig.from_dict(QUICKSTART_ATTENTION))
    _randomise(network)  # the trainable scalar too (LyCORIS' own merge_to would ignore it)
    layers = [(lora.org_module[0], lora.scale * lora.scalar.detach() *
               torch.kron(lora.lokr_w1.detach(), lora.lokr_w2.detach())) for lora in network.loras]
    base = [layer.weight.detach().clone() for layer, _ in layers]
    for strength in (0.0, 0.5, 1.0, 2.0, -1.0):
        network.set_multiplier(strength)
        hooked = _forward(tiny_transformer)
        network.set_multiplier(1.0)
        with lokr_applied(network, strength) as mode:
            assert mode == "merged"
            for (layer, delta), weight in zip(layers, base):
                torch.testing.assert_close(layer.weight - weight, strength * delta, rtol=1e-5, atol=1e-7)
            merged = _forward(tiny_transformer)
        torch.testing.assert_close(merged, hooked, rtol=1e-4, atol=1e-5)
        assert all(torch.equal(layer.weight, weight) for (layer, _), weight in zip(layers, base))


def _small_update(network, relative: float, seed: int = 1) -> None:
    """Full-matrix factors whose kron(W1, W2) has a std of `relative` times the base weight's: a LoKr early in
    training, whose update is mostly below half a bf16 unit in the last place of W."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.loras:
            lora.lokr_w1.copy_(torch.randn(lora.lokr_w1.shape, generator=g))
            lora.lokr_w2.copy_(torch.randn(lora.lokr_w2.shape, generator=g))
            delta_std = torch.kron(lora.lokr_w1, lora.lokr_w2).std()
            lora.lokr_w2.mul_(relative * lora.org_module[0].weight.float().std() / delta_std)


def test_bf16_preview_is_the_bypass_forward_the_lokr_trained_with(tiny_paths):
    """On a bf16 base, sampling runs the LoKr through the forward it trained with (LyCORIS' bypass: W x + dW x),
    not merged: W + dW rounded to bf16 loses at least 30 % of an update this small (mean over the layers), and
    such a merged model's output was off the bypass forward's by about the LoKr's whole effect (0.9x). Held here to
    0.2x at strengths 1 and 0.5 (LyCORIS' own hooks on both sides, no speed-ups: the same computation)."""
    from trainer_core.hidream import load_transformer

    transformer = load_transformer(tiny_paths, dtype=torch.bfloat16).eval()
    network = create_lokr_network(transformer, LycorisConfig.from_dict({**QUICKSTART_ATTENTION, "use_scalar": False,
                                                                        "factor": 4}))
    _small_update(network, relative=3e-3)
    lost = []
    for lora in network.loras:
        weight = lora.org_module[0].weight.float()
        delta = torch.kron(lora.lokr_w1, lora.lokr_w2).detach()
        rounded = (weight + delta).to(torch.bfloat16).float() - weight
        lost.append(((rounded - delta).abs().mean() / delta.abs().mean()).item())
    assert sum(lost) / len(lost) >= 0.3  # what a merge into the bf16 weights would lose of the update
    forward = cfg_forward(transformer, seed=2, dtype=torch.bfloat16)
    network.set_multiplier(0.0)
    base = forward().float()
    for strength in (1.0, 0.5):
        network.set_multiplier(strength)
        bypass = forward().float()
        network.set_multiplier(1.0)
        with lokr_applied(network, strength) as mode:
            preview = forward().float()
        effect = (bypass - base).norm()
        assert effect > 1e-3 * bypass.norm()  # the LoKr changes the output
        assert mode == "bypass" and (preview - bypass).norm() <= 0.2 * effect, (preview - bypass).norm() / effect
    assert all(lora.multiplier == 1.0 for lora in network.loras)  # the strength is put back


def test_init_lokr_norm_perturbs_like_simpletuner(tiny_transformer):
    network = create_lokr_network(tiny_transformer, LycorisConfig.from_dict({**QUICKSTART_ATTENTION,
                                                                            "use_scalar": False}),
                                  init_lokr_norm=1e-3)
    lora = network.loras[0]
    assert torch.all(lora.lokr_w1 == 1.0)
    base_std = lora.org_module[0].weight.float().std().item()
    assert lora.lokr_w2.std().item() == pytest.approx(base_std * 1e-3, rel=0.3)


def test_lycoris_config_reads_quickstart_json_with_trailing_commas(tmp_path):
    text = json.dumps(QUICKSTART_ATTENTION, indent=2).replace('"Attention"\n', '"Attention",\n')
    text = text.replace("16\n      }", "16,\n      }")
    assert ",\n" in text
    path = tmp_path / "lycoris_config.json"
    path.write_text(text)
    config = LycorisConfig.from_file(path)
    assert config.factor == 16 and config.full_matrix and config.use_scalar


def test_quantised_base_runs_the_lokr_unmerged(tiny_transformer):
    """Merging into frozen optimum-quanto weights silently does nothing, so sampling keeps the bypass hooks."""
    from trainer_core.quant import quantize_frozen

    reference = _forward(tiny_transformer)
    quantize_frozen(tiny_transformer, "int8-quanto")
    base = _forward(tiny_transformer)
    network = create_lokr_network(tiny_transformer, LycorisConfig.from_dict(QUICKSTART_ATTENTION))
    _randomise(network)
    with lokr_applied(network, 1.0) as mode:
        assert mode == "bypass"
        with_lokr = _forward(tiny_transformer)
    assert not torch.allclose(with_lokr, base, atol=1e-4)
    assert torch.allclose(base, reference, atol=0.1)  # int8 stays close to the float model
