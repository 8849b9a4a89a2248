"""The training step captured in a CUDA graph per aspect bucket (`cuda_graphs`): forward, loss, backward, gradient
norm, clip, optimizer update with its on-device skip, and EMA, replayed as one launch.

    step = GraphedTrainStep(TrainStep(...), transformer)    # same launch()/run() as TrainStep
    pending = step.launch(micro_batches, i)

Per step, the host loads the micro-batches and draws their noise as the plain step does (same generator, same
order), copies them into the bucket's static buffers and replays the graph; the lr schedule advances on the host.
A bucket's first steps run the plain step (`warmup`, default 2: allocator, cuBLAS, torch.compile), the last of
them under `HostSyncCounter`; a step that reads the host cannot be captured, and the log names the reads. Then it
is captured (one private memory pool per bucket) and replayed from then on.

What makes it capturable: no host read in the step (grouped MoE, the device-side skip, the attached load-balancing
gradient, fused AdamW's device step counters); the learning rate as a device tensor that the schedule fills
(torch AdamW with `capturable=True`, which its capture check demands; `_last_lr` kept as host numbers, so logging
it reads nothing); gradient checkpointing without RNG-state stashing (the blocks draw no random numbers; reading
the CUDA RNG state is not allowed while capturing).

Not captured (the plain step runs; the log says why once): not CUDA, several processes (collectives), streamed
blocks (host copies), an optimizer that decides the skip on the host or takes the learning rate as a host number
(optimi's Lion/AdamW Triton kernels, Prodigy, bitsandbytes), an lr schedule that is not a LambdaLR (diffusers'
schedules all are), a step with host reads, a failed capture (an out-of-memory while capturing included).
Memory: each captured bucket keeps its activations in its own pool; several large buckets at 1024 px without
checkpointing will not fit together on one GPU (use checkpointing, or fewer buckets, or no graphs).
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch

from ..hidream.embeds import PromptEmbeds
from ..util.cuda_graphs import SignatureGraphs, cuda_graphs_unavailable
from ..util.host_sync import HostSyncCounter
from .step import MicroBatch, PendingStep, StepOutcome, TrainStep

logger = logging.getLogger(__name__)


class _DrawnNoise:
    """A NoiseSource handing out noise drawn beforehand, in order (its state is the position)."""

    def __init__(self, draws: list):
        self.draws, self.index = draws, 0

    def draw(self, latents):
        noise, sigmas = self.draws[self.index]
        self.index += 1
        return noise, sigmas

    def get_state(self):
        return self.index

    def set_state(self, state) -> None:
        self.index = state


def _no_rng_checkpoint(function, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, preserve_rng_state=False,
                                             **kwargs)


class GraphedTrainStep:
    """A TrainStep whose device work is replayed from a CUDA graph per bucket where possible (module docstring)."""

    def __init__(self, step: TrainStep, transformer: Optional[torch.nn.Module] = None, warmup: int = 2,
                 graphs: Optional[SignatureGraphs] = None, streamed: bool = False, force: bool = False):
        """`streamed`: the blocks are streamed from host memory (offload_blocks). `force` skips the device checks
        (the CPU tests, with a `graphs` whose backend replays by re-running)."""
        self.step = step
        self.graphs = graphs or SignatureGraphs("training step", warmup=warmup)
        self.why_not = None if force else self._why_not(streamed)
        if self.why_not:
            logger.warning("cuda_graphs: the training step runs without CUDA graphs: %s", self.why_not)
            self.graphs.enabled = False
            return
        self._tensor_lr()
        if transformer is not None:
            for module in transformer.modules():
                if hasattr(module, "_gradient_checkpointing_func"):
                    module._gradient_checkpointing_func = _no_rng_checkpoint

    # The TrainStep's counters and parts, for the loop.
    @property
    def nonfinite_in_a_row(self) -> int:
        return self.step.nonfinite_in_a_row

    @property
    def nonfinite_steps(self) -> int:
        return self.step.nonfinite_steps

    @property
    def optimizer(self):
        return self.step.optimizer

    def _why_not(self, streamed: bool) -> Optional[str]:
        step = self.step
        why = cuda_graphs_unavailable(step.device)
        if why:
            return why
        if step.ranks.enabled or step.sharded:
            return "several processes: the gradient collectives run outside a graph here"
        if streamed:
            return "offload_blocks streams weights from host memory during the step"
        if step.update.mode == "host":
            return f"the optimizer decides a non-finite skip on the host ({step.update.why})"
        if not isinstance(step.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            return (f"{type(step.optimizer).__name__} takes the learning rate as a host number, which a graph would "
                    "freeze; torch AdamW (optimizer: adamw) takes it as a device tensor")
        schedule = step.lr_schedule
        if schedule is not None and not isinstance(schedule, torch.optim.lr_scheduler.LambdaLR):
            return f"lr schedule {type(schedule).__name__} is not a LambdaLR"
        return None

    def _tensor_lr(self) -> None:
        """The learning rate as a device tensor the schedule fills in place; capturable on CUDA, as AdamW's graph
        check demands (with fused kernels the update is the same)."""
        for group in self.step.optimizer.param_groups:
            group["capturable"] = self.step.device.type == "cuda"
            if not isinstance(group["lr"], torch.Tensor):
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=self.step.device)

    def _host_lrs(self) -> None:
        """LambdaLR keeps clones of the groups' lr as its last lr; with a tensor lr those are device tensors, which
        logging would read. Keep host numbers instead (the schedule's own formula)."""
        schedule = self.step.lr_schedule
        if schedule is not None and isinstance(schedule, torch.optim.lr_scheduler.LambdaLR):
            schedule._last_lr = [float(base) * float(f(schedule.last_epoch))
                                 for base, f in zip(schedule.base_lrs, schedule.lr_lambdas)]

    def run(self, micro_batches: Sequence[Callable[[], MicroBatch]], step: int = 0) -> StepOutcome:
        return self.launch(micro_batches, step).result()

    def launch(self, micro_batches: Sequence[Callable[[], MicroBatch]], step: int = 0) -> PendingStep:
        train_step = self.step
        if not self.graphs.enabled:
            return train_step.launch(micro_batches, step)
        if not train_step.update.on_device:  # no optimizer state yet: the plain step, its skip read on the host
            pending = train_step.launch(micro_batches, step)
            self._host_lrs()
            return pending
        device = train_step.device
        loaded = [load() for load in micro_batches]
        if any(mb.regularisation is not None for mb in loaded):  # two forwards: run as the plain step
            pending = train_step.launch([lambda mb=mb: mb for mb in loaded], step)
            self._host_lrs()
            return pending
        loaded = [MicroBatch(mb.latents.to(device), mb.embeds.to(device=device)) for mb in loaded]
        draws = [tuple(t.to(device) for t in train_step.noise.draw(mb.latents)) for mb in loaded]
        inputs = [t for mb, (noise, sigmas) in zip(loaded, draws)
                  for t in (mb.latents, mb.embeds.t5, mb.embeds.llama, mb.embeds.pooled, noise, sigmas)]
        key = tuple((tuple(t.shape), str(t.dtype).replace("torch.", "")) for t in inputs[:6]) + (len(loaded),)

        def eager() -> PendingStep:
            """The plain step on the drawn noise; the bucket's last warm-up step also counts its host reads."""
            real_noise, train_step.noise = train_step.noise, _DrawnNoise(draws)
            try:
                if self.graphs.failed(key) or self.graphs._calls.get(key, 0) != self.graphs.warmup:
                    return train_step.launch([lambda mb=mb: mb for mb in loaded], step)
                with torch.compiler.set_stance("force_eager"), HostSyncCounter() as syncs:
                    pending = train_step.launch([lambda mb=mb: mb for mb in loaded], step)
                if syncs.total:
                    self.graphs.refuse(key, f"the step reads the host {syncs.total} times ({dict(syncs.by_op)})")
                return pending
            finally:
                train_step.noise = real_noise

        def body(static: list) -> torch.Tensor:
            """The step's device work on the static buffers (runs once, at capture)."""
            batches, noises = [], []
            for i in range(len(loaded)):
                latents, t5, llama, pooled, noise, sigmas = static[6 * i: 6 * i + 6]
                batches.append(lambda latents=latents, t5=t5, llama=llama, pooled=pooled:
                               MicroBatch(latents, PromptEmbeds(t5=t5, llama=llama, pooled=pooled)))
                noises.append((noise, sigmas))
            real_noise, train_step.noise = train_step.noise, _DrawnNoise(noises)
            try:
                return train_step.device_step(batches, step)
            finally:
                train_step.noise = real_noise

        out = self.graphs.run(key, inputs, body, eager)
        if isinstance(out, PendingStep):  # a warm-up step, or a bucket without a graph: the plain step ran
            self._host_lrs()
            return out
        pending = PendingStep(train_step, out.clone())  # the graph's output is overwritten by the next replay
        if train_step.lr_schedule is not None:
            train_step.lr_schedule.step()
            self._host_lrs()
        return pending
