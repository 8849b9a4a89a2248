"""The plan of the benchmark's own configurations: `plan --bench-mode MODE` predicts what `bench` measures as the
project step's `peak_gib` (torch.cuda.max_memory_allocated after the weights are resident and the peak counter is
reset), so every GPU run of the benchmark checks the plan (bench rows carry `predicted_peak_gib`).

The benchmark builds the transformer with random weights directly on the device, quantises it there (the 8-bit
modes), streams its blocks (the offload modes), and keeps its inputs on the device: latents (1, 16, 128, 128) and
one caption's embeddings. Its project side is the trainer's own step (training.TrainStep) with the trainer's LoKr
(the attention preset, factor 16) and speed-ups, torch's AdamW, the MoE load-balancing loss with its gradient and
the trainer's default clipping; sample_cfg is one CFG step (batch 2) with the LoKr merged. The same settings here
(tests/test_plan.py holds this table to bench/modes.py), through the trainer's own set-up code.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from ..config.schema import DatasetConfig, TrainConfig
from ..hidream.embeds import PromptEmbeds
from ..hidream.forward import predict_flow
from ..quant import quantize_frozen, quantize_scaled
from ..speedups.switches import Speedups
from ..training.step import MicroBatch
from .models import transformer_on_meta
from .phases import STEP, Geometry, TrainingPlanRun
from .planner import plan_of
from .report import MemoryPlan

SAMPLING = "sampling step"


@dataclass(frozen=True)
class BenchMode:
    precision: str  # the project side's base precision
    checkpointing: bool
    offload: bool
    sampling: bool = False


BENCH_MODES = {
    "bf16_nogc": BenchMode("no_change", False, False), "bf16_gc": BenchMode("no_change", True, False),
    "int8_gc": BenchMode("int8-quanto", True, False), "offload_gc": BenchMode("no_change", True, True),
    "fp8_gc": BenchMode("fp8-scaled", True, False), "fp8_nogc": BenchMode("fp8-scaled", False, False),
    "fp8_offload_gc": BenchMode("fp8-scaled", True, True), "int8s_gc": BenchMode("int8-scaled", True, False),
    "sample_cfg": BenchMode("no_change", False, False, sampling=True),
    "sample_cfg_fp8": BenchMode("fp8-scaled", False, False, sampling=True),
}


def bench_config(mode: str, speedups: Optional[Speedups] = None, resolution: int = 1024) -> TrainConfig:
    """The trainer's settings of a benchmark mode's project side."""
    if mode not in BENCH_MODES:
        raise ValueError(f"unknown bench mode {mode!r}; choose from {', '.join(BENCH_MODES)}")
    spec = BENCH_MODES[mode]
    switches = asdict(speedups or Speedups())
    return TrainConfig(pretrained_model_name_or_path=Path("(bench: random weights)"),
                       datasets=[DatasetConfig(instance_data_dir=Path("(bench inputs)"), crop=True,
                                               crop_aspect="square", resolution=resolution)],
                       base_model_precision=spec.precision, gradient_checkpointing=spec.checkpointing,
                       offload_blocks=spec.offload, hidream_use_load_balancing_loss=True, **switches)


class BenchPlanRun(TrainingPlanRun):
    """A TrainingPlanRun with the benchmark's set-up: weights made on the device, inputs kept there."""

    def __init__(self, mode: str, speedups: Optional[Speedups] = None, model_config: Optional[dict] = None,
                 resolution: int = 1024, llama_layers: int = 32, steps: int = 1):
        self.mode, self.spec = mode, BENCH_MODES[mode]
        phases = ("model set-up", SAMPLING if self.spec.sampling else STEP)
        super().__init__(bench_config(mode, speedups, resolution), steps=steps, phases=phases)
        self.model_config, self.llama_layers = model_config, llama_layers
        self.geometry = Geometry(resolution, resolution, 2 if self.spec.sampling else 1, "the benchmark's inputs")
        self._inputs = None

    def phase_functions(self) -> list:
        return [("loading the transformer", self.load_transformer), ("model set-up", self.model),
                (STEP, self.training_step), (SAMPLING, self.sampling_step)]

    def load_transformer(self, cleanup) -> None:
        """bench.setup.build_transformer (random weights made on the device) and _prepare_train_model's
        quantisation in place on the device."""
        model = transformer_on_meta(self.model_config, self.dtype)
        for tensor in [*model.parameters(), *model.buffers()]:
            self.dry.track(tensor, "weights made on the device")
        if self.spec.precision in ("fp8-scaled", "int8-scaled"):
            quantize_scaled(model, self.spec.precision)
        elif self.spec.precision == "int8-quanto":
            quantize_frozen(model, "int8-quanto")
        self.transformer = model
        self.dry.name_modules(model, "transformer")
        self.notes["loading the transformer"] = "random weights made on the device, as the benchmark makes them"

    def model(self, cleanup) -> None:
        if self.spec.sampling:  # bench _sample_config: eval, the LoKr merged (bypass on an 8-bit base)
            from ..adapters.lokr import LycorisConfig, create_lokr_network, lokr_applied
            from ..speedups.switches import apply_speedups

            self.transformer.eval()
            network = create_lokr_network(self.transformer, LycorisConfig(factor=16), seed=0)
            network.to(self.device)
            apply_speedups(self.transformer, network, Speedups.from_config(self.config))
            cleanup.enter_context(lokr_applied(network))
            self.dry.label(self.transformer, "frozen weights")
            self.dry.label(network, "adapter")
            return
        super().model(cleanup)  # the trainer's set-up; with offload, its BlockStreamer as the bench's

    def inputs(self) -> MicroBatch:
        """The benchmark's inputs, made once on the device and kept there (bench.setup.make_inputs)."""
        if self._inputs is None:
            b, g, model = self.geometry.batch, self.geometry, self.transformer.config
            (t5_width, llama_width), device, dtype = model.caption_channels, self.device, self.dtype
            latents = torch.empty(b, model.in_channels, g.height // 8, g.width // 8, device=device)
            embeds = PromptEmbeds(t5=torch.empty(b, 128, t5_width, device=device, dtype=dtype),
                                  llama=torch.empty(self.llama_layers, b, 128, llama_width, device=device, dtype=dtype),
                                  pooled=torch.empty(b, model.text_emb_dim, device=device, dtype=dtype))
            self.dry.label([latents, embeds.t5, embeds.llama, embeds.pooled], "inputs")
            self._inputs = MicroBatch(latents, embeds)
        return self._inputs

    def _micro_batch(self) -> MicroBatch:
        return self.inputs()

    def sampling_step(self, cleanup) -> None:
        """bench run_sample_mode's project configuration: one CFG denoising step at batch 2, no gradient."""
        inputs = self.inputs()
        timesteps = torch.full((2,), 500.0, device=self.device)
        with torch.no_grad():
            for _ in range(self.steps):
                predict_flow(self.transformer, inputs.latents, timesteps, inputs.embeds)
        self.notes[SAMPLING] = f"a CFG step at batch 2, {self.geometry.width}x{self.geometry.height}, the LoKr merged"


def plan_bench_mode(mode: str, speedups: Optional[Speedups] = None, model_config: Optional[dict] = None,
                    resolution: int = 1024, llama_layers: int = 32) -> MemoryPlan:
    """The predicted peak of the step `bench` times for `mode` (its `peak_gib`): the plan's one phase.
    `model_config`, `resolution`, `llama_layers`: another bench size than HiDream-I1's full one."""
    started = time.perf_counter()
    run = BenchPlanRun(mode, speedups, model_config, resolution, llama_layers)
    run.run()
    plan = plan_of(run)
    plan.phases = [p for p in plan.phases if p.name in (STEP, SAMPLING)]
    plan.settings = {"bench_mode": mode, **plan.settings}
    plan.seconds = time.perf_counter() - started
    return plan


