"""ComfyUI's other output caches: a run continues exactly whatever ComfyUI dropped in between.

ComfyUI can keep no outputs between prompts (--cache-none), a few (--cache-lru N) or what RAM allows (--cache-ram,
the RAM-pressure cache, which 0.3.75 has: it sizes outputs by get_ram_usage(), newer releases by
_comfy_cache_tensors(); HIDREAM_MODEL has both). With each: queue 4 steps, let ComfyUI evict everything the prompt
made (the loaded model too), queue the same graph with 8 steps. The run continues from its step-4 checkpoint in
its own folder, its LoKr bit-identical to an unbroken 8-step run, and the on-disk text and latent caches are
reused as they are (no file written again): the pack's state lives on disk, not in ComfyUI's cache.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from comfy_server import ComfyServer, comfyui_dir, messages
from test_comfyui_resume import assert_same_lokr, graph

MODES = {"none": ("--cache-none",), "lru": ("--cache-lru", "1"), "ram": ("--cache-ram", "100000")}
LOADER = "1"


def small_graph(output_name: str, steps: int) -> dict:
    """test_comfyui_resume's graph (64 px, a checkpoint every 4 steps) without the nodes it does not need: the
    RAM-pressure cache sizes and evicts every cached output after every node (a full garbage collection each
    time), so each node costs seconds there. The Train node fills the text and latent caches itself."""
    g = graph(output_name, max_train_steps=steps)
    for node in ("3", "4", "7", "10", "11"):  # the cache nodes, Save (Train is an output itself), 2 settings nodes
        g.pop(node)
    for socket in ("optimizer_settings", "preview_settings"):
        g["6"]["inputs"].pop(socket)
    g["6"]["inputs"]["dataset"] = ["2", 0]
    return g


def _run(server: ComfyServer, prompt: dict) -> dict:
    entry = server.wait(server.submit(prompt))
    assert entry["status"]["status_str"] == "success", entry["status"]
    return entry


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """An unbroken 8-step run on a server of its own (default cache), started as the evicting ones are: the
    session's shared server has run other files' graphs by then, and what one of them leaves in the process
    must not decide whether two runs agree."""
    from safetensors.torch import load_file

    server = ComfyServer(tmp_path_factory.mktemp("comfyui-cache-reference"), comfyui_dir())
    server.start()
    try:
        _run(server, small_graph("cache_modes_reference", 8))
        (folder,) = sorted((server.output_dir() / "hidream_lokr").glob("cache_modes_reference_*"))
        return load_file(str(folder / "pytorch_lora_weights.safetensors"))
    finally:
        server.stop()


@pytest.mark.parametrize("mode", list(MODES))
def test_queue_evict_queue_again_continues_exactly_and_reuses_the_disk_caches(mode, reference, tmp_path_factory):
    server = ComfyServer(tmp_path_factory.mktemp(f"comfyui-cache-{mode}"), comfyui_dir(), extra_args=MODES[mode])
    server.start()
    try:
        _run(server, small_graph("evicted", 4))
        caches = server.output_dir() / "hidream_lokr" / "cache"
        cached_files = _files(caches)
        assert any("text" in name for name in cached_files) and any("latents" in name for name in cached_files)
        if mode == "lru":  # an unrelated prompt: the LRU cache (1 entry) drops the first prompt's outputs
            _run(server, {"1": {"class_type": "HiDreamLoKrConfig", "inputs": {
                "preset": "attention only", "factor": 4, "linear_dim": 16384, "linear_alpha": 1.0,
                "full_matrix": True, "use_scalar": False, "init_lokr_norm": 0.0, "custom_json": ""}},
                "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}})
        again = _run(server, small_graph("evicted", 8))

        cached = [n for data in messages(again, "execution_cached") for n in data["nodes"]]
        assert LOADER not in cached, cached  # ComfyUI had dropped the loaded model: it was loaded again
        (folder,) = sorted((server.output_dir() / "hidream_lokr").glob("evicted_*"))  # continued in place
        record = json.loads((folder / "run.json").read_text())
        assert record["status"] == "finished" and record["steps_done"] == 8
        assert record["resumed_from"].endswith("checkpoint-4"), record["resumed_from"]
        assert_same_lokr(folder, reference)
        assert _files(caches) == cached_files  # every embedding and latent read back, none written again
    finally:
        server.stop()
