"""A dry run: the project's own code at full size, on no memory, with every allocation it makes counted.

    with DryRun() as dry:                       # the accelerator is torch's `meta` device, simulated as CUDA
        with dry.phase("training step"):
            step.run(micro_batches)             # the trainer's own code, unchanged
    dry.phases["training step"].peak_gpu        # bytes, as torch.cuda.max_memory_allocated() would say

The accelerator is `meta`: its tensors have shapes, dtypes and strides but no data, and every operator computes
only their metadata (torch 2.13 runs whole forwards and backwards so, flash attention, `_scaled_mm`, `_int_mm` and
grouped GEMMs included). While a dry run is active `util.device.device_kind(meta)` answers "cuda", so the few
places where the code chooses by device (pinned host memory, the grouped MoE dispatch) choose what they would on a
GPU.

Host memory is real CPU tensors that are never computed (stand-ins): a CPU tensor of 16 MiB or more that the code
makes (a model read into CPU memory, block_offload's pinned buffers, a GPU tensor copied to the host) is allocated
by the operating system lazily and never written, and every operator with a stand-in among its inputs runs on
`meta` instead, its outputs becoming new stand-ins. Small CPU tensors (random generators, noise, a scheduler's
sigmas) are computed for real, so the code's control flow sees real numbers where it reads them.

Reads of device values (`.item()`, `.tolist()`, `bincount`'s counts) get plausible values: a count of tokens per
MoE expert is an even split (the memory of the sorted dispatch does not depend on the split: every expert's rows
concatenate to the same N*k rows), a loss or a flag is 1. An operator whose output size depends on device values
(`nonzero`, boolean masks) cannot run without them: the dry run stops with the operator and the module it ran in.

Counted for every tensor storage made while the run is active: its bytes (on the accelerator rounded as CUDA's
caching allocator rounds, allocator.py), where it lives, the operator and module that made it, when it was made
and freed (a weak reference to the storage says when). `scaled_dot_product_attention` runs as the kernel CUDA
picks (on `meta` torch would pick its math fallback, which keeps the whole S x S attention matrix), flash
attention's backward with its workspace; cuBLAS' workspace is added at the first matmul. How each operator runs:
meta_ops.py.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from ..util.device import making_placeholders, simulating
from . import allocator
from .meta_ops import GPU, HOST, CountingMode, DryRunError, attention_as_on_cuda, storages_of

__all__ = ["Allocation", "DryRun", "DryRunError", "GPU", "HOST", "PhaseMemory"]



@dataclass(slots=True)
class Allocation:
    """One block of memory the code held: `nbytes` as the allocator hands it out, from event `start` to `end`."""

    nbytes: int
    place: str  # GPU or HOST
    op: str
    module: str
    shape: tuple
    dtype: object  # a torch.dtype, or a description
    start: int
    end: Optional[int] = None
    pinned: bool = False
    label: Optional[str] = None  # what the code means it for (DryRun.label): "frozen weights", "adapter", ...

    def live_at(self, event: int) -> bool:
        return self.start <= event and (self.end is None or event < self.end)


@dataclass
class PhaseMemory:
    """The peaks of one phase: bytes on the accelerator (allocated) and on the host, and when they happened."""

    name: str
    start: int
    end: int = -1
    peak_gpu: int = 0
    peak_gpu_at: int = 0
    peak_host: int = 0
    peak_host_at: int = 0
    notes: list = field(default_factory=list)


class DryRun:
    """Counts the memory of the code run inside it (see the module docstring). `capability` is the compute
    capability of the GPU planned for (cuBLAS' workspace size depends on it)."""

    def __init__(self, capability: tuple[int, int] = (9, 0)):
        self.capability = capability
        self.allocations: list[Allocation] = []
        self.phases: dict[str, PhaseMemory] = {}
        self.clock = 0
        self.live = {GPU: 0, HOST: 0}
        self._by_storage: dict[int, tuple[Allocation, weakref.ref]] = {}
        self._hints: dict[int, Callable[[], list]] = {}  # storage id -> the values a host read of it gets
        self._largest: dict[int, int] = {}  # storage id -> the largest value an integer tensor can hold
        self._phase: Optional[PhaseMemory] = None
        self._module_names: dict[int, str] = {}
        self._stack: list[str] = []
        self._stack_enter = contextlib.ExitStack()
        self._cublas = False

    # ------------------------------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "DryRun":
        stack = self._stack_enter
        stack.enter_context(simulating("cuda"))
        stack.enter_context(attention_as_on_cuda())
        stack.enter_context(CountingMode(self))
        pre = torch.nn.modules.module.register_module_forward_pre_hook(self._enter_module)
        post = torch.nn.modules.module.register_module_forward_hook(self._leave_module, always_call=True)
        stack.callback(pre.remove)
        stack.callback(post.remove)
        return self

    def __exit__(self, *exc) -> None:
        self._stack_enter.close()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[PhaseMemory]:
        """Record the peaks of the code run inside as phase `name` (phases do not nest)."""
        record = PhaseMemory(name, start=self.clock, peak_gpu=self.live[GPU], peak_gpu_at=self.clock,
                             peak_host=self.live[HOST], peak_host_at=self.clock)
        self.phases[name], self._phase, self._stack[:] = record, record, []
        try:
            yield record
        finally:
            record.end = self.clock
            self._phase = None

    def name_modules(self, root: torch.nn.Module, prefix: str) -> None:
        """Allocations made inside `root`'s modules are attributed to `prefix.<module path>`."""
        for name, module in root.named_modules():
            self._module_names[id(module)] = f"{prefix}.{name}" if name else prefix

    def label(self, tensors, label: str) -> int:
        """Mark the live allocations of `tensors` (tensors, modules or iterables of them) as `label`; returns
        their bytes."""
        total = 0
        for tensor in _tensors_of(tensors):
            for storage in storages_of(tensor):
                found = self._by_storage.get(id(storage))
                if found is not None and found[0].label is None:
                    found[0].label = label
                    total += found[0].nbytes
        return total

    # ------------------------------------------------------------------------------------------ accounting

    def _enter_module(self, module, args) -> None:
        name = self._module_names.get(id(module))
        if name is not None:
            self._stack.append(name)

    def _leave_module(self, module, args, output) -> None:
        if id(module) in self._module_names and self._stack:
            self._stack.pop()

    def where(self) -> str:
        inside = self._stack[-1] if self._stack else "(outside the models)"
        return f"{inside} [backward]" if torch._C._current_graph_task_id() != -1 else inside

    def _tick(self, place: str, delta: int) -> None:
        self.clock += 1
        self.live[place] += delta
        phase = self._phase
        if phase is None or delta <= 0:
            return
        if place == GPU and self.live[GPU] > phase.peak_gpu:
            phase.peak_gpu, phase.peak_gpu_at = self.live[GPU], self.clock
        elif place == HOST and self.live[HOST] > phase.peak_host:
            phase.peak_host, phase.peak_host_at = self.live[HOST], self.clock

    def allocate(self, nbytes: int, place: str, op: str, shape=(), dtype="", pinned: bool = False,
                 label: Optional[str] = None) -> Allocation:
        """Count an allocation that is not a tensor the code sees (a library's workspace); free it with
        `release`, or never (it then lasts the whole run)."""
        record = Allocation(nbytes, place, op, self.where(), shape, dtype, self.clock + 1, pinned=pinned,
                            label=label)
        self.allocations.append(record)
        self._tick(place, nbytes)
        return record

    def release(self, record: Allocation) -> None:
        if record.end is None:
            self._tick(record.place, -record.nbytes)
            record.end = self.clock

    def track(self, tensor: torch.Tensor, op: str, pinned: bool = False, place: Optional[str] = None) -> None:
        """Count the storage(s) behind `tensor` if they are new: on the accelerator if on meta (unless `place` says
        otherwise: block_offload's host buffers are meta in a plan), else on the host."""
        for storage in ((tensor.untyped_storage(),) if type(tensor) is torch.Tensor else storages_of(tensor)):
            key = id(storage)
            if key in self._by_storage:
                continue
            where = place or (GPU if storage.device.type == "meta" else HOST)
            if where == GPU and storage.device.type == "meta" and making_placeholders():
                continue  # util.device.meta_placeholders: a skeleton, not memory
            nbytes = storage.nbytes()
            nbytes = allocator.block_bytes(nbytes) if where == GPU else nbytes
            record = self.allocate(nbytes, where, op, tensor.shape, tensor.dtype, pinned=pinned)
            self._by_storage[key] = (record, weakref.ref(storage, self._freed(key, record)))

    def rehome(self, module: torch.nn.Module, device: torch.device, place: str) -> None:
        """Move `module` to `device` without counting the move, its tensors counted on `place` from then on (a
        model the loader leaves in host memory, put on meta so that block_offload can swap its weights' data with
        its meta buffers; see util.device.host_device)."""
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            module.to(device)
        for tensor in _tensors_of(module):
            self.track(tensor, "as loaded", place=place)

    def retag(self, tensors, place: str, pinned: bool = False) -> int:
        """Count the live meta storages of `tensors` as being on `place` from now on (a model the loader leaves
        in host memory, re-homed on meta so that block_offload can swap its weights); returns their bytes."""
        moved = 0
        for tensor in _tensors_of(tensors):
            for storage in storages_of(tensor):
                found = self._by_storage.get(id(storage))
                if found is None or found[0].place == place:
                    continue
                old, ref = found
                self.release(old)
                nbytes = allocator.block_bytes(storage.nbytes()) if place == GPU else storage.nbytes()
                new = self.allocate(nbytes, place, old.op, old.shape, old.dtype, pinned=pinned, label=old.label)
                self._by_storage[id(storage)] = (new, weakref.ref(storage, self._freed(id(storage), new)))
                moved += nbytes
        return moved

    def _freed(self, key: int, record: Allocation) -> Callable:
        def callback(_ref) -> None:
            self._by_storage.pop(key, None)
            self._hints.pop(key, None)
            self._largest.pop(key, None)
            self.release(record)

        return callback

    def is_stand_in(self, tensor: torch.Tensor) -> bool:
        if tensor.device.type != "cpu":
            return False
        found = self._by_storage.get(id(tensor.untyped_storage()))
        return found is not None and found[0].op.startswith("stand-in")

    def set_largest_value(self, tensor: torch.Tensor, value: int) -> None:
        self._largest[id(tensor.untyped_storage())] = value

    def largest_value(self, tensor: torch.Tensor) -> int:
        """The largest value the integer device tensor `tensor` can hold, where an operator says (top-k indices);
        0 when unknown."""
        return self._largest.get(id(tensor.untyped_storage()), 0)

    def hint(self, tensor: torch.Tensor, values: Callable[[], list]) -> None:
        self._hints[id(tensor.untyped_storage())] = values

    def values_of(self, tensor: torch.Tensor) -> list:
        """What a host read of the device tensor `tensor` gets: its hint, else ones (True for flags)."""
        found = self._hints.get(id(tensor.untyped_storage()))
        if found is not None:
            return found()
        return [True if tensor.dtype == torch.bool else 1] * tensor.numel()

    def matmul_seen(self) -> None:
        if not self._cublas:
            self._cublas = True
            self.allocate(allocator.cublas_workspace_bytes(self.capability), GPU, "cuBLAS workspace",
                          label="cuBLAS workspace")

    # ------------------------------------------------------------------------------------------ reading

    def live_at(self, event: int, place: str = GPU) -> list[Allocation]:
        return [a for a in self.allocations if a.place == place and a.live_at(event)]

    def peak_tensors(self, phase: str, place: str = GPU, top: int = 6) -> list[dict]:
        """The groups of allocations that make `phase`'s peak on `place`, largest first: allocations with a label
        group by label, the others by the module (blocks numbered alike merged: `single_stream_blocks.*`) and
        operator that made them."""
        record = self.phases[phase]
        at = record.peak_gpu_at if place == GPU else record.peak_host_at
        groups: dict[str, dict] = {}
        for a in self.live_at(at, place):
            key = a.label or f"{_generic(a.module)}: {a.op}"
            group = groups.setdefault(key, {"what": key, "bytes": 0, "tensors": 0, "example_shape": a.shape,
                                            "dtype": a.dtype})
            group["bytes"] += a.nbytes
            group["tensors"] += 1
        return sorted(groups.values(), key=lambda g: -g["bytes"])[:top]

    def peak_blocks(self, phase: str) -> list[int]:
        record = self.phases[phase]
        return [a.nbytes for a in self.live_at(record.peak_gpu_at, GPU)]

    def pinned_at(self, event: int) -> int:
        return sum(a.nbytes for a in self.live_at(event, HOST) if a.pinned)


def _generic(module: str) -> str:
    """`transformer.single_stream_blocks.7.block.attn1` -> `transformer.single_stream_blocks.*.block.attn1`."""
    return ".".join("*" if part.isdigit() else part for part in module.split("."))


def _tensors_of(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors_of(value)
    elif isinstance(obj, (list, tuple, set)):
        for value in obj:
            yield from _tensors_of(value)
