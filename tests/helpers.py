"""Small builders shared by tests: captioned image folders and training configs on the tiny model."""
from __future__ import annotations

from pathlib import Path

from trainer_core.config import DatasetConfig, TrainConfig
from trainer_core.demo import draw_shape_image, write_demo_lycoris_config

# The tests' LoKr: the demo's (SimpleTuner's feed-forward preset at factor 2, sized for the tiny model's layers).
write_lycoris_config = write_demo_lycoris_config


def write_shapes_dataset(folder: Path, items: list[tuple[str, str, str]], size: int = 64) -> Path:
    """(shape, colour, background) triples -> PNGs with same-stem .txt captions."""
    folder.mkdir(parents=True, exist_ok=True)
    for shape, colour, background in items:
        stem = f"{colour}_{shape}_on_{background}"
        draw_shape_image(shape, colour, background, size=size).save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(f"a {colour} {shape} on a {background} background")
    return folder


def tiny_train_config(model_dir: Path, dataset_dir: Path, output_dir: Path, **overrides) -> TrainConfig:
    dataset_kwargs = {k[len("dataset_"):]: overrides.pop(k) for k in list(overrides) if k.startswith("dataset_")}
    dataset = DatasetConfig(**{"instance_data_dir": dataset_dir, "id": "shapes", "caption_strategy": "textfile",
                               "resolution": 64, "crop": True, "crop_aspect": "square", **dataset_kwargs})
    values = dict(pretrained_model_name_or_path=model_dir, datasets=[dataset], output_dir=output_dir,
                  max_train_steps=4, learning_rate=1e-3, train_batch_size=1, mixed_precision="no", device="cpu",
                  validation_prompt=None, validation_resolution=(64, 64), validation_num_inference_steps=4,
                  seed=7)
    values.update(overrides)
    return TrainConfig(**values)
