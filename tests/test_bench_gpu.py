"""Protects bench/gpu.py, the GPU benchmark kit, on machines without a GPU: its CPU dry run goes through
every part (the DPO recipe against raw TRL, the adapter-off against a copied reference, full fine-tuning
against the residual adapter and LoRA, logit against generating judges) and writes the layout the GPU run
commits, with measured figures, ratios and MFU computed from them as documented, and targets with met
flags; the real run stops with one line where there is no CUDA, and a dry run never writes gpu.json."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

BENCH = ROOT / "bench"


def load_gpu_bench():
    sys.path.insert(0, str(BENCH))
    try:
        import gpu
    finally:
        sys.path.remove(str(BENCH))
    return gpu


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_bench") / "gpu_dry_run.json"
    command = [sys.executable, str(BENCH / "gpu.py"), "--dry-run", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "dry run: CPU figures, not judged" in done.stdout
    return json.loads(out.read_text())


def positive(values) -> bool:
    return len(values) > 0 and all(math.isfinite(v) and v > 0 for v in values)


@pytest.mark.slow
def test_dry_run_writes_the_gpu_layout_with_the_issue_targets(dry_run):
    assert set(dry_run) == {"name", "figures", "targets", "passed", "machine"}
    assert dry_run["name"] == "gpu"
    machine = dry_run["machine"]
    assert machine["dry_run"] is True and machine["device"] in {"cpu", "cuda"}
    assert all(machine[package] for package in ("torch", "transformers", "trl", "peft", "accelerate"))
    targets = dry_run["targets"]
    assert targets["recipe_vs_raw_trl_tokens_per_s_min"] == 0.97
    assert targets["adapter_off_vs_copied_reference_memory_max"] == 0.7
    assert targets["logits_vs_generate_speedup_min"] == 10.0
    figures = dry_run["figures"]
    assert {"dpo", "reference", "adapters", "judge"} <= set(figures)
    assert not any("error" in figures[part] for part in ("dpo", "reference", "adapters", "judge"))
    assert (
        figures["peak"]["peak_flops"] == figures["peak"]["measured_matmul_flops"] > 0
    )  # no datasheet on CPU


@pytest.mark.slow
def test_dpo_recipe_and_raw_trl_train_the_same_job_and_mfu_follows_the_palm_count(dry_run):
    dpo, peak = dry_run["figures"]["dpo"], dry_run["figures"]["peak"]["peak_flops"]
    steps = dry_run["figures"]["shapes"]["dpo"]["steps"]
    for case in ("recipe", "raw_trl"):
        row = dpo[case]
        assert all(len(run) == steps for run in row["step_s"]) and positive(sum(row["step_s"], []))
        # every row has the same length, and TRL's own count of attended tokens agrees
        assert row["tokens_per_step"] == 2 * row["batch"] * row["seq_len"] == row["trl_tokens_per_step"]
        assert row["tokens_per_s"] == pytest.approx(row["tokens_per_step"] / row["step_s_median"])
        n, lhq = row["matmul_params"], row["n_layer"] * row["n_head"] * row["head_dim"]
        flops = row["tokens_per_step"] * (8 * n + 16 * lhq * row["seq_len"])
        assert row["model_flops_per_step"] == flops
        assert row["mfu"] == pytest.approx(flops / row["step_s_median"] / peak)
        assert row["peak_memory_mb"] > 0
        # the reference is the starting policy: the first DPO loss is -log sigmoid(0)
        assert row["losses"][0] == pytest.approx(math.log(2), abs=1e-4)
    assert dpo["recipe"]["matmul_params"] == dpo["raw_trl"]["matmul_params"]
    ratio = dpo["recipe"]["tokens_per_s"] / dpo["raw_trl"]["tokens_per_s"]
    assert dpo["recipe_vs_raw_trl_tokens_per_s"] == pytest.approx(ratio)
    assert "16*L*H*Q*T" in dpo["flops_formula"]


@pytest.mark.slow
def test_reference_adapters_and_judge_figures_are_measured(dry_run):
    figures = dry_run["figures"]
    reference = figures["reference"]
    for case in ("copied", "adapter_off"):
        assert reference[case]["peak_memory_mb"] > 0 and reference[case]["step_s_median"] > 0
        assert reference[case]["losses"][0] == pytest.approx(math.log(2), abs=1e-4)
    off, copied = reference["adapter_off"]["peak_memory_mb"], reference["copied"]["peak_memory_mb"]
    assert reference["adapter_off_vs_copied_memory"] == pytest.approx(off / copied)
    assert reference["saving_mb"] == pytest.approx(copied - off)

    adapters = figures["adapters"]
    for case in ("full", "residual", "lora"):
        assert positive(adapters[case]["step_s"]) and adapters[case]["peak_memory_mb"] > 0
        ratio = adapters[case]["step_s_median"] / adapters["full"]["step_s_median"]
        assert adapters[case]["step_time_vs_full"] == pytest.approx(ratio)
    assert adapters["full"]["trainable_pct"] == pytest.approx(100.0)
    # the adapter and LoRA are sized to about the same trainable count, a few percent of the model
    assert 0.5 < adapters["residual"]["trainable"] / adapters["lora"]["trainable"] < 2
    assert adapters["residual"]["trainable_pct"] < 5

    judge = figures["judge"]
    assert positive(judge["logits_s"] + judge["generate_s"])
    assert judge["logits_pairs_per_s"] == pytest.approx(judge["pairs"] / min(judge["logits_s"]))
    assert judge["logits_vs_generate_speedup"] == pytest.approx(
        min(judge["generate_s"]) / min(judge["logits_s"])
    )
    assert 0 <= judge["generate_parse_failure_rate"] <= 1


@pytest.mark.slow
def test_met_flags_follow_the_figures(dry_run):
    figures, targets, passed = dry_run["figures"], dry_run["targets"], dry_run["passed"]
    assert passed == {
        "recipe_vs_raw_trl_tokens_per_s": figures["dpo"]["recipe_vs_raw_trl_tokens_per_s"]
        >= targets["recipe_vs_raw_trl_tokens_per_s_min"],
        "mfu_reported": figures["dpo"]["recipe"]["mfu"] > 0,
        "adapter_off_reference_memory": figures["reference"]["adapter_off_vs_copied_memory"]
        <= targets["adapter_off_vs_copied_reference_memory_max"],
        "logits_vs_generate_speedup": figures["judge"]["logits_vs_generate_speedup"]
        >= targets["logits_vs_generate_speedup_min"],
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for machines without CUDA")
def test_without_cuda_the_gpu_run_stops_with_one_line():
    with pytest.raises(SystemExit) as stopped:
        load_gpu_bench().main([])
    message = str(stopped.value)
    assert "sees no CUDA GPU" in message and "--dry-run" in message and "\n" not in message


def test_a_dry_run_never_writes_the_committed_gpu_result():
    target = BENCH / "results" / "gpu.json"
    before = target.read_bytes() if target.exists() else None
    with pytest.raises(SystemExit, match="never writes bench/results/gpu.json"):
        load_gpu_bench().main(["--dry-run", "--out", str(target)])
    assert (target.read_bytes() if target.exists() else None) == before
