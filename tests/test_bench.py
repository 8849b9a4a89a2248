"""`python -m trainer_core bench` in small CPU mode: valid JSON lines, the equivalence check passes. No timing is
asserted (speed figures belong in the benchmark's output, not in tests)."""
from __future__ import annotations

import json

from trainer_core.cli import main


def test_bench_small_cpu_training_mode_writes_json(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    profile = tmp_path / "profile.txt"
    code = main(["bench", "--size", "small", "--device", "cpu", "--modes", "bf16_nogc,offload_gc", "--steps", "1",
                 "--warmup", "0", "--ablate", "--out", str(out), "--profile", str(profile)])
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
    assert train["speedups"]["fast_lokr_modules"] > 0 and train["speedups"]["grouped_moe_layers"] == 6
    assert train["speedups"]["lean_rope_layers"] > 0
    assert train["reference_lokr"] == "rebuild"  # the naive stock step: LyCORIS' default forward
    assert set(train["ablation"]) == {"without_fast_lokr", "without_fast_moe_dispatch", "without_lean_rope",
                                      "without_grouped_moe_dispatch", "with_batched_lokr"}
    # The project's step reads nothing on the host (counted by dispatch); diffusers' MoE masks do, and the sorted
    # dispatch reads its expert sizes once per layer.
    assert train["host_syncs_per_step"] == train["project"]["host_syncs_per_step"] == 0, train["project"]
    assert train["reference"]["host_syncs_per_step"] > 0
    # per MoE layer: the sorted dispatch's bincount and .tolist(), the stock gate's one_hot range checks (2, CPU only)
    assert train["ablation"]["without_grouped_moe_dispatch"]["host_syncs_per_step"] == 6 * 4
    assert train["compiled"] is False and train["graph_breaks"] == 0 and train["first_step_s"] > 0
    for variant in train["ablation"].values():
        assert variant["check_passed"] and variant["step_s"] > 0 and variant["slowdown_vs_project"] > 0
    base = train["base_model"]  # the adapter-free stock step: no LoKr, so fewer FLOPs and kernels than the LoKr steps
    assert 0 < base["flops_per_step"] < train["project"]["flops_per_step"]
    assert 0 < base["kernels_per_step"] < train["project"]["kernels_per_step"]
    # the copy-free LoKr form launches fewer kernels than the einsum form, and than LyCORIS' bypass
    batched = train["ablation"]["with_batched_lokr"]["kernels_per_step"]
    assert batched < train["project"]["kernels_per_step"]
    assert batched < train["ablation"]["without_fast_lokr"]["kernels_per_step"]
    assert base["adapter_side_bound"] == train["reference_step_s"] / base["step_s"]
    assert train["torch"] and train["lycoris"] and train["date"]
    # --profile: the project step's time split by kind of work; matmuls lead on a CPU, the table names them
    split = train["profile"]["seconds_by_kind"]
    assert max(split, key=split.get) == "matmul" and split["attention"] > 0
    assert 0 < train["profile"]["busy_s"] <= train["profile"]["wall_s"] * 1.05
    assert "bf16_nogc, project step" in profile.read_text() and "aten::mm" in profile.read_text()
    assert "skipped" in offload and "cuda" in offload["skipped"]


def test_bench_rejects_unknown_mode(capsys):
    assert main(["bench", "--size", "small", "--device", "cpu", "--modes", "bf16_turbo"]) == 2
    err = capsys.readouterr().err
    assert "bf16_turbo" in err and "bf16_gc" in err
    assert main(["bench", "--size", "small", "--device", "cpu", "--optimizer", "sgd-turbo"]) == 2
    err = capsys.readouterr().err
    assert "sgd-turbo" in err and "optimi-lion" in err


def test_bench_times_the_quickstart_optimizer(tmp_path):
    """--optimizer optimi-lion (SimpleTuner's HiDream quickstart): both sides step with it and still agree, with no
    host read in the project's step (Lion's skip is decided on the device: a snapshot put back where the step is
    not finite). torch's AdamW runs fused (one kernel for all weights), Lion's for-loop one per weight (plus the
    snapshot's restore), which the step's kernel count shows."""
    rows = {}
    for name in ("optimi-lion", "adamw"):
        out = tmp_path / f"{name}.jsonl"
        assert main(["bench", "--size", "small", "--device", "cpu", "--modes", "bf16_nogc", "--steps", "1",
                     "--warmup", "0", "--optimizer", name, "--out", str(out)]) == 0
        rows[name] = json.loads(out.read_text())
    lion = rows["optimi-lion"]
    assert lion["optimizer"] == "optimi-lion" and lion["check"]["passed"], lion.get("check")
    assert lion["step_s"] > 0 and lion["host_syncs_per_step"] == 0
    assert 0 < rows["adamw"]["project"]["kernels_per_step"] < lion["project"]["kernels_per_step"]


def test_sequential_timing_caps_a_slow_configuration():
    """A configuration with `max_steps`/`max_warmup` (the offload reference) runs fewer steps than asked."""
    import torch

    from trainer_core.bench.timing import Timed, time_configs

    calls = {"fast": 0, "slow": 0}

    def timed(label, cap, warmup_cap):
        def step(_):
            calls[label] += 1
        return lambda: Timed(step, count_flops=False, max_steps=cap, max_warmup=warmup_cap)

    results = time_configs({"fast": timed("fast", None, None), "slow": timed("slow", 2, 1)}, torch.device("cpu"),
                           steps=5, warmup=2, interleave=False)
    assert calls == {"fast": 7, "slow": 3}
    assert len(results["fast"]["step_s_all"]) == 7 and len(results["slow"]["step_s_all"]) == 3


def test_time_budget_keeps_what_was_measured():
    """Past the deadline nothing new starts: the configuration being timed stops after one timed step, the ones not
    yet set up are left out (a GPU lent for minutes keeps every figure it measured)."""
    import time

    import torch

    from trainer_core.bench.timing import Timed, time_configs

    set_up = []

    def config(label):
        def setup():
            set_up.append(label)
            return Timed(lambda _: time.sleep(0.2), count_flops=False)
        return setup

    results = time_configs({label: config(label) for label in ("first", "second", "third")}, torch.device("cpu"),
                           steps=5, warmup=0, interleave=False, deadline=time.monotonic() + 0.3)
    assert set_up == ["first"] and list(results) == ["first"]
    assert 1 <= len(results["first"]["step_s_all"]) <= 2 and results["first"]["step_s"] >= 0.2


def test_time_budget_skips_later_modes_with_a_line_each(tmp_path):
    out = tmp_path / "results.jsonl"
    assert main(["bench", "--size", "small", "--device", "cpu", "--modes", "bf16_nogc,sample_cfg", "--steps", "1",
                 "--warmup", "0", "--time-budget", "0.001", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["mode"] for r in rows] == ["bf16_nogc", "sample_cfg"]
    assert all("time budget" in r["skipped"] for r in rows)


def test_a_mode_whose_reference_ran_out_of_time_still_writes_the_project(monkeypatch):
    """The offload reference is slow: when the budget ends after the project was timed, the row keeps the
    project's figures and says what did not run, instead of losing the mode."""
    import torch

    from trainer_core.bench import modes as bench
    from trainer_core.bench import timing

    spent = {"now": False}
    make_config = bench._train_config

    def config_then_spend(mode, label, *args):
        timed = make_config(mode, label, *args)
        spent["now"] = True  # the budget ends while the project's step is being timed
        return timed

    monkeypatch.setattr(bench, "_train_config", config_then_spend)
    for module in (bench, timing):  # the budget check where modes start and where steps are timed
        monkeypatch.setattr(module, "past", lambda deadline: spent["now"])
    opts = bench.BenchOptions(size=bench.SIZES["small"], device=torch.device("cpu"), dtype=torch.float32, steps=3, warmup=0,
                              sequential=True, deadline=0.0)
    row = bench.run_train_mode("bf16_nogc", opts)
    assert row["step_s"] > 0 and len(row["project"]["step_s_all"]) == 1  # one timed step, then it stopped
    assert row["reference"] is None and row["reference_step_s"] is None and row["check"] is None
    assert row["not_run_for_time"] == ["reference"]


def test_bench_compiled_step_has_no_host_sync_and_no_graph_break(tmp_path, monkeypatch):
    """`bench --compile` on the small config, checkpointed: every block compiled whole (MoE included), 0 graph
    breaks, 0 host syncs in the step, the check passing. The aot_eager backend keeps it cheap (dynamo's graphs
    and AOT autograd, which decide breaks and host reads, without inductor's code generation: the tiny-model
    tests cover inductor's numerics)."""
    monkeypatch.setenv("HIDREAM_COMPILE_BACKEND", "aot_eager")
    out = tmp_path / "compiled.jsonl"
    assert main(["bench", "--size", "small", "--device", "cpu", "--modes", "bf16_gc", "--steps", "1", "--warmup",
                 "0", "--compile", "--compile-cache", str(tmp_path / "cache"), "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert "error" not in row, row
    assert row["compiled"] is True and row["graph_breaks"] == 0, row["project"]
    assert row["host_syncs_per_step"] == 0, row["project"]["host_syncs_by_op"]
    assert row["project"]["whole_blocks"] == 6 and row["project"]["recompiles"] == 0
    assert row["check"]["passed"], row["check"]
    assert row["first_call_s"] > 0 and row["speedups"]["compiled_blocks"] == 6
    assert row["reference"]["compiled"] is False and row["reference"]["host_syncs_per_step"] > 0
