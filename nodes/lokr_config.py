"""LoKr config node: the two presets of SimpleTuner's HiDream quickstart, or any LyCORIS JSON."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from ..trainer_core.config import ConfigError
from .compat import io
from .types import CATEGORY, LoKrConfigType

if TYPE_CHECKING:  # imported when a node first needs it (LyCORIS is heavy)
    from ..trainer_core.adapters import LycorisConfig

FEED_FORWARD_PATTERNS = ("double_stream_blocks.*.block.attn*", "double_stream_blocks.*.block.ff_t*",
                         "double_stream_blocks.*.block.ff_i.shared_experts*", "single_stream_blocks.*.block.attn*",
                         "single_stream_blocks.*.block.ff_i.shared_experts*")
PRESETS = ["attention only", "attention + shared experts + text FF", "custom JSON"]
QUICKSTART_USE_SCALAR = True  # both lycoris_config.json files of SimpleTuner's HiDream quickstart set it


def preset_targets(preset: str, factor: int, custom_json: str) -> dict:
    """The `apply_preset` of a LyCORIS config: which modules get a LoKr."""
    if preset == "attention only":
        return {"target_module": ["Attention"], "module_algo_map": {"Attention": {"factor": factor}}}
    if preset == "attention + shared experts + text FF":
        return {"name_algo_map": {p: {"factor": factor} for p in FEED_FORWARD_PATTERNS}, "use_fnmatch": True}
    try:
        data = json.loads(custom_json)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"custom_json is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                          "paste a lycoris_config.json or just its apply_preset object") from exc
    if not isinstance(data, dict):
        raise ConfigError("custom_json must be a JSON object (a lycoris_config.json or its apply_preset)")
    return data


@dataclass(frozen=True)
class LoKrSettings:
    """What the LoKr config node hands to training: the LyCORIS config plus the core's init option."""

    lycoris: LycorisConfig
    init_lokr_norm: Optional[float] = None


class LoKrConfigNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HiDreamLoKrConfig",
            display_name="HiDream LoKr config",
            category=f"{CATEGORY}/training",
            description="Which transformer modules get a LoKr and its shape. The presets are the two "
                        "lycoris_config.json files of SimpleTuner's HiDream quickstart; 'custom JSON' takes any "
                        "LyCORIS config (a whole lycoris_config.json, or only its apply_preset).",
            inputs=[
                io.Combo.Input("preset", options=PRESETS, default="attention only",
                               tooltip="attention only: every HiDreamAttention (the quickstart's first config). "
                                       "attention + shared experts + text FF: also the shared MoE experts and the "
                                       "text feed-forward (its second). custom JSON: the JSON below."),
                io.Int.Input("factor", default=16, min=1, max=1024,
                             tooltip="Kronecker factor: W1 is at most factor x factor; larger = fewer parameters."),
                io.Int.Input("linear_dim", default=16384, min=1, max=100000,
                             tooltip="LoKr rank; with full_matrix (or a value above the layer width) W1 and W2 "
                                     "are full matrices."),
                io.Float.Input("linear_alpha", default=1.0, min=0.0, max=100000.0, step=0.1,
                               tooltip="Scale = alpha / rank for decomposed W2 (no effect with full matrices)."),
                io.Boolean.Input("full_matrix", default=True, tooltip="Keep W2 a full matrix (no low-rank split)."),
                io.Boolean.Input("use_scalar", default=QUICKSTART_USE_SCALAR,
                                 tooltip="Add a trainable scalar per module, as both of the quickstart's "
                                         "lycoris_config.json files do (it speeds training up 'considerably'). "
                                         "ComfyUI's native LoRA loader has no scalar key: the scalar is folded "
                                         "into the saved weights by LyCORIS."),
                io.Float.Input("init_lokr_norm", default=0.0, min=0.0, max=1.0, step=1e-5,
                               tooltip="0: LyCORIS' default init (W2 = 0). Otherwise SimpleTuner's init_lokr_norm: "
                                       "W1 = 1, W2 = scaled Gaussian (e.g. 1e-4), so both factors learn from step 1."),
                io.String.Input("custom_json", multiline=True, default="",
                                tooltip="With preset 'custom JSON': a lycoris_config.json, or only its apply_preset "
                                        '(e.g. {"target_module": ["HiDreamAttention"]}).'),
            ],
            outputs=[LoKrConfigType.Output(display_name="lokr_config", tooltip="LoKr settings for training")],
        )

    @classmethod
    def execute(cls, preset: str, factor: int, linear_dim: int, linear_alpha: float, full_matrix: bool,
                use_scalar: bool, init_lokr_norm: float, custom_json: str) -> io.NodeOutput:
        from ..trainer_core.adapters import LycorisConfig

        targets = preset_targets(preset, factor, custom_json)
        values = {"algo": "lokr", "multiplier": 1.0, "linear_dim": linear_dim, "linear_alpha": linear_alpha,
                  "factor": factor, "full_matrix": full_matrix, "use_scalar": use_scalar}
        if "apply_preset" in targets or "algo" in targets:  # a whole lycoris_config.json
            values.update(targets)
        else:
            values["apply_preset"] = targets
        config = LycorisConfig.from_dict(values)
        return io.NodeOutput(LoKrSettings(lycoris=config, init_lokr_norm=init_lokr_norm or None))

