"""The diffusers code two speed-ups stand in for, pinned by a fingerprint of its source.

`moe_dispatch.py` and `lean_rope.py` replace diffusers functions with their own code that computes the same thing
(tests/test_moe_dispatch.py, tests/test_lean_rope.py hold them to diffusers 0.42.1). requirements.txt asks for
diffusers>=0.42.1, and inside ComfyUI the user's diffusers can be any newer version, whose HiDream code may compute
something else. So before installing, each speed-up compares the installed functions with the versions it was
checked against (a hash of their source; CHECKED). On any difference it stays off, says so in one log line, and
diffusers' own code runs: slower, never wrong. A new diffusers release that keeps these functions as they are
keeps the speed-ups; one that changes them needs the tests run against it and its fingerprints added here.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import sys
import textwrap
from typing import Callable, Optional

logger = logging.getLogger(__name__)

# speed-up -> {diffusers function it reimplements or relies on: fingerprints of the versions checked}
CHECKED: dict[str, dict[str, frozenset[str]]] = {
    "fast_moe_dispatch": {
        "MOEFeedForwardSwiGLU.forward": frozenset({"961f956b2a3872e2"}),  # diffusers 0.42.1
        "MoEGate.forward": frozenset({"7d90a4cf05222bfb"}),
    },
    "lean_rope": {
        "HiDreamAttnProcessor.__call__": frozenset({"e4cd757295a1c841"}),
        "HiDreamAttention.forward": frozenset({"e6abf438b84a67d9"}),
        "apply_rope": frozenset({"64bb8d5b08ed4070"}),
    },
}
_said: set[tuple[str, str]] = set()


@functools.lru_cache(maxsize=None)
def fingerprint(function: Callable) -> str:
    """The first 16 hex digits of the sha256 of a function's source (dedented)."""
    source = textwrap.dedent(inspect.getsource(function))
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def mismatch(speedup: str, installed: dict[str, Optional[Callable]]) -> Optional[str]:
    """None when every function of CHECKED[speedup] is, in `installed` (name -> the function this process would
    run), a version the speed-up was checked against; else the reason, logged once per process."""
    import diffusers

    for name, known in CHECKED[speedup].items():
        function = installed.get(name)
        try:
            found = fingerprint(function) if function is not None else "missing"
        except (OSError, TypeError):  # no source to read (a compiled or built-in function)
            found = "without readable source"
        if found not in known:
            why = (f"{speedup} is off: diffusers {diffusers.__version__}'s {name} ({found}) is not the code it was "
                   f"checked against (diffusers 0.42.1); diffusers' own code runs instead")
            if (speedup, why) not in _said:
                _said.add((speedup, why))
                logger.warning(why)
            return why
    return None


def module_function(cls: type, name: str) -> Optional[Callable]:
    """A function defined at module level next to class `cls` (e.g. diffusers' apply_rope beside its attention)."""
    return getattr(sys.modules.get(cls.__module__), name, None)
