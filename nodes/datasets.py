"""Dataset nodes: image folder -> HIDREAM_DATASET, several datasets -> one, IMAGE batch + captions -> dataset."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..trainer_core.config import ConfigError, DatasetConfig
from .compat import io
from .paths import DEMO_DATASET_NAME, cache_dir, image_folder, pack_output_dir
from .types import CATEGORY, DatasetType, TrainingData

CAPTION_STRATEGIES = ["textfile", "filename", "instanceprompt"]


def dataset_default(name: str):
    """DatasetConfig's default of a key: the dataset nodes' widgets start where a multidatabackend.json entry
    without that key starts."""
    return DatasetConfig.__dataclass_fields__[name].default


def folder_fingerprint(folder: Path) -> str:
    """Names, sizes and modification times of every file under `folder`: changes when an image or caption does,
    so ComfyUI re-runs the dataset node (and everything after it) instead of reusing a cached training."""
    h = hashlib.sha256()
    if folder.is_dir():
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            for name in sorted(files):
                path = Path(root) / name
                stat = path.stat()
                h.update(f"{path.relative_to(folder)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _discovered(config: DatasetConfig) -> DatasetConfig:
    from ..trainer_core.data import discover_dataset

    discover_dataset(config)  # raises ConfigError naming the problem (missing folder, no images, no captions)
    return config


class ImageDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HiDreamLoKrImageDataset",
            display_name="HiDream LoKr image dataset",
            category=f"{CATEGORY}/dataset",
            description="A folder of training images with their captions (same-name .txt files, the file names, or "
                        "one instance prompt), bucketed by aspect ratio at the chosen resolution. Checks the folder "
                        "now, so problems show before any model loads.",
            inputs=[
                io.String.Input("folder", default=DEMO_DATASET_NAME,
                                tooltip="Folder of images (.png, .jpg, .webp): an absolute path or a folder under "
                                        f"ComfyUI's input directory. '{DEMO_DATASET_NAME}' is written there on "
                                        "first use (8 captioned pictures of the demo's new concept, a 'zorb')."),
                io.Combo.Input("caption_strategy", display_name="captions", options=CAPTION_STRATEGIES,
                               default=dataset_default("caption_strategy"),
                               tooltip="caption_strategy: where captions come from. textfile: the image's "
                                       "same-name .txt; filename: the file name; instanceprompt: the instance "
                                       "prompt below for every image."),
                io.String.Input("instance_prompt", display_name="instance text", default="",
                                tooltip="instance_prompt: the caption of every image when caption_strategy is "
                                        "instanceprompt."),
                io.Boolean.Input("caption_fallback_to_filename", display_name="name fallback",
                                 default=dataset_default("caption_fallback_to_filename"),
                                 tooltip="caption_fallback_to_filename: with textfile captions, use the file name "
                                         "for images that have no .txt (otherwise a missing caption is an "
                                         "error)."),
                io.Int.Input("repeats", default=dataset_default("repeats"), min=0, max=10000,
                             tooltip="Extra times each image is seen per epoch (0 = once, N = N + 1 times), as in "
                                     "SimpleTuner."),
                io.Int.Input("resolution", default=dataset_default("resolution"), min=64, max=4096, step=16,
                             tooltip="Training resolution in pixels (a side length: bucket area = resolution², "
                                     "aspect ratio kept). Buckets over the model's image-token limit (1024x1024 "
                                     "px in area for HiDream-I1) are fitted under it; a resolution whose square "
                                     "is over it is refused."),
                io.Boolean.Input("crop", default=dataset_default("crop"),
                                 tooltip="Crop images to the bucket instead of resizing the whole image into it."),
                io.Combo.Input("crop_style", display_name="crop style", options=["center", "random"],
                               default=dataset_default("crop_style"),
                               tooltip="crop_style: where the crop is taken (random is fixed per image and seed)."),
                io.Combo.Input("crop_aspect", display_name="crop aspect", options=["square", "preserve"],
                               default=dataset_default("crop_aspect"),
                               tooltip="crop_aspect: square crops to a square; preserve keeps each image's "
                                       "aspect bucket."),
                io.Boolean.Input("is_regularisation_data", display_name="regularisation",
                                 default=dataset_default("is_regularisation_data"),
                                 tooltip="is_regularisation_data, SimpleTuner's prior preservation for LoRA / "
                                         "LyCORIS: these images are not learned as they are. For each of them "
                                         "the LoKr is trained towards what the base model, LoKr off, predicts "
                                         "for the same noise and caption, so it keeps drawing such captions as "
                                         "before (e.g. other people, next to a dataset of one person)."),
            ],
            outputs=[DatasetType.Output(display_name="dataset", tooltip="Training images and captions")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder: str, **_) -> str:
        try:
            return folder_fingerprint(image_folder(folder))
        except ConfigError:
            return ""

    @classmethod
    def execute(cls, folder: str, caption_strategy: str, instance_prompt: str, caption_fallback_to_filename: bool,
                repeats: int, resolution: int, crop: bool, crop_style: str, crop_aspect: str,
                is_regularisation_data: bool) -> io.NodeOutput:
        path = image_folder(folder)
        config = _discovered(DatasetConfig(
            instance_data_dir=path, id=path.name or "dataset", caption_strategy=caption_strategy,
            instance_prompt=instance_prompt or None, caption_fallback_to_filename=caption_fallback_to_filename,
            repeats=repeats, is_regularisation_data=is_regularisation_data, resolution=resolution,
            crop=crop, crop_style=crop_style, crop_aspect=crop_aspect))
        return io.NodeOutput(TrainingData(datasets=(config,), cache_dir=cache_dir(),
                                          fingerprint=folder_fingerprint(path)))


class CombineDatasets(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HiDreamLoKrCombineDatasets",
            display_name="HiDream LoKr combine datasets",
            category=f"{CATEGORY}/dataset",
            description="Trains on several datasets at once (each keeps its own captions, repeats and resolution).",
            inputs=[DatasetType.Input("dataset_1", tooltip="First dataset."),
                    DatasetType.Input("dataset_2", tooltip="Second dataset."),
                    DatasetType.Input("dataset_3", optional=True, tooltip="Optional third dataset."),
                    DatasetType.Input("dataset_4", optional=True, tooltip="Optional fourth dataset.")],
            outputs=[DatasetType.Output(display_name="dataset", tooltip="All the images of the inputs")],
        )

    @classmethod
    def execute(cls, dataset_1: TrainingData, dataset_2: TrainingData, dataset_3: TrainingData = None,
                dataset_4: TrainingData = None) -> io.NodeOutput:
        parts = [d for d in (dataset_1, dataset_2, dataset_3, dataset_4) if d is not None]
        configs, ids = [], set()
        for part in parts:
            for config in part.datasets:
                unique, n = config.id, 2
                while unique in ids:  # two folders with the same name must stay two datasets
                    unique, n = f"{config.id}_{n}", n + 1
                ids.add(unique)
                configs.append(DatasetConfig(**{**config.__dict__, "id": unique}))
        fingerprint = hashlib.sha256("|".join(p.fingerprint for p in parts).encode()).hexdigest()
        return io.NodeOutput(TrainingData(datasets=tuple(configs), cache_dir=parts[0].cache_dir,
                                          fingerprint=fingerprint))


def _image_batch_to_folder(images: torch.Tensor, captions: list[str]) -> Path:
    """Write an IMAGE batch (B, H, W, C) in [0, 1] with one caption each into a content-addressed folder."""
    arrays = [np.clip(255.0 * img.cpu().numpy(), 0, 255).astype(np.uint8) for img in images]
    h = hashlib.sha256()
    for array, caption in zip(arrays, captions):
        h.update(array.tobytes())
        h.update(caption.encode())
    folder = pack_output_dir() / "image_batches" / h.hexdigest()[:16]
    if not folder.is_dir():
        tmp = folder.with_name(folder.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for i, (array, caption) in enumerate(zip(arrays, captions)):
            Image.fromarray(array).save(tmp / f"{i:05d}.png")
            (tmp / f"{i:05d}.txt").write_text(caption, encoding="utf-8")
        tmp.replace(folder)
    return folder


class DatasetFromImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HiDreamLoKrDatasetFromImages",
            display_name="HiDream LoKr dataset from images",
            category=f"{CATEGORY}/dataset",
            description="A dataset from an IMAGE batch already in the graph plus one caption per line, for quick "
                        "experiments. The images are written (once) under output/hidream_lokr/image_batches.",
            inputs=[
                io.Image.Input("images", tooltip="The training images (a batch)."),
                io.String.Input("captions", multiline=True, default="",
                                tooltip="One caption per line, in the order of the images; a single line is used "
                                        "for every image."),
                io.Int.Input("resolution", default=1024, min=64, max=4096, step=16,
                             tooltip="Training resolution in pixels (bucket area = resolution²)."),
                io.Int.Input("repeats", default=0, min=0, max=10000,
                             tooltip="Extra times each image is seen per epoch (0 = once)."),
            ],
            outputs=[DatasetType.Output(display_name="dataset", tooltip="The images with their captions")],
        )

    @classmethod
    def execute(cls, images: torch.Tensor, captions: str, resolution: int, repeats: int) -> io.NodeOutput:
        lines = [line.strip() for line in captions.splitlines() if line.strip()]
        if not lines:
            raise ConfigError("captions is empty: write one caption per line (one line is used for every image)")
        if len(lines) == 1:
            lines = lines * images.shape[0]
        if len(lines) != images.shape[0]:
            raise ConfigError(f"{images.shape[0]} images but {len(lines)} caption lines: give one caption per "
                              "image, or a single line for all of them")
        folder = _image_batch_to_folder(images, lines)
        config = _discovered(DatasetConfig(instance_data_dir=folder, id="image_batch", caption_strategy="textfile",
                                           repeats=repeats, resolution=resolution))
        return io.NodeOutput(TrainingData(datasets=(config,), cache_dir=cache_dir(),
                                          fingerprint=folder_fingerprint(folder)))
