"""HiDream-I1's models at their real sizes, as the loaders would hand them over, made without reading a weight.

A dry run needs the models in the state the project's loaders leave them in: a diffusers folder read into CPU
memory (`from_pretrained` then the loader's `.to(...)`), a ComfyUI single file read one tensor at a time, the text
encoders and the VAE. Here each is built on `meta` from its config and, where the loader reads into CPU memory,
turned into host stand-ins (dry_run.py: real CPU tensors that are never written). A model folder that exists gives
its own configs and tokenizers; otherwise the published configs below stand in (HiDream-I1 Full, Dev and Fast
share the transformer; the text encoders are CLIP-L/14 and CLIP-G/14 as HiDream retrained them, T5 v1.1 XXL's
encoder and Llama-3.1-8B-Instruct without its LM head), and the embedded tiny model's tokenizers produce the token
ids (only their count, 128 per caption, matters for memory).
"""
from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..hidream.single_file import HIDREAM_I1_CONFIG
from ..hidream.vae import FLUX_VAE_SCALING_FACTOR, FLUX_VAE_SHIFT_FACTOR

# Published architecture configs (transformers' config keys). Sources: HiDream-ai/HiDream-I1-Full's
# text_encoder{,_2,_3}/config.json and meta-llama/Llama-3.1-8B-Instruct's config.json; the parameter counts they
# give (CLIP-L 0.12 B, CLIP-G 0.69 B, T5 encoder 4.76 B, Llama without its head 7.50 B) are HIDREAM.md's.
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=248, hidden_act="quick_gelu")
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=248, hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
              tie_word_embeddings=False)
LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
                   rope_theta=500000.0, tie_word_embeddings=False)
# The Flux VAE (HiDream-I1's vae/config.json): 16 latent channels, 8x down, no quant convs.
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=FLUX_VAE_SCALING_FACTOR,
                shift_factor=FLUX_VAE_SHIFT_FACTOR, use_quant_conv=False, use_post_quant_conv=False)


def on_meta(build) -> nn.Module:
    """A module built by `build()` with every tensor on `meta`: a description of its shapes, not counted by a
    dry run (meta stands for the GPU there; building is not loading)."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes(), torch.device("meta"), _no_initialisation():
        return build()


@contextlib.contextmanager
def _no_initialisation():
    """torch.nn.init's in-place initialisers as no-ops (on meta they compute nothing, slowly: their meta kernels
    are Python), as transformers' no_init_weights does for the same reason."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def as_read_into_host(module: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """`module` (built on meta) as a loader leaves it in CPU memory: host stand-ins, floating tensors in `dtype`
    (from_pretrained(..., dtype) reads them in it: no float32 copy on the way)."""
    if dtype is not None:
        module = on_meta(lambda: module.to(dtype))
    return module.to_empty(device="cpu")


def folder_config(folder: Optional[Path]) -> Optional[dict]:
    """A component's config.json, when the folder exists (its own sizes beat the published ones)."""
    if folder is None or not (Path(folder) / "config.json").is_file():
        return None
    return {k: v for k, v in json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).items()
            if not k.startswith("_")}


def transformer_on_meta(config: Optional[dict] = None, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """HiDream-I1's transformer (its own config, or the published one), every weight on meta in `dtype`."""
    from diffusers import HiDreamImageTransformer2DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = on_meta(lambda: HiDreamImageTransformer2DModel(**(config or HIDREAM_I1_CONFIG)))
    finally:
        torch.set_default_dtype(previous)
    return model.requires_grad_(False)


def vae_on_meta(config: Optional[dict] = None) -> nn.Module:
    from diffusers import AutoencoderKL

    return on_meta(lambda: AutoencoderKL(**(config or FLUX_VAE))).eval().requires_grad_(False)


def text_encoders_on_meta(configs: Optional[dict] = None) -> list[nn.Module]:
    """CLIP-L, CLIP-G, T5-XXL's encoder and the Llama (without its LM head), on meta, in the order
    HiDreamTextEncoders keeps them. `configs` maps "text_encoder", ... "text_encoder_4" to a folder's config."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, LlamaConfig, T5Config, T5EncoderModel

    from ..hidream.models import LlamaHiddenStates

    configs = configs or {}
    pick = lambda name, default: {**default, **configs[name]} if configs.get(name) else default  # noqa: E731
    return [on_meta(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**pick("text_encoder", CLIP_L)))),
            on_meta(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**pick("text_encoder_2", CLIP_G)))),
            on_meta(lambda: T5EncoderModel(T5Config(**pick("text_encoder_3", T5_XXL)))),
            on_meta(lambda: LlamaHiddenStates(LlamaConfig(**pick("text_encoder_4", LLAMA_31_8B))))]


_TOKENIZERS: dict = {}


def tokenizer_folder() -> Path:
    """A folder with the four HiDream tokenizers for plans without a model folder: the embedded tiny model's
    (trained in about a second; a caption still becomes 128 token ids per encoder, all that memory depends on)."""
    if "dir" not in _TOKENIZERS:
        from ..hidream.tiny import build_tiny_model

        _TOKENIZERS["tmp"] = tempfile.TemporaryDirectory(prefix="hidream-plan-")
        _TOKENIZERS["dir"] = build_tiny_model(Path(_TOKENIZERS["tmp"].name) / "tiny")
    return _TOKENIZERS["dir"]


class StandInSafetensors:
    """What `safetensors.safe_open` gives for a HiDream-I1 transformer file, without the file: ComfyUI's
    `hidream_i1_full_fp8.safetensors` layout (every Linear weight float8_e4m3fn, everything else in `dtype`), or a
    16-bit file (`fp8=False`). `get_tensor` returns host stand-ins of the stored shape and dtype."""

    def __init__(self, fp8: bool = True, dtype: torch.dtype = torch.bfloat16, config: Optional[dict] = None):
        model = transformer_on_meta(config, dtype)
        linears = {name for name, m in model.named_modules() if type(m) is nn.Linear}
        self.tensors = {name: (tuple(t.shape), torch.float8_e4m3fn if fp8 and name.rsplit(".", 1)[0] in linears and
                               name.endswith(".weight") else dtype)
                        for name, t in model.state_dict().items()}

    def __call__(self, path, framework: str = "pt", device: str = "cpu") -> "StandInSafetensors":
        return self

    def __enter__(self) -> "StandInSafetensors":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def keys(self) -> list[str]:
        return list(self.tensors)

    def metadata(self) -> dict:
        return {}

    def get_slice(self, name: str):
        shape = self.tensors[name][0]
        return type("Slice", (), {"get_shape": lambda _self: list(shape)})()

    def get_tensor(self, name: str) -> torch.Tensor:
        shape, dtype = self.tensors[name]
        return torch.empty(shape, dtype=dtype)  # a stand-in inside a dry run (host memory, never written)
