"""Loading HiDream-I1 from disk: the one path used for the tiny test model and for the real HiDream-I1-Full.

The model folder is a diffusers HiDream-I1 folder (model_index.json, transformer/, vae/, text_encoder{,_2,_3}/,
tokenizer{,_2,_3}/, scheduler/). The Llama-3.1-8B-Instruct text encoder usually lives in its own folder (tokenizer
and weights together, `llama_dir`); a folder that carries it as text_encoder_4/ + tokenizer_4/ works too.
Nothing here downloads: every load is local and every failure is a ConfigError naming the path and the fix.

The text encoders are `text_encoders.HiDreamTextEncoders`; the VAE's encode/decode is in `vae.py`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import diffusers
import torch
from diffusers import AutoencoderKL, HiDreamImageTransformer2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import (
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    LlamaModel,
    PreTrainedTokenizerFast,
    T5EncoderModel,
    T5Tokenizer,
)

from ..config.schema import ConfigError
from .text_encoders import HiDreamTextEncoders

PathLike = Union[str, Path]
Device = Union[str, torch.device]

# Subfolders of a HiDream-I1 diffusers folder, with the files of which at least one proves each is there.
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "spiece.model")
REQUIRED_SUBFOLDERS: dict[str, tuple[str, ...]] = {
    "transformer": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": _TOKENIZER_FILES,
    "text_encoder_2": ("config.json",),
    "tokenizer_2": _TOKENIZER_FILES,
    "text_encoder_3": ("config.json",),
    "tokenizer_3": _TOKENIZER_FILES,
    "scheduler": ("scheduler_config.json",),
}
LLAMA_SUBFOLDERS = ("text_encoder_4", "tokenizer_4")

# Files that define a component; READMEs, licences and subfolders (e.g. Meta's original/ checkpoint) are ignored.
_IDENTITY_SUFFIXES = {".json", ".safetensors", ".bin", ".model", ".txt", ".tiktoken"}
_IDENTITY_HEAD_BYTES = 1 << 20


# ----------------------------------------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class HiDreamModelPaths:
    """Where a HiDream-I1 model lives. `llama_dir` is None when the Llama is inside model_dir as text_encoder_4/."""

    model_dir: Path
    llama_dir: Optional[Path] = None

    @property
    def llama_model_dir(self) -> Path:
        return self.llama_dir if self.llama_dir is not None else self.model_dir / "text_encoder_4"

    @property
    def llama_tokenizer_dir(self) -> Path:
        return self.llama_dir if self.llama_dir is not None else self.model_dir / "tokenizer_4"


def resolve_model_paths(
    model_dir: PathLike, llama_dir: Optional[PathLike] = None, require_text_encoders: bool = True,
    require_transformer: bool = True,
) -> HiDreamModelPaths:
    """Check that `model_dir` is a HiDream-I1 diffusers folder and find the Llama; raise ConfigError otherwise.

    With `require_text_encoders=False` only the transformer, VAE and scheduler are required (for runs whose text
    embeddings are already cached), and a missing Llama is not an error. With `require_transformer=False` (the
    transformer comes from its own file, pretrained_transformer_model_name_or_path) the folder needs no transformer/.
    """
    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise ConfigError(
            f"HiDream model folder {model_dir} does not exist or is not a folder: pass the diffusers "
            "HiDream-I1-Full folder (the one containing model_index.json, transformer/, vae/, text_encoder/ ...)"
        )

    needed = REQUIRED_SUBFOLDERS
    if not require_text_encoders:
        needed = {name: markers for name, markers in needed.items() if name in ("transformer", "vae", "scheduler")}
    if not require_transformer:
        needed = {name: markers for name, markers in needed.items() if name != "transformer"}
    missing = [
        f"{name}/{markers[0]}"
        for name, markers in needed.items()
        if not any((model_dir / name / marker).is_file() for marker in markers)
    ]
    if missing:
        raise ConfigError(
            f"{model_dir} is not a complete HiDream-I1 diffusers folder: missing {', '.join(missing)}. "
            "Point the model path at the HiDream-I1-Full diffusers download (HiDream-ai/HiDream-I1-Full), which has "
            "model_index.json and transformer/, vae/, text_encoder{,_2,_3}/, tokenizer{,_2,_3}/, scheduler/."
        )

    if llama_dir is not None:
        llama_path = Path(llama_dir).expanduser()
        if not llama_path.is_dir():
            raise ConfigError(
                f"Llama folder {llama_path} does not exist: pass --llama DIR pointing at a local "
                "Llama-3.1-8B-Instruct folder (config.json, *.safetensors, tokenizer.json together)"
            )
        llama_missing = [] if (llama_path / "config.json").is_file() else ["config.json"]
        if not any((llama_path / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json")):
            llama_missing.append("tokenizer_config.json / tokenizer.json")
        if llama_missing:
            raise ConfigError(
                f"Llama folder {llama_path} lacks {', '.join(llama_missing)}: it must hold both the model and the "
                "tokenizer of Llama-3.1-8B-Instruct (as downloaded from meta-llama/Llama-3.1-8B-Instruct)"
            )
        return HiDreamModelPaths(model_dir=model_dir, llama_dir=llama_path)

    inside = [name for name in LLAMA_SUBFOLDERS if not (model_dir / name).is_dir()]
    if inside and require_text_encoders:
        raise ConfigError(
            f"no {' and no '.join(n + '/' for n in inside)} in {model_dir} and no llama_dir given: pass --llama DIR "
            "pointing at Llama-3.1-8B-Instruct (a folder with config.json, the weights and tokenizer.json)"
        )
    return HiDreamModelPaths(model_dir=model_dir, llama_dir=None)


# -------------------------------------------------------------------------------------------------------- identity


def _identity_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError(f"cannot identify {path}: it does not exist")
    return [p for p in path.iterdir() if p.is_file() and p.suffix in _IDENTITY_SUFFIXES and not p.name.startswith(".")]


def _files_digest(files: list[Path]) -> str:
    """sha256 over (name, size, sha256 of the first MiB) of each file, in name order (folders do not matter)."""
    entries = []
    for file in files:
        with file.open("rb") as handle:
            head = handle.read(_IDENTITY_HEAD_BYTES)
        entries.append(f"{file.name}\0{file.stat().st_size}\0{hashlib.sha256(head).hexdigest()}\n")
    return hashlib.sha256("".join(sorted(entries)).encode()).hexdigest()


def component_identity(path: Path) -> str:
    """A sha256 hex digest naming the component stored in the folder `path` (or the single file `path`).

    Covers, for every config/tokenizer/weight file directly in the folder: its name, its size and a hash of its first
    MiB (the whole file for configs and tokenizers; header + first tensors for weight shards). Content rather than
    mtimes, so that a copied or re-downloaded identical model keeps its caches valid.
    """
    files = _identity_files(Path(path))
    if not files:
        raise ConfigError(f"{path} holds no config, tokenizer or weight files to identify")
    return _files_digest(files)


def text_encoders_identity(paths: HiDreamModelPaths, dtype: torch.dtype) -> str:
    """The identity `load_text_encoders(paths, dtype)` will carry, computed from the files without loading them."""
    parts = [str(dtype)]
    parts += [component_identity(paths.model_dir / name) for name in ("text_encoder", "tokenizer", "text_encoder_2",
                                                                      "tokenizer_2", "text_encoder_3", "tokenizer_3")]
    # The Llama's files are pooled whether they sit in one folder (llama_dir) or in text_encoder_4/ + tokenizer_4/,
    # so the same Llama gives the same identity either way.
    llama_folders = {paths.llama_model_dir, paths.llama_tokenizer_dir}
    llama_files = {file.resolve(): file for folder in llama_folders for file in _identity_files(folder)}
    parts.append(_files_digest(list(llama_files.values())))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


# --------------------------------------------------------------------------------------------------------- loading


def _load(what: str, folder: Path, load):
    """Run a from_pretrained call and turn a missing/corrupt-file error into a ConfigError naming the folder."""
    if not folder.is_dir():
        raise ConfigError(f"cannot load the {what}: {folder} does not exist")
    try:
        return load(folder)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"cannot load the {what} from {folder}: {err}. Check that the folder is a complete local download "
            "(config plus all weight/tokenizer files); nothing is downloaded."
        ) from err


class LlamaHiddenStates(LlamaModel):
    """The Llama text encoder without its language-model head. A LlamaForCausalLM checkpoint's lm_head is left
    out on purpose (see load_text_encoders), so transformers' load report need not list it as unexpected."""

    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]


def load_transformer(
    paths: HiDreamModelPaths, dtype: torch.dtype = torch.float32, device: Device = "cpu"
) -> HiDreamImageTransformer2DModel:
    transformer = _load(
        "HiDream transformer",
        paths.model_dir / "transformer",
        lambda d: HiDreamImageTransformer2DModel.from_pretrained(d, dtype=dtype, local_files_only=True),
    )
    return transformer.to(device)


def load_vae(paths: HiDreamModelPaths, dtype: torch.dtype = torch.float32, device: Device = "cpu") -> AutoencoderKL:
    vae = _load(
        "VAE", paths.model_dir / "vae", lambda d: AutoencoderKL.from_pretrained(d, dtype=dtype, local_files_only=True)
    )
    return vae.to(device).eval().requires_grad_(False)


def load_text_encoders(
    paths: HiDreamModelPaths, dtype: torch.dtype = torch.float32, device: Device = "cpu"
) -> HiDreamTextEncoders:
    """Load CLIP-L, CLIP-G, T5 and Llama with their tokenizers (Llama from `paths.llama_dir` when set)."""
    model_dir = paths.model_dir

    def tokenizer(cls, name: str, folder: Path):
        return _load(name, folder, lambda d: cls.from_pretrained(d, local_files_only=True))

    def encoder(cls, name: str, folder: Path):
        return _load(name, folder, lambda d: cls.from_pretrained(d, dtype=dtype, local_files_only=True))

    # The Llama is loaded as LlamaModel rather than the pipeline's LlamaForCausalLM: encode_prompt only reads
    # hidden_states, which come from the same inner model either way (the tests check the embeddings match the
    # pipeline's), and this skips the lm_head (~1 GB in bf16) and the 128k-wide logits of every forward.
    encoders = HiDreamTextEncoders(
        tokenizer=tokenizer(CLIPTokenizer, "CLIP-L tokenizer", model_dir / "tokenizer"),
        text_encoder=encoder(CLIPTextModelWithProjection, "CLIP-L text encoder", model_dir / "text_encoder"),
        tokenizer_2=tokenizer(CLIPTokenizer, "CLIP-G tokenizer", model_dir / "tokenizer_2"),
        text_encoder_2=encoder(CLIPTextModelWithProjection, "CLIP-G text encoder", model_dir / "text_encoder_2"),
        tokenizer_3=tokenizer(T5Tokenizer, "T5 tokenizer", model_dir / "tokenizer_3"),
        text_encoder_3=encoder(T5EncoderModel, "T5 text encoder", model_dir / "text_encoder_3"),
        tokenizer_4=tokenizer(PreTrainedTokenizerFast, "Llama tokenizer", paths.llama_tokenizer_dir),
        text_encoder_4=encoder(LlamaHiddenStates, "Llama text encoder", paths.llama_model_dir),
        identity=text_encoders_identity(paths, dtype),
    )
    return encoders.to(device)


def scheduler_shift(model_dir: Path) -> Optional[float]:
    """The sampling shift the model folder's scheduler/scheduler_config.json gives its pipeline: `flow_shift` of
    HiDream-I1-Full's UniPC (3.0), `shift` of a FlowMatch scheduler (Dev's 6.0); None when the folder says none.

    diffusers' HiDreamImagePipeline samples with it as configured; HiDream's own pipeline (and SimpleTuner's copy)
    passes exp(1.15) = 3.16 at 4096 image tokens instead (docs/simpletuner.md). Training's flow_schedule_shift is
    a training setting and never the sampler's."""
    config_file = Path(model_dir) / "scheduler" / "scheduler_config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for key in ("flow_shift", "shift"):
        if isinstance(config.get(key), (int, float)) and config[key] > 0:
            return float(config[key])
    return None


def load_scheduler(paths: HiDreamModelPaths) -> SchedulerMixin:
    """The scheduler saved in scheduler/, as the class its config names (UniPC or FlowMatchEuler for HiDream)."""
    folder = paths.model_dir / "scheduler"
    config_file = folder / "scheduler_config.json"
    try:
        class_name = json.loads(config_file.read_text(encoding="utf-8"))["_class_name"]
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"cannot read the scheduler class from {config_file}: {err}") from err
    scheduler_cls = getattr(diffusers, class_name, None)
    if not (isinstance(scheduler_cls, type) and issubclass(scheduler_cls, SchedulerMixin)):
        raise ConfigError(f"{config_file} names {class_name!r}, which is not a diffusers scheduler class")
    return _load("scheduler", folder, lambda d: scheduler_cls.from_pretrained(d, local_files_only=True))
