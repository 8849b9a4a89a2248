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
    # In eval() mode diffusers crops its output per sample with sizes it reads back from a device tensor (two host
    # syncs per sample, and no CUDA graph can hold them). Its train-mode layout is the same values before the
    # crop, which patch_tokens_to_image makes on the host's known sizes: the top-level module alone is put in
    # train mode for the call (its blocks stay in eval: MoE inference routing, no aux loss), then put back.
    layout_only = not transformer.training
    if layout_only:
        transformer.training = True
    try:
        output = transformer(hidden_states=latents.to(dtype), timesteps=timesteps,
                             encoder_hidden_states_t5=embeds.t5, encoder_hidden_states_llama3=embeds.llama,
                             pooled_embeds=embeds.pooled, return_dict=False)[0]
    finally:
        if layout_only:
            transformer.training = False
    return -patch_tokens_to_image(output, h, w)  # raw output is x0 - noise


class GraphedPredict:
    """`predict_flow` (no grad: sampling) replayed from a CUDA graph per input signature; on a CPU, or where a
    capture fails (the log says why), the plain call. Call like predict_flow(transformer, ...) without the
    transformer; the output is a fresh tensor."""

    def __init__(self, transformer: torch.nn.Module, warmup: int = 2, graphs=None):
        from ..util.cuda_graphs import SignatureGraphs, cuda_graphs_unavailable

        self.transformer = transformer
        self.device = next(transformer.parameters()).device
        self.why_not = cuda_graphs_unavailable(self.device)
        self.graphs = graphs or SignatureGraphs("sampling step", warmup=warmup, enabled=self.why_not is None)

    def __call__(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        def plain() -> torch.Tensor:
            return predict_flow(self.transformer, latents, timesteps, embeds)

        if not self.graphs.enabled:
            return plain()
        embeds = embeds.to(device=self.device, dtype=compute_dtype(self.transformer))
        inputs = [latents.to(self.device), timesteps.to(self.device), embeds.t5, embeds.llama, embeds.pooled]
        key = tuple((tuple(t.shape), str(t.dtype)) for t in inputs) + (self.transformer.training,)

        def body(static: list) -> torch.Tensor:
            return predict_flow(self.transformer, static[0], static[1],
                                PromptEmbeds(t5=static[2], llama=static[3], pooled=static[4]))

        return self.graphs.run(key, inputs, body, plain).clone()  # a graph's output is overwritten on replay


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer's blocks in execution order: the double-stream blocks, then the single-stream ones."""
    return [*getattr(transformer, "double_stream_blocks", []), *getattr(transformer, "single_stream_blocks", [])]
