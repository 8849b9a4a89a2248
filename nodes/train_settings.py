"""Training widgets -> TrainConfig: the one place where the node's settings meet the core's config.

Widget ids ARE TrainConfig field names (SimpleTuner's keys), so the mapping is mechanical: a new core option is
wired by adding its `Setting` here, and `train_config_from_settings` refuses an id that is not a field.

The Train node carries the essentials (ESSENTIALS); everything else lives on optional settings nodes wired into it
(GROUPS: optimizer & schedule, previews, checkpoints, advanced). An unconnected settings node means its defaults.
Every default is TrainConfig's (FROM_CORE): the command line, the SimpleTuner reader and the nodes share one set,
SimpleTuner's own where it has one (docs/simpletuner.md).

LEGACY_TRAIN_WIDGETS is the widget order of that earlier Train node ("layout 1", before the settings nodes): the
browser extension uses the same list to load workflows saved with it, and the prompt hook (prompt_hook.py) to
accept API prompts written for it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from ..trainer_core.config import LR_SCHEDULERS as CORE_LR_SCHEDULERS, OPTIMIZERS as CORE_OPTIMIZERS
from ..trainer_core.config import TrainConfig, parse_resolutions
from .compat import io

INIT_LOKR_FIELD = "init_lokr_weights"  # continue from an existing LoKr
RESUME_FIELD = "resume_from_checkpoint"
# The choices of the resume widget besides a checkpoint (run_store.py decides what each means).
RESUME_AUTO, RESUME_START_OVER, RESUME_LATEST = "auto", "start over", "latest"
RESUME_CHOICES = [RESUME_AUTO, RESUME_START_OVER, RESUME_LATEST]

OPTIMIZERS = [n for n in CORE_OPTIMIZERS if n not in ("adamw_bf16", "torch-adamw")]  # both are adamw here
LR_SCHEDULERS = list(CORE_LR_SCHEDULERS)


FROM_CORE = object()  # a Setting's default: TrainConfig's, in the widget's terms (`core_default`)


def core_default(setting_id: str) -> Any:
    """TrainConfig's default of a setting as its widget shows it: the one set of defaults of the CLI, the nodes
    and the SimpleTuner reader (a square validation_resolution as its side, None as "" or 0, the "keep all" of
    checkpoints_total_limit)."""
    value = next(f.default for f in fields(TrainConfig) if f.name == setting_id)
    if setting_id == "validation_resolution":
        return parse_resolutions(value)[0][0]
    if value is None:
        return 0 if setting_id == "checkpoints_total_limit" else ""
    return value


@dataclass(frozen=True)
class Setting:
    """One widget: its id (a TrainConfig field), kind, default and limits, its tooltip and the label it shows.

    The label (`display_name`) is a few words because Vue nodes on frontend 1.32.9 give a widget's label 80 px and
    cut the rest ("max_train_s..."); the id stays the key, so saved workflows and API prompts are unchanged, and
    the tooltip starts with it (the name SimpleTuner's docs use)."""

    id: str
    kind: str  # int | float | bool | str | text | combo
    default: Any
    tooltip: str
    options: tuple = ()
    min: Optional[float] = None
    max: Optional[float] = None
    step: Optional[float] = None
    extra: dict = field(default_factory=dict)
    label: str = ""  # what the node shows; empty: the id
    # An optional input: workflows and API prompts written before the widget existed still load and queue (it
    # is the last of its node, so their saved values keep their places).
    optional: bool = False

    def __post_init__(self) -> None:
        if self.default is FROM_CORE:
            object.__setattr__(self, "default", core_default(self.id))

    def input(self, optional: bool = False, options: Optional[list] = None):
        """The V3 input; a combo's `options` may be given at schema time (the resume choices list checkpoints)."""
        common = dict(default=self.default, tooltip=f"{self.id}: {self.tooltip}" if self.label else self.tooltip,
                      optional=optional or self.optional, display_name=self.label or None)
        limits = {k: v for k, v in (("min", self.min), ("max", self.max), ("step", self.step)) if v is not None}
        if self.kind == "int":
            return io.Int.Input(self.id, **common, **limits, **self.extra)
        if self.kind == "float":
            return io.Float.Input(self.id, **common, **limits, **self.extra)
        if self.kind == "bool":
            return io.Boolean.Input(self.id, **common)
        if self.kind in ("str", "text"):
            return io.String.Input(self.id, multiline=self.kind == "text", **common)
        if self.kind == "combo":
            return io.Combo.Input(self.id, options=list(self.options if options is None else options), **common)
        raise ValueError(f"unknown setting kind {self.kind!r}")


# ------------------------------------------------------------------------------------------------ the widgets

ESSENTIALS = [
    Setting("max_train_steps", "int", FROM_CORE, "Optimizer steps to train (each sees train_batch_size x "
            "gradient_accumulation_steps images). Raising it on a finished run continues that run.",
            min=1, max=1_000_000, label="train steps"),
    Setting("learning_rate", "float", FROM_CORE, "Peak learning rate (the quickstart uses 4e-5 to 1e-4 for LoKr).",
            min=1e-8, max=1.0, step=1e-5, extra={"round": 1e-8}, label="learning rate"),
    Setting("optimizer", "combo", FROM_CORE, "Optimizer for the LoKr weights.", options=tuple(OPTIMIZERS)),
    Setting("validation_resolution", "int", FROM_CORE, "Side of the square preview images in pixels.",
            min=64, max=4096, step=16, label="preview size"),
    Setting("output_name", "str", "hidream_lokr", "Run folder name under output/hidream_lokr/ (a number is "
            "appended per run). Runs of one name continue each other (see resume_from_checkpoint).",
            label="output name"),
    Setting("validation_prompt", "text", FROM_CORE, "Prompt of the preview images (sampled with the LoKr as it trains). "
            "Empty: no previews.", label="preview prompt"),
    Setting("validation_step_interval", "int", FROM_CORE, "A preview every N steps (0: only at the end).",
            min=0, max=100_000, label="preview every"),
    Setting(RESUME_FIELD, "combo", RESUME_AUTO,
            "auto: continue this training's unfinished run (stopped, cancelled, failed or ComfyUI closed) from its "
            "newest checkpoint; a finished run is returned without training again. start over: a new run from "
            "step 0. latest: the newest complete checkpoint of any run named output_name. Or pick a checkpoint.",
            options=tuple(RESUME_CHOICES), label="resume from"),
]


@dataclass(frozen=True)
class SettingsGroup:
    """One optional settings node: its node id and title, the Train node's socket for it, and its widgets."""

    node_id: str
    display_name: str
    socket: str
    io_type: str
    description: str
    settings: tuple[Setting, ...]

    @property
    def socket_type(self):
        return io.Custom(self.io_type)


GROUPS = [
    SettingsGroup(
        "HiDreamLoKrOptimizerSettings", "LoKr training: optimizer & schedule", "optimizer_settings",
        "HIDREAM_LOKR_OPTIMIZER_SETTINGS",
        "Learning-rate schedule, batch size, gradient accumulation and EMA for Train HiDream LoKr. Not connected: "
        "the defaults shown here.",
        (Setting("lr_scheduler", "combo", FROM_CORE, "Learning-rate schedule over max_train_steps.",
                 options=tuple(LR_SCHEDULERS), label="lr schedule"),
         Setting("lr_warmup_steps", "int", FROM_CORE, "Steps over which the learning rate ramps up from 0.",
                 min=0, max=100_000, label="warmup steps"),
         Setting("train_batch_size", "int", FROM_CORE, "Images per forward pass.", min=1, max=64, label="batch size"),
         Setting("gradient_accumulation_steps", "int", FROM_CORE, "Forward passes accumulated into one optimizer step.",
                 min=1, max=1024, label="accumulation"),
         Setting("use_ema", "bool", FROM_CORE, "Keep an exponential moving average of the LoKr weights and save it.",
                 label="use EMA"),
         Setting("ema_decay", "float", FROM_CORE, "EMA decay per step.", min=0.0, max=1.0, step=0.0001,
                 label="EMA decay"))),
    SettingsGroup(
        "HiDreamLoKrPreviewSettings", "LoKr training: previews", "preview_settings",
        "HIDREAM_LOKR_PREVIEW_SETTINGS",
        "How the training previews are sampled (their prompt, interval and size are on the Train node). Not "
        "connected: the defaults shown here.",
        (Setting("validation_negative_prompt", "str", FROM_CORE, "Negative prompt of the previews.", label="negative"),
         Setting("validation_num_inference_steps", "int", FROM_CORE, "Sampling steps per preview.", min=1, max=200,
                 label="sample steps"),
         Setting("validation_guidance", "float", FROM_CORE, "CFG scale of the previews.", min=0.0, max=30.0,
                 step=0.1, label="guidance"))),
    SettingsGroup(
        "HiDreamLoKrCheckpointSettings", "LoKr training: checkpoints", "checkpoint_settings",
        "HIDREAM_LOKR_CHECKPOINT_SETTINGS",
        "How often Train HiDream LoKr writes a resumable checkpoint, and how many it keeps (Stop & save, Cancel "
        "and errors always write one). Not connected: the defaults shown here.",
        (Setting("checkpoint_step_interval", "int", FROM_CORE, "Save a resumable checkpoint every N steps (0: only "
                 "when stopped, cancelled or failed).", min=0, max=1_000_000, label="save every"),
         Setting("checkpoints_total_limit", "int", FROM_CORE, "Keep at most this many checkpoints (0: all).",
                 min=0, max=1000, label="keep at most"))),
    SettingsGroup(
        "HiDreamLoKrAdvancedSettings", "LoKr training: advanced", "advanced_settings",
        "HIDREAM_LOKR_ADVANCED_SETTINGS",
        "Seed, memory and precision, the flow-matching schedule, caption dropout and the MoE load-balancing loss "
        "for Train HiDream LoKr. Not connected: the defaults shown here.",
        (Setting("seed", "int", FROM_CORE, "Seed of noise, timesteps, dropout and the LoKr init: same seed, same run.",
                 min=0, max=2**31 - 1, extra={"control_after_generate": True}),
         Setting("gradient_checkpointing", "bool", FROM_CORE, "Recompute activations in the backward pass: much "
                 "less memory, ~30% slower. Off: a step that runs out of memory is retried with it on.",
                 label="gradient ckpt"),
         Setting("mixed_precision", "combo", FROM_CORE, "bf16: compute in bf16 (the LoKr itself stays float32). no: "
                 "the model's dtype.", options=("bf16", "no"), label="precision"),
         Setting("offload_blocks", "bool", FROM_CORE, "Low-memory mode: keep the transformer blocks in CPU memory and "
                 "stream each to the GPU just before it runs (needs gradient_checkpointing and a bf16 base; "
                 "slower).", label="offload blocks"),
         Setting("flow_schedule_shift", "float", FROM_CORE, "Shift of the training sigmas (HiDream-I1-Full was "
                 "trained with 3.0; the quickstart suggests starting near 1.0). Previews sample with the model's "
                 "own scheduler shift.", min=0.01, max=100.0, step=0.1, label="flow shift"),
         Setting("flow_schedule_auto_shift", "bool", FROM_CORE, "Shift by image resolution instead of the fixed "
                 "shift.", label="auto shift"),
         Setting("caption_dropout_probability", "float", FROM_CORE, "Chance to train a sample with an empty caption "
                 "(helps CFG).", min=0.0, max=0.99, step=0.01, label="caption drop"),
         Setting("hidream_use_load_balancing_loss", "bool", FROM_CORE, "Add the MoE load-balancing loss (with its "
                 "gradient) to keep experts in use.", label="MoE balance"),
         Setting("hidream_load_balancing_loss_weight", "float", FROM_CORE, "Weight of the load-balancing loss.",
                 min=0.0, max=10.0, step=0.001, label="MoE weight"),
         Setting("memory_mode", "combo", FROM_CORE, "auto: before training, a memory plan of this run on this GPU "
                 "picks the fastest of no checkpointing, gradient checkpointing and block offloading that fits "
                 "(the node says which and why). manual: the two settings above as they are.",
                 options=("manual", "auto"), optional=True, label="memory mode"))),
]

ALL_SETTINGS = {s.id: s for s in ESSENTIALS} | {s.id: s for g in GROUPS for s in g.settings}
DEFAULTS = {name: s.default for name, s in ALL_SETTINGS.items()}

# The Train node's widgets before the settings nodes (layout 1), in order; "control_after_generate" is the seed
# widget's companion value in a saved workflow's widgets_values. Its resume widget was a text box ("" = none).
LEGACY_TRAIN_WIDGETS = (
    "max_train_steps", "learning_rate", "optimizer", "lr_scheduler", "lr_warmup_steps", "train_batch_size",
    "gradient_accumulation_steps", "gradient_checkpointing", "mixed_precision", "flow_schedule_shift",
    "flow_schedule_auto_shift", "hidream_use_load_balancing_loss", "hidream_load_balancing_loss_weight",
    "caption_dropout_probability", "seed", "control_after_generate", "output_name", "validation_prompt",
    "validation_negative_prompt", "validation_step_interval", "validation_resolution",
    "validation_num_inference_steps", "validation_guidance", "use_ema", "ema_decay", "checkpoint_step_interval",
    "checkpoints_total_limit", "resume_from_checkpoint", "offload_blocks")
TRAIN_LAYOUT = 2  # properties.hidream_lokr_layout of a Train node saved with ESSENTIALS + settings sockets


def group_of(setting_id: str) -> Optional[SettingsGroup]:
    return next((g for g in GROUPS if any(s.id == setting_id for s in g.settings)), None)


@dataclass(frozen=True)
class SettingsValues:
    """What a settings node hands to the Train node: its group's widget values."""

    group: str
    values: dict


def merged_settings(essentials: dict, groups: dict[str, Optional[SettingsValues]]) -> dict:
    """Every training setting: the Train node's widgets, each connected settings node's values, the defaults of
    the unconnected ones."""
    settings = dict(DEFAULTS)
    for socket, given in groups.items():
        if given is not None:
            settings.update(given.values)
    settings.update({k: v for k, v in essentials.items() if k in ALL_SETTINGS})
    return settings


# ------------------------------------------------------------------------------------------------ to TrainConfig

def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def config_as_json(config) -> str:
    return json.dumps(_jsonable(asdict(config)), sort_keys=True)


# Settings that do not change what a run learns, so changing one still continues an unfinished run: where it is
# written, what it resumes from, its length (a longer run of the same settings continues the shorter one), the
# previews and checkpoints (neither draws from a training random stream), and the memory settings that compute the
# same steps (gradient checkpointing, block offload) - the usual fixes after running out of memory.
NOT_IN_FINGERPRINT = ("output_name", RESUME_FIELD, "max_train_steps", "validation_prompt", "validation_negative_prompt",
                      "validation_step_interval", "validation_resolution", "validation_num_inference_steps",
                      "validation_guidance", "checkpoint_step_interval", "checkpoints_total_limit",
                      "gradient_checkpointing", "offload_blocks", "memory_mode")


def run_fingerprint(model_name: str, dataset_fingerprint: str, encoders: list[str], lycoris: dict,
                    settings: dict) -> str:
    """Identifies "the same training" across queueings and ComfyUI restarts: the model, the images and captions,
    the encoders that filled the caches, the LoKr shape and every setting that shapes what is learned (all but
    NOT_IN_FINGERPRINT)."""
    relevant = {k: v for k, v in settings.items() if k not in NOT_IN_FINGERPRINT}
    payload = json.dumps([model_name, dataset_fingerprint, encoders, lycoris, _jsonable(relevant)], sort_keys=True,
                         default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def train_config_from_settings(settings: dict, data, output_dir: Path, lycoris_config_path: Path,
                               init_lokr_norm: Optional[float], device: str, resume_from: Optional[Path]):
    """The merged settings (ids = TrainConfig field names) plus the graph's inputs -> a validated TrainConfig.

    `resume_from` is the checkpoint folder run_store chose (None: from step 0); the resume widget's own value is a
    choice, not a path. Unknown ids are an error here rather than silently dropped: a widget must map onto the
    core's config.
    """
    from ..trainer_core.config import ConfigError, TrainConfig

    fields_of_config = set(TrainConfig.__dataclass_fields__)
    values = {k: v for k, v in settings.items() if v is not None and k not in ("output_name", RESUME_FIELD)}
    unknown = sorted(set(values) - fields_of_config)
    if unknown:
        raise ConfigError(f"training settings {unknown} are not options of this trainer_core version")
    side = values.pop("validation_resolution", None)
    if side is not None:
        values["validation_resolution"] = (side, side)
    if not (values.get("validation_prompt") or "").strip():
        values["validation_prompt"] = None
    if values.get("checkpoints_total_limit") == 0:  # the widget's "keep all"
        values["checkpoints_total_limit"] = None
    config = TrainConfig(
        pretrained_model_name_or_path=Path(output_dir),  # models come from the graph (ModelComponents)
        datasets=list(data.datasets), output_dir=Path(output_dir), cache_dir=data.cache_dir,
        lycoris_config=lycoris_config_path, init_lokr_norm=init_lokr_norm, device=device,
        resume_from_checkpoint=str(resume_from) if resume_from is not None else None, **values)
    config.validate()
    return config
