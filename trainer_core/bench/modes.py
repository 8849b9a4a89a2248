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
sample_cfg (one CFG denoising step at batch 2: base model, LoKr merged by the project, LoKr hooked by LyCORIS).
One JSON line per mode goes to stdout and to `--out`.

`--ablate` adds, per training mode, the project step with each speed-up switched off in turn (`ablation`: what each
one is worth) and the stock model with no adapter at all (`base_model`: its forward and backward, the floor no
adapter-side speed-up can go below; `adapter_side_bound` = reference / base_model).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import logging
import math
import platform
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from ..hidream.flow_matching import (LoadBalancingLoss, flow_matching_loss, flow_matching_target, noisy_latents,
                            patch_tokens_to_image, sample_sigmas, shift_sigmas)
from ..training.optimizers import optimizer_by_name
from ..speedups.switches import Speedups, apply_speedups, remove_speedups

logger = logging.getLogger(__name__)

TRAIN_MODES = ("bf16_nogc", "bf16_gc", "int8_gc", "offload_gc")
ALL_MODES = ("bf16_nogc", "bf16_gc", "sample_cfg", "offload_gc", "int8_gc")  # every configuration builds its own model
LOKR_FACTOR = 16
LOAD_BALANCING_WEIGHT = 0.01


@dataclass(frozen=True)
class BenchSize:
    """A transformer config and the input sizes fed to it."""

    name: str
    model: dict
    resolution: int  # pixels; latents are (B, 16, resolution/8, resolution/8)
    text_tokens: int = 128
    llama_layers: int = 32  # layers in the Llama hidden-state stack (first axis of the llama input)


FULL = BenchSize("full", dict(
    patch_size=2, in_channels=16, out_channels=16, num_layers=16, num_single_layers=32, attention_head_dim=128,
    num_attention_heads=20, caption_channels=[4096, 4096], text_emb_dim=2048, num_routed_experts=4,
    num_activated_experts=2, axes_dims_rope=(64, 32, 32), max_resolution=(128, 128),
    llama_layers=[min(i, 31) for i in range(48)]), resolution=1024)

# Same block structure (double + single blocks, 4 experts top-2, three text streams), 1/10 of the width, 1/8 of
# the depth, 256 px: a CPU thread runs a training step in about a second.
SMALL = BenchSize("small", dict(
    patch_size=2, in_channels=16, out_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=64,
    num_attention_heads=4, caption_channels=[256, 256], text_emb_dim=256, num_routed_experts=4,
    num_activated_experts=2, axes_dims_rope=(16, 24, 24), max_resolution=(128, 128),
    llama_layers=[0, 1, 2, 3, 3, 3]), resolution=256, llama_layers=4)

SIZES = {"full": FULL, "small": SMALL}


# ----------------------------------------------------------------------------------------------- device helpers

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _gib_text(value: Optional[float]) -> str:
    return f"{value:.2f}" if value is not None else "n/a"


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions() -> dict:
    import importlib.metadata as md

    out = {"torch": torch.__version__}
    for name, dist in (("diffusers", "diffusers"), ("lycoris", "lycoris-lora"), ("quanto", "optimum-quanto")):
        try:
            out[name] = md.version(dist)
        except md.PackageNotFoundError:
            out[name] = None
    return out


# ------------------------------------------------------------------------------------------------ model, inputs

def build_transformer(size: BenchSize, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """diffusers' HiDream transformer with random weights, created directly on `device` in `dtype`, frozen."""
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = HiDreamImageTransformer2DModel(**size.model)
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    return model


@dataclass
class BenchInputs:
    """latents (B, 16, h, w) float32, t5 (B, T, C0), llama (L, B, T, C1), pooled (B, P), all on the device."""

    latents: torch.Tensor
    t5: torch.Tensor
    llama: torch.Tensor
    pooled: torch.Tensor

    def batch(self, n: int) -> "BenchInputs":
        return BenchInputs(self.latents.repeat(n, 1, 1, 1), self.t5.repeat(n, 1, 1), self.llama.repeat(1, n, 1, 1),
                           self.pooled.repeat(n, 1))


def make_inputs(size: BenchSize, device: torch.device, dtype: torch.dtype, seed: int = 0) -> BenchInputs:
    g = torch.Generator(device=device).manual_seed(seed)
    lat = size.resolution // 8
    c0, c1 = size.model["caption_channels"]
    return BenchInputs(
        latents=torch.randn(1, size.model["in_channels"], lat, lat, generator=g, device=device),
        t5=torch.randn(1, size.text_tokens, c0, generator=g, device=device, dtype=dtype),
        llama=torch.randn(size.llama_layers, 1, size.text_tokens, c1, generator=g, device=device, dtype=dtype),
        pooled=torch.randn(1, size.model["text_emb_dim"], generator=g, device=device, dtype=dtype))


def step_noise(inputs: BenchInputs, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise and sigmas of step `step`: the same for the reference and the project."""
    device = inputs.latents.device
    g = torch.Generator(device=device).manual_seed(1000 + step)
    noise = torch.randn(inputs.latents.shape, generator=g, device=device)
    sigmas = shift_sigmas(sample_sigmas(inputs.latents.shape[0], torch.Generator().manual_seed(step)), 3.0)
    return noise, sigmas.to(device)


def training_loss(model, inputs: BenchInputs, noise: torch.Tensor, sigmas: torch.Tensor,
                  load_balancing: LoadBalancingLoss, dtype: torch.dtype) -> torch.Tensor:
    """The trainer's loss: flow matching on -output vs noise - x0 in float32, plus the MoE load-balancing loss."""
    _, _, h, w = inputs.latents.shape
    load_balancing.clear()
    model_input = noisy_latents(inputs.latents, noise, sigmas).to(dtype)
    out = model(hidden_states=model_input, timesteps=sigmas * 1000.0, encoder_hidden_states_t5=inputs.t5,
                encoder_hidden_states_llama3=inputs.llama, pooled_embeds=inputs.pooled, return_dict=False)[0]
    loss = flow_matching_loss(-patch_tokens_to_image(out, h, w), flow_matching_target(inputs.latents, noise))
    lb = load_balancing.take()
    return loss if lb is None else loss + lb


# ------------------------------------------------------------------------------------------------------ LoKrs

def reference_lokr(model, device: torch.device, lokr_mode: str):
    """Stock LyCORIS exactly as a user of the library writes it (the starting point's `add_lokr`)."""
    from lycoris import LycorisNetwork, create_lycoris

    LycorisNetwork.apply_preset({"target_module": ["HiDreamAttention"],
                                 "module_algo_map": {"HiDreamAttention": {"factor": LOKR_FACTOR}}})
    kwargs = {"bypass_mode": True} if lokr_mode == "bypass" else {}
    network = create_lycoris(model, 1.0, linear_dim=16384, linear_alpha=1, algo="lokr", factor=LOKR_FACTOR,
                             full_matrix=True, **kwargs)
    network.apply_to()
    network.to(device)
    return network


def project_lokr(model, device: torch.device, speedups: Speedups):
    """The trainer's LoKr: `create_lokr_network` with the default (quickstart attention-only) preset, sped up."""
    from ..adapters.lokr import LycorisConfig, create_lokr_network

    network = create_lokr_network(model, LycorisConfig(factor=LOKR_FACTOR), seed=0)
    network.to(device)
    report = apply_speedups(model, network, speedups)
    return network, report


@torch.no_grad()
def set_lokr_weights(network, seed: int = 0) -> None:
    """Deterministic non-zero factors (by module name), so both W1 and W2 get gradient and dW is not zero."""
    for lora in sorted(network.loras, key=lambda l: l.lora_name):
        g = torch.Generator().manual_seed(seed + sum(map(ord, lora.lora_name)))
        for name, param in sorted(lora.named_parameters()):
            std = 0.25 if name.startswith("lokr_w1") else 5e-3
            param.copy_(torch.randn(param.shape, generator=g) * std)


def lokr_grads(network) -> dict[str, torch.Tensor]:
    out = {}
    for lora in network.loras:
        for name, param in lora.named_parameters():
            if param.grad is not None:
                out[f"{lora.lora_name}.{name}"] = param.grad.detach().float().cpu().clone()
    return out


def remove_network(network) -> None:
    for lora in network.loras:
        lora.restore()


def compare(reference: dict, project: dict, loss_ref: float, loss_proj: float, dtype: torch.dtype) -> dict:
    """Loss relative difference and the relative L2 error of the concatenated LoKr gradient."""
    missing = sorted(set(reference) ^ set(project))
    keys = sorted(set(reference) & set(project))
    ref = torch.cat([reference[k].flatten() for k in keys]) if keys else torch.zeros(1)
    proj = torch.cat([project[k].flatten() for k in keys]) if keys else torch.zeros(1)
    grad_err = ((proj - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    cosine = torch.nn.functional.cosine_similarity(proj, ref, dim=0).item()
    loss_err = abs(loss_proj - loss_ref) / max(abs(loss_ref), 1e-30)
    tol_loss, tol_grad = (2e-2, 5e-2) if dtype in (torch.bfloat16, torch.float16) else (1e-4, 1e-3)
    return {"loss_reference": loss_ref, "loss_project": loss_proj, "loss_rel_err": loss_err,
            "grad_rel_err": grad_err, "grad_cosine": cosine, "grad_tensors": len(keys),
            "tolerance": {"loss": tol_loss, "grad": tol_grad},
            "passed": bool(not missing and keys and loss_err <= tol_loss and grad_err <= tol_grad and
                           math.isfinite(loss_proj)), **({"mismatched_grads": missing[:5]} if missing else {})}


# ----------------------------------------------------------------------------------------------------- timing

@dataclass
class Timed:
    """One configuration ready to run: `step(i)` runs step i; `close()` frees it."""

    step: Callable[[int], object]
    close: Callable[[], None] = lambda: None
    info: dict = field(default_factory=dict)
    # One extra step under the FLOP and kernel counters; skipped where a step is slow and its work is another
    # mode's (offloading moves weights, not work).
    count_flops: bool = True
    max_steps: Optional[int] = None  # cap on timed steps (a reference so slow that the run's time limit matters)
    max_warmup: Optional[int] = None  # cap on untimed steps, likewise


class TimeBudgetSpent(RuntimeError):
    """`--time-budget` ran out before a configuration the mode cannot do without."""


def past(deadline: Optional[float]) -> bool:
    """True once `deadline` (a time.monotonic() value, None for none) has passed."""
    return deadline is not None and time.monotonic() >= deadline


def time_configs(configs: dict[str, Callable[[], Timed]], device: torch.device, steps: int, warmup: int,
                 interleave: bool, profile: Optional[Callable[[str, Timed], None]] = None,
                 deadline: Optional[float] = None) -> dict[str, dict]:
    """Median step time (and peak memory) of each configuration.

    interleave=False (GPU): one configuration lives at a time: set up, time, count FLOPs, close. Peak memory is
    per configuration. interleave=True (CPU): all configurations live together and their steps alternate (the
    order flips every round), so load from other processes on a shared CPU hits all of them alike.
    `profile(label, timed)`, when given, runs after a configuration's timed steps (untimed, before it closes).
    Past `deadline`, configurations not yet set up are left out of the result and timing stops after the first
    timed step (`step_s_all` says how many ran): a device lent for minutes keeps what was measured.
    """
    results: dict[str, dict] = {}
    if not interleave:
        for label, setup in configs.items():
            if past(deadline):
                logger.warning("time budget spent: %s not run", label)
                continue
            timed = setup()
            _release(device)
            _reset_peak(device)
            times = []
            timed_steps = min(steps, timed.max_steps or steps)
            timed_warmup = min(warmup, warmup if timed.max_warmup is None else timed.max_warmup)
            for i in range(timed_warmup + timed_steps):
                if i > timed_warmup and past(deadline):
                    logger.warning("time budget spent: %s timed on %d steps", label, i - timed_warmup)
                    break
                _sync(device)
                started = time.perf_counter()
                timed.step(i)
                _sync(device)
                times.append(time.perf_counter() - started)
                peak = _peak_gib(device)  # logged per step: a run cut short by a time limit keeps its memory too
                logger.info("%s step %d: %.3f s, peak so far %s GiB", label, i, times[-1], _gib_text(peak))
            logger.info("%s: median %.3f s, peak %s GiB", label, statistics.median(times[timed_warmup:]),
                        _gib_text(peak))
            results[label] = _configuration_result(label, timed, times, timed_warmup, peak, profile, deadline)
            timed.close()
            del timed
            _release(device)
        return results
    live = {label: setup() for label, setup in configs.items()}
    times = {label: [] for label in live}
    labels = list(live)
    for i in range(warmup + steps):
        if i > warmup and past(deadline):
            logger.warning("time budget spent: timed on %d steps", i - warmup)
            break
        for label in (labels if i % 2 == 0 else labels[::-1]):
            started = time.perf_counter()
            live[label].step(i)
            times[label].append(time.perf_counter() - started)
    for label, timed in live.items():
        results[label] = _configuration_result(label, timed, times[label], warmup, None, profile, deadline)
        timed.close()
    return results


def _configuration_result(label: str, timed: Timed, times: list[float], warmup: int, peak: Optional[float],
                          profile: Optional[Callable[[str, Timed], None]], deadline: Optional[float]) -> dict:
    """One timed configuration's figures: its step times, then (unless the time budget is spent) the profile and
    one step under the FLOP and kernel counters."""
    if profile is not None and not past(deadline):
        profile(label, timed)
    counted = timed.count_flops and not past(deadline)
    flops, kernels = count_work(lambda: timed.step(0)) if counted else (None, None)
    return {**summarise(times, warmup, peak, flops), "flops_per_step": flops, "kernels_per_step": kernels,
            **timed.info}


def summarise(times: list[float], warmup: int, peak: Optional[float], flops: Optional[float]) -> dict:
    timed = times[warmup:]
    med = statistics.median(timed)
    return {"step_s": med, "step_s_all": [round(t, 4) for t in times], "peak_gib": peak,
            "tflops_per_s": (flops / med / 1e12) if flops else None}


def count_work(fn: Callable[[], object]) -> tuple[Optional[float], Optional[int]]:
    """(FLOPs, kernels) of one run of `fn`: the FLOPs torch's FlopCounterMode sees (matmuls, attention; quanto's int8
    matmul op is not counted) and the kernels `KernelCounter` sees dispatched, or (None, None) when the step cannot
    run under the counters (compiled code may refuse a dispatch mode): timing matters more."""
    from torch.utils.flop_counter import FlopCounterMode

    from .profile import KernelCounter

    flops = FlopCounterMode(display=False)
    kernels = KernelCounter()
    try:
        with flops, kernels:
            fn()
    except Exception as exc:  # noqa: BLE001 - a missing FLOP figure must not lose the mode's timings
        logger.warning("FLOP count failed (%s: %s); TFLOP/s left empty", type(exc).__name__, exc)
        return None, None
    return float(flops.get_total_flops()), kernels.total


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
    sequential: Optional[bool] = None  # None: sequential on CUDA (per-configuration peak memory), interleaved on CPU
    profile: Optional[Path] = None  # append a torch.profiler table of each mode's project step to this file
    deadline: Optional[float] = None  # time.monotonic() past which nothing new starts (`--time-budget`)
    optimizer: str = "adamw"  # by SimpleTuner's name (optimizers.py), the same on both sides

    @property
    def interleave(self) -> bool:
        return not self.sequential if self.sequential is not None else self.device.type == "cpu"


def _prepare_train_model(mode: str, label: str, opts: BenchOptions, extra: dict, info: dict):
    """A fresh frozen transformer for one configuration (same seed: the reference and the project get identical
    weights); int8 quantised, or its blocks offloaded to CPU memory, as the mode asks."""
    device = opts.device
    model = build_transformer(opts.size, device, opts.dtype)
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
    _release(device)
    if device.type == "cuda":
        info["weights_on_device_gib"] = torch.cuda.memory_allocated(device) / 2**30
    model.train()  # differentiable MoE routing, as in training
    if mode != "bf16_nogc":
        model.enable_gradient_checkpointing()
    return model


def _train_config(mode: str, label: str, opts: BenchOptions, extra: dict, checks: dict) -> Timed:
    """Build the model and LoKr of one side, run the check step (fixed batch, no update), return its step."""
    device = opts.device
    info: dict = {}
    model = _prepare_train_model(mode, label, opts, extra, info)
    inputs = make_inputs(opts.size, device, opts.dtype)
    load_balancing = LoadBalancingLoss(model, LOAD_BALANCING_WEIGHT)
    if label == "reference":
        network, report = reference_lokr(model, device, opts.reference_lokr), None
    else:
        network, report = project_lokr(model, device, _speedups_for(label, opts.speedups))

    # The check: one fixed batch with identical non-zero LoKr factors on both sides, loss and gradients kept.
    set_lokr_weights(network)
    noise, sigmas = step_noise(inputs, 0)
    loss = training_loss(model, inputs, noise, sigmas, load_balancing, opts.dtype)
    loss.backward()
    checks[label] = (loss.item(), lokr_grads(network), report)
    for p in network.parameters():
        p.grad = None

    params = [p for p in network.parameters() if p.requires_grad]
    # Everything big lives in `state`, which close() empties: on a GPU the next configuration must not find this
    # one's 32 GB of weights still referenced.
    state = {"model": model, "optimizer": optimizer_by_name(opts.optimizer, params, opts.learning_rate, 0.01, device)}
    del model

    def step(i: int) -> torch.Tensor:
        noise, sigmas = step_noise(inputs, i)
        loss = training_loss(state["model"], inputs, noise, sigmas, load_balancing, opts.dtype)
        loss.backward()
        state["optimizer"].step()
        state["optimizer"].zero_grad(set_to_none=True)
        return loss.detach()

    def close() -> None:
        load_balancing.remove()
        remove_speedups(state["model"], network)
        remove_network(network)
        state.clear()

    # diffusers' blocking group offload took ~20 s a step at full size (H100): one warm-up and three timed steps.
    slow_reference = mode == "offload_gc" and label == "reference"
    return Timed(step, close, {"lokr_params": sum(p.numel() for p in params), **info},
                 count_flops=mode != "offload_gc", max_steps=3 if slow_reference else None,
                 max_warmup=1 if slow_reference else None)


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

    def step(i: int) -> torch.Tensor:
        noise, sigmas = step_noise(inputs, i)
        latents = inputs.latents.detach().requires_grad_(True)  # the gradient needs a leaf to reach
        loss = training_loss(state["model"], replace(inputs, latents=latents), noise, sigmas, load_balancing,
                             opts.dtype)
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
    """`project`: the given speed-ups; `without_<name>` / `with_<name>`: the same with that one switched off / on."""
    for prefix, value in (("without_", False), ("with_", True)):
        if label.startswith(prefix):
            return replace(speedups, **{label[len(prefix):]: value})
    return speedups


def _ablation_labels(mode: str, speedups: Speedups) -> list[str]:
    """Extra project configurations for `--ablate`: each speed-up that matters in `mode` and is on, switched off
    (`without_<name>`: what it is worth), and each candidate that is off, switched on (`with_<name>`: whether it
    should become a default). The bf16 modes measure the LoKr, MoE and rotary-embedding paths and the copy-free
    LoKr form (a refinement of fast_lokr); the int8 mode its own backward."""
    ablated = {"bf16_nogc": ("fast_lokr", "fast_moe_dispatch", "lean_rope"),
               "bf16_gc": ("fast_lokr", "fast_moe_dispatch", "lean_rope"),
               "int8_gc": ("lean_int8_backward",)}.get(mode, ())
    candidates = ("batched_lokr",) if mode in ("bf16_nogc", "bf16_gc") and speedups.fast_lokr else ()
    return ([f"without_{name}" for name in ablated if getattr(speedups, name)] +
            [f"with_{name}" for name in candidates if not getattr(speedups, name)])


def run_train_mode(mode: str, opts: BenchOptions) -> dict:
    extra: dict = {}
    checks: dict = {}
    # The project first: on a GPU a slow reference (offloading) cut short by a time limit still leaves its figures.
    labels = ["project", "reference", *(_ablation_labels(mode, opts.speedups) if opts.ablate else [])]
    configs = {label: (lambda label=label: _train_config(mode, label, opts, extra, checks)) for label in labels}
    if opts.ablate and mode != "offload_gc":
        configs["base_model"] = lambda: _base_model_config(mode, opts)
    profiles: dict = {}
    results = time_configs(configs, opts.device, opts.steps, opts.warmup, opts.interleave,
                           _profiler(mode, opts, profiles), opts.deadline)
    _require(results, ("project",))  # a project without its reference (a slow offload one, cut by time) still counts
    reference = checks.get("reference")
    report = checks["project"][2]

    def check(label: str) -> Optional[dict]:
        if reference is None:
            return None
        ref_loss, ref_grads, _ = reference
        return compare(ref_grads, checks[label][1], ref_loss, checks[label][0], opts.dtype)

    row = _row(mode, opts, results["project"], results.get("reference"), extra)
    row["check"] = check("project")
    row["speedups"] = report
    row.update(profiles)
    not_run = [label for label in configs if label not in results]
    if not_run:
        row["not_run_for_time"] = not_run
    if len(labels) > 2:  # what each speed-up is worth: the step with it switched off, same run
        row["ablation"] = {label: {"step_s": results[label]["step_s"], "peak_gib": results[label]["peak_gib"],
                                   "kernels_per_step": results[label]["kernels_per_step"],
                                   "slowdown_vs_project": results[label]["step_s"] / results["project"]["step_s"],
                                   "check_passed": (check(label) or {}).get("passed")}
                           for label in labels[2:] if label in results}
    if "base_model" in results and "reference" in results:
        base = results["base_model"]
        row["base_model"] = {"step_s": base["step_s"], "peak_gib": base["peak_gib"],
                             "flops_per_step": base["flops_per_step"], "kernels_per_step": base["kernels_per_step"],
                             # the most any adapter-side speed-up (LoKr path, optimizer) can give over the reference
                             "adapter_side_bound": results["reference"]["step_s"] / base["step_s"],
                             "project_vs_base": results["project"]["step_s"] / base["step_s"]}
    return row


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
           "reference_step_s": ref and ref["step_s"], "reference_peak_gib": ref and ref["peak_gib"],
           "speedup_vs_reference": ref and ref["step_s"] / proj["step_s"],
           "project": proj, "reference": ref}
    row.update(extra)
    return row


def _sample_config(label: str, opts: BenchOptions, outputs: dict) -> Timed:
    """One CFG denoising step (batch 2, eval, no grad) on a fresh model: `base` (no adapter), `reference` (stock
    LyCORIS hooks) or `project` (the sampler's path: LoKr merged into the weights by `lokr_applied`)."""
    from ..adapters.lokr import lokr_applied

    device, dtype = opts.device, opts.dtype
    model = build_transformer(opts.size, device, dtype).eval()
    inputs = make_inputs(opts.size, device, dtype).batch(2)
    timesteps = torch.full((2,), 500.0, device=device)
    stack = contextlib.ExitStack()
    info: dict = {}
    if label == "reference":
        network = reference_lokr(model, device, opts.reference_lokr)
        set_lokr_weights(network)
    elif label == "project":
        network, info["speedups"] = project_lokr(model, device, opts.speedups)
        set_lokr_weights(network)
        info["lokr_applied_as"] = stack.enter_context(lokr_applied(network))

    @torch.no_grad()
    def step(_: int = 0) -> torch.Tensor:
        return model(hidden_states=inputs.latents.to(dtype), timesteps=timesteps,
                     encoder_hidden_states_t5=inputs.t5, encoder_hidden_states_llama3=inputs.llama,
                     pooled_embeds=inputs.pooled, return_dict=False)[0]

    outputs[label] = step().float().cpu()

    return Timed(step, stack.close, info)


def run_sample_mode(opts: BenchOptions) -> dict:
    outputs: dict = {}
    profiles: dict = {}
    results = time_configs({label: (lambda label=label: _sample_config(label, opts, outputs))
                            for label in ("base", "reference", "project")},
                           opts.device, opts.steps, opts.warmup, opts.interleave,
                           _profiler("sample_cfg", opts, profiles), opts.deadline)
    _require(results, ("base", "reference", "project"))
    project, reference, base = results["project"], results["reference"], results["base"]
    row = _row("sample_cfg", opts, project, reference, {})
    row["speedups"] = project.pop("speedups", None)
    row["lokr_applied_as"] = project.pop("lokr_applied_as", None)
    row.update(profiles)
    row.update(base_step_s=base["step_s"], base_peak_gib=base["peak_gib"],
               merged_vs_base=project["step_s"] / base["step_s"], base=base)
    ref_out, proj_out = outputs["reference"], outputs["project"]
    err = ((proj_out - ref_out).norm() / ref_out.norm()).item()
    lokr_effect = ((ref_out - outputs["base"]).norm() / ref_out.norm()).item()
    tol = 2e-2 if opts.dtype in (torch.bfloat16, torch.float16) else 1e-4
    row["check"] = {"output_rel_err": err, "lokr_effect_rel": lokr_effect, "tolerance": tol,
                    "passed": bool(err <= tol and lokr_effect > err)}
    return row


def run_mode(mode: str, opts: BenchOptions) -> dict:
    if mode == "offload_gc" and opts.device.type != "cuda":
        return {"mode": mode, "size": opts.size.name, "device": device_name(opts.device),
                "skipped": "offloading streams blocks from CPU memory to an accelerator; on a CPU there is "
                           "nothing to offload to (run with --device cuda)"}
    if mode == "sample_cfg":
        return run_sample_mode(opts)
    if mode in TRAIN_MODES:
        return run_train_mode(mode, opts)
    raise ValueError(f"unknown bench mode {mode!r}; choose from {', '.join(ALL_MODES)}")


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
            row.update(header)
            line = json.dumps(row, default=str)
            emit(line)
            if f:
                f.write(line + "\n")
                f.flush()
            rows.append(row)
            _release(opts.device)
    return rows
