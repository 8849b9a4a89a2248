"""Transformer weights from one ComfyUI-style .safetensors file (prefixed keys, fp16 or scaled fp8)."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from trainer_core.config import ConfigError
from trainer_core.hidream import load_transformer_file, read_transformer_file


def _state(transformer) -> dict:
    return {k: v.detach().clone() for k, v in transformer.state_dict().items()}


def _with_config(tiny_model_dir, path):
    shutil.copy(tiny_model_dir / "transformer" / "config.json", path.with_suffix(".json"))
    return path


def test_fp16_file_with_comfyui_prefix_loads_the_same_transformer(tiny_model_dir, tiny_transformer, tmp_path):
    path = _with_config(tiny_model_dir, tmp_path / "hidream_tiny_fp16.safetensors")
    save_file({f"model.diffusion_model.{k}": v.half() for k, v in _state(tiny_transformer).items()}, str(path))
    loaded = load_transformer_file(path, dtype=torch.float32)
    for name, value in tiny_transformer.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value.half().float()), name
    assert loaded.config.llama_layers == tiny_transformer.config.llama_layers


def test_scaled_fp8_weights_are_dequantised_with_their_scale(tiny_model_dir, tiny_transformer, tmp_path):
    path = _with_config(tiny_model_dir, tmp_path / "hidream_tiny_fp8_scaled.safetensors")
    tensors = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for name, value in _state(tiny_transformer).items():
        if value.ndim == 2:  # ComfyUI's scaled fp8: weight / scale stored as fp8, the scale beside it
            value = value * 50.0  # large values: without the scale the dequantised weight would be 50x too big
            scale = value.abs().max() / 448.0
            tensors[name] = (value / scale).to(torch.float8_e4m3fn)
            tensors[name.rsplit(".", 1)[0] + ".scale_weight"] = scale.reshape(1)
            tensors[name.rsplit(".", 1)[0] + ".scale_input"] = torch.ones(1)
        else:
            tensors[name] = value
    save_file(tensors, str(path))
    weights = read_transformer_file(path)
    for name, value in _state(tiny_transformer).items():
        expected = value * 50.0 if value.ndim == 2 else value
        torch.testing.assert_close(weights[name], expected, rtol=0.07, atol=1e-3 * expected.abs().max().item())


def test_non_standard_size_without_config_is_a_clear_error(tiny_transformer, tmp_path):
    path = tmp_path / "mystery.safetensors"
    save_file(_state(tiny_transformer), str(path))
    with pytest.raises(ConfigError, match="mystery.json"):
        load_transformer_file(path)


def test_a_file_that_is_not_hidream_is_rejected(tmp_path):
    path = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(ConfigError, match="not a HiDream-I1 transformer file"):
        load_transformer_file(path)
