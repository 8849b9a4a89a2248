"""Loader nodes: a HiDream-I1 diffusers folder -> HIDREAM_MODEL."""
from __future__ import annotations

import logging

import torch
import folder_paths

from ..trainer_core.util import quiet_libraries
from .compat import io
from .paths import TINY_MODEL_NAME, diffusers_folder
from .types import CATEGORY, HiDreamModel, HiDreamModelType

# trainer_core's loaders import diffusers, transformers and LyCORIS: they are imported inside execute(), when a
# node first needs them, not while ComfyUI starts.

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TRANSFORMER_PRECISIONS = ["bf16", "fp32", "fp8-scaled", "int8-scaled", "int8-quanto", "int4-quanto", "fp8-quanto"]
# "default" for a ComfyUI file: an fp8 file stays in 8 bits (fp8-scaled, or int8-scaled below sm89), a 16-bit one bf16.
FILE_PRECISIONS = ["default", *TRANSFORMER_PRECISIONS]
TEXT_ENCODER_QUANTIZATION = ["none", "int8-quanto", "int4-quanto"]


def comfy_device() -> torch.device:
    import comfy.model_management

    return comfy.model_management.get_torch_device()


def _base_dtype(precision: str) -> torch.dtype:
    """The compute dtype: quanto precisions quantise a bf16 copy, scaled ones compute in bf16 around their 8-bit
    matmuls (fp32 on a CPU for both, where bf16 matmuls are slow and gain nothing)."""
    if precision in DTYPES:
        return DTYPES[precision]
    return torch.float32 if comfy_device().type == "cpu" else torch.bfloat16


class LoadHiDreamDiffusers(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HiDreamLoKrLoadDiffusers",
            display_name="Load HiDream (diffusers folder)",
            category=f"{CATEGORY}/loaders",
            description="Loads a HiDream-I1 model saved in the diffusers layout (model_index.json, transformer/, "
                        "vae/, text_encoder*/, tokenizer*/) with its four text encoders and VAE, for training and "
                        f"for the LoKr sampler. '{TINY_MODEL_NAME}' builds the embedded tiny model (it runs "
                        "on a CPU) to try the pack.",
            inputs=[
                io.String.Input("model_folder", display_name="model folder", default=TINY_MODEL_NAME,
                                tooltip="model_folder: the HiDream-I1 diffusers folder, an absolute path or a "
                                        f"folder name under models/diffusers. '{TINY_MODEL_NAME}' builds the "
                                        "embedded tiny model there on first use."),
                io.String.Input("llama_folder", display_name="Llama folder", default="",
                                tooltip="llama_folder: an optional separate Llama-3.1-8B-Instruct folder (model + "
                                        "tokenizer). Leave empty when the model folder has text_encoder_4/ and "
                                        "tokenizer_4/."),
                io.Combo.Input("transformer_precision", display_name="transformer", options=TRANSFORMER_PRECISIONS,
                               default="bf16",
                               tooltip="transformer_precision: weights of the frozen transformer. bf16/fp32; "
                                       "fp8-scaled / int8-scaled (8-bit weights and 8-bit matmuls: half the memory "
                                       "of bf16 and faster; fp8 needs an RTX 40xx / H100-class GPU, int8 runs on "
                                       "RTX 30xx / A100); or optimum-quanto (half the memory, no speed-up). The "
                                       "LoKr still trains in float32."),
                io.Combo.Input("text_encoder_precision", display_name="text encoders", options=["bf16", "fp32"],
                               default="bf16",
                               tooltip="text_encoder_precision: dtype of the four text encoders (they only run to "
                                       "fill the text cache)."),
                io.Combo.Input("t5_quantization", display_name="T5 quant", options=TEXT_ENCODER_QUANTIZATION,
                               default="none",
                               tooltip="t5_quantization: quantise the T5-XXL encoder (about 10 GB in bf16) with "
                                       "optimum-quanto."),
                io.Combo.Input("llama_quantization", display_name="Llama quant", options=TEXT_ENCODER_QUANTIZATION,
                               default="none",
                               tooltip="llama_quantization: quantise the Llama-3.1-8B encoder (about 16 GB in "
                                       "bf16) with optimum-quanto."),
            ],
            outputs=[HiDreamModelType.Output(display_name="hidream_model",
                                             tooltip="Transformer, text encoders and VAE for the HiDream LoKr nodes")],
        )

    @classmethod
    def execute(cls, model_folder: str, llama_folder: str, transformer_precision: str, text_encoder_precision: str,
                t5_quantization: str, llama_quantization: str) -> io.NodeOutput:
        # ComfyUI runs nodes under torch.inference_mode(); weights created there are inference tensors, which
        # autograd can never save for a backward pass, so training on them would fail. Load them as normal tensors.
        with torch.inference_mode(False), quiet_libraries():
            return io.NodeOutput(load_diffusers_model(model_folder, llama_folder, transformer_precision,
                                                      text_encoder_precision, t5_quantization, llama_quantization))


def load_diffusers_model(model_folder: str, llama_folder: str, transformer_precision: str,
                         text_encoder_precision: str, t5_quantization: str, llama_quantization: str) -> HiDreamModel:
    from ..trainer_core.data import VaeImageEncoder
    from ..trainer_core.hidream import (PREVIEW_DECODE_TILE, component_identity, latents_to_images,
                                        load_frozen_transformer, load_text_encoders, load_vae, resolve_model_paths,
                                        scheduler_shift)
    from ..trainer_core.quant import quantize_frozen

    model_dir = diffusers_folder(model_folder)
    llama_dir = diffusers_folder(llama_folder) if llama_folder.strip() else None
    paths = resolve_model_paths(model_dir, llama_dir)
    device = comfy_device()
    transformer = load_frozen_transformer(
        paths, transformer_precision if transformer_precision not in DTYPES else "no_change",
        _base_dtype(transformer_precision), device)

    text_encoders = load_text_encoders(paths, dtype=DTYPES[text_encoder_precision], device=device)
    encoders = text_encoders._live_pipeline()
    for module, precision in ((encoders.text_encoder_3, t5_quantization),
                              (encoders.text_encoder_4, llama_quantization)):
        if precision != "none":
            quantize_frozen(module, precision)
    # Embeddings cached with quantised encoders must never be mistaken for full-precision ones.
    text_encoders.identity = f"{text_encoders.identity}|t5={t5_quantization}|llama={llama_quantization}"

    vae = load_vae(paths, dtype=torch.float32, device=device)
    model = HiDreamModel(
        transformer=transformer, name=f"{model_dir.name} ({transformer_precision})",
        text_encoder=text_encoders,
        image_encoder=VaeImageEncoder(vae, component_identity(paths.model_dir / "vae")),
        decode_latents=lambda latents: latents_to_images(vae, latents, tile=PREVIEW_DECODE_TILE),
        source=str(model_dir), sampling_shift=scheduler_shift(model_dir))
    return model


class LoadHiDreamTransformerFile(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HiDreamLoKrLoadTransformerFile",
            display_name="Load HiDream transformer (ComfyUI file)",
            category=f"{CATEGORY}/loaders",
            description="Loads a HiDream-I1 transformer file from models/diffusion_models (e.g. "
                        "hidream_i1_full_fp8.safetensors, as ComfyUI's HiDream template uses, or the fp16 file) for "
                        "training and the LoKr sampler; fp8 weights are dequantised on load. Text "
                        "and images are then encoded by ComfyUI's own CLIP (QuadrupleCLIPLoader) and VAE "
                        "(VAELoader, ae.safetensors): connect them to the cache nodes.",
            inputs=[
                io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="The HiDream-I1 transformer file (Full, Dev or Fast; fp16 or fp8)."),
                io.Combo.Input("precision", options=FILE_PRECISIONS, default="default",
                               tooltip="Weights in memory. default: an fp8 file stays fp8 (fp8-scaled: its "
                                       "weights feed fp8 matmuls as stored, ~16 GB for HiDream-I1; int8-scaled on "
                                       "GPUs without fp8 tensor cores), a 16-bit file loads as bf16. bf16/fp32 "
                                       "dequantise an fp8 file; the quanto choices re-quantise it."),
            ],
            outputs=[HiDreamModelType.Output(display_name="hidream_model",
                                             tooltip="The transformer (encoders come from ComfyUI's CLIP and VAE)")],
        )

    @classmethod
    def execute(cls, unet_name: str, precision: str) -> io.NodeOutput:
        from ..trainer_core.hidream import default_file_precision, load_frozen_transformer

        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        device = comfy_device()
        if precision == "default":
            precision = default_file_precision(path, device)
        with torch.inference_mode(False), quiet_libraries():  # see LoadHiDreamDiffusers.execute
            transformer = load_frozen_transformer(None, precision if precision not in DTYPES else "no_change",
                                                  _base_dtype(precision), device, transformer_file=path)
        return io.NodeOutput(HiDreamModel(transformer=transformer, name=f"{unet_name} ({precision})", source=path))
