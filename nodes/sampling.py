"""LoKr-merged sampling with the trainer core's transformer, and applying a LoKr to a native ComfyUI MODEL."""
from __future__ import annotations

import logging

import torch

from ..trainer_core.config import ConfigError, SamplingConfig
from ..trainer_core.util import quiet_libraries
from .compat import io, progress_bar
from .convert import pil_to_image, scaled_to_raw_latents
from .types import CATEGORY, HiDreamModel, HiDreamModelType, LoKrHandle, LoKrType

logger = logging.getLogger(__name__)


class HiDreamLoKrSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HiDreamLoKrSampler",
            display_name="HiDream LoKr sampler",
            category=f"{CATEGORY}/sampling",
            description="Samples an image with the LoKr merged into the transformer's weights (the same sampling "
                        "as the training previews), then restores the base weights exactly. Outputs ComfyUI's "
                        "LATENT (raw Flux latents, for the stock VAEDecode) and, with a VAE, the IMAGE.",
            inputs=[
                HiDreamModelType.Input("hidream_model", tooltip="Model whose transformer (and encoders) sample."),
                LoKrType.Input("lokr", optional=True, tooltip="The LoKr to merge (none: the base model)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="LoKr strength (1 = as trained, 0 = base model)."),
                io.String.Input("positive", multiline=True, default="", tooltip="Prompt (through the model's text "
                                                                                 "encoders)."),
                io.String.Input("negative", multiline=True, default="", tooltip="Negative prompt for CFG."),
                io.Int.Input("width", default=1024, min=16, max=4096, step=16, tooltip="Image width in pixels."),
                io.Int.Input("height", default=1024, min=16, max=4096, step=16, tooltip="Image height in pixels."),
                io.Int.Input("steps", default=50, min=1, max=500, tooltip="Sampling steps (Full: 50)."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=30.0, step=0.1, tooltip="CFG scale (Full: 5)."),
                io.Float.Input("shift", default=3.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Flow shift (Full: 3.0, Dev: 6.0)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip="Noise seed."),
                io.Combo.Input("scheduler", options=["unipc", "euler"], default="unipc",
                               tooltip="unipc (HiDream-I1-Full's) or flow-matching Euler."),
                io.Conditioning.Input("positive_conditioning", optional=True,
                                      tooltip="ComfyUI CONDITIONING (CLIPTextEncode with the HiDream CLIP) used "
                                              "instead of the positive text."),
                io.Conditioning.Input("negative_conditioning", optional=True,
                                      tooltip="ComfyUI CONDITIONING used instead of the negative text."),
                io.Vae.Input("vae", optional=True,
                             tooltip="ComfyUI VAE to decode with; without it the model's own VAE decodes."),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="Raw Flux latents (ComfyUI's format)"),
                     io.Image.Output(display_name="image", tooltip="The decoded image")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, hidream_model: HiDreamModel, strength: float, positive: str, negative: str, width: int,
                height: int, steps: int, cfg: float, shift: float, seed: int, scheduler: str,
                lokr: LoKrHandle = None, vae=None, positive_conditioning=None,
                negative_conditioning=None) -> io.NodeOutput:
        from ..trainer_core.adapters import is_mergeable, load_lokr, lokr_applied, remove_lokr
        from ..trainer_core.hidream import denoise
        from ..trainer_core.speedups import Speedups, apply_speedups
        from .comfy_adapters import conditioning_to_embeds

        def embeds(text: str, conditioning, which: str):
            if conditioning is not None:
                cond, extras = conditioning[0]
                return conditioning_to_embeds(cond, extras, llama_tokens=None)
            if hidream_model.text_encoder is None:
                raise ConfigError(f"nothing encodes the {which} prompt: this HiDream model has no text encoders; "
                                  f"connect {which}_conditioning (CLIPTextEncode with QuadrupleCLIPLoader's CLIP)")
            return hidream_model.text_encoder.encode([text])

        settings = SamplingConfig(prompt=positive, negative_prompt=negative, width=width, height=height,
                                  num_inference_steps=steps, guidance=cfg, shift=shift, seed=seed,
                                  scheduler=scheduler, lokr_strength=strength)
        settings.validate()
        cond = embeds(positive, positive_conditioning, "positive")
        uncond = embeds(negative, negative_conditioning, "negative") if cfg > 1.0 else None
        bar = progress_bar(steps, cls.hidden.unique_id)
        transformer = hidream_model.transformer
        with torch.inference_mode(False), quiet_libraries():  # the LoKr modules patch normal weights
            network = load_lokr(lokr.path, transformer) if lokr is not None else None
        if network is not None and not is_mergeable(network):
            # An 8-bit base runs the LoKr unmerged: through its Kronecker structure (kron_lokr.py), not LyCORIS'
            # generic bypass. Only the network's modules change; remove_lokr below takes them off again.
            apply_speedups(transformer, network, Speedups(**{**vars(Speedups.none()), "fast_lokr": True}))
        try:
            if network is not None:
                with lokr_applied(network, strength):
                    latents = denoise(transformer, cond, uncond, settings, lambda i, n: bar.update_absolute(i, n))
            else:
                latents = denoise(transformer, cond, uncond, settings, lambda i, n: bar.update_absolute(i, n))
        finally:
            if network is not None:
                remove_lokr(network)
        raw = scaled_to_raw_latents(latents.float().cpu())
        if vae is not None:
            image = vae.decode(raw)
        elif hidream_model.decode_latents is not None:
            image = pil_to_image(hidream_model.decode_latents(latents))
        else:
            raise ConfigError("nothing to decode the image with: connect a VAE")
        return io.NodeOutput({"samples": raw}, image)


class ApplyLoKrToModel(io.ComfyNode):
    MODES = ["auto", "merge", "bypass"]

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HiDreamLoKrApplyToModel",
            display_name="Apply HiDream LoKr to MODEL",
            category=f"{CATEGORY}/sampling",
            description="Adds the LoKr to a native ComfyUI HiDream MODEL (UNETLoader), as LoraLoaderModelOnly does "
                        "with a saved file, so the stock KSampler samples with it. Merged into the weights, or in "
                        "bypass mode beside them (the weights stay as loaded: for fp8 / quantised models and "
                        "newer ComfyUI's dynamic models).",
            inputs=[io.Model.Input("model", tooltip="A HiDream-I1 MODEL from UNETLoader / Load Diffusion Model."),
                    LoKrType.Input("lokr", tooltip="The trained or loaded LoKr."),
                    io.Float.Input("strength", default=1.0, min=-100.0, max=100.0, step=0.01,
                                   tooltip="LoKr strength (1 = as trained)."),
                    io.Combo.Input("mode", options=cls.MODES, default="auto", optional=True,
                                   tooltip="auto: bypass for fp8 / quantised weights and dynamic models, merge "
                                           "otherwise. merge: the LoKr is added into the weights. bypass: the "
                                           "weights stay as loaded and the LoKr is added at each forward pass "
                                           "(no second rounding of 8-bit weights).")],
            outputs=[io.Model.Output(display_name="model", tooltip="The MODEL with the LoKr added")],
        )

    @classmethod
    def execute(cls, model, lokr: LoKrHandle, strength: float, mode: str = "auto") -> io.NodeOutput:
        from .compat import apply_lora, bypass_reason

        if strength == 0:
            return io.NodeOutput(model)
        reason = bypass_reason(model) if mode == "auto" else None
        bypass = mode == "bypass" or reason is not None
        if reason:
            logger.info("HiDream LoKr: bypass mode for %s", reason)
        return io.NodeOutput(apply_lora(model, lokr.state_dict(), strength, bypass))
