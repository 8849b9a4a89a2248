"""An fp8-scaled / int8-scaled frozen base on the tiny HiDream transformer (CPU, where torch 2.13 runs both 8-bit
matmuls): the LoKr wraps it in bypass mode with the fast Kronecker path, checkpointing and the sorted MoE dispatch
on top; a training step and a sampling step stay close to the float32 model's (bounds tighter than the issue's); ComfyUI's
scaled-fp8 files load straight into fp8 layers; streamed blocks move the 8-bit bytes.

The reference on the CPU is float32 (bf16 itself differs from float32 by a grad cosine of ~0.9999 on this model),
so each bound holds against the most exact step there is."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import cfg_forward
from test_speedups import CONFIG as EXPERTS_TOO, _loss_and_grads, _set_factors
from trainer_core.adapters import LycorisConfig, create_lokr_network, is_mergeable, lokr_applied
from trainer_core.hidream import load_frozen_transformer, load_transformer_file, transformer_blocks
from trainer_core.quant import HIGH_PRECISION_MODULES, ScaledFp8Linear, ScaledInt8Linear, ScaledLinear, quantize_frozen
from trainer_core.speedups import BlockStreamer, apply_speedups

REPO = Path(__file__).resolve().parents[1]
CLASSES = {"fp8-scaled": ScaledFp8Linear, "int8-scaled": ScaledInt8Linear}


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([grads[k].flatten().float() for k in sorted(grads)])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


def _side(transformer, precision, config=EXPERTS_TOO):
    transformer = copy.deepcopy(transformer)
    quantize_frozen(transformer, precision)
    network = create_lokr_network(transformer, config)
    _set_factors(network)
    report = apply_speedups(transformer, network)
    return transformer, network, report


def write_comfyui_scaled_fp8(transformer: nn.Module, path: Path, config_dir: Path) -> dict:
    """The file ComfyUI 0.3.75 writes for a scaled-fp8 diffusion model (comfy/model_base.py state_dict_for_saving
    with comfy/ops.py's scaled_fp8_op): `model.diffusion_model.` keys, every Linear weight as float8_e4m3fn next to
    its per-tensor float32 `scale_weight` (shape ()) and a `scale_input`, the Linear biases in float8_e4m3fn too,
    unscaled (ComfyUI builds the whole Linear in the fp8 dtype), the rest in bf16, and the empty `scaled_fp8` marker
    tensor whose dtype names the format. Returns the tensors written. (tests/comfyui/test_comfyui_fp8_file.py
    checks the loader against ComfyUI's own writer.)"""
    prefix = "model.diffusion_model."
    tensors = {prefix + "scaled_fp8": torch.tensor([], dtype=torch.float8_e4m3fn)}
    linears = {name for name, m in transformer.named_modules() if isinstance(m, nn.Linear)}
    for name, value in transformer.state_dict().items():
        layer = name.rsplit(".", 1)[0]
        if layer in linears and name.endswith(".weight"):
            scale = value.abs().max().float() / 448.0
            tensors[prefix + name] = (value.float() / scale).to(torch.float8_e4m3fn)
            tensors[prefix + layer + ".scale_weight"] = scale.reshape(())
            tensors[prefix + layer + ".scale_input"] = torch.ones(())
        elif layer in linears:  # the bias
            tensors[prefix + name] = value.to(torch.float8_e4m3fn)
        else:
            tensors[prefix + name] = value.to(torch.bfloat16)
    save_file(tensors, str(path))
    shutil.copy(config_dir / "transformer" / "config.json", path.with_suffix(".json"))  # a non-standard size
    return tensors


@pytest.mark.parametrize("precision", ["fp8-scaled", "int8-scaled"])
def test_lokr_wraps_the_8bit_base_in_bypass_with_every_speedup(tiny_transformer, precision):
    float_network = create_lokr_network(copy.deepcopy(tiny_transformer), EXPERTS_TOO)
    transformer, network, report = _side(tiny_transformer, precision)
    layers = [m for m in transformer.modules() if isinstance(m, ScaledLinear)]
    assert len(layers) > 100 and all(type(m) is CLASSES[precision] for m in layers)
    kept = [n for n, m in transformer.named_modules() if type(m) is nn.Linear]
    assert kept and all(n.startswith(HIGH_PRECISION_MODULES) or n.startswith("p_embedder") for n in kept)
    # the same modules as on the float model, every one around an 8-bit layer, in bypass, on the fast path
    assert sorted(l.lora_name for l in network.loras) == sorted(l.lora_name for l in float_network.loras)
    assert all(isinstance(l.org_module[0], CLASSES[precision]) and l.bypass_mode for l in network.loras)
    assert report["fast_lokr_modules"] == len(network.loras) and report["sorted_moe_layers"] > 0
    assert not is_mergeable(network)
    with lokr_applied(network, 1.0) as how:
        assert how == "bypass"
    # a class-name preset on "Linear" (LyCORIS' own default) reaches the 8-bit layers too
    every_linear = create_lokr_network(copy.deepcopy(transformer), LycorisConfig(
        factor=4, apply_preset={"target_module": ["Linear"], "module_algo_map": {}}))
    assert {type(l.org_module[0]) for l in every_linear.loras} == {CLASSES[precision], nn.Linear}


@pytest.mark.parametrize("precision", ["fp8-scaled", "int8-scaled"])
def test_training_and_sampling_steps_stay_close_to_the_float32_ones(tiny_transformer, precision):
    """Loss within 0.1 % and LoKr-gradient cosine >= 0.995 of the float32 step (checkpointed, LoKr on attention
    and every expert, the MoE dispatch sorted); CFG sampling velocity cosine >= 0.9995, the LoKr unmerged. (The
    issue asked for 2 %, 0.99 and 0.995; seen on 2026-12-07: fp8 1.5e-4, 0.9984, 0.99998; int8 1.2e-5, 0.99994,
    0.999999.)"""
    reference, ref_network, _ = _side(tiny_transformer, "no_change")
    flow0, aux0, grads0 = _loss_and_grads(reference, ref_network, checkpointing=True)
    transformer, network, _ = _side(tiny_transformer, precision)
    flow, aux, grads = _loss_and_grads(transformer, network, checkpointing=True)
    assert set(grads) == set(grads0)
    assert abs(flow - flow0) <= 1e-3 * abs(flow0), abs(flow - flow0) / abs(flow0)
    cosine = _cosine(_flat(grads), _flat(grads0))
    assert cosine >= 0.995, cosine
    assert any(g.abs().max() > 0 for n, g in grads.items() if "_ff_i_experts_" in n)
    assert flow != flow0  # the 8-bit matmuls really ran

    reference.eval()
    transformer.eval()
    with lokr_applied(ref_network, 1.0), lokr_applied(network, 1.0):
        velocity = _cosine(cfg_forward(transformer, seed=3)(), cfg_forward(reference, seed=3)())
    assert velocity >= 0.9995, velocity


def test_comfyui_scaled_fp8_file_loads_straight_into_fp8(tiny_model_dir, tiny_transformer, tmp_path):
    """Every quantisable Linear keeps the file's e4m3fn bytes and per-tensor scale (nothing re-quantised, no 16-bit
    copy); the kept layers and the rest are the file's values in the compute dtype; the model predicts what the
    file's dequantised weights predict, within the activations' fp8 rounding."""
    path = tmp_path / "hidream_tiny_fp8_scaled.safetensors"
    tensors = write_comfyui_scaled_fp8(tiny_transformer, path, tiny_model_dir)
    model = load_transformer_file(path, dtype=torch.float32, precision="fp8-scaled")
    dequantised = load_transformer_file(path, dtype=torch.float32)  # no_change: the file's values, float
    scaled = {n: m for n, m in model.named_modules() if isinstance(m, ScaledFp8Linear)}
    assert len(scaled) > 100
    for name, layer in scaled.items():
        stored = tensors[f"model.diffusion_model.{name}.weight"]
        assert torch.equal(layer.weight.view(torch.uint8), stored.view(torch.uint8)), name
        assert layer.scale_granularity == "tensor"
        assert torch.all(layer.weight_scale == tensors[f"model.diffusion_model.{name}.scale_weight"]), name
    float_state = dequantised.state_dict()
    for name, value in model.state_dict().items():
        if name.rsplit(".", 1)[0] not in scaled:
            assert value.dtype == torch.float32 and torch.equal(value, float_state[name]), name
    for name, layer in [*scaled.items(), ("x_embedder.proj", model.x_embedder.proj)]:  # fp8 biases: no scale
        if layer.bias is None:
            continue
        stored = tensors[f"model.diffusion_model.{name}.bias"]
        assert torch.equal(layer.bias, stored.float()) and torch.equal(float_state[f"{name}.bias"], stored.float())
    model.eval()
    dequantised.eval()
    assert _cosine(cfg_forward(model, seed=1)(), cfg_forward(dequantised, seed=1)()) >= 0.995
    # The loader every front end uses: the same layers, and a plain (unscaled) fp8 file gives scale 1.
    plain = tmp_path / "hidream_tiny_fp8.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.endswith(("scale_weight", "scale_input", "scaled_fp8"))},
              str(plain))
    shutil.copy(path.with_suffix(".json"), plain.with_suffix(".json"))
    model = load_frozen_transformer(None, "fp8-scaled", torch.float32, "cpu", transformer_file=plain)
    layer = model.double_stream_blocks[0].block.attn1.to_q
    assert isinstance(layer, ScaledFp8Linear) and torch.all(layer.weight_scale == 1.0)


_PEAK_SCRIPT = """
import ctypes, gc, sys, torch
import accelerate, diffusers, safetensors  # imported before anything is measured
from trainer_core.hidream import load_transformer_file

def rss(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024

for precision in sys.argv[2:]:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back to the system: each load starts from what it holds
    open("/proc/self/clear_refs", "w").write("5")  # resets the peak resident set (VmHWM) to the current one
    before = rss("VmRSS:")
    model = load_transformer_file(sys.argv[1], dtype=torch.bfloat16, precision=precision)
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    print(precision, rss("VmHWM:") - before, held)
    del model
"""

_MID_CONFIG = dict(patch_size=2, in_channels=16, out_channels=16, num_layers=2, num_single_layers=2,
                   attention_head_dim=128, num_attention_heads=6, caption_channels=[256, 256], text_emb_dim=256,
                   num_routed_experts=4, num_activated_experts=2, axes_dims_rope=[32, 48, 48],
                   max_resolution=[64, 64], llama_layers=[0, 1, 1, 1])


def test_reading_an_fp8_file_never_makes_a_16bit_copy(tmp_path):
    """A 134 M-parameter file (128 MiB in fp8), loaded in a fresh process: as fp8-scaled the resident set grows by
    less than the model would take in bf16 alone; dequantised to bf16 it grows by more (the measurement sees it)."""
    from diffusers import HiDreamImageTransformer2DModel

    with torch.device("meta"):
        shapes = HiDreamImageTransformer2DModel(**_MID_CONFIG).state_dict()
    g = torch.Generator().manual_seed(0)
    tensors = {"model.diffusion_model.scaled_fp8": torch.tensor([], dtype=torch.float8_e4m3fn)}
    for name, value in shapes.items():
        if value.ndim == 2:
            tensors[f"model.diffusion_model.{name}"] = torch.randn(value.shape, generator=g).to(torch.float8_e4m3fn)
            tensors[f"model.diffusion_model.{name[:-len('.weight')]}.scale_weight"] = torch.tensor(0.01)
        else:
            tensors[f"model.diffusion_model.{name}"] = torch.randn(value.shape, generator=g).to(torch.bfloat16)
    path = tmp_path / "mid_fp8.safetensors"
    save_file(tensors, str(path))
    del tensors
    path.with_suffix(".json").write_text(json.dumps(_MID_CONFIG))

    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(path), "fp8-scaled", "no_change"], cwd=REPO,
                         check=True, capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}).stdout
    figures = {line.split()[0]: tuple(map(int, line.split()[1:])) for line in out.splitlines()
               if line.startswith(("fp8-scaled ", "no_change "))}
    (fp8_grown, fp8_held), (bf16_grown, bf16_held) = figures["fp8-scaled"], figures["no_change"]
    print(f"fp8-scaled: +{fp8_grown / 2**20:.0f} MiB resident for a {fp8_held / 2**20:.0f} MiB model; "
          f"bf16: +{bf16_grown / 2**20:.0f} MiB for {bf16_held / 2**20:.0f} MiB")
    assert fp8_held < 0.55 * bf16_held
    assert bf16_grown > bf16_held  # the resident set does see copies being made
    assert fp8_grown < 0.75 * bf16_held  # less than a bf16 copy of the model alone


def test_streaming_an_fp8_base_moves_its_8bit_bytes(tiny_transformer):
    """offload_blocks with fp8-scaled: the same loss and gradients as the resident fp8 model, blocks in forward
    then reverse order, and half the bytes per block of a bf16 base (1 byte per weight instead of 2)."""
    resident, network0, _ = _side(tiny_transformer, "fp8-scaled", LycorisConfig(factor=4))
    flow0, aux0, grads0 = _loss_and_grads(resident, network0, checkpointing=True)
    streamed, network, _ = _side(tiny_transformer, "fp8-scaled", LycorisConfig(factor=4))
    streamer = BlockStreamer(streamed, torch.device("cpu"))
    flow, aux, grads = _loss_and_grads(streamed, network, checkpointing=True)
    assert flow == pytest.approx(flow0, rel=1e-6) and aux == pytest.approx(aux0, rel=1e-6)
    for name, g0 in grads0.items():
        torch.testing.assert_close(grads[name], g0, rtol=1e-5, atol=1e-8, msg=name)
    n = len(transformer_blocks(streamed))
    assert streamer.load_order == [*range(n), *reversed(range(n))]
    assert any(t.dtype == torch.float8_e4m3fn for t in streamer.packed[0].tensors)

    from trainer_core.speedups.block_offload import packed_bytes

    bf16_blocks = transformer_blocks(copy.deepcopy(tiny_transformer).to(torch.bfloat16))
    ratio = sum(p.host.numel() for p in streamer.packed) / sum(packed_bytes(b) for b in bf16_blocks)
    assert 0.45 < ratio < 0.56, ratio
