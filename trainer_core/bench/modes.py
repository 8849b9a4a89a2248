"""Training and sampling speed/memory of the project's step against the naive stock step, side by side.

`python -m trainer_core bench [--size full|small] [--device cuda|cpu] [--modes ...] [--out results.jsonl]`

The transformer is diffusers' `HiDreamImageTransformer2DModel` with random weights built directly on the device
(speed and memory do not depend on the weights' values). `full` is HiDream-I1-Full's config at 1024x1024;
`small` is a reduced config that a CPU runs in seconds per step. Every mode times, in the same process and on the
same inputs:

* the **reference**: stock diffusers + stock LyCORIS LoKr (`create_lycoris`, attention-only preset, factor 16,
  full_matrix; bypass or LyCORIS' default rebuild forward, `--reference-lokr`) + torch AdamW (`--optimizer`
  names another, by SimpleTuner's name, for both sides);
* the **project**: the trainer's LoKr (`create_lokr_network`) with `apply_speedups` + the same optimizer,

and checks on one fixed batch that both compute the same loss and LoKr gradients (the `check` field; speed that
changes the maths does not count). One training step = noise, forward, flow-matching loss (+ MoE load-balancing
loss, with gradient), backward, optimizer step. Timings are the median of `--steps` after `--warmup` steps.
FLOPs are what torch's FlopCounterMode sees one step execute (checkpoint recomputation included).

Modes: bf16_nogc, bf16_gc (gradient checkpointing), int8_gc (optimum-quanto int8 base + checkpointing),
offload_gc (blocks streamed from CPU memory with diffusers' group offloading + checkpointing; CUDA only),
sample_cfg (one CFG denoising step at batch 2: base model, LoKr merged by the project, LoKr hooked by LyCORIS,
and the project's path without an adapter, `merged_vs_base_same_path`).
8-bit bases (quant/scaled.py), each beside the stock step it replaces:
fp8_gc / fp8_nogc (fp8-scaled base, with / without checkpointing; reference: the stock bf16 step),
int8s_gc (int8-scaled base + checkpointing; reference: the stock step on optimum-quanto int8, today's int8 route,
and its accuracy checked against the stock bf16 step, run once untimed), fp8_offload_gc (fp8-scaled blocks
streamed by the project's BlockStreamer; reference: the resident fp8-scaled project step, which the goal compares
it to), sample_cfg_fp8 (a CFG step on the fp8-scaled base with the LoKr unmerged, beside the fp8 base without
LoKr and the stock bf16 step with LyCORIS' hooks). Their check holds the issue's bounds against bf16: loss within
2 %, LoKr-gradient cosine >= 0.99, velocity cosine >= 0.995.
One JSON line per mode goes to stdout and to `--out`.

Every configuration reports `kernels_per_step`, `host_syncs_per_step` (device-to-host reads dispatched in one
step, counted by dispatch so a CPU measures what a GPU would wait for; `host_syncs_by_op` names them),
`compiled` and `graph_breaks`, and `first_step_s` (the first timed step) next to `first_call_s` (the check's
first forward/backward, where a compile happens). `--compile` compiles the project's blocks (whole, MoE
included; the cache goes to `--compile-cache`), `--cuda-graphs` replays the project's step from a CUDA graph
(`cuda_graphs` says captures/replays or why not). The project's training step is `TrainStep.launch`; its one
read of the logged numbers happens before the next step starts, outside the counted step, as in the trainer's
loop. Compiled steps are counted with compiled regions forced eager (dispatch modes refuse compiled code; the
same host reads, and an upper bound of the kernels).

`--ablate` adds, per training mode, the project step with each speed-up switched off in turn (`ablation`: what each
one is worth) and the stock model with no adapter at all (`base_model`: its forward and backward, the floor no
adapter-side speed-up can go below; `adapter_side_bound` = reference / base_model).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config.schema import StepSettings
from ..hidream.flow_matching import LoadBalancingLoss
from ..hidream.forward import predict_flow
from ..speedups.switches import Speedups, remove_speedups
from ..training.optimizers import optimizer_by_name
from ..training.step import MicroBatch, TrainStep
from ..util.device import release_memory
from .reference import compare, lokr_grads, project_lokr, reference_lokr, remove_network, set_lokr_weights
from .setup import (LOAD_BALANCING_WEIGHT, SIZES, BenchSize, StepNoise, build_transformer, device_name, make_inputs,
                    stock_loss, versions)
from .timing import Timed, TimeBudgetSpent, past, time_configs

logger = logging.getLogger(__name__)

TRAIN_MODES = ("bf16_nogc", "bf16_gc", "int8_gc", "offload_gc", "fp8_gc", "fp8_nogc", "fp8_offload_gc", "int8s_gc")
ALL_MODES = ("bf16_nogc", "bf16_gc", "sample_cfg", "offload_gc", "int8_gc",  # every configuration builds its own model
             "fp8_gc", "fp8_nogc", "fp8_offload_gc", "int8s_gc", "sample_cfg_fp8")
# The 8-bit modes: (base precision of the project side, of the reference side), and whether the project streams.
SCALED_MODES = {"fp8_gc": ("fp8-scaled", "no_change"), "fp8_nogc": ("fp8-scaled", "no_change"),
                "fp8_offload_gc": ("fp8-scaled", "fp8-scaled"), "int8s_gc": ("int8-scaled", "int8-quanto"),
                "sample_cfg_fp8": ("fp8-scaled", "no_change")}
_PROJECT_REFERENCE = ("fp8_offload_gc",)  # modes whose reference is the project's own resident step
_FLOAT_CHECK = "float_check"  # the untimed stock bf16 step an int8s_gc row's accuracy is checked against
__all__ = ["ALL_MODES", "SIZES", "TRAIN_MODES", "BenchOptions", "run_bench"]


@dataclass
class BenchOptions:
    size: BenchSize
    device: torch.device
    dtype: torch.dtype
    steps: int = 5
    warmup: int = 2
    reference_lokr: str = "rebuild"
    speedups: Speedups = field(default_factory=Speedups)
    learning_rate: float = 1e-4
    ablate: bool = False  # also time each speed-up switched off in turn, and the adapter-free stock model
    # Project variants timed beside the project (`--variants`): "a+b" switches speed-ups a and b on, e.g.
    # "compile_blocks+cuda_graphs"; each is a `with_...` configuration with its own check.
    variants: tuple = ()
    sequential: Optional[bool] = None  # None: sequential on CUDA (per-configuration peak memory), interleaved on CPU
    profile: Optional[Path] = None  # append a torch.profiler table of each mode's project step to this file
    deadline: Optional[float] = None  # time.monotonic() past which nothing new starts (`--time-budget`)
    optimizer: str = "adamw"  # by SimpleTuner's name (optimizers.py), the same on both sides
    compile_cache: Optional[Path] = None  # inductor's cache folder for compiled blocks (`--compile-cache`)
    predict: bool = True  # on a GPU, each row also carries the memory plan's predicted peak (`--no-plan`)

    @property
    def interleave(self) -> bool:
        return not self.sequential if self.sequential is not None else self.device.type == "cpu"


def _prepare_train_model(mode: str, label: str, opts: BenchOptions, extra: dict, info: dict):
    """A fresh frozen transformer for one configuration (same seed: the reference and the project get identical
    weights); int8 / fp8 quantised, or its blocks offloaded to CPU memory, as the mode and side ask."""
    device = opts.device
    model = build_transformer(opts.size, device, opts.dtype)
    precision = _base_precision(mode, label)
    streams = mode == "fp8_offload_gc" and label != "reference"
    if streams:
        from ..hidream.forward import transformer_blocks
        from ..speedups.block_offload import packed_bytes

        info["unquantised_gib_per_pass"] = sum(packed_bytes(b) for b in transformer_blocks(model)) / 2**30
    if precision in ("fp8-scaled", "int8-scaled"):
        from ..quant.scaled import quantize_scaled

        started = time.perf_counter()
        quantize_scaled(model, precision)  # in place on the device, one layer at a time
        extra["quantize_s"] = time.perf_counter() - started
        if precision == "int8-scaled":
            extra["flops_note"] = "torch._int_mm is invisible to torch's FLOP counter: TFLOP/s is a floor"
    elif precision == "int8-quanto":
        from ..quant.quanto import quantize_frozen

        quantize_frozen(model, "int8-quanto")
    if streams:
        from ..speedups.block_offload import BlockStreamer

        started = time.perf_counter()
        model.to("cpu")
        streamer = BlockStreamer(model, device)  # its hooks keep it alive with the model
        info["offload_setup_s"] = time.perf_counter() - started
        info["streamed_gib_per_pass"] = sum(p.host.numel() for p in streamer.packed) / 2**30
    if mode == "int8_gc":
        from ..quant.quanto import quantize_frozen

        started = time.perf_counter()
        quantize_frozen(model, "int8-quanto")
        extra["quantize_s"] = time.perf_counter() - started
        extra["flops_note"] = "quanto's int8 matmuls are invisible to torch's FLOP counter: TFLOP/s is a floor"
    if mode == "offload_gc":
        started = time.perf_counter()
        if label == "reference":
            # diffusers' group offloading, one block per group, blocking copies (its stream prefetch assumes forward
            # order, which checkpoint recomputation reverses).
            model.to("cpu")
            model.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                       offload_type="block_level", num_blocks_per_group=1)
        else:
            from ..speedups.block_offload import BlockStreamer

            BlockStreamer(model, device)  # its hooks keep it alive with the model
        info["offload_setup_s"] = time.perf_counter() - started
    release_memory()
    if device.type == "cuda":
        info["weights_on_device_gib"] = torch.cuda.memory_allocated(device) / 2**30
    model.train()  # differentiable MoE routing, as in training
    if mode not in ("bf16_nogc", "fp8_nogc"):
        model.enable_gradient_checkpointing()
    return model


def _base_precision(mode: str, label: str) -> str:
    """The base precision one side of an 8-bit mode runs on ("no_change" for the other modes)."""
    if mode not in SCALED_MODES:
        return "no_change"
    project, reference = SCALED_MODES[mode]
    if label == _FLOAT_CHECK:
        return "no_change"
    return reference if label == "reference" else project


def _stock_side(mode: str, label: str) -> bool:
    """True for the sides that run stock LyCORIS and the naive loss (the reference, and the float check)."""
    return label == _FLOAT_CHECK or (label == "reference" and mode not in _PROJECT_REFERENCE)


def _train_config(mode: str, label: str, opts: BenchOptions, extra: dict, checks: dict) -> Timed:
    """Build the model and LoKr of one side, run the check step (fixed batch, no update), return its step."""
    device = opts.device
    info: dict = {}
    model = _prepare_train_model(mode, label, opts, extra, info)
    inputs = make_inputs(opts.size, device, opts.dtype)
    load_balancing = LoadBalancingLoss(model, LOAD_BALANCING_WEIGHT)
    stock = _stock_side(mode, label)
    speedups = _speedups_for(label, opts.speedups)
    if "offload" in mode:  # streamed weights: the stacked experts, compiled code and graphs would not follow
        speedups = replace(speedups, grouped_moe_dispatch=False, compile_blocks=False, cuda_graphs=False)
    if stock:
        network, report = reference_lokr(model, device, opts.reference_lokr), None
    else:
        network, report = project_lokr(model, device, speedups, opts.compile_cache)

    # The check: one fixed batch with identical non-zero LoKr factors on both sides, loss and gradients kept.
    set_lokr_weights(network)
    params = [p for p in network.parameters() if p.requires_grad]
    optimizer = optimizer_by_name(opts.optimizer, params, opts.learning_rate, 0.01, device)
    noise = StepNoise(inputs)
    micro_batches = [lambda: MicroBatch(inputs.latents, inputs.embeds)]
    started = time.perf_counter()
    if stock:
        loss = stock_loss(model, inputs.latents, noise, inputs, load_balancing)
        loss.backward()
        trainer_step = None
    else:
        # The project side IS the trainer's step (training/step.py), with the trainer's default step settings.
        trainer_step = TrainStep(model, params, optimizer, load_balancing,
                                 StepSettings(use_load_balancing_loss=True), noise)
        loss = trainer_step.backward(micro_batches)[0]
    checks[label] = (loss.item(), lokr_grads(network), report)
    # The first forward and backward (the check's): with compiled blocks, the compile is in here.
    info["first_call_s"] = time.perf_counter() - started
    for p in network.parameters():
        p.grad = None
    step_fn = trainer_step
    if trainer_step is not None and speedups.cuda_graphs:
        from ..training.graphed_step import GraphedTrainStep

        step_fn = GraphedTrainStep(trainer_step, model)

    # Everything big lives in `state`, which close() empties: on a GPU the next configuration must not find this
    # one's 32 GB of weights still referenced.
    state = {"model": model, "optimizer": optimizer, "trainer_step": trainer_step, "step_fn": step_fn,
             "pending": None}
    del model

    losses: dict = {}

    def settle() -> None:
        """Read the last project step's numbers (the trainer's loop reads them after queuing the next step)."""
        if state.get("pending") is not None:
            loss = state["pending"].result().loss
            if state.get("pending_step") is not None:  # not the counters' extra step
                losses[state["pending_step"]] = loss
            state["pending"] = None

    def run_step(i: int, step_fn, record: bool = True) -> object:
        noise.step = i
        if step_fn is not None:
            settle()
            state["pending"], state["pending_step"] = step_fn.launch(micro_batches, i), (i if record else None)
            return state["pending"]
        loss = stock_loss(state["model"], inputs.latents, noise, inputs, load_balancing)
        loss.backward()
        state["optimizer"].step()
        state["optimizer"].zero_grad(set_to_none=True)
        return loss.detach()

    def late_info() -> dict:
        if trainer_step is None:
            return {"compiled": False, "graph_breaks": 0}
        settle()
        return {**_compile_and_graph_info(report, state.get("step_fn")),
                "step_losses": [losses[i] for i in sorted(losses)]}

    def close() -> None:
        settle()
        load_balancing.remove()
        remove_speedups(state["model"], network)
        remove_network(network)
        state.clear()

    if label == _FLOAT_CHECK:  # only its loss and gradients are wanted
        close()
        return None
    # diffusers' blocking group offload took ~20 s a step at full size (H100): one warm-up and three timed steps.
    slow_reference = mode == "offload_gc" and label == "reference"
    return Timed(lambda i: run_step(i, state["step_fn"]), close,
                 {"lokr_params": sum(p.numel() for p in params), **info},
                 count_flops=mode != "offload_gc", max_steps=3 if slow_reference else None,
                 max_warmup=1 if slow_reference else None,
                 count_step=lambda i: run_step(i, state["trainer_step"], record=False), settle=settle,
                 late_info=late_info)


_COMPILE_BASELINE: dict = {}


def _mark_compile_baseline() -> None:
    """Compile counters are process-wide: a mode reports what happened since it started."""
    from ..speedups.compile_blocks import compile_stats

    _COMPILE_BASELINE.clear()
    _COMPILE_BASELINE.update(compile_stats())


def _compile_and_graph_info(report: Optional[dict], step_fn) -> dict:
    """`compiled` (the step ran compiled blocks), `graph_breaks` (dynamo's count, blocks that could not compile
    whole included), compile counts, and what the CUDA-graph path did (captures, replays, or why not)."""
    from ..speedups.compile_blocks import compile_stats

    report = report or {}
    out: dict = {"compiled": bool(report.get("compiled_blocks")), "graph_breaks": 0 if
                 not report.get("compiled_blocks") else None}
    if report.get("compiled_blocks"):
        stats = compile_stats()
        base = _COMPILE_BASELINE or {"graphs": 0, "graph_breaks": 0, "recompiles": 0}
        out.update(graph_breaks=stats["graph_breaks"] - base["graph_breaks"],
                   compile_graphs=stats["graphs"] - base["graphs"],
                   recompiles=stats["recompiles"] - base["recompiles"], compile_failed=stats["failed"] or None,
                   whole_blocks=report.get("whole_blocks"), regional_blocks=report.get("regional_blocks"))
        out["compiled"] = not stats["failed"]
    graphs = getattr(step_fn, "graphs", None)
    if graphs is not None:
        out["cuda_graphs"] = {"captures": graphs.captures, "replays": graphs.replays,
                              "why_not": getattr(step_fn, "why_not", None) or
                              (next(iter(v for v in graphs._graphs.values() if isinstance(v, str)), None))}
    return out


def _base_model_config(mode: str, opts: BenchOptions) -> Timed:
    """The stock model with no adapter at all: forward, the same loss, backward to the input latents (no optimizer).

    This is the floor of every adapter-side speed-up: a step that trains a LoKr cannot be cheaper than the frozen
    model's own forward and backward, so `reference / base_model` bounds what the LoKr path and the optimizer can
    win; anything faster than that has to come from the base model itself (the MoE dispatch, compile)."""
    model = _prepare_train_model(mode, "base_model", opts, {}, {})  # setup figures in the row are the LoKr steps'
    inputs = make_inputs(opts.size, opts.device, opts.dtype)
    load_balancing = LoadBalancingLoss(model, LOAD_BALANCING_WEIGHT)
    state = {"model": model}
    del model

    noise = StepNoise(inputs)

    def step(i: int) -> torch.Tensor:
        noise.step = i
        latents = inputs.latents.detach().requires_grad_(True)  # the gradient needs a leaf to reach
        loss = stock_loss(state["model"], latents, noise, inputs, load_balancing)
        loss.backward()
        return loss.detach()

    def close() -> None:
        load_balancing.remove()
        state.clear()

    return Timed(step, close)


def _profiler(mode: str, opts: BenchOptions, into: dict) -> Optional[Callable[[str, Timed], None]]:
    """With `--profile FILE`: profile the project configuration's step, its summary into `into["profile"]` (the
    row), torch's operator table appended to FILE."""
    if opts.profile is None:
        return None
    from .profile import profile_steps

    def profile(label: str, timed: Timed) -> None:
        if label != "project":
            return
        summary, table = profile_steps(timed.step, opts.device)
        into["profile"] = summary
        with open(opts.profile, "a", encoding="utf-8") as f:
            f.write(f"== {mode}, project step, {device_name(opts.device)}, {opts.size.name} size\n"
                    f"{json.dumps(summary, indent=1)}\n{table}\n\n")

    return profile


def _speedups_for(label: str, speedups: Speedups) -> Speedups:
    """`project`: the given speed-ups; `without_<a>[+<b>...]` / `with_<a>[+<b>...]`: the same with those switched
    off / on."""
    for prefix, value in (("without_", False), ("with_", True)):
        if label.startswith(prefix):
            return replace(speedups, **{name: value for name in label[len(prefix):].split("+")})
    return speedups


def _ablation_labels(mode: str, speedups: Speedups) -> list[str]:
    """Extra project configurations for `--ablate`: each speed-up that matters in `mode` and is on, switched off
    (`without_<name>`: what it is worth), and each candidate that is off, switched on (`with_<name>`: whether it
    should become a default). The bf16 modes measure the LoKr, MoE and rotary-embedding paths and the copy-free
    LoKr form (a refinement of fast_lokr); the int8 mode its own backward."""
    ablated = {"bf16_nogc": ("fast_lokr", "fast_moe_dispatch", "grouped_moe_dispatch", "lean_rope"),
               "bf16_gc": ("fast_lokr", "fast_moe_dispatch", "grouped_moe_dispatch", "lean_rope"),
               "int8_gc": ("lean_int8_backward",)}.get(mode, ())
    candidates = ("batched_lokr",) if mode in ("bf16_nogc", "bf16_gc") and speedups.fast_lokr else ()
    return ([f"without_{name}" for name in ablated if getattr(speedups, name)] +
            [f"with_{name}" for name in candidates if not getattr(speedups, name)])


def run_train_mode(mode: str, opts: BenchOptions) -> dict:
    extra: dict = {}
    checks: dict = {}
    _mark_compile_baseline()  # compile figures per mode (compiled graphs are kept: later modes reuse them)
    # The project first: on a GPU a slow reference (offloading) cut short by a time limit still leaves its figures.
    labels = ["project", "reference", *(_ablation_labels(mode, opts.speedups) if opts.ablate else []),
              *(f"with_{v}" for v in opts.variants if mode != "offload_gc")]
    configs = {label: (lambda label=label: _train_config(mode, label, opts, extra, checks)) for label in labels}
    if opts.ablate and mode != "offload_gc":
        configs["base_model"] = lambda: _base_model_config(mode, opts)
    profiles: dict = {}
    if mode == "int8s_gc":  # the accuracy reference first, untimed, freed before anything is timed
        _train_config(mode, _FLOAT_CHECK, opts, extra, checks)
        release_memory()
    results = time_configs(configs, opts.device, opts.steps, opts.warmup, opts.interleave,
                           _profiler(mode, opts, profiles), opts.deadline)
    _require(results, ("project",))  # a project without its reference (a slow offload one, cut by time) still counts
    # The check compares with the unquantised stock step where there is one (8-bit modes: the bounds).
    against = _FLOAT_CHECK if _FLOAT_CHECK in checks else "reference"
    reference = checks.get(against)
    report = checks["project"][2]
    quantised = mode in SCALED_MODES and mode not in _PROJECT_REFERENCE

    def check(label: str) -> Optional[dict]:
        if reference is None:
            return None
        ref_loss, ref_grads, _ = reference
        return compare(ref_grads, checks[label][1], ref_loss, checks[label][0], opts.dtype, quantised=quantised)

    row = _row(mode, opts, results["project"], results.get("reference"), extra)
    row["check"] = check("project")
    if mode in SCALED_MODES:
        row["base_precision"] = {"project": _base_precision(mode, "project"),
                                 "reference": _base_precision(mode, "reference"),
                                 "check_against": _base_precision(mode, against) + (" (stock step)" if
                                                                                    _stock_side(mode, against) else
                                                                                    " (project step)")}
    row["speedups"] = report
    row.update(profiles)
    not_run = [label for label in configs if label not in results]
    if not_run:
        row["not_run_for_time"] = not_run
    if len(labels) > 2:  # what each speed-up is worth: the step with it switched off, same run
        row["ablation"] = {label: {"step_s": results[label]["step_s"], "peak_gib": results[label]["peak_gib"],
                                   "kernels_per_step": results[label]["kernels_per_step"],
                                   "host_syncs_per_step": results[label]["host_syncs_per_step"],
                                   "slowdown_vs_project": results[label]["step_s"] / results["project"]["step_s"],
                                   "check_passed": (check(label) or {}).get("passed"),
                                   **{key: results[label].get(key) for key in (
                                       "compiled", "graph_breaks", "cuda_graphs", "first_call_s", "first_step_s",
                                       "recompiles", "whole_blocks")},
                                   "step_losses_rel_err": _losses_rel_err(results["project"], results[label])}
                           for label in labels[2:] if label in results}
    if "base_model" in results and "reference" in results:
        base = results["base_model"]
        row["base_model"] = {"step_s": base["step_s"], "peak_gib": base["peak_gib"],
                             "flops_per_step": base["flops_per_step"], "kernels_per_step": base["kernels_per_step"],
                             # the most any adapter-side speed-up (LoKr path, optimizer) can give over the reference
                             "adapter_side_bound": results["reference"]["step_s"] / base["step_s"],
                             "project_vs_base": results["project"]["step_s"] / base["step_s"]}
    return row


def _losses_rel_err(project: dict, other: dict) -> Optional[float]:
    """The largest relative difference between two configurations' losses at the same steps (same start, same
    noise per step, same optimizer: a compiled or graphed step must train what the project's step trains)."""
    a, b = project.get("step_losses") or [], other.get("step_losses") or []
    pairs = [(x, y) for x, y in zip(a, b) if x == x and y == y]
    return max((abs(x - y) / max(abs(x), 1e-30) for x, y in pairs), default=None)


def _require(results: dict, labels: tuple[str, ...]) -> None:
    missing = [label for label in labels if label not in results]
    if missing:
        raise TimeBudgetSpent(f"the time budget ran out before {', '.join(missing)} ran")


def _row(mode: str, opts: BenchOptions, proj: dict, ref: Optional[dict], extra: dict) -> dict:
    """The mode's JSON line; `ref` is None when the time budget ran out before the reference was timed."""
    row = {"mode": mode, "size": opts.size.name, "resolution": opts.size.resolution,
           "device": device_name(opts.device), "dtype": str(opts.dtype).replace("torch.", ""),
           "reference_lokr": opts.reference_lokr, "optimizer": opts.optimizer,
           "timing": "interleaved" if opts.interleave else "sequential",
           "step_s": proj["step_s"], "peak_gib": proj["peak_gib"], "tflops_per_s": proj.get("tflops_per_s"),
           "first_step_s": proj.get("first_step_s"), "first_call_s": proj.get("first_call_s"),
           "kernels_per_step": proj.get("kernels_per_step"), "host_syncs_per_step": proj.get("host_syncs_per_step"),
           "compiled": proj.get("compiled", False), "graph_breaks": proj.get("graph_breaks", 0),
           "cuda_graphs": proj.get("cuda_graphs"),
           "reference_step_s": ref and ref["step_s"], "reference_peak_gib": ref and ref["peak_gib"],
           "speedup_vs_reference": ref and ref["step_s"] / proj["step_s"],
           "project": proj, "reference": ref}
    row.update(extra)
    return row


def _sample_config(label: str, opts: BenchOptions, outputs: dict, mode: str = "sample_cfg") -> Timed:
    """One CFG denoising step (batch 2, eval, no grad) on a fresh model: `base` (stock, no adapter), `reference`
    (stock LyCORIS hooks), `project` (the sampler's path: `lokr_applied`, which merges the LoKr into float32
    weights and runs it unmerged on bf16 and 8-bit bases; the project's speed-ups, compiled blocks and CUDA graphs
    when switched on) or `project_base` (that same path without an adapter: what the LoKr's cost is measured
    against). In sample_cfg_fp8 `base`, `project` and `project_base` run on the fp8-scaled base."""
    from ..adapters.lokr import lokr_applied
    from ..hidream.forward import GraphedPredict

    device, dtype = opts.device, opts.dtype
    model = build_transformer(opts.size, device, dtype).eval()
    if label != "reference" and _base_precision(mode, label) != "no_change":
        from ..quant.scaled import quantize_scaled

        quantize_scaled(model, _base_precision(mode, label))
    inputs = make_inputs(opts.size, device, dtype).batch(2)
    timesteps = torch.full((2,), 500.0, device=device)
    stack = contextlib.ExitStack()
    info: dict = {"compiled": False, "graph_breaks": 0}
    report = None
    if label == "reference":
        network = reference_lokr(model, device, opts.reference_lokr)
        set_lokr_weights(network)
    elif label == "project":
        network, report = project_lokr(model, device, opts.speedups, opts.compile_cache)
        info["speedups"] = report
        set_lokr_weights(network)
        info["lokr_applied_as"] = stack.enter_context(lokr_applied(network))
    elif label == "project_base":
        from ..speedups.switches import apply_speedups

        report = apply_speedups(model, None, opts.speedups, compile_cache=opts.compile_cache)
    graphed = GraphedPredict(model) if label.startswith("project") and opts.speedups.cuda_graphs else None

    @torch.no_grad()
    def plain(_: int = 0) -> torch.Tensor:
        return predict_flow(model, inputs.latents, timesteps, inputs.embeds)

    @torch.no_grad()
    def step(_: int = 0) -> torch.Tensor:
        return graphed(inputs.latents, timesteps, inputs.embeds) if graphed is not None else plain()

    started = time.perf_counter()
    outputs[label] = step().float().cpu()
    info["first_call_s"] = time.perf_counter() - started

    def late_info() -> dict:
        out = _compile_and_graph_info(report, graphed) if report is not None else {}
        return out

    return Timed(step, stack.close, info, count_step=plain, late_info=late_info)


def run_sample_mode(opts: BenchOptions, mode: str = "sample_cfg") -> dict:
    outputs: dict = {}
    profiles: dict = {}
    _mark_compile_baseline()
    labels = ("base", "reference", "project", "project_base")
    results = time_configs({label: (lambda label=label: _sample_config(label, opts, outputs, mode))
                            for label in labels},
                           opts.device, opts.steps, opts.warmup, opts.interleave,
                           _profiler(mode, opts, profiles), opts.deadline)
    _require(results, ("base", "reference", "project"))
    project, reference, base = results["project"], results["reference"], results["base"]
    row = _row(mode, opts, project, reference, {})
    row["speedups"] = project.pop("speedups", None)
    row["lokr_applied_as"] = project.pop("lokr_applied_as", None)
    row.update(profiles)
    row.update(base_step_s=base["step_s"], base_peak_gib=base["peak_gib"],
               merged_vs_base=project["step_s"] / base["step_s"], base=base)
    if "project_base" in results:  # the merged LoKr's cost on the same (compiled, graphed) path
        row.update(project_base=results["project_base"],
                   merged_vs_base_same_path=project["step_s"] / results["project_base"]["step_s"])
    ref_out, proj_out = outputs["reference"], outputs["project"]
    err = ((proj_out - ref_out).norm() / ref_out.norm()).item()
    lokr_effect = ((ref_out - outputs["base"]).norm() / ref_out.norm()).item()
    if mode == "sample_cfg_fp8":  # the bound against the bf16 stock step; the LoKr unmerged on fp8
        cosine = torch.nn.functional.cosine_similarity(proj_out.flatten(), ref_out.flatten(), dim=0).item()
        row["lokr_vs_base"] = row.pop("merged_vs_base")  # goal: <= 1.05
        row["base_precision"] = {"project": "fp8-scaled", "base": "fp8-scaled", "reference": "no_change"}
        row["check"] = {"output_rel_err": err, "velocity_cosine": cosine, "lokr_effect_rel": lokr_effect,
                        "tolerance": {"velocity_cosine": 0.995}, "passed": bool(cosine >= 0.995)}
        return row
    tol = 2e-2 if opts.dtype in (torch.bfloat16, torch.float16) else 1e-4
    row["check"] = {"output_rel_err": err, "lokr_effect_rel": lokr_effect, "tolerance": tol,
                    "passed": bool(err <= tol and lokr_effect > err)}
    return row


def run_mode(mode: str, opts: BenchOptions) -> dict:
    if mode == "offload_gc" and opts.device.type != "cuda":
        return {"mode": mode, "size": opts.size.name, "device": device_name(opts.device),
                "skipped": "offloading streams blocks from CPU memory to an accelerator; on a CPU there is "
                           "nothing to offload to (run with --device cuda)"}
    if mode in ("sample_cfg", "sample_cfg_fp8"):
        return run_sample_mode(opts, mode)
    if mode in TRAIN_MODES:
        return run_train_mode(mode, opts)
    raise ValueError(f"unknown bench mode {mode!r}; choose from {', '.join(ALL_MODES)}")


def predicted_peak(mode: str, opts: BenchOptions) -> dict:
    """{"predicted_peak_gib": the memory plan's prediction of this mode's project step (plan.bench_modes), made on
    the CPU after the mode ran, so each GPU run checks the plan; and the seconds it took}."""
    from ..plan import plan_bench_mode

    started = time.perf_counter()
    try:
        plan = plan_bench_mode(mode, opts.speedups, opts.size.model, opts.size.resolution, opts.size.llama_layers)
    except Exception as exc:  # noqa: BLE001 - a failed prediction must not lose the measured row
        logger.warning("memory plan of %s failed: %s", mode, exc)
        return {"predicted_peak_gib": None, "plan_error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return {"predicted_peak_gib": round(plan.peak_gib, 3), "plan_seconds": round(time.perf_counter() - started, 1)}


def run_bench(modes: list[str], opts: BenchOptions, out: Optional[Path] = None,
              emit: Callable[[str], None] = print) -> list[dict]:
    """Run `modes` in order; each result is printed as one JSON line and appended to `out`."""
    for mode in modes:
        if mode not in ALL_MODES:
            raise ValueError(f"unknown bench mode {mode!r}; choose from {', '.join(ALL_MODES)}")
    header = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **versions()}
    rows = []
    handle = open(out, "a", encoding="utf-8") if out else contextlib.nullcontext()
    with handle as f:
        for mode in modes:
            started = time.perf_counter()
            try:
                if past(opts.deadline):
                    raise TimeBudgetSpent("the time budget ran out before this mode started")
                row = run_mode(mode, opts)
            except TimeBudgetSpent as exc:
                logger.warning("bench mode %s: %s", mode, exc)
                row = {"mode": mode, "skipped": f"{exc} (--time-budget)"}
            except torch.OutOfMemoryError as exc:
                row = {"mode": mode, "error": "OutOfMemoryError", "message": str(exc)[:300]}
            except Exception as exc:  # one broken mode must not lose the others' figures
                logger.exception("bench mode %s failed", mode)
                row = {"mode": mode, "error": type(exc).__name__, "message": str(exc)[:300]}
            row["mode_seconds"] = round(time.perf_counter() - started, 2)
            if opts.predict and opts.device.type == "cuda" and "peak_gib" in row:
                row.update(predicted_peak(mode, opts))
            row.update(header)
            line = json.dumps(row, default=str)
            emit(line)
            if f:
                f.write(line + "\n")
                f.flush()
            rows.append(row)
            release_memory()
    return rows
