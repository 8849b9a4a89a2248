"""The sorted MoE dispatch computes diffusers' training-mode MoE: output, input gradient, load-balancing loss and
its gradient, and gradients of LoKr adapters on the experts."""
from __future__ import annotations

import copy

import pytest
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


def _expert_lokr(moe):
    """A LoKr (bypass, full matrices, random factors) on every routed expert Linear of `moe`."""
    from lycoris import LycorisNetwork, create_lycoris

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
    return net


def test_expert_without_tokens():
    """An expert no token is routed to: the same outputs and input gradient as diffusers' loop, and a LoKr on it
    gets a zero gradient, not none: under DDP every rank must reduce a gradient for every LoKr parameter, also a
    rank whose batch routed nothing to that expert (tests/test_distributed.py). (diffusers' loop calls the expert
    on an empty slice, which LyCORIS' own bypass forward cannot reshape: that side runs without a LoKr here. The
    trainer's networks take it: test_stock_moe_and_lycoris_bypass_train_with_an_idle_expert.)"""
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
    net = _expert_lokr(fast)
    _run(fast, x, LoadBalancingLoss(fast, 0.01))
    grads = {n: p.grad for n, p in net.named_parameters()}
    idle = [n for n in grads if "experts_3_" in n]
    assert len(idle) == 6  # W1 and W2 of w1, w2, w3
    assert all(grads[n] is not None and not grads[n].any() for n in idle)
    assert all(grads[n].abs().max() > 0 for n in grads if n not in idle)


def _idle_expert_3(transformer):
    """Route no token of any MoE layer to expert 3 (its slots go to expert 0), whatever the inputs."""
    def reroute(_gate, _args, out):
        idx, weight, aux = out
        return idx.masked_fill(idx == 3, 0), weight, aux

    return [m.register_forward_hook(reroute) for m in transformer.modules() if type(m).__name__ == "MoEGate"]


@pytest.mark.parametrize("precision", ["no_change", "int8-quanto"])
def test_stock_moe_and_lycoris_bypass_train_with_an_idle_expert(tiny_transformer, precision):
    """Both switches off (diffusers' MoE loop, LyCORIS' own bypass forward) with a LoKr on the routed experts, and
    no token routed to expert 3: diffusers calls that expert on an empty slice, whose reshape LyCORIS' bypass
    refused ("cannot reshape tensor of 0 elements", adapters/lokr.py `allow_empty_inputs`). The step runs, its loss
    and LoKr gradients equal the sped-up step's, the idle experts' LoKr get zero gradients (not none: DDP), the
    others non-zero ones. On a float and an int8 base (the LoKr is in bypass mode on both)."""
    from test_speedups import CONFIG, _loss_and_grads, _set_factors

    from trainer_core.adapters import create_lokr_network
    from trainer_core.quant import quantize_frozen
    from trainer_core.speedups import Speedups, apply_speedups

    results = []
    for speedups in (Speedups(fast_lokr=False, fast_moe_dispatch=False), Speedups()):
        transformer = copy.deepcopy(tiny_transformer)
        quantize_frozen(transformer, precision)
        transformer.requires_grad_(False)
        network = create_lokr_network(transformer, CONFIG)
        assert all(lora.bypass_mode for lora in network.loras)
        _set_factors(network)
        apply_speedups(transformer, network, speedups)
        _idle_expert_3(transformer)
        results.append(_loss_and_grads(transformer, network))
    (flow0, aux0, grads0), (flow1, aux1, grads1) = results
    assert torch.isfinite(torch.tensor([flow0, aux0])).all()
    experts = [n for n in grads0 if "_ff_i_experts_" in n]
    idle = [n for n in experts if "_experts_3_" in n]
    assert idle and len(idle) < len(experts)
    assert all(not grads0[n].any() for n in idle)
    assert all(grads0[n].abs().max() > 0 for n in experts if n not in idle)
    assert flow1 == pytest.approx(flow0, rel=1e-5) and aux1 == pytest.approx(aux0, rel=1e-5)
    assert set(grads1) == set(grads0)
    for name, g0 in grads0.items():
        torch.testing.assert_close(grads1[name], g0, rtol=1e-4, atol=1e-7, msg=name)


def test_lokr_on_experts_trains_identically():
    """LoKr hooks on the expert Linears (the "all FFNs" presets) see the same rows and get the same gradients."""
    stock = _moe(seed=1)
    fast = copy.deepcopy(stock)
    install_sorted_moe(fast)
    grads = []
    x = torch.randn(1, 29, 48)
    for moe in (stock, fast):
        net = _expert_lokr(moe)
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


# ------------------------------------------------------------------------------------------- grouped dispatch

def _grouped_pair(seed: int = 0, dim: int = 48):
    from trainer_core.speedups.moe_dispatch import install_moe_dispatch

    stock = _moe(dim=dim, seed=seed)
    stock.gate.weight.requires_grad_(True)  # so the test sees the gate's own gradient path (via the aux loss)
    fast = copy.deepcopy(stock)
    report = install_moe_dispatch(fast)
    assert report["grouped_moe_layers"] == 1 and report["sorted_moe_layers"] == 0, report
    return stock, fast


def _run_with_gate_grad(moe, x, lb, upstream=None):
    xi = x.clone().requires_grad_(True)
    inputs = upstream(xi) if upstream is not None else xi
    lb.clear()
    y = moe(inputs)
    aux = lb.take()
    (y.square().mean() + aux).backward()
    return {"y": y.detach(), "aux": aux.detach(), "x_grad": xi.grad, "gate_grad": moe.gate.weight.grad.clone(),
            **({"upstream_grad": upstream.weight.grad.clone()} if upstream is not None else {})}


def test_grouped_dispatch_equals_diffusers_outputs_and_every_gradient():
    """Outputs, the load-balancing loss, the input's gradient, the gate weight's gradient (through the aux loss and
    the top-k weights) and an upstream trainable layer's gradient: float32, to rounding."""
    from trainer_core.util.host_sync import HostSyncCounter

    stock, fast = _grouped_pair()
    torch.manual_seed(1)
    upstream = torch.nn.Linear(48, 48)
    ups = [upstream, copy.deepcopy(upstream)]
    x = torch.randn(2, 37, 48)
    results = []
    for moe, up in zip((stock, fast), ups):
        with HostSyncCounter() as syncs:
            results.append(_run_with_gate_grad(moe, x, LoadBalancingLoss(moe, 0.3), up))
        results[-1]["syncs"] = syncs.total
    ref, got = results
    assert ref["syncs"] > 0 and got["syncs"] == 0  # diffusers' boolean masks read the host; the grouped path never
    for key in ("y", "aux", "x_grad", "gate_grad", "upstream_grad"):
        assert ref[key].abs().max() > 0, key
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-7, msg=key)


def test_grouped_dispatch_uses_the_stacked_weights_the_experts_hold():
    """The experts' weights are views into the stacks (no second copy): a change to one expert's weight is what
    the grouped GEMM computes with, and remove restores independent weights with the same values."""
    from trainer_core.speedups.moe_dispatch import stacks_intact, uninstall_sorted_moe

    stock, fast = _grouped_pair(seed=4)
    assert stacks_intact(fast)
    weights = sum(p.numel() for p in fast.parameters())
    assert weights == sum(p.numel() for p in stock.parameters())
    x = torch.randn(1, 23, 48)
    with torch.no_grad():
        for moe in (stock, fast):
            moe.experts[2].w3.weight.mul_(3.0)  # through the expert: the stack sees it (it is the same memory)
        torch.testing.assert_close(fast(x), stock(x), rtol=1e-5, atol=1e-6)
    state = {k: v.clone() for k, v in fast.state_dict().items()}
    uninstall_sorted_moe(fast)
    assert not stacks_intact(fast) and "forward" not in fast.__dict__ and "forward" not in fast.gate.__dict__
    assert all(torch.equal(fast.state_dict()[k], v) for k, v in state.items())
    assert fast.experts[0].w1.weight.untyped_storage().data_ptr() != \
        fast.experts[0].w3.weight.untyped_storage().data_ptr()


def test_grouped_dispatch_with_an_idle_expert_and_in_eval_mode():
    stock, fast = _grouped_pair(seed=1)
    with torch.no_grad():
        for moe in (stock, fast):
            moe.gate.weight.abs_()
            moe.gate.weight[3].neg_()
    x = torch.randn(1, 29, 48).abs()
    assert not (stock.gate(x)[0] == 3).any()  # expert 3 gets no row: an empty group
    ref = _run_with_gate_grad(stock, x, LoadBalancingLoss(stock, 0.01))
    got = _run_with_gate_grad(fast, x, LoadBalancingLoss(fast, 0.01))
    for key in ("y", "aux", "x_grad", "gate_grad"):
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-7, msg=key)
    stock.eval(), fast.eval()
    with torch.no_grad():  # diffusers' moe_infer (sorted, scatter-add) vs the same grouped path
        torch.testing.assert_close(fast(x), stock(x), rtol=1e-5, atol=1e-6)


def test_grouped_dispatch_keeps_the_sorted_one_for_hooked_or_quantised_experts():
    from lycoris import LycorisNetwork, create_lycoris
    from optimum.quanto import freeze, qint8, quantize

    from trainer_core.speedups.moe_dispatch import install_moe_dispatch

    hooked = _moe(seed=2)
    LycorisNetwork.apply_preset({"target_module": [], "module_algo_map": {}, "target_name": [],
                                 "name_algo_map": {"experts.*": {"factor": 4}}, "use_fnmatch": True,
                                 "exclude_name": []})
    create_lycoris(hooked, 1.0, linear_dim=16384, linear_alpha=1, algo="lokr", factor=4, full_matrix=True,
                   bypass_mode=True).apply_to()
    report = install_moe_dispatch(hooked)
    assert report["grouped_moe_layers"] == 0 and report["sorted_moe_layers"] == 1
    assert any("hooked" in why for why in report["sorted_moe_why"]), report

    quantised = _moe(seed=3)
    quantize(quantised, weights=qint8)
    freeze(quantised)
    report = install_moe_dispatch(quantised)
    assert report["grouped_moe_layers"] == 0 and any("QLinear" in w for w in report["sorted_moe_why"]), report


def test_an_moe_other_than_the_checked_one_keeps_diffusers_forward(caplog):
    """The dispatches reimplement diffusers 0.42.1's MoE: for other MoE code (a real alternative forward), neither
    is installed, one log line says so, and the layer computes what that code computes."""
    import logging

    from diffusers.models.transformers import transformer_hidream_image as stock_module

    from trainer_core.speedups.moe_dispatch import install_moe_dispatch

    class MOEFeedForwardSwiGLU(stock_module.MOEFeedForwardSwiGLU):  # e.g. a newer diffusers' MoE
        def forward(self, x):
            return super().forward(x) * 1.0

    stock = _moe()
    changed = copy.deepcopy(stock)
    changed.__class__ = MOEFeedForwardSwiGLU
    x = torch.randn(2, 37, 48)
    with caplog.at_level(logging.WARNING, logger="trainer_core.speedups.checked"):
        assert install_sorted_moe(changed) == 0
        report = install_moe_dispatch(changed)
    assert report["grouped_moe_layers"] == report["sorted_moe_layers"] == 0
    assert "fast_moe_dispatch is off" in report["moe_dispatch_off"]
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "MOEFeedForwardSwiGLU.forward" in said[0]
    assert "forward" not in changed.__dict__
    torch.testing.assert_close(changed(x), stock(x), rtol=0, atol=0)
