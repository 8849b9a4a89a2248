"""Load a HiDream-I1 transformer from one .safetensors file, as ComfyUI users have them (models/diffusion_models).

Files such as `hidream_i1_full_fp16.safetensors` hold the transformer's weights under the diffusers module paths
(`double_stream_blocks.0.block.attn1.to_q.weight`, ...), sometimes behind a `model.diffusion_model.` or
`diffusion_model.` prefix. The fp8 variants (`hidream_i1_full_fp8.safetensors`, ComfyUI's own HiDream template)
store weights as float8_e4m3fn, either plain (the values are the weights) or in ComfyUI's "scaled fp8" form:

    <layer>.weight        float8_e4m3fn (N, K)    the real weight is weight.float() * scale_weight
    <layer>.scale_weight  float32, one value      (shape () or (1,); ComfyUI 0.3.75's comfy/ops.py)
    <layer>.scale_input   float32, one value      a static activation scale (optional; not used here)
    <layer>.bias          float8_e4m3fn, unscaled  (ComfyUI creates the whole Linear in fp8; it casts the bias as is)
    scaled_fp8            an empty tensor whose dtype names the fp8 format (the marker ComfyUI looks for)

or its newer per-layer form (`_quantization_metadata` in the file's metadata, `<layer>.weight_scale` /
`<layer>.input_scale`). `load_transformer_file(..., precision="fp8-scaled")` keeps such weights as they are stored,
in quant/scaled.py's ScaledFp8Linear with the file's per-tensor scale, reading the file one tensor at a time: no
16-bit copy of the model is ever made. Other precisions dequantise each weight (times its scale) on the way in;
the quanto ones are applied by quant.quantize_frozen afterwards.

The file has no config. The official HiDream-I1 size (inner width 2560) is recognised from the weights' shapes; any
other size needs the diffusers `config.json` of its transformer next to the file (`<file stem>.json` or
`config.json`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ..config.schema import SCALED_PRECISIONS, ConfigError
from ..quant.scaled import (FP8_DTYPE, SCALED_LINEAR_CLASSES, can_quantize, quantize_weight, replace_module)
from ..util.device import meta_placeholders

logger = logging.getLogger(__name__)

PREFIXES = ("model.diffusion_model.", "diffusion_model.")
SCALED_FP8_MARKER = "scaled_fp8"
SCALE_SUFFIXES = (".scale_weight", ".scale_input", ".weight_scale", ".input_scale")
WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # ComfyUI's scaled fp8 / its per-layer format
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
        if tensor.dtype in FP8_DTYPES:  # the scale is the weight's; ComfyUI's fp8 biases are stored unscaled
            layer = name.rsplit(".", 1)[0]
            scale = next((weights[layer + s] for s in WEIGHT_SCALE_SUFFIXES if layer + s in weights),
                         None) if name.endswith(".weight") else None
            tensor = _dequantize(tensor, scale.float() if scale is not None else None)
        out[name] = tensor
    return out


def _sidecar_config(path: Path) -> Optional[dict]:
    for candidate in (path.with_suffix(".json"), path.parent / "config.json"):
        if candidate.is_file():
            config = json.loads(candidate.read_text(encoding="utf-8"))
            return {k: v for k, v in config.items() if not k.startswith("_")}
    return None


def _shape(value: Any) -> tuple:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def transformer_config(weights: Mapping[str, Any], path: Path) -> dict:
    """The diffusers config of the transformer in `path`, from its sidecar JSON or recognised from `weights` (name
    -> tensor, or name -> shape)."""
    config = _sidecar_config(Path(path))
    if config is not None:
        return config
    inner = _shape(weights["x_embedder.proj.weight"])[0]
    double = len({k.split(".")[1] for k in weights if k.startswith("double_stream_blocks.")})
    single = len({k.split(".")[1] for k in weights if k.startswith("single_stream_blocks.")})
    if (inner, double, single) == (2560, 16, 32):
        return dict(HIDREAM_I1_CONFIG)
    raise ConfigError(f"{Path(path).name} is a HiDream transformer of a non-standard size (width {inner}, {double} "
                      f"double and {single} single blocks): put its diffusers config.json next to it as "
                      f"{Path(path).with_suffix('.json').name}")


def transformer_file_config(path: Path) -> dict:
    """The diffusers config of the transformer file `path`, from its header alone (no weight is read)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"transformer file not found: {path}")
    with safe_open(str(path), framework="pt", device="cpu") as file:
        shapes = {name: file.get_slice(key).get_shape() for name, key in _weight_names(file, path).items()}
    return transformer_config(shapes, path)


def _weight_names(file, path: Path) -> dict[str, str]:
    """diffusers name -> the file's key, for every weight of an open safetensors transformer file."""
    keys = list(file.keys())
    prefix = next((p for p in PREFIXES if p + _MARKER_KEY in keys), "")
    if prefix + _MARKER_KEY not in keys:
        raise ConfigError(f"{path.name} is not a HiDream-I1 transformer file (no {_MARKER_KEY}): pick a "
                          "hidream_i1_*.safetensors from models/diffusion_models")
    return {k[len(prefix):]: k for k in keys if k.startswith(prefix) and k != prefix + SCALED_FP8_MARKER}


def load_transformer_file(path: Path, dtype: torch.dtype = torch.bfloat16, device="cpu",
                          precision: str = "no_change", opener=None):
    """A diffusers HiDreamImageTransformer2DModel with the file's weights, read one tensor at a time.

    `dtype` is the compute dtype (biases, norms, the layers kept in it). `precision` says what the Linear weights
    become: "no_change" / "bf16" / "fp32" / a quanto one: float in `dtype` (fp8 weights times their scale; the
    caller quantises for quanto); "fp8-scaled": 8-bit layers, the file's e4m3fn weights stored as they are with
    their per-tensor scale (other weights quantised per output channel); "int8-scaled": int8 per output channel.
    `opener` stands in for safetensors' `safe_open` (a memory plan reads a file of stand-in tensors, plan/).
    """
    from accelerate import init_empty_weights
    from diffusers import HiDreamImageTransformer2DModel
    from safetensors import safe_open

    path = Path(path)
    if opener is None and not path.is_file():
        raise ConfigError(f"transformer file not found: {path}")
    with (opener or safe_open)(str(path), framework="pt", device="cpu") as file:
        names = _weight_names(file, path)
        shapes = {name: file.get_slice(key).get_shape() for name, key in names.items()}
        config = transformer_config(shapes, path)
        with init_empty_weights(), meta_placeholders():  # the skeleton the file's tensors are put into
            transformer = HiDreamImageTransformer2DModel.from_config(config)
        _check_names(transformer, names, path)
        reader = _FileReader(file, names, dtype)
        layers = {name: m for name, m in transformer.named_modules() if type(m) is nn.Linear}
        consumed: set[str] = set()
        stored = {"fp8": 0, "quantised": 0, "float": 0}
        for name, linear in layers.items():
            if precision not in SCALED_PRECISIONS or not can_quantize(name, linear):
                continue
            weight = reader.raw(name + ".weight")
            scale = reader.weight_scale(name)
            bias = reader.raw(name + ".bias").to(dtype) if linear.bias is not None else None
            cls = SCALED_LINEAR_CLASSES[precision]
            if precision == "fp8-scaled" and weight.dtype == FP8_DTYPE:
                layer = cls.from_quantized(weight, scale if scale is not None else torch.ones(()), bias, dtype)
                stored["fp8"] += 1
            else:  # a 16-bit (or e5m2) weight, or int8-scaled: quantised per output channel, this layer alone
                q, channel_scale = quantize_weight(_dequantize(weight, scale), cls.fmt)
                layer = cls.from_quantized(q, channel_scale, bias, dtype)
                stored["quantised"] += 1
            replace_module(transformer, name, layer)
            consumed.update({name + ".weight", name + ".bias"})
        state = {name: reader.real(name) for name in names
                 if name not in consumed and not name.endswith(SCALE_SUFFIXES)}
    stored["float"] = sum(1 for name in state if name.rsplit(".", 1)[0] in layers and name.endswith(".weight"))
    result = transformer.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise ConfigError(f"{path.name}: weights the transformer has no place for: {result.unexpected_keys[:3]}")
    left = [n for n, t in [*transformer.named_parameters(), *transformer.named_buffers()] if t.is_meta]
    if left:
        raise ConfigError(f"{path.name} lacks {len(left)} weights of the transformer it describes (first {left[:3]})")
    if precision in SCALED_PRECISIONS:
        logger.info("%s as %s: %d Linear layers kept in the file's fp8, %d quantised here, %d in %s", path.name,
                    precision, stored["fp8"], stored["quantised"], stored["float"], dtype)
    return transformer.to(device).requires_grad_(False)


def stored_weight_dtype(path: Path) -> torch.dtype:
    """The dtype a transformer file stores its attention weights in (float8_e4m3fn for ComfyUI's fp8 files)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as file:
        keys = list(file.keys())
        probe = next((k for k in keys if k.endswith("attn1.to_q.weight")), None)
        if probe is None:
            raise ConfigError(f"{Path(path).name} is not a HiDream-I1 transformer file (no attention weights)")
        return file.get_tensor(probe).dtype  # one attention weight (6.5 MB in fp8 at full size)


def _check_names(transformer: nn.Module, names: Mapping[str, str], path: Path) -> None:
    expected = set(transformer.state_dict())
    given = {n for n in names if not n.endswith(SCALE_SUFFIXES)}
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise ConfigError(f"{Path(path).name} does not match the HiDream transformer it describes: "
                          f"{len(missing)} weights missing (first {missing[:3]}), {len(unexpected)} unexpected "
                          f"(first {unexpected[:3]})")


class _FileReader:
    """Tensors of an open safetensors file by their diffusers name: `raw` as stored, `real` as float in the compute
    dtype (fp8 times its scale), `weight_scale` a layer's per-tensor scale (None when the file has none)."""

    def __init__(self, file, names: Mapping[str, str], dtype: torch.dtype):
        self.file, self.names, self.dtype = file, names, dtype

    def raw(self, name: str) -> torch.Tensor:
        return self.file.get_tensor(self.names[name])

    def weight_scale(self, layer: str) -> Optional[torch.Tensor]:
        for suffix in WEIGHT_SCALE_SUFFIXES:
            if layer + suffix in self.names:
                return self.raw(layer + suffix).float()
        return None

    def real(self, name: str) -> torch.Tensor:
        tensor = self.raw(name)
        if tensor.dtype in FP8_DTYPES:  # a weight carries its layer's scale; a bias (fp8 too in ComfyUI's files) not
            scale = self.weight_scale(name.rsplit(".", 1)[0]) if name.endswith(".weight") else None
            return _dequantize(tensor, scale).to(self.dtype)
        return tensor.to(self.dtype) if tensor.dtype.is_floating_point else tensor


def _dequantize(weight: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """One stored weight as float32: times its scale (one value, or one per output row) when it has one."""
    weight = weight.float()
    if scale is None:
        return weight
    return weight * (scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, *[1] * (weight.dim() - 1)))
