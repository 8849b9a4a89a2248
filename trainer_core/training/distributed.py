"""Data-parallel training on torch.distributed, as launched by `torchrun` or `accelerate launch`.

Both launchers start one process per rank and set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
`DistributedContext.from_environment()` reads them, so the same `python -m trainer_core train` command runs on one
process or many. The split of work:

- every rank holds the frozen base model (or, with FSDP, a shard of it) and an identical LoKr;
- a *global* batch of `train_batch_size x world_size` samples is drawn from one bucket exactly as a single process
  with that batch size would draw it (same noise, sigmas, caption dropout), and rank r trains on slice r of it;
  so N ranks with batch b compute what one process with batch N*b computes, up to float reduction order;
- the LoKr gradients are averaged across ranks by DDP (FSDP: the base is sharded with fully_shard and the
  replicated LoKr's gradients are averaged by the same all-reduce DDP uses);
- rank 0 fills the caches while the others wait at a barrier, then they read them; only rank 0 writes logs,
  validation images, checkpoints and LoKr files. Checkpoints hold what every rank needs to resume, because the
  random streams are global-batch streams that every rank advances identically.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job. A single process is rank 0 of a world of 1 and never touches
    torch.distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> "DistributedContext":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(rank=int(os.environ["RANK"]), world_size=world,
                   local_rank=int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def label(self) -> str:
        """" (rank r)" in a multi-process run, "" otherwise: for log lines that differ between ranks."""
        return f" (rank {self.rank})" if self.enabled else ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: Optional[str]) -> torch.device:
        """Each rank's own GPU (LOCAL_RANK) when CUDA is used; the CPU otherwise."""
        if requested and requested != "cuda":
            return torch.device(requested)
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def start(self, device: torch.device, timeout_seconds: float) -> None:
        """Join the process group (NCCL on GPUs, gloo on CPUs). A rank that dies makes the others fail after
        `timeout_seconds` instead of waiting forever (the launcher usually stops them sooner)."""
        if not self.enabled or dist.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=self.rank, world_size=self.world_size,
                                timeout=datetime.timedelta(seconds=timeout_seconds))
        logger.info("rank %d of %d joined the %s process group", self.rank, self.world_size, backend)

    def stop(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the body first (fills a cache); the others wait, then run it too (and find it filled)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous slice of a global batch (whose length is a multiple of world_size)."""
        per_rank = len(items) // self.world_size
        return list(items[self.rank * per_rank:(self.rank + 1) * per_rank])

    def shard_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        per_rank = tensor.shape[0] // self.world_size
        return tensor[self.rank * per_rank:(self.rank + 1) * per_rank]

    def mean_tensor(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise mean of `values` across ranks, in one all-reduce (for logging the global losses)."""
        if not self.enabled:
            return values
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
        reduced = values.to(device=device, dtype=torch.float64)
        dist.all_reduce(reduced)
        return reduced / self.world_size


class LoKrTrainingModule(nn.Module):
    """The frozen transformer and its LoKr as one module, so DDP sees the LoKr's parameters and the forward that
    uses them. Calling it calls the transformer (whose patched layers run the LoKr)."""

    def __init__(self, transformer: nn.Module, network: nn.Module):
        super().__init__()
        self.transformer = transformer
        self.network = network

    def forward(self, **kwargs):
        return self.transformer(**kwargs)


def wrap_data_parallel(transformer: nn.Module, network: nn.Module, context: DistributedContext,
                       device: torch.device) -> nn.Module:
    """DDP over the LoKr: gradients averaged across ranks during backward. The frozen base is left out of DDP's
    start-up broadcast (every rank loaded the same weights), which for the real model saves ~34 GB of traffic."""
    from torch.nn.parallel import DistributedDataParallel

    module = LoKrTrainingModule(transformer, network)
    frozen = [f"transformer.{name}" for name, p in transformer.named_parameters() if not p.requires_grad]
    frozen += [f"transformer.{name}" for name, _ in transformer.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False, find_unused_parameters=False)


def release_data_parallel(model: nn.Module, context: DistributedContext, in_step: bool = True) -> None:
    """Take DDP's reducer apart while the process group is still registered; with `in_step` (a run that ended
    normally, on every rank) after all ranks got here.

    The reducer holds the gloo process group. Were it the last holder, the group would be destroyed inside the
    reducer's destructor, which runs with the GIL held and joins gloo's worker threads; a worker still finishing a
    collective whose tensor Python has let go needs the GIL to free it: a deadlock at exit (pytorch/pytorch#56297;
    seen here as a rank that never exits after its LoKr is written). Dropped here, the reducer only lets go of its
    reference; `destroy_process_group` then frees the group through its own binding, which releases the GIL."""
    if in_step:  # after an error the other ranks may never come: no barrier then
        context.barrier()  # gloo's barrier also waits for this rank's earlier collectives
    for name in ("logger", "reducer"):  # the c10d Logger holds the reducer too
        if hasattr(model, name):
            setattr(model, name, None)


def shard_frozen_base(transformer: nn.Module) -> None:
    """FSDP2: shard every transformer block (and the rest) of the frozen base across ranks; each block gathers
    its weights for its own forward and backward only. The LoKr stays replicated (it is small)."""
    from torch.distributed.fsdp import fully_shard

    for blocks in (transformer.double_stream_blocks, transformer.single_stream_blocks):
        for block in blocks:
            fully_shard(block)
    fully_shard(transformer)


def average_gradients(params: Sequence[nn.Parameter], context: DistributedContext) -> None:
    """Average the replicated LoKr's gradients across ranks (the FSDP path; DDP does this itself). A parameter
    without a gradient on this rank counts as a zero one, so every rank reduces the same sizes in the same order
    and ends with the same averaged gradient."""
    if not context.enabled:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= context.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
