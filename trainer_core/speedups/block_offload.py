"""Low-memory mode: the transformer blocks' weights live in pinned CPU memory and are streamed to the accelerator.

Only the running block (and the one being prefetched) has its weights on the device; everything outside the blocks
(embedders, caption projections, final layer) stays there. Each block's parameters and buffers are packed into one
pinned byte buffer, so bringing a block over is one large host-to-device copy, issued on a side stream while the
previous block computes. An fp8-scaled / int8-scaled base streams its 8-bit weights (buffers) and their float32
scales: half the bytes of a bf16 base per pass.

Order. In the forward pass block i prefetches block i+1. With gradient checkpointing the backward pass recomputes the
blocks in *reverse* order; the pre-hook sees that it runs inside autograd's backward and prefetches block i-1
instead. (diffusers' group offloading prefetches in forward order only, so in the backward it loads each block
synchronously and copies the wrong neighbour alongside.)

Lifetime. When a block finishes (its post-hook, or in the backward the next block's pre-hook: torch's checkpoint
stops a recomputation as soon as it has every saved tensor, so the post-hook may never run; a callback at the end
of the backward catches the last one) its parameters point back at the pinned CPU copy. Tensors autograd saved
during the block (e.g. the transposed weight of a Linear) are views of the device copy and keep it alive until
the block's backward has used them; `record_stream` stops the caching allocator from handing that memory to the
side stream before the compute stream is done with it. Training therefore needs gradient checkpointing: without
it autograd would save every block's weights and the whole model would end up on the device (refused).

Between forward calls every block's parameters point at the pinned CPU copies, so in-place edits of the weights
(merging a LoKr for sampling, `lokr_applied`) land in what gets streamed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..config.schema import ConfigError
from ..util.device import device_kind, host_device

logger = logging.getLogger(__name__)

_ALIGN = 64  # bytes: every tensor in a packed block buffer starts on a boundary any dtype view accepts


@dataclass
class _PackedBlock:
    """One block's tensors as views of a single host buffer (pinned when streaming to CUDA)."""

    tensors: list[torch.Tensor]  # the block's parameters and buffers, in a fixed order
    host: torch.Tensor  # (nbytes,) uint8
    offsets: list[int]

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The block's tensors as views of `flat` (a host or device copy of `host`)."""
        return [flat[off:off + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                for t, off in zip(self.tensors, self.offsets)]

    def point_at(self, flat: torch.Tensor) -> None:
        for t, view in zip(self.tensors, self.views(flat)):
            t.data = view


def _pack(block: nn.Module, pin: bool, home: torch.device) -> _PackedBlock:
    tensors = [*block.parameters(), *block.buffers()]
    for t in tensors:
        # Plain tensors only: float weights, or the 8-bit weights and float32 scales of an fp8-scaled /
        # int8-scaled base (buffers, streamed like the rest). optimum-quanto's tensor subclasses cannot be.
        if t.__class__ not in (torch.Tensor, nn.Parameter):
            raise ConfigError(f"low-memory block offloading needs plain weights; {type(block).__name__} holds a "
                              f"{type(t).__name__} of {t.dtype} (an optimum-quanto base?). Use base_model_precision "
                              f"no_change, fp8-scaled or int8-scaled with offload_blocks, or int8-quanto without it")
    offsets, size = [], 0
    for t in tensors:
        offsets.append(size)
        size += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    host = torch.empty(size, dtype=torch.uint8, device=home, pin_memory=pin)
    packed = _PackedBlock(tensors, host, offsets)
    with torch.no_grad():
        for t, view in zip(tensors, packed.views(host)):
            view.copy_(t.detach())
    packed.point_at(host)  # frees the block's device copy
    return packed


PIN_SHARE = 0.8  # pin at most this share of the host memory available when streaming starts


def available_host_memory() -> Optional[int]:
    """Bytes of host memory the OS can still hand out (psutil's `available`), or None when unknown."""
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def pin_plan(block_bytes: int, available: Optional[int], resident: bool) -> tuple[bool, str]:
    """Whether to pin the packed blocks (page-locked memory: fast, asynchronous copies, but the OS can never swap it
    or give it to anyone else), and the sentence that says what happens.

    `resident`: the blocks are already in host memory (packing then moves them, one block at a time); otherwise
    (a transformer on the GPU) they need `block_bytes` of new host memory, refused before anything is copied when
    that is not available. Pinned only while that leaves a fifth of what is available: ComfyUI and the data
    loaders need host memory too (newer ComfyUI pins up to ~90 % of RAM for its own offloading)."""
    gib = block_bytes / 2**30
    if available is None:
        return True, f"pinned {gib:.2f} GiB of host memory (available memory unknown)"
    if not resident and block_bytes > available:
        raise ConfigError(f"offload_blocks needs {gib:.1f} GiB of host memory for the transformer blocks; about "
                          f"{available / 2**30:.1f} GiB is available. Free host memory (close other programs, "
                          "or unload models), or train without offload_blocks on a GPU with room for the model")
    if block_bytes <= PIN_SHARE * available:
        return True, f"pinned {gib:.2f} GiB of host memory (about {available / 2**30:.1f} GiB was available)"
    return False, (f"not pinned: {gib:.2f} GiB of blocks would take more than {PIN_SHARE:.0%} of the "
                   f"{available / 2**30:.1f} GiB available; streaming from pageable memory (slower copies)")


def packed_bytes(block: nn.Module) -> int:
    """The bytes one block streams per copy: its parameters and buffers, each padded as `_pack` lays them out."""
    return sum(-(-t.numel() * t.element_size() // _ALIGN) * _ALIGN for t in [*block.parameters(), *block.buffers()])


class BlockStreamer:
    """Streams `transformer`'s double- and single-stream blocks from CPU memory to `device`, one block ahead.

    Create it on a transformer anywhere (CPU or device): the blocks are packed into pinned host buffers, the rest of
    the model is moved to `device`. `remove(to)` detaches the hooks and puts every block back on `to` (default
    `device`) as ordinary tensors.
    On a CPU device the same bookkeeping runs with plain copies (this is how the tests check it).
    """

    def __init__(self, transformer: nn.Module, device: torch.device):
        from ..hidream.forward import transformer_blocks

        self.transformer = transformer
        self.device = torch.device(device)
        self.blocks = transformer_blocks(transformer)
        if not self.blocks:
            raise ConfigError("offload_blocks: this transformer has no double/single stream blocks to stream")
        from .moe_dispatch import ungroup_moe_dispatch

        ungrouped = sum(ungroup_moe_dispatch(block) for block in self.blocks)
        if ungrouped:  # stacked expert weights would not follow the streamed copies
            logger.info("offload_blocks: %d MoE layers back on the sorted dispatch (their experts are streamed)",
                        ungrouped)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        pin, self.pinning = False, "plain copies (no accelerator to stream to)"
        if self.device.type == "cuda":
            resident = all(t.device.type == "cpu" for b in self.blocks for t in (*b.parameters(), *b.buffers()))
            pin, self.pinning = pin_plan(sum(packed_bytes(b) for b in self.blocks), available_host_memory(),
                                         resident)
        elif device_kind(self.device) == "cuda":  # a memory plan's meta stand-in for a GPU pins too (plan/)
            pin, self.pinning = True, "pinned (a memory plan's dry run: this machine's memory is not asked)"
        self.packed = [_pack(block, pin=pin, home=host_device(self.device)) for block in self.blocks]
        self._move_rest(transformer)
        self._loaded: dict[int, tuple[torch.Tensor, Optional[torch.cuda.Event]]] = {}
        self.load_order: list[int] = []  # blocks in the order their copies were issued in the latest pass (tests)
        self._active: set[int] = set()  # blocks whose parameters point at their device copy
        self._end_of_backward_queued = False
        self._handles = [transformer.register_forward_pre_hook(lambda *_: self._new_pass())]
        for i, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(lambda m, args, i=i: self._enter(i)))
            self._handles.append(block.register_forward_hook(lambda m, args, out, i=i: self._leave(i)))
        logger.info("offload_blocks: %d blocks (%.2f GiB) streamed from CPU memory to %s; %s",
                    len(self.blocks), sum(p.host.numel() for p in self.packed) / 2**30, self.device, self.pinning)

    def _move_rest(self, transformer: nn.Module) -> None:
        in_blocks = {id(t) for packed in self.packed for t in packed.tensors}
        with torch.no_grad():
            for t in [*transformer.parameters(), *transformer.buffers()]:
                if id(t) not in in_blocks and t.device != self.device:
                    t.data = t.data.to(self.device)

    # ------------------------------------------------------------------------------------------ streaming

    def _issue(self, i: int) -> None:
        """Start copying block i to the device (on the side stream when there is one)."""
        if i in self._loaded or not 0 <= i < len(self.blocks):
            return
        host = self.packed[i].host
        if self.stream is None:
            self._loaded[i] = (host.to(self.device, copy=True), None)
        else:
            with torch.cuda.stream(self.stream):
                flat = host.to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            self._loaded[i] = (flat, event)
        self.load_order.append(i)

    def _enter(self, i: int) -> None:
        # One block runs at a time. A block still pointing at its device copy here is one whose checkpoint
        # recomputation stopped early (torch stops recomputing once it has every saved tensor, so that block's
        # post-hook never ran); its backward is done by the time the next block is recomputed.
        for j in [j for j in self._active if j != i]:
            self._release(j)
        self._issue(i)  # a no-op when block i was prefetched
        flat, event = self._loaded[i]
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            flat.record_stream(current)  # freed only after the compute stream's work on it
        self.packed[i].point_at(flat)
        self._active.add(i)
        # Inside autograd's backward (checkpoint recomputation) the blocks run last to first.
        backward = torch._C._current_graph_task_id() != -1
        if not backward and torch.is_grad_enabled() and not self.transformer.is_gradient_checkpointing:
            self._release(i)
            raise ConfigError("offload_blocks trains only with gradient_checkpointing: true (without it autograd "
                              "keeps every block's weights on the device); turn it on, or offload_blocks off")
        if backward and not self._end_of_backward_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._release_all)
            self._end_of_backward_queued = True
        self._issue(i - 1 if backward else i + 1)

    def _leave(self, i: int) -> None:
        self._release(i)

    def _release(self, i: int) -> None:
        """Point block i back at its host copy; the device copy is freed once autograd no longer holds views of it."""
        self._loaded.pop(i, None)
        self._active.discard(i)
        self.packed[i].point_at(self.packed[i].host)

    def _new_pass(self) -> None:
        """A forward of the whole transformer starts (its backward, if any, belongs to the same pass)."""
        self._release_all()
        self.load_order.clear()  # one pass's worth: the list must not grow with every training step

    def _release_all(self) -> None:
        """End of a backward pass, or a new forward: no block runs, every one points at its host copy (a copy
        still held after an interrupted pass may also predate an in-place weight edit)."""
        for i in list(self._active):
            self._release(i)
        self._loaded.clear()
        self._end_of_backward_queued = False

    def remove(self, to: Optional[torch.device] = None) -> None:
        """Unhook and put every block back on `to` (default: the streaming device) as ordinary tensors."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._release_all()
        with torch.no_grad():
            for packed in self.packed:
                for t in packed.tensors:
                    t.data = t.data.to(to or self.device, copy=True)
        self.packed.clear()
