"""All speed-ups together on the tiny HiDream transformer compute the stock stack's training loss, LoKr gradients and
load-balancing loss (float32, tight tolerance); the int8 path frees activations and keeps quanto's maths; merged
sampling equals bypass sampling with the speed-ups on."""
from __future__ import annotations

import copy

import torch

from trainer_core.hidream import (LoadBalancingLoss, flow_matching_loss, flow_matching_target, noisy_latents,
                                        patch_tokens_to_image)
from trainer_core.adapters import LycorisConfig, create_lokr_network, lokr_applied
from trainer_core.speedups import Speedups, apply_speedups, remove_speedups

from conftest import cfg_forward, random_conditioning


def _set_factors(network, seed=0):
    with torch.no_grad():
        for lora in sorted(network.loras, key=lambda l: l.lora_name):
            g = torch.Generator().manual_seed(seed + sum(map(ord, lora.lora_name)))
            for name, p in sorted(lora.named_parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "w1" in name else 0.05))


def _loss_and_grads(transformer, network, checkpointing=False):
    transformer.train()
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    lb = LoadBalancingLoss(transformer, 0.01)
    embeds = random_conditioning(transformer, batch=2, seed=3)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 16, 8, 8, generator=g)
    noise = torch.randn(2, 16, 8, 8, generator=g)
    sigmas = torch.tensor([0.3, 0.8])
    out = transformer(hidden_states=noisy_latents(x0, noise, sigmas), timesteps=sigmas * 1000,
                      encoder_hidden_states_t5=embeds.t5, encoder_hidden_states_llama3=embeds.llama,
                      pooled_embeds=embeds.pooled, return_dict=False)[0]
    flow = flow_matching_loss(-patch_tokens_to_image(out, 8, 8), flow_matching_target(x0, noise))
    aux = lb.take()
    (flow + aux).backward()
    lb.remove()
    grads = {f"{l.lora_name}.{n}": p.grad.clone() for l in network.loras for n, p in l.named_parameters()}
    return flow.item(), aux.item(), grads


CONFIG = LycorisConfig(factor=4, apply_preset={"target_module": ["HiDreamAttention", "HiDreamImageFeedForwardSwiGLU"],
                                               "module_algo_map": {}})


def test_speedups_compute_the_stock_training_step(tiny_transformer):
    results = []
    for options, checkpointing in ((Speedups.none(), False), (Speedups(), False), (Speedups(), True),
                                   (Speedups(batched_lokr=True), False)):
        transformer = copy.deepcopy(tiny_transformer)
        network = create_lokr_network(transformer, CONFIG)
        _set_factors(network)
        report = apply_speedups(transformer, network, options)
        if options.fast_lokr:  # attention, ff_t, shared and routed experts: all handled by the fast path
            assert report["fast_lokr_modules"] == len(network.loras) and report["stock_lokr_modules"] == 0
            assert report["sorted_moe_layers"] > 0
        results.append(_loss_and_grads(transformer, network, checkpointing))
    (flow0, aux0, grads0), *others = results
    assert any(g.abs().max() > 0 for n, g in grads0.items() if "_ff_i_experts_" in n)  # routed experts really train
    for flow, aux, grads in others:
        assert abs(flow - flow0) <= 1e-5 * abs(flow0)
        assert abs(aux - aux0) <= 1e-6 * abs(aux0)
        assert set(grads) == set(grads0)
        for name, g0 in grads0.items():
            torch.testing.assert_close(grads[name], g0, rtol=1e-4, atol=1e-7, msg=name)


def test_remove_speedups_restores_stock_forwards(tiny_transformer):
    network = create_lokr_network(tiny_transformer, CONFIG)
    apply_speedups(tiny_transformer, network)
    remove_speedups(tiny_transformer, network)
    assert not any("bypass_forward" in lora.__dict__ for lora in network.loras)
    assert not any(type(m).__name__ == "MOEFeedForwardSwiGLU" and "forward" in m.__dict__
                   for m in tiny_transformer.modules())


def test_merged_sampling_equals_fast_bypass(tiny_transformer):
    network = create_lokr_network(tiny_transformer, CONFIG)
    _set_factors(network)
    apply_speedups(tiny_transformer, network)
    forward = cfg_forward(tiny_transformer.eval(), seed=5)
    bypass = forward()
    with lokr_applied(network) as how:
        merged = forward()
    assert how == "merged"
    network.set_multiplier(0.0)
    base = forward()
    assert (bypass - base).abs().max() > 1e-3  # the LoKr changes the output
    torch.testing.assert_close(merged, bypass, rtol=1e-4, atol=1e-5)


def test_lean_int8_backward_frees_activations_and_keeps_quanto_maths():
    from optimum.quanto import freeze, qint8, quantize

    from trainer_core.speedups.frozen_qlinear import install_frozen_qlinear

    def frozen_int8():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
        quantize(model, weights=qint8)
        freeze(model)
        return model.requires_grad_(False)

    stock, lean = frozen_int8(), frozen_int8()
    assert install_frozen_qlinear(lean) == 2
    x = torch.randn(32, 64)

    def run(model):
        saved = []
        xi = x.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            y = model(xi)
        y.square().sum().backward()
        return y.detach(), xi.grad, sum(saved)

    y0, g0, saved0 = run(stock)
    y1, g1, saved1 = run(lean)
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-7)
    # quanto keeps both layers' inputs (32x64 + 32x256 values); the lean layers keep none of them
    assert saved0 - saved1 >= 32 * 64 + 32 * 256


def test_speedups_on_int8_base_with_lokr(tiny_transformer):
    """Quantised base: LoKr runs in bypass on QLinear; the lean int8 backward is its base forward."""
    from trainer_core.quant import quantize_frozen

    results = []
    for options in (Speedups.none(), Speedups()):
        transformer = quantize_frozen(copy.deepcopy(tiny_transformer), "int8-quanto")
        network = create_lokr_network(transformer, CONFIG)
        _set_factors(network)
        report = apply_speedups(transformer, network, options)
        if options.lean_int8_backward:
            assert report["lean_int8_layers"] > len(network.loras)
        results.append(_loss_and_grads(transformer, network, checkpointing=True))
    (flow0, aux0, grads0), (flow1, aux1, grads1) = results
    assert abs(flow1 - flow0) <= 1e-5 * abs(flow0)
    for name, g0 in grads0.items():
        torch.testing.assert_close(grads1[name], g0, rtol=1e-4, atol=1e-7, msg=name)


def test_load_balancing_hooks_keep_nothing_from_checkpoint_recomputation(tiny_transformer):
    """With checkpointing the backward re-runs every block; the aux losses it re-fires must not be kept (each would
    pin a recomputed block's activations until the next step)."""
    network = create_lokr_network(tiny_transformer, CONFIG)
    _set_factors(network)
    apply_speedups(tiny_transformer, network)
    tiny_transformer.train()
    tiny_transformer.enable_gradient_checkpointing()
    lb = LoadBalancingLoss(tiny_transformer, 0.01)
    embeds = random_conditioning(tiny_transformer, seed=1)
    for _ in range(2):
        lb.clear()
        out = tiny_transformer(hidden_states=torch.randn(1, 16, 8, 8), timesteps=torch.tensor([400.0]),
                               encoder_hidden_states_t5=embeds.t5, encoder_hidden_states_llama3=embeds.llama,
                               pooled_embeds=embeds.pooled, return_dict=False)[0]
        aux = lb.take()
        assert aux is not None and aux.requires_grad
        (out.square().mean() + aux).backward()
        assert lb._losses == []  # the recomputation fired the hooks; nothing was kept
