"""Frozen 8-bit base weights that feed 8-bit tensor cores directly: `fp8-scaled` and `int8-scaled`.

optimum-quanto's int8 layers store int8 weights but dequantise the whole weight to bf16 on every call (forward,
recomputation and backward) and run a bf16 matmul: half the memory, none of the speed. Here the matmul itself runs
in 8 bits, on both operands:

    forward   x (M, K) --quantise per row--> xq (M, K), sx (M, 1)
              y = (xq @ Wq^T) * sx * sw + b                     torch._scaled_mm (fp8) / torch._int_mm (int8)
    backward  g = dL/dy (M, N) * sw                             the weight's per-output-channel scale folded in
              g --quantise per row--> gq (M, N), sg (M, 1)
              dL/dx = (gq @ Wq) * sg                            the same stored weight, transposed (8 bits)

Wq (N, K) is the stored 8-bit weight, sw (N,) its float32 scale per output channel (a file's per-tensor
`scale_weight` is the same scale for every channel). The weight never gets a gradient (it is frozen) and no
dequantised copy of it is ever made: the backward's transposed operand is an 8-bit copy of Wq, made per call and
freed with it (fp8 and int8 tensor cores read both operands with the reduction dimension contiguous, so Wq^T must
be laid out with N contiguous; keeping it resident would double the weight memory).

Layouts and scales as torch 2.13 wants them (checked on the CPU, where both ops run, and by torch's meta functions
for CUDA): `a` row-major (M, K), `b` column-major (K, N) (= the transpose of a row-major (N, K)), K and N multiples
of 16, row-wise scales float32 (M, 1) and (1, N), both contiguous; `_int_mm` returns int32, and on CUDA needs more
than 16 rows (fewer are padded) and K, N multiples of 8. On CUDA, row-wise `_scaled_mm` writes bf16 (the output is
cast to the input's dtype when that differs); fp8 needs compute capability 8.9 (RTX 40xx, L4/L40S, H100/H200).

Which layers: every `nn.Linear` of the model whose widths are multiples of 16, except `HIGH_PRECISION_MODULES`
(the patch and timestep/pooled embedders and the final projection: ~0.1 % of HiDream-I1's weights, run on every
token or straight into the velocity; docs/fp8.md has the measurement behind the choice). The LoKr is not touched:
it trains in float32 in LyCORIS' bypass mode, around these layers' forward.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config.schema import SCALED_PRECISIONS, ConfigError
from ..util.device import meta_placeholders

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
INT8_MAX = 127.0
MATMUL_MULTIPLE = 16  # K and N of every 8-bit matmul (fp8 on CUDA needs 16; int8 needs 8)
# Kept in the compute dtype (see the module docstring); names are module-path prefixes.
HIGH_PRECISION_MODULES = ("x_embedder.", "t_embedder.", "p_embedder.", "final_layer.linear")
_TINY = 1e-12  # the smallest row amplitude a scale is computed from (an all-zero row quantises to zeros)
_INT8_MIN_ROWS_CUDA = 17  # torch._int_mm on CUDA: "self.size(0) needs to be greater than 16"


# ----------------------------------------------------------------------------------------------- kernels


def quantize_rows(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float -> (q (M, K) float8_e4m3fn or int8, contiguous; scale (M, 1) float32) with x ~= q * scale.

    The multiplier that scales each row is rounded to x's dtype first and the scale is its exact reciprocal, so the
    quantiser and the matmul's rescaling agree to the last bit whatever dtype x computes in. On CUDA the same code
    runs through torch.compile (one fused kernel instead of five passes over x; see `_fused`).
    """
    return _fused(_quantize_rows, x)(x, fmt)


def _quantize_rows(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    work = x if x.dtype in (torch.float32, torch.bfloat16) else x.float()
    qmax = FP8_MAX if fmt == "fp8" else INT8_MAX
    amax = torch.linalg.vector_norm(work, ord=float("inf"), dim=1, keepdim=True).float()
    multiplier = (qmax / amax.clamp_min(_TINY)).to(work.dtype)
    scale = multiplier.float().reciprocal()
    scaled = work * multiplier
    if fmt == "fp8":
        return scaled.clamp_(-qmax, qmax).to(FP8_DTYPE), scale
    return scaled.round_().clamp_(-qmax, qmax).to(torch.int8), scale


def quantize_weight(weight: torch.Tensor, fmt: str, rows_per_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight (N, K) -> (Wq (N, K) 8-bit, scale (N,) float32), one scale per output channel, computed in
    float32 a chunk of rows at a time (the temporary stays small even for HiDream's 30720-row modulation layers)."""
    storage = FP8_DTYPE if fmt == "fp8" else torch.int8
    out = torch.empty(weight.shape, dtype=storage, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], rows_per_chunk):
        q, s = quantize_rows(weight[start:start + rows_per_chunk].float(), fmt)
        out[start:start + rows_per_chunk] = q
        scales[start:start + rows_per_chunk] = s.view(-1)
    return out, scales


_compiled: dict[str, Callable] = {}


def _fused(fn: Callable, x: torch.Tensor) -> Callable:
    """`fn` compiled by torch.compile for CUDA tensors (dynamic shapes: MoE experts see a new row count every
    step), `fn` itself elsewhere or with HIDREAM_SCALED_COMPILE=0. A compile that fails (no Triton, an old driver)
    is logged once and the eager code runs from then on: the maths is the same."""
    if not x.is_cuda or os.environ.get("HIDREAM_SCALED_COMPILE", "1") == "0":
        return fn
    name = fn.__name__
    if name not in _compiled:
        compiled = torch.compile(fn, dynamic=True, fullgraph=True)

        def first_call(*args, **kwargs):
            try:
                out = compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any compile failure falls back to the same eager maths
                logger.warning("torch.compile of %s failed (%s: %s); the 8-bit layers quantise eagerly",
                               name, type(exc).__name__, str(exc)[:200])
                _compiled[name] = fn
                return fn(*args, **kwargs)
            _compiled[name] = compiled
            return out

        _compiled[name] = first_call
    return _compiled[name]


def _int8_epilogue(acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor, bias: Optional[torch.Tensor],
                   out_dtype: torch.dtype) -> torch.Tensor:
    """int32 accumulators (M, N) -> (acc * a_scale * b_scale + bias) in out_dtype."""
    y = acc.to(torch.float32) * a_scale * b_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    # CUDA's row-wise scaled matmul writes bf16 only; the CPU kernels write any float dtype.
    return torch.bfloat16 if x.is_cuda else x.dtype


_fused_bias = {"ok": True}  # flips off (once, logged) if a backend refuses the bias inside _scaled_mm


def _mm(aq: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
        bias: Optional[torch.Tensor], out_dtype: torch.dtype, fmt: str, fast_accum: bool) -> torch.Tensor:
    """(aq * a_scale) @ (b * b_scale) + bias: aq (M, K) row-major, b (K, N) column-major, a_scale (M, 1), b_scale
    (1, N) float32 -> (M, N) out_dtype."""
    if fmt == "fp8":
        if bias is not None and _fused_bias["ok"]:
            try:
                return torch._scaled_mm(aq, b, scale_a=a_scale, scale_b=b_scale, bias=bias.to(out_dtype),
                                        out_dtype=out_dtype, use_fast_accum=fast_accum)
            except RuntimeError as exc:
                _fused_bias["ok"] = False
                logger.info("torch._scaled_mm refused a fused bias here (%s); adding it separately", exc)
        y = torch._scaled_mm(aq, b, scale_a=a_scale, scale_b=b_scale, out_dtype=out_dtype,
                             use_fast_accum=fast_accum)
        return y if bias is None else y.add_(bias.to(out_dtype))
    rows = aq.shape[0]
    if aq.is_cuda and rows < _INT8_MIN_ROWS_CUDA:
        aq = F.pad(aq, (0, 0, 0, 32 - rows))
    acc = torch._int_mm(aq, b)[:rows]
    return _fused(_int8_epilogue, acc)(acc, a_scale, b_scale, bias, out_dtype)


_ones: dict[tuple, torch.Tensor] = {}


def _unit_scale(n: int, device: torch.device) -> torch.Tensor:
    key = (n, device)
    if key not in _ones:
        _ones[key] = torch.ones(1, n, dtype=torch.float32, device=device)
    return _ones[key]


def scaled_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor],
                  fmt: str) -> torch.Tensor:
    """x (M, K) contiguous, weight (N, K) 8-bit row-major, weight_scale (N,) float32 -> (M, N) in x's dtype."""
    xq, x_scale = quantize_rows(x, fmt)
    y = _mm(xq, x_scale, weight.t(), weight_scale.view(1, -1), bias, _out_dtype(x), fmt, fast_accum=True)
    return y.to(x.dtype)


def scaled_input_grad(grad_output: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      fmt: str) -> torch.Tensor:
    """dL/dx (M, K) = grad_output (M, N) @ (weight * weight_scale) through an 8-bit matmul against the stored
    weight: the per-channel scale is folded into grad_output (it runs along the reduction dimension here)."""
    grad = grad_output.contiguous()
    gq, g_scale = quantize_rows(grad * weight_scale.to(grad.dtype), fmt)
    weight_t = weight.t().contiguous()  # (K, N), N contiguous: an 8-bit temporary, freed after this call
    y = _mm(gq, g_scale, weight_t.t(), _unit_scale(weight.shape[1], weight.device), None, _out_dtype(grad), fmt,
            fast_accum=False)
    return y.to(grad.dtype)


class ScaledLinearFunction(torch.autograd.Function):
    """y = x W^T + b through an 8-bit matmul; backward gives dL/dx only (the weight and bias are frozen).

    x (M, K) contiguous, weight (N, K) 8-bit, weight_scale (N,) float32, bias (N,) or None, fmt "fp8" | "int8".
    Saved for backward: aliases of the weight and its scale (resident already; aliases, so that block streaming
    pointing the module back at its host copy does not move what this backward reads), nothing activation-sized.
    """

    @staticmethod
    def forward(ctx, x, weight, weight_scale, bias, fmt):
        ctx.fmt = fmt
        ctx.save_for_backward(weight.detach(), weight_scale.detach())
        return scaled_linear(x, weight, weight_scale, bias, fmt)

    @staticmethod
    def backward(ctx, grad_output):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        weight, weight_scale = ctx.saved_tensors
        return scaled_input_grad(grad_output, weight, weight_scale, ctx.fmt), None, None, None, None


# ------------------------------------------------------------------------------------------- hardware


_supported: set[tuple] = set()


def unsupported_reason(fmt: str, name: str, capability: tuple[int, int], hip: bool = False) -> Optional[str]:
    """Why a GPU called `name` of compute `capability` cannot run `fmt` ("fp8" / "int8") 8-bit matmuls, naming what
    to use instead; None when it can."""
    major, minor = capability
    if fmt == "fp8" and (hip or (major, minor) < (8, 9)):
        return (f"base_model_precision fp8-scaled needs fp8 tensor cores: an NVIDIA GPU of compute capability 8.9 "
                f"or newer (RTX 40xx, L4/L40S, H100/H200); this {name} is sm{major}{minor}. Use "
                "base_model_precision int8-scaled (int8 tensor cores: RTX 20xx/30xx, A100) or int8-quanto instead")
    if fmt == "int8" and (hip or (major, minor) < (7, 5)):
        return (f"base_model_precision int8-scaled needs int8 tensor cores (NVIDIA compute capability 7.5 or "
                f"newer); this {name} is sm{major}{minor}. Use base_model_precision int8-quanto or no_change instead")
    return None


def check_matmul_support(device: torch.device, fmt: str) -> None:
    """Raise a ConfigError naming the alternatives when `device` has no tensor cores for `fmt` ("fp8" / "int8").
    CPUs run both (torch 2.13's CPU kernels)."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    if (index, fmt) in _supported:
        return
    reason = unsupported_reason(fmt, torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index),
                                hip=bool(torch.version.hip))
    if reason:
        raise ConfigError(reason)
    _supported.add((index, fmt))


def check_precision_supported(precision: str, device) -> None:
    """Fail early (before any weights load) when `precision` is a scaled one `device` cannot run."""
    if precision in SCALED_PRECISIONS:
        check_matmul_support(torch.device(device), _FORMAT[precision])


# ------------------------------------------------------------------------------------------- modules


class ScaledLinear(nn.Linear):
    """A frozen Linear whose weight is stored in 8 bits with a float32 scale per output channel.

    Buffers: `weight` (out_features, in_features) in `storage_dtype`, `weight_scale` (out_features,) float32; the
    real weight is `weight * weight_scale[:, None]`. `bias` (out_features,) is a frozen Parameter in the compute
    dtype. forward: x (..., in_features) -> (..., out_features) in x's dtype.

    A subclass of nn.Linear so that LyCORIS (which wraps `isinstance(m, nn.Linear)` children of its targets, in
    bypass mode for any class not named "Linear") and PEFT treat it as a Linear; `compute_dtype` tells PEFT which
    dtype its LoRA weights take. `.to(dtype)` / `.half()` move the stored weight and scales but never cast them.
    """

    fmt = ""
    storage_dtype = torch.float32

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 compute_dtype: torch.dtype = torch.bfloat16):
        nn.Module.__init__(self)
        if in_features % MATMUL_MULTIPLE or out_features % MATMUL_MULTIPLE:
            raise ValueError(f"{type(self).__name__} needs widths that are multiples of {MATMUL_MULTIPLE}, got "
                             f"{in_features} -> {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=self.storage_dtype,
                                                   device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._compute_dtype = compute_dtype
        self.scale_granularity = "channel"  # "tensor" when a file gave one scale for the whole weight

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._compute_dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, work_device=None) -> "ScaledLinear":
        """Quantise a float Linear per output channel (on `work_device`, default where its weight is); the result
        lives where the Linear's weight lived."""
        home = linear.weight.device
        weight = linear.weight.detach().to(work_device or home)
        q, scale = quantize_weight(weight, cls.fmt)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls.from_quantized(q.to(home), scale.to(home), bias, compute_dtype=linear.weight.dtype)

    @classmethod
    def from_quantized(cls, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor],
                       compute_dtype: torch.dtype = torch.bfloat16) -> "ScaledLinear":
        """A layer holding `weight` (N, K) in storage_dtype as it is; `weight_scale` (N,) per channel, or one value
        (a per-tensor scale, as ComfyUI's `scale_weight`)."""
        if weight.dtype != cls.storage_dtype:
            raise ValueError(f"{cls.__name__} stores {cls.storage_dtype}, got a {weight.dtype} weight")
        out_features, in_features = weight.shape
        with meta_placeholders():  # its buffers are assigned below
            layer = cls(in_features, out_features, bias=bias is not None, device="meta", compute_dtype=compute_dtype)
        scale = weight_scale.detach().to(device=weight.device, dtype=torch.float32).reshape(-1)
        if scale.numel() == 1:
            layer.scale_granularity = "tensor"
            scale = scale.expand(out_features)
        if scale.numel() != out_features:
            raise ValueError(f"weight scale of {scale.numel()} values for a weight of {out_features} rows")
        layer._buffers["weight"] = weight.detach().contiguous()
        layer._buffers["weight_scale"] = scale.contiguous()
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(device=weight.device, dtype=compute_dtype),
                                      requires_grad=False)
        return layer

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The real weight (out_features, in_features) in `dtype` (tests, statistics; never on the training path)."""
        return (self.weight.to(torch.float32) * self.weight_scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_matmul_support(x.device, self.fmt)
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        if not x2d.is_contiguous():
            x2d = x2d.contiguous()
        if x2d.shape[0] == 0:
            out = x2d.new_zeros(0, self.out_features)
        elif torch.is_grad_enabled() and x2d.requires_grad:
            out = ScaledLinearFunction.apply(x2d, self.weight, self.weight_scale, self.bias, self.fmt)
        else:
            out = scaled_linear(x2d, self.weight, self.weight_scale, self.bias, self.fmt)
        return out.view(*lead, self.out_features)

    def _apply(self, fn: Callable, recurse: bool = True):
        # nn.Module.to(dtype) casts every floating-point buffer, fp8 included: that would turn the stored weight into
        # unscaled floats. Move the weight and its scales to wherever `fn` sends tensors; cast only the bias.
        stored = {name: self._buffers[name] for name in ("weight", "weight_scale")}
        probe = fn(torch.empty(0, dtype=self._compute_dtype, device=stored["weight"].device))
        for name in stored:
            self._buffers[name] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for name, tensor in stored.items():
                if tensor.device != probe.device:
                    tensor = (torch.empty_like(tensor, device=probe.device) if tensor.is_meta
                              else tensor.to(probe.device))
                self._buffers[name] = tensor
        if probe.dtype.is_floating_point:
            self._compute_dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.storage_dtype} weight, scale per {self.scale_granularity}")


class ScaledFp8Linear(ScaledLinear):
    """fp8-scaled: float8_e4m3fn weight; matmuls through torch._scaled_mm (fp8 tensor cores: sm89+)."""

    fmt = "fp8"
    storage_dtype = FP8_DTYPE


class ScaledInt8Linear(ScaledLinear):
    """int8-scaled: int8 weight (symmetric, 127 levels); matmuls through torch._int_mm (int8 tensor cores)."""

    fmt = "int8"
    storage_dtype = torch.int8


SCALED_LINEAR_CLASSES = {"fp8-scaled": ScaledFp8Linear, "int8-scaled": ScaledInt8Linear}
_FORMAT = {"fp8-scaled": "fp8", "int8-scaled": "int8"}


# ------------------------------------------------------------------------------------------ the model


def is_scaled_linear(module: nn.Module) -> bool:
    return isinstance(module, ScaledLinear)


def can_quantize(name: str, module: nn.Module, keep: tuple[str, ...] = HIGH_PRECISION_MODULES) -> bool:
    """True for a plain nn.Linear that `quantize_scaled` turns into 8 bits: widths multiples of 16, not kept."""
    return (type(module) is nn.Linear and module.in_features % MATMUL_MULTIPLE == 0
            and module.out_features % MATMUL_MULTIPLE == 0 and not _kept(name, keep))


def _kept(name: str, keep: tuple[str, ...]) -> bool:
    return any(name == prefix.rstrip(".") or name.startswith(prefix) for prefix in keep)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_scaled(model: nn.Module, precision: str, work_device=None,
                    keep: tuple[str, ...] = HIGH_PRECISION_MODULES) -> dict:
    """Replace every quantisable nn.Linear of `model` by its `precision` ScaledLinear, in place, one layer at a
    time (the float weight of a layer is freed as soon as its 8-bit one exists). Quantisation runs on
    `work_device` (e.g. the GPU for a model held in CPU memory); each layer stays where it was. Returns a report:
    counts, the names kept in the compute dtype and the bytes of the 8-bit weights."""
    if precision not in SCALED_LINEAR_CLASSES:
        raise ConfigError(f"{precision!r} is not a scaled precision; use one of {', '.join(SCALED_PRECISIONS)}")
    cls = SCALED_LINEAR_CLASSES[precision]
    if work_device is not None:
        check_precision_supported(precision, work_device)
    kept, quantised, stored = [], 0, 0
    # Names, not modules: a list of the modules would keep every float Linear alive until the last is replaced (a
    # 16-bit HiDream-I1 read into CPU memory then peaked at its 32 GiB plus its 8-bit copy; the plan measured 48).
    for name in [name for name, module in model.named_modules() if type(module) is nn.Linear]:
        module = model.get_submodule(name)
        if not can_quantize(name, module, keep):
            kept.append(name)
            continue
        layer = cls.from_linear(module, work_device)
        replace_module(model, name, layer)
        quantised += 1
        stored += layer.weight.numel() * layer.weight.element_size()
    model.requires_grad_(False)
    logger.info("%s: %d Linear layers in 8 bits (%.2f GiB of weights), %d kept in the compute dtype: %s", precision,
                quantised, stored / 2**30, len(kept), ", ".join(kept[:6]) + (" ..." if len(kept) > 6 else ""))
    return {"precision": precision, "quantised_layers": quantised, "kept_layers": kept, "weight_bytes": stored}
