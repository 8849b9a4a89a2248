"""A scaled-fp8 transformer file written by ComfyUI itself (its scaled_fp8 ops quantise the weights, its
state_dict_for_saving and save_torch_file write them) is read by "Load HiDream transformer (ComfyUI file)" straight
into fp8-scaled layers holding ComfyUI's bytes, predicts what ComfyUI's own fp8 model predicts, and samples through
the pack's sampler with a LoKr applied unmerged.

ComfyUI's file loader only recognises the full-size HiDream, so its model classes are built directly at the tiny
model's size (as in test_comfyui_native_lokr.py).
"""
from __future__ import annotations

import importlib
import json
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch

from comfy_server import REPO

sys.path.insert(0, str(REPO))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from trainer_core.hidream.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-hidream", seed=0)


def comfyui_scaled_fp8_model(comfy, transformer_dir):
    """ComfyUI's HiDream at the tiny size built with its scaled fp8 operations, every Linear quantised by ComfyUI's
    own set_weight (weight / scale_weight, stochastically rounded to e4m3fn) with a per-tensor scale."""
    from safetensors.torch import load_file

    config = json.loads((transformer_dir / "config.json").read_text())
    unet_config = {k: v for k, v in config.items() if not k.startswith("_") and k != "force_inference_output"}
    unet_config["image_model"] = "hidream"
    model_config = comfy.supported_models.HiDream(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model_config.scaled_fp8 = torch.float8_e4m3fn  # what a file's `scaled_fp8` marker sets (model_detection.py)
    model = model_config.get_model({})
    weights = load_file(str(transformer_dir / "diffusion_pytorch_model.safetensors"))
    linears = {n: m for n, m in model.diffusion_model.named_modules() if hasattr(m, "scale_weight")}
    assert linears
    with torch.no_grad():
        for name, layer in linears.items():
            weight = weights.pop(f"{name}.weight")
            layer.scale_weight.copy_(weight.abs().max() / 448.0)
            layer.set_weight(weight, seed=0)
        missing, unexpected = model.diffusion_model.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.endswith((".weight", ".scale_weight", ".scale_input")) for k in missing)
    return model


def test_comfyui_written_fp8_file_loads_into_fp8_scaled_and_samples(comfy_modules, pack, tiny_dir, tmp_path):
    import comfy.utils
    import folder_paths
    from trainer_core.adapters import LycorisConfig, create_lokr_network, remove_lokr, save_lokr
    from trainer_core.hidream import load_text_encoders, load_vae, resolve_model_paths

    comfy = comfy_modules
    native = comfyui_scaled_fp8_model(comfy, tiny_dir / "transformer")
    folder = tmp_path / "diffusion_models"
    folder.mkdir()
    path = folder / "hidream_tiny_fp8_scaled.safetensors"
    saved = native.state_dict_for_saving()
    assert saved["model.diffusion_model.scaled_fp8"].dtype == torch.float8_e4m3fn  # the marker ComfyUI writes
    assert saved["model.diffusion_model.double_stream_blocks.0.block.attn1.to_q.weight"].dtype == torch.float8_e4m3fn
    assert saved["model.diffusion_model.double_stream_blocks.0.block.attn1.to_q.scale_weight"].numel() == 1
    comfy.utils.save_torch_file(saved, str(path))
    shutil.copy(tiny_dir / "transformer" / "config.json", path.with_suffix(".json"))  # a non-standard size
    folder_paths.add_model_folder_path("diffusion_models", str(folder))

    loaders = importlib.import_module("hidream_lokr_pack.nodes.loaders")
    # the pack's own copy of trainer_core (ComfyUI imports the pack as a package of its own)
    ScaledFp8Linear = importlib.import_module("hidream_lokr_pack.trainer_core.quant").ScaledFp8Linear
    (model,) = loaders.LoadHiDreamTransformerFile.execute(path.name, "default").result
    transformer = model.transformer
    assert "fp8-scaled" in model.name
    scaled = {n: m for n, m in transformer.named_modules() if isinstance(m, ScaledFp8Linear)}
    assert len(scaled) > 100
    native_layers = dict(native.diffusion_model.named_modules())
    for name, layer in scaled.items():  # ComfyUI's bytes and scale, as written
        assert torch.equal(layer.weight.view(torch.uint8), native_layers[name].weight.view(torch.uint8)), name
        assert torch.all(layer.weight_scale == native_layers[name].scale_weight.float()), name

    cfg = transformer.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 8, generator=g)
    t = torch.tensor([700.0])
    t5 = torch.randn(1, 128, cfg.caption_channels[0], generator=g)
    llama = torch.randn(max(cfg.llama_layers) + 1, 1, 128, cfg.caption_channels[1], generator=g)
    pooled = torch.randn(1, cfg.text_emb_dim, generator=g)
    with torch.no_grad():
        theirs = native.diffusion_model(x, t, y=pooled, context=t5, encoder_hidden_states_llama3=llama.movedim(0, 1))
        ours = transformer.eval()(hidden_states=x, timesteps=t, encoder_hidden_states_t5=t5,
                                  encoder_hidden_states_llama3=llama, pooled_embeds=pooled, return_dict=False)[0]
    cosine = torch.nn.functional.cosine_similarity(ours.flatten(), -theirs.flatten(), dim=0).item()
    # Read dequantised (no_change), the file gives ComfyUI's own model's values: weights times scale_weight, its fp8
    # biases as stored (unscaled). ComfyUI's model returns -(raw output).
    dequantised = loaders.LoadHiDreamTransformerFile.execute(path.name, "fp32").result[0].transformer.eval()
    with torch.no_grad():
        plain = dequantised(hidden_states=x, timesteps=t, encoder_hidden_states_t5=t5,
                            encoder_hidden_states_llama3=llama, pooled_embeds=pooled, return_dict=False)[0]
    torch.testing.assert_close(plain, -theirs, rtol=1e-4, atol=1e-5)
    assert cosine >= 0.995, cosine  # ComfyUI dequantises the weights; ours also quantises the activations

    # The pack's sampler on that model, with a LoKr (unmerged: the base is fp8) and the tiny model's encoders.
    paths = resolve_model_paths(tiny_dir)
    network = create_lokr_network(transformer, LycorisConfig(factor=4), seed=1)
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.05)
    lokr_path = save_lokr(network, tmp_path / "lokr.safetensors", LycorisConfig(factor=4))
    remove_lokr(network)
    types = importlib.import_module("hidream_lokr_pack.nodes.types")
    vae = load_vae(paths)
    model = types.HiDreamModel(transformer=transformer, name=model.name, text_encoder=load_text_encoders(paths),
                               decode_latents=lambda latents: __import__("trainer_core.hidream", fromlist=["x"])
                               .latents_to_images(vae, latents))
    sampling = importlib.import_module("hidream_lokr_pack.nodes.sampling")
    sampling.HiDreamLoKrSampler.hidden = SimpleNamespace(unique_id="fp8-test")  # what ComfyUI's executor sets
    args = dict(hidream_model=model, strength=1.0, positive="a red circle", negative="", width=64, height=64,
                steps=2, cfg=1.0, shift=3.0, seed=0, scheduler="euler")
    with_lokr = sampling.HiDreamLoKrSampler.execute(lokr=types.LoKrHandle(path=lokr_path,
                                                                          lycoris=LycorisConfig(factor=4)),
                                                    **args).result[0]["samples"]
    without = sampling.HiDreamLoKrSampler.execute(**args).result[0]["samples"]
    assert torch.isfinite(with_lokr).all() and not torch.equal(with_lokr, without)
    assert not any(hasattr(m, "_lycoris_wrappers") and m._lycoris_wrappers for m in transformer.modules())
