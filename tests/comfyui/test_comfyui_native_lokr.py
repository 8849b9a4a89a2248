"""A LoKr trained/saved by the core works in native ComfyUI: ComfyUI's own HiDream model, patched through
comfy.sd.load_lora_for_models (what LoraLoaderModelOnly and "Apply HiDream LoKr to MODEL" call), through ComfyUI's
own Load LoRA Model node fed the pack's LORA_MODEL output, or in bypass mode (the weights left as loaded), predicts
what the core's diffusers transformer predicts with the same LoKr merged.

ComfyUI's file loader only recognises the full-size HiDream, so its model classes are built directly at the tiny
model's size and given the same weights (the key names are the diffusers module paths).
"""
from __future__ import annotations

import json
import logging
import sys

import pytest
import torch

from comfy_server import REPO

sys.path.insert(0, str(REPO))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from trainer_core.hidream.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-hidream", seed=0)


def native_hidream(comfy, transformer_dir, weight_dtype=torch.float32):
    """ComfyUI's HiDream (model_base.HiDream around comfy.ldm.hidream) at the tiny size, with the same weights
    (stored as `weight_dtype`; computed in float32)."""
    from safetensors.torch import load_file

    config = json.loads((transformer_dir / "config.json").read_text())
    unet_config = {k: v for k, v in config.items() if not k.startswith("_") and k != "force_inference_output"}
    unet_config["image_model"] = "hidream"
    model_config = comfy.supported_models.HiDream(unet_config)
    model_config.set_inference_dtype(weight_dtype, None if weight_dtype == torch.float32 else torch.float32)
    model = model_config.get_model({})
    weights = load_file(str(transformer_dir / "diffusion_pytorch_model.safetensors"))
    missing, unexpected = model.diffusion_model.load_state_dict(weights, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    model.requires_grad_(False)  # as ComfyUI's loaders leave it
    device = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def random_lokr(transformer, tmp_path, config):
    """A LoKr with every factor random (a trained one would do; random makes every key matter)."""
    from trainer_core.adapters import create_lokr_network, remove_lokr, save_lokr

    network = create_lokr_network(transformer, config, seed=1)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = save_lokr(network, tmp_path / "lokr.safetensors", config)
    remove_lokr(network)
    return path


PRESETS = {
    "feed-forward preset, full matrices": dict(factor=2, apply_preset={
        "name_algo_map": {p: {"factor": 2} for p in (
            "double_stream_blocks.*.block.attn*", "double_stream_blocks.*.block.ff_t*",
            "double_stream_blocks.*.block.ff_i.shared_experts*", "single_stream_blocks.*.block.attn*",
            "single_stream_blocks.*.block.ff_i.shared_experts*")}, "use_fnmatch": True}),
    "attention, low-rank W2 with alpha": dict(factor=4, linear_dim=4, linear_alpha=2.0, full_matrix=False,
                                              apply_preset={"target_module": ["Attention"]}),
}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_native_comfyui_prediction_matches_the_core_with_the_same_lokr(comfy_modules, pack, tiny_dir, tmp_path,
                                                                         caplog, preset):
    import importlib

    from safetensors.torch import load_file
    from trainer_core.adapters import LycorisConfig, load_lokr, lokr_applied, remove_lokr
    from trainer_core.hidream import load_transformer, resolve_model_paths

    comfy = comfy_modules
    transformer = load_transformer(resolve_model_paths(tiny_dir), dtype=torch.float32).eval()
    lokr_path = random_lokr(transformer, tmp_path, LycorisConfig(**PRESETS[preset]))
    patcher = native_hidream(comfy, tiny_dir / "transformer")

    cfg = transformer.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 8, generator=g)
    t = torch.tensor([700.0])
    t5 = torch.randn(1, 128, cfg.caption_channels[0], generator=g)
    llama = torch.randn(max(cfg.llama_layers) + 1, 1, 128, cfg.caption_channels[1], generator=g)  # (L, B, T, D)
    pooled = torch.randn(1, cfg.text_emb_dim, generator=g)

    def native(p):
        p.patch_model()
        try:
            with torch.no_grad():  # ComfyUI's layout: llama (B, L, T, D); its model returns -(raw output)
                return p.model.diffusion_model(x, t, y=pooled, context=t5,
                                               encoder_hidden_states_llama3=llama.movedim(0, 1))
        finally:
            p.unpatch_model()

    def core(strength):
        network = load_lokr(lokr_path, transformer)
        try:
            with lokr_applied(network, strength), torch.no_grad():
                return transformer(hidden_states=x, timesteps=t, encoder_hidden_states_t5=t5,
                                   encoder_hidden_states_llama3=llama, pooled_embeds=pooled, return_dict=False)[0]
        finally:
            remove_lokr(network)

    base_native = native(patcher)
    with torch.no_grad():
        base_core = transformer(hidden_states=x, timesteps=t, encoder_hidden_states_t5=t5,
                                encoder_hidden_states_llama3=llama, pooled_embeds=pooled, return_dict=False)[0]
    torch.testing.assert_close(base_native, -base_core, rtol=1e-4, atol=1e-5)  # same model, sign convention

    # The pack's "Apply HiDream LoKr to MODEL" node, which calls comfy.sd.load_lora_for_models as
    # LoraLoaderModelOnly does.
    nodes = importlib.import_module("hidream_lokr_pack.nodes.sampling")
    types = importlib.import_module("hidream_lokr_pack.nodes.types")
    handle = types.LoKrHandle(path=lokr_path, lycoris=LycorisConfig(**PRESETS[preset]))
    lokr_sd = load_file(str(lokr_path))
    with caplog.at_level(logging.WARNING):
        (patched,) = nodes.ApplyLoKrToModel.execute(patcher, handle, 0.8).result
    assert patched is not patcher and not patcher.patches  # ComfyUI clones; the input MODEL stays unpatched
    assert "lora key not loaded" not in caplog.text
    n_modules = len({k.rsplit(".", 1)[0] for k in lokr_sd})
    assert len(patched.patches) == n_modules  # every LoKr module patched one weight

    with_lokr = native(patched)
    expected = -core(0.8)
    assert (with_lokr - base_native).abs().max() > 1e-3  # the LoKr changes the prediction...
    torch.testing.assert_close(with_lokr, expected, rtol=1e-4, atol=1e-5)  # ...exactly as the core's merge does

    # ComfyUI's own Load LoRA Model node, fed what the pack's LORA_MODEL outputs carry (handle.state_dict()).
    native_loader = importlib.import_module("comfy_extras.nodes_train").LoraModelLoader
    (through_native,) = native_loader.execute(patcher, handle.state_dict(), 0.8).result
    torch.testing.assert_close(native(through_native), expected, rtol=1e-4, atol=1e-5)

    # Bypass mode: the same prediction, and the stored weights never change.
    weight = patcher.model.diffusion_model.double_stream_blocks[0].block.attn1.to_q.weight
    stored = weight.detach().clone()
    (bypassed,) = nodes.ApplyLoKrToModel.execute(patcher, handle, 0.8, mode="bypass").result
    assert not bypassed.patches or hasattr(bypassed, "injections")  # nothing merged (0.3.75: weight wrappers)
    torch.testing.assert_close(native(bypassed), expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(weight, stored)


def test_auto_mode_bypasses_an_8_bit_model_and_skips_the_second_rounding(comfy_modules, pack, tiny_dir, tmp_path):
    """An fp8 MODEL: "auto" picks bypass, which predicts what the fp8 weights (read back as float32) plus the
    exact LoKr delta predict; merging would round the merged weights to fp8 again."""
    import importlib

    from trainer_core.adapters import LycorisConfig
    from trainer_core.hidream import load_transformer, resolve_model_paths

    comfy = comfy_modules
    nodes = importlib.import_module("hidream_lokr_pack.nodes.sampling")
    types = importlib.import_module("hidream_lokr_pack.nodes.types")
    compat = importlib.import_module("hidream_lokr_pack.nodes.compat")
    config = LycorisConfig(**PRESETS["attention, low-rank W2 with alpha"])
    transformer = load_transformer(resolve_model_paths(tiny_dir), dtype=torch.float32).eval()
    handle = types.LoKrHandle(path=random_lokr(transformer, tmp_path, config), lycoris=config)
    fp8 = native_hidream(comfy, tiny_dir / "transformer", torch.float8_e4m3fn)
    as_float = native_hidream(comfy, tiny_dir / "transformer")  # the same fp8 values, stored as float32
    with torch.no_grad():
        for (name, p8), p32 in zip(fp8.model.named_parameters(), as_float.model.parameters()):
            p32.copy_(p8.float())
    assert compat.bypass_reason(fp8) == "torch.float8_e4m3fn weights" and compat.bypass_reason(as_float) is None

    g = torch.Generator().manual_seed(3)
    cfg = transformer.config
    x, t = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([500.0])
    context = torch.randn(1, 128, cfg.caption_channels[0], generator=g)
    llama = torch.randn(1, max(cfg.llama_layers) + 1, 128, cfg.caption_channels[1], generator=g)
    pooled = torch.randn(1, cfg.text_emb_dim, generator=g)

    def predict(p):
        p.patch_model()
        try:
            with torch.no_grad():
                return p.model.diffusion_model(x, t, y=pooled, context=context, encoder_hidden_states_llama3=llama)
        finally:
            p.unpatch_model()

    (auto,) = nodes.ApplyLoKrToModel.execute(fp8, handle, 1.0).result  # mode "auto"
    (exact,) = nodes.ApplyLoKrToModel.execute(as_float, handle, 1.0, mode="merge").result
    (rounded,) = nodes.ApplyLoKrToModel.execute(fp8, handle, 1.0, mode="merge").result
    assert not auto.patches  # bypassed: nothing merged into the fp8 weights
    expected = predict(exact)
    torch.testing.assert_close(predict(auto), expected, rtol=1e-4, atol=1e-5)
    assert (predict(rounded) - expected).abs().max() > 10 * (predict(auto) - expected).abs().max()
