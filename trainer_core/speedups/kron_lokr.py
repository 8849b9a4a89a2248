"""LoKr applied through its Kronecker structure, with the adapter's delta folded into one GEMM and nothing saved.

For a Linear with weight W (out, in) and a LoKr dW = s * kron(W1, W2), W1 (a, b), W2 (c, d), out = a*c, in = b*d:

    y = x W^T + bias + s * vec(W1 X W2^T)          X = x viewed as (b, d) per token

LyCORIS' default forward rebuilds W + dW as a full matrix every call; its bypass forward avoids that but runs the
chain as reshape -> linear(W2) -> transpose -> linear(W1) -> transpose -> reshape-copy -> * scale -> * scalar -> add,
with transposed copies, activation-sized elementwise passes, and autograd keeping an activation-sized intermediate
per adapted layer. Here (`KroneckerDelta`, one autograd node per layer):

    V = (s * W1) X              (N, a, d)   small batched matmul; the scale rides on the 16x16 W1
    y.view(N*a, c) = base + V.view(N*a, d) @ W2^T    one addmm whose beta=1 accumulation *is* the residual add

and for the backward only x (which the base Linear keeps anyway: the same tensor), W1 and W2 are saved; V is
recomputed from them (N*in*a multiply-adds, a small fraction of the base layer's N*in*out). At HiDream-I1 size that
is ~3 GiB of activations less than a saved V at 1024 px. Gradients:

    gY = dL/dy viewed (N, a, c);  gV = gY W2;  dW2 = sum_n gY^T V;  dW1 = sum_n gV X^T;  dx = W1^T gV

W1 and W2 arrive dense (a low-rank factor is multiplied out first: it is tiny), so autograd carries their
gradients back to w1_a/w1_b, w2_a/w2_b, the scale and the trainable scalar. Handled: full or low-rank W1 and W2,
`scale` (alpha / dim), `multiplier`, `scalar`, bias, quantised base layers (the base forward stays the module's own).
Anything else (Conv, Tucker, DoRA weight decomposition, rank/plain dropout) keeps LyCORIS' own bypass forward:
`install_kron_lokr` reports how many it skipped.
"""
from __future__ import annotations

import logging
import types

import torch
from torch import nn

logger = logging.getLogger(__name__)

_MARK = "_hidream_fast_bypass"
_BATCHED = "_hidream_batched_kron"


def supports_fast_bypass(lora) -> bool:
    """True when `lora` is a LyCORIS LokrModule on a Linear whose bypass maths this module reproduces."""
    if type(lora).__name__ != "LokrModule" or getattr(lora, "module_type", None) != "linear":
        return False
    if getattr(lora, "wd", False) or getattr(lora, "tucker", False):
        return False
    if getattr(lora, "rank_dropout", 0) or getattr(lora, "dropout", 0):
        return False
    return isinstance(getattr(lora, "drop", None), nn.Identity)


def _dims(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(N, a, b, c, d) for x (N, b*d), w1 (a, b), w2 (c, d)."""
    (a, b), (c, d) = w1.shape, w2.shape
    return x.shape[0], a, b, c, d


class KroneckerDelta(torch.autograd.Function):
    """y = base + vec(W1 X W2^T) per token, saving x, W1, W2 only (V is recomputed in the backward).

    x (N, b*d), base (N, a*c), w1 (a, b), w2 (c, d), all one dtype -> y (N, a*c).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        n, a, b, c, d = _dims(x, w1, w2)
        # einsum, not matmul with a broadcast W1: matmul would run N batched 16x16 GEMMs, einsum one GEMM.
        v = torch.einsum("ab,nbd->nad", w1, x.reshape(n, b, d))  # (N, a, d) = W1 X
        ctx.save_for_backward(x, w1, w2)
        return torch.addmm(base.reshape(n * a, c), v.reshape(n * a, d), w2.t()).view(n, a * c)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, w1, w2 = ctx.saved_tensors
        n, a, b, c, d = _dims(x, w1, w2)
        xg = x.reshape(n, b, d)
        gy = grad_y.reshape(n * a, c)
        gv = torch.mm(gy, w2).view(n, a, d)  # dL/dV
        grad_x = grad_w1 = grad_w2 = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.einsum("ab,nad->nbd", w1, gv).reshape(n, b * d)  # W1^T gV
        if ctx.needs_input_grad[2]:
            grad_w1 = torch.einsum("nad,nbd->ab", gv, xg)
        if ctx.needs_input_grad[3]:
            v = torch.einsum("ab,nbd->nad", w1, xg).reshape(n * a, d)  # recomputed: cheaper than keeping it
            grad_w2 = torch.mm(gy.t(), v)
        return grad_x, grad_y, grad_w1, grad_w2


class BatchedKroneckerDelta(torch.autograd.Function):
    """The same y as `KroneckerDelta`, with no activation-sized copy anywhere (`batched_lokr`):

        Z = X W2^T                 (N*b, c)   one GEMM on the (N*b, d) view of x, which is x itself
        y.view(N, a, c) = base + W1 Z          one baddbmm: W1 broadcast over tokens, the residual add fused

    `KroneckerDelta`'s einsum keeps W1 X a single GEMM by permuting x and V into copies (two in the forward, six in
    the backward); here the forward is two GEMM kernels and the backward five plus a small sum. The price is that
    the W1 products are batched (a x b) @ (b x c) GEMMs, one per token, which a GPU may run slowly: this form is off
    by default until a GPU run measures it. Saved for backward: x, W1, W2 (Z is recomputed, as V is there).

    x (N, b*d), base (N, a*c), w1 (a, b), w2 (c, d), all one dtype -> y (N, a*c).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        n, a, b, c, d = _dims(x, w1, w2)
        z = torch.mm(x.reshape(n * b, d), w2.t()).view(n, b, c)  # X W2^T
        ctx.save_for_backward(x, w1, w2)
        return torch.baddbmm(base.reshape(n, a, c), w1.expand(n, a, b), z).view(n, a * c)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, w1, w2 = ctx.saved_tensors
        n, a, b, c, d = _dims(x, w1, w2)
        gy = grad_y.reshape(n, a, c)
        gz = torch.bmm(w1.t().expand(n, b, a), gy).view(n * b, c)  # dL/dZ = W1^T gY
        grad_x = grad_w1 = grad_w2 = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(gz, w2).view(n, b * d)
        if ctx.needs_input_grad[2]:
            z = torch.mm(x.reshape(n * b, d), w2.t()).view(n, b, c)  # recomputed: cheaper than keeping it
            grad_w1 = torch.bmm(gy, z.transpose(1, 2)).sum(0)  # sum over tokens of gY Z^T
        if ctx.needs_input_grad[3]:
            grad_w2 = torch.mm(gz.t(), x.reshape(n * b, d))
        return grad_x, grad_y, grad_w1, grad_w2


def _dense_factors(lora, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    w1 = lora.lokr_w1 if lora.use_w1 else lora.lokr_w1_a @ lora.lokr_w1_b
    w2 = lora.lokr_w2 if lora.use_w2 else lora.lokr_w2_a @ lora.lokr_w2_b
    return w1.to(dtype), w2.to(dtype)


def kron_bypass_linear(lora, x: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    """Base layer output plus multiplier * scale * scalar * kron(W1, W2) applied to x (..., in) -> (..., out)."""
    base = lora.org_forward(x)
    dtype = base.dtype
    w1, w2 = _dense_factors(lora, dtype)
    # Fold every scalar factor into the small W1 (a*b elements) instead of the activations (N*out elements).
    w1 = w1 * (lora.scalar.to(device=w1.device, dtype=dtype) * (lora.scale * multiplier))
    out_features = base.shape[-1]
    delta = BatchedKroneckerDelta if getattr(lora, _BATCHED, False) else KroneckerDelta
    y = delta.apply(x.to(dtype).reshape(-1, x.shape[-1]), base.reshape(-1, out_features), w1, w2)
    return y.view(*x.shape[:-1], out_features)


def _fast_bypass_forward(self, x, scale=1):
    return kron_bypass_linear(self, x, scale)


def install_kron_lokr(network, batched: bool = False) -> tuple[int, int]:
    """Route each supported LoKr module's bypass forward through `kron_bypass_linear` (`batched`: in the
    `BatchedKroneckerDelta` form).

    Returns (installed, skipped). Only the bypass path changes: LyCORIS' `forward` still decides between module
    dropout, bypass and rebuild, so a module in rebuild mode is untouched (train with bypass_mode=True).
    """
    installed = skipped = 0
    for lora in network.loras:
        if supports_fast_bypass(lora):
            lora.bypass_forward = types.MethodType(_fast_bypass_forward, lora)
            setattr(lora, _MARK, True)
            setattr(lora, _BATCHED, batched)
            installed += 1
        else:
            skipped += 1
    if skipped:
        logger.info("fast LoKr bypass: %d modules use it, %d keep LyCORIS' own forward (conv, tucker, DoRA or "
                    "dropout)", installed, skipped)
    return installed, skipped


def uninstall_kron_lokr(network) -> None:
    """Give every module back LyCORIS' own bypass forward."""
    for lora in network.loras:
        lora.__dict__.pop(_BATCHED, None)
        if lora.__dict__.pop(_MARK, False):
            lora.__dict__.pop("bypass_forward", None)
