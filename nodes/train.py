"""The training node: HIDREAM_MODEL + dataset + LoKr config + settings -> trained LoKr, loss curve, previews.

All training logic is trainer_core.training.train(); this node maps widgets onto a TrainConfig, hands over the models
the graph already holds (ModelComponents), and reports through ComfyUI: progress bar every step, preview images on
the node, a `hidream_lokr.progress` websocket event per step (run_registry), and ComfyUI's interrupt.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import comfy.model_management
import comfy.utils
import torch
from comfy_api.latest import io, ui
from PIL import Image

from ..trainer_core.config import ConfigError
from ..trainer_core.training import ModelComponents, StepMetrics, TrainingCallbacks, train
from .convert import pil_to_image
from .lokr_config import LoKrSettings
from .paths import new_run_dir
from .run_registry import REGISTRY, TrainingRun
from .train_settings import (INIT_LOKR_FIELD, RESUME_FIELD, config_as_json, core_settings,
                             optional_settings, run_key, train_config_from_settings)
from .types import CATEGORY, DatasetType, HiDreamModel, HiDreamModelType, LoKrConfigType, LoKrHandle, LoKrType, TrainingData

logger = logging.getLogger(__name__)
PREVIEW_MAX_SIDE = 512




def free_comfy_memory(device: torch.device) -> str:
    """Ask ComfyUI to unload the models it manages and drop cached allocations; say what is free afterwards."""
    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()
    free = comfy.model_management.get_free_memory(device)
    return f"unloaded ComfyUI's models; {free / 2**30:.1f} GiB free on {device}"


def remove_leftover_lokr(transformer: torch.nn.Module) -> int:
    """Unhook every LyCORIS module still hooked into `transformer`; returns how many.

    ComfyUI keeps the loader's output cached and hands the same transformer to the next run, so a run that fails
    half-way must not leave its LoKr hooked in (the next one would train on top of it). LyCORIS records its hooks
    per module in `_lycoris_wrappers`; restoring them in reverse order puts the original forward back.
    """
    removed = 0
    for module in transformer.modules():
        for wrapper in reversed(list(getattr(module, "_lycoris_wrappers", []))):
            wrapper.restore()
            removed += 1
    return removed


class InterruptWatch:
    """Turns ComfyUI's interrupt into the core's should_stop, without losing it.

    ComfyUI's progress hook raises InterruptProcessingException (and clears the flag) when the user cancels; inside
    the core's callbacks that would skip saving the LoKr and restoring the model. So the hook's exception (only
    that one) is caught and remembered, training stops at the next step boundary, and `raise_if_interrupted`
    re-raises it once the core has saved and restored.
    """

    def __init__(self) -> None:
        self.interrupted = False
        self.detected_at: Optional[float] = None

    def should_stop(self) -> bool:
        if not self.interrupted and comfy.model_management.processing_interrupted():
            self._mark()
        return self.interrupted

    def _mark(self) -> None:
        self.interrupted = True
        self.detected_at = self.detected_at or time.time()

    def guarded(self, report) -> None:
        try:
            report()
        except comfy.model_management.InterruptProcessingException:
            self._mark()

    def raise_if_interrupted(self) -> None:
        if not self.interrupted:
            return
        comfy.model_management.throw_exception_if_processing_interrupted()  # raises if the flag is still set
        raise comfy.model_management.InterruptProcessingException()


class StepReporter:
    """Builds the per-step event (the core's metrics plus speed) and sends it to the progress bar and the registry."""

    def __init__(self, run: TrainingRun, bar: comfy.utils.ProgressBar, watch: InterruptWatch) -> None:
        self.run, self.bar, self.watch = run, bar, watch
        self.phase = "starting"
        self.first_step_at: Optional[float] = None
        self.first_step = 0

    def on_phase(self, name: str) -> None:
        self.phase = name
        logger.info("HiDream LoKr run %s: %s", self.run.run_id, name)
        REGISTRY.set_phase(self.run, name)

    def on_step(self, m: StepMetrics) -> None:
        now = time.perf_counter()
        if self.first_step_at is None:
            self.first_step_at, self.first_step = now - m.seconds_per_step, m.step - 1
        done = m.step - self.first_step
        it_per_s = done / max(now - self.first_step_at, 1e-9)
        REGISTRY.record(self.run, {
            "step": m.step, "total": m.total_steps, "loss": m.loss, "lr": m.learning_rate,
            "load_balancing_loss": m.load_balancing_loss, "it_per_s": it_per_s,
            "eta_s": m.eta_seconds, "peak_memory_bytes": m.peak_memory_bytes, "phase": self.phase})
        self.watch.guarded(lambda: self.bar.update_absolute(m.step, m.total_steps))

    def on_validation(self, step: int, image: Image.Image, path: Path) -> None:
        REGISTRY.add_preview(self.run, step, path)
        self.watch.guarded(lambda: self.bar.update_absolute(
            step, self.run.total_steps, ("JPEG", image, PREVIEW_MAX_SIDE)))


class TrainHiDreamLoKr(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HiDreamLoKrTrain",
            display_name="Train HiDream LoKr",
            category=f"{CATEGORY}/training",
            description="Trains a LoKr (LyCORIS) on the HiDream transformer with flow matching, the way HiDream-I1 "
                        "was trained. Progress every step, previews every N steps (sampled with the LoKr merged). "
                        "Cancel stops within one step: the LoKr so far is saved and the model restored. Re-queueing "
                        "unchanged inputs reuses the finished run; change the seed to train again.",
            inputs=[
                HiDreamModelType.Input("hidream_model", tooltip="The HiDream model to train on (its transformer "
                                                                "is restored unchanged afterwards)."),
                DatasetType.Input("dataset", tooltip="Training images (ideally through the two cache nodes)."),
                LoKrConfigType.Input("lokr_config", tooltip="Which modules get a LoKr, and its shape."),
                *core_settings(),
                *optional_settings(),
                LoKrType.Input("init_lokr", optional=True,
                               tooltip="Continue training from this LoKr (e.g. from Load HiDream LoKr)."),
            ],
            outputs=[
                LoKrType.Output(display_name="lokr", tooltip="The trained LoKr (save it with Save HiDream LoKr)"),
                io.Image.Output(display_name="loss_curve", tooltip="Training loss per step"),
                io.Image.Output(display_name="previews",
                                tooltip="The preview images, in step order (the loss curve when there are none)"),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, hidream_model: HiDreamModel, dataset: TrainingData, lokr_config: LoKrSettings,
                init_lokr: LoKrHandle = None, **settings) -> io.NodeOutput:
        node_id = cls.hidden.unique_id
        if init_lokr is not None:
            settings[INIT_LOKR_FIELD] = init_lokr.path
        # Re-queueing a cancelled graph unchanged continues from the checkpoint the cancel left (when the core
        # writes checkpoints); any change to the inputs starts a new run.
        key = run_key(hidream_model.name, dataset.fingerprint, lokr_config.lycoris.to_dict(), settings)
        resume = REGISTRY.interrupted_checkpoint(key)
        if resume is not None and not settings.get(RESUME_FIELD):
            settings[RESUME_FIELD] = str(resume)
        device = next(hidream_model.transformer.parameters()).device
        text_encoder = dataset.text_encoder or hidream_model.text_encoder
        image_encoder = dataset.image_encoder or hidream_model.image_encoder
        decode = hidream_model.decode_latents or getattr(image_encoder, "decode_latents", None)
        for what, value, fix in (("text encoder", text_encoder, "a Cache text embeddings node"),
                                 ("image encoder (VAE)", image_encoder, "a Cache latents node"),
                                 ("VAE decoder for previews", decode, "a Cache latents node with a VAE")):
            if value is None:
                raise ConfigError(f"no {what}: load the model with its encoders, or put {fix} before training")

        output_dir = new_run_dir(settings.get("output_name") or "hidream_lokr")
        settings.pop("output_name", None)
        lycoris_path = output_dir / "lycoris_config.json"
        lycoris_path.write_text(json.dumps(lokr_config.lycoris.to_dict(), indent=2), encoding="utf-8")
        config = train_config_from_settings(settings, dataset, output_dir, lycoris_path,
                                            lokr_config.init_lokr_norm, str(device))

        message = free_comfy_memory(device)
        logger.info("HiDream LoKr: %s", message)
        _progress_text(message, node_id)

        run = REGISTRY.start(node_id, _current_prompt_id(), output_dir, config.max_train_steps)
        watch = InterruptWatch()
        reporter = StepReporter(run, comfy.utils.ProgressBar(config.max_train_steps, node_id=node_id), watch)
        callbacks = TrainingCallbacks(on_phase=reporter.on_phase, on_step=reporter.on_step,
                                      on_validation=reporter.on_validation, should_stop=watch.should_stop)
        callbacks.poll_commands = run.commands.drain  # the browser's Sample/Save/Stop, at step boundaries
        components = ModelComponents(transformer=hidream_model.transformer, transformer_name=hidream_model.name,
                                     text_encoder=text_encoder, image_encoder=image_encoder, decode_latents=decode)
        status = "failed"
        try:
            # ComfyUI executes nodes under inference_mode, where nothing records gradients.
            with torch.inference_mode(False), torch.enable_grad():
                result = train(config, callbacks, components)
            status = "interrupted" if watch.interrupted else "finished"
        except comfy.model_management.InterruptProcessingException:
            status = "interrupted"  # raised by ComfyUI outside our guards (e.g. while the core filled a cache)
            raise
        finally:
            REGISTRY.finish(run, status)
            if status == "failed" and remove_leftover_lokr(hidream_model.transformer):
                logger.warning("HiDream LoKr: the failed run left LoKr hooks on the transformer; removed them")
        if watch.interrupted:
            if result.checkpoint_path is not None:
                REGISTRY.remember_interrupted(key, result.checkpoint_path)
            logger.info("HiDream LoKr: interrupted at step %d; LoKr saved to %s (%.2f s after the interrupt was "
                        "seen)", result.steps_done, result.lokr_path, time.time() - watch.detected_at)
            (output_dir / "interrupted.json").write_text(json.dumps(
                {"steps_done": result.steps_done, "detected_at": watch.detected_at, "stopped_at": time.time(),
                 "lokr": str(result.lokr_path)}), encoding="utf-8")
            watch.raise_if_interrupted()

        handle = LoKrHandle(path=result.lokr_path, lycoris=lokr_config.lycoris, steps=result.steps_done,
                            metadata={"training_config": config_as_json(config), "steps": str(result.steps_done),
                                      "base_model": hidream_model.name})
        curve = pil_to_image([Image.open(result.loss_curve_path)])
        # One preview per validation step: its grid (prompts x resolutions) when the core draws one.
        grids = [p for p in result.validation_images if p.name == "grid.png"]
        images = [Image.open(p) for p in (grids or result.validation_images)]
        previews = pil_to_image(images) if images else curve
        shown = ui.ImageSaveHelper.save_images(previews, "hidream_lokr_preview", io.FolderType.temp, cls, 1) + \
            ui.ImageSaveHelper.save_images(curve, "hidream_lokr_loss", io.FolderType.temp, cls, 1)
        return io.NodeOutput(handle, curve, previews, ui={"images": shown})


def _current_prompt_id():
    from comfy_execution.utils import get_executing_context

    context = get_executing_context()
    return context.prompt_id if context else None


def _progress_text(text: str, node_id) -> None:
    from server import PromptServer

    PromptServer.instance.send_progress_text(text, node_id)
