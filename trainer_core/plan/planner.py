"""Plans: a configuration's (every phase of a run), the benchmark's modes (the step it measures), and what to
change when a run does not fit.

    plan_training(config, gpu_memory_gib=24)      -> MemoryPlan (phases, verdict, ranked changes)
    plan_bench_mode("bf16_gc")                    -> MemoryPlan of the step `bench --size full` times for that mode
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Optional

from ..config.schema import SCALED_PRECISIONS, ConfigError, TrainConfig
from . import speed
from .phases import PHASES, STEP, TrainingPlanRun
from .report import MemoryPlan, Suggestion, phase_plan

# The phases a change of the transformer's settings affects (the text and latent phases do not see it).
TRANSFORMER_PHASES = ("loading the transformer", "model set-up", STEP, "validation", "checkpoint")
# The settings only the text phase sees.
TEXT_SETTINGS = {"text_encoder_3_precision", "text_encoder_4_precision", "text_cache_write_batch_size"}


def plan_training(config: TrainConfig, gpu_memory_gib: Optional[float] = None,
                  host_memory_gib: Optional[float] = None, suggest: bool = True, phases: tuple = PHASES,
                  capability: tuple[int, int] = (9, 0), transformer=None) -> MemoryPlan:
    """Dry-run `config`'s phases at full size; with `gpu_memory_gib`, say whether it fits and, when it does not
    (and `suggest`), which changes make it fit, fastest first. `transformer`: a base the caller holds (its size,
    precision and dtype are planned for)."""
    started = time.perf_counter()
    run = TrainingPlanRun(config, capability, phases=phases, transformer=transformer)
    run.run()
    plan = plan_of(run, gpu_memory_gib, host_memory_gib)
    if suggest and plan.fits is False and not plan.errors and transformer is None:
        plan.suggestions = suggestions(config, plan, capability)
    plan.seconds = time.perf_counter() - started
    return plan


def plan_of(run: TrainingPlanRun, gpu_memory_gib: Optional[float] = None,
            host_memory_gib: Optional[float] = None) -> MemoryPlan:
    """The MemoryPlan of a TrainingPlanRun that ran."""
    config, geometry = run.config, run.geometry
    phases = []
    for name in run.dry.phases:
        phase = phase_plan(run.dry, name, run.notes.get(name, ""))
        phase.error = run.errors.get(name)
        phases.append(phase)
    settings = {"base_model_precision": config.base_model_precision,
                "gradient_checkpointing": config.gradient_checkpointing, "offload_blocks": config.offload_blocks,
                "bucket": f"{geometry.width}x{geometry.height}", "train_batch_size": geometry.batch,
                "image_tokens": geometry.tokens(run.max_image_tokens()), "optimizer": config.optimizer,
                "text_encoder_4_precision": config.text_encoder_4_precision}
    notes = [f"{name} not modelled: {why}" for name, why in _unmodelled(config)]
    max_seq = run.max_image_tokens()
    if geometry.width != geometry.height and (geometry.width // 16) * (geometry.height // 16) > max_seq:
        notes.append(f"the bucket {geometry.width}x{geometry.height} has {geometry.tokens(max_seq)} image tokens; the "
                     f"transformer takes at most {max_seq} (HiDream-I1: 1024x1024), so its step fails")
    return MemoryPlan(settings, phases, gpu_memory_gib, host_memory_gib, notes=notes)


def _unmodelled(config: TrainConfig) -> list[tuple[str, str]]:
    found = []
    if config.compile_blocks:
        found.append(("compile_blocks", "the dry run runs the blocks eagerly (compiled, the H100 measured +3 GiB "
                                        "at 1024 px without checkpointing: it keeps W1 X the eager backward "
                                        "recomputes)"))
    if config.cuda_graphs:
        found.append(("cuda_graphs", "a captured step keeps its own memory pool; the dry run runs it plainly"))
    return found


# --------------------------------------------------------------------------------------------- what to change


def candidate_changes(config: TrainConfig, plan: MemoryPlan) -> list[tuple[str, dict, bool]]:
    """(description, TrainConfig fields to change, whether it changes what is trained) for every change that
    could bring `plan`'s peak down, the memory settings first."""
    found = []
    base = config.base_model_precision in ("no_change", "bf16", "fp32")
    if not config.gradient_checkpointing:
        found.append(("gradient_checkpointing: true", {"gradient_checkpointing": True}, False))
    if not config.offload_blocks and config.base_model_precision not in ("int8-quanto", "int4-quanto",
                                                                          "int2-quanto", "fp8-quanto"):
        found.append(("offload_blocks: true (+ gradient_checkpointing)",
                      {"offload_blocks": True, "gradient_checkpointing": True}, False))
    if base:
        for precision in ("fp8-scaled", "int8-scaled", "int8-quanto"):
            found.append((f"base_model_precision: {precision}", {"base_model_precision": precision}, True))
    elif not config.offload_blocks and config.base_model_precision not in SCALED_PRECISIONS:
        found.append(("base_model_precision: fp8-scaled, offload_blocks: true (+ gradient_checkpointing)",
                      {"base_model_precision": "fp8-scaled", "offload_blocks": True,
                       "gradient_checkpointing": True}, True))  # a quanto base cannot be offloaded
    if _text_too_big(plan):
        if config.text_encoder_4_precision == "no_change":
            found.append(("text_encoder_3/4_precision: int8-quanto", {"text_encoder_3_precision": "int8-quanto",
                                                                     "text_encoder_4_precision": "int8-quanto"},
                          True))
        if config.text_cache_write_batch_size > 8:
            found.append(("text_cache_write_batch_size: 8", {"text_cache_write_batch_size": 8}, False))
    if config.train_batch_size > 1:
        found.append((f"train_batch_size: 1 (gradient_accumulation_steps: "
                      f"{config.gradient_accumulation_steps * config.train_batch_size})",
                      {"train_batch_size": 1,
                       "gradient_accumulation_steps": config.gradient_accumulation_steps * config.train_batch_size},
                      True))
    largest = max(d.resolution for d in config.datasets)
    for resolution in (768, 512):
        if resolution < largest:
            datasets = [replace(d, resolution=min(d.resolution, resolution)) for d in config.datasets]
            found.append((f"resolution: {resolution} (with square crops: a non-square bucket is padded to 4096 "
                          "image tokens at any resolution)",
                          {"datasets": datasets}, True))
    return found


def suggestions(config: TrainConfig, plan: MemoryPlan, capability: tuple[int, int] = (9, 0)) -> list[Suggestion]:
    """Each candidate change planned (the phases it affects; the others keep `plan`'s figures), ranked: those
    that fit first, then by measured speed cost, then by predicted need. When the text phase is too big as well,
    each change of the transformer's settings comes with the first change that makes the text phase fit (those
    that do not change what is trained first): neither fits alone."""
    before = speed.step_key(config.base_model_precision, config.gradient_checkpointing, config.offload_blocks)
    planned = []
    for change, settings, changes_training in candidate_changes(config, plan):
        affected = ("text embeddings",) if settings.keys() & TEXT_SETTINGS else TRANSFORMER_PHASES
        if settings.get("offload_blocks"):  # the text encoders are streamed a block at a time too
            affected = ("text embeddings",) + affected
        affected = tuple(name for name in affected if plan.phase(name) is not None)  # what the plan itself ran
        try:
            run = TrainingPlanRun(replace(config, **settings), capability, steps=1, phases=affected)
            run.run()
        except ConfigError:
            continue  # not a valid combination (e.g. offload with a quanto base)
        planned.append((change, settings, changes_training, plan_of(run).phases))
    text_fix = None
    if _text_too_big(plan):
        text_fix = next((p for p in sorted(planned, key=lambda p: p[2])  # (stable: the candidates' order after)
                         if p[1].keys() & TEXT_SETTINGS and all(phase.needs_gib <= plan.gpu_memory_gib
                                                                 for phase in p[3])), None)
    found = []
    for change, settings, changes_training, phases in planned:
        if text_fix is not None and not any(p.name == "text embeddings" for p in phases):
            change, settings = f"{change}; {text_fix[0]}", {**settings, **text_fix[1]}
            changes_training, phases = changes_training or text_fix[2], phases + text_fix[3]
        changed = replace(config, **settings)
        unchanged = [p for p in plan.phases if p.name not in {o.name for o in phases}]
        candidate = MemoryPlan(plan.settings, phases + unchanged, plan.gpu_memory_gib, plan.host_memory_gib)
        after = speed.step_key(changed.base_model_precision, changed.gradient_checkpointing, changed.offload_blocks)
        ratio = speed.relative_cost(before, after) if after != before else None
        found.append(Suggestion(change, _jsonable(settings), round(candidate.peak_gib, 2),
                                round(candidate.needs_gib, 2), candidate.fits, ratio,
                                _speed_words(ratio, before, after, settings), changes_training))
    return sorted(found, key=lambda s: (s.fits is not True, s.relative_step_time is None,
                                        s.relative_step_time or 0.0, s.needs_gib))


def _text_too_big(plan: MemoryPlan) -> bool:
    text = plan.phase("text embeddings")
    return text is not None and plan.gpu_memory_gib is not None and text.needs_gib > plan.gpu_memory_gib


def _speed_words(ratio: Optional[float], before: tuple, after: tuple, settings: dict) -> str:
    if ratio is not None:
        return f"step x{ratio:.2f} ({speed.SOURCE})"
    if not settings.keys() - TEXT_SETTINGS:
        return "the steps unchanged (the captions are encoded in more, smaller calls, once)"
    if after == before:
        return "step time: fewer image tokens or samples per step (not measured)"
    if after[0] in SCALED_PRECISIONS:
        return "step time not measured on a GPU yet (8-bit matmuls)"
    return "step time not measured"


def _jsonable(settings: dict) -> dict:
    out = {}
    for key, value in settings.items():
        if key == "datasets":
            out["resolution"] = sorted({d.resolution for d in value})
        else:
            out[key] = value
    return out
