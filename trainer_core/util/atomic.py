"""Crash-safe file publication: write to a temporary name in the same folder, flush to disk, rename into place.

A reader (or a resumed run) therefore sees either the previous complete file or the new complete file, never a
torn one, whatever moment the process is killed at. The temporary name carries the process id and a random part,
so two processes publishing the same file at once (two runs sharing a cache folder) never write into each other's
temporary file; the last rename wins and both wrote identical bytes.

A published file gets the mode a plain `open(path, "w")` would give it (0666 less the umask): some writers create
their output privately (safetensors' save_file writes 0600), which would make LoKr files unreadable to anyone but
their owner while every other output is readable.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import stat
import threading
from pathlib import Path
from typing import Callable, Iterator, Union

PathLike = Union[str, os.PathLike]


class DiskFullError(OSError):
    """Writing `path` failed for lack of space; the previous version of the file (if any) is untouched."""

    def __init__(self, path: Path, needed_bytes: int | None, free_bytes: int | None):
        needed = f"about {needed_bytes / 2**20:.1f} MiB needed" if needed_bytes else "space needed"
        free = f", {free_bytes / 2**20:.1f} MiB free" if free_bytes is not None else ""
        super().__init__(errno.ENOSPC, f"no space left on the device while writing {path} ({needed}{free}); "
                                       f"free some space (old checkpoints, caches) and retry")
        self.path = path
        self.needed_bytes = needed_bytes


def temporary_sibling(path: Path, suffix: str = "") -> Path:
    """A hidden name beside `path`, unique to this process and call (`suffix` keeps an extension when needed)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}")


def fsync_directory(folder: Path) -> None:
    """Make a rename inside `folder` durable (POSIX); a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_umask_lock = threading.Lock()
_file_mode: list[int] = []


def default_file_mode() -> int:
    """0666 less the process' umask: the mode `open(path, "w")` creates files with. Read once (reading the umask
    means setting it for a moment) and kept: processes set their umask when they start."""
    with _umask_lock:
        if not _file_mode:
            umask = os.umask(0o022)
            os.umask(umask)
            _file_mode.append(0o666 & ~umask)
    return _file_mode[0]


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


@contextlib.contextmanager
def published(path: PathLike, suffix: str = "", size_hint: int | None = None) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed to `path`, on failure removed.

    `suffix` is appended to the temporary name for writers that choose a format by extension (LyCORIS).
    ENOSPC becomes a DiskFullError that names `path` and the space needed (`size_hint` or what was written).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path, suffix)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if hasattr(os, "chmod") and stat.S_IMODE(tmp.stat().st_mode) != default_file_mode():
            os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except OSError as exc:
        written = tmp.stat().st_size if tmp.exists() else None
        with contextlib.suppress(OSError):
            tmp.unlink()
        if exc.errno == errno.ENOSPC and not isinstance(exc, DiskFullError):
            raise DiskFullError(path, size_hint or written, _free_bytes(path.parent)) from exc
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_directory(path.parent)


def file_sha256(path: PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_bytes(path: PathLike, data: bytes) -> Path:
    with published(path, size_hint=len(data)) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_with(path: PathLike, writer: Callable[[Path], None], suffix: str = "") -> Path:
    """Publish whatever `writer(tmp_path)` writes (PIL's save, safetensors' save_file ...)."""
    with published(path, suffix=suffix) as tmp:
        writer(tmp)
    return Path(path)
