"""Read SimpleTuner-style JSON configs (config.json + multidatabackend.json + lycoris_config.json) into TrainConfig.

Values in these files are often strings ("true", "20", "4e-5"); each is converted to the type the typed config
declares, and a value that does not convert is an error naming the key. Relative paths are looked up first from the
working directory (where SimpleTuner users run) and then next to the config file.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import typing
from pathlib import Path
from typing import Any, Optional

from .json_files import read_json_file
from .schema import BUCKET_STEP, ConfigError, DatasetConfig, TrainConfig, check_model_choice, parse_resolutions

logger = logging.getLogger(__name__)

# SimpleTuner keys read under another name.
_ALIASES = {"llama_model_name_or_path": "pretrained_llama_path"}
# Dataset keys read by read_backend_entries itself, or that choose what this trainer always does:
# discovery always runs (skip_file_discovery only skips ST's own metadata scan), metadata lives in the caches.
_DATASET_IGNORED = {"type", "metadata_backend", "disabled", "skip_file_discovery", "dataset_type", "default",
                    "cache_dir", "write_batch_size", "image_embeds", "text_embeds"}


def coerce(value: Any, annotation: Any, what: str) -> Any:
    """Convert a JSON value (often a string) to `annotation`: bool, int, float, str, Path, Optional, Literal."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None
        return coerce(value, args[0], what)
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        text = str(value).strip()
        if text not in allowed:
            raise ConfigError(f"{what}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return text
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off", ""):
            return False
        raise ConfigError(f"{what}: expected true or false, got {value!r}")
    if annotation in (int, float):
        try:
            number = float(str(value).strip()) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{what}: expected a number, got {value!r}") from None
        if number != number:
            raise ConfigError(f"{what}: NaN is not allowed")
        if annotation is int:
            if number != int(number):
                raise ConfigError(f"{what}: expected a whole number, got {value!r}")
            return int(number)
        return number
    if annotation is Path:
        return Path(str(value))
    if annotation is str:
        return str(value)
    return value


def parse_resolution(value: Any, what: str = "validation_resolution") -> tuple[int, int]:
    """'1024x768' (width x height), '1024' or 1024 -> (width, height); the first of a comma-separated list."""
    return parse_resolutions(value, what)[0]


def _resolve(path_value: Any, base: Path) -> Path:
    path = Path(str(path_value)).expanduser()
    if path.is_absolute() or path.exists():
        return path
    candidate = base / path
    return candidate if candidate.exists() else path


def _is_true(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes", "on")


@dataclasses.dataclass
class BackendSettings:
    """What a multidatabackend.json says beyond its image datasets (cache locations, batch sizes)."""

    datasets: list[DatasetConfig]
    text_cache_dir: Optional[Path] = None
    text_cache_write_batch_size: Optional[int] = None
    unknown_keys: list[str] = dataclasses.field(default_factory=list)


def read_dataset_entries(entries: list, base: Path, defaults: dict) -> list[DatasetConfig]:
    """multidatabackend.json entries -> DatasetConfig (text/image-embed backends and disabled sets are skipped)."""
    return read_backend_entries(entries, base, defaults).datasets


def read_backend_entries(entries: list, base: Path, defaults: dict) -> BackendSettings:
    """Read every multidatabackend.json entry: image datasets (training or dataset_type eval), the text_embeds
    backend (its cache_dir and write_batch_size) and image_embeds backends (their cache_dir holds the latents of
    the datasets that name them, or of every dataset without cache_dir_vae when there is only one)."""
    if not isinstance(entries, list):
        raise ConfigError("the data backend config must be a JSON list of dataset objects")
    hints = typing.get_type_hints(DatasetConfig)
    fields = {f.name for f in dataclasses.fields(DatasetConfig)}
    settings = BackendSettings(datasets=[])
    image_embed_dirs: dict[str, Path] = {}
    pending: list[tuple[dict, str]] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"dataset entry {i} must be an object, got {type(entry).__name__}")
        ident = str(entry.get("id", f"dataset{i}"))
        if _is_true(entry.get("disabled", False)):
            logger.info("dataset '%s' is disabled: skipped", ident)
            continue
        kind = str(entry.get("type", "local")).strip().lower()
        if kind != "local":
            raise ConfigError(f"dataset '{ident}': type {kind!r} is not supported; only 'local' folders are")
        dataset_type = str(entry.get("dataset_type", "image")).strip().lower()
        if dataset_type == "text_embeds":
            if settings.text_cache_dir is None or _is_true(entry.get("default", False)):
                if entry.get("cache_dir"):
                    settings.text_cache_dir = _resolve(entry["cache_dir"], base)
                if entry.get("write_batch_size") not in (None, ""):
                    settings.text_cache_write_batch_size = coerce(entry["write_batch_size"], int,
                                                                  f"dataset '{ident}' write_batch_size")
            continue
        if dataset_type == "image_embeds":
            if entry.get("cache_dir"):
                image_embed_dirs[ident] = _resolve(entry["cache_dir"], base)
            continue
        if dataset_type not in ("image", "eval"):
            raise ConfigError(f"dataset '{ident}': dataset_type {dataset_type!r} is not supported; use image, "
                              "eval, text_embeds or image_embeds")
        metadata = str(entry.get("metadata_backend", "discovery")).strip().lower()
        if metadata not in ("discovery", "json"):
            raise ConfigError(f"dataset '{ident}': metadata_backend {metadata!r} is not supported; use 'discovery' "
                              "(images and captions are read from instance_data_dir)")
        if "instance_data_dir" not in entry:
            raise ConfigError(f"dataset '{ident}' has no instance_data_dir")
        pending.append((entry, ident))
    for entry, ident in pending:
        values = {k: v for k, v in defaults.items() if k in fields}
        for key, value in entry.items():
            if key in fields:
                values[key] = value
            elif key not in _DATASET_IGNORED:
                settings.unknown_keys.append(f"dataset '{ident}' {key}")
        if str(values.get("resolution_type", "")).strip() == "area":
            values = _area_as_pixel_area(values, ident)
        kwargs = {k: coerce(v, hints[k], f"dataset '{ident}' {k}") for k, v in values.items()}
        kwargs["instance_data_dir"] = _resolve(entry["instance_data_dir"], base)
        kwargs["id"] = ident
        if kwargs.get("cache_dir_vae") is not None:
            kwargs["cache_dir_vae"] = _resolve(kwargs["cache_dir_vae"], base)
        elif entry.get("image_embeds") in image_embed_dirs:
            kwargs["cache_dir_vae"] = image_embed_dirs[entry["image_embeds"]]
        elif len(image_embed_dirs) == 1:
            kwargs["cache_dir_vae"] = next(iter(image_embed_dirs.values()))
        settings.datasets.append(DatasetConfig(**kwargs))
    return settings


# Keys read for the datasets' defaults (SimpleTuner lets config.json set them for every dataset; its
# aspect_bucket_rounding is a global setting only).
_DATASET_DEFAULT_KEYS = ("resolution", "resolution_type", "minimum_image_size", "maximum_image_size",
                         "target_downsample_size", "caption_strategy", "aspect_bucket_rounding")
# SimpleTuner reads these round megapixel values of resolution_type "area" as these pixel edges.
_AREA_EDGES = {0.25: 512, 0.5: 768, 1.0: 1024, 2.0: 1536, 4.0: 2048}
_AREA_SIZE_KEYS = ("minimum_image_size", "maximum_image_size", "target_downsample_size")


def _area_as_pixel_area(values: dict, ident: str) -> dict:
    """SimpleTuner's resolution_type "area" (sizes in megapixels) as the same buckets in pixel_area terms: the
    resolution becomes the square's edge (its round values as SimpleTuner maps them, 1.0 -> 1024), rounded to
    the 16 px step; minimum/maximum/target sizes become the edges of squares of their area."""
    def edge(key: str) -> int:
        megapixels = coerce(values[key], float, f"dataset '{ident}' {key}")
        if megapixels <= 0:
            raise ConfigError(f"dataset '{ident}' {key}: with resolution_type area it is in megapixels and must be "
                              f"positive, got {values[key]!r}")
        if key == "resolution":
            mapped = next((px for mp, px in _AREA_EDGES.items() if abs(megapixels - mp) < 0.05), None)
            if mapped is not None:
                return mapped
            return max(BUCKET_STEP, round(math.sqrt(megapixels * 1e6) / BUCKET_STEP) * BUCKET_STEP)
        return round(math.sqrt(megapixels * 1e6))

    out = dict(values, resolution_type="pixel_area")
    for key in ("resolution", *_AREA_SIZE_KEYS):
        if out.get(key) not in (None, "", 0, "0"):
            out[key] = edge(key)
    logger.info("dataset '%s': resolution_type area %s megapixels read as pixel_area %s px", ident,
                values.get("resolution"), out.get("resolution"))
    return out


def train_config_from_dict(data: dict, base: Path = Path(".")) -> TrainConfig:
    """Build a TrainConfig from a SimpleTuner-style dict (keys optionally prefixed with '--', as in ST's files).

    Keys this trainer does not know are listed together in one warning; a known key with a bad value is a
    ConfigError naming the key, the value and what is allowed.
    """
    data = {str(k).lstrip("-"): v for k, v in data.items()}
    hints = typing.get_type_hints(TrainConfig)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = {}
    unknown = []
    for key, value in data.items():
        key = _ALIASES.get(key, key)
        if key in ("data_backend_config", "datasets", *_DATASET_DEFAULT_KEYS):
            continue
        if key == "validation_resolution":
            values[key] = parse_resolutions(value)
        elif key in ("model_family", "model_type", "lora_type", "model_flavour", "optimizer", "report_to"):
            values[key] = str(value).strip().lower()
        elif key == "resume_from_checkpoint":
            text = "" if value is None else str(value).strip()
            values[key] = None if text.lower() in ("", "none", "null", "false") else text
        elif key in fields:
            values[key] = coerce(value, hints[key], key)
        else:
            unknown.append(key)
    check_model_choice(values.get("model_family", "hidream"), values.get("model_type", "lora"),
                       values.get("model_flavour", "full"), values.get("lora_type", "lycoris"))
    flavour = values.get("model_flavour", "full")
    if flavour in ("dev", "fast"):
        logger.warning("model_flavour %s is a distilled model: training it breaks its distillation (images drift "
                       "towards noise); 'full' is the flavour to train", flavour)
    if "pretrained_model_name_or_path" not in values:
        raise ConfigError("pretrained_model_name_or_path is required: the HiDream-I1 model folder "
                          "(diffusers layout), e.g. the folder `python -m trainer_core make-tiny-model` writes")
    for key in ("pretrained_model_name_or_path", "pretrained_transformer_model_name_or_path",
                "pretrained_llama_path", "lycoris_config", "cache_dir",
                "user_prompt_library", "init_lokr_weights"):
        if values.get(key) is not None:
            values[key] = _resolve(values[key], base)
    dataset_defaults = {k: data[k] for k in _DATASET_DEFAULT_KEYS if k in data}
    if "datasets" in data:
        entries = data["datasets"]
    elif "data_backend_config" in data:
        backend_path = _resolve(data["data_backend_config"], base)
        try:
            entries = json.loads(Path(backend_path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read data_backend_config {backend_path}: {exc}") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"data_backend_config {backend_path} is not valid JSON: {exc}") from exc
    else:
        raise ConfigError("no datasets: set data_backend_config to a multidatabackend.json, or give 'datasets'")
    backend = read_backend_entries(entries, base, dataset_defaults)
    values["datasets"] = backend.datasets
    if backend.text_cache_dir is not None and "text_cache_dir" not in values:
        values["text_cache_dir"] = backend.text_cache_dir
    if backend.text_cache_write_batch_size is not None and "text_cache_write_batch_size" not in values:
        values["text_cache_write_batch_size"] = backend.text_cache_write_batch_size
    unknown += backend.unknown_keys
    if unknown:
        logger.warning("%d config keys are not used by this trainer and are ignored: %s", len(unknown),
                       ", ".join(sorted(unknown)))
    config = TrainConfig(**values)
    config.validate()
    return config


def load_train_config(path: Path) -> TrainConfig:
    path = Path(path)
    data = read_json_file(path, "config")
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a JSON object")
    return train_config_from_dict(data, base=path.parent)
