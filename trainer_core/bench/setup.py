"""What the benchmark runs on: the model sizes, a transformer with random weights built on the device, fixed
inputs, the fixed noise of each step, and the machine's description."""
from __future__ import annotations

import platform
from dataclasses import dataclass

import torch

from ..hidream.embeds import PromptEmbeds
from ..hidream.flow_matching import LoadBalancingLoss, sample_sigmas, shift_sigmas
from ..training.step import flow_matching_losses

LOKR_FACTOR = 16
LOAD_BALANCING_WEIGHT = 0.01


@dataclass(frozen=True)
class BenchSize:
    """A transformer config and the input sizes fed to it."""

    name: str
    model: dict
    resolution: int  # pixels; latents are (B, 16, resolution/8, resolution/8)
    text_tokens: int = 128
    llama_layers: int = 32  # layers in the Llama hidden-state stack (first axis of the llama input)


FULL = BenchSize("full", dict(
    patch_size=2, in_channels=16, out_channels=16, num_layers=16, num_single_layers=32, attention_head_dim=128,
    num_attention_heads=20, caption_channels=[4096, 4096], text_emb_dim=2048, num_routed_experts=4,
    num_activated_experts=2, axes_dims_rope=(64, 32, 32), max_resolution=(128, 128),
    llama_layers=[min(i, 31) for i in range(48)]), resolution=1024)

# Same block structure (double + single blocks, 4 experts top-2, three text streams), 1/10 of the width, 1/8 of
# the depth, 256 px: a CPU thread runs a training step in about a second.
SMALL = BenchSize("small", dict(
    patch_size=2, in_channels=16, out_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=64,
    num_attention_heads=4, caption_channels=[256, 256], text_emb_dim=256, num_routed_experts=4,
    num_activated_experts=2, axes_dims_rope=(16, 24, 24), max_resolution=(128, 128),
    llama_layers=[0, 1, 2, 3, 3, 3]), resolution=256, llama_layers=4)

SIZES = {"full": FULL, "small": SMALL}




def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions() -> dict:
    import importlib.metadata as md

    out = {"torch": torch.__version__}
    for name, dist in (("diffusers", "diffusers"), ("lycoris", "lycoris-lora"), ("quanto", "optimum-quanto")):
        try:
            out[name] = md.version(dist)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def build_transformer(size: BenchSize, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """diffusers' HiDream transformer with random weights, created directly on `device` in `dtype`, frozen."""
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = HiDreamImageTransformer2DModel(**size.model)
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    return model


@dataclass
class BenchInputs:
    """latents (B, 16, h, w) float32, t5 (B, T, C0), llama (L, B, T, C1), pooled (B, P), all on the device."""

    latents: torch.Tensor
    t5: torch.Tensor
    llama: torch.Tensor
    pooled: torch.Tensor

    @property
    def embeds(self) -> PromptEmbeds:
        return PromptEmbeds(t5=self.t5, llama=self.llama, pooled=self.pooled)

    def batch(self, n: int) -> "BenchInputs":
        return BenchInputs(self.latents.repeat(n, 1, 1, 1), self.t5.repeat(n, 1, 1), self.llama.repeat(1, n, 1, 1),
                           self.pooled.repeat(n, 1))


def make_inputs(size: BenchSize, device: torch.device, dtype: torch.dtype, seed: int = 0) -> BenchInputs:
    g = torch.Generator(device=device).manual_seed(seed)
    lat = size.resolution // 8
    c0, c1 = size.model["caption_channels"]
    return BenchInputs(
        latents=torch.randn(1, size.model["in_channels"], lat, lat, generator=g, device=device),
        t5=torch.randn(1, size.text_tokens, c0, generator=g, device=device, dtype=dtype),
        llama=torch.randn(size.llama_layers, 1, size.text_tokens, c1, generator=g, device=device, dtype=dtype),
        pooled=torch.randn(1, size.model["text_emb_dim"], generator=g, device=device, dtype=dtype))


class StepNoise:
    """The noise and sigmas of step `step`, the same for the reference and the project (a `NoiseSource` for the
    trainer's TrainStep; set `step` before each step)."""

    def __init__(self, inputs: BenchInputs):
        self.inputs = inputs
        self.step = 0

    def draw(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = latents.device
        g = torch.Generator(device=device).manual_seed(1000 + self.step)
        noise = torch.randn(latents.shape, generator=g, device=device)
        sigmas = shift_sigmas(sample_sigmas(latents.shape[0], torch.Generator().manual_seed(self.step)), 3.0)
        return noise, sigmas.to(device)

    def get_state(self) -> int:
        return self.step

    def set_state(self, state: int) -> None:
        self.step = state


def stock_loss(model, latents: torch.Tensor, noise: StepNoise, inputs: BenchInputs,
               load_balancing: LoadBalancingLoss) -> torch.Tensor:
    """The loss the naive reference backpropagates: the trainer's flow-matching loss function (its maths is not
    what the speed-ups change) plus the MoE load-balancing loss with its gradient."""
    noise_, sigmas = noise.draw(latents)
    return flow_matching_losses(model, latents, noise_, sigmas, inputs.embeds, load_balancing, True)[0]
