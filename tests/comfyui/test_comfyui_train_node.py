"""Pieces of the training node that protect the models ComfyUI keeps cached between runs."""
from __future__ import annotations

import importlib
import sys

import pytest
import torch

from comfy_server import REPO

sys.path.insert(0, str(REPO))


@pytest.fixture()
def output_dir(pack, tmp_path):
    """ComfyUI's output folder moved to a temporary one for the test (never the ComfyUI install's own)."""
    import folder_paths

    before = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    yield tmp_path
    folder_paths.set_output_directory(before)


def test_a_failed_runs_lokr_hooks_are_removed_from_the_cached_transformer(pack, tmp_path):
    from trainer_core.adapters import LycorisConfig, create_lokr_network
    from trainer_core.hidream import load_transformer, resolve_model_paths
    from trainer_core.hidream.tiny import build_tiny_model

    train_node = importlib.import_module("hidream_lokr_pack.nodes.train")
    transformer = load_transformer(resolve_model_paths(build_tiny_model(tmp_path / "tiny")), dtype=torch.float32)
    linear = transformer.double_stream_blocks[0].block.attn1.to_q
    x = torch.randn(3, linear.in_features)
    before = linear(x)
    network = create_lokr_network(transformer, LycorisConfig(), seed=0)  # hooked, as mid-training
    with torch.no_grad():
        for p in network.parameters():
            p.fill_(0.1)
    assert not torch.allclose(linear(x), before)
    assert train_node.remove_leftover_lokr(transformer) == len(network.loras) > 0
    torch.testing.assert_close(linear(x), before, rtol=0, atol=0)
    assert train_node.remove_leftover_lokr(transformer) == 0


def test_output_names_from_node_inputs_cannot_leave_the_output_folder(output_dir):
    import folder_paths

    paths = importlib.import_module("hidream_lokr_pack.nodes.paths")
    config_error = importlib.import_module("hidream_lokr_pack.trainer_core.config").ConfigError
    for hostile in ("../../etc/passwd", "/tmp/x", "a/../../b", "x\0y", "..\\..\\windows", "C:/x"):
        with pytest.raises(config_error, match="inside ComfyUI's output folder"):
            paths.new_lora_file(hostile)
    with pytest.raises(config_error, match="contains '/'"):
        paths.new_run_dir("runs/mine")
    with pytest.raises(config_error, match="'..'"):
        paths.new_run_dir("..")
    output = folder_paths.get_output_directory()
    assert str(paths.new_lora_file("mine/style")).startswith(str(output))


def test_the_browser_extension_knows_the_first_train_layout_as_the_nodes_do(pack):
    """web/hidream_lokr_live.js loads workflows saved with the Train node's first layout by position: its list of
    that layout's widgets is nodes/train_settings.py's, and every entry is still a setting (or the seed's
    control_after_generate value)."""
    import re

    settings = importlib.import_module("hidream_lokr_pack.nodes.train_settings")
    code = (REPO / "web" / "hidream_lokr_live.js").read_text()
    block = re.search(r"const LEGACY_WIDGETS = \[(.*?)\];", code, re.S).group(1)
    assert tuple(re.findall(r'"([a-z0-9_]+)"', block)) == settings.LEGACY_TRAIN_WIDGETS
    assert set(settings.LEGACY_TRAIN_WIDGETS) - {"control_after_generate"} <= set(settings.ALL_SETTINGS)


def _run_folder(paths, output_name: str, number: int, checkpoints=(), **record):
    """A run folder as the Train node leaves it: run.json and complete checkpoints (a manifest over a state file)."""
    import json as _json

    from trainer_core.training import checkpoint as ckpt

    folder = paths.pack_output_dir() / f"{paths.run_folder_name(output_name)}_{number:05d}"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(_json.dumps(record))
    for step in checkpoints:
        ckpt.save_checkpoint(folder, step, lambda tmp: (tmp / ckpt.STATE_FILE).write_bytes(b"state"))
    return folder


def test_what_a_queued_training_does_with_the_run_folders_of_its_name(output_dir):
    """run_store.plan's decision table, on folders written the way the Train node writes them."""
    import uuid

    paths = importlib.import_module("hidream_lokr_pack.nodes.paths")
    store = importlib.import_module("hidream_lokr_pack.nodes.run_store")
    name = f"plan_{uuid.uuid4().hex[:6]}"
    same, other = "f" * 64, "0" * 64

    assert store.plan(name, same, "auto", 12).action == "new"  # nothing yet
    failed = _run_folder(paths, name, 1, (4, 8), status="failed", fingerprint=same, steps_done=9,
                         session=store.SESSION)
    p = store.plan(name, same, "auto", 12)
    assert (p.action, p.folder, p.checkpoint.name) == ("continue", failed, "checkpoint-8")
    assert store.plan(name, other, "auto", 12).action == "new"  # other settings: never someone else's run
    assert store.plan(name, same, "start over", 12).action == "new"
    assert store.plan(name, same, "", 12).action == "continue"  # the old text box's empty value is auto
    # A record still "running" from another ComfyUI process was cut short: continue it.
    killed = _run_folder(paths, name, 2, (4,), status="running", fingerprint=same, steps_done=6, session="gone")
    p = store.plan(name, same, "auto", 12)
    assert (p.action, p.folder, p.checkpoint.name) == ("continue", killed, "checkpoint-4")
    # Finished with exactly these steps: returned; with more steps asked: continued; fewer: a new run.
    done = _run_folder(paths, name, 3, (12,), status="finished", fingerprint=same, steps_done=12,
                       session=store.SESSION, cache_token="token-of-its-start")
    (done / "pytorch_lora_weights.safetensors").write_bytes(b"lokr")
    assert store.plan(name, same, "auto", 12).action == "return"
    assert store.plan(name, same, "auto", 20).checkpoint == done / "checkpoint-12"
    assert store.plan(name, same, "auto", 6).action == "new"
    assert store.cache_token(name) == "token-of-its-start"  # a finished run: ComfyUI's cache may answer
    # latest: the newest complete checkpoint of any run of the name, whatever its settings.
    p = store.plan(name, other, "latest", 12)
    assert (p.action, p.checkpoint) == ("new", done / "checkpoint-12")
    p = store.plan(name, same, "latest", 20)
    assert (p.action, p.folder) == ("continue", done)
    # An explicit checkpoint, and one that is not complete.
    p = store.plan(name, same, f"{failed.name}/checkpoint-4", 12)
    assert (p.action, p.folder, p.checkpoint.name) == ("continue", failed, "checkpoint-4")
    (failed / "checkpoint-8" / "manifest.json").unlink()
    assert store.plan(name, same, "auto", 12).action == "return"  # the finished run is the newest of these
    config_error = importlib.import_module("hidream_lokr_pack.trainer_core.config").ConfigError
    with pytest.raises(config_error, match="not a complete checkpoint"):
        store.plan(name, same, f"{failed.name}/checkpoint-8", 12)
    # An unfinished newest run changes the cache token: ComfyUI runs the node again instead of its cache.
    _run_folder(paths, name, 4, (), status="stopped", fingerprint=same, steps_done=3, session=store.SESSION)
    assert store.cache_token(name).startswith("stopped:")


def test_settings_that_do_not_change_what_trains_leave_the_fingerprint_alone(pack):
    """Previews, checkpoints and memory settings (gradient checkpointing, block offload, memory_mode) change
    nothing the run learns: changing one and queueing again continues the unfinished run (the fix for most errors)."""
    settings = importlib.import_module("hidream_lokr_pack.nodes.train_settings")
    base = dict(settings.DEFAULTS)
    key = settings.run_fingerprint("m", "d", ["t", "i"], {"factor": 16}, base)
    for name, value in (("validation_prompt", "other"), ("validation_step_interval", 7),
                        ("validation_num_inference_steps", 3), ("checkpoint_step_interval", 9),
                        ("gradient_checkpointing", True), ("offload_blocks", True), ("max_train_steps", 5),
                        ("output_name", "x"), ("resume_from_checkpoint", "latest"), ("memory_mode", "auto")):
        assert settings.run_fingerprint("m", "d", ["t", "i"], {"factor": 16}, {**base, name: value}) == key, name
    for name, value in (("learning_rate", 1e-3), ("seed", 1), ("lr_scheduler", "constant"),
                        ("mixed_precision", "no"), ("train_batch_size", 2)):
        assert settings.run_fingerprint("m", "d", ["t", "i"], {"factor": 16}, {**base, name: value}) != key, name


def test_every_node_default_is_train_configs(pack, tmp_path):
    """One set of defaults: the Train node and its settings nodes, left as they come, build TrainConfig's own
    defaults, field by field; the dataset node's widgets start at DatasetConfig's."""
    import dataclasses
    from types import SimpleNamespace

    settings = importlib.import_module("hidream_lokr_pack.nodes.train_settings")
    config = importlib.import_module("hidream_lokr_pack.trainer_core.config")
    data = SimpleNamespace(datasets=(config.DatasetConfig(instance_data_dir=tmp_path),), cache_dir=tmp_path)
    built = settings.train_config_from_settings(dict(settings.DEFAULTS), data, tmp_path, tmp_path / "lycoris.json",
                                                None, "cpu", None)
    core = config.TrainConfig(pretrained_model_name_or_path=tmp_path, datasets=[])
    compared = [f.name for f in dataclasses.fields(core) if f.name in settings.ALL_SETTINGS
                and f.name != "resume_from_checkpoint"]  # the node's resume choice is not a path (run_store)
    assert len(compared) == len(settings.ALL_SETTINGS) - 2  # all but output_name and the resume choice
    assert {n: (getattr(built, n), getattr(core, n)) for n in compared if getattr(built, n) != getattr(core, n)} == {}

    datasets = importlib.import_module("hidream_lokr_pack.nodes.datasets")
    fields = {f.name: f.default for f in dataclasses.fields(config.DatasetConfig)}
    widgets = {i.id: i.default for i in datasets.ImageDataset.define_schema().inputs if i.id in fields}
    assert widgets.pop("instance_prompt") == "" and fields["instance_prompt"] is None  # "" is "none" there
    assert len(widgets) >= 8 and widgets == {name: fields[name] for name in widgets}


def test_comfyuis_training_flag_is_up_while_training_and_down_on_every_exit(pack):
    """comfy.model_management.in_training (newer ComfyUI) is set around the training and put back however it ends;
    on a ComfyUI without the flag (0.3.75) nothing is added."""
    import comfy.model_management as mm

    compat = importlib.import_module("hidream_lokr_pack.nodes.compat")
    had = hasattr(mm, "in_training")
    if not had:
        with compat.comfy_training():
            assert not hasattr(mm, "in_training")
        mm.in_training = False  # as newer ComfyUI declares it
    try:
        with compat.comfy_training():
            assert mm.in_training is True
        assert mm.in_training is False
        for ending in (mm.InterruptProcessingException, RuntimeError, KeyboardInterrupt):
            with pytest.raises(ending):
                with compat.comfy_training():
                    assert mm.in_training is True
                    raise ending()
            assert mm.in_training is False
    finally:
        if not had:
            del mm.in_training


def test_the_loaded_model_tells_comfyuis_ram_cache_its_size(pack, tmp_path):
    """HIDREAM_MODEL tells ComfyUI's RAM-pressure cache its size: `_comfy_cache_tensors()` (newer ComfyUI), plain
    CPU tensors adding up to the model's bytes (a quantised base given as its plain parts), and `get_ram_usage()`
    (0.3.75's --cache-ram)."""
    from trainer_core.hidream import load_transformer, resolve_model_paths
    from trainer_core.hidream.tiny import build_tiny_model
    from trainer_core.quant import quantize_frozen

    types = importlib.import_module("hidream_lokr_pack.nodes.types")
    transformer = load_transformer(resolve_model_paths(build_tiny_model(tmp_path / "tiny")), dtype=torch.float32)

    def cache_bytes(model) -> int:  # what ComfyUI's scanner adds up: each CPU storage once
        tensors = model._comfy_cache_tensors()
        assert tensors and all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu"
                               for t in tensors)
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())

    full = sum(t.numel() * t.element_size() for t in (*transformer.parameters(), *transformer.buffers()))
    model = types.HiDreamModel(transformer=transformer, name="tiny")
    assert cache_bytes(model) == full == model.get_ram_usage()  # get_ram_usage: what 0.3.75's --cache-ram asks
    quantize_frozen(transformer, "int8-quanto")
    quantised = cache_bytes(types.HiDreamModel(transformer=transformer, name="tiny int8"))
    assert full / 5 < quantised < full / 2  # int8 weights (+ scales, norms and biases in float)


def test_the_memory_plan_of_a_queued_training_and_memory_mode_auto_on_a_cpu(pack, tmp_path):
    """The Train node plans the run with the transformer the graph holds before training: its verdict is the
    line the live view shows; memory_mode auto on a CPU has no GPU to choose for and trains as set."""
    from PIL import Image

    from trainer_core.config import DatasetConfig, TrainConfig
    from trainer_core.hidream import load_transformer, resolve_model_paths
    from trainer_core.hidream.tiny import build_tiny_model

    train_node = importlib.import_module("hidream_lokr_pack.nodes.train")
    transformer = load_transformer(resolve_model_paths(build_tiny_model(tmp_path / "tiny")), dtype=torch.float32)
    (tmp_path / "data").mkdir()
    Image.new("RGB", (64, 64), "red").save(tmp_path / "data" / "a.png")
    (tmp_path / "data" / "a.txt").write_text("a red square")
    config = TrainConfig(pretrained_model_name_or_path=tmp_path, output_dir=tmp_path / "out", device="cpu",
                         datasets=[DatasetConfig(instance_data_dir=tmp_path / "data", resolution=64)],
                         mixed_precision="no", gradient_checkpointing=True, memory_mode="auto")
    chosen, verdict = train_node.memory_plan(config, transformer)
    assert chosen.memory_mode == "manual" and chosen.gradient_checkpointing  # a CPU run: as set
    assert verdict.startswith("plan: fits in ") and "training step" in verdict, verdict
