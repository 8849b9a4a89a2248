"""The one place that adapts this pack to the ComfyUI it runs in. Every other module imports ComfyUI's V3 API and
the few server/execution hooks it needs from here, so a ComfyUI release that moves or changes one of them is fixed
in this file alone.

- The V3 node API comes from a pinned version module (`comfy_api.v0_0_2`, what this pack is written and tested
  against) where the running ComfyUI has one; ComfyUI's maintainers advise pinning instead of `latest`, which is
  their development API. Older releases without versioned modules fall back to `comfy_api.latest`.
- Interrupts: ComfyUI 0.3.75 checks the Cancel flag in every ProgressBar update; newer releases throttle those
  updates, so the training asks for the flag itself (`cancel_requested`). `InterruptProcessingException` derives from
  Exception in 0.3.75 and from BaseException later: catch it by name, never with a broad `except Exception`.
- The prompt server (websocket messages, HTTP routes, prompt hooks) exists only inside a running ComfyUI server;
  outside one (unit tests) the helpers here do nothing.

Tested: ComfyUI 0.3.75 with frontends 1.32.9 (the one it pins) and 1.58.1.
"""
from __future__ import annotations

import importlib
import logging
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)

PINNED_API = "v0_0_2"
TESTED_COMFYUI = "0.3.75"
TESTED_FRONTENDS = ("1.32.9", "1.58.1")


def _import_v3_api():
    for name in (f"comfy_api.{PINNED_API}", "comfy_api.latest"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if all(hasattr(module, attr) for attr in ("io", "ui", "ComfyExtension")):
            return name, module
    raise ImportError("this ComfyUI has no V3 node API (comfy_api.latest): the HiDream LoKr nodes need ComfyUI "
                      f"0.3.6x or newer (tested on {TESTED_COMFYUI})")


API_MODULE, _api = _import_v3_api()
io = _api.io
ui = _api.ui
ComfyExtension = _api.ComfyExtension


# ---------------------------------------------------------------------------------------------- interrupts

def _model_management():
    import comfy.model_management

    return comfy.model_management


def interrupt_exception() -> type:
    """ComfyUI's InterruptProcessingException (what Cancel raises inside a node)."""
    return _model_management().InterruptProcessingException


def cancel_requested() -> bool:
    """Whether the user pressed Cancel, without consuming the flag."""
    return bool(_model_management().processing_interrupted())


def raise_interrupt() -> None:
    """Re-raise ComfyUI's interrupt after the node has cleaned up, so ComfyUI reports the prompt as interrupted
    (and clears the flag if it is still set)."""
    mm = _model_management()
    mm.throw_exception_if_processing_interrupted()
    raise mm.InterruptProcessingException()


# ---------------------------------------------------------------------------------------------- execution

def current_prompt_id() -> Optional[str]:
    """The id of the prompt now executing (None outside an execution)."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    context = get_executing_context()
    return getattr(context, "prompt_id", None) if context else None


def progress_bar(total: int, node_id: Optional[str]):
    import comfy.utils

    return comfy.utils.ProgressBar(total, node_id=node_id)


# ---------------------------------------------------------------------------------------------- the server

def prompt_server():
    """ComfyUI's PromptServer instance, or None outside a running server."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def send_event(event: str, data: dict) -> None:
    """A websocket message to the client that queued the running prompt (every client when none is known)."""
    server = prompt_server()
    if server is not None:
        server.send_sync(event, data, getattr(server, "client_id", None))


def add_prompt_handler(handler: Callable[[dict], dict]) -> bool:
    """Run `handler(json_body)` on every POST /prompt before ComfyUI validates it; False when this ComfyUI has no
    such hook (then the check runs when the nodes execute)."""
    server = prompt_server()
    if server is None or not hasattr(server, "add_on_prompt_handler"):
        return False
    server.add_on_prompt_handler(handler)
    return True


def routes() -> Any:
    server = prompt_server()
    return None if server is None else server.routes
