"""Count the device-to-host reads ("host syncs") a piece of code makes, by dispatch, on any device.

A GPU runs ahead of the host only while the host never waits for a device value. Every `.item()`, `.tolist()`,
`bool(tensor)`, boolean-mask index, `nonzero`, `unique`, ... makes the host wait until the device has finished all
queued work (and, on a CUDA graph capture, is an error). `HostSyncCounter` counts those reads as they are dispatched,
so a CPU run counts exactly what the same code would make a GPU wait for:

    with HostSyncCounter() as syncs:
        step()
    syncs.total, syncs.by_op        # e.g. Counter({"tolist": 1, "_local_scalar_dense": 6})

Two layers, because some reads never reach the dispatcher on a CPU (`.tolist()` of a CPU tensor reads its memory
directly): a TorchFunctionMode counts the Python-level reads (`tolist`, `numpy`, `item`, `bool`/`int`/`float`/
`format` of a tensor, `.cpu()` / `.to("cpu")` of a tensor not on the CPU), and a TorchDispatchMode counts the aten
operators whose output size or value the host must know (`SYNC_OPS`, boolean-mask indexing, `repeat_interleave`
with tensor repeats and no output size, `_local_scalar_dense` reached from C++). A read counted at the Python level
is not counted again by what it dispatches.

On a CPU run every tensor is taken to live on the device: a read of a tensor that a GPU run would keep on the host
(for example torch AdamW's CPU step counter when not capturable/fused) counts too, so the CPU count is an upper
bound of the GPU's. Compiled code (torch.compile) refuses dispatch modes; count it with
`torch.compiler.set_stance("force_eager")` (the same code eagerly: a fullgraph region cannot hide a host read, since
a read is a graph break).
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# aten operators (overload packet names) that make the host wait for a device value: a data-dependent output size
# (nonzero, masked_select, unique, ...), a value returned to Python (_local_scalar_dense, equal, is_nonzero), or a
# size check the CUDA kernel makes on the host (bincount reads the input's max; one_hot without num_classes does too
# but decomposes into _local_scalar_dense on every device).
SYNC_OPS = frozenset((
    "_local_scalar_dense", "nonzero", "argwhere", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "unique_dim_consecutive", "equal", "is_nonzero", "bincount", "histogram", "item",
    "_assert_scalar", "segment_reduce",
))
# Operators whose host read depends on their arguments (`_dynamic_sync`).
_INDEXING_OPS = frozenset(("index", "index_put", "index_put_", "_index_put_impl_"))

# Tensor methods that hand a device value to Python.
_PYTHON_READS = frozenset(("tolist", "numpy", "item", "__bool__", "__int__", "__float__", "__index__", "__format__",
                           "__complex__", "__array__"))


def _is_mask(index) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _dynamic_sync(name: str, args, kwargs) -> bool:
    if name in _INDEXING_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(_is_mask(i) for i in (indices or ()))
    if name == "repeat_interleave":
        repeats = args[0] if len(args) == 1 else (args[1] if len(args) > 1 else kwargs.get("repeats"))
        output_size = kwargs.get("output_size", args[3] if len(args) > 3 else None)
        return isinstance(repeats, torch.Tensor) and repeats.numel() > 1 and output_size is None
    return False


def _reads_to_host(func, args, kwargs) -> bool:
    name = getattr(func, "__name__", "")
    if name in _PYTHON_READS:
        return True
    if name not in ("cpu", "to") or not args or not isinstance(args[0], torch.Tensor):
        return False
    if args[0].device.type == "cpu":
        return False  # already on the host: a no-op (on a CPU run `.cpu()` is never a read)
    if name == "cpu":
        return True
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    return isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu"


class _PythonReads(TorchFunctionMode):
    def __init__(self, counter: "HostSyncCounter"):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.counter._inside or not _reads_to_host(func, args, kwargs):
            return func(*args, **kwargs)
        self.counter.by_op[getattr(func, "__name__", str(func))] += 1
        self.counter._inside = True
        try:
            return func(*args, **kwargs)
        finally:
            self.counter._inside = False


class _DispatchedReads(TorchDispatchMode):
    def __init__(self, counter: "HostSyncCounter"):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.counter._inside:
            name = func.overloadpacket.__name__
            if name in SYNC_OPS or _dynamic_sync(name, args, kwargs):
                self.counter.by_op[name] += 1
        return func(*args, **kwargs)


class HostSyncCounter:
    """Counts device-to-host reads while active (a context manager; reusable). `by_op` names what read."""

    def __init__(self) -> None:
        self.by_op: Counter = Counter()
        self._inside = False
        self._modes: list = []

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __enter__(self) -> "HostSyncCounter":
        self._modes = [_PythonReads(self), _DispatchedReads(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = []
