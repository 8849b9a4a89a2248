"""Scalar and image logs: a JSONL file always (compare runs without any viewer), TensorBoard when asked.

Both live in `<output_dir>/logs/<tracker_run_name>/`; the JSONL file is `scalars.jsonl`, one
`{"step": N, "name": value, ...}` record per line. A resumed run drops the records past its resume step first,
so the log reads like one uninterrupted run.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from ..util.atomic import write_text

logger = logging.getLogger(__name__)


def _record_step(line: str) -> Optional[int]:
    """The step of one JSONL record; None for a line a crash cut short."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return None


class RunLog:
    """`enabled=False` (ranks other than 0 of a multi-process run) makes every method a no-op."""

    def __init__(self, folder: Path, tensorboard: bool, resume_step: Optional[int] = None, enabled: bool = True):
        self.folder = Path(folder)
        self.jsonl_path = self.folder / "scalars.jsonl"
        self._jsonl = self._tb = None
        if not enabled:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.jsonl_path.is_file():
            kept = [line for line in self.jsonl_path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and (_record_step(line) or 0) <= resume_step and _record_step(line) is not None]
            write_text(self.jsonl_path, "".join(line + "\n" for line in kept))
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self._tb = SummaryWriter(log_dir=str(self.folder), purge_step=purge)

    def scalars(self, step: int, values: dict[str, Optional[float]]) -> None:
        if self._jsonl is None:
            return
        present = {k: float(v) for k, v in values.items() if v is not None}
        self._jsonl.write(json.dumps({"step": step, **present}) + "\n")
        self._jsonl.flush()
        if self._tb:
            for name, value in present.items():
                self._tb.add_scalar(name, value, step)

    def image(self, tag: str, step: int, image: Image.Image) -> None:
        if self._tb:
            self._tb.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if self._jsonl is None:
            return
        self._jsonl.close()
        if self._tb:
            self._tb.close()
