"""Keep third-party chatter out of the console while the pack's nodes (and the CLI demo) run.

LyCORIS prints INFO lines (with ANSI colour codes) every time it builds or loads a LoKr; transformers prints
progress bars ("Loading weights", "Writing model shards") and a load report; diffusers and huggingface_hub have
progress bars of their own. None of it helps a ComfyUI user or a first-time demo run. Inside `quiet_libraries()`
those libraries log errors only and draw no progress bars; this project's own messages are unchanged.

With the root logger at debug level (ComfyUI's `--verbose DEBUG`) nothing is silenced. Every setting is put back
when the block ends, so other node packs see the libraries as they configured them.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
from typing import Iterator

# logger -> the lowest level still shown inside quiet_libraries(). torch logs "No CUDA runtime is found" once when
# LyCORIS or quanto first load its C++ extension helpers.
QUIET_LOGGERS = {"LyCORIS": logging.WARNING, "torch.utils.cpp_extension": logging.ERROR}


class _QuietFilter(logging.Filter):
    """Drops a logger's records below its threshold while a quiet block is open. A filter, not a level: LyCORIS
    sets its logger's level when it is first imported (inside the block), which would undo a level set here."""

    def __init__(self, threshold: int) -> None:
        super().__init__()
        self.threshold, self.open_blocks = threshold, 0

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.open_blocks or record.levelno >= self.threshold


_FILTERS: dict[str, _QuietFilter] = {}


def _filter_for(name: str) -> _QuietFilter:
    if name not in _FILTERS:
        _FILTERS[name] = _QuietFilter(QUIET_LOGGERS[name])
        logging.getLogger(name).addFilter(_FILTERS[name])
    return _FILTERS[name]


def _debugging() -> bool:
    return logging.getLogger().getEffectiveLevel() <= logging.DEBUG


def _library_logging(name: str):
    """transformers.utils.logging / diffusers.utils.logging (same API), when the library is importable."""
    try:
        return importlib.import_module(f"{name}.utils.logging")
    except ImportError:
        return None


@contextlib.contextmanager
def quiet_libraries(diffusers: bool = True) -> Iterator[None]:
    """`diffusers=False` for work that does not load diffusers (importing it only to quiet it costs a second)."""
    if _debugging():
        yield
        return
    undo = contextlib.ExitStack()
    with undo:
        for name in QUIET_LOGGERS:
            quiet = _filter_for(name)
            quiet.open_blocks += 1
            undo.callback(lambda q=quiet: setattr(q, "open_blocks", q.open_blocks - 1))
        # diffusers is not loaded at ComfyUI's start-up; work that needs it imports it inside the block anyway.
        for name in ("transformers", "diffusers") if diffusers else ("transformers",):
            lib = _library_logging(name)
            if lib is None:
                continue
            verbosity = lib.get_verbosity()
            lib.set_verbosity_error()
            undo.callback(lib.set_verbosity, verbosity)
            if lib.is_progress_bar_enabled():
                lib.disable_progress_bar()
                undo.callback(lib.enable_progress_bar)
        try:
            hub = importlib.import_module("huggingface_hub.utils")
        except ImportError:
            hub = None
        if hub is not None and not hub.are_progress_bars_disabled():
            hub.disable_progress_bars()
            undo.callback(hub.enable_progress_bars)
        yield
