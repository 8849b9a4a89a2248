"""Image sampling with the HiDream transformer: flow-matching scheduler loop with classifier-free guidance.

The loop is HiDream's pipeline loop without its forced ~1 MP resize (so previews of small tiny-model runs stay
cheap): noise -> for each timestep: model on [uncond, cond], negate, guide, scheduler step -> VAE decode.
With a LoKr network, `lokr_applied` runs it as it trained: merged into float32 base weights (restored exactly
afterwards), through its bypass hooks on 16-bit or quantised ones.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from PIL import Image

from ..config.schema import SamplingConfig
from ..adapters.lokr import lokr_applied
from .embeds import PromptEmbeds
from .forward import GraphedPredict, compute_dtype, predict_flow
from .vae import latents_to_images


def make_scheduler(name: str, shift: float, num_train_timesteps: int = 1000):
    """A diffusers flow-matching scheduler with a static shift: UniPC (HiDream-I1-Full's) or Euler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if name == "unipc":
        return UniPCMultistepScheduler(num_train_timesteps=num_train_timesteps, prediction_type="flow_prediction",
                                       use_flow_sigmas=True, flow_shift=shift)
    if name == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
    raise ValueError(f"unknown scheduler {name!r}; use 'unipc' or 'euler'")


@torch.no_grad()
def denoise(transformer, cond: PromptEmbeds, uncond: Optional[PromptEmbeds], settings: SamplingConfig,
            progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Sample latents (1, C, H/8, W/8) float32 for one prompt. CFG runs when `uncond` is given and guidance > 1."""
    settings.validate()
    device = next(transformer.parameters()).device
    channels = transformer.config.in_channels
    generator = torch.Generator().manual_seed(settings.seed)
    latents = torch.randn((1, channels, settings.height // 8, settings.width // 8), generator=generator)
    latents = latents.to(device)

    use_cfg = uncond is not None and settings.guidance > 1.0
    embeds = PromptEmbeds.cat([uncond, cond]) if use_cfg else cond
    embeds = embeds.to(device=device, dtype=compute_dtype(transformer))  # once, not at every step
    scheduler = make_scheduler(settings.scheduler, settings.shift)
    # The schedule stays in CPU memory: the scheduler looks its steps up by value (a host read), and only the
    # transformer needs each timestep on the device.
    scheduler.set_timesteps(settings.num_inference_steps)

    was_training = transformer.training
    transformer.eval()  # the MoE inference path (no aux loss)
    # Compiled blocks (compile_blocks) run here as in training; with settings.cuda_graphs the whole transformer
    # call is replayed from a CUDA graph after two warm-up steps (GraphedPredict; the plain call on a CPU).
    predict = GraphedPredict(transformer) if settings.cuda_graphs else \
        (lambda x, t, e: predict_flow(transformer, x, t, e))
    try:
        for i, t in enumerate(scheduler.timesteps):
            model_input = torch.cat([latents, latents]) if use_cfg else latents
            velocity = predict(model_input, t.expand(model_input.shape[0]).to(device), embeds).float()
            if use_cfg:
                v_uncond, v_cond = velocity.chunk(2)
                velocity = v_uncond + settings.guidance * (v_cond - v_uncond)
                if settings.guidance_rescale > 0:
                    velocity = rescale_guidance(velocity, v_cond, settings.guidance_rescale)
            latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
            if progress:
                progress(i + 1, len(scheduler.timesteps))
    finally:
        transformer.train(was_training)
    return latents.float()


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, amount: float) -> torch.Tensor:
    """Pull the guided prediction's per-sample std back towards the conditional one's (Lin et al. 2023, sec. 3.4):
    strong guidance inflates it, which over-saturates images. amount 0 = plain CFG, 1 = fully rescaled."""
    dims = tuple(range(1, guided.dim()))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-12))
    return amount * rescaled + (1.0 - amount) * guided




def sample_image(transformer, vae, cond: PromptEmbeds, uncond: Optional[PromptEmbeds], settings: SamplingConfig,
                 network=None, progress: Optional[Callable[[int, int], None]] = None
                 ) -> tuple[Image.Image, torch.Tensor]:
    """One image and its latents, with `network` (a LoKr) applied at settings.lokr_strength if given."""
    ctx = lokr_applied(network, settings.lokr_strength) if network is not None else contextlib.nullcontext()
    with ctx:
        latents = denoise(transformer, cond, uncond, settings, progress)
    return latents_to_images(vae, latents)[0], latents
