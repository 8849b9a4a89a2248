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


def hidream_transformer(model: torch.nn.Module) -> torch.nn.Module:
    """The HiDream transformer itself, also when the trainer calls it through DDP: DistributedDataParallel wraps
    a module whose `.transformer` is the model (training/distributed.py). Its config, buffers and mode live there;
    the call still goes through the wrapper, which averages the LoKr's gradients."""
    inner = getattr(model, "module", model)
    return getattr(inner, "transformer", inner)


def predict_flow(transformer: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                 embeds: PromptEmbeds) -> torch.Tensor:
    """The predicted velocity (noise - x0), (B, C, h, w), for noisy latents (B, C, h, w) at `timesteps` (B,)
    = 1000 * sigma. Inputs are cast to the transformer's dtype; the output stays in it."""
    _, _, h, w = latents.shape
    model = hidream_transformer(transformer)
    dtype = compute_dtype(model)
    embeds = embeds.to(device=latents.device, dtype=dtype)
    # In eval() mode diffusers crops its output per sample with sizes it reads back from a device tensor (two host
    # syncs per sample, and no CUDA graph can hold them). Its train-mode layout is the same values before the
    # crop, which patch_tokens_to_image makes on the host's known sizes: the top-level module alone is put in
    # train mode for the call (its blocks stay in eval: MoE inference routing, no aux loss), then put back.
    layout_only = not model.training
    if layout_only:
        model.training = True
    tokens, masks, img_ids, img_sizes = patchify_cached(model, latents.to(dtype))
    try:
        output = transformer(hidden_states=tokens, timesteps=timesteps, img_ids=img_ids, img_sizes=img_sizes,
                             hidden_states_masks=masks, encoder_hidden_states_t5=embeds.t5,
                             encoder_hidden_states_llama3=embeds.llama, pooled_embeds=embeds.pooled,
                             return_dict=False)[0]
    finally:
        if layout_only:
            model.training = False
    return -patch_tokens_to_image(output, h, w)  # raw output is x0 - noise


def patchify_cached(transformer: torch.nn.Module, latents: torch.Tensor):
    """diffusers' `patchify` (0.42.1) with the position ids, sizes and masks of each bucket made once and kept.

    diffusers builds them at every call, `img_sizes` with `torch.tensor([...], device=...)`: a host-to-device copy
    from pageable memory, which no CUDA graph can hold. Passed in, they take diffusers' pre-patchified path; a
    square bucket gets a mask of ones (diffusers' own is None there: its only use, keys * mask, is then exact).
    Returns (tokens (B, S, p*p*C), masks (B, S), img_ids (B, S, 3), img_sizes (B, 2)); S = max_seq if not square.
    """
    b, c, h, w = latents.shape
    p = transformer.config.patch_size
    ph, pw = h // p, w // p
    square = h == w
    seq = ph * pw if square else transformer.max_seq
    key = (b, h, w, latents.device, latents.dtype)
    cache = transformer.__dict__.setdefault("_hidream_bucket_inputs", {})
    if key not in cache:
        device = latents.device
        masks = torch.ones((b, seq), dtype=latents.dtype, device=device)
        if not square:
            masks[:, ph * pw:] = 0.0
        ids = torch.zeros(ph, pw, 3, device=device)
        ids[..., 1] = ids[..., 1] + torch.arange(ph, device=device)[:, None]
        ids[..., 2] = ids[..., 2] + torch.arange(pw, device=device)[None, :]
        ids = ids.reshape(ph * pw, 3)
        if not square:
            padded = torch.zeros(seq, 3, device=device)
            padded[: ph * pw] = ids
            ids = padded
        sizes = torch.empty((b, 2), dtype=torch.int64, device=device)
        sizes[:, 0], sizes[:, 1] = ph, pw
        cache[key] = (masks, ids.unsqueeze(0).repeat(b, 1, 1), sizes)
    masks, img_ids, img_sizes = cache[key]
    x = latents.reshape(b, c, ph, p, pw, p)
    if square:
        tokens = x.permute(0, 2, 4, 3, 5, 1).reshape(b, ph * pw, p * p * c)
    else:
        out = torch.zeros((b, c, seq, p * p), dtype=latents.dtype, device=latents.device)
        out[:, :, : ph * pw] = x.permute(0, 1, 2, 4, 3, 5).reshape(b, c, ph * pw, p * p)
        tokens = out.permute(0, 2, 3, 1).reshape(b, seq, p * p * c)
    return tokens, masks, img_ids, img_sizes


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
