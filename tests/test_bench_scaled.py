"""The 8-bit bench modes in small CPU mode (`bench --modes fp8_nogc,int8s_gc,sample_cfg_fp8`): each writes its line
with the stock reference beside it and passes the issue's accuracy bounds. No timing is asserted. (fp8_gc differs
from fp8_nogc by checkpointing only; fp8_offload_gc, ~20 s more here, runs on the CPU too: `--modes fp8_offload_gc`;
tests/test_fp8_base.py holds the streaming itself to the resident step.)"""
from __future__ import annotations

import json

from trainer_core.cli import main


def test_bench_8bit_modes_on_the_cpu(tmp_path):
    out = tmp_path / "results.jsonl"
    modes = ["fp8_nogc", "int8s_gc", "sample_cfg_fp8"]
    assert main(["bench", "--size", "small", "--device", "cpu", "--modes", ",".join(modes), "--steps", "1",
                 "--warmup", "0", "--out", str(out)]) == 0
    rows = {r["mode"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(rows) == modes
    for mode, row in rows.items():
        assert "error" not in row and "skipped" not in row, row
        assert row["step_s"] > 0 and row["reference_step_s"] > 0, mode
        assert row["check"]["passed"], (mode, row["check"])

    fp8 = rows["fp8_nogc"]  # against the stock bf16 (here float32) step: loss 2 %, gradient cosine 0.99
    assert fp8["base_precision"] == {"project": "fp8-scaled", "reference": "no_change",
                                     "check_against": "no_change (stock step)"}
    assert fp8["check"]["tolerance"] == {"loss": 0.02, "grad_cosine": 0.99}
    assert 0 < fp8["check"]["loss_rel_err"] <= 0.02 and fp8["check"]["grad_cosine"] >= 0.99
    assert fp8["speedups"]["fast_lokr_modules"] > 0 and fp8["project"]["flops_per_step"] > 1e9

    int8 = rows["int8s_gc"]  # timed against quanto int8 (today's int8 route), checked against the float step
    assert int8["base_precision"]["reference"] == "int8-quanto"
    assert int8["base_precision"]["check_against"] == "no_change (stock step)"
    assert int8["check"]["grad_cosine"] >= 0.99

    sample = rows["sample_cfg_fp8"]
    assert sample["lokr_applied_as"] == "bypass" and sample["lokr_vs_base"] > 0
    assert sample["check"]["velocity_cosine"] >= 0.995 and sample["check"]["lokr_effect_rel"] > 0
