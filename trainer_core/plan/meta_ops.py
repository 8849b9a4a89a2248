"""How operators run in a dry run (dry_run.py): one TorchDispatchMode that counts every storage the code makes and
runs what cannot run on `meta` as it would on a GPU.

* Operators on `meta` run their meta kernels, behind a cache by input metadata (`_MetaOutputs`: torch's meta
  kernels for elementwise operators are Python and a model's blocks repeat them thousands of times).
* Host stand-ins (CPU tensors of STAND_IN_BYTES or more, never written): every operator over one runs on meta
  proxies, views are taken for real, in-place writes skipped (`_on_stand_ins`).
* Reads of device values get plausible ones (`_device_read`); an output size that depends on values stops the run.
* `scaled_dot_product_attention` runs as the kernel CUDA picks (`attention_as_on_cuda`), flash attention's backward
  with its workspace.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, Optional

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

from . import allocator

if TYPE_CHECKING:
    from .dry_run import Allocation, DryRun

aten = torch.ops.aten

STAND_IN_BYTES = 16 * 2**20  # CPU tensors this big are stand-ins (never computed); smaller ones are real
SMALL_READ = 4096  # a device tensor copied to the host with at most this many elements gets plausible values
GPU, HOST = "gpu", "host"

_MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten._scaled_mm.default,
            aten._int_mm.default, aten._grouped_mm.default}


class DryRunError(RuntimeError):
    """The code did something a dry run cannot follow (an output size that depends on device values)."""


def storages_of(tensor: torch.Tensor) -> list:
    """The storages behind a tensor (a quantised tensor subclass has several: its data and its scales)."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return [s for name in names for s in storages_of(getattr(tensor, name))]
    try:
        return [tensor.untyped_storage()]
    except (RuntimeError, NotImplementedError):
        return []




@contextlib.contextmanager
def attention_as_on_cuda() -> Iterator[None]:
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


class CountingMode(TorchDispatchMode):
    """The dispatch mode of a DryRun (module docstring)."""

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
