"""The model phase of a run: the frozen transformer (loaded or given, optionally quantised), the adapter that
trains (LoKr, or LoRA with lora_type standard), the speed-ups, block streaming, and DDP / FSDP across ranks."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from torch import nn

from ..adapters.interface import Adapter, create_adapter, describe
from ..adapters.lokr import LycorisConfig, unmerged_reason
from ..config.schema import SCALED_PRECISIONS, ConfigError, TrainConfig
from ..hidream.flow_matching import LoadBalancingLoss
from ..hidream.frozen import load_frozen_transformer
from ..hidream.models import HiDreamModelPaths
from ..speedups import BlockStreamer, apply_speedups, remove_speedups
from .context import RunContext
from .distributed import release_data_parallel, shard_frozen_base, wrap_data_parallel
from .interface import ModelComponents

logger = logging.getLogger(__name__)


@dataclass
class TrainingModel:
    """`transformer` is the frozen base with the adapter hooked in; `model` is what the training forward calls
    (the transformer, or DDP over it and its adapter). `load_balancing` collects the MoE aux loss of each
    forward."""

    transformer: nn.Module
    model: nn.Module
    adapter: Adapter
    load_balancing: LoadBalancingLoss
    base_name: str

    @property
    def lokr_network(self):
        return self.adapter.module if self.adapter.kind == "lokr" else None


def build_training_model(config: TrainConfig, ctx: RunContext, given: ModelComponents,
                         paths: Optional[HiDreamModelPaths], lycoris: LycorisConfig,
                         cleanup: contextlib.ExitStack) -> TrainingModel:
    """Load (or take) the transformer, freeze it and attach the adapter. A transformer the caller gave comes back
    when `cleanup` closes: without the adapter and speed-ups, in its own train/eval mode and checkpointing."""
    ctx.phase("loading transformer")
    if given.transformer is not None:
        transformer, base_name = given.transformer, given.transformer_name
    else:
        # Streamed blocks are packed from CPU memory: never put the whole model on the device first.
        source = config.pretrained_transformer_model_name_or_path
        transformer = load_frozen_transformer(paths, config.base_model_precision, ctx.dtype, ctx.device,
                                              transformer_file=source, stream_blocks=config.offload_blocks)
        base_name = Path(source).stem if source is not None else paths.model_dir.name
    transformer.requires_grad_(False)
    was_training, was_checkpointing = transformer.training, transformer.is_gradient_checkpointing
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()  # MoE routing stays differentiable; eval() would cut the routed experts' gradient
    adapter = create_adapter(transformer, config, lycoris)
    if config.init_lokr_weights:
        adapter.load_weights(config.init_lokr_weights)
        logger.info("adapter initialised from %s", config.init_lokr_weights)
    adapter.module.to(ctx.device)
    trained = TrainingModel(transformer=transformer, model=transformer, adapter=adapter,
                            load_balancing=LoadBalancingLoss(transformer, config.hidream_load_balancing_loss_weight),
                            base_name=base_name)
    cleanup.callback(trained.load_balancing.remove)
    apply_speedups(transformer, trained.lokr_network, config)
    if config.offload_blocks:
        _stream_blocks(trained, ctx, given, cleanup)
    if ctx.sharded:
        shard_frozen_base(transformer)
    elif ctx.ranks.enabled:
        trained.model = wrap_data_parallel(transformer, adapter.module, ctx.ranks, ctx.device)
        ddp = trained.model  # taken apart before the process group goes; in step with the others on a clean end
        cleanup.push(lambda error, *_: release_data_parallel(ddp, ctx.ranks, in_step=error is None))

    @cleanup.callback
    def hand_back_callers_model() -> None:
        if given.transformer is None:
            return  # ours: it is dropped with the run
        remove_speedups(transformer, trained.lokr_network)
        adapter.remove()
        if not was_checkpointing and transformer.is_gradient_checkpointing:
            transformer.disable_gradient_checkpointing()
        transformer.train(was_training)

    _log_adapter(config, ctx, trained)
    return trained


def _stream_blocks(trained: TrainingModel, ctx: RunContext, given: ModelComponents,
                   cleanup: contextlib.ExitStack) -> None:
    if ctx.ranks.enabled:
        raise ConfigError("offload_blocks runs in a single process; under torchrun / accelerate use "
                          "distributed_mode: fsdp to spread the weights instead")
    callers_device = next(trained.transformer.parameters()).device  # where a given transformer goes back to
    streamer = BlockStreamer(trained.transformer, ctx.device)
    if given.transformer is not None:
        cleanup.callback(streamer.remove, callers_device)


def _log_adapter(config: TrainConfig, ctx: RunContext, trained: TrainingModel) -> None:
    logger.info("adapter: %s", describe(trained.adapter))
    if ctx.sharded:
        logger.info("validation samples run the LoKr unmerged (bypass mode): the base weights are sharded")
        if config.base_model_precision in SCALED_PRECISIONS:
            logger.warning("distributed_mode fsdp shards parameters; the %s weights are buffers, so every rank "
                           "holds all of them (data-parallel ddp costs the same memory)", config.base_model_precision)
    elif not trained.adapter.mergeable:
        logger.info("validation samples run the LoKr unmerged (bypass mode), as it trains: %s",
                    unmerged_reason(trained.adapter.module))
    if config.hidream_use_load_balancing_loss:
        logger.info("MoE load-balancing loss on %d gates, weight %g, with gradient (SimpleTuner adds it detached "
                    "and weights it twice)", trained.load_balancing.num_gates, config.hidream_load_balancing_loss_weight)


def adapter_settings(config: TrainConfig) -> LycorisConfig:
    """The LoKr's shape (the lycoris_config file, or the quickstart's attention-only preset), read and checked
    before any data or model work starts, like the adapter file training starts from."""
    if config.init_lokr_weights and not Path(config.init_lokr_weights).is_file():
        raise ConfigError(f"init_lokr_weights: adapter file not found: {config.init_lokr_weights}")
    return LycorisConfig.from_file(config.lycoris_config) if config.lycoris_config else LycorisConfig()
