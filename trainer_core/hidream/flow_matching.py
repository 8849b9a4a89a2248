"""Rectified-flow maths for HiDream-I1, as the model was trained.

Conventions (HiDream, diffusers' pipeline, SimpleTuner agree):
  x_sigma = (1 - sigma) * x0 + sigma * noise, timesteps = 1000 * sigma,
  the transformer's raw output approximates x0 - noise, so prediction = -output and target = noise - x0.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from torch import nn

SigmaSchedule = Literal["logit_normal", "uniform"]

# diffusers' FlowMatchEulerDiscreteScheduler defaults, which HiDream's resolution-dependent shift uses.
BASE_SHIFT, MAX_SHIFT, BASE_SEQ_LEN, MAX_SEQ_LEN = 0.5, 1.15, 256, 4096


def sample_sigmas(batch_size: int, generator: torch.Generator, schedule: SigmaSchedule = "logit_normal",
                  sigmoid_scale: float = 1.0) -> torch.Tensor:
    """Training noise levels, shape (B,), in (0, 1). Logit-normal: sigmoid(scale * n), n ~ N(0, 1)."""
    if schedule == "logit_normal":
        n = torch.randn(batch_size, generator=generator, dtype=torch.float32)
        return torch.sigmoid(sigmoid_scale * n)
    if schedule == "uniform":
        return torch.rand(batch_size, generator=generator, dtype=torch.float32)
    raise ValueError(f"unknown sigma schedule {schedule!r}; use 'logit_normal' or 'uniform'")


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Push noise levels towards 1 (noisier) by k*s / (1 + (k - 1)*s); k = 1 is the identity."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def resolution_shift(latent_height: int, latent_width: int, patch_size: int = 2) -> float:
    """k = e^mu with mu linear in the image-token count: 0.5 at 256 tokens, 1.15 at 4096 (1 MP)."""
    seq_len = (latent_height // patch_size) * (latent_width // patch_size)
    mu = BASE_SHIFT + (MAX_SHIFT - BASE_SHIFT) * (seq_len - BASE_SEQ_LEN) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return math.exp(mu)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_sigma for latents x0 (B, C, H, W) and sigmas (B,)."""
    s = sigmas.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def flow_matching_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity d x_sigma / d sigma = noise - x0, what -output should equal."""
    return noise - x0


def patch_tokens_to_image(output: torch.Tensor, latent_height: int, latent_width: int,
                          patch_size: int = 2) -> torch.Tensor:
    """Turn the train-mode output layout (B, C, S, p*p) of diffusers' HiDream into (B, C, H, W).

    In train() mode diffusers returns per-patch tokens; for non-square inputs S is padded to the model's max_seq.
    The first (H/p)*(W/p) tokens are the real ones in row-major patch order; padding is dropped here, which is the
    same as masking it out of the loss. An output already in (B, C, H, W) is returned unchanged.
    """
    if output.dim() == 4 and output.shape[-2:] == (latent_height, latent_width):
        return output
    b, c, _, pp = output.shape
    if pp != patch_size * patch_size:
        raise ValueError(f"unexpected transformer output shape {tuple(output.shape)}")
    ph, pw = latent_height // patch_size, latent_width // patch_size
    x = output[:, :, : ph * pw].reshape(b, c, ph, pw, patch_size, patch_size)
    return x.permute(0, 1, 2, 4, 3, 5).reshape(b, c, ph * patch_size, pw * patch_size)


def flow_matching_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32: mean over (C, H, W) per sample, then over the batch."""
    err = (prediction.float() - target.float()) ** 2
    return err.flatten(1).mean(dim=1).mean()


class _AttachGradient(torch.autograd.Function):
    """Returns `carrier` unchanged; in the backward, `aux` receives the constant gradient `scale` (the weight the
    loss it would have been added to gives it) while `carrier`'s gradient passes through. This is how a load-
    balancing loss trains the gate's inputs without being kept, with its graph, outside the forward."""

    @staticmethod
    def forward(ctx, carrier: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return carrier.view_as(carrier)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad.device), None


class LoadBalancingLoss:
    """Collects the MoE load-balancing (auxiliary) loss of every `MoEGate` during one forward pass.

    diffusers computes each gate's aux loss alpha * sum_e P_e * f_e in train() mode and then throws it away; forward
    hooks keep it. `alpha` is set on every gate. `take()` returns the mean over gates (HiDream's official form,
    independent of the number of layers) and clears the list, so graphs never outlive a step.

    Two ways to give it its gradient, the same maths:

    * kept (the default, the stock way): the hooks keep each gate's loss with its graph; `take()`'s mean is added to
      the loss that is backpropagated. Between `take()` and the next `clear()` nothing is collected: with gradient
      checkpointing the backward re-runs every block, and a kept aux loss of a recomputed block would pin that
      block's recomputed activations. The hooks run eagerly even inside compiled blocks.
    * attached (`attach_gradient(weight)`, what the trainer's step uses): each hook ties the gate's loss to the
      gate's top-k weights (`_AttachGradient`), so the backward through the MoE output gives it the gradient
      weight / num_gates that `weight * take()` would; the hooks keep only detached values, for `take()` to log.
      No Python state differs between a forward and its checkpoint recomputation and nothing outlives the forward,
      so a whole block, gate included, compiles into one graph (and a CUDA graph can hold the step).
    """

    def __init__(self, transformer: nn.Module, alpha: float):
        self._losses: list[torch.Tensor] = []
        self._collecting = True
        self._attach: Optional[float] = None  # None: kept; else the weight of take() in the loss backpropagated
        self._handles = []
        gates = [module for module in transformer.modules() if type(module).__name__ == "MoEGate"]
        for module in gates:
            module.alpha = alpha
        self._scale = 1.0 / max(len(gates), 1)
        self._gates = gates
        for module in gates:
            if "_hidream_aux" not in module._buffers:
                # On the gate's device, meta included (a memory plan runs the model on meta: plan/).
                module.register_buffer("_hidream_aux", torch.zeros((), device=module.weight.device),
                                       persistent=False)
            self._handles.append(module.register_forward_hook(self._hook))

    @torch.compiler.disable
    def _keep(self, aux: torch.Tensor) -> None:
        # Eager even inside compiled blocks: the collect-or-not branch must not select between two compiled graphs
        # (checkpoint recomputation would then save other tensors).
        if self._collecting:
            self._losses.append(aux)

    def _hook(self, module, inputs, output):
        aux = output[2] if isinstance(output, tuple) and len(output) > 2 else None
        if aux is None:
            return None
        if self._attach is None:
            self._keep(aux)
            return None
        # The value, for the log, into the gate's own buffer: a Python list appended to inside a compiled block
        # would make dynamo guard on its length (a recompile per block). A recomputation rewrites the same value.
        module._hidream_aux.copy_(aux.detach())
        if self._attach == 0.0:
            return None
        topk_idx, topk_weight, _ = output
        return topk_idx, _AttachGradient.apply(topk_weight, aux, self._attach * self._scale), aux

    def attach_gradient(self, weight: Optional[float]) -> None:
        """From now on give each gate's loss the gradient `weight` times that of `take()`'s mean (0: log only) in
        the backward of the forward itself; None: back to keeping the losses with their graphs."""
        self._attach = None if weight is None else float(weight)

    @property
    def attached(self) -> bool:
        return self._attach is not None

    @property
    def num_gates(self) -> int:
        return len(self._handles)

    def clear(self) -> None:
        """Forget collected losses and collect again; call before each forward."""
        self._losses = []
        self._collecting = True

    def take(self) -> Optional[torch.Tensor]:
        """The mean of this forward's gate losses (with its graph when kept; detached when attached), or None.
        Attached, it is the mean of every gate's value from the last forward that ran it (HiDream's forward runs
        every gate), or None before any training forward."""
        if self._attach is not None:
            self._collecting = False
            if not self._gates or not self._seen_training_forward():
                return None
            return torch.stack([g._hidream_aux for g in self._gates]).mean()
        losses, self._losses = self._losses, []
        self._collecting = False  # until clear(): the backward's checkpoint recomputation re-fires the hooks
        if not losses:
            return None
        return torch.stack([l.float() for l in losses]).mean()

    def _seen_training_forward(self) -> bool:
        return any(g.training for g in self._gates)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._losses.clear()
        for gate in self._gates:
            gate._buffers.pop("_hidream_aux", None)
            gate._non_persistent_buffers_set.discard("_hidream_aux")
        self._gates = []
