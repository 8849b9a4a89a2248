"""Reading the JSON files users bring (configs, dataset lists, LoKr configs, prompt libraries) with errors that name
the file and what it was for."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from .schema import ConfigError

logger = logging.getLogger(__name__)

_TRAILING_COMMA = re.compile(r",(\s*[}\]])")


def read_json_file(path: Path, what: str, allow_trailing_commas: bool = False):
    """The parsed JSON of `path`; a missing or malformed file is a ConfigError that names `what` and the file.

    `allow_trailing_commas` tolerates the trailing commas SimpleTuner's own example lycoris_config.json contains
    (invalid JSON that SimpleTuner's reader accepts), with a warning.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if not allow_trailing_commas:
            raise ConfigError(f"{what} {path} is not valid JSON: {exc}") from exc
        error = exc
    try:
        data = json.loads(_TRAILING_COMMA.sub(r"\1", text))
    except json.JSONDecodeError:
        raise ConfigError(f"{what} {path} is not valid JSON: {error}") from error
    logger.warning("%s has trailing commas (invalid JSON); read it anyway", path)
    return data
