"""The Kronecker LoKr path computes LyCORIS' bypass maths: outputs, input gradients and factor gradients."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from trainer_core.speedups.kron_lokr import install_kron_lokr, supports_fast_bypass, uninstall_kron_lokr
from trainer_core.bench.profile import KernelCounter


def _lokr_network(model: nn.Module, multiplier: float = 1.0, **kwargs):
    from lycoris import LycorisNetwork, create_lycoris

    LycorisNetwork.apply_preset({"target_module": ["Linear"], "module_algo_map": {}, "name_algo_map": {},
                                 "target_name": [], "use_fnmatch": False, "exclude_name": []})
    linear_dim = kwargs.pop("linear_dim", 16384)
    linear_alpha = kwargs.pop("linear_alpha", 1)
    network = create_lycoris(model, multiplier, linear_dim=linear_dim, linear_alpha=linear_alpha, algo="lokr",
                             bypass_mode=True, **kwargs)
    network.apply_to()
    with torch.no_grad():  # non-zero factors everywhere, so every gradient is exercised
        g = torch.Generator().manual_seed(1)
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return network


def _forward_backward(model, network, x):
    x = x.clone().requires_grad_(True)
    for p in network.parameters():
        p.grad = None
    y = model(x)
    (y.square().mean() + y.sum() * 1e-3).backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in network.named_parameters()}


VARIANTS = {
    "full_matrix_factor": dict(factor=4, full_matrix=True),
    "low_rank_w2": dict(factor=4, linear_dim=2, linear_alpha=3),
    "low_rank_w1_and_w2": dict(factor=-1, linear_dim=2, linear_alpha=1, decompose_both=True),
    "scalar_and_multiplier": dict(factor=8, full_matrix=True, use_scalar=True),
}


# Every LoKr test runs on both forms of the fast path: the einsum one (default) and `batched_lokr`.
both_forms = pytest.mark.parametrize("batched", [False, True], ids=["einsum", "batched"])


@both_forms
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fast_bypass_matches_lycoris_bypass(variant, batched):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(96, 128), nn.SiLU(), nn.Linear(128, 64, bias=False))
    model = copy.deepcopy(base)
    network = _lokr_network(model, multiplier=0.7, **VARIANTS[variant])
    if variant == "low_rank_w1_and_w2":
        assert any(hasattr(lora, "lokr_w1_a") for lora in network.loras)
    if variant == "low_rank_w2":
        assert any(hasattr(lora, "lokr_w2_a") for lora in network.loras)
    x = torch.randn(3, 5, 96)
    ref_y, ref_gx, ref_g = _forward_backward(model, network, x)

    assert install_kron_lokr(network, batched=batched) == (len(network.loras), 0)
    y, gx, g = _forward_backward(model, network, x)
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-7)
    assert set(g) == set(ref_g)
    for name in g:
        assert ref_g[name].abs().max() > 0, name
        torch.testing.assert_close(g[name], ref_g[name], rtol=1e-4, atol=1e-7, msg=name)

    uninstall_kron_lokr(network)
    y_again, _, _ = _forward_backward(model, network, x)
    torch.testing.assert_close(y_again, ref_y, rtol=0, atol=0)


def test_unsupported_modules_keep_lycoris_forward():
    model = nn.Sequential(nn.Linear(32, 32))
    network = _lokr_network(model, factor=4, full_matrix=True, dora_wd=True)
    assert not supports_fast_bypass(network.loras[0])
    x = torch.randn(4, 32)
    before = model(x)
    assert install_kron_lokr(network) == (0, 1)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


@both_forms
def test_bf16_activations_with_float32_factors(batched):
    """Training shape: bf16 base, float32 LoKr factors; the delta runs in the activation dtype, like LyCORIS."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64)).to(torch.bfloat16)
    network = _lokr_network(model, factor=8, full_matrix=True)
    x = torch.randn(2, 7, 64, dtype=torch.bfloat16)
    ref_y, _, ref_g = _forward_backward(model, network, x)
    install_kron_lokr(network, batched=batched)
    y, _, g = _forward_backward(model, network, x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref_y.float(), rtol=2e-2, atol=2e-2)
    for name in g:
        assert g[name].dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(g[name].flatten(), ref_g[name].flatten(), dim=0)
        assert cos > 0.999, name


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of `fn()`."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@both_forms
def test_fast_path_keeps_no_activation_sized_tensor_for_backward(batched):
    """The Kronecker path saves what the base Linear saves (its input) plus the small factors: no intermediate of
    the activation's size (LyCORIS' bypass keeps one per layer; at HiDream-I1 size that is gigabytes)."""
    torch.manual_seed(0)
    x = torch.randn(256, 512, requires_grad=True)
    plain = nn.Linear(512, 512)
    base_only = _saved_bytes(lambda: plain(x))
    model = nn.Sequential(copy.deepcopy(plain))
    network = _lokr_network(model, factor=16, full_matrix=True)
    stock = _saved_bytes(lambda: model(x))
    install_kron_lokr(network, batched=batched)
    fast = _saved_bytes(lambda: model(x))
    factors = sum(p.numel() * p.element_size() for p in network.parameters())
    activation = x.numel() * x.element_size()
    assert fast - base_only <= 2 * factors < activation
    assert stock - base_only >= activation  # what the fast path saves: LyCORIS keeps an activation-sized tensor


def test_batched_form_launches_fewer_kernels_and_copies_nothing():
    """What `batched_lokr` is for: on a launch-bound GPU step every kernel counts. Per adapted layer, forward
    and backward, it dispatches fewer kernels than the einsum form and no activation-sized copy (`clone`)."""
    torch.manual_seed(0)
    counts = {}
    for batched in (False, True):
        model = nn.Sequential(nn.Linear(160, 160)).requires_grad_(False)
        network = _lokr_network(model, factor=16, full_matrix=True)
        install_kron_lokr(network, batched=batched)
        x = torch.randn(64, 160, requires_grad=True)
        with KernelCounter() as forward:
            y = model(x)
        grad = torch.randn_like(y)
        with KernelCounter() as backward:
            y.backward(grad)
        counts[batched] = forward.by_op + backward.by_op
    einsum, batched = counts[False], counts[True]
    assert einsum["clone"] >= 4  # the einsum's permuted copies of x and V
    assert batched["clone"] == 0 and batched["baddbmm"] == 1
    assert batched.total() < einsum.total()
