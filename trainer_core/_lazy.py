"""Lazy public faces: a package lists the names it offers and the module each lives in; a name's module is imported
the first time the name is used (PEP 562). So `from trainer_core.training import COMMANDS` costs what
`training/interface.py` costs, not an import of diffusers, and ComfyUI's start-up pays for nothing the pack does
not run yet."""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, names: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]],
                                                                list[str]]:
    """(__getattr__, __dir__, __all__) for `package`, whose public `names` map to their modules (relative, e.g.
    ".run")."""

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(names[name], package), name)
        globals_of_package = importlib.import_module(package).__dict__
        globals_of_package[name] = value  # later lookups are plain attribute reads
        return value

    def __dir__() -> list[str]:
        return sorted(set(names) | set(importlib.import_module(package).__dict__))

    return __getattr__, __dir__, sorted(names)
