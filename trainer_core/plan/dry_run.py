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
and freed (a weak reference to the storage says when). `attention_as_flash` routes `scaled_dot_product_attention`
to the flash-attention operator CUDA picks for bf16 (on `meta` torch would pick its math fallback, which keeps the
whole S x S attention matrix), and its backward's workspace is added while it runs; cuBLAS' workspace is added at
the first matmul.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

from ..util.device import simulating
from . import allocator

aten = torch.ops.aten

STAND_IN_BYTES = 16 * 2**20  # CPU tensors this big are stand-ins (never computed); smaller ones are real
SMALL_READ = 4096  # a device tensor copied to the host with at most this many elements gets plausible values
GPU, HOST = "gpu", "host"

_MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten._scaled_mm.default,
            aten._int_mm.default, aten._grouped_mm.default}


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


class DryRunError(RuntimeError):
    """The code did something a dry run cannot follow (an output size that depends on device values)."""


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
        stack.enter_context(_attention_as_flash())
        stack.enter_context(_CountingMode(self))
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
            for storage in _storages(tensor):
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
        for storage in ((tensor.untyped_storage(),) if type(tensor) is torch.Tensor else _storages(tensor)):
            key = id(storage)
            if key in self._by_storage:
                continue
            where = place or (GPU if storage.device.type == "meta" else HOST)
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
            for storage in _storages(tensor):
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


def _storages(tensor: torch.Tensor) -> list:
    """The storages behind a tensor (a quantised tensor subclass has several: its data and its scales)."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return [s for name in names for s in _storages(getattr(tensor, name))]
    try:
        return [tensor.untyped_storage()]
    except (RuntimeError, NotImplementedError):
        return []


# ---------------------------------------------------------------------------------------------- the modes


@contextlib.contextmanager
def _attention_as_flash() -> Iterator[None]:
    """`F.scaled_dot_product_attention` on meta tensors as CUDA runs it with no mask or dropout: flash attention in
    16 bits, the memory-efficient kernel in float32; their meta kernels keep what they keep (the output and a
    float32 log-sum-exp per row; the efficient kernel's backward workspace is not modelled). Installed as
    the function itself while the dry run lasts, not as a TorchFunctionMode: checkpoint recomputation runs inside
    autograd's backward, where torch function modes are not active."""
    original = F.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False):
        if query.is_meta and attn_mask is None and not dropout_p and not enable_gqa and query.shape[-1] % 8 == 0:
            if query.dtype in (torch.bfloat16, torch.float16) and query.shape[-1] <= 256:
                return aten._scaled_dot_product_flash_attention(query, key, value, 0.0, is_causal, False,
                                                                scale=scale)[0]
            if query.dtype == torch.float32:  # flash takes 16 bits only: CUDA's memory-efficient kernel
                grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
                return aten._scaled_dot_product_efficient_attention(query, key, value, None, grad, 0.0, is_causal,
                                                                    scale=scale)[0]
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


class _CountingMode(TorchDispatchMode):
    def __init__(self, dry: DryRun):
        super().__init__()
        self.dry = dry
        self.cache = _MetaOutputs()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.is_view:  # a view allocates nothing and reads no data, on meta, stand-ins and real tensors alike
            return func(*args, **kwargs)
        dry = self.dry
        leaves = _tensor_leaves(args, kwargs)
        if kwargs.get("pin_memory") and kwargs.get("device") is not None and torch.device(kwargs["device"]).type \
                == "meta":  # block_offload's pinned host buffers: on meta in a plan (util.device.host_device)
            out = func(*args, **{**kwargs, "pin_memory": None})
            dry.track(out, func.overloadpacket.__name__, pinned=True, place=HOST)
            return out
        meta = False
        for t in leaves:
            if t.is_meta:
                meta = True
            elif dry.is_stand_in(t):
                return _on_stand_ins(dry, func, args, kwargs)
        if _makes_host_stand_in(func, args, leaves, kwargs):
            return _on_stand_ins(dry, func, args, kwargs)
        if meta:
            if func in _READS or func.overloadpacket in _SIZE_FROM_VALUES or func.overloadpacket in _INDEXING:
                read = _device_read(dry, func, args, kwargs)
                if read is not _NOT_A_READ:
                    return read
            if func in _MATMULS:
                dry.matmul_seen()
        workspace = _workspace(dry, func, args) if meta else None
        try:
            out = self.cache.run(func, args, kwargs, leaves) if meta else func(*args, **kwargs)
        finally:
            if workspace is not None:
                dry.release(workspace)
        if func is aten.topk.default and meta:  # indices into the last (or `dim`) axis: expert ids, for bincount
            dim = args[2] if len(args) > 2 else kwargs.get("dim", -1)
            dry.set_largest_value(out[1], args[0].shape[dim] - 1)
        pinned = bool(kwargs.get("pin_memory"))
        name = func.overloadpacket.__name__
        if isinstance(out, torch.Tensor):
            dry.track(out, name, pinned=pinned)
        elif isinstance(out, (tuple, list)):
            for tensor in out:
                if isinstance(tensor, torch.Tensor):
                    dry.track(tensor, name, pinned=pinned)
        return out


def _tensor_leaves(args, kwargs) -> list:
    """The tensors among an operator's arguments (operator arguments nest at most one list deep)."""
    found = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


class _MetaOutputs:
    """torch's meta kernels for elementwise operators are Python (torch._refs) and take 0.2-1.5 ms each; a model's
    blocks repeat the same operators on the same shapes thousands of times. Once an operator has run on inputs of
    some metadata, later calls with inputs of the same metadata skip its kernel: an operator that makes fresh
    tensors (no view, no output sharing an input's storage) gets empty tensors of the metadata the first call's
    outputs had (None and numbers among them as they were); an in-place operator (`clamp_`, `mul_`: on meta it
    only checks its arguments, which it did the first time) returns the tensor it writes."""

    _UNCACHEABLE = object()
    _IN_PLACE = object()

    def __init__(self):
        self.outputs: dict = {}

    def run(self, func, args, kwargs, leaves):
        key = _signature(func, args, kwargs)
        if key is None:
            return func(*args, **kwargs)
        found = self.outputs.get(key)
        if found is self._UNCACHEABLE:
            return func(*args, **kwargs)
        if found is self._IN_PLACE:
            return args[0]
        if found is not None:
            single, specs = found
            made = [torch.empty_strided(spec[0], spec[1], dtype=spec[2], device="meta") if type(spec) is tuple
                    else spec.value for spec in specs]
            return made[0] if single else tuple(made)
        out = func(*args, **kwargs)
        self.outputs[key] = self._spec(func, out, args, leaves)
        return out

    def _spec(self, func, out, args, leaves):
        if func.is_view or func in _ALIASING:
            return self._UNCACHEABLE
        if func._schema.is_mutable:  # `op_(self, ...) -> self`: the written tensor is the one returned
            returns, first = func._schema.returns, func._schema.arguments[0]
            writes_self = first.alias_info is not None and first.alias_info.is_write and len(returns) == 1 and \
                returns[0].alias_info is not None and out is args[0]
            return self._IN_PLACE if writes_self else self._UNCACHEABLE
        outputs = [out] if isinstance(out, torch.Tensor) else list(out) if isinstance(out, (tuple, list)) else None
        if not outputs or not all(_kept_as_is(o) or (isinstance(o, torch.Tensor) and o.is_meta and not
                                                     is_traceable_wrapper_subclass(o)) for o in outputs):
            return self._UNCACHEABLE
        inputs = {id(t.untyped_storage()) for t in leaves if t.is_meta}
        tensors = [o for o in outputs if isinstance(o, torch.Tensor)]
        if not tensors or any(id(o.untyped_storage()) in inputs or o.storage_offset() for o in tensors):
            return self._UNCACHEABLE
        return isinstance(out, torch.Tensor), [(tuple(o.shape), tuple(o.stride()), o.dtype)
                                               if isinstance(o, torch.Tensor) else _Value(o) for o in outputs]


class _Value:
    """A non-tensor output kept as it was (None, an int)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def _kept_as_is(value) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


_ALIASING = {aten._unsafe_view.default, aten.alias.default, aten.lift_fresh.default}


def _signature(func, args, kwargs):
    """A hashable description of an operator call's metadata (None when an argument has none)."""
    parts = [func]
    for value in (*args, *kwargs.items()):
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):  # a keyword argument
            parts.append(value[0])
            value = value[1]
        part = _describe(value)
        if part is _NO_SIGNATURE:
            return None
        parts.append(part)
    return tuple(parts)


_NO_SIGNATURE = object()


def _describe(value):
    if type(value) is torch.Tensor or type(value) is torch.nn.Parameter:
        if not value.is_meta:
            return _NO_SIGNATURE
        return (value.shape, value.stride(), value.dtype)  # (an offset changes no output's metadata)
    if isinstance(value, torch.Tensor):
        return _NO_SIGNATURE
    if isinstance(value, (list, tuple)):
        described = tuple(_describe(v) for v in value)
        return _NO_SIGNATURE if any(d is _NO_SIGNATURE for d in described) else (type(value), described)
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device, torch.memory_format,
                                           torch.layout)):
        return value
    return _NO_SIGNATURE


_NOT_A_READ = object()


def _device_read(dry: DryRun, func, args, kwargs):
    """Reads of device values get plausible values (module docstring); _NOT_A_READ for every other operator."""
    if func is aten._local_scalar_dense.default:
        return dry.values_of(args[0])[0]
    if func in (aten.equal.default, aten.is_nonzero.default):
        return True
    if func is aten._to_copy.default:
        target = kwargs.get("device")
        if not (args[0].is_meta and target is not None and torch.device(target).type == "cpu"):
            return _NOT_A_READ
        source = args[0]
        dtype = kwargs.get("dtype") or source.dtype
        if source.numel() <= SMALL_READ:
            values = torch.tensor(dry.values_of(source), dtype=dtype).reshape(source.shape)
            dry.track(values, "_to_copy")
            return values
        stand_in = torch.empty_strided(source.shape, source.stride() if source.is_contiguous() else
                                       _contiguous_strides(source.shape), dtype=dtype, device="cpu")
        dry.track(stand_in, "stand-in: copy to host", pinned=bool(kwargs.get("pin_memory")))
        return stand_in
    if func is aten.copy_.default:
        return args[0] if args[0].device.type == "cpu" and args[1].is_meta else _NOT_A_READ  # values never read
    if func is aten.bincount.default:
        minlength = kwargs.get("minlength", args[2] if len(args) > 2 else 0)
        largest = dry.largest_value(args[0])  # bincount's length is the input's largest value + 1
        counts = torch.empty(max(int(minlength), largest + 1, 1), dtype=torch.int64, device="meta")
        dry.track(counts, "bincount")
        _hint_even_counts(dry, counts, args[0].numel())
        return counts
    packet = func.overloadpacket
    if packet in _SIZE_FROM_VALUES or (packet in _INDEXING and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or ()))):
        raise DryRunError(f"{func} in {dry.where()}: its output size depends on device values, which a dry run "
                          "does not have")
    return _NOT_A_READ


# The operators _device_read looks at; every other one skips it.
_READS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default, aten._to_copy.default,
          aten.copy_.default, aten.bincount.default}
_SIZE_FROM_VALUES = {aten.nonzero, aten.masked_select, aten.unique_dim, aten._unique2, aten.argwhere}
_INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def _hint_even_counts(dry: DryRun, counts: torch.Tensor, total: int) -> None:
    bins = counts.numel()
    dry.hint(counts, lambda: [total // bins + (1 if i < total % bins else 0) for i in range(bins)])


def _workspace(dry: DryRun, func, args) -> Optional[Allocation]:
    if func is aten._scaled_dot_product_flash_attention_backward.default:
        query = args[1]  # (B, H, S, D)
        batch, heads, seq, dim = query.shape
        return dry.allocate(allocator.flash_backward_workspace(batch, heads, seq, dim), GPU,
                            "flash attention backward workspace", label="attention workspace")
    return None


def _contiguous_strides(shape) -> tuple:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _makes_host_stand_in(func, args, leaves, kwargs) -> bool:
    """True for an operator that makes a CPU tensor whose values nothing needs: one on device tensors with its
    output sent to the CPU (`empty_like(..., device="cpu")`, as `Module.to_empty` does), or a factory asked for
    pinned memory (a CPU build cannot pin; the dry run counts it as pinned) or for a stand-in's size."""
    if func is aten._to_copy.default:
        return False  # _device_read decides (a small copy to the host gets plausible values)
    explicit = kwargs.get("device")
    if leaves:
        return explicit is not None and torch.device(explicit).type == "cpu" and any(t.is_meta for t in leaves)
    if torch.device(explicit or "cpu").type != "cpu":  # a factory without a device makes a CPU tensor
        return False
    if kwargs.get("pin_memory"):
        return True
    try:
        probe = func(*args, **{**kwargs, "device": torch.device("meta"), "pin_memory": None})
    except (TypeError, RuntimeError):  # not a factory after all (no device argument)
        return False
    return isinstance(probe, torch.Tensor) and probe.untyped_storage().nbytes() >= STAND_IN_BYTES


def _meta_proxy(tensor: torch.Tensor) -> torch.Tensor:
    """The same tensor (shape, strides, offset, dtype) on `meta`."""
    storage = torch.UntypedStorage(tensor.untyped_storage().nbytes(), device="meta")
    return torch.empty((), dtype=tensor.dtype, device="meta").set_(storage, tensor.storage_offset(), tensor.size(),
                                                                    tensor.stride())


def _on_stand_ins(dry: DryRun, func, args, kwargs):
    """An operator over stand-ins: views are taken for real (no data is read), in-place writes are skipped, and
    anything else runs on meta proxies, its CPU outputs becoming new stand-ins."""
    schema = func._schema
    if func.is_view:
        out = func(*args, **kwargs)
        return out
    if schema.is_mutable:
        written = [a for a, spec in zip(args, schema.arguments) if spec.alias_info is not None and
                   spec.alias_info.is_write]
        written += [kwargs[spec.name] for spec in schema.arguments if spec.name in kwargs and
                    spec.alias_info is not None and spec.alias_info.is_write]
        return written[0] if len(written) == 1 else tuple(written)
    if func is aten._local_scalar_dense.default:
        return True if args[0].dtype == torch.bool else 1
    to_meta = lambda x: _meta_proxy(x) if isinstance(x, torch.Tensor) and x.device.type == "cpu" else x  # noqa: E731
    meta_args, meta_kwargs = pytree.tree_map(to_meta, (args, kwargs))
    cpu_out = True
    if "device" in meta_kwargs:
        target = meta_kwargs["device"]
        cpu_out = target is None or torch.device(target).type == "cpu"
        meta_kwargs["device"] = torch.device("meta") if cpu_out else target
    pinned = bool(meta_kwargs.pop("pin_memory", False))
    out = func(*meta_args, **meta_kwargs)
    if not cpu_out:
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                dry.track(tensor, func.overloadpacket.__name__)
        return out

    def materialise(x):
        if not isinstance(x, torch.Tensor):
            return x
        stand_in = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="cpu")
        dry.track(stand_in, f"stand-in: {func.overloadpacket.__name__}", pinned=pinned)
        return stand_in

    return pytree.tree_map(materialise, out)
