"""Read SimpleTuner-style JSON configs (config.json + multidatabackend.json + lycoris_config.json) into TrainConfig.

Values in these files are often strings ("true", "20", "4e-5"); each is converted to the type the typed config
declares, and a value that does not convert is an error naming the key. Relative paths are looked up first from the
working directory (where SimpleTuner users run) and then next to the config file.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import typing
from pathlib import Path
from typing import Any, Optional

from .config import ConfigError, DatasetConfig, TrainConfig

logger = logging.getLogger(__name__)

# SimpleTuner keys read under another name, or that only choose things this trainer always does.
_ALIASES = {"llama_model_name_or_path": "pretrained_llama_path"}
_ACCEPTED_FIXED = {"model_family": "hidream", "model_type": "lora", "lora_type": "lycoris"}
_DATASET_IGNORED = {"type", "metadata_backend", "disabled", "skip_file_discovery", "cache_dir_vae",
                    "target_downsample_size", "dataset_type", "default", "cache_dir", "write_batch_size"}


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
    """'1024x768' (width x height), '1024' or 1024 -> (width, height)."""
    text = str(value).split(",")[0].strip().lower()
    try:
        if "x" in text:
            w, h = text.split("x")
            return int(w), int(h)
        side = int(float(text))
        return side, side
    except ValueError:
        raise ConfigError(f"{what}: expected WIDTHxHEIGHT such as 1024x1024, got {value!r}") from None


def _resolve(path_value: Any, base: Path) -> Path:
    path = Path(str(path_value)).expanduser()
    if path.is_absolute() or path.exists():
        return path
    candidate = base / path
    return candidate if candidate.exists() else path


def read_dataset_entries(entries: list, base: Path, defaults: dict) -> list[DatasetConfig]:
    """multidatabackend.json entries -> DatasetConfig (text-embed backends and disabled sets are skipped)."""
    if not isinstance(entries, list):
        raise ConfigError("the data backend config must be a JSON list of dataset objects")
    hints = typing.get_type_hints(DatasetConfig)
    fields = {f.name for f in dataclasses.fields(DatasetConfig)}
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"dataset entry {i} must be an object, got {type(entry).__name__}")
        if entry.get("dataset_type") in ("text_embeds", "image_embeds") or str(entry.get("disabled", "")).lower() == "true":
            continue
        ident = str(entry.get("id", f"dataset{i}"))
        if "instance_data_dir" not in entry:
            raise ConfigError(f"dataset '{ident}' has no instance_data_dir")
        values = {k: v for k, v in defaults.items() if k in fields}
        unknown = []
        for key, value in entry.items():
            if key in fields:
                values[key] = value
            elif key not in _DATASET_IGNORED:
                unknown.append(key)
        if unknown:
            logger.warning("dataset '%s': keys not used by this trainer yet: %s", ident, ", ".join(sorted(unknown)))
        kwargs = {k: coerce(v, hints[k], f"dataset '{ident}' {k}") for k, v in values.items()}
        kwargs["instance_data_dir"] = _resolve(entry["instance_data_dir"], base)
        kwargs["id"] = ident
        out.append(DatasetConfig(**kwargs))
    return out


def train_config_from_dict(data: dict, base: Path = Path(".")) -> TrainConfig:
    """Build a TrainConfig from a SimpleTuner-style dict (keys optionally prefixed with '--', as in ST's files)."""
    data = {str(k).lstrip("-"): v for k, v in data.items()}
    for key, expected in _ACCEPTED_FIXED.items():
        if key in data and str(data.pop(key)).strip().lower() != expected:
            raise ConfigError(f"{key} must be '{expected}' for this trainer")
    hints = typing.get_type_hints(TrainConfig)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = {}
    unknown = []
    for key, value in data.items():
        key = _ALIASES.get(key, key)
        if key in ("data_backend_config", "datasets"):
            continue
        if key == "validation_resolution":
            values[key] = parse_resolution(value)
        elif key in fields:
            values[key] = coerce(value, hints[key], key)
        else:
            unknown.append(key)
    if unknown:
        logger.warning("config keys not used by this trainer yet (ignored): %s", ", ".join(sorted(unknown)))
    if "pretrained_model_name_or_path" not in values:
        raise ConfigError("pretrained_model_name_or_path is required: the HiDream-I1 model folder "
                          "(diffusers layout), e.g. the folder `python -m trainer_core make-tiny-model` writes")
    for key in ("pretrained_model_name_or_path", "pretrained_llama_path", "lycoris_config", "cache_dir"):
        if values.get(key) is not None:
            values[key] = _resolve(values[key], base)
    dataset_defaults = {k: data[k] for k in ("resolution", "resolution_type", "minimum_image_size") if k in data}
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
    values["datasets"] = read_dataset_entries(entries, base, dataset_defaults)
    config = TrainConfig(**values)
    config.validate()
    return config


def load_train_config(path: Path) -> TrainConfig:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a JSON object")
    return train_config_from_dict(data, base=path.parent)
