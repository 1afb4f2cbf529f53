"""Cost of the hand-written MLP adapter against full fine-tuning and peft LoRA, and of its adapter-off
reference in DPO.

Usage: python bench/adapters.py [--quick]

Part 1, training step: on the GPT-2 124M shape (random weights, fp32), a plain AdamW loop on a causal-LM
loss for full fine-tuning, the residual adapter, the replace adapter and peft LoRA on the MLPs, all at about
the same trainable count. Step times are the fastest timed step; with one thread (the default) ratios use
its CPU time, which waiting for a shared core does not inflate.
``residual_upper`` (adapters in the upper half of the blocks only) is shown for information: the targets
are judged on residual and replace in every block. Part 2, DPO: a real TRL DPOTrainer with a residual
adapter and either the adapter-off reference or a deep-copied reference model. Every case runs in its own
subprocess with one torch thread by default, so its peak RSS (``ru_maxrss`` of that process) holds nothing
from the others. Writes bench/results/adapters.json (--quick: adapters_quick.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CASES = ("full", "residual", "replace", "lora", "residual_upper")
DPO_CASES = ("dpo_copied", "dpo_adapter_off")
TARGETS = {
    "adapter_step_time_ratio_max": 0.6,
    "adapter_peak_rss_ratio_max": 0.6,
    "adapter_trainable_pct_max": 2.0,
    "dpo_adapter_off_rss_ratio_max": 0.7,
}


def shape(quick: bool) -> dict:
    """Model, batch and step counts; --quick is a smoke run on a small model."""
    if quick:
        return {
            "n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": 50257, "batch": 2, "seq": 32,
            "warmup": 1, "steps": 2, "rank": 16, "lora_r": 4,
            "dpo_steps": 2, "dpo_batch": 2, "dpo_max_length": 64,
        }  # fmt: skip
    # adapter rank 80 and LoRA r 16 on both MLP matrices give about 1.48M trainable parameters each (1.2%)
    return {
        "n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "batch": 4, "seq": 128,
        "warmup": 1, "steps": 3, "rank": 80, "lora_r": 16,
        "dpo_steps": 3, "dpo_batch": 2, "dpo_max_length": 64,
    }  # fmt: skip


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build(cfg: dict):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=cfg["vocab_size"], n_layer=cfg["n_layer"], n_embd=cfg["n_embd"], n_head=cfg["n_head"],
        bos_token_id=256, eos_token_id=256, pad_token_id=257,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def adapt(model, case: str, cfg: dict):
    """Turn the base model into the case's trainable model (full: unchanged)."""
    from align_kit.configs import AdapterArgs
    from align_kit.models.adapters import freeze_non_adapter, inject_adapters

    if case in ("residual", "replace"):
        inject_adapters(model, AdapterArgs(adapter=case, adapter_rank=cfg["rank"], adapter_init="pretrained"))
        freeze_non_adapter(model)
    elif case == "residual_upper":  # upper half of the blocks at twice the rank: backward stops halfway down
        upper = ",".join(str(i) for i in range(cfg["n_layer"] // 2, cfg["n_layer"]))
        inject_adapters(
            model, AdapterArgs(adapter="residual", adapter_rank=2 * cfg["rank"], adapter_layers=upper)
        )
        freeze_non_adapter(model)
    elif case == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg["lora_r"], lora_alpha=2 * cfg["lora_r"], lora_dropout=0.0, fan_in_fan_out=True,
            target_modules=r".*\.mlp\.(c_fc|c_proj)",
        )  # fmt: skip
        model = get_peft_model(model, lora)
    return model


def child_train(case: str, cfg: dict) -> dict:
    """Time ``cfg['steps']`` AdamW steps after ``cfg['warmup']`` on a (batch, seq) causal-LM loss."""
    import torch

    model = build(cfg)
    base_params = sum(p.numel() for p in model.parameters())
    model = adapt(model, case, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    model.train()
    wall, cpu = [], []
    for step in range(cfg["warmup"] + cfg["steps"]):
        input_ids = torch.randint(0, cfg["vocab_size"], (cfg["batch"], cfg["seq"]), generator=generator)
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= cfg["warmup"]:
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    n_trainable = sum(p.numel() for p in trainable)
    return {
        "case": case,
        "trainable": n_trainable,
        "base_params": base_params,
        "trainable_pct": 100 * n_trainable / base_params,
        "step_s": min(wall),  # the least disturbed step: other processes share these cores
        "step_s_median": statistics.median(wall),
        "step_s_all": wall,
        "step_cpu_s": min(cpu),
        "step_cpu_s_all": cpu,
        "peak_rss_mb": peak_rss_mb(),
        "final_loss": loss.item(),
    }


def child_dpo(case: str, cfg: dict) -> dict:
    """A few steps of TRL's DPOTrainer with a residual-adapter policy and the case's reference model."""
    import copy
    import tempfile

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from align_kit.models.adapters import AdapterOffReference
    from align_kit.models.loading import build_byte_tokenizer

    imports_rss_mb = peak_rss_mb()  # interpreter + torch + TRL: the same for every case
    policy = build(cfg)
    reference = copy.deepcopy(policy).eval() if case == "dpo_copied" else None  # copied before any training
    policy = adapt(policy, "residual", cfg)
    if reference is None:
        reference = AdapterOffReference(policy)
    rows = [
        {
            # short prompts: DPO drops rows whose prompt alone fills max_length
            "prompt": f"\n\nHuman: {i}+{i + 2}?\n\nAssistant:",
            "chosen": f" It is {2 * i + 2}.",
            "rejected": f" Maybe {3 * i + 7}, or so.",
        }
        for i in range(cfg["dpo_batch"] * cfg["dpo_steps"])
    ]
    with tempfile.TemporaryDirectory() as output_dir:
        args = DPOConfig(
            output_dir=output_dir, per_device_train_batch_size=cfg["dpo_batch"], max_steps=cfg["dpo_steps"],
            max_length=cfg["dpo_max_length"], learning_rate=1e-4, logging_steps=1, save_strategy="no",
            report_to=[], bf16=False, use_cpu=True, gradient_checkpointing=False, dataloader_num_workers=0,
            disable_tqdm=True,
        )  # fmt: skip
        trainer = DPOTrainer(
            model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
            processing_class=build_byte_tokenizer(),
        )  # fmt: skip
        start, start_cpu = time.perf_counter(), time.process_time()
        trainer.train()
        elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "case": case,
        "step_s": elapsed / cfg["dpo_steps"],
        "step_cpu_s": elapsed_cpu / cfg["dpo_steps"],
        "peak_rss_mb": peak_rss_mb(),
        "imports_rss_mb": imports_rss_mb,
        "job_rss_mb": peak_rss_mb() - imports_rss_mb,
        "losses": losses,
    }


def run_child(case: str, quick: bool, threads: int) -> dict:
    """Run one case in a fresh interpreter; its last stdout line is the JSON result."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", case, "--threads", str(threads)]
    command += ["--quick"] if quick else []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRL_EXPERIMENTAL_SILENCE": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"bench case {case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine(threads: int) -> dict:
    """Adds to bench/common.py's description: this run's thread count and the load it started under."""
    return {"torch_threads": threads, "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def summarise(train: dict[str, dict], dpo: dict[str, dict], basis: str) -> tuple[dict, dict[str, bool]]:
    """Ratios to full fine-tuning (to the copied reference for DPO); step times compared by ``basis``."""
    full = train["full"]
    figures = {"time_basis": basis, "train": {}, "dpo": {}}
    for case, result in train.items():
        figures["train"][case] = {
            **result,
            "step_time_ratio": result[basis] / full[basis],
            "peak_rss_ratio": result["peak_rss_mb"] / full["peak_rss_mb"],
        }
    for case, result in dpo.items():
        figures["dpo"][case] = {
            **result,
            "peak_rss_ratio": result["peak_rss_mb"] / dpo["dpo_copied"]["peak_rss_mb"],
            "job_rss_ratio": result["job_rss_mb"] / dpo["dpo_copied"]["job_rss_mb"],
        }
    figures["dpo"]["reference_saving_mb"] = (
        dpo["dpo_copied"]["peak_rss_mb"] - dpo["dpo_adapter_off"]["peak_rss_mb"]
    )
    figures["dpo"]["model_mb"] = 4 * train["full"]["base_params"] / 2**20
    passed = {}
    for case in ("residual", "replace"):
        row = figures["train"][case]
        passed[f"{case}_step_time"] = row["step_time_ratio"] <= TARGETS["adapter_step_time_ratio_max"]
        passed[f"{case}_peak_rss"] = row["peak_rss_ratio"] <= TARGETS["adapter_peak_rss_ratio_max"]
        passed[f"{case}_trainable_pct"] = row["trainable_pct"] <= TARGETS["adapter_trainable_pct_max"]
    # The target is on the whole process's peak RSS. The job's own memory (peak RSS above the process
    # after importing torch and TRL, which no choice of reference can shed) is judged beside it.
    off = figures["dpo"]["dpo_adapter_off"]
    passed["dpo_adapter_off_peak_rss"] = off["peak_rss_ratio"] <= TARGETS["dpo_adapter_off_rss_ratio_max"]
    passed["dpo_adapter_off_job_rss"] = off["job_rss_ratio"] <= TARGETS["dpo_adapter_off_rss_ratio_max"]
    return figures, passed


def table(figures: dict) -> str:
    row_format = "{:<16}{:>12}{:>10}{:>8}{:>8}{:>8}{:>13}{:>8}"
    header = ("trainable", "% of base", "wall s", "cpu s", "x full", "peak RSS MB", "x full")
    lines = [row_format.format("case", *header)]
    for case, row in figures["train"].items():
        cells = (
            f"{row['trainable']:,}", f"{row['trainable_pct']:.2f}", f"{row['step_s']:.2f}",
            f"{row['step_cpu_s']:.2f}", f"{row['step_time_ratio']:.2f}", f"{row['peak_rss_mb']:.0f}",
            f"{row['peak_rss_ratio']:.2f}",
        )  # fmt: skip
        lines.append(row_format.format(case, *cells))
    lines.append(row_format.format("DPO reference", "", "", "wall s", "cpu s", "", "peak RSS MB", "x copy"))
    for case in DPO_CASES:
        row = figures["dpo"][case]
        cells = (
            "", "", f"{row['step_s']:.2f}", f"{row['step_cpu_s']:.2f}", "", f"{row['peak_rss_mb']:.0f}",
            f"{row['peak_rss_ratio']:.2f}",
        )  # fmt: skip
        lines.append(row_format.format(case, *cells))
    lines.append(f"step time ratios use {figures['time_basis']} (fastest timed step)")
    saving, model_mb = figures["dpo"]["reference_saving_mb"], figures["dpo"]["model_mb"]
    lines.append(
        f"adapter-off reference saves {saving:.0f} MB of peak RSS (one fp32 model: {model_mb:.0f} MB)"
    )
    off, copied = figures["dpo"]["dpo_adapter_off"], figures["dpo"]["dpo_copied"]
    lines.append(
        f"DPO job memory (peak RSS above the {copied['imports_rss_mb']:.0f} MB of torch+TRL imports): "
        f"copied {copied['job_rss_mb']:.0f} MB, adapter-off {off['job_rss_mb']:.0f} MB, "
        f"ratio {off['job_rss_ratio']:.2f} (target <= {TARGETS['dpo_adapter_off_rss_ratio_max']})"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model and few steps (smoke run)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per case; 1 by default: on shared cores two threads wait on each other and "
        "step times swing by 3x",
    )
    parser.add_argument("--child", choices=TRAIN_CASES + DPO_CASES, help=argparse.SUPPRESS)
    parser.add_argument(
        "--out", default=None, help="JSON results (default bench/results/adapters[_quick].json)"
    )
    args = parser.parse_args(argv)
    cfg = shape(args.quick)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        result = child_train(args.child, cfg) if args.child in TRAIN_CASES else child_dpo(args.child, cfg)
        print(json.dumps(result))
        return result

    started = time.perf_counter()
    info = machine(args.threads)
    train = {case: run_child(case, args.quick, args.threads) for case in TRAIN_CASES}
    dpo = {case: run_child(case, args.quick, args.threads) for case in DPO_CASES}
    # with one thread, CPU time is the work done and is not inflated by waiting for a shared core
    figures, passed = summarise(train, dpo, "step_cpu_s" if args.threads == 1 else "step_s")
    print(table(figures))
    print("targets:", ", ".join(f"{name} {'ok' if ok else 'MISSED'}" for name, ok in passed.items()))
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    info["wall_s"] = round(time.perf_counter() - started, 1)
    name = "adapters_quick" if args.quick else "adapters"
    out = common.write_result(
        name, {"shape": cfg, **figures}, TARGETS, passed, info, path=Path(args.out) if args.out else None
    )
    print(f"wrote {out} in {info['wall_s']} s")
    return {"name": name, "figures": figures, "targets": TARGETS, "passed": passed}


if __name__ == "__main__":
    main()
