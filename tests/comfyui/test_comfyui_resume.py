"""Resume by run name through a real ComfyUI server: queueing the same graph again continues an unfinished run,
exactly, whether it ended with Stop & save, or Cancel and a ComfyUI restart, or a killed ComfyUI; a finished run is
returned without training, also after a restart; `start over` and `latest` do what they say. (Errors take the
same path as a cancel: test_comfyui_train_node.py checks the decision for every status on disk.)

This module runs its own server (it restarts and kills it), with the tiny demo graph cut down to dataset -> caches
-> train -> save: 12 steps at 64 px, no previews, a checkpoint every 4 steps. "Exactly" is checked against an
unbroken run of the same settings: the LoKr weights are bit-identical.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests
from safetensors.torch import load_file

from comfy_server import ComfyServer, EventListener, comfyui_dir, load_graph, messages

TRAIN, SAVE = "6", "7"
STEPS = 12


def graph(output_name: str, **train) -> dict:
    g = load_graph("hidream_lokr_tiny_demo_api.json")
    g.pop("8"), g.pop("9")  # no sampling afterwards
    g["2"]["inputs"]["resolution"] = 64  # the mechanics of resuming, at a quarter of the template's tokens
    g[TRAIN]["inputs"].update({"max_train_steps": STEPS, "validation_prompt": "", "output_name": output_name, **train})
    g["12"]["inputs"].update(checkpoint_step_interval=4, checkpoints_total_limit=0)
    return g


class Session:
    """The module's server, which tests restart or kill; a websocket listener on whichever server is up."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.server: ComfyServer | None = None
        self.events: EventListener | None = None

    def start(self) -> None:
        self.server = ComfyServer(self.base, comfyui_dir()).start()
        self.events = EventListener(self.server)

    def stop(self, kill: bool = False) -> None:
        self.events.close()
        if kill:
            self.server.process.kill()
            self.server.process.wait(timeout=30)
        self.server.stop()

    def restart(self, kill: bool = False) -> None:
        self.stop(kill)
        self.start()

    def progress(self, prompt_id: str) -> list[dict]:
        return [e for e in self.events.of("hidream_lokr.progress") if e.get("prompt_id") == prompt_id]

    def wait_step(self, prompt_id: str, step: int) -> None:
        self.events.wait_for(lambda kind, d: kind == "hidream_lokr.progress" and d.get("prompt_id") == prompt_id
                             and "loss" in d and d["step"] >= step, timeout=300)

    def run(self, g: dict) -> tuple[str, dict]:
        prompt_id = self.server.submit(g)
        return prompt_id, self.server.wait(prompt_id)

    def folders(self, name: str) -> list[Path]:
        return sorted((self.server.output_dir() / "hidream_lokr").glob(f"{name}_*"))

    def run_id(self, prompt_id: str) -> str:
        deadline = time.time() + 60
        while time.time() < deadline:
            runs = self.server.get(f"/hidream_lokr/runs?prompt_id={prompt_id}")["runs"]
            if runs:
                return runs[-1]["run_id"]
            time.sleep(0.2)
        raise TimeoutError("no run for the prompt")


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    s = Session(tmp_path_factory.mktemp("comfyui-resume"))
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(session) -> dict:
    """An unbroken run: what every resumed run must end with, bit for bit."""
    _, entry = session.run(graph("reference"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    (folder,) = session.folders("reference")
    return load_file(str(folder / "pytorch_lora_weights.safetensors"))


def record(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


def assert_same_lokr(folder: Path, reference: dict) -> None:
    import torch

    got = load_file(str(folder / "pytorch_lora_weights.safetensors"))
    assert got.keys() == reference.keys()
    different = [k for k in got if not torch.equal(got[k], reference[k])]
    assert not different, f"{len(different)} tensors differ from the unbroken run, e.g. {different[:3]}"


def assert_resumed(session: Session, prompt_id: str, at: int) -> None:
    progress = session.progress(prompt_id)
    resumed = [e for e in progress if e.get("kind") == "resumed"]
    assert resumed and resumed[0]["step"] == at and resumed[0]["history_points"] == at, resumed
    assert f"Resumed from step {at}" in resumed[0]["message"]
    steps = [e["step"] for e in progress if "loss" in e]
    assert steps == list(range(at + 1, STEPS + 1)), steps
    # The live view's history has the whole run: the checkpoint's losses, then the new steps.
    history = session.server.get(f"/hidream_lokr/runs/{session.run_id(prompt_id)}")
    assert [e["step"] for e in history["events"]] == list(range(1, STEPS + 1))
    assert [bool(e.get("history")) for e in history["events"]] == [True] * at + [False] * (STEPS - at)
    assert history["resumed_from_step"] == at and history["status"] == "finished"


def test_stop_and_save_then_the_same_graph_again_continues_exactly(session, reference):
    g = graph("stop_requeue")
    prompt_id = session.server.submit(g)
    session.wait_step(prompt_id, 5)
    run_id = session.run_id(prompt_id)
    requests.post(f"{session.server.url}/hidream_lokr/runs/{run_id}/command", json={"command": "stop"},
                  timeout=30).raise_for_status()
    entry = session.server.wait(prompt_id)
    assert entry["status"]["status_str"] == "success"
    (summary,) = entry["outputs"][TRAIN]["hidream_lokr_run"]
    (folder,) = session.folders("stop_requeue")
    stopped = record(folder)
    at = stopped["steps_done"]
    assert summary["status"] == stopped["status"] == "stopped" and 5 <= at < STEPS
    assert f"Stopped early at step {at} of {STEPS}" in summary["message"]
    assert f"Queue again to continue from step {at}" in summary["message"]
    assert (folder / f"checkpoint-{at}" / "manifest.json").is_file()

    again, entry = session.run(g)  # unchanged: ComfyUI's cache must not answer with the stopped run
    assert entry["status"]["status_str"] == "success", entry["status"]
    cached = messages(entry, "execution_cached")[0]["nodes"]
    assert TRAIN not in cached and "1" in cached  # the model loader is still served from the cache
    assert session.folders("stop_requeue") == [folder]  # the same run, continued in its folder
    assert_resumed(session, again, at)
    assert record(folder)["status"] == "finished" and record(folder)["steps_done"] == STEPS
    assert_same_lokr(folder, reference)

    third, entry = session.run(g)  # finished: now the cache answers, nothing runs twice
    assert set(messages(entry, "execution_cached")[0]["nodes"]) >= {TRAIN, SAVE}
    assert not session.progress(third)


def test_cancel_then_a_killed_comfyui_then_the_same_graphs_continue_exactly(session, reference):
    """One graph cancelled, another running when ComfyUI is killed; after the restart each, queued again,
    continues where it was saved (the cancel's checkpoint, the last periodic one) and ends as the unbroken run."""
    cancel_graph = graph("cancel_restart")
    prompt_id = session.server.submit(cancel_graph)
    session.wait_step(prompt_id, 5)
    session.server.interrupt()
    entry = session.server.wait(prompt_id)
    assert messages(entry, "execution_interrupted"), entry["status"]
    (cancelled,) = session.folders("cancel_restart")
    record_at_cancel = record(cancelled)
    at = record_at_cancel["steps_done"]
    assert record_at_cancel["status"] == "interrupted" and f"Cancelled at step {at}" in record_at_cancel["message"]

    killed_graph = graph("killed")
    prompt_id = session.server.submit(killed_graph)
    session.wait_step(prompt_id, 6)  # checkpoint-4 is written
    (killed,) = session.folders("killed")
    session.restart(kill=True)
    assert record(killed)["status"] == "running"  # what the killed process left; it counts as interrupted
    checkpoints = sorted(int(p.name.split("-")[1]) for p in killed.glob("checkpoint-*")
                         if (p / "manifest.json").is_file())

    again, entry = session.run(cancel_graph)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert session.folders("cancel_restart") == [cancelled]
    assert_resumed(session, again, at)
    assert_same_lokr(cancelled, reference)

    again, entry = session.run(killed_graph)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert session.folders("killed") == [killed]
    assert_resumed(session, again, checkpoints[-1])
    assert_same_lokr(killed, reference)


def test_a_finished_run_is_returned_without_training_after_a_restart(session, reference):
    (folder,) = session.folders("reference")
    before = record(folder)
    prompt_id, entry = session.run(graph("reference"))  # a fresh server: nothing cached, so the node runs
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert session.folders("reference") == [folder] and record(folder)["updated"] == before["updated"]
    progress = session.progress(prompt_id)
    assert not [e for e in progress if "loss" in e]  # no training step
    (summary,) = entry["outputs"][TRAIN]["hidream_lokr_run"]
    assert summary["status"] == "finished" and summary["message"].startswith("Already trained")
    (saved,) = entry["outputs"][SAVE]["text"]
    assert load_file(str(session.server.output_dir() / "loras" / saved)).keys() == reference.keys()


def test_start_over_trains_a_new_run_and_latest_continues_the_newest_checkpoint_of_the_name(session, reference):
    prompt_id, entry = session.run(graph("reference", resume_from_checkpoint="start over"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    first, second = session.folders("reference")
    assert [e["step"] for e in session.progress(prompt_id) if "loss" in e][0] == 1
    assert_same_lokr(second, reference)  # the same settings from step 0: the same LoKr

    # latest with other settings: the newest complete checkpoint of any run named "stop_requeue", continued in
    # a new folder (auto would start from step 0, since no run with these settings exists).
    (stopped,) = session.folders("stop_requeue")
    newest = max((p for p in stopped.glob("checkpoint-*")), key=lambda p: (p / "manifest.json").stat().st_mtime)
    at = int(newest.name.split("-")[1])
    g = graph("stop_requeue", resume_from_checkpoint="latest", learning_rate=0.005, max_train_steps=STEPS + 4)
    prompt_id, entry = session.run(g)
    assert entry["status"]["status_str"] == "success", entry["status"]
    old, new = session.folders("stop_requeue")
    assert old == stopped and record(new)["resumed_from"] == str(newest)
    steps = [e["step"] for e in session.progress(prompt_id) if "loss" in e]
    assert steps == list(range(at + 1, STEPS + 5)), steps
    print(f"\nlatest continued {newest.parent.name}/{newest.name} in {new.name}")
