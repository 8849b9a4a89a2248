"""The drawing tiny HiDream: the builder's model folder with the shipped pretrained weights.

`build_drawing_model(DIR)` writes the same diffusers layout as `build_tiny_model` (real classes, tokenizers trained
here on the corpus captions), then gives every component the weights of weights/tiny_hidream_drawing.safetensors.xz,
produced by `python -m trainer_core pretrain-tiny-model` (trainer_core/hidream/tiny/pretrain.py, see
docs/tiny-model.md). The weights file's sha256 and the tokenizers' fingerprint are checked against the manifest,
so a corrupted file or a tokenizers library that trains different vocabularies fails loudly instead of giving a
model that silently cannot read its captions.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional

import torch

from ...util.atomic import file_sha256
from . import corpus
from .builder import TinyHiDreamSizes, caption_corpus, write_model_folder

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = "tiny_hidream_drawing.safetensors.xz"  # a safetensors file in an xz stream (9.3 -> 6.9 MB)
MANIFEST_FILE = "manifest.json"
COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4", "transformer", "vae")

# The random tiny model's text encoders; a VAE wide enough to reproduce flat-colour pictures; a transformer 96 wide
# (3 heads of 32) instead of 64. At 64 the residual stream is exactly as wide as one 2 x 2 x 16 latent patch: it has
# to carry the noisy input through for the velocity (noise - x0) and has no room left for what the caption says,
# so samples stayed textured (measured: flow loss 0.146 after 3,000 steps at 64 wide, the model shipped until
# 2026-12-07; 0.073 after 2,000 at 96 wide). Four double-stream blocks and one single-stream block cost what the
# old two and four did (1.43 against 1.48 GFLOP per CFG call at 128 px): a single block sends the 384 text tokens
# through the MoE's three feed-forwards, a double block through one.
DRAWING_SIZES = TinyHiDreamSizes(num_attention_heads=3, num_layers=4, num_single_layers=1,
                                 vae_block_out_channels=(32, 64, 64, 64))
DRAWING_SEED = 0
# The resolution the transformer was pretrained at (8 x 8 image tokens); it draws best there.
DRAWING_RESOLUTION = 128

# Captions whose token ids fingerprint the four tokenizers (the corpus' own words plus unknown ones).
_PROBE_CAPTIONS = ("", "a red circle on a blue background", "a white cross on a black background, at the top",
                   "a zorb on a green background", "Photo of two cats and a star in a forest")


class DrawingModelError(RuntimeError):
    """The shipped weights cannot be used as they are (missing, corrupted, or built for other tokenizers)."""


def drawing_corpus() -> list[str]:
    """What the drawing model's tokenizers are trained on: the random model's captions plus the whole grammar."""
    return caption_corpus() + corpus.tokenizer_captions()


def tokenizer_fingerprint(model_dir: Path) -> str:
    """sha256 of the token ids the folder's four tokenizers give the probe captions."""
    from transformers import CLIPTokenizer, PreTrainedTokenizerFast, T5Tokenizer

    model_dir = Path(model_dir)
    parts = []
    for cls, name in ((CLIPTokenizer, "tokenizer"), (CLIPTokenizer, "tokenizer_2"), (T5Tokenizer, "tokenizer_3"),
                      (PreTrainedTokenizerFast, "tokenizer_4")):
        tokenizer = cls.from_pretrained(model_dir / name, local_files_only=True)
        parts.append([tokenizer(caption)["input_ids"] for caption in _PROBE_CAPTIONS])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def read_manifest(weights_dir: Path = WEIGHTS_DIR) -> dict:
    path = Path(weights_dir) / MANIFEST_FILE
    if not path.is_file():
        raise DrawingModelError(f"no {MANIFEST_FILE} in {weights_dir}: the drawing tiny model's weights are missing; "
                                "rebuild them with `python -m trainer_core pretrain-tiny-model`")
    return json.loads(path.read_text(encoding="utf-8"))


def sizes_from_manifest(manifest: dict) -> TinyHiDreamSizes:
    values = {}
    for field in fields(TinyHiDreamSizes):
        value = manifest["sizes"][field.name]
        values[field.name] = tuple(value) if isinstance(value, list) else value
    return TinyHiDreamSizes(**values)


def split_components(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """'component/key' tensors -> {component: {key: tensor}}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        component, key = name.split("/", 1)
        out.setdefault(component, {})[key] = tensor
    return out


BUILT_MARKER = ".drawing_model.json"  # in a built folder: which shipped weights it holds


def write_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """The weights as the repository ships them: safetensors bytes in an xz stream (the bfloat16 exponents compress;
    the file stays small enough to track in git). The same state gives the same bytes."""
    import lzma

    from safetensors.torch import save

    Path(path).write_bytes(lzma.compress(save(state, metadata={"format": "pt"}), preset=9 | lzma.PRESET_EXTREME))


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    import lzma

    from safetensors.torch import load

    return load(lzma.decompress(Path(path).read_bytes()))


def build_drawing_model(out_dir: Path, weights_dir: Optional[Path] = None, reuse: bool = True) -> Path:
    """Write the drawing tiny HiDream-I1 into `out_dir` (replacing it) and return `out_dir`.

    A complete diffusers folder like `build_tiny_model`'s, every weight stored as float32 (the shipped bfloat16 /
    float16 values, exactly); identical files on every build. With `reuse`, a folder this function already built
    from the same weights file is returned as it is.
    """
    weights_dir = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    manifest = read_manifest(weights_dir)
    marker = Path(out_dir) / BUILT_MARKER
    if reuse and marker.is_file() and (Path(out_dir) / "model_index.json").is_file():
        try:
            if json.loads(marker.read_text(encoding="utf-8")).get("sha256") == manifest["sha256"]:
                return Path(out_dir)
        except ValueError:
            pass  # a damaged marker: build again
    weights_path = weights_dir / manifest["file"]
    if not weights_path.is_file():
        raise DrawingModelError(f"{weights_path} is missing; rebuild it with `python -m trainer_core "
                                "pretrain-tiny-model`")
    digest = file_sha256(weights_path)
    if digest != manifest["sha256"]:
        raise DrawingModelError(f"{weights_path} has sha256 {digest}, the manifest says {manifest['sha256']}: the "
                                "file is damaged (a Git LFS pointer?) or stale; restore it or rebuild it")
    weights = split_components(read_weights(weights_path))
    missing = [c for c in COMPONENTS if c not in weights]
    if missing:
        raise DrawingModelError(f"{weights_path} lacks the components {missing}")
    out_dir = write_model_folder(Path(out_dir), seed=manifest["seed"], sizes=sizes_from_manifest(manifest),
                                 corpus=drawing_corpus(), weights=weights)
    fingerprint = tokenizer_fingerprint(out_dir)
    if fingerprint != manifest["tokenizer_fingerprint"]:
        raise DrawingModelError(
            f"the tokenizers trained here split captions differently from those the shipped weights were pretrained "
            f"with (fingerprint {fingerprint[:12]}, expected {manifest['tokenizer_fingerprint'][:12]}); the tokenizers "
            "library probably differs from the one in constraints.txt. Install the constrained versions, or "
            "re-run `python -m trainer_core pretrain-tiny-model` with these."
        )
    (out_dir / BUILT_MARKER).write_text(json.dumps({"sha256": manifest["sha256"]}) + "\n", encoding="utf-8")
    return out_dir


def manifest_sizes(sizes: TinyHiDreamSizes) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(sizes).items()}
