"""Checkpoint folders: `<output_dir>/checkpoint-<step>/`, written atomically, verified on load, listed, pruned.

What goes inside is TrainState's business (state.py); here a folder is published with a `manifest.json` (sha256
and size of every file). Everything is written into `.checkpoint-<step>.tmp/` and renamed into place, and the
manifest is written last, so a crash at any point leaves either no `checkpoint-<step>` or one whose manifest
proves every file complete. A folder without a valid manifest is never resumed from.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from ..util.atomic import DiskFullError, file_sha256, fsync_directory, write_text
from ..config.schema import ConfigError
from ..util.faults import crash_point

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE_FILE = "training_state.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path: Path) -> Optional[int]:
    match = _NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def save_checkpoint(output_dir: Path, step: int, write_files: Callable[[Path], None]) -> Path:
    """Create `<output_dir>/checkpoint-<step>/`: `write_files(folder)` writes the contents into a temporary
    folder, the manifest is added last, and the folder is renamed into place (replacing an older one of the
    same step). Returns the final folder."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write_files(tmp)
        crash_point("checkpoint-write")
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        for path in files:  # durable before the manifest vouches for them
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
        manifest = {"step": step,
                    "files": {p.relative_to(tmp).as_posix(): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
                              for p in files}}
        write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
    except OSError as exc:
        written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            previous = list_checkpoints(output_dir)
            needed = sum(p.stat().st_size for p in previous[-1].rglob("*") if p.is_file()) if previous else written
            raise DiskFullError(final, needed, shutil.disk_usage(output_dir).free) from exc
        raise
    if final.exists():
        old = output_dir / f".checkpoint-{step}.old"
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    fsync_directory(output_dir)
    return final


def verify_checkpoint(folder: Path) -> Optional[str]:
    """None when `folder` is a complete checkpoint; otherwise why it is not."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest.json ({exc})"
    if STATE_FILE not in files:
        return f"the manifest lists no {STATE_FILE}"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected.get("bytes") or file_sha256(path) != expected.get("sha256"):
            return f"{name} does not match its sha256 in the manifest (corrupt or changed)"
    return None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """`checkpoint-<step>` folders under output_dir, oldest step first (complete or not)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def resolve_resume_checkpoint(output_dir: Path, spec: Optional[str]) -> Optional[Path]:
    """The checkpoint `resume_from_checkpoint` names: None/"" -> None; "latest" -> the newest complete one (an
    incomplete or corrupt newer one is skipped with a warning; none at all -> None, a fresh start); a name
    (`checkpoint-500`) or path -> that one, which must be complete."""
    if not spec:
        return None
    if spec == "latest":
        for folder in reversed(list_checkpoints(output_dir)):
            problem = verify_checkpoint(folder)
            if problem is None:
                return folder
            logger.warning("skipping checkpoint %s: %s", folder, problem)
        logger.info("resume_from_checkpoint latest: no complete checkpoint in %s, starting from step 0", output_dir)
        return None
    folder = Path(spec) if Path(spec).is_absolute() or Path(spec).exists() else Path(output_dir) / spec
    if not folder.is_dir():
        raise ConfigError(f"resume_from_checkpoint {spec!r}: no such checkpoint folder ({folder}); use 'latest' "
                          f"or one of: {[p.name for p in list_checkpoints(output_dir)] or 'none exist yet'}")
    problem = verify_checkpoint(folder)
    if problem:
        raise ConfigError(f"resume_from_checkpoint {spec!r}: {folder} is not a complete checkpoint: {problem}")
    return folder


def load_training_state(folder: Path) -> dict:
    return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)


def prune_checkpoints(output_dir: Path, keep: Optional[int]) -> list[Path]:
    """Delete the oldest checkpoints so at most `keep` remain (None: keep all). Returns the deleted folders."""
    if keep is None:
        return []
    folders = list_checkpoints(output_dir)
    doomed = folders[:max(0, len(folders) - keep)]
    for folder in doomed:
        shutil.rmtree(folder)
        logger.info("removed old checkpoint %s (checkpoints_total_limit %d)", folder.name, keep)
    return doomed
