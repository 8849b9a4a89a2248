"""Eval loss: the flow-matching loss of held-out images at fixed noise and fixed timesteps.

Each eval image is scored at `num_timesteps` sigmas evenly spaced in (0, 1), with noise from a generator seeded
per image, so the number moves only when the model does. Nothing here touches the training random streams
(the caller also forks the global RNG around it), so a run with eval has the same training losses as one without.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..data.cache import TextEmbeddingCache
from ..data.datasets import TrainingSample
from ..hidream.flow_matching import flow_matching_loss, flow_matching_target, noisy_latents
from ..hidream.embeds import PromptEmbeds

# predict(latents_in (B, C, h, w), sigmas (B,), embeds) -> flow prediction (B, C, h, w), noise - x0
Predict = Callable[[torch.Tensor, torch.Tensor, PromptEmbeds], torch.Tensor]


@torch.no_grad()
def eval_loss(samples: Sequence[TrainingSample], load_latents: Callable[[list[TrainingSample]], torch.Tensor],
              text_cache: TextEmbeddingCache, predict: Predict, num_timesteps: int, seed: int,
              device: torch.device) -> float:
    """Mean flow-matching loss over every (sample, timestep) pair."""
    sigmas = (torch.arange(num_timesteps, dtype=torch.float32) + 0.5) / num_timesteps
    total = 0.0
    for index, sample in enumerate(samples):
        latents = load_latents([sample]).to(device).expand(num_timesteps, -1, -1, -1)
        generator = torch.Generator().manual_seed(seed * 100_003 + index)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        embeds = text_cache.load([sample.caption] * num_timesteps)
        prediction = predict(noisy_latents(latents, noise, sigmas.to(device)), sigmas.to(device), embeds)
        total += flow_matching_loss(prediction, flow_matching_target(latents, noise)).item()
    return total / max(1, len(samples))
