"""The training node: HIDREAM_MODEL + dataset + LoKr config + settings -> trained LoKr, loss curve, previews.

All training logic is trainer_core.training.train(); this node merges its widgets and the optional settings nodes
into a TrainConfig, decides with run_store whether the queued training continues an earlier run of the same
output_name, starts a new one, or returns a finished one, hands over the models the graph already holds
(ModelComponents), and reports through ComfyUI: the progress bar every step, a `hidream_lokr.progress` websocket
event per step for the live view (run_registry), and ComfyUI's interrupt (Cancel).

The node draws nothing of its own below the live view: no ComfyUI image preview and no progress text, so it keeps
its size across runs. The loss curve and previews are IMAGE outputs for graphs that want them.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from ..trainer_core.config import ConfigError
from ..trainer_core.util import quiet_libraries
from . import run_store
from .compat import (cancel_requested, comfy_training, current_prompt_id, free_memory_estimate, interrupt_exception,
                     io, progress_bar, raise_interrupt)
from .lokr_config import LoKrSettings
from .paths import new_run_dir, run_folder_name
from .run_registry import REGISTRY, TrainingRun
from .train_settings import (ESSENTIALS, GROUPS, INIT_LOKR_FIELD, RESUME_CHOICES, RESUME_FIELD, TRAIN_LAYOUT,
                             config_as_json, merged_settings, run_fingerprint, train_config_from_settings)
from .types import (CATEGORY, DatasetType, HiDreamModel, HiDreamModelType, LoKrConfigType, LoKrHandle, LoKrType,
                    LossMapType, LoraModelType, TrainingData)

logger = logging.getLogger(__name__)
MAIN_PREVIEW = "validation_"  # trainer_core names validation_prompt's images validation_<W>x<H>.png


def free_comfy_memory(device: torch.device) -> str:
    """Ask ComfyUI to unload the models it manages and drop cached allocations; say about what is free afterwards
    (ComfyUI's estimate)."""
    import comfy.model_management

    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()
    return f"unloaded ComfyUI's models; about {free_memory_estimate(device):.1f} GiB free on {device}"


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


def main_preview(grid_path: Path) -> Path:
    """The image of validation_prompt at the first validation resolution beside a step's grid (the grid itself
    when the step folder has no such image): the picture, without the grid's labels and white margins."""
    images = sorted(p for p in grid_path.parent.glob(f"{MAIN_PREVIEW}*.png"))
    return images[0] if images else grid_path


class InterruptWatch:
    """Turns ComfyUI's interrupt into the core's should_stop, without losing it.

    ComfyUI's progress hook raises InterruptProcessingException (and clears the flag) when the user cancels; inside
    the core's callbacks that would skip saving the LoKr and restoring the model. So the hook's exception (only
    that one) is caught and remembered, training stops at the next step boundary, and `raise_if_interrupted`
    re-raises it once the core has saved and restored. The flag is also read directly every step (newer ComfyUI
    throttles the progress hook, compat.py).
    """

    def __init__(self) -> None:
        self.interrupted = False
        self.detected_at: Optional[float] = None

    def should_stop(self) -> bool:
        if not self.interrupted and cancel_requested():
            self._mark()
        return self.interrupted

    def _mark(self) -> None:
        self.interrupted = True
        self.detected_at = self.detected_at or time.time()

    def guarded(self, report) -> None:
        try:
            report()
        except interrupt_exception():
            self._mark()

    def raise_if_interrupted(self) -> None:
        if self.interrupted:
            raise_interrupt()


class StepReporter:
    """Builds the per-step event (the core's metrics plus speed) and sends it to the progress bar and the registry."""

    def __init__(self, run: TrainingRun, bar, watch: InterruptWatch, resume_from: Optional[Path] = None) -> None:
        self.run, self.bar, self.watch, self.resume_from = run, bar, watch, resume_from
        self.phase = "starting"
        self.first_step_at: Optional[float] = None
        self.first_step = 0
        self.last_step = 0

    def on_phase(self, name: str) -> None:
        self.phase = name
        logger.info("HiDream LoKr run %s: %s", self.run.run_id, name)
        REGISTRY.set_phase(self.run, name)

    def on_resume(self, step: int, losses: list[float]) -> None:
        self.last_step = step
        where = f"{self.resume_from.parent.name}/{self.resume_from.name}" if self.resume_from else f"step {step}"
        message = f"Resumed from step {step} ({where}): the chart up to there is the checkpoint's history"
        logger.info("HiDream LoKr run %s: %s", self.run.run_id, message)
        REGISTRY.resumed(self.run, step, losses, message)
        for preview_step, path in run_previews(self.run.output_dir, up_to=step):  # the previews drawn before
            REGISTRY.add_preview(self.run, preview_step, path)

    def on_step(self, m) -> None:  # trainer_core.training.StepMetrics
        now = time.perf_counter()
        if self.first_step_at is None:
            self.first_step_at, self.first_step = now - m.seconds_per_step, m.step - 1
        self.last_step = m.step
        done = m.step - self.first_step
        it_per_s = done / max(now - self.first_step_at, 1e-9)
        REGISTRY.record(self.run, {
            "step": m.step, "total": m.total_steps, "loss": m.loss, "lr": m.learning_rate,
            "load_balancing_loss": m.load_balancing_loss, "it_per_s": it_per_s,
            "eta_s": m.eta_seconds, "peak_memory_bytes": m.peak_memory_bytes, "phase": self.phase})
        self.watch.guarded(lambda: self.bar.update_absolute(m.step, m.total_steps))

    def on_validation(self, step: int, image, path: Path) -> None:
        # Only the live view shows the preview: a progress-bar preview would make ComfyUI draw its own copy of
        # it below the node (and grow the node with every run).
        REGISTRY.add_preview(self.run, step, main_preview(Path(path)))
        self.watch.guarded(lambda: self.bar.update_absolute(step, self.run.total_steps))


def _settings_inputs() -> list:
    inputs = []
    for setting in ESSENTIALS:
        if setting.id == RESUME_FIELD:  # the choices, then every checkpoint on disk
            inputs.append(setting.input(options=RESUME_CHOICES + run_store.checkpoint_choices()))
        else:
            inputs.append(setting.input())
    return inputs


class TrainHiDreamLoKr(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HiDreamLoKrTrain",
            display_name="Train HiDream LoKr",
            category=f"{CATEGORY}/training",
            description="Trains a LoKr (LyCORIS) on the HiDream transformer with flow matching, the way HiDream-I1 "
                        "was trained. The essentials are here; the optional settings nodes (optimizer & "
                        "schedule, previews, checkpoints, advanced) hold the rest. Progress every step, previews "
                        "every N steps. Stop & save, Cancel, an error or a closed ComfyUI leave a checkpoint: "
                        "queueing the graph again continues from it. A finished run is returned, not retrained.",
            inputs=[
                HiDreamModelType.Input("hidream_model", tooltip="The HiDream model to train on (its transformer "
                                                                "is restored unchanged afterwards)."),
                DatasetType.Input("dataset", tooltip="Training images (ideally through the two cache nodes)."),
                LoKrConfigType.Input("lokr_config", tooltip="Which modules get a LoKr, and its shape."),
                *_settings_inputs(),
                LoKrType.Input("init_lokr", optional=True,
                               tooltip="Continue training from this LoKr (e.g. from Load HiDream LoKr)."),
                *[g.socket_type.Input(g.socket, optional=True,
                                      tooltip=f"Optional: a '{g.display_name}' node (defaults when unconnected)")
                  for g in GROUPS],
            ],
            outputs=[
                LoKrType.Output(display_name="lokr", tooltip="The trained LoKr (save it with Save HiDream LoKr)"),
                io.Image.Output(display_name="loss_curve", tooltip="Training loss per step"),
                io.Image.Output(display_name="previews",
                                tooltip="The preview images, in step order (the loss curve when there are none)"),
                LoraModelType.Output(display_name="lora",
                                     tooltip="The LoKr as ComfyUI's LORA_MODEL: for its Load LoRA Model and Save "
                                             "LoRA Weights nodes"),
                LossMapType.Output(display_name="loss_map",
                                   tooltip="Loss per step as ComfyUI's LOSS_MAP (its Plot Loss Graph node)"),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, resume_from_checkpoint: str = "", output_name: str = "hidream_lokr") -> bool | str:
        """Checked when the graph is queued, before anything runs: the run name (it becomes a folder under
        output/hidream_lokr) and the resume choice (its list is only what was on disk when the page loaded; a
        checkpoint of the pack's runs given by path is fine too)."""
        choice = (resume_from_checkpoint or "").strip()
        try:
            run_folder_name(output_name or "hidream_lokr")
            if choice and choice not in RESUME_CHOICES and choice not in ("none", "new"):
                run_store._resolve_checkpoint_choice(choice)
        except ConfigError as exc:
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, output_name: str = "hidream_lokr", **_) -> str:
        """Makes ComfyUI run the node again, instead of serving cached outputs, when the last run of output_name
        ended unfinished (run_store.cache_token)."""
        try:
            return run_store.cache_token(output_name or "hidream_lokr")
        except ConfigError:
            return ""

    @classmethod
    def execute(cls, hidream_model: HiDreamModel, dataset: TrainingData, lokr_config: LoKrSettings,
                init_lokr: LoKrHandle = None, **inputs) -> io.NodeOutput:
        node_id = cls.hidden.unique_id
        groups = {g.socket: inputs.pop(g.socket, None) for g in GROUPS}
        settings = merged_settings(inputs, groups)
        if init_lokr is not None:
            settings[INIT_LOKR_FIELD] = init_lokr.path
        text_encoder = dataset.text_encoder or hidream_model.text_encoder
        image_encoder = dataset.image_encoder or hidream_model.image_encoder
        decode = hidream_model.decode_latents or getattr(image_encoder, "decode_latents", None)
        for what, value, fix in (("text encoder", text_encoder, "a Cache text embeddings node"),
                                 ("image encoder (VAE)", image_encoder, "a Cache latents node"),
                                 ("VAE decoder for previews", decode, "a Cache latents node with a VAE")):
            if value is None:
                raise ConfigError(f"no {what}: load the model with its encoders, or put {fix} before training")

        output_name = settings.pop("output_name") or "hidream_lokr"
        encoders = [str(getattr(text_encoder, "identity", "")), str(getattr(image_encoder, "identity", ""))]
        fingerprint = run_fingerprint(hidream_model.name, dataset.fingerprint, encoders,
                                      lokr_config.lycoris.to_dict(), settings)
        token = run_store.cache_token(output_name)  # what fingerprint_inputs gave ComfyUI for this execution
        plan = run_store.plan(output_name, fingerprint, settings.get(RESUME_FIELD), settings["max_train_steps"])
        logger.info("HiDream LoKr: %s -> %s", plan.reason, plan.action if plan.action != "continue" else
                    f"continue {plan.folder.name} from {plan.checkpoint.name}")
        if plan.action == "return":
            return finished_run_outputs(plan.folder, node_id, lokr_config)

        output_dir = plan.folder if plan.action == "continue" else new_run_dir(output_name)
        fresh_folder = plan.action != "continue"
        try:
            lycoris_path = output_dir / "lycoris_config.json"
            lycoris_path.write_text(json.dumps(lokr_config.lycoris.to_dict(), indent=2), encoding="utf-8")
            device = next(hidream_model.transformer.parameters()).device
            config = train_config_from_settings(settings, dataset, output_dir, lycoris_path,
                                                lokr_config.init_lokr_norm, str(device), plan.checkpoint)
        except BaseException:
            if fresh_folder:
                shutil.rmtree(output_dir, ignore_errors=True)
            raise
        previous = run_store.read_record(output_dir)
        run_store.write_record(
            output_dir, status="running", session=run_store.SESSION, fingerprint=fingerprint,
            output_name=output_name, total_steps=config.max_train_steps, steps_done=previous.get("steps_done", 0),
            cache_token=token, config=config_as_json(config), layout=TRAIN_LAYOUT, error="",
            resumed_from=str(plan.checkpoint) if plan.checkpoint else None, message=plan.reason,
            started=previous.get("started", time.time()))

        run = REGISTRY.start(node_id, current_prompt_id(), output_dir, config.max_train_steps)
        message = free_comfy_memory(device)
        logger.info("HiDream LoKr: %s", message)
        REGISTRY.set_phase(run, "planning memory")
        try:
            chosen, verdict = memory_plan(config, hidream_model.transformer)
        except BaseException as exc:  # memory_mode auto and nothing fits: said before anything is trained
            REGISTRY.finish(run, "failed", str(exc))
            if fresh_folder and not plan.resumes:
                shutil.rmtree(output_dir, ignore_errors=True)  # nothing to continue: no empty folder left
            else:
                run_store.write_record(output_dir, status="failed", error=str(exc), message=str(exc))
            raise
        if chosen is not config:  # the memory settings auto chose (the same training: not in the fingerprint)
            config = chosen
            run_store.write_record(output_dir, config=config_as_json(config))
        REGISTRY.note(run, f"{'Continuing' if plan.resumes else 'Starting'} {output_dir.name}: {plan.reason}; "
                           f"{verdict}; {message}")
        watch = InterruptWatch()
        reporter = StepReporter(run, progress_bar(config.max_train_steps, node_id), watch, plan.checkpoint)
        result = run_training(config, hidream_model, text_encoder, image_encoder, decode, run, reporter, watch,
                            fresh_folder and not plan.resumes)
        if watch.interrupted:
            logger.info("HiDream LoKr: interrupted at step %d; LoKr saved to %s (%.2f s after the interrupt was "
                        "seen)", result.steps_done, result.lokr_path, time.time() - watch.detected_at)
            watch.raise_if_interrupted()

        handle = LoKrHandle(path=result.lokr_path, lycoris=lokr_config.lycoris, steps=result.steps_done,
                            metadata={"training_config": config_as_json(config), "steps": str(result.steps_done),
                                      "base_model": hidream_model.name})
        return node_outputs(handle, result.loss_curve_path, run_previews(output_dir), run, result.losses)


def memory_plan(config, transformer: torch.nn.Module) -> tuple:
    """(the config to train with, a line for the node): the memory plan of this run with the model the graph
    holds (trainer_core.plan: the model set-up, the training step, previews and checkpoints dry-run at its size,
    on no memory) against what the GPU has now, and with memory_mode auto the memory settings it chose. A plan
    that cannot be made is said and the run goes on as set; auto with nothing that fits stops before training."""
    from ..trainer_core.plan import NODE_PHASES, available_memory, plan_training, resolve_memory_mode

    planned: list = []
    if config.memory_mode == "auto":
        chosen = resolve_memory_mode(config, phases=NODE_PHASES, planned=planned, transformer=transformer)
        if planned:
            settings = ("offload_blocks" if chosen.offload_blocks else "gradient_checkpointing"
                        if chosen.gradient_checkpointing else "no gradient checkpointing")
            return chosen, f"plan: memory_mode auto chose {settings}; {planned[-1].verdict()}"
        config = chosen  # a CPU run: nothing to choose
    try:
        gpu, host, capability = available_memory(config, transformer)
        limit = gpu if gpu is not None else host  # a CPU run's memory is the host's
        result = plan_training(config, limit, host if gpu is not None else None, suggest=False,
                               phases=NODE_PHASES, capability=capability, transformer=transformer)
    except Exception as exc:  # noqa: BLE001 - a plan is advice: without one the run goes on as set
        logger.warning("HiDream LoKr: no memory plan (%s: %s)", type(exc).__name__, exc)
        return config, f"plan: none ({type(exc).__name__})"
    logger.info("HiDream LoKr: memory plan\n%s", result.format())
    return config, f"plan: {result.verdict()}"


class TrainingFailed(RuntimeError):
    """A run failed after it had written a checkpoint: the error, and how to continue from that checkpoint."""


def run_previews(folder: Path, up_to: Optional[int] = None) -> list[tuple[int, Path]]:
    """(step, main preview image) of every validation step folder of a run, in step order."""
    found = []
    for grid in sorted((Path(folder) / "validation").glob("step_*/grid.png")):
        step = int(grid.parent.name.split("_")[1])
        if up_to is None or step <= up_to:
            found.append((step, main_preview(grid)))
    return found


def run_training(config, hidream_model: HiDreamModel, text_encoder, image_encoder, decode, run: TrainingRun,
                 reporter: StepReporter, watch: InterruptWatch, new_run: bool):
    """Train, and whatever happens record how the run ended (run.json, the live view, the console)."""
    from ..trainer_core.training import ModelComponents, TrainingCallbacks, train

    callbacks = TrainingCallbacks(on_phase=reporter.on_phase, on_step=reporter.on_step,
                                  on_validation=reporter.on_validation, on_resume=reporter.on_resume,
                                  should_stop=watch.should_stop)
    callbacks.poll_commands = run.commands.drain  # the browser's Sample/Save/Stop, at step boundaries
    components = ModelComponents(transformer=hidream_model.transformer, transformer_name=hidream_model.name,
                                 text_encoder=text_encoder, image_encoder=image_encoder, decode_latents=decode,
                                 sampling_shift=hidream_model.sampling_shift)
    output_dir = Path(config.output_dir)
    status, result, error = "failed", None, ""
    try:
        # ComfyUI executes nodes under inference_mode, where nothing records gradients.
        with torch.inference_mode(False), torch.enable_grad(), quiet_libraries(), comfy_training():
            result = train(config, callbacks, components)
        status = "interrupted" if watch.interrupted else "stopped" if result.stopped else "finished"
    except interrupt_exception():
        status = "interrupted"  # raised by ComfyUI outside our guards (e.g. while the core filled a cache)
        raise
    except Exception as exc:
        error = str(exc)
        checkpoint = getattr(exc, "checkpoint", None) or run_store.newest_checkpoint(output_dir)
        if checkpoint is not None:  # say how to go on, in the error ComfyUI shows
            raise TrainingFailed(run_store.status_message("failed", output_dir, reporter.last_step,
                                                          config.max_train_steps, checkpoint, error)) from exc
        raise
    finally:
        steps_done = result.steps_done if result is not None else reporter.last_step
        checkpoint = result.checkpoint_path if result is not None else None
        if checkpoint is None:
            checkpoint = run_store.newest_checkpoint(output_dir)
        message = run_store.status_message(status, output_dir, steps_done, config.max_train_steps,
                                           checkpoint if status != "finished" else None, error)
        if status == "failed" and new_run and steps_done == 0 and checkpoint is None:
            shutil.rmtree(output_dir, ignore_errors=True)  # nothing to continue: no empty folder left
        else:
            run_store.write_record(output_dir, status=status, steps_done=steps_done, error=error,
                                   checkpoint=str(checkpoint) if checkpoint else None, message=message,
                                   lokr=str(result.lokr_path) if result is not None and result.lokr_path
                                   else None)
        (logger.warning if status in ("failed", "interrupted") else logger.info)("HiDream LoKr: %s", message)
        REGISTRY.finish(run, status, message)
        if status == "failed" and remove_leftover_lokr(hidream_model.transformer):
            logger.warning("HiDream LoKr: the failed run left LoKr hooks on the transformer; removed them")
    return result


def finished_run_outputs(folder: Path, node_id, lokr_config: LoKrSettings) -> io.NodeOutput:
    """A finished run of exactly this training: its files are the outputs; nothing trains."""
    record = run_store.read_record(folder)
    steps = int(record.get("steps_done") or 0)
    message = (f"Already trained: {folder.name} finished these {steps} steps, so its LoKr is returned without "
               "training. Raise max_train_steps to train it further, or set resume_from_checkpoint to 'start "
               "over' for a new run.")
    logger.info("HiDream LoKr: %s", message)
    run = REGISTRY.start(node_id, current_prompt_id(), folder, int(record.get("total_steps") or steps))
    losses_path = folder / "losses.json"
    losses = json.loads(losses_path.read_text()) if losses_path.is_file() else []
    REGISTRY.resumed(run, len(losses), losses, message, kind="returned")
    previews = run_previews(folder)
    for step, path in previews:
        REGISTRY.add_preview(run, step, path)
    REGISTRY.finish(run, "finished", message)
    handle = LoKrHandle(path=Path(record.get("lokr") or folder / "pytorch_lora_weights.safetensors"),
                        lycoris=lokr_config.lycoris, steps=steps,
                        metadata={"training_config": record.get("config", ""), "steps": str(steps)})
    return node_outputs(handle, folder / "loss_curve.png", previews, run, losses)


def node_outputs(handle: LoKrHandle, curve_path: Path, previews: list[tuple[int, Path]], run: TrainingRun,
                 losses: list[float]) -> io.NodeOutput:
    """lokr, loss curve, previews (IMAGE), and ComfyUI's own LORA_MODEL (the LoKr file's tensors) and LOSS_MAP
    ({"loss": one float per step since step 1, a resumed run's earlier steps included})."""
    from PIL import Image

    from .convert import pil_to_image

    curve = pil_to_image([Image.open(curve_path)])
    images = pil_to_image([Image.open(p) for _, p in previews]) if previews else curve
    summary = {"run_id": run.run_id, "status": run.status, "run_folder": run.output_dir.name,
               "steps": handle.steps, "message": run.message}
    return io.NodeOutput(handle, curve, images, handle.state_dict(), {"loss": [float(x) for x in losses]},
                         ui={"hidream_lokr_run": [summary]})
