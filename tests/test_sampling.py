"""The sampler (trainer_core/hidream/sample.py) against independent statements of what it should compute: the
guidance-rescale formula, and diffusers' own HiDreamImagePipeline drawing the same picture on the tiny model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_conditioning
from trainer_core.config import SamplingConfig
from trainer_core.hidream import denoise, load_text_encoders, load_transformer, load_vae, predict_flow, \
    rescale_guidance, sample_image


def _std(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).std(dim=1)


def test_guidance_rescale_gives_the_formulas_std_and_keeps_the_direction():
    """Lin et al. 2023 (sec. 3.4): out = a * guided * std(cond) / std(guided) + (1 - a) * guided, per sample. Its
    std is a * std(cond) + (1 - a) * std(guided) and it stays a positive multiple of the guided prediction."""
    g = torch.Generator().manual_seed(0)
    guided = torch.randn(3, 16, 8, 8, generator=g) * torch.tensor([3.0, 1.5, 0.5]).view(3, 1, 1, 1)
    cond = torch.randn(3, 16, 8, 8, generator=g)
    for amount in (0.0, 0.3, 0.7, 1.0):
        out = rescale_guidance(guided, cond, amount)
        expected = amount * _std(cond) + (1 - amount) * _std(guided)
        torch.testing.assert_close(_std(out), expected, rtol=1e-5, atol=0)
        ratio = out / guided
        assert torch.all(ratio > 0) and torch.allclose(ratio, ratio.flatten(1)[:, :1].view(3, 1, 1, 1), rtol=1e-4)


def test_the_sampler_rescales_its_guided_velocity(tiny_transformer):
    """One Euler step from sigma_0 to 0 moves the latents by -sigma_0 * v: the v the sampler used, read back from
    its output, has the formula's std given the model's own conditional and guided velocities (computed here)."""
    cond, uncond = random_conditioning(tiny_transformer, seed=1), random_conditioning(tiny_transformer, seed=2)
    settings = SamplingConfig(width=64, height=64, num_inference_steps=1, guidance=15.0, shift=3.0, seed=5,
                              scheduler="euler")
    start = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(settings.seed))
    sigma0 = 1.0  # a one-step Euler schedule starts at pure noise
    tiny_transformer.eval()
    with torch.no_grad():
        t = torch.full((1,), 1000.0 * sigma0)
        v_cond = predict_flow(tiny_transformer, start, t, cond).float()
        v_uncond = predict_flow(tiny_transformer, start, t, uncond).float()
    guided = v_uncond + settings.guidance * (v_cond - v_uncond)
    assert (_std(guided) / _std(v_cond)).item() > 1.2  # strong guidance inflates the std: there is something to pull
    for amount in (0.0, 0.5, 1.0):
        latents = denoise(tiny_transformer, cond, uncond, SamplingConfig(**{**vars(settings),
                                                                           "guidance_rescale": amount}))
        used = (start - latents) / sigma0
        expected = amount * _std(v_cond) + (1 - amount) * _std(guided)
        torch.testing.assert_close(_std(used), expected, rtol=1e-4, atol=0)


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir):
    """diffusers' HiDreamImagePipeline on the tiny folder, offline: `from_pretrained` of a local diffusers folder
    (model_index.json names every component) with local_files_only reads nothing from a hub. Its `__call__` rescales
    any requested size to an area of (default_sample_size * 8)^2 pixels, 1024^2 for HiDream-I1 (default_sample_size
    128, the real model's max_resolution); set to 8 here, so its forced size is the 64x64 both sides ask for."""
    from diffusers import HiDreamImagePipeline

    pipe = HiDreamImagePipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32, local_files_only=True)
    pipe.default_sample_size = 8
    pipe.set_progress_bar_config(disable=True)
    return pipe


PROMPT = "a red circle on a blue background"


@pytest.mark.parametrize("scheduler, guidance", [("unipc", 5.0), ("unipc", 1.0), ("euler", 4.0)])
def test_the_sampler_draws_what_diffusers_pipeline_draws(pipeline, tiny_paths, scheduler, guidance):
    """Same seed, steps, guidance, scheduler and shift (the folder's own UniPC, flow_shift 3.0; or flow-matching
    Euler with shift 3.0 put into the pipeline), 64x64: the trainer's sampler (its own text encoding with the
    empty negative prompt, noise, CFG on the negated output with the negative first, scheduler loop and VAE decode)
    gives the pipeline's latents within float32 error and the same picture (at most 1 level of 255 per pixel)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder_scheduler = pipeline.scheduler
    if scheduler == "euler":
        pipeline.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    shift = pipeline.scheduler.config.shift if scheduler == "euler" else pipeline.scheduler.config.flow_shift
    common = dict(height=64, width=64, num_inference_steps=4, guidance_scale=guidance)
    try:
        reference = pipeline(PROMPT, generator=torch.Generator().manual_seed(11), output_type="latent",
                             **common).images
        pixels = pipeline(PROMPT, generator=torch.Generator().manual_seed(11), output_type="np", **common).images[0]
    finally:
        pipeline.scheduler = folder_scheduler
    assert reference.shape == (1, 16, 8, 8)  # the pipeline kept the 64x64 asked for

    encoders = load_text_encoders(tiny_paths, dtype=torch.float32)
    cond, uncond = encoders.encode([PROMPT]), encoders.encode([""])
    settings = SamplingConfig(prompt=PROMPT, width=64, height=64, num_inference_steps=4, guidance=guidance,
                              shift=shift, seed=11, scheduler=scheduler)
    image, latents = sample_image(load_transformer(tiny_paths), load_vae(tiny_paths), cond, uncond, settings)
    error = (latents - reference).abs().max().item()
    print(f"\n{scheduler}, guidance {guidance}: max abs latent difference {error:.3g} "
          f"(latents' max {reference.abs().max().item():.3g})")
    torch.testing.assert_close(latents, reference, rtol=1e-4, atol=1e-4)
    ours = np.asarray(image, dtype=np.int16)
    theirs = np.round(pixels * 255).astype(np.int16)
    assert ours.shape == theirs.shape == (64, 64, 3) and np.abs(ours - theirs).max() <= 1
