"""A LoKr trained/saved by the core works in native ComfyUI: ComfyUI's own HiDream model, patched through
comfy.sd.load_lora_for_models (what LoraLoaderModelOnly and "Apply HiDream LoKr to MODEL" call), predicts what the
core's diffusers transformer predicts with the same LoKr merged.

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


def native_hidream(comfy, transformer_dir):
    """ComfyUI's HiDream (model_base.HiDream around comfy.ldm.hidream) at the tiny size, with the same weights."""
    from safetensors.torch import load_file

    config = json.loads((transformer_dir / "config.json").read_text())
    unet_config = {k: v for k, v in config.items() if not k.startswith("_") and k != "force_inference_output"}
    unet_config["image_model"] = "hidream"
    model_config = comfy.supported_models.HiDream(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    weights = load_file(str(transformer_dir / "diffusion_pytorch_model.safetensors"))
    missing, unexpected = model.diffusion_model.load_state_dict(weights, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
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
