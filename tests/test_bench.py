"""`python -m trainer_core bench` in small CPU mode: valid JSON lines, the equivalence check passes. No timing is
asserted (speed figures belong in the benchmark's output, not in tests)."""
from __future__ import annotations

import json

from trainer_core.cli import main


def test_bench_small_cpu_training_mode_writes_json(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    code = main(["bench", "--size", "small", "--device", "cpu", "--modes", "bf16_nogc,offload_gc", "--steps", "1",
                 "--warmup", "0", "--ablate", "--out", str(out)])
    assert code == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["mode"] for r in printed] == [r["mode"] for r in written] == ["bf16_nogc", "offload_gc"]
    train, offload = written
    assert "error" not in train, train
    assert train["size"] == "small" and train["timing"] == "interleaved"
    for key in ("step_s", "reference_step_s", "speedup_vs_reference", "tflops_per_s"):
        assert train[key] > 0, key
    assert train["project"]["flops_per_step"] > 1e9
    check = train["check"]
    assert check["passed"], check
    assert check["grad_tensors"] > 0 and check["loss_rel_err"] <= 1e-4 and check["grad_rel_err"] <= 1e-3
    assert train["speedups"]["fast_lokr_modules"] > 0 and train["speedups"]["sorted_moe_layers"] > 0
    assert train["speedups"]["lean_rope_layers"] > 0
    assert train["reference_lokr"] == "rebuild"  # the naive stock step: LyCORIS' default forward
    assert set(train["ablation"]) == {"without_fast_lokr", "without_fast_moe_dispatch", "without_lean_rope"}
    for variant in train["ablation"].values():
        assert variant["check_passed"] and variant["step_s"] > 0 and variant["slowdown_vs_project"] > 0
    base = train["base_model"]  # the adapter-free stock step: no LoKr, so fewer FLOPs than the LoKr steps
    assert 0 < base["flops_per_step"] < train["project"]["flops_per_step"]
    assert base["adapter_side_bound"] == train["reference_step_s"] / base["step_s"]
    assert train["torch"] and train["lycoris"] and train["date"]
    assert "skipped" in offload and "cuda" in offload["skipped"]


def test_bench_rejects_unknown_mode(capsys):
    assert main(["bench", "--size", "small", "--device", "cpu", "--modes", "bf16_turbo"]) == 2
    err = capsys.readouterr().err
    assert "bf16_turbo" in err and "bf16_gc" in err


def test_sequential_timing_caps_a_slow_configuration():
    """A configuration with `max_steps` (the offload reference) runs fewer timed steps than `--steps`."""
    import torch

    from trainer_core.bench import Timed, time_configs

    calls = {"fast": 0, "slow": 0}

    def timed(label, cap):
        def step(_):
            calls[label] += 1
        return lambda: Timed(step, count_flops=False, max_steps=cap)

    results = time_configs({"fast": timed("fast", None), "slow": timed("slow", 2)}, torch.device("cpu"), steps=5,
                           warmup=1, interleave=False)
    assert calls == {"fast": 6, "slow": 3}
    assert len(results["fast"]["step_s_all"]) == 6 and len(results["slow"]["step_s_all"]) == 3
