"""Every training key whose effect shows while training has that effect, in its direction: one shared 3-step
baseline on the tiny model, then one key changed at a time (3 steps: Lion's and AdamW's first updates coincide,
sign(g) x lr, so an optimizer shows from the third loss on). What each run did is recorded from the outside: the
step metrics (on_step), what every training forward was fed (forward pre-hooks on the transformer's timestep and
pooled-text embedders, and on every Linear: its class and weight type), and the LoKr file it wrote. (Keys that
change files rather than training are checked in test_training_features, test_checkpoint and
test_simpletuner_quickstart; config-only keys in test_config_keys.)"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_train_config, write_shapes_dataset
from trainer_core.hidream import resolution_shift, shift_sigmas
from trainer_core.training import TrainingCallbacks, train

ITEMS = [("circle", "red", "blue"), ("square", "green", "yellow"), ("circle", "yellow", "green"),
         ("square", "blue", "red")]
STEPS = 3
LEARNING_RATE = 1e-3  # tiny_train_config's
# Pinned rather than taken from TrainConfig's defaults, so that the max_grad_norm case below means what it says.
CLIPPING = dict(max_grad_norm=1.0, grad_clip_method="norm")


@dataclass
class Run:
    """What one training did: its step metrics, per training forward the timesteps (B,), the pooled text
    embedding (B, D) and the compute dtype, the kinds of Linear layers its forwards ran, and its LoKr file."""

    metrics: list = field(default_factory=list)
    timesteps: list[torch.Tensor] = field(default_factory=list)
    pooled: list[torch.Tensor] = field(default_factory=list)
    dtypes: set = field(default_factory=set)
    layers: set = field(default_factory=set)
    lokr: dict = field(default_factory=dict)

    @property
    def losses(self) -> list[float]:
        return [m.loss for m in self.metrics]

    def w2(self) -> torch.Tensor:
        """Every W2 entry of the LoKr file, flat (LyCORIS starts them at zero unless init_lokr_norm)."""
        return torch.cat([v.flatten() for k, v in self.lokr.items() if k.endswith("lokr_w2")])

    def w2_norm(self) -> float:
        return self.w2().norm().item()


def _layer_kind(module: torch.nn.Module) -> str:
    qtype = getattr(module, "weight_qtype", None)  # optimum-quanto's QLinear
    return f"{type(module).__name__}:{qtype.name}" if qtype is not None else type(module).__name__


def train_recorded(config) -> Run:
    run = Run()

    def record(module, args):
        if not torch.is_grad_enabled():  # caching, validation: not a training forward
            return
        name = type(module).__name__
        if name == "HiDreamImageTimestepEmbed":
            run.timesteps.append(args[0].detach().float().clone())
            run.dtypes.add(args[1])
        elif name == "HiDreamImagePooledEmbed":
            run.pooled.append(args[0].detach().float().clone())
        elif isinstance(module, torch.nn.Linear):
            run.layers.add(_layer_kind(module))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        result = train(config, callbacks=TrainingCallbacks(on_step=run.metrics.append))
    finally:
        handle.remove()
    run.lokr = load_file(str(result.lokr_path))
    return run


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("key_effects")
    shapes = write_shapes_dataset(root / "shapes", ITEMS)

    def config(name: str, **overrides):
        return tiny_train_config(tiny_model_dir, shapes, root / name, cache_dir=root / "cache",
                                 **{"max_train_steps": STEPS, **CLIPPING, **overrides})

    baseline_config = config("baseline")
    return config, baseline_config, train_recorded(baseline_config), root


def _empty_caption_pooled(root: Path) -> torch.Tensor:
    from safetensors import safe_open

    for path in (root / "cache" / "text").rglob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            if f.metadata()["caption"] == "":
                return f.get_tensor("pooled").float()
    raise AssertionError("the empty caption is not in the text cache")


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------- what each key must do, and how


def shift_one_trains_at_the_unshifted_sigmas(run, base, base_config, root):
    # The baseline's sigmas are exactly these shifted by its flow_schedule_shift (same draws): k s / (1 + (k-1) s).
    sigmas = torch.cat(run.timesteps) / 1000
    expected = 1000 * shift_sigmas(sigmas, base_config.flow_schedule_shift)
    assert _close(torch.cat(base.timesteps), expected) and torch.all(sigmas * 1000 < torch.cat(base.timesteps))


def auto_shift_uses_the_resolution_shift(run, base, base_config, root):
    k = base_config.flow_schedule_shift
    shifted = torch.cat(base.timesteps) / 1000
    drawn = shifted / (k - (k - 1) * shifted)  # the baseline's draws, unshifted
    expected = 1000 * shift_sigmas(drawn, resolution_shift(8, 8))  # 64 px: 8x8 latents, 16 tokens
    assert resolution_shift(8, 8) < k and _close(torch.cat(run.timesteps), expected)


def load_balancing_adds_the_aux_loss(run, base, base_config, root):
    first, ref = run.metrics[0], base.metrics[0]
    assert first.flow_loss == ref.flow_loss and ref.loss == ref.flow_loss  # same forward; baseline: flow only
    assert first.load_balancing_loss > 0 and first.loss == pytest.approx(first.flow_loss + first.load_balancing_loss,
                                                                          rel=1e-6)


def caption_dropout_feeds_the_empty_caption(run, base, base_config, root):
    empty = _empty_caption_pooled(root)

    def dropped(r: Run) -> int:
        return sum(_close(row, empty) for pooled in r.pooled for row in pooled)

    assert dropped(base) == 0 and dropped(run) >= 2  # of 3 samples at p = 0.9


def init_lokr_norm_starts_w1_at_one(run, base, base_config, root):
    w1 = [v for k, v in run.lokr.items() if k.endswith("lokr_w1")]
    drift = max((v - 1).abs().max().item() for v in w1)  # 3 steps of about lr each at most
    assert drift <= 3.5 * LEARNING_RATE
    assert max((v - 1).abs().max().item() for k, v in base.lokr.items() if k.endswith("lokr_w1")) > 0.1


def seed_draws_other_noise_and_another_lokr(run, base, base_config, root):
    assert not _close(torch.cat(run.timesteps), torch.cat(base.timesteps))
    w1 = [k for k in run.lokr if k.endswith("lokr_w1")]
    assert all(not torch.equal(run.lokr[k], base.lokr[k]) for k in w1)


def batch_two_feeds_two_samples(run, base, base_config, root):
    assert [len(t) for t in base.timesteps] == [1] * STEPS and [len(t) for t in run.timesteps] == [2] * STEPS
    assert all(not _close(p[0], p[1]) for p in run.pooled)  # two captions per batch


def accumulation_runs_two_forwards_per_step(run, base, base_config, root):
    assert len(run.metrics) == STEPS and len(run.timesteps) == 2 * len(base.timesteps)
    assert all(len(t) == 1 for t in run.timesteps)


def bf16_computes_in_bf16_close_to_float32(run, base, base_config, root):
    assert base.dtypes == {torch.float32} and run.dtypes == {torch.bfloat16}
    assert run.losses[0] == pytest.approx(base.losses[0], rel=0.01)


def quantised(kind: str, bound: float) -> Callable:
    def check(run, base, base_config, root):
        assert base.layers == {"Linear"} and kind in run.layers
        assert run.losses[0] == pytest.approx(base.losses[0], rel=bound)  # the same model, in fewer bits
    check.__name__ = f"runs_{kind}_within_{bound}"
    return check


def learning_rate_moves_the_lokr_further(run, base, base_config, root):
    assert run.w2_norm() > 20 * base.w2_norm()  # lr 100x: Adam's steps are about lr each


def lion_steps_are_lr_times_a_sign(run, base, base_config, root):
    def integer_share(r: Run) -> float:  # share of W2 entries that are a whole number of lr (all start at 0)
        units = r.w2() / LEARNING_RATE
        return ((units - units.round()).abs() < 1e-3).float().mean().item()

    assert integer_share(run) == 1.0 and (run.w2() / LEARNING_RATE).abs().max() <= STEPS + 1e-3
    assert integer_share(base) < 0.5  # AdamW's later steps are not whole multiples of lr


def prodigy_starts_with_tiny_steps(run, base, base_config, root):
    assert run.w2_norm() < 0.01 * base.w2_norm()  # its step size d starts at 1e-6 and grows


def clipping_to_almost_nothing_shrinks_the_steps(run, base, base_config, root):
    assert run.metrics[0].grad_norm == base.metrics[0].grad_norm  # logged before clipping
    assert run.w2_norm() < 0.1 * base.w2_norm()  # gradients far below Adam's eps move the weights far less


def warmup_ramps_the_learning_rate(run, base, base_config, root):
    rates = [m.learning_rate for m in run.metrics]  # the rate after each step, for the next one
    assert [m.learning_rate for m in base.metrics] == [LEARNING_RATE] * STEPS
    assert rates == sorted(rates) and rates[0] < LEARNING_RATE and rates[-1] == LEARNING_RATE


@pytest.mark.parametrize("key, value, first_step_changes, effect", [
    ("flow_schedule_shift", 1.0, True, shift_one_trains_at_the_unshifted_sigmas),
    ("flow_schedule_auto_shift", True, True, auto_shift_uses_the_resolution_shift),
    ("hidream_use_load_balancing_loss", True, True, load_balancing_adds_the_aux_loss),
    ("caption_dropout_probability", 0.9, True, caption_dropout_feeds_the_empty_caption),
    ("init_lokr_norm", 1e-2, True, init_lokr_norm_starts_w1_at_one),
    ("seed", 8, True, seed_draws_other_noise_and_another_lokr),
    ("train_batch_size", 2, True, batch_two_feeds_two_samples),
    ("gradient_accumulation_steps", 2, True, accumulation_runs_two_forwards_per_step),
    ("mixed_precision", "bf16", True, bf16_computes_in_bf16_close_to_float32),
    ("base_model_precision", "int8-quanto", True, quantised("QLinear:qint8", 1e-3)),
    ("base_model_precision", "int4-quanto", True, quantised("QLinear:qint4", 0.03)),
    ("base_model_precision", "fp8-quanto", True, quantised("QLinear:qfloat8_e4m3fn", 0.01)),
    ("base_model_precision", "fp8-scaled", True, quantised("ScaledFp8Linear", 2e-3)),
    ("base_model_precision", "int8-scaled", True, quantised("ScaledInt8Linear", 1e-3)),
    ("learning_rate", 1e-1, False, learning_rate_moves_the_lokr_further),  # the first loss is before any update
    ("optimizer", "optimi-lion", False, lion_steps_are_lr_times_a_sign),
    ("optimizer", "prodigy", False, prodigy_starts_with_tiny_steps),
    ("max_grad_norm", 1e-8, False, clipping_to_almost_nothing_shrinks_the_steps),
    ("lr_scheduler", "constant_with_warmup", False, warmup_ramps_the_learning_rate),  # lr 0 for the first update
])
def test_key_has_its_effect(setup, key, value, first_step_changes, effect):
    config, base_config, baseline, root = setup
    extra = {"lr_warmup_steps": 2} if key == "lr_scheduler" else {}
    run = train_recorded(config(f"{key}-{value}", **{key: value}, **extra))
    assert len(run.metrics) == STEPS and run.losses[2] != baseline.losses[2]
    assert (run.losses[0] != baseline.losses[0]) == first_step_changes
    effect(run, baseline, base_config, root)


def test_load_balancing_weight_applies_once(setup):
    config, _, _, _ = setup
    runs = {w: train(config(f"lb{w}", max_train_steps=1, hidream_use_load_balancing_loss=True,
                            hidream_load_balancing_loss_weight=w)).losses[0] for w in (0.01, 0.02)}
    flow_only = train(config("lb0", max_train_steps=1)).losses[0]
    aux_01, aux_02 = runs[0.01] - flow_only, runs[0.02] - flow_only
    assert aux_01 > 0 and aux_02 == pytest.approx(2 * aux_01, rel=1e-4)  # linear in the weight: applied once


def test_grad_clip_method_value_clips_elementwise_not_by_norm(setup):
    config, _, _, _ = setup
    by = {method: train(config(f"clip-{method}", max_train_steps=2, max_grad_norm=1e-4,
                               grad_clip_method=method)).losses for method in ("norm", "value")}
    assert by["norm"][0] == by["value"][0] and by["norm"][1] != by["value"][1]
