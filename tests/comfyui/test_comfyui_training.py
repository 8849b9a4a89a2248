"""The tiny demo workflow through a real ComfyUI server: train, save, sample, cache, errors, interrupt.

Tests in this module share one server and run in order: the first trains (and builds the tiny model), the
following ones reuse its caches and ComfyUI's output cache.
"""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from comfy_server import REPO, load_graph, messages
from ui_workflow import template_path

sys.path.insert(0, str(REPO))  # trainer_core, to check the saved files with the core's own loader

DEMO = "hidream_lokr_tiny_demo_api.json"
TRAIN = "6"
STEPS = 400  # the template as shipped: the demo's 400 steps at 128 px, previews at steps 0, 200 and 400
DEMO_WORKFLOW = json.loads(template_path("hidream_lokr_tiny_demo").read_text())


def lora_files(comfy) -> list[Path]:
    return sorted((comfy.output_dir() / "loras").rglob("*.safetensors"))


def run_dirs(comfy, name: str) -> list[Path]:
    return sorted((comfy.output_dir() / "hidream_lokr").glob(f"{name}_*"))


def error_text(entry: dict) -> str:
    errors = messages(entry, "execution_error")
    assert errors, f"expected an execution error, got {entry['status']}"
    return errors[0]["exception_message"]


def run_record(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


def wait_for_run_end(events, prompt_id: str) -> dict:
    """The run's end event. /history can answer before the websocket has delivered a run's last events: a test
    that reads the progress list waits for this first."""
    return events.wait_for(lambda kind, d: kind == "hidream_lokr.progress" and d.get("prompt_id") == prompt_id
                           and d.get("phase") in ("finished", "failed", "interrupted"), timeout=60)


@pytest.fixture(scope="module")
def demo_run(comfy, events):
    started = time.time()
    binary_before = len(events.binary_types)
    prompt_id = comfy.submit(load_graph(DEMO), workflow=DEMO_WORKFLOW)  # as the browser sends it
    entry = comfy.wait(prompt_id)
    seconds = time.time() - started
    print(f"\ntiny demo workflow end to end: {seconds:.1f} s")
    wait_for_run_end(events, prompt_id)
    return prompt_id, entry, events.binary_types[binary_before:]


def test_demo_trains_saves_a_loadable_lokr_and_samples(comfy, events, demo_run):
    import torch
    from trainer_core.adapters import load_lokr
    from trainer_core.hidream import load_transformer, resolve_model_paths

    prompt_id, entry, binary = demo_run
    assert entry["status"]["status_str"] == "success", entry["status"]
    (saved,) = lora_files(comfy)
    assert entry["outputs"]["7"]["text"] == [saved.relative_to(comfy.output_dir() / "loras").as_posix()]
    with safe_open(str(saved), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert any(k.startswith("lycoris_") and k.endswith(".lokr_w1") for k in keys)
    assert json.loads(meta["training_config"])["max_train_steps"] == STEPS
    assert json.loads(meta["lycoris_config"])["factor"] == 2
    assert meta["steps"] == str(STEPS)
    assert json.loads(meta["workflow"]) == DEMO_WORKFLOW  # the graph that made it travels with the file
    assert json.loads(meta["prompt"])[TRAIN]["class_type"] == "HiDreamLoKrTrain"
    # The LoKr learned something and loads onto the transformer it was trained for.
    model_dir = comfy.base_dir / "models" / "diffusers" / "tiny-hidream"
    transformer = load_transformer(resolve_model_paths(model_dir), dtype=torch.float32)
    network = load_lokr(saved, transformer)
    in_file = {key.rsplit(".", 1)[0] for key in keys if key.startswith("lycoris_")}
    # every module of the file wrapped: the demo preset's Linears of the drawing model (4 double + 1 single block)
    assert len(network.loras) == len(in_file) == 63
    assert max(float(l.lokr_w2.detach().abs().max()) for l in network.loras) > 0

    # The Train node shows nothing of ComfyUI's own below its live view (no image previews, no progress text): it
    # reports its run in its own ui entry, and its images are outputs for graphs that want them.
    assert set(entry["outputs"][TRAIN]) == {"hidream_lokr_run"}
    (summary,) = entry["outputs"][TRAIN]["hidream_lokr_run"]
    assert summary["status"] == "finished" and summary["steps"] == STEPS and summary["run_folder"] == "tiny_demo_00001"
    assert "Queueing this graph again returns it" in summary["message"]
    assert binary == []  # no preview images pushed to ComfyUI's node preview
    run = comfy.output_dir() / "hidream_lokr" / "tiny_demo_00001"
    record = run_record(run)
    assert record["status"] == "finished" and record["steps_done"] == STEPS and record["fingerprint"]
    plain = (run / "lycoris_config.json").stat().st_mode & 0o777  # written with open(): the server's umask
    for lokr in (saved, run / "pytorch_lora_weights.safetensors"):
        assert lokr.stat().st_mode & 0o777 == plain, (lokr, oct(lokr.stat().st_mode))
    (sample,) = entry["outputs"]["9"]["images"]
    assert Image.open(comfy.base_dir / "temp" / sample["filename"]).size == (128, 128)

    progress = [e for e in events.of("hidream_lokr.progress") if e.get("prompt_id") == prompt_id]
    steps = [e["step"] for e in progress if "loss" in e]
    assert steps == list(range(1, STEPS + 1))
    last = [e for e in progress if "loss" in e][-1]
    assert last["total"] == STEPS and last["node"] == TRAIN and last["it_per_s"] > 0 and last["peak_memory_bytes"] > 0
    assert last["eta_s"] == 0 and np.isfinite(last["loss"]) and last["lr"] == pytest.approx(0.006)
    assert progress[-1]["phase"] == "finished"
    bar = [e for e in events.of("progress") if e.get("prompt_id") == prompt_id and e.get("node") == TRAIN]
    assert bar and bar[-1]["value"] == STEPS and bar[-1]["max"] == STEPS
    previews = [e for e in progress if e.get("kind") == "preview"]
    assert [e["preview"]["step"] for e in previews] == [0, 200, 400]
    assert "unloaded ComfyUI's models;" in comfy.log() and "GiB free on cpu" in comfy.log()
    # Third-party chatter stays out of the console: no LyCORIS INFO lines, no transformers progress bars.
    assert "[LyCORIS]" not in comfy.log() and "Loading weights" not in comfy.log()
    assert "Writing model shards" not in comfy.log()


def test_demo_previews_and_sample_show_the_new_concept(comfy, demo_run):
    """What a person watches in the node: the previews of "a zorb on a blue background" show a pink ring with its
    hole (none at step 0, the base model), and the sampler draws one in a place the dataset never showed it
    (yellow, at the bottom). The measures are the core demo's (trainer_core.demo.ConceptCoverage)."""
    from trainer_core.demo import concept_coverage
    from trainer_core.training.validation import validation_folder_step, validation_image_path

    _, entry, _ = demo_run
    run = comfy.output_dir() / "hidream_lokr" / "tiny_demo_00001" / "validation"
    previews = {validation_folder_step(folder): Image.open(validation_image_path(folder, "validation", 128, 128))
                for folder in sorted(run.glob("step_*"))}
    shares = {step: concept_coverage(picture, "blue") for step, picture in previews.items()}
    (sample,) = entry["outputs"]["9"]["images"]
    sampled = concept_coverage(Image.open(comfy.base_dir / "temp" / sample["filename"]), "yellow", "bottom")
    print(f"\nComfyUI demo: previews (ring drawn in pink, in pink itself, background in its hole) "
          f"{ {step: (round(c.ring, 3), round(c.pink, 3), round(c.hole, 3)) for step, c in shares.items()} }; "
          f"the sampler's unseen place {sampled}")
    assert list(shares) == [0, 200, 400]
    assert shares[0].pink <= 0.08 and shares[0].ring <= 0.3
    assert shares[400].ring >= 0.6 and shares[400].hole >= 0.5 and shares[400].pink >= 0.2
    assert sampled.ring >= 0.6 and sampled.hole >= 0.5
    assert sampled.pink >= 2 * sampled.picture  # pink where the ring is, not all over


def test_unchanged_requeue_reuses_the_trained_run(comfy, demo_run):
    before_files, before_runs = lora_files(comfy), run_dirs(comfy, "tiny_demo")
    entry = comfy.wait(comfy.submit(load_graph(DEMO), workflow=DEMO_WORKFLOW))
    assert entry["status"]["status_str"] == "success"
    (cached,) = messages(entry, "execution_cached")
    assert set(cached["nodes"]) == set(load_graph(DEMO))  # nothing ran again, training included
    assert lora_files(comfy) == before_files and run_dirs(comfy, "tiny_demo") == before_runs


def test_comfyuis_own_training_nodes_take_the_lora_and_loss_map_outputs(comfy, demo_run):
    """The Train node's LORA_MODEL and LOSS_MAP outputs into ComfyUI's own Save LoRA Weights and Plot Loss Graph
    (its Load LoRA Model is checked against the core's prediction in test_comfyui_native_lokr.py): the saved file
    holds the LoKr's tensors, the plot is drawn from the run's 400 losses. The training itself is served from
    ComfyUI's cache."""
    import torch
    from safetensors.torch import load_file

    graph = load_graph(DEMO)
    graph["20"] = {"class_type": "SaveLoRA", "inputs": {"lora": [TRAIN, 3], "prefix": "loras/native_save"}}
    graph["21"] = {"class_type": "LossGraphNode", "inputs": {"loss": [TRAIN, 4], "filename_prefix": "loss"}}
    entry = comfy.wait(comfy.submit(graph))
    assert entry["status"]["status_str"] == "success", entry["status"]
    (cached,) = messages(entry, "execution_cached")
    assert TRAIN in cached["nodes"]
    (saved,) = (comfy.output_dir() / "loras").glob("native_save_*.safetensors")
    (run,) = run_dirs(comfy, "tiny_demo")[:1]
    ours = load_file(str(run / "pytorch_lora_weights.safetensors"))
    theirs = load_file(str(saved))
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert len(json.loads((run / "losses.json").read_text())) == STEPS
    assert entry["outputs"]["21"]["images"], entry["outputs"]


def test_changed_dataset_file_retrains(comfy, demo_run):
    """ComfyUI's cache keys on inputs; the dataset node also fingerprints its files, so an edited caption counts."""
    folder = comfy.base_dir / "input" / "hidream_lokr_demo_zorb"
    graph = load_graph(DEMO)
    graph[TRAIN]["inputs"].update(max_train_steps=2, validation_prompt="")
    graph.pop("8"), graph.pop("9")
    first = comfy.wait(comfy.submit(graph))
    assert first["status"]["status_str"] == "success"
    caption = sorted(folder.glob("*.txt"))[0]
    caption.write_text(caption.read_text() + ", edited")
    second = comfy.wait(comfy.submit(graph))
    assert second["status"]["status_str"] == "success"
    (cached,) = messages(second, "execution_cached")
    assert "2" not in cached["nodes"] and TRAIN not in cached["nodes"]


def test_missing_folder_error_reaches_history_in_plain_words(comfy):
    graph = load_graph(DEMO)
    graph["2"]["inputs"]["folder"] = "no_such_training_images"
    entry = comfy.wait(comfy.submit(graph))
    assert entry["status"]["status_str"] == "error"
    text = error_text(entry)
    assert "no_such_training_images" in text and "does not exist" in text


def test_empty_dataset_error_reaches_history_in_plain_words(comfy):
    (comfy.base_dir / "input" / "empty_folder").mkdir(parents=True, exist_ok=True)
    graph = load_graph(DEMO)
    graph["2"]["inputs"]["folder"] = "empty_folder"
    entry = comfy.wait(comfy.submit(graph))
    text = error_text(entry)
    assert "no usable images" in text and "empty_folder" in text


def _sample_pixels(comfy, entry) -> np.ndarray:
    (image,) = entry["outputs"]["9"]["images"]
    return np.asarray(Image.open(comfy.base_dir / "temp" / image["filename"]))


def test_interrupt_stops_within_a_step_saves_the_lokr_and_restores_the_model(comfy, events, demo_run):
    base_only = {k: copy.deepcopy(v) for k, v in load_graph(DEMO).items() if k in ("1", "8", "9")}
    del base_only["8"]["inputs"]["lokr"]
    before = _sample_pixels(comfy, comfy.wait(comfy.submit(base_only)))

    graph = load_graph(DEMO)
    graph[TRAIN]["inputs"].update(max_train_steps=5000, validation_prompt="", output_name="interrupted", seed=3)
    prompt_id = comfy.submit(graph)
    events.wait_for(lambda kind, d: kind == "hidream_lokr.progress" and d.get("prompt_id") == prompt_id
                    and d.get("step", 0) >= 5)
    interrupted_at = time.time()
    comfy.interrupt()
    entry = comfy.wait(prompt_id)
    finished_at = time.time()
    assert entry["status"]["status_str"] == "error"
    assert messages(entry, "execution_interrupted"), entry["status"]
    wait_for_run_end(events, prompt_id)
    (run,) = run_dirs(comfy, "interrupted")
    record = run_record(run)
    last_step = max(e["step"] for e in events.of("hidream_lokr.progress") if e.get("prompt_id") == prompt_id
                    and "loss" in e)
    assert record["status"] == "interrupted" and record["steps_done"] == last_step < 5000
    assert (run / "pytorch_lora_weights.safetensors").is_file()
    print(f"\ninterrupt: stopped after step {record['steps_done']}, {record['updated'] - interrupted_at:.2f} s "
          f"from POST /interrupt to the LoKr saved, {finished_at - interrupted_at:.2f} s until /history said so")
    last = [e for e in events.of("hidream_lokr.progress") if e.get("prompt_id") == prompt_id][-1]
    assert last["phase"] == "interrupted" and last["status"] == "interrupted"
    assert f"Cancelled at step {last_step} of 5000" in last["message"]
    assert f"Queue again to continue from step {last_step}" in last["message"]

    base_only["8"]["inputs"]["strength"] = 0.5  # no LoKr connected: same maths, but not a cached result
    after = _sample_pixels(comfy, comfy.wait(comfy.submit(base_only)))
    assert np.array_equal(before, after)  # the transformer came back without LoKr, weights unchanged

    # The cancel left a resumable checkpoint; queueing the same graph again continues from it.
    checkpoint = run / f"checkpoint-{record['steps_done']}"
    assert (checkpoint / "manifest.json").is_file() and (checkpoint / "training_state.pt").is_file()
    again = comfy.submit(graph)
    first = events.wait_for(lambda kind, d: kind == "hidream_lokr.progress" and d.get("prompt_id") == again
                            and "loss" in d)
    comfy.interrupt()
    assert comfy.wait(again)["status"]["status_str"] == "error"
    print(f"re-queue after the cancel resumed at step {first['step']}")
    assert first["step"] == record["steps_done"] + 1


def test_image_batch_and_combined_datasets_train(comfy, demo_run):
    import shutil

    first = sorted((comfy.base_dir / "input" / "hidream_lokr_demo_zorb").glob("*.png"))[0]
    shutil.copy(first, comfy.base_dir / "input" / "lokr_batch_image.png")
    graph = load_graph(DEMO)
    graph.pop("8"), graph.pop("9")
    graph["20"] = {"class_type": "LoadImage", "inputs": {"image": "lokr_batch_image.png"}}
    graph["21"] = {"class_type": "HiDreamLoKrDatasetFromImages",
                   "inputs": {"images": ["20", 0], "captions": "a shape from the graph", "resolution": 64,
                              "repeats": 1}}
    graph["22"] = {"class_type": "HiDreamLoKrCombineDatasets", "inputs": {"dataset_1": ["2", 0],
                                                                        "dataset_2": ["21", 0]}}
    graph["3"]["inputs"]["dataset"] = ["22", 0]
    graph[TRAIN]["inputs"].update(max_train_steps=2, validation_prompt="", output_name="combined")
    entry = comfy.wait(comfy.submit(graph))
    assert entry["status"]["status_str"] == "success", entry["status"]
    (name,) = entry["outputs"]["7"]["text"]
    with safe_open(str(comfy.output_dir() / "loras" / name), "pt") as f:
        config = json.loads(f.metadata()["training_config"])
    assert [d["id"] for d in config["datasets"]] == ["hidream_lokr_demo_zorb", "image_batch"]
    assert config["datasets"][1]["repeats"] == 1
    (batch_folder,) = (comfy.output_dir() / "hidream_lokr" / "image_batches").iterdir()
    assert (batch_folder / "00000.txt").read_text() == "a shape from the graph"


def test_lokr_config_matching_nothing_fails_in_plain_words(comfy, events, demo_run):
    graph = load_graph(DEMO)
    graph["5"]["inputs"].update(preset="custom JSON", custom_json='{"target_module": ["NoSuchLayer"]}')
    prompt_id = comfy.submit(graph)
    text = error_text(comfy.wait(prompt_id))
    assert "matches no module" in text and "HiDreamAttention" in text  # says what could be targeted
    progress = [e for e in events.of("hidream_lokr.progress") if e.get("prompt_id") == prompt_id]
    assert progress[-1]["phase"] == "failed"


def _no_partial_files(folder: Path) -> None:
    """Nothing half-written under a real name: no temporaries left behind, and every cache entry verifies."""
    from trainer_core.data import read_entry

    leftovers = [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]
    assert not leftovers, leftovers
    for entry in folder.rglob("*.safetensors"):
        if "cache" in entry.parts:
            read_entry(entry)


def test_interrupt_during_validation_stops_at_the_step_boundary_and_requeue_resumes(comfy, events, demo_run):
    from trainer_core.training import checkpoint as ckpt

    graph = load_graph(DEMO)
    graph[TRAIN]["inputs"].update(max_train_steps=5000, validation_step_interval=3, validation_num_inference_steps=60,
                                  output_name="interrupt_validation", seed=5)
    prompt_id = comfy.submit(graph)
    events.wait_for(lambda kind, d: kind == "hidream_lokr.progress" and d.get("prompt_id") == prompt_id
                    and d.get("kind") == "phase" and d.get("phase") == "validating" and d.get("step", 0) >= 3)
    comfy.interrupt()
    entry = comfy.wait(prompt_id)
    assert messages(entry, "execution_interrupted"), entry["status"]
    (run,) = run_dirs(comfy, "interrupt_validation")
    record = run_record(run)
    print(f"\ninterrupt during the step-3 validation: stopped after step {record['steps_done']}")
    assert 3 <= record["steps_done"] <= 4  # the validation finishes, the next step boundary stops the run
    assert ckpt.verify_checkpoint(run / f"checkpoint-{record['steps_done']}") is None
    _no_partial_files(run)

    again = comfy.submit(graph)
    first = events.wait_for(lambda kind, d: kind == "hidream_lokr.progress" and d.get("prompt_id") == again
                            and "loss" in d)
    comfy.interrupt()
    comfy.wait(again)
    assert first["step"] == record["steps_done"] + 1


def test_interrupt_while_caching_latents_leaves_only_complete_entries(comfy, events, demo_run):
    rng = np.random.default_rng(0)
    data = comfy.base_dir / "input" / "many_noise"  # a queued prompt reads images from ComfyUI's input folder
    data.mkdir(parents=True)
    for i in range(240):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(data / f"noise_{i:03d}.png")
        (data / f"noise_{i:03d}.txt").write_text(f"noise pattern number {i}")
    graph = load_graph(DEMO)
    graph["2"]["inputs"].update(folder=data.name, resolution=64)
    graph[TRAIN]["inputs"].update(max_train_steps=2, validation_prompt="", output_name="interrupt_caching")
    graph["4"]["inputs"]["batch_size"] = 1
    prompt_id = comfy.submit(graph)
    events.wait_for(lambda kind, d: kind == "progress" and d.get("prompt_id") == prompt_id and d.get("node") == "4"
                    and d.get("value", 0) >= 5)
    comfy.interrupt()
    entry = comfy.wait(prompt_id)
    assert messages(entry, "execution_interrupted"), entry["status"]
    cache = comfy.output_dir() / "hidream_lokr" / "cache"
    _no_partial_files(cache)
    cached_before = len(list((cache / "latents").rglob("*.safetensors")))

    entry = comfy.wait(comfy.submit(graph))  # queued again: caching finishes and training runs
    assert entry["status"]["status_str"] == "success", entry["status"]
    cached_after = len(list((cache / "latents").rglob("*.safetensors")))
    print(f"\ninterrupt while caching latents: {cached_before} entries complete at the interrupt, "
          f"{cached_after} after the re-queue")
    assert cached_after >= cached_before + 1
    _no_partial_files(cache)
