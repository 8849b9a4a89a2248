"""`python -m trainer_core demo`: the whole path on a fresh machine, CPU only, in a minute or two.

Builds the tiny HiDream model, draws a small captioned dataset (coloured shapes), trains a LoKr on it, and writes the
LoKr, validation images (base model vs. LoKr) and a loss curve.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

from PIL import Image, ImageDraw

from .config import DatasetConfig, TrainConfig

logger = logging.getLogger(__name__)

COLOURS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 70), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square")
DEMO_RESOLUTION = 128


def draw_shape_image(shape: str, colour: str, background: str, size: int = DEMO_RESOLUTION) -> Image.Image:
    img = Image.new("RGB", (size, size), COLOURS[background])
    draw = ImageDraw.Draw(img)
    m = size // 4
    box = [m, m, size - m, size - m]
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return img


def write_demo_dataset(folder: Path) -> list[str]:
    """Eight images with same-stem .txt captions; returns the captions."""
    folder.mkdir(parents=True, exist_ok=True)
    captions = []
    pairs = [("red", "blue"), ("yellow", "green"), ("blue", "yellow"), ("green", "red")]
    for shape in SHAPES:
        for colour, background in pairs:
            caption = f"a {colour} {shape} on a {background} background"
            stem = f"{colour}_{shape}_on_{background}"
            draw_shape_image(shape, colour, background).save(folder / f"{stem}.png")
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


def demo_config(model_dir: Path, dataset_dir: Path, output_dir: Path, steps: int) -> TrainConfig:
    return TrainConfig(
        pretrained_model_name_or_path=model_dir,
        datasets=[DatasetConfig(instance_data_dir=dataset_dir, id="demo-shapes", caption_strategy="textfile",
                                resolution=DEMO_RESOLUTION, crop=True, crop_aspect="square", repeats=0)],
        output_dir=output_dir / "run",
        lycoris_config=write_demo_lycoris_config(output_dir / "lycoris_config.json"),
        max_train_steps=steps,
        learning_rate=1e-2,
        train_batch_size=2,
        mixed_precision="no",
        device="cpu",
        flow_schedule_shift=1.0,
        validation_prompt="a red circle on a blue background",
        validation_resolution=(DEMO_RESOLUTION, DEMO_RESOLUTION),
        validation_num_inference_steps=20,
        validation_guidance=3.0,
        validation_step_interval=max(1, steps // 2),
        seed=42,
    )


def run_demo(out: Path, steps: Optional[int] = None) -> Path:
    from .tiny_model import build_tiny_model
    from .training import train

    import torch

    # The tiny model's matmuls are microseconds long; extra threads cost more in hand-offs than they save.
    torch.set_num_threads(1)
    started = time.perf_counter()
    out = Path(out).resolve()
    model_dir = out / "tiny-hidream"
    if not (model_dir / "model_index.json").is_file():
        build_tiny_model(model_dir)
    dataset_dir = out / "dataset"
    write_demo_dataset(dataset_dir)
    config = demo_config(model_dir, dataset_dir, out, steps or 300)
    result = train(config)
    seconds = time.perf_counter() - started
    summary = {"seconds": round(seconds, 1), "steps": result.steps_done,
               "loss_first_10": sum(result.losses[:10]) / max(1, len(result.losses[:10])),
               "loss_last_10": sum(result.losses[-10:]) / max(1, len(result.losses[-10:])),
               "lokr": str(result.lokr_path), "loss_curve": str(result.loss_curve_path),
               "validation_images": [str(p) for p in result.validation_images],
               "text_cache": str(result.text_cache), "latent_cache": str(result.latent_cache)}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print()
    print(f"demo finished in {seconds:.0f} s: {result.steps_done} steps, mean loss of the first 10 steps "
          f"{summary['loss_first_10']:.4f}, of the last 10 {summary['loss_last_10']:.4f}")
    print(f"  LoKr:        {result.lokr_path}")
    print(f"  loss curve:  {result.loss_curve_path}")
    for p in result.validation_images:
        print(f"  validation:  {p}")
    print(f"everything is in {out}")
    return out
