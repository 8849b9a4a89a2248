"""Where this pack reads and writes inside a ComfyUI install (all through ComfyUI's folder_paths)."""
from __future__ import annotations

import re
from pathlib import Path

import folder_paths

from ..trainer_core.config import ConfigError

TINY_MODEL_NAME = "tiny-hidream"  # built on first use: the embedded drawing tiny HiDream (~14 MB)
DEMO_DATASET_NAME = "hidream_lokr_demo_zorb"  # written on first use: 8 captioned pictures of the demo concept
OLD_DEMO_DATASET_NAME = "hidream_lokr_demo_shapes"  # the name in demo graphs saved before the drawing model


def pack_output_dir() -> Path:
    """<output>/hidream_lokr: training runs and the shared embedding/latent caches."""
    return Path(folder_paths.get_output_directory()) / "hidream_lokr"


def cache_dir() -> Path:
    """One cache for every run: entries are keyed by content and encoder identity, so sharing is safe."""
    return pack_output_dir() / "cache"


def diffusers_folder(name: str) -> Path:
    """An absolute path, or a folder name under ComfyUI's models/diffusers folders. The name `tiny-hidream` is
    the embedded drawing tiny model (for the demo workflow and for trying the pack on a CPU): built there on first
    use from the shipped weights, and rebuilt when the folder holds other weights (an older pack's random model)."""
    name = name.strip()
    if not name:
        raise ConfigError("model_folder is empty: give a HiDream-I1 diffusers folder (absolute path, or a folder "
                          f"name under models/diffusers), or '{TINY_MODEL_NAME}' for the embedded tiny model")
    path = Path(name).expanduser()
    if path.is_absolute():
        return path
    roots = [Path(p) for p in folder_paths.get_folder_paths("diffusers")]
    if name == TINY_MODEL_NAME and roots:
        from ..trainer_core import build_drawing_model
        from ..trainer_core.util import quiet_libraries

        existing = next((root / name for root in roots if (root / name).is_dir()), roots[0] / name)
        with quiet_libraries():  # saving the tiny model prints transformers' shard progress bars
            return build_drawing_model(existing)  # returns at once when the folder already holds these weights
    for root in roots:
        if (root / name).is_dir():
            return root / name
    searched = ", ".join(str(r) for r in roots) or "(no models/diffusers folder configured)"
    raise ConfigError(f"model folder {name!r} not found: it is not an absolute path and not a folder under "
                      f"{searched}. Put the HiDream-I1 diffusers download there or give its full path.")


def image_folder(name: str) -> Path:
    """An absolute path, or a folder under ComfyUI's input directory. `hidream_lokr_demo_zorb` is written there
    on first use (the demo's small captioned dataset)."""
    name = name.strip()
    if not name:
        raise ConfigError("folder is empty: give the folder of training images (absolute path, or a folder "
                          "under ComfyUI's input directory)")
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = Path(folder_paths.get_input_directory()) / name
    if name in (DEMO_DATASET_NAME, OLD_DEMO_DATASET_NAME) and not path.exists():
        from ..trainer_core import write_demo_dataset

        write_demo_dataset(path)
    return path


def checked_output_name(name: str, what: str, subfolders: bool) -> str:
    """A name from a node input that becomes a path under an output folder: it may not leave that folder.
    NUL, absolute paths, '..' components (and '/' where `subfolders` is False) are refused with the reason."""
    name = name.strip()
    parts = name.replace("\\", "/").split("/")
    problem = ("contains a NUL character" if "\0" in name else
               "is an absolute path" if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) else
               "contains a '..' component" if ".." in parts else
               "contains '/'" if not subfolders and len(parts) > 1 else None)
    if problem:
        raise ConfigError(f"{what} {name!r} {problem}: it must name a file inside ComfyUI's output folder; use "
                          f"letters, digits, '_', '-'{' and subfolders like runs/mine' if subfolders else ''}")
    return name


def run_folder_name(output_name: str) -> str:
    """The folder-safe form of an output_name (its runs are <this>_00001, _00002, ...)."""
    output_name = checked_output_name(output_name, "output_name", subfolders=False)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", output_name) or "hidream_lokr"


def new_run_dir(output_name: str) -> Path:
    """<output>/hidream_lokr/<name>_00001, _00002, ...: a fresh folder per training run, never reused."""
    safe = run_folder_name(output_name)
    root = pack_output_dir()
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in root.glob(f"{safe}_*") if (m := re.fullmatch(rf"{re.escape(safe)}_(\d+)", p.name))]
    path = root / f"{safe}_{max(taken, default=0) + 1:05d}"
    path.mkdir(parents=True)
    return path


def new_lora_file(prefix: str) -> Path:
    """<output>/loras/<prefix>_00001.safetensors, ...: a new name every time (ComfyUI's LoRA loader caches by
    file name). output/loras is one of the folders LoraLoaderModelOnly and "Load LoKr" list."""
    prefix = checked_output_name(prefix, "filename_prefix", subfolders=True)
    safe = re.sub(r"[^A-Za-z0-9._/-]+", "_", prefix).strip("/") or "hidream_lokr"
    root = Path(folder_paths.get_output_directory()) / "loras"
    stem = Path(safe)
    folder = (root / stem).parent
    folder.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(rf"{re.escape(stem.name)}_(\d+)\.safetensors")
    taken = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.fullmatch(p.name))]
    return folder / f"{stem.name}_{max(taken, default=0) + 1:05d}.safetensors"
