"""Optimizers and learning-rate schedules by SimpleTuner's names, each built by the library that owns it.

| name                         | built with                                    |
|------------------------------|-----------------------------------------------|
| adamw, adamw_bf16, torch-adamw | torch.optim.AdamW (fused kernels)           |
| optimi-adamw, optimi-lion    | torch-optimi (AdamW, Lion)                    |
| prodigy                      | prodigyopt.Prodigy (learning_rate is its d multiplier, usually 1.0) |
| bnb-*                        | bitsandbytes 8-bit / paged optimizers (CUDA only) |

The adapter's weights are float32 whatever mixed_precision says (see lokr.py), so `adamw_bf16` (SimpleTuner's
bf16-state AdamW) is plain AdamW here: there are no bf16 weights whose updates it would need to round carefully.
Every optimizer's `state_dict()` holds only tensors and plain numbers, so checkpoints load with
`torch.load(weights_only=True)`.

torch's AdamW runs with its fused kernels (`fused=True`, on a GPU and on the CPU): the same update as its for-loop
(bit for bit on the CPU), one kernel for every weight on a GPU instead of several per weight, its step counters on
the weights' device (the for-loop keeps them on the host and reads them with .item() every step), and a
`found_inf` flag that skips a non-finite step on the device (guarded_update.py).
"""
from __future__ import annotations

import logging

import torch

from ..config.schema import OPTIMIZERS, ConfigError, TrainConfig

logger = logging.getLogger(__name__)

_BNB = {"bnb-adamw8bit": "AdamW8bit", "bnb-adamw-paged": "PagedAdamW", "bnb-adamw8bit-paged": "PagedAdamW8bit",
        "bnb-lion8bit": "Lion8bit", "bnb-lion8bit-paged": "PagedLion8bit"}


def build_optimizer(config: TrainConfig, params: list[torch.nn.Parameter],
                    device: torch.device = torch.device("cpu")) -> torch.optim.Optimizer:
    """The optimizer `config.optimizer` names over `params`, at `config.learning_rate`."""
    return optimizer_by_name(config.optimizer, params, config.learning_rate, config.adam_weight_decay, device)


def optimizer_by_name(optimizer: str, params: list[torch.nn.Parameter], lr: float, decay: float,
                      device: torch.device = torch.device("cpu")) -> torch.optim.Optimizer:
    """The optimizer SimpleTuner calls `optimizer` over `params` (the trainer's and the benchmark's one factory)."""
    name = optimizer.lower()
    if name in ("adamw", "adamw_bf16", "torch-adamw"):
        fused = all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.AdamW(params, lr=lr, weight_decay=decay, fused=fused or None)
    if name in ("optimi-adamw", "optimi-lion"):
        import optimi

        # Kahan summation only matters for low-precision weights; the adapter is float32. The implementation is
        # optimi's own choice: its Triton kernels on a GPU (one launch per tensor; its for-loop takes several),
        # the for-loop on a CPU.
        if name == "optimi-lion":
            return optimi.Lion(params, lr=lr, weight_decay=decay, kahan_sum=False)
        return optimi.AdamW(params, lr=lr, weight_decay=decay, kahan_sum=False)
    if name == "prodigy":
        from prodigyopt import Prodigy

        if lr < 0.1:
            logger.warning("prodigy estimates the step size itself; learning_rate %g is its multiplier and is "
                           "usually 1.0", lr)
        return Prodigy(params, lr=lr, weight_decay=decay)
    if name in _BNB:
        return _bitsandbytes_optimizer(name, params, lr, decay, device)
    raise ConfigError(f"optimizer {optimizer!r} is not supported; use one of: {', '.join(OPTIMIZERS)}")


# Parameter-group keys that choose how an optimizer runs on this machine, not what it computes (torch's foreach and
# fused kernels, optimi's Triton kernels). A checkpoint carries them, but they are the writing process's choice: a
# GPU run's "triton": True would send a resumed CPU run to Triton kernels. optimi's "setup" is NOT one of them: it
# also means "my state is initialised", and optimi's Adam family resets its step counter (bias correction) when it
# finds it False.
IMPLEMENTATION_KEYS = ("foreach", "fused", "triton")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict(state)`, keeping this process's own implementation choices (`IMPLEMENTATION_KEYS`)
    so that a run resumes on another kind of device. An optimi optimizer that would have picked its kernels at its
    first step (triton None) picks them here, as that first step is behind it."""
    chosen = [{key: group[key] for key in IMPLEMENTATION_KEYS if key in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, keys in zip(optimizer.param_groups, chosen):
        group.update(keys)
        if group.get("setup") and "triton" in keys and keys["triton"] is None and group.get("foreach") is None:
            from optimi.utils import _default_to_triton  # the choice optimi makes in its own first step

            group["triton"] = _default_to_triton(group["params"])
        if group.get("fused") or group.get("capturable"):
            # A checkpoint of a for-loop run kept its step counters on the host; fused kernels want them on the
            # weights' device.
            for p in group["params"]:
                step = optimizer.state.get(p, {}).get("step")
                if isinstance(step, torch.Tensor) and step.device != p.device:
                    optimizer.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)


def _bitsandbytes_optimizer(name: str, params, lr: float, decay: float, device: torch.device):
    if device.type != "cuda":
        raise ConfigError(f"optimizer {name} needs bitsandbytes on a CUDA GPU, and this run is on {device.type}; "
                          "use optimi-lion (the same Lion update, in 32 bits) or adamw")
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ConfigError(f"optimizer {name} needs the bitsandbytes package ({exc}); `pip install bitsandbytes`, "
                          "or use optimi-lion / adamw") from exc
    return getattr(bitsandbytes.optim, _BNB[name])(params, lr=lr, weight_decay=decay)


def build_lr_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """diffusers' schedule of the name `config.lr_scheduler`, over `total_steps` optimizer steps. As SimpleTuner
    reads it, "constant" with lr_warmup_steps > 0 warms up (diffusers' "constant" would ignore the warm-up)."""
    from diffusers.optimization import get_scheduler

    name = config.lr_scheduler
    if name == "constant" and config.lr_warmup_steps > 0:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=config.lr_warmup_steps,
                         num_training_steps=total_steps, num_cycles=config.lr_num_cycles, power=config.lr_power)
