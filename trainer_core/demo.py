"""`python -m trainer_core demo`: the whole path on a fresh machine, CPU only, in about two minutes.

Builds the drawing tiny HiDream (pretrained on flat shapes of eight colours; docs/tiny-model.md), draws a small
captioned dataset of a concept that model has never seen - a "zorb", a pink ring: a colour and a shape that were
kept out of its pretraining - and trains a LoKr that teaches it the word. Validation images of "a zorb on ... "
at step 0 (the base model, which does not know the word), half-way and at the end show the concept appear;
`before_after.png` puts them side by side, next to the concept drawn exactly.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

from PIL import Image

from .config import DatasetConfig, TrainConfig

logger = logging.getLogger(__name__)

DEMO_RESOLUTION = 128  # the drawing model's own resolution (8 x 8 image tokens)
CONCEPT_WORD = "zorb"
CONCEPT_SHAPE, CONCEPT_COLOUR = "ring", "pink"  # neither is in the drawing model's pretraining corpus
# Where the concept stands in the demo's pictures: (background, position), one picture each.
CONCEPT_SCENES = (("blue", "centre"), ("yellow", "centre"), ("green", "centre"), ("black", "centre"),
                  ("white", "left"), ("purple", "right"), ("orange", "top"), ("red", "bottom"))
# The validation prompts' scenes, (background, position): "validation" is the run's validation_prompt (a place the
# concept was shown in), the others its prompt library (a background and place it was never shown in).
VALIDATION_SCENES = {"validation": ("blue", "centre"), "zorb_unseen_place": ("yellow", "bottom")}


def draw_shape_image(shape: str, colour: str, background: str, size: int = DEMO_RESOLUTION) -> Image.Image:
    """A centred flat-colour shape on a background, exactly as the drawing model's corpus draws it."""
    from .hidream.tiny import corpus

    return corpus.CorpusItem(colour, shape, background, "centre").draw(size)


def concept_caption(background: str, position: str = "centre") -> str:
    from .hidream.tiny import corpus

    return f"a {CONCEPT_WORD} on a {background} background{corpus.POSITION_PHRASES[position]}"


def concept_scene(background: str, position: str = "centre"):
    """The concept (a pink ring) on a named background at a named place, as a corpus Scene."""
    from .hidream.tiny import corpus

    return corpus.Scene(shape=CONCEPT_SHAPE, colour=corpus.CONCEPT_COLOURS[CONCEPT_COLOUR],
                        background=corpus.PALETTE[background], centre=corpus.POSITION_CENTRES[position])


def draw_concept(background: str, position: str = "centre", size: int = DEMO_RESOLUTION) -> Image.Image:
    from .hidream.tiny import corpus

    return corpus.draw_scene(concept_scene(background, position), size)


@dataclass(frozen=True)
class ConceptCoverage:
    """How much of the concept a picture shows, as shares of pixels (0-1):

    ring     the ring's pixels nearer to the concept's colour than to the named background's: the ring as drawn
             (a shade between pink and the background, e.g. pink over blue turning violet, counts for the nearer)
    pink     the ring's pixels in the concept's colour itself (within 60 levels per channel of pink): the stricter
             measure, which the base model scores about 0 on
    hole     the hole's pixels (the disk inside the ring) nearer to the background's colour than to pink: a ring
             rather than a pink disk or patch
    picture  the whole picture in the concept's colour (a LoKr that paints everything pink scores high here)
    """

    ring: float
    pink: float
    hole: float
    picture: float


def concept_coverage(image: Image.Image, background: str, position: str = "centre") -> ConceptCoverage:
    """Score `image` as a picture of the concept on `background` at `position` (see ConceptCoverage)."""
    import numpy as np

    from .hidream.tiny.scoring import mask_of, nearer_to_first

    scene = concept_scene(background, position)
    values = np.asarray(image.convert("RGB"), dtype=np.float32)
    size = values.shape[0]
    in_colour = np.abs(values - np.array(scene.colour, dtype=np.float32)).max(axis=-1) < 60
    nearer_pink = nearer_to_first(values, scene.colour, scene.background)
    ring = mask_of(scene, size)
    hole = mask_of(replace(scene, shape="circle"), size) & ~ring
    return ConceptCoverage(ring=float(nearer_pink[ring].mean()), pink=float(in_colour[ring].mean()),
                           hole=float((~nearer_pink[hole]).mean()), picture=float(in_colour.mean()))


def write_demo_dataset(folder: Path) -> list[str]:
    """The concept's pictures with same-stem .txt captions (one per CONCEPT_SCENES entry); returns the captions."""
    folder.mkdir(parents=True, exist_ok=True)
    captions = []
    for background, position in CONCEPT_SCENES:
        stem = f"{CONCEPT_WORD}_on_{background}_{position}"
        draw_concept(background, position).save(folder / f"{stem}.png")
        caption = concept_caption(background, position)
        (folder / f"{stem}.txt").write_text(caption, encoding="utf-8")
        captions.append(caption)
    return captions


def write_demo_lycoris_config(path: Path) -> Path:
    """SimpleTuner's feed-forward LoKr preset (attention + ff_t + shared experts) at factor 2.

    The quickstart uses factor 16 on 2560-wide layers (W2 is 160x160); on the tiny model's 64-wide layers factor 16
    would leave W2 at 16x16, too little to learn anything in a short demo, so the factor is scaled down.
    """
    patterns = ("double_stream_blocks.*.block.attn*", "double_stream_blocks.*.block.ff_t*",
                "double_stream_blocks.*.block.ff_i.shared_experts*", "single_stream_blocks.*.block.attn*",
                "single_stream_blocks.*.block.ff_i.shared_experts*")
    config = {"algo": "lokr", "multiplier": 1.0, "linear_dim": 16384, "linear_alpha": 1, "full_matrix": True,
              "use_scalar": False, "factor": 2,
              "apply_preset": {"name_algo_map": {p: {"factor": 2} for p in patterns}, "use_fnmatch": True}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))
    return path


DEMO_STEPS = 400
DEMO_LEARNING_RATE = 6e-3


def demo_config(model_dir: Path, dataset_dir: Path, output_dir: Path, steps: int) -> TrainConfig:
    library = output_dir / "prompt_library.json"
    library.write_text(json.dumps({name: concept_caption(*scene) for name, scene in VALIDATION_SCENES.items()
                                   if name != "validation"}, indent=1))
    return TrainConfig(
        pretrained_model_name_or_path=model_dir,
        datasets=[DatasetConfig(instance_data_dir=dataset_dir, id="demo-zorb", caption_strategy="textfile",
                                resolution=DEMO_RESOLUTION, crop=True, crop_aspect="square", repeats=0)],
        output_dir=output_dir / "run",
        lycoris_config=write_demo_lycoris_config(output_dir / "lycoris_config.json"),
        max_train_steps=steps,
        learning_rate=DEMO_LEARNING_RATE,
        train_batch_size=2,
        mixed_precision="no",
        device="cpu",
        validation_prompt=concept_caption(*VALIDATION_SCENES["validation"]),
        user_prompt_library=library,
        validation_resolution=(DEMO_RESOLUTION, DEMO_RESOLUTION),
        validation_num_inference_steps=20,
        validation_guidance=4.0,
        validation_step_interval=max(1, steps // 2),
        seed=42,
    )


CELL = 192  # px per picture in before_after.png (the 128 px samples, enlarged)


def before_after(step_folders: list[Path], out: Path) -> Path:
    """One row per validation prompt: the concept drawn exactly, then the sample at every validation step (the
    first is the base model), labelled, enlarged so the tiny pictures can be judged by eye."""
    from PIL import ImageDraw, ImageFont

    from .training.validation import validation_folder_step, validation_image_path

    font = ImageFont.load_default(size=15)
    header, caption_h, pad = 24, 22, 8
    columns = 1 + len(step_folders)
    width = pad + columns * (CELL + pad)
    height = header + len(VALIDATION_SCENES) * (caption_h + CELL + pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    titles = ["the prompt, drawn exactly"] + [f"step {validation_folder_step(folder)}" for folder in step_folders]
    titles[1] += " (base model)"
    for column, title in enumerate(titles):
        draw.text((pad + column * (CELL + pad), 4), title, fill=(0, 0, 0), font=font)
    for row, (name, (background, position)) in enumerate(VALIDATION_SCENES.items()):
        top = header + row * (caption_h + CELL + pad)
        draw.text((pad, top + 2), f'"{concept_caption(background, position)}"', fill=(60, 60, 60), font=font)
        pictures = [draw_concept(background, position)]
        pictures += [Image.open(validation_image_path(folder, name, DEMO_RESOLUTION, DEMO_RESOLUTION))
                     for folder in step_folders]
        for column, picture in enumerate(pictures):
            cell = picture.convert("RGB").resize((CELL, CELL), Image.Resampling.NEAREST)
            canvas.paste(cell, (pad + column * (CELL + pad), top + caption_h))
    canvas.save(out)
    return out


def learning_curve(step_folders: list[Path]) -> dict[str, dict[int, dict[str, float]]]:
    """Validation prompt name -> {step: its picture's ConceptCoverage as a dict}: the concept appearing, in
    figures."""
    from .training.validation import validation_folder_step, validation_image_path

    def coverage(folder: Path, name: str) -> dict[str, float]:
        picture = Image.open(validation_image_path(folder, name, DEMO_RESOLUTION, DEMO_RESOLUTION))
        return {key: round(value, 3) for key, value in asdict(concept_coverage(picture, *VALIDATION_SCENES[name]))
                .items()}

    return {name: {validation_folder_step(folder): coverage(folder, name) for folder in step_folders}
            for name in VALIDATION_SCENES}


def run_demo(out: Path, steps: Optional[int] = None) -> Path:
    import torch

    from .hidream.tiny import build_drawing_model
    from .training import train
    from .util import quiet_libraries

    # The tiny model's matmuls are microseconds long; extra threads cost more in hand-offs than they save.
    torch.set_num_threads(1)
    started = time.perf_counter()
    out = Path(out).resolve()
    # A first run's console shows the demo's own lines, not the libraries' progress bars and INFO chatter.
    with quiet_libraries():
        model_dir = build_drawing_model(out / "tiny-hidream")
        dataset_dir = out / "dataset"
        write_demo_dataset(dataset_dir)
        config = demo_config(model_dir, dataset_dir, out, steps or DEMO_STEPS)
        result = train(config)
    grids = [p for p in result.validation_images if p.name == "grid.png"]
    step_folders = [g.parent for g in grids]
    comparison = before_after(step_folders, out / "before_after.png") if len(grids) >= 2 else None
    coverage = learning_curve(step_folders)
    seconds = time.perf_counter() - started
    summary = {"seconds": round(seconds, 1), "steps": result.steps_done,
               "loss_first_10": sum(result.losses[:10]) / max(1, len(result.losses[:10])),
               "loss_last_10": sum(result.losses[-10:]) / max(1, len(result.losses[-10:])),
               "lokr": str(result.lokr_path), "loss_curve": str(result.loss_curve_path),
               "before_after": str(comparison) if comparison else None, "concept_coverage": coverage,
               "validation_images": [str(p) for p in result.validation_images],
               "text_cache": str(result.text_cache), "latent_cache": str(result.latent_cache)}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print()
    print(f"demo finished in {seconds:.0f} s: {result.steps_done} steps taught the tiny HiDream the word "
          f"'{CONCEPT_WORD}' (a {CONCEPT_COLOUR} {CONCEPT_SHAPE}); mean loss of the first 10 steps "
          f"{summary['loss_first_10']:.4f}, of the last 10 {summary['loss_last_10']:.4f}")
    for name, by_step in coverage.items():
        print(f"  '{name}': the {CONCEPT_SHAPE} drawn in {CONCEPT_COLOUR} / in {CONCEPT_COLOUR} itself / background "
              f"in its hole: " + ", ".join(f"step {step} {c['ring']:.0%} / {c['pink']:.0%} / {c['hole']:.0%}"
                                          for step, c in by_step.items()))
    if comparison:
        print(f"  before / after: {comparison}")
    for grid in grids:
        print(f"  validation:     {grid}")
    print(f"  LoKr:           {result.lokr_path}")
    print(f"  loss curve:     {result.loss_curve_path}")
    print(f"everything is in {out}")
    return out
