"""HiDream-I1 LoKr trainer core: datasets, embedding caches, LoKr training and LoKr-merged sampling.

Usable without ComfyUI (`python -m trainer_core --help`); the ComfyUI nodes in `nodes/` are thin wrappers over it.
This package never imports ComfyUI.

The wings, from the bottom up (each sub-package's `__init__` is its public face; a wing imports only wings below
it, docs/architecture.md has the tree and tests/test_architecture.py keeps the rules):

    config, util          settings and the readers of users' files; files, faults, devices
    quant, adapters       frozen low-bit base weights; the LoKr / LoRA that trains, its files, its EMA
    hidream               loading HiDream-I1, the transformer call, flow matching, sampling, the VAE, the tiny model
    speedups, data        exact speed-ups and block streaming; datasets, buckets and the caches
    training              train(): its phases, state, step, checkpoints, several GPUs
    plan                  will it fit: the phases of a run dry-run at full size on meta tensors, memory_mode auto
    bench                 the benchmark (used by the CLI only)

The names below are what front ends call; they are imported on first use, so `import trainer_core` is cheap.
"""
from ._lazy import lazy_exports

__version__ = "0.1.0"

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "ConfigError": ".config", "DatasetConfig": ".config", "SamplingConfig": ".config", "TrainConfig": ".config",
    "load_train_config": ".config",
    "train": ".training", "TrainResult": ".training", "TrainingCallbacks": ".training",
    "ModelComponents": ".training", "StepMetrics": ".training", "TrainingStopped": ".training",
    "LycorisConfig": ".adapters", "load_lokr": ".adapters", "lokr_applied": ".adapters", "save_lokr": ".adapters",
    "denoise": ".hidream", "sample_image": ".hidream", "load_transformer": ".hidream", "load_vae": ".hidream",
    "load_text_encoders": ".hidream", "resolve_model_paths": ".hidream", "PromptEmbeds": ".hidream",
    "apply_speedups": ".speedups", "plan_training": ".plan", "resolve_memory_mode": ".plan",
    "build_tiny_model": ".hidream.tiny", "build_drawing_model": ".hidream.tiny", "write_demo_dataset": ".demo",
})
