"""Flow-matching maths and the train-mode quirks of diffusers' HiDream (layout, MoE gradient, aux loss)."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import random_conditioning
from trainer_core.hidream import (LoadBalancingLoss, flow_matching_loss, flow_matching_target, noisy_latents,
                                        patch_tokens_to_image, resolution_shift, sample_sigmas, shift_sigmas)


def test_shift_is_identity_at_one_and_pushes_noisier_above_one():
    s = torch.linspace(0.01, 0.99, 50)
    assert torch.allclose(shift_sigmas(s, 1.0), s)
    shifted = shift_sigmas(s, 3.0)
    assert torch.all(shifted > s)
    assert shifted[24].item() == pytest.approx(3 * s[24].item() / (1 + 2 * s[24].item()))


def test_resolution_shift_endpoints():
    assert resolution_shift(128, 128) == pytest.approx(math.exp(1.15))  # 1 MP: 4096 tokens
    assert resolution_shift(32, 32) == pytest.approx(math.exp(0.5))  # 256 tokens


def test_logit_normal_sigmas_are_seeded_and_centred():
    a = sample_sigmas(4000, torch.Generator().manual_seed(1))
    b = sample_sigmas(4000, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert 0.0 < a.min() and a.max() < 1.0
    assert a.median().item() == pytest.approx(0.5, abs=0.03)


def test_noisy_latents_and_target_are_what_diffusers_flow_scheduler_integrates():
    """The convention against an independent implementation, diffusers' FlowMatchEulerDiscreteScheduler (HiDream's
    pipelines sample with its family): its `scale_noise` is `noisy_latents` at its own sigma, its timesteps are
    1000 * sigma, and its Euler `step` fed `flow_matching_target` carries x_sigma exactly to x_sigma' of the next
    sigma. A target of the opposite sign (x0 - noise) would walk away from x0's path."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    assert torch.allclose(noisy_latents(x0, noise, torch.zeros(2)), x0)
    assert torch.allclose(noisy_latents(x0, noise, torch.ones(2)), noise)
    for i in (0, 4, 8):
        t, sigma, sigma_next = scheduler.timesteps[i], scheduler.sigmas[i], scheduler.sigmas[i + 1]
        assert t.item() == pytest.approx(1000 * sigma.item(), rel=1e-6)
        x_sigma = noisy_latents(x0, noise, sigma.expand(2))
        torch.testing.assert_close(scheduler.scale_noise(x0, t.expand(2), noise), x_sigma)

        def euler_step(velocity: torch.Tensor) -> torch.Tensor:
            scheduler.set_timesteps(10)  # a fresh walk: step() finds its place from t
            return scheduler.step(velocity, t, x_sigma, return_dict=False)[0]

        stepped = euler_step(flow_matching_target(x0, noise))
        torch.testing.assert_close(stepped, noisy_latents(x0, noise, sigma_next.expand(2)), rtol=1e-5, atol=1e-5)
        assert (euler_step(-flow_matching_target(x0, noise)) - stepped).abs().max() > 0.1


def test_loss_is_float32_mean_squared_error():
    pred = torch.ones(2, 3, 2, 2, dtype=torch.bfloat16)
    target = torch.zeros(2, 3, 2, 2)
    loss = flow_matching_loss(pred, target)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(1.0)


@pytest.mark.parametrize("shape", [(16, 16), (16, 8)])
def test_train_layout_conversion_matches_eval_output(tiny_transformer, shape):
    """Train-mode output (B, C, S, 4) converted here equals eval-mode (B, C, H, W), square and padded non-square."""
    h, w = shape
    cond = random_conditioning(tiny_transformer, batch=2)
    x = torch.randn(2, 16, h, w, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([500.0, 250.0])
    kwargs = dict(hidden_states=x, timesteps=t, encoder_hidden_states_t5=cond.t5,
                  encoder_hidden_states_llama3=cond.llama, pooled_embeds=cond.pooled, return_dict=False)
    with torch.no_grad():
        tiny_transformer.eval()
        reference = tiny_transformer(**kwargs)[0]
        tiny_transformer.train()
        raw = tiny_transformer(**kwargs)[0]
    assert raw.shape[-1] == 4 and reference.shape == (2, 16, h, w)
    converted = patch_tokens_to_image(raw, h, w)
    assert torch.allclose(converted, reference, atol=1e-5)


def test_routed_experts_get_gradient_only_in_train_mode(tiny_transformer):
    """Why the trainer never switches to eval(): diffusers' MoE inference path has no gradient."""
    tiny_transformer.requires_grad_(True)
    cond = random_conditioning(tiny_transformer)
    x = torch.randn(1, 16, 8, 8)
    expert_w = tiny_transformer.double_stream_blocks[0].block.ff_i.experts[0].w1.weight

    def expert_grad(train: bool):
        tiny_transformer.zero_grad()
        tiny_transformer.train(train)
        out = tiny_transformer(hidden_states=x, timesteps=torch.tensor([500.0]), encoder_hidden_states_t5=cond.t5,
                               encoder_hidden_states_llama3=cond.llama, pooled_embeds=cond.pooled,
                               return_dict=False)[0]
        out.float().pow(2).mean().backward()
        return expert_w.grad

    assert expert_grad(True) is not None and expert_grad(True).abs().sum() > 0
    assert expert_grad(False) is None


def test_load_balancing_loss_is_collected_with_gradient(tiny_transformer):
    from trainer_core.adapters import LycorisConfig, create_lokr_network

    network = create_lokr_network(tiny_transformer, LycorisConfig(use_scalar=False), init_lokr_norm=1e-2)
    lb = LoadBalancingLoss(tiny_transformer, alpha=0.01)
    n_gates = len(tiny_transformer.double_stream_blocks) + len(tiny_transformer.single_stream_blocks)
    assert lb.num_gates == n_gates
    cond = random_conditioning(tiny_transformer)
    tiny_transformer.train()
    lb.clear()
    tiny_transformer(hidden_states=torch.randn(1, 16, 8, 8), timesteps=torch.tensor([300.0]),
                     encoder_hidden_states_t5=cond.t5, encoder_hidden_states_llama3=cond.llama,
                     pooled_embeds=cond.pooled, return_dict=False)
    aux = lb.take()
    assert aux is not None and aux.requires_grad
    # alpha * sum_e P_e f_e: exactly alpha for perfectly balanced routing, never below alpha * k / E
    assert 0.005 <= aux.item() <= 0.04
    aux.backward()
    grads = [p.grad for p in network.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert lb.take() is None  # cleared: no graph survives the step
    lb.remove()
