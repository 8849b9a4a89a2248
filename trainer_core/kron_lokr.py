"""LoKr applied through its Kronecker structure, with the adapter's delta folded into one GEMM.

For a Linear with weight W (out, in) and a LoKr dW = s * kron(W1, W2), W1 (a, b), W2 (c, d), out = a*c, in = b*d:

    y = x W^T + bias + s * vec(W1 X W2^T)          X = x viewed as (b, d) per token

LyCORIS' bypass forward (4.1.3, eager or per-op compiled) already avoids building kron(W1, W2), but it runs the
chain as reshape -> linear(W2) -> transpose -> linear(W1) -> transpose -> reshape-copy -> * scale -> * scalar -> add,
i.e. two transposed copies and three activation-sized elementwise passes per adapted layer. Here:

    V = (s * W1) X              (N, a, d)   small matmul; the scale rides on the 16x16 W1, not on activations
    y.view(N*a, c) += V.view(N*a, d) @ W2^T    one addmm whose beta=1 accumulation *is* the residual add

so per adapted layer there is the base linear, one small batched matmul and one addmm, with no activation-sized
temporaries besides V and no elementwise kernels. Gradients flow through plain torch ops (autograd), so the maths
is LyCORIS' bypass maths: only the summation order of the delta differs.

Handled: full or low-rank W1 (w1_a @ w1_b, rebuilt: it is tiny), full or low-rank W2 (w2_a (c, r), w2_b (r, d):
V @ w2_b^T then addmm with w2_a^T), `scale` (alpha / dim), `multiplier`, trainable `scalar`, bias, quantised base
layers (the base forward stays the module's own). Anything else (Conv, Tucker, DoRA weight decomposition,
rank/plain dropout) keeps LyCORIS' own bypass forward: `install_kron_lokr` reports how many it skipped.
"""
from __future__ import annotations

import logging
import types

import torch
from torch import nn

logger = logging.getLogger(__name__)

_MARK = "_hidream_fast_bypass"


def supports_fast_bypass(lora) -> bool:
    """True when `lora` is a LyCORIS LokrModule on a Linear whose bypass maths this module reproduces."""
    if type(lora).__name__ != "LokrModule" or getattr(lora, "module_type", None) != "linear":
        return False
    if getattr(lora, "wd", False) or getattr(lora, "tucker", False):
        return False
    if getattr(lora, "rank_dropout", 0) or getattr(lora, "dropout", 0):
        return False
    return isinstance(getattr(lora, "drop", None), nn.Identity)


def _factor_w1(lora, dtype: torch.dtype) -> torch.Tensor:
    if lora.use_w1:
        return lora.lokr_w1.to(dtype)
    return (lora.lokr_w1_a @ lora.lokr_w1_b).to(dtype)


def kron_bypass_linear(lora, x: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    """Base layer output plus multiplier * scale * scalar * kron(W1, W2) applied to x (..., in) -> (..., out)."""
    base = lora.org_forward(x)
    dtype = base.dtype
    w1 = _factor_w1(lora, dtype)  # (a, b)
    a, b = w1.shape
    lead = x.shape[:-1]
    n = x.numel() // x.shape[-1]
    in_features = x.shape[-1]
    d = in_features // b
    # Fold every scalar factor into the small W1 (a*b elements) instead of the activations (N*out elements).
    coeff = lora.scale * multiplier
    w1 = w1 * (lora.scalar.to(device=w1.device, dtype=dtype) * coeff)
    xg = x.to(dtype).reshape(n, b, d)
    v = torch.einsum("ab,nbd->nad", w1, xg)  # (N, a, d): W1 X
    out_features = base.shape[-1]
    c = out_features // a
    acc = base.reshape(n * a, c)
    v = v.reshape(n * a, d)
    if lora.use_w2:
        y = torch.addmm(acc, v, lora.lokr_w2.to(dtype).t())  # (N*a, c) = base + (W1 X) W2^T
    else:
        low = v @ lora.lokr_w2_b.to(dtype).t()  # (N*a, r)
        y = torch.addmm(acc, low, lora.lokr_w2_a.to(dtype).t())
    return y.reshape(*lead, out_features)


def _fast_bypass_forward(self, x, scale=1):
    return kron_bypass_linear(self, x, scale)


def install_kron_lokr(network) -> tuple[int, int]:
    """Route each supported LoKr module's bypass forward through `kron_bypass_linear`.

    Returns (installed, skipped). Only the bypass path changes: LyCORIS' `forward` still decides between module
    dropout, bypass and rebuild, so a module in rebuild mode is untouched (train with bypass_mode=True).
    """
    installed = skipped = 0
    for lora in network.loras:
        if supports_fast_bypass(lora):
            lora.bypass_forward = types.MethodType(_fast_bypass_forward, lora)
            setattr(lora, _MARK, True)
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
        if lora.__dict__.pop(_MARK, False):
            lora.__dict__.pop("bypass_forward", None)
