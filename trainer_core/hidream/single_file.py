"""Load a HiDream-I1 transformer from one .safetensors file, as ComfyUI users have them (models/diffusion_models).

Files such as `hidream_i1_full_fp16.safetensors` hold the transformer's weights under the diffusers module paths
(`double_stream_blocks.0.block.attn1.to_q.weight`, ...), sometimes behind a `model.diffusion_model.` or
`diffusion_model.` prefix. The fp8 variants store weights as float8_e4m3fn, in ComfyUI's "scaled fp8" form with a
per-weight `<name>.scale_weight` (and `<name>.scale_input`, plus a `scaled_fp8` marker key): the real weight is
`weight.float() * scale_weight`. They are dequantised here; a quantised base for training comes from
quantize.quantize_frozen afterwards (int8/fp8 through optimum-quanto).

The file has no config. The official HiDream-I1 size (inner width 2560) is recognised from the weights; any other
size needs the diffusers `config.json` of its transformer next to the file (`<file stem>.json` or `config.json`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..config.schema import ConfigError

PREFIXES = ("model.diffusion_model.", "diffusion_model.")
SCALED_FP8_MARKER = "scaled_fp8"
SCALE_SUFFIXES = (".scale_weight", ".scale_input")
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))

# HiDream-I1 Full / Dev / Fast share the transformer shape (HiDream-ai's transformer/config.json).
HIDREAM_I1_CONFIG = {
    "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 16, "num_single_layers": 32,
    "attention_head_dim": 128, "num_attention_heads": 20, "caption_channels": [4096, 4096], "text_emb_dim": 2048,
    "num_routed_experts": 4, "num_activated_experts": 2, "axes_dims_rope": [64, 32, 32],
    "max_resolution": [128, 128], "llama_layers": list(range(32)) + [31] * 16,
}
_MARKER_KEY = "caption_projection.0.linear.weight"  # what ComfyUI's own detection looks for


def read_transformer_file(path: Path) -> dict[str, torch.Tensor]:
    """The file's transformer weights under diffusers key names, fp8 weights dequantised to float32."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"transformer file not found: {path}")
    raw = load_file(str(path))
    prefix = next((p for p in PREFIXES if any(k.startswith(p + _MARKER_KEY) for k in raw)), "")
    if prefix + _MARKER_KEY not in raw:
        raise ConfigError(f"{path.name} is not a HiDream-I1 transformer file (no {_MARKER_KEY}): pick a "
                          "hidream_i1_*.safetensors from models/diffusion_models")
    weights = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
    weights.pop(SCALED_FP8_MARKER, None)
    out = {}
    for name, tensor in weights.items():
        if name.endswith(SCALE_SUFFIXES):
            continue
        if tensor.dtype in FP8_DTYPES:
            scale = weights.get(name.rsplit(".", 1)[0] + ".scale_weight")
            tensor = tensor.float() * (scale.float() if scale is not None else 1.0)
        out[name] = tensor
    return out


def _sidecar_config(path: Path) -> Optional[dict]:
    for candidate in (path.with_suffix(".json"), path.parent / "config.json"):
        if candidate.is_file():
            config = json.loads(candidate.read_text(encoding="utf-8"))
            return {k: v for k, v in config.items() if not k.startswith("_")}
    return None


def transformer_config(weights: dict[str, torch.Tensor], path: Path) -> dict:
    config = _sidecar_config(Path(path))
    if config is not None:
        return config
    inner = weights["x_embedder.proj.weight"].shape[0]
    double = len({k.split(".")[1] for k in weights if k.startswith("double_stream_blocks.")})
    single = len({k.split(".")[1] for k in weights if k.startswith("single_stream_blocks.")})
    if (inner, double, single) == (2560, 16, 32):
        return dict(HIDREAM_I1_CONFIG)
    raise ConfigError(f"{Path(path).name} is a HiDream transformer of a non-standard size (width {inner}, {double} "
                      f"double and {single} single blocks): put its diffusers config.json next to it as "
                      f"{Path(path).with_suffix('.json').name}")


def load_transformer_file(path: Path, dtype: torch.dtype = torch.bfloat16, device="cpu"):
    """A diffusers HiDreamImageTransformer2DModel with the file's weights in `dtype` (fp8 dequantised)."""
    from accelerate import init_empty_weights
    from diffusers import HiDreamImageTransformer2DModel

    weights = read_transformer_file(path)
    config = transformer_config(weights, path)
    with init_empty_weights():
        transformer = HiDreamImageTransformer2DModel.from_config(config)
    expected = set(transformer.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ConfigError(f"{Path(path).name} does not match the HiDream transformer it describes: "
                          f"{len(missing)} weights missing (first {missing[:3]}), {len(unexpected)} unexpected "
                          f"(first {unexpected[:3]})")
    transformer.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, assign=True)
    return transformer.to(device).requires_grad_(False)
