"""Run folders on disk, and what a queued training does with them: continue one, start a new one, or return one.

Every training the Train node starts lives in its own folder `output/hidream_lokr/<output_name>_NNNNN`
(paths.new_run_dir), recorded in `run.json` (RUN_RECORD):

    status        running | finished | stopped | interrupted | failed
    fingerprint   train_settings.run_fingerprint: model, images and captions, encoders, LoKr shape and every
                  setting that shapes what is learned (not the run's length, previews, checkpoints, memory
                  settings, output name or resume choice)
    session       the ComfyUI process that ran it last: a record still "running" from another session was cut short
                  (ComfyUI closed or killed) and counts as interrupted
    steps_done, total_steps, checkpoint (newest complete checkpoint), lokr, message (what to do next), error,
    cache_token (see cache_token), config (the TrainConfig as JSON, for the LoKr's metadata)

The record is written atomically when a run starts, ends, or fails, so after a crash or a restart the folder still
says what happened. `plan()` reads these records when a graph is queued:

    resume_from_checkpoint  what happens
    auto (default)          the newest run of this output_name with the same fingerprint is continued from its
                            newest complete checkpoint when it is unfinished (stopped, cancelled, failed, killed),
                            or when max_train_steps grew past a finished run; a finished run of exactly this
                            length is returned without training; otherwise a new run starts at step 0
    start over              a new run from step 0
    latest                  the newest complete checkpoint of any run of this output_name; continued in its own
                            folder when the fingerprint matches, else in a new folder (not an exact replay then)
    a checkpoint            (its folder relative to output/hidream_lokr, or a path) the same, from that checkpoint

Continuing in the same folder hands the core the same config apart from resume_from_checkpoint (and a longer
max_train_steps), which trainer_core resumes exactly.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .paths import inside_pack_output, pack_output_dir, run_folder_name, shown
from .train_settings import RESUME_AUTO, RESUME_LATEST, RESUME_START_OVER

logger = logging.getLogger(__name__)

RUN_RECORD = "run.json"
SESSION = uuid.uuid4().hex  # this ComfyUI process
UNFINISHED = ("stopped", "interrupted", "failed")
STATUSES = ("running", "finished", *UNFINISHED)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


# ------------------------------------------------------------------------------------------------ records

def read_record(folder: Path) -> dict:
    try:
        record = json.loads((Path(folder) / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def write_record(folder: Path, **changes) -> dict:
    """Update the folder's record with `changes` (atomically: a reader never sees half a file)."""
    from ..trainer_core.util import write_text

    record = {**read_record(folder), **changes, "updated": time.time()}
    write_text(Path(folder) / RUN_RECORD, json.dumps(record, indent=1, default=str))
    return record


def effective_status(record: dict) -> str:
    """The record's status, where a run still marked running by another ComfyUI process was interrupted."""
    status = record.get("status", "")
    if status == "running" and record.get("session") != SESSION:
        return "interrupted"
    return status


def run_folders(output_name: str) -> list[Path]:
    """The run folders of `output_name`, oldest first (by their number)."""
    root, name = pack_output_dir(), run_folder_name(output_name)
    pattern = re.compile(rf"{re.escape(name)}_(\d+)")
    found = []
    if root.is_dir():
        for entry in os.scandir(root):
            match = pattern.fullmatch(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), Path(entry.path)))
    return [p for _, p in sorted(found)]


def checkpoint_step(path: Path) -> Optional[int]:
    match = _CHECKPOINT.match(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoint_choices() -> list[str]:
    """Every checkpoint folder under output/hidream_lokr as `<run folder>/checkpoint-<step>`, newest run first,
    for the resume widget's list (not verified here: plan() verifies the one chosen)."""
    root = pack_output_dir()
    if not root.is_dir():
        return []
    found = []
    for run in os.scandir(root):
        if not run.is_dir() or not (Path(run.path) / RUN_RECORD).is_file():
            continue
        for child in os.scandir(run.path):
            step = checkpoint_step(Path(child.path))
            if step is not None and child.is_dir():
                found.append((run.name, step))
    return [f"{run}/checkpoint-{step}" for run, step in sorted(found, key=lambda x: (x[0], x[1]), reverse=True)]


def newest_checkpoint(folder: Path, max_step: Optional[int] = None) -> Optional[Path]:
    """The newest complete checkpoint in a run folder (at most `max_step`), verified against its manifest."""
    from ..trainer_core.training import list_checkpoints, verify_checkpoint

    for checkpoint in reversed(list_checkpoints(folder)):
        if max_step is not None and checkpoint_step(checkpoint) > max_step:
            continue
        problem = verify_checkpoint(checkpoint)
        if problem is None:
            return checkpoint
        logger.warning("HiDream LoKr: skipping %s: %s", checkpoint, problem)
    return None


# ------------------------------------------------------------------------------------------------ the plan

@dataclass(frozen=True)
class Plan:
    """What a queued training does. action: "new" (a new folder; from `checkpoint` when given, else step 0),
    "continue" (train on in `folder` from `checkpoint`), "return" (the finished run in `folder`, no training)."""

    action: str
    folder: Optional[Path] = None
    checkpoint: Optional[Path] = None
    reason: str = ""

    @property
    def resumes(self) -> bool:
        return self.checkpoint is not None


def _resolve_checkpoint_choice(choice: str) -> Path:
    from ..trainer_core.config import ConfigError
    from ..trainer_core.training import verify_checkpoint

    path = inside_pack_output(choice, "resume_from_checkpoint")  # refuses paths outside the pack's runs
    if checkpoint_step(path) is None or not path.is_dir():
        raise ConfigError(f"resume_from_checkpoint {shown(choice)}: no checkpoint folder {path}. Choose auto, "
                          f"start over, latest, or one of the listed checkpoints (<run folder>/checkpoint-<step> under "
                          f"{pack_output_dir()})")
    problem = verify_checkpoint(path)
    if problem:
        raise ConfigError(f"resume_from_checkpoint {shown(choice)}: {path} is not a complete checkpoint ({problem}); "
                          "choose another one, or auto")
    return path


def _from_checkpoint(checkpoint: Path, fingerprint: str, why: str) -> Plan:
    folder = checkpoint.parent
    if read_record(folder).get("fingerprint") == fingerprint:
        return Plan("continue", folder, checkpoint, why)
    return Plan("new", None, checkpoint, why + " (its run had other settings: training continues from its weights "
                                              "and state in a new folder, not as an exact replay)")


def plan(output_name: str, fingerprint: str, choice: str, max_train_steps: int) -> Plan:
    choice = (choice or "").strip() or RESUME_AUTO  # "" was the earlier text box's "no resume"
    if choice in (RESUME_START_OVER, "none", "new"):
        return Plan("new", reason="resume_from_checkpoint is 'start over'")
    if choice == RESUME_LATEST:
        newest = None
        for folder in run_folders(output_name):
            checkpoint = newest_checkpoint(folder)
            if checkpoint is not None:
                stamp = (checkpoint / "manifest.json").stat().st_mtime
                if newest is None or stamp > newest[0]:
                    newest = (stamp, checkpoint)
        if newest is None:
            return Plan("new", reason=f"no run of {output_name!r} has a complete checkpoint yet")
        return _from_checkpoint(newest[1], fingerprint, f"latest: {newest[1].parent.name}/{newest[1].name}")
    if choice != RESUME_AUTO:
        checkpoint = _resolve_checkpoint_choice(choice)
        return _from_checkpoint(checkpoint, fingerprint, f"resume_from_checkpoint {choice}")

    for folder in reversed(run_folders(output_name)):
        record = read_record(folder)
        if record.get("fingerprint") != fingerprint:
            continue
        status = effective_status(record)
        done = int(record.get("steps_done") or 0)
        if status == "finished":
            lokr = Path(record.get("lokr") or folder / "pytorch_lora_weights.safetensors")
            if done == max_train_steps and lokr.is_file():
                return Plan("return", folder, reason=f"{folder.name} already finished these {done} steps")
            if done > max_train_steps:
                return Plan("new", reason=f"{folder.name} trained {done} steps, more than max_train_steps "
                                          f"{max_train_steps}")
        elif status not in UNFINISHED:
            continue  # running in this process: another graph's run (ComfyUI runs one prompt at a time)
        checkpoint = newest_checkpoint(folder, max_train_steps)
        if checkpoint is None:
            return Plan("new", reason=f"{folder.name} ({status}) left no complete checkpoint")
        return Plan("continue", folder, checkpoint,
                    f"{folder.name} was {status} at step {done}" if status != "finished" else
                    f"{folder.name} finished {done} steps; max_train_steps is now {max_train_steps}")
    return Plan("new", reason=f"no earlier run of {output_name!r} with these settings")


def cache_token(output_name: str) -> str:
    """What ComfyUI's output cache keys the Train node on besides its inputs (fingerprint_inputs).

    A run that ended unfinished (Stop & save, Cancel, an error, ComfyUI closed) changes the token, so an unchanged
    re-queue executes the node again, which continues the run instead of ComfyUI serving the stopped run's outputs.
    A finished run returns the token its last execution started under, so re-queueing a finished graph is served
    from the cache as usual (nothing runs twice downstream)."""
    folders = run_folders(output_name)
    if not folders:
        return "none"
    record = read_record(folders[-1])
    status = effective_status(record)
    if status == "finished" and record.get("cache_token"):
        return str(record["cache_token"])
    return f"{status or 'unknown'}:{folders[-1].name}:{record.get('steps_done', 0)}"


# ------------------------------------------------------------------------------------------------ messages

def status_message(status: str, folder: Path, steps_done: int, total_steps: int,
                   checkpoint: Optional[Path] = None, error: str = "") -> str:
    """What a person reads when a run ends: what happened and the one action that continues."""
    where = folder.name
    at = f"step {steps_done} of {total_steps}"
    if status == "finished":
        return (f"Finished {where}: {total_steps} steps. The LoKr is saved. Queueing this graph again returns it "
                f"without training; raise max_train_steps to train it further, or set resume_from_checkpoint to "
                f"'start over' for a new run.")
    if checkpoint is not None:
        keep = f"checkpoint-{checkpoint_step(checkpoint)} is saved in {where}"
        again = f"Queue again to continue from step {checkpoint_step(checkpoint)}"
    else:
        keep, again = f"no checkpoint was written in {where}", "Queue again to start from step 0"
    if status == "stopped":
        return f"Stopped early at {at} (Stop & save): the LoKr so far and {keep}. {again}."
    if status == "interrupted":
        return f"Cancelled at {at}: the LoKr so far and {keep}. {again}."
    return f"Failed at {at}: {error or 'see the console'}. {keep[0].upper() + keep[1:]}. Fix the cause, then: {again}."
