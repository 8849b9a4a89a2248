"""Where a run happens: its output folder, this process' place among the ranks, the device and the dtype."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config.schema import TrainConfig
from ..util.device import resolve_device
from .distributed import DistributedContext

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunContext:
    """One training process. `is_main` (rank 0) alone writes files; `sharded` means FSDP holds the frozen base in
    shards, so every rank must take part in every forward (validation and eval included)."""

    output_dir: Path
    ranks: DistributedContext
    device: torch.device
    dtype: torch.dtype  # what the frozen base computes in: bf16 with mixed_precision bf16, else float32
    sharded: bool
    phase: Callable[[str], None]

    @property
    def is_main(self) -> bool:
        return self.ranks.is_main

    @classmethod
    def start(cls, config: TrainConfig, on_phase: Callable[[str], None] | None,
              cleanup: contextlib.ExitStack) -> "RunContext":
        """Create the output folder and, under torchrun / accelerate launch, join the process group (left again
        when `cleanup` closes)."""
        output_dir = Path(config.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        ranks = DistributedContext.from_environment()
        device = ranks.device(config.device) if ranks.enabled else resolve_device(config.device)
        ranks.start(device, config.distributed_timeout_seconds)
        cleanup.callback(ranks.stop)
        cleanup.enter_context(seeded_global_generators(config.seed, device))
        if ranks.enabled:
            logger.info("rank %d of %d (%s): effective batch %d = train_batch_size %d x gradient_accumulation_steps "
                        "%d x %d ranks; the learning rate is used as given (%g), not rescaled", ranks.rank,
                        ranks.world_size, config.distributed_mode, config.train_batch_size *
                        config.gradient_accumulation_steps * ranks.world_size, config.train_batch_size,
                        config.gradient_accumulation_steps, ranks.world_size, config.learning_rate)
        return cls(output_dir=output_dir, ranks=ranks, device=device,
                   dtype=torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32,
                   sharded=ranks.enabled and config.distributed_mode == "fsdp",
                   phase=on_phase or (lambda name: logger.info("phase: %s", name)))


@contextlib.contextmanager
def seeded_global_generators(seed: int, device: torch.device):
    """The run's own global torch generators: seeded from `seed` inside, the caller's put back after. Whatever draws
    from them during training (a library's initialisation) then draws the same numbers in every run with this seed,
    whatever the process did before (a ComfyUI server runs many things first)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed(seed)
        yield
