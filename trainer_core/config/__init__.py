"""Settings: the typed config every front door builds (schema), and the readers of users' files. Light to import:
nothing here needs torch."""
from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "read_json_file": ".json_files",
    "ConfigError": ".schema", "DatasetConfig": ".schema", "LR_SCHEDULERS": ".schema", "NoiseSchedule": ".schema",
    "OPTIMIZERS": ".schema", "PRECISIONS": ".schema", "SamplingConfig": ".schema", "StepSettings": ".schema",
    "TrainConfig": ".schema", "check_model_choice": ".schema", "parse_resolutions": ".schema",
    "load_train_config": ".simpletuner", "train_config_from_dict": ".simpletuner",
})
