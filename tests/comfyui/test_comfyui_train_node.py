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
