"""HiDream attention whose rotary position embedding runs its backward as one inverse rotation.

diffusers' HiDream attention processor (0.42.1) rotates q and k by upcasting them to float32, viewing each head
vector as D/2 pairs, and forming `F[..., 0] * x0 + F[..., 1] * x1`, where F (S, D/2, 2, 2) holds one 2x2 rotation
per position and pair. Autograd differentiates that expression piece by piece: the products' backward, a reduction
over the broadcast pair axis, and for each of the two pair selections a zero-filled float32 tensor of the input's
size that the gradient is scattered into, then a sum and casts: about a dozen activation-sized float32 passes for
each of q and k.

A rotation's backward is the inverse rotation of the incoming gradient, Fᵀ g. `PairRotation` runs the forward with
the same float32 expression, so values are bit-identical, and its backward is that same expression with F transposed
(about five passes). On a CPU that makes the rope's forward plus backward 1.4-1.9x faster (measured outside the
tests; the benchmark's `without_lean_rope` ablation gives the effect on a whole step). `LeanRopeAttnProcessor` is
HiDream's attention with that rotation; `install_lean_rope` puts it on every attention module and
`uninstall_lean_rope` takes it off again.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .checked import mismatch, module_function

_STOCK_PROCESSOR = "_hidream_stock_attn_processor"


def rotate_pairs(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, D) rotated pairwise by freqs (B or 1, S, 1, D/2, 2, 2) in float32; returns x's dtype."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    rotated = freqs[..., 0] * pairs[..., 0] + freqs[..., 1] * pairs[..., 1]
    return rotated.reshape(*x.shape).type_as(x)


class PairRotation(torch.autograd.Function):
    """y = rotate_pairs(x, freqs); the backward is rotate_pairs(grad, freqsᵀ) and saves only `freqs`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(freqs)
        return rotate_pairs(x, freqs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (freqs,) = ctx.saved_tensors
        return rotate_pairs(grad, freqs.transpose(-1, -2)), None


def _rope(query: torch.Tensor, key: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k (B, S, H, D); when the rope covers only the first half of D (its 2 x pairs < D), the rest is
    left as is, as in diffusers."""
    if query.shape[-1] == freqs.shape[-3] * 2:
        return PairRotation.apply(query, freqs), PairRotation.apply(key, freqs)
    (q_rot, q_pass), (k_rot, k_pass) = query.chunk(2, dim=-1), key.chunk(2, dim=-1)
    return (torch.cat([PairRotation.apply(q_rot, freqs), q_pass], dim=-1),
            torch.cat([PairRotation.apply(k_rot, freqs), k_pass], dim=-1))


class LeanRopeAttnProcessor:
    """HiDream's joint attention (image stream, plus the text stream in double blocks) with `PairRotation`.

    hidden_states (B, N_img, C), encoder_hidden_states (B, N_txt, C) or None in single blocks,
    image_rotary_emb (1, N_img + N_txt, 1, D/2, 2, 2) -> (B, N_img, C), plus (B, N_txt, C) in double blocks.
    """

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor,
                 hidden_states_masks: Optional[torch.Tensor] = None,
                 encoder_hidden_states: Optional[torch.Tensor] = None,
                 image_rotary_emb: Optional[torch.Tensor] = None, *args, **kwargs):
        dtype = hidden_states.dtype
        batch = hidden_states.shape[0]
        head_dim = attn.inner_dim // attn.heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, N, H*D) -> (B, N, H, D)
            return t.view(batch, -1, attn.heads, head_dim)

        query = heads(attn.q_rms_norm(attn.to_q(hidden_states)).to(dtype=dtype))
        key = heads(attn.k_rms_norm(attn.to_k(hidden_states)).to(dtype=dtype))
        value = heads(attn.to_v(hidden_states))
        if hidden_states_masks is not None:
            key = key * hidden_states_masks.view(batch, -1, 1, 1)
        image_tokens = query.shape[1]
        if not attn.single:  # the text stream has its own projections and joins the same attention
            query = torch.cat([query, heads(attn.q_rms_norm_t(attn.to_q_t(encoder_hidden_states)).to(dtype=dtype))],
                              dim=1)
            key = torch.cat([key, heads(attn.k_rms_norm_t(attn.to_k_t(encoder_hidden_states)).to(dtype=dtype))],
                            dim=1)
            value = torch.cat([value, heads(attn.to_v_t(encoder_hidden_states))], dim=1)
        query, key = _rope(query, key, image_rotary_emb)

        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                             dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        if attn.single:
            return attn.to_out(out)
        return attn.to_out(out[:, :image_tokens]), attn.to_out_t(out[:, image_tokens:])


def is_hidream_attention(module: nn.Module) -> bool:
    return type(module).__name__ == "HiDreamAttention" and type(getattr(module, "processor", None)).__name__ == \
        "HiDreamAttnProcessor"


def unchecked_attention(module: nn.Module) -> Optional[str]:
    """None when `module`'s diffusers attention (its forward, its processor and the rope it applies) is what
    `LeanRopeAttnProcessor` was checked against (checked.py), else why the stock processor must stay."""
    return mismatch("lean_rope", {"HiDreamAttnProcessor.__call__": type(module.processor).__call__,
                                  "HiDreamAttention.forward": type(module).forward,
                                  "apply_rope": module_function(type(module), "apply_rope")})


def install_lean_rope(transformer: nn.Module) -> int:
    """Give every HiDream attention module of `transformer` the lean-rope processor. Returns how many (0 when
    the installed diffusers' attention is not the code it was checked against)."""
    installed = 0
    for module in transformer.modules():
        if is_hidream_attention(module) and _STOCK_PROCESSOR not in module.__dict__ and \
                not unchecked_attention(module):
            module.__dict__[_STOCK_PROCESSOR] = module.processor
            module.set_processor(LeanRopeAttnProcessor())
            installed += 1
    return installed


def uninstall_lean_rope(transformer: nn.Module) -> None:
    for module in transformer.modules():
        stock = module.__dict__.pop(_STOCK_PROCESSOR, None)
        if stock is not None:
            module.set_processor(stock)
