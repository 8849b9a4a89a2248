"""Validation images: every prompt (the validation prompt plus a user prompt library) at every validation
resolution, written as `<out>/step_<N>/<nickname>_<W>x<H>.png`, plus a grid (prompts x resolutions) per step."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image, ImageDraw

from ..util.atomic import write_with
from ..data.cache import TextEmbeddingCache
from ..config.schema import ConfigError, SamplingConfig
from ..config.json_files import read_json_file
from ..util.faults import crash_point
from ..hidream.sample import denoise

MAIN_NICKNAME = "validation"  # the file name of `validation_prompt`'s images


def check_nickname(nickname: str, where: str) -> str:
    """A nickname becomes a file name: it must stay inside the step folder (no separators, '..', NUL...)."""
    if not isinstance(nickname, str) or not nickname.strip():
        raise ConfigError(f"{where}: a prompt nickname is empty; nicknames name the image files")
    bad = [c for c in ("/", "\\", "\0", ":") if c in nickname]
    if bad or nickname in (".", "..") or nickname.startswith(".") or Path(nickname).is_absolute():
        raise ConfigError(f"{where}: prompt nickname {nickname!r} cannot be a file name inside the validation "
                          "folder (no '/', '\\', ':', NUL, leading '.'); use letters, digits, '_' or '-'")
    return nickname


def load_prompt_library(path: Path) -> dict[str, str]:
    """A user_prompt_library JSON file: {"nickname": "prompt", ...}."""
    path = Path(path)
    data = read_json_file(path, "user_prompt_library")
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ConfigError(f"user_prompt_library {path} must be a JSON object of nickname -> prompt strings")
    return {check_nickname(k, f"user_prompt_library {path}"): v for k, v in data.items()}


def validation_prompts(main_prompt: str | None, library_path: Path | None) -> dict[str, str]:
    """nickname -> prompt: `validation` for the main prompt, then the library's in file order."""
    prompts = {MAIN_NICKNAME: main_prompt} if main_prompt else {}
    if library_path:
        for nickname, prompt in load_prompt_library(library_path).items():
            if nickname in prompts:
                raise ConfigError(f"user_prompt_library nickname {nickname!r} is reserved for validation_prompt")
            prompts[nickname] = prompt
    return prompts


def validation_latents(prompts: dict[str, str], resolutions: list[tuple[int, int]], settings: SamplingConfig,
                       text_cache: TextEmbeddingCache, transformer) -> Iterator[tuple[str, int, int, torch.Tensor]]:
    """Sample every prompt at every resolution, prompts outer, in a fixed order: (nickname, width, height, latents
    (1, C, H/8, W/8)). A sharded (FSDP) model needs every rank to run these same forwards together."""
    uncond = text_cache.load([settings.negative_prompt])
    for nickname, prompt in prompts.items():
        cond = text_cache.load([prompt])
        for width, height in resolutions:
            yield nickname, width, height, denoise(transformer, cond, uncond,
                                                   replace(settings, prompt=prompt, width=width, height=height))


def validation_image_path(folder: Path, nickname: str, width: int, height: int) -> Path:
    """Where one validation picture of a step's folder is written (its name says the prompt and the size)."""
    return Path(folder) / f"{nickname}_{width}x{height}.png"


def validation_folder_step(folder: Path) -> int:
    """The training step a validation folder (`step_<N>`) was written at."""
    return int(Path(folder).name.removeprefix("step_"))


def render_validation(step: int, prompts: dict[str, str], resolutions: list[tuple[int, int]],
                      settings: SamplingConfig, text_cache: TextEmbeddingCache, transformer,
                      decode_latents: Callable[[torch.Tensor], list[Image.Image]], out_dir: Path
                      ) -> tuple[list[Path], Image.Image, Path]:
    """Draw every prompt at every resolution with the model as it is now (the caller applies the adapter).

    Returns (image paths, grid image, grid path). Each image uses `settings.seed`, so steps compare directly.
    """
    folder = Path(out_dir) / f"step_{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    paths, rows = [], {}
    for nickname, width, height, latents in validation_latents(prompts, resolutions, settings, text_cache,
                                                               transformer):
        image = decode_latents(latents)[0]
        path = validation_image_path(folder, nickname, width, height)
        write_with(path, lambda tmp: image.save(tmp, format="PNG"))
        crash_point("validation")
        paths.append(path)
        rows.setdefault(nickname, []).append(image)
    grid = image_grid(list(rows.items()), [f"{w}x{h}" for w, h in resolutions])
    grid_path = folder / "grid.png"
    write_with(grid_path, lambda tmp: grid.save(tmp, format="PNG"))
    return paths, grid, grid_path


def image_grid(rows: list[tuple[str, list[Image.Image]]], column_titles: list[str]) -> Image.Image:
    """Rows of images (one per prompt) under column titles (one per resolution), each row labelled."""
    cell_w = max(im.width for _, row in rows for im in row)
    cell_h = max(im.height for _, row in rows for im in row)
    label_w, title_h, pad = 120, 16, 4
    grid = Image.new("RGB", (label_w + len(column_titles) * (cell_w + pad), title_h + len(rows) * (cell_h + pad)),
                     "white")
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(column_titles):
        draw.text((label_w + c * (cell_w + pad), 2), title, fill=(0, 0, 0))
    for r, (label, row) in enumerate(rows):
        top = title_h + r * (cell_h + pad)
        draw.text((2, top + 2), label[:18], fill=(0, 0, 0))
        for c, image in enumerate(row):
            grid.paste(image, (label_w + c * (cell_w + pad), top))
    return grid
