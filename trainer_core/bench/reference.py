"""The two sides of every comparison: the stock LyCORIS LoKr a library user writes (the reference) and the
trainer's own LoKr with its speed-ups (the project); and the check that both compute the same loss and gradients."""
from __future__ import annotations

import math

import torch

from ..speedups.switches import Speedups, apply_speedups
from .setup import LOKR_FACTOR


def reference_lokr(model, device: torch.device, lokr_mode: str):
    """Stock LyCORIS exactly as a user of the library writes it (the starting point's `add_lokr`)."""
    from lycoris import LycorisNetwork, create_lycoris

    LycorisNetwork.apply_preset({"target_module": ["HiDreamAttention"],
                                 "module_algo_map": {"HiDreamAttention": {"factor": LOKR_FACTOR}}})
    kwargs = {"bypass_mode": True} if lokr_mode == "bypass" else {}
    network = create_lycoris(model, 1.0, linear_dim=16384, linear_alpha=1, algo="lokr", factor=LOKR_FACTOR,
                             full_matrix=True, **kwargs)
    network.apply_to()
    network.to(device)
    return network


def project_lokr(model, device: torch.device, speedups: Speedups, compile_cache=None):
    """The trainer's LoKr: `create_lokr_network` with the default (quickstart attention-only) preset, sped up."""
    from ..adapters.lokr import LycorisConfig, create_lokr_network

    network = create_lokr_network(model, LycorisConfig(factor=LOKR_FACTOR), seed=0)
    network.to(device)
    report = apply_speedups(model, network, speedups, compile_cache=compile_cache)
    return network, report


@torch.no_grad()
def set_lokr_weights(network, seed: int = 0) -> None:
    """Deterministic non-zero factors (by module name), so both W1 and W2 get gradient and dW is not zero."""
    for lora in sorted(network.loras, key=lambda l: l.lora_name):
        g = torch.Generator().manual_seed(seed + sum(map(ord, lora.lora_name)))
        for name, param in sorted(lora.named_parameters()):
            std = 0.25 if name.startswith("lokr_w1") else 5e-3
            param.copy_(torch.randn(param.shape, generator=g) * std)


def lokr_grads(network) -> dict[str, torch.Tensor]:
    out = {}
    for lora in network.loras:
        for name, param in lora.named_parameters():
            if param.grad is not None:
                out[f"{lora.lora_name}.{name}"] = param.grad.detach().float().cpu().clone()
    return out


def remove_network(network) -> None:
    for lora in network.loras:
        lora.restore()


def compare(reference: dict, project: dict, loss_ref: float, loss_proj: float, dtype: torch.dtype,
            quantised: bool = False) -> dict:
    """Loss relative difference and the relative L2 error of the concatenated LoKr gradient. `quantised` (an 8-bit
    base against the unquantised step): the issue's bounds instead, loss within 2 % and gradient cosine >= 0.99."""
    missing = sorted(set(reference) ^ set(project))
    keys = sorted(set(reference) & set(project))
    ref = torch.cat([reference[k].flatten() for k in keys]) if keys else torch.zeros(1)
    proj = torch.cat([project[k].flatten() for k in keys]) if keys else torch.zeros(1)
    grad_err = ((proj - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    cosine = torch.nn.functional.cosine_similarity(proj, ref, dim=0).item()
    loss_err = abs(loss_proj - loss_ref) / max(abs(loss_ref), 1e-30)
    tol_loss, tol_grad = (2e-2, 5e-2) if dtype in (torch.bfloat16, torch.float16) else (1e-4, 1e-3)
    grads_ok = grad_err <= tol_grad
    tolerance = {"loss": tol_loss, "grad": tol_grad}
    if quantised:
        tol_loss, grads_ok, tolerance = 2e-2, cosine >= 0.99, {"loss": 2e-2, "grad_cosine": 0.99}
    return {"loss_reference": loss_ref, "loss_project": loss_proj, "loss_rel_err": loss_err,
            "grad_rel_err": grad_err, "grad_cosine": cosine, "grad_tensors": len(keys),
            "tolerance": tolerance,
            "passed": bool(not missing and keys and loss_err <= tol_loss and grads_ok and
                           math.isfinite(loss_proj)), **({"mismatched_grads": missing[:5]} if missing else {})}
