"""The frozen base transformer as a run wants it: from a diffusers folder or from one ComfyUI-style file, in the
base_model_precision asked for, and on the device it computes on.

Order matters for memory: no 8-bit base is ever a whole 16-bit model on the device. optimum-quanto precisions are
read into CPU memory and quantised one block at a time on the device (each block moved there, then quantised; a
16-bit HiDream-I1 is 32 GiB, its int8 form 16). The 8-bit scaled precisions (quant/scaled.py) are read into CPU
memory and quantised one layer at a time *on* the device, each 8-bit layer going back to the CPU, and only then is
the 8-bit model moved; an fp8 file is read straight into fp8 layers (single_file.py). With `stream_blocks` the model
stays in CPU memory for block_offload to pack. `plan.phases` dry-runs exactly this order at full size.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from ..config.schema import SCALED_PRECISIONS, ConfigError
from ..quant import ScaledLinear, check_precision_supported, quantize_frozen, quantize_scaled
from .models import HiDreamModelPaths, load_transformer
from .single_file import FP8_DTYPES, load_transformer_file, stored_weight_dtype, transformer_file_config

logger = logging.getLogger(__name__)

TRANSFORMER_FILE_SUFFIXES = (".safetensors", ".sft")


def is_transformer_file(path) -> bool:
    return path is not None and Path(path).suffix.lower() in TRANSFORMER_FILE_SUFFIXES


def default_file_precision(path: Path, device) -> str:
    """What a transformer file is best kept as on `device`: an fp8 file as fp8-scaled where fp8 matmuls run (sm89+
    GPUs, CPUs), else int8-scaled (the same memory, int8 tensor cores); a 16-bit file unchanged ("no_change")."""
    if stored_weight_dtype(path) not in FP8_DTYPES:
        return "no_change"
    try:
        check_precision_supported("fp8-scaled", device)
    except ConfigError as why:
        logger.info("%s: %s. Keeping it in 8 bits as int8-scaled instead", Path(path).name, why)
        return "int8-scaled"
    return "fp8-scaled"


def load_frozen_transformer(paths: Optional[HiDreamModelPaths], precision: str, dtype: torch.dtype,
                            device, transformer_file: Optional[Path] = None,
                            stream_blocks: bool = False, read: Optional[Callable[..., nn.Module]] = None) -> nn.Module:
    """The base transformer, frozen, quantised as `precision` says, on `device` (or in CPU memory with
    `stream_blocks`). `transformer_file` (a .safetensors file or a diffusers transformer folder) replaces
    `paths.model_dir / "transformer"`. `read` stands in for `read_transformer` (a memory plan reads no weights)."""
    device = torch.device(device)
    check_precision_supported(precision, device)  # before minutes of loading, not after
    scaled = precision in SCALED_PRECISIONS
    # Only a 16-bit model that goes to the device whole is read onto it; every other one is read into CPU memory:
    # the 8-bit precisions are quantised a layer (scaled) or a block (quanto) at a time on the device, and streamed
    # blocks are packed from CPU memory by block_offload.
    home = device if precision in ("no_change", "bf16", "fp32") and not stream_blocks else torch.device("cpu")
    transformer = (read or read_transformer)(paths, dtype, home, precision if scaled else "no_change",
                                             transformer_file)
    if scaled:
        if not transformer_is_scaled(transformer):
            quantize_scaled(transformer, precision, work_device=device)  # each 8-bit layer back where it was
        return (transformer if stream_blocks else transformer.to(device)).requires_grad_(False)
    return quantize_frozen(transformer, precision, device=None if stream_blocks else device).requires_grad_(False)


def read_transformer(paths: Optional[HiDreamModelPaths], dtype: torch.dtype, home, file_precision: str,
                     transformer_file: Optional[Path] = None) -> nn.Module:
    """The transformer as it comes off disk, in `home`'s memory: a diffusers folder in `dtype`; a single file read
    one tensor at a time, straight into 8-bit layers when `file_precision` is fp8-scaled / int8-scaled."""
    if transformer_file is not None and Path(transformer_file).is_file():
        return load_transformer_file(transformer_file, dtype=dtype, device=home, precision=file_precision)
    folder = Path(transformer_file) if transformer_file is not None else None
    if paths is None and folder is None:
        raise ConfigError("no transformer to load: give a HiDream-I1 diffusers folder or a transformer file")
    return (_load_transformer_folder(folder, dtype, home) if folder is not None
            else load_transformer(paths, dtype=dtype, device=home))


def transformer_is_scaled(transformer: nn.Module) -> bool:
    """True when the transformer's Linears are already 8-bit (an fp8 file read as fp8-scaled / int8-scaled)."""
    return any(isinstance(m, ScaledLinear) for m in transformer.modules())


def image_token_limit(config: Mapping) -> int:
    """The most image tokens a HiDream transformer with this config takes, diffusers' `max_seq`: its
    `max_resolution` (latent height, width) over patch_size^2. 4096 (1024x1024 px) for HiDream-I1 Full, Dev and
    Fast; 1024 (512x512 px) for the embedded tiny model. A non-square input is padded to it, more cannot run."""
    height, width = config.get("max_resolution") or (128, 128)  # diffusers' own default
    patch = config.get("patch_size") or 2
    return height * width // (patch * patch)


def transformer_config(paths: Optional[HiDreamModelPaths], transformer_file: Optional[Path] = None) -> dict:
    """The diffusers config of the transformer `load_frozen_transformer` would load, read without loading it (a
    file's header, or config.json), so the data can be fitted to the model before anything is cached."""
    if transformer_file is not None and Path(transformer_file).is_file():
        return transformer_file_config(Path(transformer_file))
    folder = Path(transformer_file) if transformer_file is not None else \
        (paths.model_dir / "transformer" if paths is not None else None)
    config_file = folder / "config.json" if folder is not None else None
    if config_file is None or not config_file.is_file():
        raise ConfigError(f"no transformer config.json at {folder}: give a HiDream-I1 diffusers folder (with "
                          "transformer/config.json) or a transformer file")
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read the transformer config {config_file}: {err}") from err


def _load_transformer_folder(folder: Path, dtype: torch.dtype, device) -> nn.Module:
    from diffusers import HiDreamImageTransformer2DModel

    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder} is neither a transformer .safetensors file nor a diffusers transformer folder "
                          "(config.json + weights)")
    try:
        model = HiDreamImageTransformer2DModel.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load the HiDream transformer from {folder}: {err}") from err
    return model.to(device)
