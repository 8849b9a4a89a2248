"""`python -m trainer_core ...`: make-tiny-model, train, sample, demo, bench, plan."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .config import PRECISIONS, ConfigError, SamplingConfig

logger = logging.getLogger("trainer_core")


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from .hidream.tiny import build_drawing_model, build_tiny_model

    started = time.perf_counter()
    if args.random:
        path, kind = build_tiny_model(Path(args.dir), seed=args.seed), "random"
    else:
        path, kind = build_drawing_model(Path(args.dir)), "drawing"
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    print(f"tiny HiDream model ({kind}) written to {path} ({size / 2**20:.1f} MiB, "
          f"{time.perf_counter() - started:.1f} s)")
    return 0


def _cmd_pretrain_tiny_model(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .hidream.tiny import TransformerRecipe, VaeRecipe, pretrain_tiny_model
    from .hidream.tiny.drawing import WEIGHTS_DIR

    out = Path(args.out) if args.out else WEIGHTS_DIR
    vae, transformer = VaeRecipe(), TransformerRecipe()
    if args.quick:  # the same recipes, a handful of steps on a 64th of the corpus: checks that two runs agree
        vae = replace(vae, steps=args.quick)
        transformer = replace(transformer, steps=args.quick, warmup=1, corpus_stride=64)
    manifest = pretrain_tiny_model(out, vae, transformer, log=logger.info,
                                   progress_dir=Path(args.progress) if args.progress else None)
    print(f"weights written to {out / manifest['file']} ({manifest['bytes'] / 2**20:.2f} MiB, sha256 "
          f"{manifest['sha256']}) in {manifest['seconds']:.0f} s")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_train_config
    from .training import train

    config = load_train_config(Path(args.config))
    if args.max_train_steps:
        config.max_train_steps = args.max_train_steps
    if args.device:
        config.device = args.device
    if config.memory_mode == "auto":
        from .plan import resolve_memory_mode

        config = resolve_memory_mode(config)
    result = train(config)
    if result.lokr_path is None:  # a rank other than 0 of a multi-process run: rank 0 reports and writes
        return 0
    print(f"trained {result.steps_done} steps in {result.seconds:.1f} s; "
          f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}" if result.losses else "no steps run")
    print(f"LoKr: {result.lokr_path}")
    for image in result.validation_images:
        print(f"validation image: {image}")
    print(f"loss curve: {result.loss_curve_path}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from .adapters import load_lokr
    from .hidream import (load_frozen_transformer, load_text_encoders, load_vae, resolve_model_paths, sample_image,
                          scheduler_shift)
    from .speedups import apply_speedups
    from .util import resolve_device

    shift = args.shift or scheduler_shift(Path(args.model)) or SamplingConfig.shift
    settings = SamplingConfig(prompt=args.prompt, negative_prompt=args.negative_prompt, width=args.width,
                              height=args.height, num_inference_steps=args.steps, guidance=args.guidance,
                              shift=shift, seed=args.seed, scheduler=args.scheduler,
                              lokr_strength=args.strength)
    settings.validate()
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    paths = resolve_model_paths(Path(args.model), Path(args.llama) if args.llama else None,
                                require_transformer=args.transformer is None)
    encoders = load_text_encoders(paths, dtype=dtype, device=device)
    cond = encoders.encode([settings.prompt])
    uncond = encoders.encode([settings.negative_prompt])
    encoders.free()
    del encoders
    transformer = load_frozen_transformer(paths, args.base_model_precision, dtype, device,
                                          transformer_file=Path(args.transformer) if args.transformer else None)
    network = load_lokr(Path(args.lokr), transformer) if args.lokr else None
    apply_speedups(transformer, network)  # the unmerged (quantised-base) LoKr path
    vae = load_vae(paths, dtype=torch.float32, device=device)
    image, _ = sample_image(transformer, vae, cond, uncond, settings, network=network)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"image written to {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), steps=args.steps)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    import json

    from .plan import plan_bench_mode, plan_training
    from .speedups import Speedups

    if bool(args.config) == bool(args.bench_mode):
        raise ConfigError("plan needs --config config.json or --bench-mode MODE (one of them)")
    if args.bench_mode:
        plan = plan_bench_mode(args.bench_mode, Speedups(grouped_moe_dispatch=not args.no_grouped_moe_dispatch))
    else:
        from .config import load_train_config

        config = load_train_config(Path(args.config))
        gpu = args.gpu_memory if args.gpu_memory is not None else _gpu_total_gib()
        plan = plan_training(config, gpu, args.host_memory, suggest=not args.no_suggestions)
    print(json.dumps(plan.to_json(), indent=1) if args.json else plan.format())
    return 0 if plan.fits is not False else 1


def _gpu_total_gib():
    """The total memory of this machine's GPU, when it has one (what the plan is for, unless --gpu-memory)."""
    import torch

    return torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .bench import ALL_MODES, SIZES, BenchOptions, run_bench
    from .config import OPTIMIZERS
    from .speedups import Speedups

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()] if args.modes else list(ALL_MODES)
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown:
        raise ConfigError(f"unknown bench mode(s) {unknown}; choose from {', '.join(ALL_MODES)}")
    if args.optimizer.lower() not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {args.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda"
                                                                          else "fp32")]
    speedups = Speedups(fast_lokr=not args.no_fast_lokr, fast_moe_dispatch=not args.no_fast_moe_dispatch,
                        lean_int8_backward=not args.no_lean_int8_backward, compile_blocks=args.compile_blocks,
                        lean_rope=not args.no_lean_rope, batched_lokr=args.batched_lokr,
                        grouped_moe_dispatch=not args.no_grouped_moe_dispatch, cuda_graphs=args.cuda_graphs)
    variant_names = {n for v in (args.variants or "").split(",") for n in v.strip().split("+") if n}
    unknown = sorted(variant_names - set(Speedups.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"unknown speed-up(s) in --variants: {unknown}; choose from "
                          f"{', '.join(Speedups.__dataclass_fields__)}")
    compile_cache = Path(args.compile_cache or os.environ.get("HIDREAM_COMPILE_CACHE") or ".cache/torch-compile")
    opts = BenchOptions(size=SIZES[args.size], device=device, dtype=dtype, steps=args.steps, warmup=args.warmup,
                        reference_lokr=args.reference_lokr, speedups=speedups,
                        sequential=True if args.sequential else None, ablate=args.ablate,
                        profile=Path(args.profile) if args.profile else None, optimizer=args.optimizer,
                        deadline=time.monotonic() + args.time_budget if args.time_budget else None,
                        compile_cache=compile_cache, predict=not args.no_plan,
                        variants=tuple(v.strip() for v in (args.variants or "").split(",") if v.strip()))
    run_bench(modes, opts, Path(args.out) if args.out else None, emit=lambda line: print(line, flush=True))
    return 0


def _add_make_tiny_model_command(sub) -> None:
    p = sub.add_parser("make-tiny-model", help="write the tiny HiDream-I1 model folder (diffusers layout): the "
                                               "pretrained one that draws, or with --random seeded random weights")
    p.add_argument("dir", help="folder to create")
    p.add_argument("--random", action="store_true", help="random weights (the tests' model for shapes and speed)")
    p.add_argument("--seed", type=int, default=0, help="with --random: the weights' seed")
    p.set_defaults(func=_cmd_make_tiny_model)


def _add_pretrain_tiny_model_command(sub) -> None:
    p = sub.add_parser("pretrain-tiny-model", help="pretrain the drawing tiny HiDream's weights from its seed (one "
                                                   "CPU thread, deterministic; about two hours on 2 cores)")
    p.add_argument("--out", default=None, help="folder for the weights file and its manifest (default: the shipped "
                                              "ones, trainer_core/hidream/tiny/weights/, replaced)")
    p.add_argument("--progress", default=None, metavar="DIR", help="write sample grids here while it trains")
    p.add_argument("--quick", type=int, default=0, metavar="STEPS",
                   help="only STEPS steps of each stage, on every 64th corpus caption (to check that two runs write "
                        "identical files)")
    p.set_defaults(func=_cmd_pretrain_tiny_model)


def _add_train_command(sub) -> None:
    p = sub.add_parser("train", help="train a LoKr from a (SimpleTuner-style) config.json")
    p.add_argument("--config", required=True, help="config.json")
    p.add_argument("--max-train-steps", type=int, default=None, help="override max_train_steps")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.set_defaults(func=_cmd_train)


def _add_sample_command(sub) -> None:
    p = sub.add_parser("sample", help="draw an image, optionally with a LoKr merged in")
    p.add_argument("--model", required=True, help="HiDream model folder (diffusers layout)")
    p.add_argument("--llama", default=None, help="separate Llama-3.1-8B-Instruct folder")
    p.add_argument("--transformer", default=None,
                   help="the transformer from one .safetensors file instead (e.g. ComfyUI's "
                        "hidream_i1_full_fp8.safetensors; with --base-model-precision fp8-scaled it stays fp8)")
    p.add_argument("--lokr", default=None, help="LoKr .safetensors file")
    p.add_argument("--strength", type=float, default=1.0, help="LoKr strength")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--shift", type=float, default=None,
                   help="sampling shift (default: the model folder's scheduler config, 3.0 for HiDream-I1-Full)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--scheduler", choices=["unipc", "euler"], default="unipc")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--base-model-precision", default="no_change", choices=PRECISIONS,
                   help="no_change, fp8-scaled (8-bit matmuls; sm89+ GPUs or CPU), int8-scaled, int8-quanto, "
                        "int4-quanto, fp8-quanto (a quantised base runs the LoKr unmerged)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_cmd_sample)


def _add_demo_command(sub) -> None:
    p = sub.add_parser("demo", help="build the tiny model and a generated dataset, train a LoKr on the CPU")
    p.add_argument("--out", default="output/demo", help="output folder")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
    p.set_defaults(func=_cmd_demo)


def _add_bench_command(sub) -> None:
    p = sub.add_parser("bench", help="time training/sampling steps against the stock diffusers+LyCORIS step; "
                                     "one JSON line per mode")
    p.add_argument("--size", choices=["full", "small"], default="full",
                   help="full: HiDream-I1 at 1024 px (needs a large GPU); small: a reduced config for CPUs")
    p.add_argument("--device", default="cuda" if _cuda_available() else "cpu", help="cuda or cpu")
    p.add_argument("--modes", default=None, help="comma-separated: bf16_nogc,bf16_gc,sample_cfg,offload_gc,int8_gc, "
                                                 "the 8-bit bases fp8_gc,fp8_nogc,fp8_offload_gc,int8s_gc,"
                                                 "sample_cfg_fp8 (default: all)")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--reference-lokr", choices=["rebuild", "bypass"], default="rebuild",
                   help="the reference LoKr's forward: LyCORIS' default (rebuild: the naive stock step of the GPU "
                        "starting point) or its bypass mode (a stricter comparison)")
    p.add_argument("--no-fast-lokr", action="store_true", help="project step without the Kronecker LoKr path")
    p.add_argument("--no-fast-moe-dispatch", action="store_true", help="project step with diffusers' MoE dispatch")
    p.add_argument("--no-lean-int8-backward", action="store_true", help="project step with quanto's own backward")
    p.add_argument("--no-lean-rope", action="store_true", help="project step with diffusers' rotary embedding")
    p.add_argument("--compile", "--compile-blocks", dest="compile_blocks", action="store_true",
                   help="compile the project step: every transformer block as one graph, MoE included")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay the project's step (training) / transformer call (sampling) from a CUDA graph")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="inductor's cache of compiled code, kept between runs (default $HIDREAM_COMPILE_CACHE or "
                        ".cache/torch-compile)")
    p.add_argument("--variants", default=None, metavar="A[+B],...",
                   help="also time project variants with these speed-ups switched on, e.g. "
                        "compile_blocks,cuda_graphs,compile_blocks+cuda_graphs (each with its check, and its step "
                        "losses compared with the project's)")
    p.add_argument("--no-grouped-moe-dispatch", action="store_true",
                   help="project step with the sorted MoE dispatch (one host sync per layer)")
    p.add_argument("--optimizer", default="adamw",
                   help="the optimizer of both steps, by SimpleTuner's name (default adamw: torch's AdamW; the "
                        "HiDream quickstart uses optimi-lion)")
    p.add_argument("--batched-lokr", action="store_true",
                   help="project step with fast_lokr's copy-free form (W1 as a batched GEMM)")
    p.add_argument("--ablate", action="store_true",
                   help="also time the project step with each speed-up switched off in turn (what each is worth) "
                        "and the stock model without an adapter (the floor of adapter-side speed-ups)")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="profile two project steps per mode (torch.profiler): device-busy time and time by kind of "
                        "work go into the JSON row, torch's operator table is appended to FILE")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="past this many seconds start nothing new: later modes and ablations are skipped and a "
                        "configuration being timed stops after one timed step, so every mode still writes its "
                        "line (for a GPU lent for minutes; leave room for the step in flight)")
    p.add_argument("--no-plan", action="store_true",
                   help="leave out each row's predicted_peak_gib (the memory plan of the mode, made on the CPU "
                        "after the mode ran: `plan --bench-mode MODE`)")
    p.add_argument("--sequential", action="store_true",
                   help="time one configuration after the other (the CUDA default) instead of alternating steps")
    p.set_defaults(func=_cmd_bench)


def _add_plan_command(sub) -> None:
    p = sub.add_parser("plan", help="will it fit? dry-run a config at HiDream-I1's full size (no weights, no GPU): "
                                    "each phase's GPU and host memory, the verdict, what to change")
    p.add_argument("--config", default=None, help="config.json (SimpleTuner-style), as `train` takes it")
    p.add_argument("--bench-mode", default=None, metavar="MODE",
                   help="instead: the step `bench --size full` measures for MODE (bf16_nogc, bf16_gc, int8_gc, "
                        "offload_gc, sample_cfg, fp8_gc, ...); its peak_gib is what the benchmark reports")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                   help="the card's memory in GiB (default: this machine's GPU; none: the smallest card is named)")
    p.add_argument("--host-memory", type=float, default=None, metavar="GIB", help="host memory in GiB to check")
    p.add_argument("--json", action="store_true", help="one JSON object (peak_gib, phases, suggestions, ...)")
    p.add_argument("--no-suggestions", action="store_true", help="do not plan the changes that would make it fit")
    p.add_argument("--no-grouped-moe-dispatch", action="store_true",
                   help="with --bench-mode: the sorted MoE dispatch (what the benchmark ran before 2026-12)")
    p.set_defaults(func=_cmd_plan)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer_core",
                                     description="HiDream-I1 LoKr training and sampling")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_make_tiny_model_command(sub)
    _add_pretrain_tiny_model_command(sub)
    _add_train_command(sub)
    _add_sample_command(sub)
    _add_demo_command(sub)
    _add_bench_command(sub)
    _add_plan_command(sub)
    return parser


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
