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


class LoadBalancingLoss:
    """Collects the MoE load-balancing (auxiliary) loss of every `MoEGate` during one forward pass.

    diffusers computes each gate's aux loss alpha * sum_e P_e * f_e in train() mode and then throws it away; forward
    hooks keep it, with its graph. `alpha` is set on every gate. `take()` returns the mean over gates (HiDream's
    official form, independent of the number of layers) and clears the list, so graphs never outlive a step.
    Between `take()` and the next `clear()` nothing is collected: with gradient checkpointing the backward re-runs
    every block, and a kept aux loss of a recomputed block would pin that block's recomputed activations.
    """

    def __init__(self, transformer: nn.Module, alpha: float):
        self._losses: list[torch.Tensor] = []
        self._collecting = True
        self._handles = []
        for module in transformer.modules():
            if type(module).__name__ == "MoEGate":
                module.alpha = alpha
                # Run eagerly even inside compiled blocks: the hook's collect-or-not branch must not select
                # between two compiled graphs (checkpoint recomputation would then save other tensors).
                self._handles.append(module.register_forward_hook(torch.compiler.disable(self._hook)))

    def _hook(self, module, inputs, output) -> None:
        aux = output[2] if isinstance(output, tuple) and len(output) > 2 else None
        if aux is not None and self._collecting:
            self._losses.append(aux)

    @property
    def num_gates(self) -> int:
        return len(self._handles)

    def clear(self) -> None:
        """Forget collected losses and collect again; call before each forward."""
        self._losses = []
        self._collecting = True

    def take(self) -> Optional[torch.Tensor]:
        losses, self._losses = self._losses, []
        self._collecting = False  # until clear(): the backward's checkpoint recomputation re-fires the hooks
        if not losses:
            return None
        return torch.stack([l.float() for l in losses]).mean()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._losses.clear()
