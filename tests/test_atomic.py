"""Crash-safe publication of files: old-or-new, never torn; disk-full errors that say what and where."""
from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from trainer_core.util import DiskFullError, published, write_bytes

REPO = Path(__file__).resolve().parents[1]


def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = write_bytes(tmp_path / "state.json", b"previous")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("writer crashed")

    with pytest.raises(RuntimeError):
        with published(target) as tmp:
            half_then_fail(tmp)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_disk_full_names_the_path_and_the_space_needed(tmp_path):
    target = write_bytes(tmp_path / "checkpoint" / "lokr.safetensors", b"old weights")
    with pytest.raises(DiskFullError) as info:
        with published(target, size_hint=3 * 2**20) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")  # what write() raises on a full disk
    message = str(info.value)
    assert str(target) in message and "3.0 MiB needed" in message and "MiB free" in message
    assert info.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old weights"
    assert [p.name for p in target.parent.iterdir()] == ["lokr.safetensors"]


WRITER = textwrap.dedent("""
    import sys
    from trainer_core.util import write_bytes
    target, size = sys.argv[1], int(sys.argv[2])
    n = 0
    while True:
        n += 1
        write_bytes(target, bytes([n % 251]) * size)
""")


def test_sigkill_at_random_moments_never_leaves_a_torn_file(tmp_path):
    """The reader sees a complete old or new file whenever the writer dies (8 kills at random moments)."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    target = tmp_path / "published.bin"
    size = 4 * 2**20
    rng = random.Random(0)
    survived = 0
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, str(script), str(target), str(size)], cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        time.sleep(0.3 + rng.random() * 0.7)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if target.exists():
            data = target.read_bytes()
            assert len(data) == size and data == bytes([data[0]]) * size, "torn file"
            survived += 1
    assert survived >= 1  # at least one kill landed after the first publication
    for leftover in tmp_path.glob(".published.bin.*.tmp"):
        leftover.unlink()  # temporaries of killed writers: hidden, never mistaken for the real file


def test_published_files_get_the_umask_mode_even_from_private_writers(tmp_path):
    """safetensors' save_file creates its file 0600; a published file gets what open() would give it under the
    process' umask, like every other output (ComfyUI users share output folders)."""
    script = textwrap.dedent(f"""
        import os, sys
        os.umask(0o027)
        sys.path.insert(0, {str(REPO)!r})
        import torch
        from safetensors.torch import save_file
        from trainer_core.util import write_text, write_with
        write_with({str(tmp_path / 'lokr.safetensors')!r},
                   lambda tmp: save_file({{"w": torch.zeros(2)}}, str(tmp)))
        write_text({str(tmp_path / 'run.json')!r}, "{{}}")
        open({str(tmp_path / 'plain.txt')!r}, "w").close()
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()}
    assert modes == {"lokr.safetensors": "0o640", "run.json": "0o640", "plain.txt": "0o640"}, modes
