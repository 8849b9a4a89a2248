"""LoKr adapters on the HiDream transformer, built and stored by lycoris-lora.

What this module adds on top of LyCORIS, and why:

* LyCORIS keeps its targeting preset in class attributes (`LycorisNetwork.apply_preset`), so a preset applied for
  one network leaks into the next one created in the same process. A ComfyUI server trains many times in one
  process, so every network here is created right after applying a *complete* preset.
* SimpleTuner's example config targets `"Attention"`, its own class name; diffusers calls the class
  `HiDreamAttention`, and the literal name matches nothing. It is translated (and logged).
* A config that wraps zero modules is an error, not a silent no-op.
* Training always uses LyCORIS' bypass forward (`y = W x + scale * kron(W1, W2) x`): the default rebuild forward
  computes `(W + dW) - W` in the base dtype and rounds small bf16 updates to zero.
* Sampling merges the LoKr only into float32 weights (exact save/restore of the base weights, done here because
  LyCORIS' `merge_to` ignores a trainable `scalar` and `restore()` only unhooks, it does not unmerge). Into 16-bit
  weights a merge would round the small update away as the rebuild forward does, so there it samples through the
  bypass hooks, as it trained (`unmerged_reason`).
* LyCORIS' bypass forward of a Linear LoKr cannot take an input with no rows (its reshape to (..., uq, -1) is
  ambiguous on zero elements), and diffusers' training-mode MoE calls every expert on its rows, none when no token
  was routed to it (`allow_empty_inputs`).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..util.atomic import write_with
from ..config.json_files import read_json_file
from ..config.schema import ConfigError, TrainConfig

logger = logging.getLogger(__name__)

LORA_PREFIX = "lycoris"
HIDREAM_ATTENTION_CLASS = "HiDreamAttention"
# Names SimpleTuner and other trainers use for HiDream's attention class in their own model copies.
ATTENTION_CLASS_ALIASES = ("Attention", "HiDreamAttention", "HiDreamImageAttention")

# Every key `LycorisNetwork.apply_preset` writes, with LyCORIS' own defaults. Applying all of them (overridden by
# the user's preset) resets whatever an earlier network in this process left in the class attributes.
_PRESET_DEFAULTS: dict[str, Any] = {
    "enable_conv": True,
    "target_module": ["Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm"],
    "target_name": [],
    "module_algo_map": {},
    "name_algo_map": {},
    "lora_prefix": LORA_PREFIX,
    "use_fnmatch": False,
    "exclude_name": [],
}


@dataclass(frozen=True)
class LycorisConfig:
    """A LyCORIS config in the format of SimpleTuner's `lycoris_config.json`.

    `linear_dim` 16384 with `full_matrix` means "W1 and W2 both full", in which case LyCORIS fixes the scale at 1 and
    `linear_alpha` has no effect.
    """

    algo: str = "lokr"
    multiplier: float = 1.0
    linear_dim: int = 16384
    linear_alpha: float = 1.0
    factor: int = 16
    full_matrix: bool = True
    use_scalar: bool = False
    apply_preset: dict = field(default_factory=lambda: {"target_module": ["Attention"],
                                                        "module_algo_map": {"Attention": {"factor": 16}}})
    extra: dict = field(default_factory=dict)  # other create_lycoris kwargs (dropout, decompose_both, ...)

    @classmethod
    def from_dict(cls, data: dict) -> "LycorisConfig":
        data = dict(data)
        known = {k: data.pop(k) for k in list(data) if k in
                 ("algo", "multiplier", "linear_dim", "linear_alpha", "factor", "full_matrix", "use_scalar",
                  "apply_preset")}
        for name, conv in (("multiplier", float), ("linear_dim", int), ("linear_alpha", float), ("factor", int)):
            if name in known:
                try:
                    known[name] = conv(known[name])
                except (TypeError, ValueError) as exc:
                    raise ConfigError(f"lycoris_config: '{name}' must be a number, got {known[name]!r}") from exc
        for name in ("full_matrix", "use_scalar"):
            if name in known:
                known[name] = _as_bool(known[name], f"lycoris_config: '{name}'")
        if "apply_preset" in known and not isinstance(known["apply_preset"], dict):
            raise ConfigError("lycoris_config: 'apply_preset' must be an object like "
                              '{"target_module": ["HiDreamAttention"]}')
        data.pop("bypass_mode", None)  # always bypass while training; see module docstring
        return cls(**known, extra=data)

    @classmethod
    def from_file(cls, path: Path) -> "LycorisConfig":
        data = read_json_file(path, "lycoris_config", allow_trailing_commas=True)
        if not isinstance(data, dict):
            raise ConfigError(f"lycoris_config {path} must be a JSON object")
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        out = {"algo": self.algo, "multiplier": self.multiplier, "linear_dim": self.linear_dim,
               "linear_alpha": self.linear_alpha, "factor": self.factor, "full_matrix": self.full_matrix,
               "use_scalar": self.use_scalar, "apply_preset": self.apply_preset}
        out.update(self.extra)
        return out


def _as_bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise ConfigError(f"{what} must be true or false, got {value!r}")


def resolve_preset(preset: dict, model: nn.Module) -> dict:
    """Translate class names that do not exist in diffusers' HiDream (SimpleTuner's "Attention") to the real class.

    Returns a complete preset (every key LyCORIS knows), so applying it resets earlier class-level state.
    """
    present = {type(m).__name__ for m in model.modules()}
    resolved = copy.deepcopy(_PRESET_DEFAULTS)
    user = copy.deepcopy(preset or {})
    translated: set[str] = set()

    def translate(name: str) -> str:
        if name in present or name not in ATTENTION_CLASS_ALIASES or HIDREAM_ATTENTION_CLASS not in present:
            return name
        translated.add(name)
        return HIDREAM_ATTENTION_CLASS

    if "target_module" in user:
        user["target_module"] = [translate(name) for name in user["target_module"]]
    if "module_algo_map" in user:
        user["module_algo_map"] = {translate(k): v for k, v in user["module_algo_map"].items()}
    # LyCORIS matches target classes by exact name: "Linear" would skip the 8-bit layers an fp8-scaled /
    # int8-scaled base is made of (nn.Linear subclasses; inside a targeted block they are wrapped like any Linear).
    scaled = sorted({type(m).__name__ for m in model.modules() if _is_scaled_linear(m)})
    if scaled and "Linear" in resolved.get("target_module", []) and "target_module" not in user:
        resolved["target_module"] = [*resolved["target_module"], *scaled]
    if scaled and "Linear" in user.get("target_module", []):
        user["target_module"] = [*user["target_module"], *scaled]
    if scaled and "Linear" in user.get("module_algo_map", {}):
        user["module_algo_map"] = {**user["module_algo_map"], **{n: user["module_algo_map"]["Linear"] for n in scaled}}
    for name in sorted(translated):
        logger.warning("LoKr target class %r does not exist in diffusers' HiDream transformer; using %r "
                       "(SimpleTuner's own model copy calls it %r)", name, HIDREAM_ATTENTION_CLASS, name)
    unknown = set(user) - set(_PRESET_DEFAULTS) - {"unet_target_module", "unet_target_name",
                                                   "text_encoder_target_module", "text_encoder_target_name"}
    if unknown:
        raise ConfigError(f"lycoris_config apply_preset has unknown keys {sorted(unknown)}; "
                          f"valid keys are {sorted(_PRESET_DEFAULTS)}")
    if "target_module" not in user and ("name_algo_map" in user or "target_name" in user):
        # LyCORIS' default class targets (every Linear) would otherwise be wrapped on top of the named modules,
        # which is never what a name-based preset means.
        user["target_module"] = []
    resolved.update(user)
    return resolved


def create_lokr_network(transformer: nn.Module, config: LycorisConfig, *, seed: int = 0,
                        init_lokr_norm: Optional[float] = None):
    """Create a LyCORIS network on `transformer`, hook it in (bypass mode) and return it.

    The base transformer is frozen; only the network's parameters train. Raises ConfigError when the preset
    matches no module, listing the class names and module paths it could have matched.
    """
    from lycoris import LycorisNetwork, create_lycoris

    preset = resolve_preset(config.apply_preset, transformer)
    LycorisNetwork.apply_preset(preset)
    kwargs = dict(config.extra)
    kwargs.update(algo=config.algo, factor=config.factor, full_matrix=config.full_matrix,
                  use_scalar=config.use_scalar, bypass_mode=True)
    # create_lycoris re-applies its named preset ("full" by default), which only touches `enable_conv`.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = create_lycoris(transformer, multiplier=config.multiplier, linear_dim=config.linear_dim,
                                 linear_alpha=config.linear_alpha, warn_on_unmatched=False, **kwargs)
        if not network.loras:
            raise ConfigError(_no_match_message(transformer, config.apply_preset))
        if init_lokr_norm:
            init_lokr_perturbed_normal(network, init_lokr_norm)
    transformer.requires_grad_(False)
    network.apply_to()
    allow_empty_inputs(network)
    network.requires_grad_(True)
    logger.info("LoKr: %d modules wrapped, %d trainable parameters", len(network.loras),
                sum(p.numel() for p in network.parameters() if p.requires_grad))
    return network


def _bypass_diff_allowing_empty(self, h: torch.Tensor, scale=1) -> torch.Tensor:
    """LyCORIS' `bypass_forward_diff`, also for an input with no rows: the adapter then runs on one row of zeros and
    returns that output's empty slice, so its parameters get a zero gradient (not none) and DDP's reducer still
    all-reduces every one of them, as the sorted MoE dispatch does for an idle expert (speedups/moe_dispatch.py)."""
    diff = type(self).bypass_forward_diff
    if h.numel():
        return diff(self, h, scale)
    probe = diff(self, h.new_zeros(1, h.shape[-1]), scale)
    return probe[:0].reshape(*h.shape[:-1], probe.shape[-1])


def allow_empty_inputs(network) -> None:
    """Let every Linear module of `network` take an input with no rows in bypass mode.

    diffusers' training-mode MoE (`MOEFeedForwardSwiGLU`, with `fast_moe_dispatch` off) calls each routed expert on
    `x[idx == e]`, an empty slice when no token of the batch went to expert e; LyCORIS' bypass forward reshapes its
    input to (..., uq, -1), which torch refuses on zero elements ("cannot reshape tensor of 0 elements"), so such
    a step crashed. `kron_lokr`'s fast forward replaces `bypass_forward` and takes empty inputs itself; this
    instance-level `bypass_forward_diff` is what LyCORIS' own `bypass_forward` calls, and survives
    `uninstall_kron_lokr` and `lokr_applied`'s re-hooking.
    """
    for lora in network.loras:
        if getattr(lora, "module_type", None) == "linear" and hasattr(type(lora), "bypass_forward_diff"):
            lora.bypass_forward_diff = types.MethodType(_bypass_diff_allowing_empty, lora)


def _is_scaled_linear(module: nn.Module) -> bool:
    """An 8-bit base layer of quant/scaled.py (recognised by its shape, not imported: quant is a sibling wing)."""
    return isinstance(module, nn.Linear) and hasattr(module, "weight_scale") and hasattr(module, "dequantize")


def _float_weight(module: nn.Module) -> torch.Tensor:
    """The real weight of a base layer: dequantised for an 8-bit one (its stored values carry a scale)."""
    return module.dequantize(torch.float32) if _is_scaled_linear(module) else module.weight.detach().float()


def _no_match_message(transformer: nn.Module, preset: dict) -> str:
    classes = sorted({type(m).__name__ for m in transformer.modules()} - {"ModuleList", "Identity", "Dropout"})
    linear_paths = [n for n, m in transformer.named_modules() if isinstance(m, nn.Linear)]
    examples = ", ".join(linear_paths[:6])
    return (f"the LoKr preset {json.dumps(preset)} matches no module of the HiDream transformer. "
            f"Class names you can target: {', '.join(classes)}. Module paths look like: {examples}, ... "
            'Use e.g. {"target_module": ["HiDreamAttention"]} or {"name_algo_map": '
            '{"double_stream_blocks.*.block.attn*": {"factor": 16}}, "use_fnmatch": true}.')


@torch.no_grad()
def init_lokr_perturbed_normal(network, scale: float) -> None:
    """SimpleTuner's `init_lokr_norm`: W1 := 1, W2 := Gaussian with the base weight's mean and std, times `scale`.

    Both factors then receive gradient from the first step (with the default init W2 = 0, W1 gets none).
    """
    for lora in network.loras:
        if not (getattr(lora, "use_w1", False) and getattr(lora, "use_w2", False)):
            raise ConfigError("init_lokr_norm needs full W1 and W2 matrices: set full_matrix: true "
                              "(or a large linear_dim) in the lycoris config")
        base = _float_weight(lora.org_module[0])
        lora.lokr_w1.fill_(1.0)
        noise = torch.randn_like(lora.lokr_w2, dtype=torch.float32)
        noise = (noise - noise.mean()) / noise.std().clamp_min(1e-12)
        lora.lokr_w2.copy_((noise * base.std() + base.mean()) * scale)


def lokr_delta_weight(lora, strength: float = 1.0) -> torch.Tensor:
    """dW of one LoKr module as its forward applies it: scale * kron(W1, W2) * scalar * strength, in float32."""
    weight = lora.org_module[0].weight
    delta = lora.get_weight(weight.shape).float() * lora.scalar.float()
    return delta * strength


def unmerged_reason(network) -> Optional[str]:
    """Why sampling must run `network` unmerged (through its bypass hooks), or None when merging it into the base
    weights computes what training computes.

    Merging is exact only into float32 (or wider) weights. A 16-bit weight holds W + dW rounded to 8 (bf16) or 11
    (fp16) significant bits: an update smaller than half a unit in the last place of W is lost (|W| ~ 0.03 in bf16
    has a last place of ~1.2e-4), and early in training or at a small learning rate much of a LoKr's update is that
    small. Training never rounds it so (bypass forward, float32 LoKr), so a preview merged into bf16 weights would
    show another model than the one trained. Quantised
    (optimum-quanto, where merging silently does nothing; the 8-bit fp8-scaled / int8-scaled layers, whose stored
    values carry a scale) and sharded weights (an FSDP DTensor holds a slice) cannot be merged into at all.
    """
    for lora in network.loras:
        weight = lora.org_module[0].weight
        if type(weight) is not nn.Parameter and type(weight) is not torch.Tensor:
            return f"the base weights are quantised or sharded ({type(weight).__name__})"
        if not weight.dtype.is_floating_point or weight.element_size() < 2 or _is_scaled_linear(lora.org_module[0]):
            return f"the base weights are {weight.dtype} (quantised)"
        if weight.element_size() < 4:
            return f"the base weights are {weight.dtype}: merged, the LoKr's small update would be rounded away"
    return None


def is_mergeable(network) -> bool:
    """True when merging `network` into the base weights gives what training computes (see `unmerged_reason`)."""
    return unmerged_reason(network) is None


@contextlib.contextmanager
def lokr_multiplier(network, multiplier: float) -> Iterator[None]:
    """The bypass hooks at `multiplier` (0: each adapted layer adds exactly nothing), the previous ones after."""
    previous = [lora.multiplier for lora in network.loras]
    network.set_multiplier(multiplier)
    try:
        yield
    finally:
        for lora, m in zip(network.loras, previous):
            lora.multiplier = m


@contextlib.contextmanager
def lokr_applied(network, strength: float = 1.0) -> Iterator[str]:
    """Run the wrapped model with the LoKr at `strength` exactly as it trained, then restore the exact prior state.

    float32 base weights: the hooks are lifted, dW is added into the weights (in float32), and on exit the original
    weights are copied back bit for bit and the hooks reinstated. 16-bit, quantised or sharded base weights
    (`unmerged_reason`): the bypass hooks stay and run at `strength`, the forward training ran. Yields "merged" or
    "bypass".
    """
    if not is_mergeable(network):
        with lokr_multiplier(network, strength):
            yield "bypass"
        return

    # One layer at a time, originals parked in CPU memory: at HiDream-I1 size the attention weights are ~9 GiB in
    # bf16 and their float32 deltas twice that, which must not sit on the GPU next to the model while sampling.
    originals = []
    with torch.no_grad():
        for lora in network.loras:
            weight = lora.org_module[0].weight
            delta = lokr_delta_weight(lora, strength)
            originals.append(weight.detach().to("cpu", copy=True))
            lora.restore()
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
            del delta
    try:
        yield "merged"
    finally:
        with torch.no_grad():
            for lora, original in zip(network.loras, originals):
                lora.org_module[0].weight.copy_(original)
                lora.apply_to()


def lokr_metadata(config: LycorisConfig, extra: Optional[dict] = None) -> dict[str, str]:
    meta = {"lycoris_config": json.dumps(config.to_dict()), "ss_network_module": "lycoris.kohya",
            "modelspec.architecture": "hidream-i1/lycoris-lokr"}
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def save_lokr(network, path: Path, config: LycorisConfig, dtype: torch.dtype = torch.float32,
              metadata: Optional[dict] = None) -> Path:
    """Write the LoKr as safetensors with LyCORIS key names and the LyCORIS config in the metadata.

    Written to a temporary name, flushed and renamed, so a crash never leaves a half-written file under the real
    name and the previous file stays intact until the new one is complete.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"LoKr files are written as .safetensors, got {path.name}")
    # LyCORIS picks the file format from the extension, so the temporary name keeps it.
    return write_with(path, lambda tmp: network.save_weights(str(tmp), dtype, lokr_metadata(config, metadata)),
                      suffix=".safetensors")


def load_lokr(path: Path, transformer: nn.Module, multiplier: float = 1.0):
    """Load a LyCORIS file onto `transformer` (hooked, bypass mode). Returns the network.

    LyCORIS drops file keys whose module does not exist silently; here that is an error naming the keys.
    """
    from lycoris import LycorisNetwork, create_lycoris_from_weights
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"LoKr file not found: {path}")
    LycorisNetwork.apply_preset({"lora_prefix": LORA_PREFIX})
    weights = load_file(str(path))
    prefixes = {k.split(".")[0] for k in weights if "." in k}
    network, _ = create_lycoris_from_weights(multiplier, str(path), transformer, weights_sd=weights)
    loaded = {lora.lora_name for lora in network.loras}
    missing = sorted(prefixes - loaded)
    if missing:
        raise ConfigError(f"{path}: {len(missing)} of {len(prefixes)} LoKr modules do not match this transformer "
                          f"(first: {missing[:3]}); was it trained for another model?")
    for lora in network.loras:
        lora.bypass_mode = True
    transformer.requires_grad_(False)
    network.apply_to()
    allow_empty_inputs(network)
    return network


def remove_lokr(network) -> None:
    """Unhook the network from the model; the base weights are untouched (training never merges)."""
    for lora in network.loras:
        lora.restore()


class LokrAdapter:
    kind = "lokr"

    def __init__(self, transformer: nn.Module, config: TrainConfig, lycoris: LycorisConfig):
        self.lycoris = lycoris
        self.network = create_lokr_network(transformer, lycoris, seed=config.seed,
                                           init_lokr_norm=config.init_lokr_norm)
        self.module = self.network

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.network.parameters() if p.requires_grad]

    @property
    def mergeable(self) -> bool:
        return is_mergeable(self.network)

    def save(self, path: Path, metadata: Optional[dict] = None) -> Path:
        return save_lokr(self.network, path, self.lycoris, metadata=metadata)

    def load_weights(self, path: Path) -> None:
        from safetensors.torch import load_file

        try:
            self.network.load_state_dict(load_file(str(path)), strict=True)
        except RuntimeError as exc:
            raise ConfigError(f"{path} does not fit this LoKr (trained with another lycoris_config or model?): "
                              f"{str(exc)[:400]}") from exc

    def applied(self, strength: float):
        return lokr_applied(self.network, strength)

    def disabled(self):
        return lokr_multiplier(self.network, 0.0)

    def remove(self) -> None:
        remove_lokr(self.network)
