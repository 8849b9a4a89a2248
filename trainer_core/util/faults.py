"""Crash points for the crash-and-resume tests: `TRAINER_CORE_CRASH_AT=<point>[:<n>]` makes the process kill itself
with SIGKILL the n-th time (default 1st) it passes `<point>`, exactly as a power cut or the OOM killer would: no
exception handler, `finally` or atexit runs. Unset (always, outside those tests), a crash point costs one
environment lookup.

Points: text-cache-write, latent-cache-write (after the first entry of a fill is published), checkpoint-write
(checkpoint files written, manifest not yet), validation (after the first validation image), step (after an
optimizer update, before that step's checkpoint), lokr-save (before the final LoKr file).
"""
from __future__ import annotations

import os
import signal

ENV = "TRAINER_CORE_CRASH_AT"
_passes: dict[str, int] = {}


def crash_point(name: str) -> None:
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
