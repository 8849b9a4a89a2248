"""Training-node widgets -> TrainConfig: the one place where the node's settings meet the core's config.

Widget ids ARE TrainConfig field names (SimpleTuner's keys), so the mapping is mechanical: a new core option is
wired by adding its widget here, and `train_config_from_settings` refuses a widget id that is not a field.
"""
from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional

from comfy_api.latest import io

from ..trainer_core.config import LR_SCHEDULERS, OPTIMIZERS as CORE_OPTIMIZERS, ConfigError, TrainConfig
from .types import TrainingData

CONFIG_FIELDS = {f.name for f in fields(TrainConfig)}
INIT_LOKR_FIELD = "init_lokr_weights"  # continue from an existing LoKr
RESUME_FIELD = "resume_from_checkpoint"
OPTIMIZERS = [n for n in CORE_OPTIMIZERS if n not in ("adamw_bf16", "torch-adamw")]  # both are adamw here


def core_settings() -> list:
    """The training widgets every graph sets, in node order."""
    return [
        io.Int.Input("max_train_steps", default=1000, min=1, max=1_000_000,
                     tooltip="Optimizer steps to train (each sees train_batch_size x gradient_accumulation_steps "
                             "images)."),
        io.Float.Input("learning_rate", default=1e-4, min=1e-8, max=1.0, step=1e-5, round=1e-8,
                       tooltip="Peak learning rate (the quickstart uses 4e-5 to 1e-4 for LoKr)."),
        io.Combo.Input("optimizer", options=OPTIMIZERS, default="adamw", tooltip="Optimizer for the LoKr weights."),
        io.Combo.Input("lr_scheduler", options=list(LR_SCHEDULERS), default="constant_with_warmup",
                       tooltip="Learning-rate schedule over max_train_steps."),
        io.Int.Input("lr_warmup_steps", default=100, min=0, max=100_000,
                     tooltip="Steps over which the learning rate ramps up from 0."),
        io.Int.Input("train_batch_size", default=1, min=1, max=64, tooltip="Images per forward pass."),
        io.Int.Input("gradient_accumulation_steps", default=1, min=1, max=1024,
                     tooltip="Forward passes accumulated into one optimizer step."),
        io.Boolean.Input("gradient_checkpointing", default=True,
                         tooltip="Recompute activations in the backward pass: much less memory, ~30% slower."),
        io.Combo.Input("mixed_precision", options=["bf16", "no"], default="bf16",
                       tooltip="bf16: compute in bf16 (the LoKr itself stays float32). no: the model's dtype."),
        io.Float.Input("flow_schedule_shift", default=3.0, min=0.0, max=100.0, step=0.1,
                       tooltip="Shift of the training sigmas (HiDream-I1-Full samples with 3.0)."),
        io.Boolean.Input("flow_schedule_auto_shift", default=False,
                         tooltip="Shift by image resolution instead of the fixed shift."),
        io.Boolean.Input("hidream_use_load_balancing_loss", default=False,
                         tooltip="Add the MoE load-balancing loss (with its gradient) to keep experts in use."),
        io.Float.Input("hidream_load_balancing_loss_weight", default=0.01, min=0.0, max=10.0, step=0.001,
                       tooltip="Weight of the load-balancing loss."),
        io.Float.Input("caption_dropout_probability", default=0.0, min=0.0, max=0.99, step=0.01,
                       tooltip="Chance to train a sample with an empty caption (helps CFG)."),
        io.Int.Input("seed", default=42, min=0, max=2**31 - 1, control_after_generate=True,
                     tooltip="Seed of noise, timesteps, dropout and the LoKr init: same seed, same run. Change it "
                             "to train again with unchanged inputs (ComfyUI reuses a finished run otherwise)."),
        io.String.Input("output_name", default="hidream_lokr",
                        tooltip="Run folder name under output/hidream_lokr/ (a number is appended per run)."),
        io.String.Input("validation_prompt", multiline=True, default="",
                        tooltip="Prompt of the preview images (sampled with the LoKr merged). Empty: no previews."),
        io.String.Input("validation_negative_prompt", default="", tooltip="Negative prompt of the previews."),
        io.Int.Input("validation_step_interval", default=100, min=0, max=100_000,
                     tooltip="A preview every N steps (0: only at the end)."),
        io.Int.Input("validation_resolution", default=1024, min=64, max=4096, step=16,
                     tooltip="Side of the square preview images in pixels."),
        io.Int.Input("validation_num_inference_steps", default=20, min=1, max=200,
                     tooltip="Sampling steps per preview."),
        io.Float.Input("validation_guidance", default=3.0, min=0.0, max=30.0, step=0.1,
                       tooltip="CFG scale of the previews."),
    ]


def optional_settings() -> list:
    """Widgets for the options a graph may leave unconnected (checkpoints, EMA, resume)."""
    return [
        io.Boolean.Input("use_ema", default=False, optional=True,
                         tooltip="Keep an exponential moving average of the LoKr weights and save it."),
        io.Float.Input("ema_decay", default=0.995, min=0.0, max=1.0, step=0.0001, optional=True,
                       tooltip="EMA decay per step."),
        io.Int.Input("checkpoint_step_interval", default=500, min=0, max=1_000_000, optional=True,
                     tooltip="Save a resumable checkpoint every N steps (0: never)."),
        io.Int.Input("checkpoints_total_limit", default=5, min=0, max=1000, optional=True,
                     tooltip="Keep at most this many checkpoints (0: all)."),
        io.String.Input("resume_from_checkpoint", default="", optional=True,
                        tooltip="A checkpoint folder to resume from ('latest' = the newest of this run name)."),
        io.Boolean.Input("offload_blocks", default=False, optional=True,
                         tooltip="Low-memory mode: keep the transformer blocks in CPU memory and stream each to the "
                                 "GPU just before it runs (needs gradient_checkpointing and a bf16 base; slower)."),
    ]


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def config_as_json(config: TrainConfig) -> str:
    return json.dumps(_jsonable(asdict(config)), sort_keys=True)


def run_key(model_name: str, dataset_fingerprint: str, lycoris: dict, settings: dict) -> str:
    """Identifies "the same training" across queueings (everything that shapes the run except where it is written
    and what it resumes from)."""
    import hashlib

    relevant = {k: v for k, v in settings.items() if k not in ("output_name", RESUME_FIELD)}
    payload = json.dumps([model_name, dataset_fingerprint, lycoris, _jsonable(relevant)], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def train_config_from_settings(settings: dict, data: TrainingData, output_dir: Path, lycoris_config_path: Path,
                               init_lokr_norm: Optional[float], device: str) -> TrainConfig:
    """The node's widget values (ids = TrainConfig field names) plus the graph's inputs -> a validated TrainConfig.

    Unknown ids are an error here rather than silently dropped: a widget must map onto the core's config.
    """
    values = {k: v for k, v in settings.items() if v is not None}
    unknown = sorted(set(values) - CONFIG_FIELDS)
    if unknown:
        raise ConfigError(f"training settings {unknown} are not options of this trainer_core version")
    side = values.pop("validation_resolution", None)
    if side is not None:
        values["validation_resolution"] = (side, side)
    if not (values.get("validation_prompt") or "").strip():
        values["validation_prompt"] = None
    if values.get("resume_from_checkpoint") == "":
        values["resume_from_checkpoint"] = None
    if values.get("checkpoints_total_limit") == 0:  # the widget's "keep all"
        values["checkpoints_total_limit"] = None
    config = TrainConfig(
        pretrained_model_name_or_path=Path(output_dir),  # models come from the graph (ModelComponents)
        datasets=list(data.datasets), output_dir=Path(output_dir), cache_dir=data.cache_dir,
        lycoris_config=lycoris_config_path, init_lokr_norm=init_lokr_norm, device=device, **values)
    config.validate()
    return config
