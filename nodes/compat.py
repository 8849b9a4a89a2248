"""The one place that adapts this pack to the ComfyUI it runs in. Every other module imports ComfyUI's V3 API and
the few server/execution hooks it needs from here, so a ComfyUI release that moves or changes one of them is fixed
in this file alone.

- The V3 node API is `comfy_api.latest`: ComfyUI's current API, in every release since 0.3.6x. The versioned
  modules are no pin: `comfy_api.v0_0_2` re-exports `latest` in the releases read for this pack (0.3.75, and the
  newer source of comfy_api/v0_0_2/__init__.py), so importing it would only pretend to pin. What the pack relies on
  is checked instead (`io`, `ui`, `ComfyExtension` here; optional newer parts such as `io.LoraModel`,
  `comfy.sd.load_bypass_lora_for_models` or `comfy.model_management.in_training` where they are used, with a
  fallback on ComfyUI without them).
- Interrupts: ComfyUI 0.3.75 checks the Cancel flag in every ProgressBar update; newer releases throttle those
  updates, so the training asks for the flag itself (`cancel_requested`). `InterruptProcessingException` derives from
  Exception in 0.3.75 and from BaseException later: catch it by name, never with a broad `except Exception`.
- The prompt server (websocket messages, HTTP routes, prompt hooks) exists only inside a running ComfyUI server;
  outside one (unit tests) the helpers here do nothing.

Tested: ComfyUI 0.3.75 with frontends 1.32.9 (the one it pins) and 1.58.1; newer ComfyUI read, not run.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)

TESTED_COMFYUI = "0.3.75"
TESTED_FRONTENDS = ("1.32.9", "1.58.1")
V3_API = "comfy_api.latest"


def _import_v3_api():
    try:
        module = importlib.import_module(V3_API)
    except ImportError:
        module = None
    missing = [attr for attr in ("io", "ui", "ComfyExtension") if not hasattr(module, attr)]
    if missing:
        raise ImportError(f"this ComfyUI has no V3 node API ({V3_API} lacks {', '.join(missing)}): the HiDream LoKr "
                          f"nodes need ComfyUI 0.3.6x or newer (tested on {TESTED_COMFYUI})")
    return V3_API, module


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


@contextlib.contextmanager
def comfy_training():
    """Tell ComfyUI's memory manager that a training runs, for as long as the block runs, whatever ends it.

    Newer ComfyUI has the flag `comfy.model_management.in_training` (its own trainer sets it; its ops then keep
    autograd-friendly code paths and its memory manager knows weights may be in use by a backward pass). ComfyUI
    0.3.75 has no such flag: nothing is set there."""
    mm = _model_management()
    if not hasattr(mm, "in_training"):
        yield
        return
    before = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = before


def free_memory_estimate(device) -> float:
    """ComfyUI's figure of free memory on `device`, in GiB: an estimate (newer ComfyUI does not count what its
    idle dynamic models hold and will give back), so people are told "about"."""
    return _model_management().get_free_memory(device) / 2**30


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


# ---------------------------------------------------------------------------------------------- LoRA application

def bypass_reason(model) -> Optional[str]:
    """Why a LoKr should run beside `model`'s weights instead of being merged into them (None: merging is fine).

    A dynamic model (newer ComfyUI's Dynamic VRAM: `is_dynamic()`) has no fixed weights to patch; 8-bit or
    otherwise quantised weights would be rounded again with the LoKr merged in (ComfyUI's own trainer and loader
    bypass for both)."""
    if callable(getattr(model, "is_dynamic", None)) and model.is_dynamic():
        return "a dynamic model (Dynamic VRAM)"
    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    for p in diffusion_model.parameters() if diffusion_model is not None else ():
        if type(p).__name__ == "QuantizedTensor":
            return "quantised weights"
        if p.dtype.itemsize == 1:
            return f"{p.dtype} weights"
    return None


def apply_lora(model, lora: dict, strength: float, bypass: bool):
    """`model` (a ModelPatcher) with `lora` (a LoRA file's keys and tensors) added, as a new clone.

    Merged: comfy.sd.load_lora_for_models, what LoraLoaderModelOnly does. Bypass (the weights are never changed):
    comfy.sd.load_bypass_lora_for_models where this ComfyUI has it (newer releases: the adapter's own forward
    beside the layer's); on ComfyUI without it (0.3.75), ComfyUI's weight wrappers add the same delta to each
    weight as it is cast for a forward pass (what its own TrainLoraNode does there), so the stored weights stay
    as loaded."""
    import comfy.sd

    if not bypass:
        return comfy.sd.load_lora_for_models(model, None, lora, strength, 0)[0]
    native = getattr(comfy.sd, "load_bypass_lora_for_models", None)
    if native is not None:
        return native(model, None, lora, strength, 0)[0]
    return _weight_wrapper_bypass(model, lora, strength)


def _weight_wrapper_bypass(model, lora: dict, strength: float):
    import functools

    import comfy.lora
    import comfy.lora_convert

    import comfy.utils

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora), key_map)
    patched = model.clone()
    merged = {}
    for key, patch in loaded.items():
        module = comfy.utils.get_attr(model.model, key.rsplit(".", 1)[0]) if isinstance(key, str) else None
        if module is None or not hasattr(module, "weight_function"):  # not a ComfyUI op: no wrapper runs there
            merged[key] = patch
            continue
        patched.add_weight_wrapper(key, functools.partial(_add_delta, [(strength, patch, 1.0, None, None)], key))
    if merged:
        patched.add_patches(merged, strength)
    return patched


def _add_delta(patches: list, key: str, weight):
    """A weight wrapper: `weight` is ComfyUI's fresh compute-dtype copy of the stored weight for this forward."""
    import comfy.lora

    return comfy.lora.calculate_weight(patches, weight, key)
