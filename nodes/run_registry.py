"""Live record of training runs in this ComfyUI process, for the browser UI.

Each run gets an id; every step appends an event {step, total, loss, lr, load_balancing_loss, it_per_s, eta_s,
peak_memory_bytes, phase} and validation previews are listed as they are written. Every event is also pushed to
the browser as the custom websocket message `hidream_lokr.progress`. HTTP routes that serve `history()` (and take
commands) can be added on top of `REGISTRY` without touching the training node.
"""
from __future__ import annotations

import itertools
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

PROGRESS_EVENT = "hidream_lokr.progress"


@dataclass
class TrainingRun:
    run_id: str
    node_id: Optional[str]
    prompt_id: Optional[str]
    output_dir: Path
    total_steps: int
    started: float = field(default_factory=time.time)
    status: str = "running"  # running | finished | interrupted | failed
    events: list[dict] = field(default_factory=list)
    previews: list[dict] = field(default_factory=list)  # {step, path}

    def summary(self) -> dict:
        last = self.events[-1] if self.events else {}
        return {"run_id": self.run_id, "node": self.node_id, "prompt_id": self.prompt_id,
                "output_dir": str(self.output_dir), "total": self.total_steps, "status": self.status,
                "started": self.started, "step": last.get("step", 0), "loss": last.get("loss")}


class RunRegistry:
    """Thread-safe: the training runs on ComfyUI's execution thread, routes read from the event loop's."""

    def __init__(self) -> None:
        self._runs: dict[str, TrainingRun] = {}
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self._interrupted: dict[str, Path] = {}  # run key -> checkpoint a cancelled run left

    def start(self, node_id: Optional[str], prompt_id: Optional[str], output_dir: Path,
              total_steps: int) -> TrainingRun:
        run = TrainingRun(run_id=f"{next(self._counter)}-{uuid.uuid4().hex[:8]}", node_id=node_id,
                          prompt_id=prompt_id, output_dir=output_dir, total_steps=total_steps)
        with self._lock:
            self._runs[run.run_id] = run
        return run

    def record(self, run: TrainingRun, event: dict) -> dict:
        message = {"run_id": run.run_id, "node": run.node_id, "prompt_id": run.prompt_id, **event}
        with self._lock:
            run.events.append(event)
        _send(message)
        return message

    def add_preview(self, run: TrainingRun, step: int, path: Path) -> None:
        with self._lock:
            run.previews.append({"step": step, "path": str(path)})

    def finish(self, run: TrainingRun, status: str) -> None:
        with self._lock:
            run.status = status
        _send({"run_id": run.run_id, "node": run.node_id, "prompt_id": run.prompt_id, "phase": status,
               "step": run.events[-1]["step"] if run.events else 0, "total": run.total_steps})

    def remember_interrupted(self, key: str, checkpoint: Path) -> None:
        with self._lock:
            self._interrupted[key] = Path(checkpoint)

    def interrupted_checkpoint(self, key: str) -> Optional[Path]:
        with self._lock:
            path = self._interrupted.get(key)
        return path if path is not None and path.exists() else None

    def runs(self) -> list[dict]:
        with self._lock:
            return [r.summary() for r in self._runs.values()]

    def history(self, run_id: str) -> Optional[dict]:
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                return None
            return {**run.summary(), "events": list(run.events), "previews": list(run.previews)}


def _send(message: dict) -> None:
    try:
        from server import PromptServer
    except ImportError:  # outside a ComfyUI server (unit tests of the core): nobody to tell
        return
    server = PromptServer.instance
    server.send_sync(PROGRESS_EVENT, message, server.client_id)


REGISTRY = RunRegistry()
