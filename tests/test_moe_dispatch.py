"""The sorted MoE dispatch computes diffusers' training-mode MoE: output, input gradient, load-balancing loss and
its gradient, and gradients of LoKr adapters on the experts."""
from __future__ import annotations

import copy

import torch

from trainer_core.hidream import LoadBalancingLoss
from trainer_core.speedups.moe_dispatch import install_sorted_moe, uninstall_sorted_moe


def _moe(dim: int = 48, seed: int = 0):
    from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU

    torch.manual_seed(seed)
    moe = MOEFeedForwardSwiGLU(dim=dim, hidden_dim=4 * dim, num_routed_experts=4, num_activated_experts=2)
    moe.requires_grad_(False)
    return moe.train()


def _run(moe, x, lb: LoadBalancingLoss):
    x = x.clone().requires_grad_(True)
    lb.clear()
    y = moe(x)
    aux = lb.take()
    (y.square().mean() + aux).backward()
    return y.detach(), aux.detach(), x.grad


def test_sorted_dispatch_matches_diffusers_training_path():
    stock = _moe()
    fast = copy.deepcopy(stock)
    assert install_sorted_moe(fast) == 1
    x = torch.randn(2, 37, 48)
    lb_stock, lb_fast = LoadBalancingLoss(stock, 0.01), LoadBalancingLoss(fast, 0.01)
    y0, aux0, gx0 = _run(stock, x, lb_stock)
    y1, aux1, gx1 = _run(fast, x, lb_fast)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux1, aux0, rtol=0, atol=0)  # the gate runs unchanged; its hook still fires
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-7)


def test_load_balancing_gradient_only_path():
    """The aux loss' gradient (through the gate scores) reaches the input identically."""
    stock = _moe(seed=3)
    fast = copy.deepcopy(stock)
    install_sorted_moe(fast)
    x = torch.randn(1, 50, 48)
    grads = []
    for moe in (stock, fast):
        lb = LoadBalancingLoss(moe, 0.5)
        xi = x.clone().requires_grad_(True)
        lb.clear()
        moe(xi)
        lb.take().backward()
        grads.append(xi.grad)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-9)


def test_expert_without_tokens():
    stock = _moe(seed=1)
    with torch.no_grad():
        # positive inputs, positive gate rows 0-2 and a negative row 3: expert 3 never wins a top-2 slot
        stock.gate.weight.abs_()
        stock.gate.weight[3].neg_()
    fast = copy.deepcopy(stock)
    install_sorted_moe(fast)
    x = torch.randn(1, 29, 48).abs()
    assert not (stock.gate(x)[0] == 3).any()
    y0, aux0, gx0 = _run(stock, x, LoadBalancingLoss(stock, 0.01))
    y1, aux1, gx1 = _run(fast, x, LoadBalancingLoss(fast, 0.01))
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-7)


def test_lokr_on_experts_trains_identically():
    """LoKr hooks on the expert Linears (the "all FFNs" presets) see the same rows and get the same gradients."""
    from lycoris import LycorisNetwork, create_lycoris

    stock = _moe(seed=1)
    fast = copy.deepcopy(stock)
    install_sorted_moe(fast)
    grads = []
    x = torch.randn(1, 29, 48)
    for moe in (stock, fast):
        LycorisNetwork.apply_preset({"target_module": [], "module_algo_map": {}, "target_name": [],
                                     "name_algo_map": {"experts.*": {"factor": 4}}, "use_fnmatch": True,
                                     "exclude_name": []})
        net = create_lycoris(moe, 1.0, linear_dim=16384, linear_alpha=1, algo="lokr", factor=4, full_matrix=True,
                             bypass_mode=True)
        net.apply_to()
        assert len(net.loras) == 12
        with torch.no_grad():
            g = torch.Generator().manual_seed(5)
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        _run(moe, x, LoadBalancingLoss(moe, 0.01))
        grads.append({n: p.grad for n, p in net.named_parameters()})
    assert set(grads[0]) == set(grads[1])
    for name, g0 in grads[0].items():
        assert g0 is not None and g0.abs().max() > 0, name
        torch.testing.assert_close(grads[1][name], g0, rtol=1e-4, atol=1e-8, msg=name)


def test_eval_mode_keeps_diffusers_inference_path_and_uninstall_restores():
    stock = _moe(seed=2).eval()
    fast = copy.deepcopy(stock)
    install_sorted_moe(fast)
    x = torch.randn(2, 11, 48)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), stock(x), rtol=0, atol=0)
    uninstall_sorted_moe(fast)
    assert "forward" not in fast.__dict__
    fast.train()
    stock.train()
    torch.testing.assert_close(fast(x), stock(x), rtol=0, atol=0)
