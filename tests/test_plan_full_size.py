"""SimpleTuner's HiDream quickstart config dry-run at HiDream-I1's full size (trainer_core/plan/: no weights, no
GPU) in every supported combination of base precision (bf16, int8-quanto, int8-scaled, fp8-scaled), gradient
checkpointing on and off, and offload_blocks, plus a multi-aspect dataset at 1024 px: a full-size shape, dtype or
device error in any of them fails here instead of on a user's GPU. Every phase stays at or under the training
step (the load-phase fixes: an 8-bit base quantised block by block, text encoders one at a time, previews decoded
in tiles).

Kept cheap: one dry run per base precision and residency loads the transformer and sets the adapter up once, and
runs the step with checkpointing and then without it on that same model; each step runs once; the text encoders
and the VAE do not depend on the transformer's settings and run once per residency (the module fixture).
"""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from trainer_core.config import DatasetConfig, TrainConfig
from trainer_core.data import discover_dataset
from trainer_core.plan import TrainingPlanRun
from trainer_core.plan.phases import Geometry
from trainer_core.plan.planner import plan_of
from trainer_core.plan.report import MemoryPlan

STEP_GC, STEP_NOGC = "training step, checkpointing", "training step, no checkpointing"
# The smallest card (GB) docs/performance.md gives each configuration: (precision, offload) -> (with checkpointing,
# without it).
CARDS = {("no_change", False): (40, 80), ("no_change", True): (8, None), ("int8-quanto", False): (20, 80),
         ("int8-scaled", False): (20, 80), ("int8-scaled", True): (8, None), ("fp8-scaled", False): (20, 80),
         ("fp8-scaled", True): (8, None)}
PRECISIONS = ("no_change", "int8-quanto", "int8-scaled", "fp8-scaled")
COMBINATIONS = [(p, offload) for p in PRECISIONS for offload in (False, True) if not (offload and "quanto" in p)]


def quickstart(precision: str, offload: bool, datasets=None) -> TrainConfig:
    """The quickstart's config.json and multidatabackend.json (documentation/quickstart/HIDREAM.md) at their real
    sizes, its square-cropped camera dataset; the model folder is absent (the published sizes stand in)."""
    datasets = datasets or [DatasetConfig(instance_data_dir=Path("datasets/pseudo-camera-10k"), crop=True,
                                          crop_aspect="square", resolution=1024)]
    return TrainConfig(pretrained_model_name_or_path=Path("HiDream-ai/HiDream-I1-Full"), datasets=datasets,
                       base_model_precision=precision, text_encoder_3_precision="int8-quanto",
                       text_encoder_4_precision="int8-quanto", gradient_checkpointing=True, offload_blocks=offload,
                       optimizer="optimi-lion", learning_rate=4e-5, max_grad_norm=0.01, grad_clip_method="value",
                       lr_scheduler="constant_with_warmup", lr_warmup_steps=100, max_train_steps=10000,
                       validation_prompt="A photo-realistic image of a cat", validation_resolution="1024x1024",
                       validation_num_inference_steps=20, validation_guidance=3.0, offload_during_startup=True,
                       text_cache_write_batch_size=128, checkpoint_step_interval=500)


@pytest.fixture(scope="module")
def encoder_phases() -> dict:
    """The text-encoder and VAE phases, resident (one encoder at a time) and streamed (offload_blocks)."""
    found = {}
    for offload in (False, True):
        run = TrainingPlanRun(quickstart("int8-quanto" if not offload else "no_change", offload),
                              phases=("text embeddings", "latents"))
        run.run()
        assert not run.errors, run.errors
        found[offload] = {p.name: p for p in plan_of(run).phases}
    return found


@pytest.fixture(scope="module")
def multi_aspect(tmp_path_factory) -> Geometry:
    """The largest non-square bucket of a dataset of square, 4:3, 3:4, 3:2 and 16:9 pictures at 1024 px
    (pixel_area buckets, no crop, fitted under HiDream-I1's 4096 image tokens as training fits them: a 3:2 photo
    is 1248x848 = 4134 tokens before, 1248x832 after)."""
    folder = tmp_path_factory.mktemp("aspects")
    for i, size in enumerate(((1024, 1024), (1600, 1200), (1200, 1600), (1800, 1200), (1920, 1080))):
        Image.new("RGB", size, (40 * i, 90, 160)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a picture")
    found = discover_dataset(DatasetConfig(instance_data_dir=folder, id="aspects", resolution=1024),
                             max_tokens=4096)
    assert (1248, 832) in {s.bucket for s in found.samples}
    width, height = max((s.bucket for s in found.samples if s.bucket[0] != s.bucket[1]), key=lambda b: b[0] * b[1])
    return Geometry(width, height, 1, f"multi-aspect dataset: {len(found.samples)} buckets")


@pytest.mark.parametrize("precision,offload", COMBINATIONS,
                         ids=[f"{p}{'-offload' if o else ''}" for p, o in COMBINATIONS])
def test_the_quickstart_runs_at_full_size_and_no_phase_peaks_above_the_step(precision, offload, encoder_phases,
                                                                             multi_aspect):
    run = TrainingPlanRun(quickstart(precision, offload), steps=1, sampling_steps=1)
    with run.session():
        ran = run.run_phase("latents")  # first, as in a run: the VAE previews decode with comes from it
        ran = ran and run.run_phase("loading the transformer") and run.run_phase("model set-up")
        ran = ran and run.run_phase("training step", STEP_GC)
        if ran and not offload:  # the same model without checkpointing (offload_blocks needs it)
            run.trained.transformer.disable_gradient_checkpointing()
            ran = run.run_phase("training step", STEP_NOGC)
            run.trained.transformer.enable_gradient_checkpointing()
        if ran and precision == "no_change" and not offload:  # a non-square bucket: padded tokens and masks
            run.geometry = multi_aspect
            ran = run.run_phase("training step", "training step, multi-aspect")
        ran = ran and run.run_phase("validation") and run.run_phase("checkpoint")
    assert ran and not run.errors, run.errors
    phases = {p.name: p for p in plan_of(run).phases} | {f"{n} ({offload})": p
                                                          for n, p in encoder_phases[offload].items()}
    step = phases[STEP_GC].peak_gib
    above = {name: round(p.peak_gib, 2) for name, p in phases.items() if "training step" not in name and
             p.peak_gib > step}
    assert not above, f"phases above the training step's {step:.2f} GiB: {above}"
    if not offload:
        assert phases[STEP_NOGC].peak_gib > step  # without checkpointing every block's activations stay
    for variant, card in zip((STEP_GC, STEP_NOGC), CARDS[precision, offload]):
        others = [p for n, p in phases.items() if "training step" not in n or n == variant]
        if card is not None:
            assert MemoryPlan({}, others).smallest_card == card, (variant, MemoryPlan({}, others).needs_gib)


def test_comfyuis_fp8_file_loads_straight_into_fp8_at_full_size():
    """pretrained_transformer_model_name_or_path = ComfyUI's hidream_i1_full_fp8.safetensors (here its layout,
    read through load_transformer_file itself): its weights go to the GPU as stored, never as 16 bits."""
    config = quickstart("fp8-scaled", False)
    config.pretrained_transformer_model_name_or_path = Path("models/diffusion_models/hidream_i1_full_fp8.safetensors")
    run = TrainingPlanRun(config, phases=("loading the transformer",))
    run.run()
    assert not run.errors, run.errors
    load = plan_of(run).phase("loading the transformer")
    assert 15 < load.peak_gib < 17 and load.host_gib < 17  # the 8-bit model, in either memory, and nothing more
