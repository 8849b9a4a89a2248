"""SimpleTuner config keys: coercion, one warning for unknown keys, clear errors, multidatabackend entries,
optimizers and learning-rate schedules by name. No training here: these check what the keys build."""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

from helpers import tiny_train_config, write_shapes_dataset
from trainer_core.config import ConfigError
from trainer_core.config import train_config_from_dict
from trainer_core.training.optimizers import build_lr_scheduler, build_optimizer, load_optimizer_state
from trainer_core.training import resolve_total_steps


@pytest.fixture()
def shapes(tmp_path):
    return write_shapes_dataset(tmp_path / "shapes", [("circle", "red", "blue"), ("square", "green", "yellow")])


def base(shapes, **extra) -> dict:
    return {"pretrained_model_name_or_path": "/models/none", "output_dir": "out",
            "datasets": [{"id": "d", "instance_data_dir": str(shapes), "caption_strategy": "textfile"}], **extra}


def test_string_values_are_coerced_and_dashed_keys_accepted(shapes):
    config = train_config_from_dict(base(
        shapes, learning_rate="4e-5", max_train_steps="20", gradient_checkpointing="true", use_ema="false",
        validation_guidance_rescale="0.7", checkpoints_total_limit="5", resume_from_checkpoint="latest",
        validation_resolution="64x64,64x32", report_to="tensorboard", optimizer="optimi-lion",
        **{"--user_prompt_library": "lib.json", "--flow_schedule_auto_shift": "true",
           "text_encoder_3_precision": "int8-quanto", "num_train_epochs": "0", "ema_decay": "0.99"}))
    assert config.learning_rate == 4e-5 and config.max_train_steps == 20 and config.gradient_checkpointing
    assert config.use_ema is False and config.validation_guidance_rescale == 0.7
    assert config.checkpoints_total_limit == 5 and config.resume_from_checkpoint == "latest"
    assert config.validation_resolutions == [(64, 64), (64, 32)]
    assert config.validation_sampling().guidance_rescale == 0.7
    assert config.report_to == "tensorboard" and config.optimizer == "optimi-lion" and config.ema_decay == 0.99
    assert config.user_prompt_library.name == "lib.json" and config.flow_schedule_auto_shift
    assert config.text_encoder_3_precision == "int8-quanto"


def test_unknown_keys_are_listed_in_one_warning(shapes, caplog):
    data = base(shapes, push_to_hub="true", hub_model_id="me/x", validation_torch_compile="false")
    data["datasets"][0]["crop_aspect_buckets"] = [1.0]
    with caplog.at_level(logging.WARNING):
        train_config_from_dict(data)
    warnings = [r.getMessage() for r in caplog.records if "not used by this trainer" in r.getMessage()]
    assert len(warnings) == 1
    assert "push_to_hub" in warnings[0] and "hub_model_id" in warnings[0]
    assert "dataset 'd' crop_aspect_buckets" in warnings[0]
    assert "validation_torch_compile" not in warnings[0]


@pytest.mark.parametrize("key, value, allowed", [
    ("lr_scheduler", "cosine_annealing", "constant_with_warmup"),
    ("base_model_precision", "nf4-bnb", "int8-quanto"),
    ("text_encoder_4_precision", "fp8-torchao", "int8-quanto"),
    ("optimizer", "adafactor", "optimi-lion"),
    ("mixed_precision", "fp16", "bf16"),
    ("report_to", "wandb", "tensorboard"),
    ("model_family", "flux", "hidream"),
    ("model_flavour", "turbo", "full"),
    ("lora_type", "dora", "standard"),
    ("max_train_steps", "many", "number"),
    ("use_ema", "maybe", "true or false"),
    ("validation_resolution", "big", "WIDTHxHEIGHT"),
    ("validation_resolution", "64x64,100x64", "multiple of 16"),
    ("grad_clip_method", "clip", "norm"),
    ("checkpoints_total_limit", "0", "at least 1"),
    ("ema_decay", "1.5", "between 0 and 1"),
    ("validation_guidance_rescale", "2", "between 0 and 1"),
    ("flow_schedule_shift", "0", "positive number"),  # every noise level would be 0
    ("flow_schedule_shift", "-3", "trained with 3.0"),
    ("learning_rate", "-0.0001", "positive number"),
    ("max_grad_norm", "-1", "0 turns clipping off"),
    ("flow_sigmoid_scale", "0", "positive number"),
    ("resolution", "1000", "multiple of 16 pixels"),  # a dataset default from config.json
    ("resolution", "8", "at least 16"),
])
def test_bad_values_name_key_value_and_what_is_allowed(shapes, key, value, allowed):
    with pytest.raises(ConfigError) as err:
        train_config_from_dict(base(shapes, **{key: value}))
    message = str(err.value)
    assert key.split("_precision")[0] in message or key in message
    assert allowed in message
    if key != "validation_resolution" or value == "big":
        assert value in message


def test_keys_left_out_take_simpletuners_defaults(shapes):
    """SimpleTuner's documented defaults (its option registry / OPTIONS.md) for keys a config.json leaves out."""
    config = train_config_from_dict(base(shapes))
    assert (config.max_grad_norm, config.grad_clip_method) == (2.0, "value")
    assert (config.lr_scheduler, config.lr_warmup_steps, config.lr_power) == ("constant_with_warmup", 0, 0.8)
    assert (config.checkpoint_step_interval, config.checkpoints_total_limit) == (500, 5)
    assert config.validation_step_interval == 100 and config.flow_schedule_shift == 3.0
    assert (config.ema_decay, config.num_eval_images, config.adam_weight_decay) == (0.995, 4, 1e-2)
    # where this trainer keeps its own (docs/simpletuner.md says why): 4 eval noise levels, no negative prompt
    assert (config.eval_timesteps, config.validation_negative_prompt, config.gradient_checkpointing) == (4, "", False)
    dataset = config.datasets[0]
    assert (dataset.resolution, dataset.resolution_type, dataset.aspect_bucket_rounding) == (1024, "pixel_area", 2)
    assert config.step_settings().max_grad_norm == 2.0
    assert train_config_from_dict(base(shapes, optimizer="prodigy")).step_settings().max_grad_norm == 0.0


def test_clipping_is_simpletuners_value_or_norm():
    """value: every element clamped to +-max_grad_norm; norm: the whole gradient scaled to that norm; 0: neither."""
    from trainer_core.config import StepSettings
    from trainer_core.training.step import TrainStep

    grad = torch.tensor([3.0, -5.0, 0.5, 1.0])
    param = torch.nn.Parameter(torch.zeros(4))
    for method, limit, expected in (("value", 2.0, torch.tensor([2.0, -2.0, 0.5, 1.0])),
                                    ("norm", 1.0, grad / grad.norm()), ("value", 0.0, grad)):
        param.grad = grad.clone()
        step = TrainStep(torch.nn.Linear(1, 1), [param], torch.optim.SGD([param], lr=1.0), None,
                         StepSettings(max_grad_norm=limit, grad_clip_method=method), noise=None)
        step._clip(grad.norm())
        torch.testing.assert_close(param.grad, expected)


def test_config_json_aspect_rounding_and_area_resolution_reach_the_datasets(shapes):
    """aspect_bucket_rounding is a global SimpleTuner key; resolution_type area counts megapixels."""
    config = train_config_from_dict(base(shapes, aspect_bucket_rounding=3, resolution_type="area", resolution=1.0,
                                         minimum_image_size=0.25))
    dataset = config.datasets[0]
    assert dataset.aspect_bucket_rounding == 3
    assert (dataset.resolution_type, dataset.resolution, dataset.minimum_image_size) == ("pixel_area", 1024, 500)


def test_distilled_flavours_are_accepted_with_a_warning(shapes, caplog):
    with caplog.at_level(logging.WARNING):
        config = train_config_from_dict(base(shapes, model_flavour="dev"))
    assert config.model_flavour == "dev" and "distilled" in caplog.text


def test_epochs_and_steps_precedence(shapes, caplog):
    both = tiny_train_config("m", shapes, "o", max_train_steps=7, num_train_epochs=3)
    with caplog.at_level(logging.INFO):
        assert resolve_total_steps(both, batches_per_epoch=4) == 7  # max_train_steps wins
    assert "disagree" in caplog.text and "7 optimizer steps" in caplog.text
    epochs = tiny_train_config("m", shapes, "o", max_train_steps=0, num_train_epochs=3, gradient_accumulation_steps=2)
    assert resolve_total_steps(epochs, batches_per_epoch=4) == 6  # 3 epochs x (4 batches / 2 accumulated)
    seed_style = train_config_from_dict(base(shapes, num_train_epochs=0, max_train_steps=10000))
    assert resolve_total_steps(seed_style, batches_per_epoch=4) == 10000
    with pytest.raises(ConfigError, match="both 0"):
        train_config_from_dict(base(shapes, num_train_epochs=0, max_train_steps=0))


def test_multidatabackend_entries(shapes, tmp_path):
    (tmp_path / "eval").mkdir()
    write_shapes_dataset(tmp_path / "eval", [("circle", "blue", "red")])
    backend = [
        {"id": "train", "type": "local", "instance_data_dir": str(shapes), "caption_strategy": "textfile",
         "metadata_backend": "discovery", "skip_file_discovery": "", "repeats": "3",
         "is_regularisation_data": "true", "target_downsample_size": "512", "maximum_image_size": "1024",
         "cache_dir_vae": str(tmp_path / "vae-train")},
        {"id": "held-out", "type": "local", "dataset_type": "eval", "instance_data_dir": str(tmp_path / "eval"),
         "caption_strategy": "textfile", "image_embeds": "vae"},
        {"id": "off", "type": "local", "instance_data_dir": "/nowhere", "disabled": "true"},
        {"id": "vae", "type": "local", "dataset_type": "image_embeds", "cache_dir": str(tmp_path / "vae-shared")},
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
         "cache_dir": str(tmp_path / "text-cache"), "write_batch_size": "128"},
    ]
    (tmp_path / "mdb.json").write_text(json.dumps(backend))
    config = train_config_from_dict({"pretrained_model_name_or_path": "m", "data_backend_config": "mdb.json",
                                     "resolution": 64, "minimum_image_size": 32}, base=tmp_path)
    train_ds, eval_ds = config.datasets
    assert [d.id for d in config.datasets] == ["train", "held-out"]  # disabled and embed backends are not data
    assert train_ds.repeats == 3 and train_ds.is_regularisation_data and train_ds.target_downsample_size == 512
    assert train_ds.resolution == 64 and train_ds.minimum_image_size == 32  # config.json defaults reach datasets
    assert train_ds.cache_dir_vae == tmp_path / "vae-train" and eval_ds.cache_dir_vae == tmp_path / "vae-shared"
    assert eval_ds.dataset_type == "eval"
    assert config.resolved_text_cache_dir == tmp_path / "text-cache" and config.text_cache_write_batch_size == 128

    for bad, message in (({"metadata_backend": "parquet"}, "metadata_backend 'parquet'"),
                         ({"type": "aws"}, "type 'aws'"), ({"dataset_type": "video"}, "dataset_type 'video'")):
        entry = {"id": "x", "instance_data_dir": str(shapes), **bad}
        with pytest.raises(ConfigError, match=message):
            train_config_from_dict({"pretrained_model_name_or_path": "m", "datasets": [entry]})
    with pytest.raises(ConfigError, match="at least one dataset must be for training"):
        train_config_from_dict({"pretrained_model_name_or_path": "m", "datasets": [backend[1]]})


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(8, 8))]


@pytest.mark.parametrize("name, cls", [("adamw", "AdamW"), ("adamw_bf16", "AdamW"), ("optimi-adamw", "AdamW"),
                                       ("optimi-lion", "Lion"), ("prodigy", "Prodigy")])
def test_optimizers_by_name_step_and_round_trip_their_state(shapes, tmp_path, name, cls):
    config = tiny_train_config("m", shapes, "o", optimizer=name, learning_rate=1.0 if name == "prodigy" else 1e-2)
    params = _params()
    optimizer = build_optimizer(config, params)
    assert type(optimizer).__name__ == cls and type(optimizer).__module__.split(".")[0] in ("torch", "optimi",
                                                                                              "prodigyopt")
    before = params[0].detach().clone()
    for _ in range(2):
        params[0].square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(before, params[0])
    torch.save(optimizer.state_dict(), tmp_path / "opt.pt")
    fresh = build_optimizer(config, _params())
    fresh.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))  # checkpoints never unpickle


@pytest.mark.parametrize("name", ["optimi-lion", "optimi-adamw", "adamw"])
def test_optimizer_state_from_a_gpu_run_resumes_on_this_device(shapes, name):
    """A checkpoint's parameter groups carry the writing machine's kernel choice (optimi on a GPU saves
    "triton": True, torch may save "foreach"/"fused"); resumed here, the run keeps its own choice and continues
    exactly as from a checkpoint written on this machine, which continues exactly as the unbroken run (optimi's Adam
    once restarted its bias correction on resume)."""
    config = tiny_train_config("m", shapes, "o", optimizer=name, learning_rate=1e-2)
    params = _params()
    optimizer = build_optimizer(config, params)
    params[0].square().sum().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    from_gpu = {**saved, "param_groups": [{**group, "foreach": True, "fused": True, "triton": True, "setup": True}
                                          for group in saved["param_groups"]]}

    def resumed_step(state):
        resumed = _params()
        with torch.no_grad():
            resumed[0].copy_(params[0])
        opt = build_optimizer(config, resumed)
        load_optimizer_state(opt, copy.deepcopy(state))  # fresh tensors, as from a file (loading aliases them)
        resumed[0].square().sum().backward()
        opt.step()
        return resumed[0].detach()

    resumed_from_gpu, resumed = resumed_step(from_gpu), resumed_step(saved)
    params[0].grad = None
    params[0].square().sum().backward()
    optimizer.step()  # the unbroken run's second step
    torch.testing.assert_close(resumed_from_gpu, resumed, rtol=0, atol=0)
    torch.testing.assert_close(resumed, params[0].detach(), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["bnb-lion8bit-paged", "bnb-adamw8bit"])
def test_bitsandbytes_optimizers_say_clearly_why_they_cannot_run_here(shapes, name):
    config = tiny_train_config("m", shapes, "o", optimizer=name)
    with pytest.raises(ConfigError, match="CUDA") as err:
        build_optimizer(config, _params(), torch.device("cpu"))
    assert name in str(err.value) and "optimi-lion" in str(err.value)


def test_lr_schedulers_follow_their_names(shapes):
    def curve(name, **kw):
        config = tiny_train_config("m", shapes, "o", lr_scheduler=name, learning_rate=1.0, **kw)
        optimizer = torch.optim.SGD(_params(), lr=1.0)
        schedule = build_lr_scheduler(config, optimizer, total_steps=10)
        out = []
        for _ in range(10):
            out.append(schedule.get_last_lr()[0])
            optimizer.step()
            schedule.step()
        return out

    assert curve("constant") == [1.0] * 10
    assert curve("constant", lr_warmup_steps=4)[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]  # SimpleTuner warms it up too
    assert curve("constant_with_warmup", lr_warmup_steps=4)[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    linear = curve("linear")
    assert linear[0] == 1.0 and linear[5] == pytest.approx(0.5)
    cosine = curve("cosine")
    assert cosine[5] == pytest.approx(0.5) and cosine[9] < 0.03
    restarts = curve("cosine_with_restarts", lr_num_cycles=2)
    assert restarts[5] == pytest.approx(1.0) and restarts[4] < 0.1  # a restart half way
    poly = curve("polynomial", lr_power=2.0)
    assert poly[5] < linear[5] and poly[0] == 1.0
