"""The live view's server-side state (nodes/run_registry.py) without ComfyUI: the per-run command queue is
thread-safe, commands reach only the run they name, histories restore from any index.

run_registry imports nothing from ComfyUI (its websocket send is a no-op outside a server), so it is loaded here
without the nodes package's __init__, which needs ComfyUI.
"""
from __future__ import annotations

import importlib
import sys
import threading
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACK = "hidream_lokr_pack_without_comfyui"


@pytest.fixture()
def registry_module():
    """nodes/run_registry.py as `<pack>.nodes.run_registry` of a stand-in pack package whose `nodes` package is an
    empty module: the registry's relative import of the trainer core resolves, nodes/__init__ (ComfyUI) never
    runs."""
    pack = types.ModuleType(PACK)
    pack.__path__ = [str(REPO)]
    nodes = types.ModuleType(f"{PACK}.nodes")
    nodes.__path__ = [str(REPO / "nodes")]
    sys.modules[PACK], sys.modules[f"{PACK}.nodes"] = pack, nodes
    try:
        yield importlib.import_module(f"{PACK}.nodes.run_registry")
    finally:
        for name in [n for n in sys.modules if n == PACK or n.startswith(PACK + ".")]:
            del sys.modules[name]


def _run(registry, node_id="6"):
    return registry.start(node_id, "prompt-1", Path("/tmp/out"), 100)


def test_commands_reach_only_the_named_run(registry_module):
    registry = registry_module.RunRegistry()
    a, b = _run(registry), _run(registry, node_id="9")
    assert registry_module.RUN_ID_PATTERN.match(a.run_id) and a.run_id != b.run_id
    assert registry.command(a.run_id, "save") is True
    assert registry.command(a.run_id, "save") is False  # already waiting: one checkpoint, not two
    assert registry.command(a.run_id, "sample") is True
    assert b.commands.drain() == []
    assert a.commands.drain() == ["save", "sample"] and a.commands.drain() == []
    with pytest.raises(registry_module.RunNotFound):
        registry.command("999-deadbeef", "stop")
    with pytest.raises(ValueError, match="unknown command"):
        registry.command(a.run_id, "delete")
    registry.finish(b, "finished")
    with pytest.raises(registry_module.RunNotRunning, match="finished"):
        registry.command(b.run_id, "stop")


def test_queue_is_thread_safe_every_command_drained_once(registry_module):
    queue = registry_module.CommandQueue()
    drained: list[str] = []
    stop = threading.Event()

    def trainer():  # the training loop's side: drain at every "step boundary"
        while not stop.is_set():
            drained.extend(queue.drain())
        drained.extend(queue.drain())

    def browser(command):
        for _ in range(2000):
            queue.put(command)

    consumer = threading.Thread(target=trainer)
    consumer.start()
    producers = [threading.Thread(target=browser, args=(c,)) for c in registry_module.COMMANDS for _ in range(2)]
    for t in producers:
        t.start()
    for t in producers:
        t.join()
    stop.set()
    consumer.join()
    assert len(drained) == queue.accepted > 0  # nothing lost, nothing delivered twice
    assert set(drained) <= set(registry_module.COMMANDS)


def test_history_lists_runs_by_node_and_serves_events_from_an_index(registry_module):
    registry = registry_module.RunRegistry()
    first, second = _run(registry, node_id="6"), _run(registry, node_id="6")
    other = _run(registry, node_id="7")
    for step in range(1, 11):
        registry.record(second, {"step": step, "total": 100, "loss": 1.0 / step})
    registry.add_preview(second, 5, Path("/tmp/out/validation/step_000005.png"))
    registry.set_phase(second, "validating")
    assert [r["run_id"] for r in registry.runs_for("6")] == [first.run_id, second.run_id]
    assert [r["run_id"] for r in registry.runs_for("7")] == [other.run_id]
    history = registry.history(second.run_id, since=7)
    assert [e["step"] for e in history["events"]] == [8, 9, 10] and history["events_total"] == 10
    assert history["phase"] == "validating" and history["previews"] == [{"index": 0, "step": 5}]
    assert "path" not in history["previews"][0]  # the browser never sees server paths
    assert registry.preview_path(second.run_id, 0).name == "step_000005.png"
    assert registry.preview_path(second.run_id, 1) is None and registry.history("1-00000000") is None
