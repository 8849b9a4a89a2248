"""Where this pack reads and writes inside a ComfyUI install (all through ComfyUI's folder_paths), and the fence
around it.

A queued prompt may come from anyone who can reach the server (a shared workflow, a `--listen` server), so every
path a node input names stays inside ComfyUI's own folders:

    reads   training images    ComfyUI's input folder, and its datasets folder where this ComfyUI has one
            HiDream folders    ComfyUI's models folders (a name under models/diffusers, or a path inside models)
            checkpoints        the pack's own runs under output/hidream_lokr
    writes  everything         under ComfyUI's output folder (output/hidream_lokr, output/loras); the two names
                               the pack itself owns are built on first use: models/diffusers/tiny-hidream and
                               input/hidream_lokr_demo_zorb

An absolute path, a '..' or a symbolic link that leads out of those folders is refused before anything is opened,
with the folder to use instead. The server's owner can lift the fence with the environment variable
HIDREAM_LOKR_ALLOW_ANY_PATH=1 (deliberately not a node input nor a ComfyUI setting: anyone who can queue a prompt
can also change the settings through ComfyUI's /settings route).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Optional

import folder_paths

from ..trainer_core.config import ConfigError

TINY_MODEL_NAME = "tiny-hidream"  # built on first use: the embedded drawing tiny HiDream (~19 MB on disk)
DEMO_DATASET_NAME = "hidream_lokr_demo_zorb"  # written on first use: 8 captioned pictures of the demo concept
OLD_DEMO_DATASET_NAME = "hidream_lokr_demo_shapes"  # the name in demo graphs saved before the drawing model
ALLOW_ANY_PATH_ENV = "HIDREAM_LOKR_ALLOW_ANY_PATH"
MAX_NAME_CHARS = 200  # a folder or file name from a node input (file systems stop at 255 bytes per component)


def pack_output_dir() -> Path:
    """<output>/hidream_lokr: training runs and the shared embedding/latent caches."""
    return Path(folder_paths.get_output_directory()) / "hidream_lokr"


def cache_dir() -> Path:
    """One cache for every run: entries are keyed by content and encoder identity, so sharing is safe."""
    return pack_output_dir() / "cache"


# ------------------------------------------------------------------------------------------------ the fence

def any_path_allowed() -> bool:
    """Whether the server's owner lifted the fence (HIDREAM_LOKR_ALLOW_ANY_PATH=1 in ComfyUI's environment)."""
    return os.environ.get(ALLOW_ANY_PATH_ENV, "").strip().lower() in ("1", "true", "yes")


def is_inside(directory, target) -> bool:
    """Whether `target` really lies inside `directory`: both resolved (symbolic links and '..' followed), so a link
    inside the folder that points elsewhere counts as outside. Newer ComfyUI has the same check as
    folder_paths.is_within_directory; this one runs on every ComfyUI."""
    try:
        root, path = os.path.realpath(directory), os.path.realpath(target)
        return os.path.commonpath((root, path)) == root
    except ValueError:  # a NUL byte, or two Windows drives
        return False


def _checked_name(name: str, what: str) -> str:
    """A name from a node input, before it becomes part of any path: no NUL, not absurdly long."""
    name = name.strip()
    if "\0" in name:
        raise ConfigError(f"{what} contains a NUL character: give a plain folder or file name")
    if len(name) > MAX_NAME_CHARS:
        raise ConfigError(f"{what} is {len(name)} characters long (at most {MAX_NAME_CHARS}): give a shorter "
                          "folder or file name")
    return name


def shown(name: str) -> str:
    """A name from a node input as an error message quotes it (a hostile one may be kilobytes long)."""
    return repr(name if len(name) <= 80 else name[:80] + "...")


def _refused(what: str, name: str, where: str, areas: str, example: Path) -> ConfigError:
    return ConfigError(
        f"{what} {shown(name)} {where}, outside ComfyUI's {areas}: a queued workflow may only read there. Put it in "
        f"{example} and give its name, or (only on a server you alone use) start ComfyUI with "
        f"{ALLOW_ANY_PATH_ENV}=1 to allow any path")


def resolve_inside(name: str, what: str, roots: list[Path], areas: str,
                   allowed: Optional[Iterable[Path]] = None) -> Path:
    """`name` (a folder under one of `roots`, or an absolute path) as a path that stays inside `allowed` (default:
    `roots`). Refused before anything is opened: an absolute path outside, a '..' or a symbolic link leading out.
    A relative name is looked up in each root in turn (the first that has it wins; else the first root)."""
    name = _checked_name(name, what)
    allowed = list(allowed if allowed is not None else roots)
    path = Path(name).expanduser()
    candidates = [path] if path.is_absolute() else [root / name for root in roots]
    if any_path_allowed():
        return next((c for c in candidates if c.exists()), candidates[0])
    for candidate in candidates:
        if not any(is_inside(root, candidate) for root in allowed):
            leaves = "is a path" if path.is_absolute() else "leads out through '..' or a symbolic link"
            raise _refused(what, name, leaves, areas, roots[0])
    return next((c for c in candidates if c.exists()), candidates[0])


def escaping_links(folder: Path, roots: list[Path]) -> list[str]:
    """Symbolic links under `folder` (files, or folders the dataset walk would enter) that lead out of `roots`,
    relative to `folder`. Walks only inside `roots`: a link that leaves is noted, never followed."""
    found, visited = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        visited.add(os.path.realpath(dirpath))
        kept = []
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            # Only a link can lead out: the folders walked are inside (the others are never entered).
            if os.path.islink(full) and not any(is_inside(root, full) for root in roots):
                found.append(os.path.relpath(full, folder))
            elif name in dirnames and os.path.realpath(full) not in visited:
                kept.append(name)
        dirnames[:] = kept
    return sorted(found)


def model_roots() -> list[Path]:
    """Where a HiDream folder may be: the configured models/diffusers folders, then ComfyUI's models folder."""
    return [Path(p) for p in folder_paths.get_folder_paths("diffusers")] + [Path(folder_paths.models_dir)]


def image_roots() -> list[Path]:
    """Where training images may be read: ComfyUI's input folder, and its datasets folders (newer ComfyUI)."""
    roots = [Path(folder_paths.get_input_directory())]
    if "datasets" in getattr(folder_paths, "folder_names_and_paths", {}):
        roots += [Path(p) for p in folder_paths.get_folder_paths("datasets")]
    return roots


# ------------------------------------------------------------------------------------------------ reads

def diffusers_folder(name: str) -> Path:
    """A folder name under ComfyUI's models/diffusers folders (or a path inside ComfyUI's models folder). The name
    `tiny-hidream` is the embedded drawing tiny model (for the demo workflow and for trying the pack on a CPU):
    built there on first use from the shipped weights, and rebuilt when the folder holds other weights (an older
    pack's random model)."""
    name = name.strip()
    if not name:
        raise ConfigError("model_folder is empty: give a HiDream-I1 diffusers folder (a folder name under "
                          f"models/diffusers), or '{TINY_MODEL_NAME}' for the embedded tiny model")
    roots = [Path(p) for p in folder_paths.get_folder_paths("diffusers")]
    if name == TINY_MODEL_NAME and roots:
        from ..trainer_core import build_drawing_model
        from ..trainer_core.util import quiet_libraries

        existing = next((root / name for root in roots if (root / name).is_dir()), roots[0] / name)
        with quiet_libraries():  # saving the tiny model prints transformers' shard progress bars
            return build_drawing_model(existing)  # returns at once when the folder already holds these weights
    path = resolve_inside(name, "model folder", roots or model_roots(), "models folders", allowed=model_roots())
    if path.is_dir():
        return path
    searched = ", ".join(str(r) for r in roots) or "(no models/diffusers folder configured)"
    raise ConfigError(f"model folder {shown(name)} not found under {searched}. Put the HiDream-I1 diffusers download "
                      "there (a folder with model_index.json) and give its name.")


def image_folder(name: str) -> Path:
    """A folder under ComfyUI's input folder (or its datasets folder). `hidream_lokr_demo_zorb` is written there
    on first use (the demo's small captioned dataset). Symbolic links inside it must not lead out either."""
    name = name.strip()
    if not name:
        raise ConfigError("folder is empty: give the folder of training images (a folder under ComfyUI's input "
                          "folder)")
    roots = image_roots()
    path = resolve_inside(name, "folder", roots, "input and datasets folders")
    if name in (DEMO_DATASET_NAME, OLD_DEMO_DATASET_NAME) and not path.exists():
        from ..trainer_core import write_demo_dataset

        write_demo_dataset(path)
    if path.is_dir() and not any_path_allowed():
        leaving = escaping_links(path, roots)
        if leaving:
            shown = ", ".join(leaving[:3]) + (f" and {len(leaving) - 3} more" if len(leaving) > 3 else "")
            raise _refused("folder", name, f"holds symbolic links that lead out ({shown})",
                           "input and datasets folders", roots[0])
    return path


def inside_pack_output(name: str, what: str) -> Path:
    """A path the pack wrote itself (a checkpoint of a run): relative to output/hidream_lokr, or absolute inside
    it."""
    return resolve_inside(name, what, [pack_output_dir()], "output/hidream_lokr folder (this pack's runs)")


# ------------------------------------------------------------------------------------------------ writes

def checked_output_name(name: str, what: str, subfolders: bool) -> str:
    """A name from a node input that becomes a path under an output folder: it may not leave that folder.
    NUL, absolute paths, '..' components (and '/' where `subfolders` is False) are refused with the reason."""
    name = name.strip()
    parts = name.replace("\\", "/").split("/")
    problem = ("contains a NUL character" if "\0" in name else
               f"is longer than {MAX_NAME_CHARS} characters" if len(name) > MAX_NAME_CHARS else
               "is an absolute path" if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) else
               "contains a '..' component" if ".." in parts else
               "contains '/'" if not subfolders and len(parts) > 1 else None)
    if problem:
        raise ConfigError(f"{what} {shown(name)} {problem}: it must name a file inside ComfyUI's output folder; use "
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
