"""`lora_type: standard`: a PEFT LoRA (rank `lora_rank`, alpha `lora_alpha`) on HiDream's attention projections,
saved in the diffusers / ComfyUI key format: `transformer.<module path>.lora_A.weight` (down, (r, in)) and
`.lora_B.weight` (up, (out, r)), plus `.alpha` when alpha differs from the rank (ComfyUI scales by alpha / rank;
without the key it uses 1, which is alpha == rank)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from ..config.schema import ConfigError, TrainConfig
from ..util.atomic import write_with

# HiDream's attention projections (image and text streams): what `lora_type standard` adapts.
LORA_TARGETS = r".*\.attn1\.(to_q|to_k|to_v|to_out)(_t)?$"
LORA_KEY_PREFIX = "transformer."

class PeftLoraAdapter:
    kind = "lora"

    def __init__(self, transformer: nn.Module, config: TrainConfig):
        from peft import LoraConfig, inject_adapter_in_model

        self.transformer = transformer
        self.rank = config.lora_rank
        self.alpha = float(config.lora_alpha if config.lora_alpha is not None else config.lora_rank)
        torch.manual_seed(config.seed)  # PEFT draws lora_A from the global generator
        inject_adapter_in_model(LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=LORA_TARGETS,
                                           init_lora_weights=True), transformer)
        self.module = transformer  # its only trainable parameters are the LoRA's
        if not self.parameters():
            raise ConfigError("lora_type standard found no attention projection to adapt in this transformer")

    def parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.transformer.named_parameters() if "lora_" in name and p.requires_grad]

    @property
    def mergeable(self) -> bool:
        return True  # the LoRA runs beside the (possibly quantised) base layer; nothing to merge into

    def state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.transformer)

    def save(self, path: Path, metadata: Optional[dict] = None) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {LORA_KEY_PREFIX + k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        if self.alpha != self.rank:
            for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
                tensors[key[:-len(".lora_A.weight")] + ".alpha"] = torch.tensor(self.alpha)
        # diffusers ignores `.alpha` keys; it builds its LoraConfig from this metadata entry instead.
        diffusers_config = {"transformer.r": self.rank, "transformer.lora_alpha": self.alpha,
                            "transformer.target_modules": LORA_TARGETS}
        meta = {"lora_rank": str(self.rank), "lora_alpha": str(self.alpha), "format": "pt",
                "lora_adapter_metadata": json.dumps(diffusers_config), "modelspec.architecture": "hidream-i1/lora"}
        meta.update({k: str(v) for k, v in (metadata or {}).items()})
        return write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def load_weights(self, path: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = {k[len(LORA_KEY_PREFIX):]: v for k, v in load_file(str(path)).items()
                   if k.startswith(LORA_KEY_PREFIX) and not k.endswith(".alpha")}
        expected = set(self.state_dict())
        if set(weights) != expected:
            raise ConfigError(f"{path} does not fit this LoRA (another lora_rank or model?): "
                              f"{len(set(weights) ^ expected)} keys differ")
        result = set_peft_model_state_dict(self.transformer, weights)
        if getattr(result, "unexpected_keys", None):
            raise ConfigError(f"{path}: unexpected LoRA keys {result.unexpected_keys[:3]}")

    def _layers(self):
        from peft.tuners.lora import LoraLayer

        return [m for m in self.transformer.modules() if isinstance(m, LoraLayer)]

    @contextlib.contextmanager
    def applied(self, strength: float) -> Iterator[str]:
        layers = self._layers()
        if strength == 0.0:
            for layer in layers:
                layer.enable_adapters(False)
        elif strength != 1.0:
            for layer in layers:
                layer.scale_layer(strength)
        try:
            yield "lora"
        finally:
            for layer in layers:
                if strength == 0.0:
                    layer.enable_adapters(True)
                elif strength != 1.0:
                    layer.unscale_layer(strength)

    def disabled(self):
        """PEFT's own switch: the LoRA layers run their base layer alone."""
        return self.applied(0.0)

    def remove(self) -> None:
        """Put every wrapped Linear back in its place (the caller's model leaves without LoRA layers)."""
        for layer in self._layers():
            for name, module in list(self.transformer.named_modules()):
                if module is layer:
                    parent_name, _, child = name.rpartition(".")
                    setattr(self.transformer.get_submodule(parent_name), child, layer.get_base_layer())
