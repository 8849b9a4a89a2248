"""A training run: `train(config)` and what front ends hand it and get back; checkpoints, optimizers and the step
it runs."""
from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "list_checkpoints": ".checkpoint", "resolve_resume_checkpoint": ".checkpoint",
    "verify_checkpoint": ".checkpoint",
    "COMMANDS": ".interface", "EMA_LOKR_FILENAME": ".interface", "LOKR_FILENAME": ".interface",
    "ModelComponents": ".interface", "StepMetrics": ".interface", "TrainResult": ".interface",
    "TrainingCallbacks": ".interface", "TrainingStopped": ".interface",
    "build_lr_scheduler": ".optimizers", "build_optimizer": ".optimizers", "optimizer_by_name": ".optimizers",
    "discover": ".prepare", "resolve_total_steps": ".prepare",
    "train": ".run",
    "MicroBatch": ".step", "NoiseSampler": ".step", "StepOutcome": ".step", "TrainStep": ".step",
    "flow_matching_losses": ".step",
})
