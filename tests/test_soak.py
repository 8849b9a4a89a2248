"""Soak: 300 steps on the tiny model with a checkpoint every 25, validation every 50 and two stop/resume
cycles. Resident memory must not grow after warm-up (< 50 MB) and no file descriptors may leak; the step-time
curve is printed (figures, not assertions: speed goals live in benchmarks)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import psutil
import pytest

from helpers import tiny_train_config, write_shapes_dataset
from trainer_core.training import TrainingCallbacks, train

ITEMS = [("circle", "red", "blue"), ("square", "green", "yellow"), ("circle", "yellow", "green"),
         ("square", "blue", "red")]
TOTAL, STOPS, WARM_UP = 300, (100, 200), 100
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"  # gitignored; CI logs show the printed summary too


@pytest.mark.slow
def test_three_hundred_steps_with_resumes_do_not_leak(tiny_model_dir, tmp_path):
    data = write_shapes_dataset(tmp_path / "shapes", ITEMS, size=32)
    process = psutil.Process()
    samples: dict[int, tuple[int, int]] = {}  # step -> (rss bytes, open fds)
    seconds: dict[int, float] = {}

    def make_callbacks(stop_at: int) -> TrainingCallbacks:
        done = {"step": 0}

        def on_step(metrics) -> None:
            done["step"] = metrics.step
            seconds[metrics.step] = metrics.seconds_per_step
            if metrics.step % 25 == 0:
                samples[metrics.step] = (process.memory_info().rss, process.num_fds())

        return TrainingCallbacks(on_step=on_step, should_stop=lambda: done["step"] >= stop_at)

    config = tiny_train_config(tiny_model_dir, data, tmp_path / "out", max_train_steps=TOTAL, learning_rate=1e-4,
                               dataset_resolution=32, checkpoint_step_interval=25, checkpoints_total_limit=2,
                               validation_prompt="a red circle", validation_step_interval=50,
                               validation_resolution=(32, 32), validation_num_inference_steps=2,
                               disable_benchmark=True, resume_from_checkpoint="latest")
    for stop_at in (*STOPS, TOTAL):
        result = train(config, make_callbacks(stop_at))
    assert result.steps_done == TOTAL and not result.stopped and len(result.losses) == TOTAL

    print("\nsoak: resident MB by step:", {step: round(rss / 2**20) for step, (rss, _) in sorted(samples.items())})
    rss_warm, fds_warm = samples[WARM_UP]
    rss_end, fds_end = samples[TOTAL]
    growth_mb = (max(rss for step, (rss, _) in samples.items() if step >= WARM_UP) - rss_warm) / 2**20
    curve = {start: statistics.median(seconds[s] for s in range(start + 1, start + 101))
             for start in range(0, TOTAL, 100)}
    print(f"\nsoak: resident memory {rss_warm / 2**20:.0f} MB at step {WARM_UP}, {rss_end / 2**20:.0f} MB at step "
          f"{TOTAL} (largest growth {growth_mb:+.1f} MB); open files {fds_warm} -> {fds_end}")
    print("soak: median seconds per step by step range: "
          + ", ".join(f"{s + 1}-{s + 100}: {v * 1000:.0f} ms" for s, v in curve.items()))
    summary = {"rss_mb_at_warm_up": rss_warm / 2**20, "rss_mb_at_end": rss_end / 2**20, "largest_growth_mb": growth_mb,
               "open_files": [fds_warm, fds_end], "median_ms_per_step": {f"{s + 1}-{s + 100}": v * 1000
                                                                        for s, v in curve.items()}}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "soak.json").write_text(json.dumps(summary, indent=1))
    assert growth_mb < 50
    assert fds_end <= fds_warm
