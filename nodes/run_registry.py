"""Live record of training runs in this ComfyUI process, for the browser UI.

Each run gets an id; every step appends an event {step, total, loss, lr, load_balancing_loss, it_per_s, eta_s,
peak_memory_bytes, phase} and validation previews are listed as they are written. Every event is also pushed to
the browser as the custom websocket message `hidream_lokr.progress`; phase changes, new previews, notes for the
person watching, a resume and the end are pushed too (messages with `kind` "phase" / "preview" / "message" /
"resumed" / "finished"; per-step messages have no `kind`). A run resumed from a checkpoint starts with the
checkpoint's loss history as events (marked `"history": true`), so its chart is whole from step 1.

Statuses: running, then finished (every step done), stopped (Stop & save), interrupted (Cancel) or failed; `message`
says what happened and the one action that continues (run_store.status_message).

The browser's buttons (routes.py) put commands into a run's CommandQueue; the training loop drains it at step
boundaries through TrainingCallbacks.poll_commands. The queue is the only thing the HTTP side may change in a run.
"""
from __future__ import annotations

import collections
import itertools
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..trainer_core.training import COMMANDS  # what the browser may ask a running training for

PROGRESS_EVENT = "hidream_lokr.progress"
STATUSES = ("running", "finished", "stopped", "interrupted", "failed")
COMMAND_PHASE = "training"  # commands act at step boundaries: the view offers them while the run is training
RUN_ID_PATTERN = re.compile(r"^[0-9]{1,9}-[0-9a-f]{8}$")  # the shape of the ids RunRegistry.start makes


class CommandQueue:
    """Commands from the browser for one run, thread-safe: routes put on the server's event loop, the training
    loop drains on ComfyUI's execution thread. A command already waiting is not queued twice (two clicks on
    Save before the next step boundary make one checkpoint, not two)."""

    MAX_PENDING = len(COMMANDS)

    def __init__(self) -> None:
        self._pending: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()
        self.accepted = 0  # how many commands were queued over the run's life (for the UI's and tests' benefit)

    def put(self, command: str) -> bool:
        """Queue `command` (one of COMMANDS); False when the same command is already waiting."""
        if command not in COMMANDS:
            raise ValueError(f"unknown command {command!r}: expected one of {', '.join(COMMANDS)}")
        with self._lock:
            if command in self._pending:
                return False
            self._pending.append(command)
            self.accepted += 1
            return True

    def drain(self) -> list[str]:
        """Every waiting command, oldest first, and an empty queue (TrainingCallbacks.poll_commands)."""
        with self._lock:
            commands = list(self._pending)
            self._pending.clear()
            return commands

    def pending(self) -> list[str]:
        with self._lock:
            return list(self._pending)


class RunNotFound(KeyError):
    pass


class RunNotRunning(RuntimeError):
    pass


@dataclass
class TrainingRun:
    run_id: str
    node_id: Optional[str]
    prompt_id: Optional[str]
    output_dir: Path
    total_steps: int
    started: float = field(default_factory=time.time)
    status: str = "running"  # one of STATUSES
    events: list[dict] = field(default_factory=list)
    previews: list[dict] = field(default_factory=list)  # {step, path}
    phase: str = "starting"  # the latest phase the training reported (caching text, training, saving, ...)
    message: str = ""  # for the person watching: what is happening, or how the run ended and what to do next
    resumed_from_step: Optional[int] = None  # the checkpoint step this run continued from
    commands: CommandQueue = field(default_factory=CommandQueue, repr=False)

    def summary(self) -> dict:
        last = self.events[-1] if self.events else {}
        return {"run_id": self.run_id, "node": self.node_id, "prompt_id": self.prompt_id,
                "output_dir": str(self.output_dir), "run_folder": self.output_dir.name, "total": self.total_steps,
                "status": self.status, "started": self.started, "step": last.get("step", 0),
                "loss": last.get("loss"), "phase": self.phase, "message": self.message,
                "resumed_from_step": self.resumed_from_step,
                "accepts_commands": self.status == "running" and self.phase == COMMAND_PHASE,
                "events_total": len(self.events), "previews_total": len(self.previews),
                "pending_commands": self.commands.pending()}


class RunRegistry:
    """Thread-safe: the training runs on ComfyUI's execution thread, routes read from the event loop's."""

    def __init__(self) -> None:
        self._runs: dict[str, TrainingRun] = {}
        self._lock = threading.Lock()
        self._counter = itertools.count(1)

    def start(self, node_id: Optional[str], prompt_id: Optional[str], output_dir: Path,
              total_steps: int) -> TrainingRun:
        run = TrainingRun(run_id=f"{next(self._counter)}-{uuid.uuid4().hex[:8]}", node_id=node_id,
                          prompt_id=prompt_id, output_dir=output_dir, total_steps=total_steps)
        with self._lock:
            self._runs[run.run_id] = run
        return run

    def _header(self, run: TrainingRun) -> dict:
        return {"run_id": run.run_id, "node": run.node_id, "prompt_id": run.prompt_id}

    def record(self, run: TrainingRun, event: dict) -> dict:
        message = {**self._header(run), **event}
        with self._lock:
            run.events.append(event)
        _send(message)
        return message

    def resumed(self, run: TrainingRun, step: int, losses: list[float], message: str, kind: str = "resumed") -> None:
        """The run continues from a checkpoint at `step` (kind "resumed"), or is a finished run returned without
        training (kind "returned"): its loss history up to there becomes the first events (the browser fetches
        them with the history route when it sees the message)."""
        history = [{"step": i + 1, "loss": float(loss), "total": run.total_steps, "history": True}
                   for i, loss in enumerate(losses[:step])]
        with self._lock:
            run.events[:0] = history
            run.resumed_from_step = step if kind == "resumed" else None
            run.message = message
        _send({**self._header(run), "kind": kind, "step": step, "total": run.total_steps,
               "history_points": len(history), "message": message})

    def note(self, run: TrainingRun, message: str) -> None:
        """A line for the person watching (shown on the node until the next one)."""
        with self._lock:
            run.message = message
            step = run.events[-1]["step"] if run.events else 0
        _send({**self._header(run), "kind": "message", "message": message, "step": step, "total": run.total_steps,
               "phase": run.phase})

    def add_preview(self, run: TrainingRun, step: int, path: Path) -> None:
        with self._lock:
            run.previews.append({"step": step, "path": str(path)})
            index = len(run.previews) - 1
        _send({**self._header(run), "kind": "preview", "preview": {"index": index, "step": step},
               "total": run.total_steps})

    def set_phase(self, run: TrainingRun, phase: str) -> None:
        """The training entered `phase`: remember it (a reloaded page shows it) and tell the browser now, since
        caching phases can last long before the first step event."""
        with self._lock:
            run.phase = phase
            step = run.events[-1]["step"] if run.events else 0
        _send({**self._header(run), "kind": "phase", "phase": phase, "step": step, "total": run.total_steps,
               "accepts_commands": phase == COMMAND_PHASE})

    def finish(self, run: TrainingRun, status: str, message: str = "") -> None:
        if status not in STATUSES[1:]:
            raise ValueError(f"unknown end status {status!r}")
        with self._lock:
            run.status = status
            run.phase = status
            run.message = message or run.message
        _send({**self._header(run), "phase": status, "step": run.events[-1]["step"] if run.events else 0,
               "total": run.total_steps, "kind": "finished", "status": status, "message": run.message,
               "run_folder": run.output_dir.name})

    def runs(self) -> list[dict]:
        with self._lock:
            return [r.summary() for r in self._runs.values()]

    def history(self, run_id: str, since: int = 0) -> Optional[dict]:
        """The run's summary with its events from index `since` on (the whole history by default) and its
        previews (step and index; the image itself is served by index, never by a path from the browser)."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                return None
            return {**run.summary(), "since": since, "events": run.events[since:],
                    "previews": [{"index": i, "step": p["step"]} for i, p in enumerate(run.previews)]}

    def get(self, run_id: str) -> Optional[TrainingRun]:
        with self._lock:
            return self._runs.get(run_id)

    def preview_path(self, run_id: str, index: int) -> Optional[Path]:
        with self._lock:
            run = self._runs.get(run_id)
            if run is None or not 0 <= index < len(run.previews):
                return None
            return Path(run.previews[index]["path"])

    def runs_for(self, node_id: Optional[str] = None, prompt_id: Optional[str] = None) -> list[dict]:
        """Summaries of the runs of one node (and/or prompt), oldest first; every run when both are None."""
        with self._lock:
            return [r.summary() for r in self._runs.values()
                    if (node_id is None or r.node_id == node_id) and (prompt_id is None or r.prompt_id == prompt_id)]

    def command(self, run_id: str, command: str) -> bool:
        """Queue a browser command for the named run only. Raises RunNotFound, RunNotRunning (finished runs take
        no commands), ValueError (not one of COMMANDS). False: that command already waits."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                raise RunNotFound(run_id)
            if run.status != "running":
                raise RunNotRunning(f"run {run_id} is {run.status}: it takes no more commands")
        return run.commands.put(command)


def _send(message: dict) -> None:
    try:
        from .compat import send_event
    except ImportError:  # outside ComfyUI (the core's unit tests): nobody to tell
        return
    send_event(PROGRESS_EVENT, message)

REGISTRY = RunRegistry()
