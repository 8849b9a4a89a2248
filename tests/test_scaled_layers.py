"""The 8-bit scaled-matmul layers (quant/scaled.py) one at a time, on the CPU where torch 2.13 runs both
`torch._scaled_mm` (fp8 e4m3fn) and `torch._int_mm`: values and input gradients close to the float layer, no
weight gradient, no dequantised weight ever built, and every 8-bit matmul called in the layout CUDA requires."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from trainer_core.config import ConfigError, TrainConfig
from trainer_core.quant import ScaledFp8Linear, ScaledInt8Linear, quantize_frozen
from trainer_core.quant.scaled import FP8_DTYPE, check_matmul_support, unsupported_reason

CLASSES = [ScaledFp8Linear, ScaledInt8Linear]
# Relative L2 error of one layer on Gaussian data: fp8 e4m3 keeps 3 mantissa bits (~3.5 % per matmul measured),
# int8 with a scale per row/channel ~0.8 %.
TOLERANCE = {ScaledFp8Linear: 0.06, ScaledInt8Linear: 0.02}


class OpRecorder(TorchDispatchMode):
    """Every aten op run under it: (name, args, output)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((str(func.overloadpacket.__name__), args, kwargs or {}, out))
        return out


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_input_gradient_follow_the_float_layer(cls, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(96, 48).to(dtype).requires_grad_(False)
    layer = cls.from_linear(linear)
    assert layer.weight.dtype == cls.storage_dtype and layer.weight_scale.dtype == torch.float32
    assert not any(p.requires_grad for p in layer.parameters())
    torch.testing.assert_close(layer.dequantize(), linear.weight.float(), rtol=0.07,
                               atol=0.01 * linear.weight.abs().max().item())

    x = torch.randn(3, 7, 96, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, 7, 48, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (3, 7, 48)
    (y * grad).sum().backward()
    ours = x.grad.clone()
    x.grad = None
    reference = linear(x)
    (reference * grad).sum().backward()
    assert _rel(y, reference) < TOLERANCE[cls]
    assert _rel(ours, x.grad) < TOLERANCE[cls]
    assert _rel(y, reference) > 0  # really quantised (an unquantised path would be exact)
    assert layer.weight.grad is None and layer.bias.grad is None


@pytest.mark.parametrize("cls", CLASSES)
def test_no_dequantised_weight_and_cuda_layouts(cls):
    """Forward + backward never create a float tensor of the weight's shape (or its transpose), and each 8-bit
    matmul gets what CUDA's kernels demand: a row-major, b column-major, K and N multiples of 16, float32 row
    scales (M, 1) / (1, N), contiguous (CPU kernels accept more; the GPU will not)."""
    torch.manual_seed(1)
    layer = cls.from_linear(nn.Linear(64, 80))
    x = torch.randn(2, 5, 64, requires_grad=True)
    with OpRecorder() as ops:
        layer(x).square().sum().backward()
    matmuls = [c for c in ops.calls if c[0] in ("_scaled_mm", "_int_mm")]
    assert len(matmuls) == 2  # the forward and the input gradient, nothing else
    assert not [c[0] for c in ops.calls if c[0] in ("mm", "addmm", "matmul", "bmm", "linear")]
    for name, args, kwargs, out in ops.calls:
        outs = out if isinstance(out, (tuple, list)) else [out]
        for t in outs:
            if isinstance(t, torch.Tensor) and t.dtype.is_floating_point and t.element_size() > 1:
                assert tuple(t.shape) not in ((80, 64), (64, 80)), f"{name} built a float weight-sized tensor"
    for name, args, kwargs, _ in matmuls:
        a, b = args[0], args[1]
        assert a.stride(1) == 1 and a.stride(0) >= a.shape[1], "a must be row-major"
        assert b.stride(0) == 1 and b.stride(1) >= b.shape[0], "b must be column-major"
        assert a.shape[1] % 16 == 0 and b.shape[1] % 16 == 0
        if name == "_scaled_mm":
            scale_a = kwargs.get("scale_a", args[2] if len(args) > 2 else None)
            scale_b = kwargs.get("scale_b", args[3] if len(args) > 3 else None)
            assert a.dtype == b.dtype == FP8_DTYPE
            assert scale_a.dtype == scale_b.dtype == torch.float32
            assert tuple(scale_a.shape) == (a.shape[0], 1) and tuple(scale_b.shape) == (1, b.shape[1])
            assert scale_a.is_contiguous() and scale_b.is_contiguous()
        else:
            assert a.dtype == b.dtype == torch.int8


@pytest.mark.parametrize("cls", CLASSES)
def test_moving_the_model_never_casts_the_stored_weight(cls):
    layer = cls.from_linear(nn.Linear(32, 16))
    stored = layer.weight.clone()
    layer.to(torch.bfloat16)
    layer.half()
    assert torch.equal(layer.weight.view(torch.uint8), stored.view(torch.uint8))
    assert layer.weight.dtype == cls.storage_dtype and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.float16 and layer.compute_dtype == torch.float16
    meta = cls.from_linear(nn.Linear(32, 16)).to("meta")
    assert meta.weight.is_meta and meta.weight.dtype == cls.storage_dtype


def test_per_tensor_file_scale_is_used_as_stored():
    """ComfyUI's scaled fp8: one scale for the whole weight; the stored e4m3fn bytes are used as they are."""
    torch.manual_seed(2)
    real = torch.randn(32, 48) * 40
    scale = real.abs().max() / 448
    stored = (real / scale).to(FP8_DTYPE)
    layer = ScaledFp8Linear.from_quantized(stored, scale.reshape(()), torch.zeros(32), torch.float32)
    assert layer.scale_granularity == "tensor" and layer.weight.data_ptr() == stored.data_ptr()
    x = torch.randn(4, 48)
    assert _rel(layer(x), x @ (stored.float() * scale).t()) < 0.06


def test_the_precisions_are_settings_everywhere(tmp_path):
    from trainer_core.config import PRECISIONS, DatasetConfig

    assert {"fp8-scaled", "int8-scaled"} <= set(PRECISIONS)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 24), nn.Linear(24, 32))
    quantize_frozen(model, "fp8-scaled")
    # 24 is not a multiple of 16: those two layers stay float (CUDA's fp8 matmul could not run them)
    assert [type(m).__name__ for m in model] == ["ScaledFp8Linear", "Linear", "Linear"]
    with pytest.raises(ConfigError, match="int8-scaled"):
        quantize_frozen(nn.Linear(16, 16), "fp9-scaled")
    with pytest.raises(ConfigError, match="fp8-scaled, int8-scaled"):
        TrainConfig(pretrained_model_name_or_path=tmp_path, datasets=[DatasetConfig(instance_data_dir=tmp_path)],
                    base_model_precision="fp9").validate()


def test_gpus_without_fp8_tensor_cores_are_told_the_alternatives():
    for name, capability in (("NVIDIA A100-SXM4-80GB", (8, 0)), ("NVIDIA GeForce RTX 3090", (8, 6))):
        reason = unsupported_reason("fp8", name, capability)
        assert reason and name in reason and "int8-scaled" in reason and "int8-quanto" in reason
        assert unsupported_reason("int8", name, capability) is None
    for capability in ((8, 9), (9, 0), (10, 0)):  # RTX 40xx / L40S, H100 / H200, B200
        assert unsupported_reason("fp8", "gpu", capability) is None
    assert "int8-quanto" in unsupported_reason("int8", "Tesla V100", (7, 0))
    assert unsupported_reason("fp8", "AMD Instinct MI300X", (9, 4), hip=True)
    check_matmul_support(torch.device("cpu"), "fp8")  # CPUs run both


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_the_cuda_quantiser_traces_as_one_graph(fmt):
    """On CUDA the row quantiser and the int8 epilogue run through torch.compile(fullgraph=True, dynamic=True);
    dynamo's capture (device-independent, here with the eager backend) must take each whole, for any row count,
    and give the eager bits."""
    from trainer_core.quant.scaled import _int8_epilogue, _quantize_rows

    traced = torch.compile(_quantize_rows, backend="eager", fullgraph=True, dynamic=True)
    for rows, dtype in ((5, torch.float32), (33, torch.bfloat16)):
        x = torch.randn(rows, 64, dtype=dtype)
        (q, s), (q0, s0) = traced(x, fmt), _quantize_rows(x, fmt)
        assert torch.equal(q.view(torch.uint8), q0.view(torch.uint8)) and torch.equal(s, s0)
    epilogue = torch.compile(_int8_epilogue, backend="eager", fullgraph=True, dynamic=True)
    acc = torch.randint(-1000, 1000, (7, 32), dtype=torch.int32)
    args = (acc, torch.rand(7, 1), torch.rand(1, 32), torch.randn(32), torch.bfloat16)
    assert torch.equal(epilogue(*args), _int8_epilogue(*args))
