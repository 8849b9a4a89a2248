"""`TrainState`: everything a checkpoint holds, and the one place the checkpoint format is written and read.

A checkpoint folder (published atomically by checkpoint.py) holds

    pytorch_lora_weights.safetensors      the adapter (float32, also loadable on its own)
    pytorch_lora_weights_ema.safetensors  the EMA adapter, when use_ema
    training_state.pt                     TrainState.state_dict(): step, the adapter's trainable tensors (what
                                          resuming loads), optimizer, lr schedule, EMA, every random stream, the
                                          data position, the loss histories
    config.json                           the resolved configuration (for people; resuming reads the run's own)

`training_state.pt` holds only tensors, numbers, strings, lists and dicts: it loads with
`torch.load(weights_only=True)`, so nothing is unpickled.

Every random draw training makes comes from a stream this object owns and the checkpoint restores: the noise and
sigma generator, the caption-dropout generator, and the data order (BucketBatches, seeded per epoch). The global
torch generators, which a run seeds for itself (context.seeded_global_generators), are saved and restored as well,
so code outside the trainer that draws from them (a library's own initialisation, say) sees the same numbers
after a resume as in an unbroken run.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path
from typing import Optional

import torch

from ..adapters.ema import AdapterEMA
from ..adapters.interface import Adapter
from ..config.schema import ConfigError, TrainConfig
from ..data.datasets import BucketBatches
from .checkpoint import STATE_FILE, load_training_state
from .interface import EMA_LOKR_FILENAME, LOKR_FILENAME
from .optimizers import load_optimizer_state

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"


def write_adapter_files(adapter: Adapter, ema: Optional[AdapterEMA], folder: Path, metadata: dict,
                        ema_decay: float) -> tuple[Path, Optional[Path]]:
    """The adapter (and its EMA twin) as files in `folder`: what a checkpoint holds and what a run ends with."""
    main = adapter.save(folder / LOKR_FILENAME, metadata=metadata)
    if ema is None:
        return main, None
    with ema.swapped_in():
        averaged = adapter.save(folder / EMA_LOKR_FILENAME, metadata={**metadata, "ema_decay": ema_decay})
    return main, averaged


def config_json(config: TrainConfig) -> str:
    return json.dumps(dataclasses.asdict(config), indent=1, default=str)


class TrainState:
    """The state of a training run between two steps.

    `step` optimizer steps are done; `losses` has one entry per step, `eval_losses` (step, value) pairs. The
    adapter's weights live in the adapter itself (written as its own files), the rest in `state_dict()`.
    """

    def __init__(self, config: TrainConfig, adapter: Adapter, optimizer: torch.optim.Optimizer, lr_schedule,
                 ema: Optional[AdapterEMA], batches: BucketBatches, total_steps: int, base_name: str):
        self.config, self.adapter, self.optimizer, self.lr_schedule = config, adapter, optimizer, lr_schedule
        self.ema, self.batches, self.total_steps, self.base_name = ema, batches, total_steps, base_name
        self.step = 0
        self.written_for_steps = total_steps  # a restored state: the run length its checkpoint was written for
        self.losses: list[float] = []
        self.eval_losses: list[tuple[int, float]] = []
        # Noise and sigmas, and caption dropout, draw from their own seeded generators: same seed, same run.
        self.noise_generator = torch.Generator().manual_seed(config.seed)
        self.dropout_rng = random.Random(config.seed)

    # ------------------------------------------------------------------------------------------ the format

    def state_dict(self) -> dict:
        state = {"step": self.step, "total_steps": self.total_steps, "optimizer_name": self.config.optimizer,
                 "adapter": self.adapter.kind, "adapter_parameters": self._trainable(),
                 "optimizer": self.optimizer.state_dict(),
                 "lr_scheduler": self.lr_schedule.state_dict(), "rng": self._rng_state(),
                 "batches": self.batches.state_dict(), "losses": list(self.losses),
                 "eval_losses": [list(e) for e in self.eval_losses]}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict, source: Path) -> None:
        """Continue from `state` (read from the checkpoint `source`, named in errors). The optimizer keeps this
        machine's kernel choices; everything else is restored exactly."""
        written_by = (state.get("optimizer_name"), state.get("adapter"))
        if written_by != (self.config.optimizer, self.adapter.kind):
            raise ConfigError(f"{source} was written with optimizer {written_by[0]} and a {written_by[1]} adapter, "
                              f"this run uses {self.config.optimizer} and a {self.adapter.kind}: resume with the "
                              "settings it was written with, or train into a new output_dir")
        try:
            load_optimizer_state(self.optimizer, state["optimizer"])
            self.lr_schedule.load_state_dict(state["lr_scheduler"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ConfigError(f"{source} was written by a run with another optimizer or adapter ({exc}); resume "
                              "with the settings it was written with, or train into a new output_dir") from exc
        if "adapter_parameters" in state:
            self._load_trainable(state["adapter_parameters"], source)
        if self.ema is not None:
            if "ema" in state:
                self.ema.load_state_dict(state["ema"])
            else:
                logger.warning("%s has no EMA state: the EMA restarts from the current weights", source)
        self._restore_rng_state(state["rng"])
        self.batches.load_state_dict(state["batches"])
        self.losses = [float(v) for v in state["losses"]]
        self.eval_losses = [(int(s), float(v)) for s, v in state["eval_losses"]]
        self.step = int(state["step"])
        self.written_for_steps = int(state.get("total_steps", self.total_steps))

    def _trainable(self) -> dict[str, torch.Tensor]:
        """The adapter's trainable tensors exactly as the optimizer sees them. The LoKr file is not that: LyCORIS
        folds a trainable `scalar` into lokr_w1 when it saves and loads it back as 1, which computes the same
        forward but gives the optimizer other parameters (and gradients) to continue with."""
        return {name: p.detach().cpu().clone() for name, p in self.adapter.module.named_parameters()
                if p.requires_grad}

    def _load_trainable(self, tensors: dict[str, torch.Tensor], source: Path) -> None:
        params = {name: p for name, p in self.adapter.module.named_parameters() if p.requires_grad}
        if set(params) != set(tensors):
            raise ConfigError(f"{source} holds another adapter ({len(set(params) ^ set(tensors))} trainable tensors "
                              "differ): resume with the lycoris_config it was written with, or train into a new "
                              "output_dir")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(tensors[name])

    def _rng_state(self) -> dict:
        """Every random stream, as weights_only-loadable values."""
        version, internal, gauss = self.dropout_rng.getstate()
        state = {"torch": torch.get_rng_state(), "noise_generator": self.noise_generator.get_state(),
                 "python_random": {"version": version, "internal": list(internal), "gauss": gauss}}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _restore_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        self.noise_generator.set_state(state["noise_generator"])
        py = state["python_random"]
        self.dropout_rng.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def streams(self) -> dict:
        """Where every random stream and the data order stand (cheap to take before each step)."""
        return {"rng": self._rng_state(), "batches": self.batches.state_dict()}

    def rewind_streams(self, streams: dict) -> None:
        """Back to `streams()`: a step that could not run leaves no trace in what the next one draws."""
        self._restore_rng_state(streams["rng"])
        self.batches.load_state_dict(streams["batches"])

    # ------------------------------------------------------------------------------------------ the files

    def adapter_metadata(self) -> dict:
        return {"trainer": "ComfyUI-HiDream-LoKr", "steps": self.step, "base_model": self.base_name}

    def write_adapter(self, folder: Path) -> tuple[Path, Optional[Path]]:
        return write_adapter_files(self.adapter, self.ema, folder, self.adapter_metadata(), self.config.ema_decay)

    def write(self, folder: Path) -> None:
        """Every file of a checkpoint into `folder` (checkpoint.save_checkpoint publishes the folder)."""
        self.write_adapter(folder)
        torch.save(self.state_dict(), folder / STATE_FILE)
        (folder / CONFIG_FILE).write_text(config_json(self.config))

    def read(self, folder: Path) -> None:
        """Continue from the checkpoint `folder` (already verified against its manifest). Checkpoints written
        before training_state.pt held the adapter's own tensors resume from the LoKr file."""
        state = load_training_state(folder)
        if "adapter_parameters" not in state:
            self.adapter.load_weights(folder / LOKR_FILENAME)
        self.load_state_dict(state, folder)

