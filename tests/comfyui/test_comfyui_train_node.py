"""Pieces of the training node that protect the models ComfyUI keeps cached between runs."""
from __future__ import annotations

import importlib
import sys

import torch

from comfy_server import REPO

sys.path.insert(0, str(REPO))


def test_a_failed_runs_lokr_hooks_are_removed_from_the_cached_transformer(pack, tmp_path):
    from trainer_core.adapters import LycorisConfig, create_lokr_network
    from trainer_core.hidream import load_transformer, resolve_model_paths
    from trainer_core.tiny_model import build_tiny_model

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


def test_output_names_from_node_inputs_cannot_leave_the_output_folder(pack):
    import folder_paths
    import pytest

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
