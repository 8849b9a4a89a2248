"""THE call of HiDream-I1's transformer (training, eval loss, sampling and the benchmark all predict through here),
and the order its blocks run in.

Conventions (HiDream, diffusers' pipeline and SimpleTuner agree): the transformer takes `timesteps` = 1000 * sigma
and its raw output approximates x0 - noise, so the flow velocity d x_sigma / d sigma = noise - x0 is the negated
output. In train() mode diffusers 0.42.1 returns per-patch tokens, which `patch_tokens_to_image` turns back into
(B, C, h, w); in eval() mode the output is already in that layout.
"""
from __future__ import annotations

import torch

from .embeds import PromptEmbeds
from .flow_matching import patch_tokens_to_image


def compute_dtype(transformer: torch.nn.Module) -> torch.dtype:
    """The dtype the transformer computes in: that of its first floating-point parameter (a quantised base keeps
    its biases and norms in it)."""
    return next(p for p in transformer.parameters() if p.dtype.is_floating_point).dtype


def predict_flow(transformer: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                 embeds: PromptEmbeds) -> torch.Tensor:
    """The predicted velocity (noise - x0), (B, C, h, w), for noisy latents (B, C, h, w) at `timesteps` (B,)
    = 1000 * sigma. Inputs are cast to the transformer's dtype; the output stays in it."""
    _, _, h, w = latents.shape
    dtype = compute_dtype(transformer)
    embeds = embeds.to(device=latents.device, dtype=dtype)
    output = transformer(hidden_states=latents.to(dtype), timesteps=timesteps,
                         encoder_hidden_states_t5=embeds.t5, encoder_hidden_states_llama3=embeds.llama,
                         pooled_embeds=embeds.pooled, return_dict=False)[0]
    return -patch_tokens_to_image(output, h, w)  # raw output is x0 - noise


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer's blocks in execution order: the double-stream blocks, then the single-stream ones."""
    return [*getattr(transformer, "double_stream_blocks", []), *getattr(transformer, "single_stream_blocks", [])]
