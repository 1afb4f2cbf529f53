"""Feedback from judges, measured (issue 26): offline DPO vs online DPO (oracle labels, reward-model labels)
vs iterative DPO vs RLOO vs GRPO, all from ONE SFT model on the embedded default, judged by the oracle on
the 123 held-out prompts.

    python bench/feedback.py                      # runs/demo/sft and runs/demo/reward must exist (make demo)
    python bench/feedback.py --sft runs/demo/sft --reward runs/demo/reward --out runs/fbbench

Every stage is the shipped recipe with its ``*_tiny.yaml`` (output_dir and model overridden), run as a child
process so its CPU seconds (user + system, all threads) are measured. A stage whose run folder holds
``run_complete.json`` is skipped (a rerun resumes; its CPU seconds are kept in ``<out>/timings.json``).
The evaluation always reruns (its caches make a repeat cheap). KL to SFT is measured here the same way for
every method: one answer per held-out prompt sampled at temperature 1, k1 estimate summed over the answer
(``models.generation.sampled_kl``), so DPO gets a KL too. Writes bench/results/feedback.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, machine, table  # noqa: E402


def stages(
    sft: str, reward: str, out: Path, rounds: int, steps: int | None, online_lr: float | None = None
) -> dict[str, list[str]]:
    """Method -> recipe command line (after ``python``)."""

    def cmd(recipe: str, config: str, name: str, *extra: str) -> list[str]:
        return [
            f"recipes/{recipe}.py", "--config", f"recipes/configs/{config}.yaml",
            "--output_dir", str(out / name), "--model_name_or_path", sft, *extra,
        ]  # fmt: skip

    cut = ["--max_steps", str(steps)] if steps else []
    return {
        "dpo_offline": cmd("dpo", "dpo_tiny", "dpo_offline"),
        "online_dpo_oracle": cmd("online_dpo", "online_dpo_tiny", "online_dpo_oracle", "--reward_funcs", "oracle", *cut),
        "online_dpo_rm": cmd("online_dpo", "online_dpo_tiny", "online_dpo_rm", "--reward_funcs", reward, *cut),
        **(
            {f"online_dpo_oracle_lr{online_lr:g}": cmd(
                "online_dpo", "online_dpo_tiny", f"online_dpo_oracle_lr{online_lr:g}", "--reward_funcs", "oracle",
                "--learning_rate", str(online_lr), *cut,
            )}
            if online_lr else {}
        ),
        "iterative_dpo": cmd("iterative_dpo", "iterative_dpo_tiny", "iterative_dpo", "--rounds", str(rounds)),
        "rloo": cmd("rloo", "rloo_tiny", "rloo", "--reward_funcs", reward, *cut),
        "grpo": cmd("grpo", "grpo_tiny", "grpo", "--reward_funcs", reward, *cut),
    }  # fmt: skip


def cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_stage(name: str, argv: list[str], folder: Path, timings: dict, timings_path: Path) -> None:
    if (folder / "run_complete.json").exists():
        print(f"[feedback] {name}: complete ({folder}), skipped", flush=True)
        return
    print(f"[feedback] {name}: python {' '.join(argv)}", flush=True)
    log = folder.with_name(folder.name + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    cpu, wall = cpu_children(), time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.run([sys.executable, *argv], cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"[feedback] {name} failed (exit {proc.returncode}); see {log}")
    timings[name] = {"cpu_s": round(cpu_children() - cpu, 1), "wall_s": round(time.perf_counter() - wall, 1)}
    timings_path.write_text(json.dumps(timings, indent=2) + "\n")
    print(f"[feedback] {name}: {timings[name]}", flush=True)


def evaluate(systems: dict[str, str], out: Path) -> Path:
    """eval/configs/embedded.yaml with our systems, the oracle judge only, and our output folder."""
    import yaml

    config = yaml.safe_load((ROOT / "eval/configs/embedded.yaml").read_text())
    for key in [key for key in config if key.startswith("best_of_n")]:
        config.pop(key)  # no best-of-N system here
    config.update(
        systems=[f"{name}={path}" for name, path in systems.items()],
        base="sft",
        judges=["oracle"],
        optional_judges=[],
        output_dir=str(out / "eval"),
    )
    path = out / "eval_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [sys.executable, "eval/win_rate.py", "--config", str(path)]
    print(f"[feedback] eval: {' '.join(argv[1:])}", flush=True)
    with (out / "eval.log").open("w") as handle:
        proc = subprocess.run(argv, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"[feedback] eval failed (exit {proc.returncode}); see {out / 'eval.log'}")
    return out / "eval"


def kl_to_sft(systems: dict[str, str], prompts: list[str], seed: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align_kit.models.generation import sampled_kl

    sft = systems["sft"]
    tokenizer = AutoTokenizer.from_pretrained(sft)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    reference = AutoModelForCausalLM.from_pretrained(sft).eval().requires_grad_(False)
    kls = {}
    with torch.no_grad():
        for name, path in systems.items():
            if name == "sft":
                continue
            policy = AutoModelForCausalLM.from_pretrained(path).eval().requires_grad_(False)
            kls[name] = sampled_kl(policy, reference, tokenizer, prompts, seed=seed)
    return kls


def own_report(folder: str) -> dict | None:
    """The recipe's own policy report (64 held-out prompts, its own reward) where it writes one."""
    path = Path(folder) / "metrics.json"
    if not path.exists():
        return None
    metrics = json.loads(path.read_text())
    return metrics.get("report")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", default="runs/demo/sft")
    parser.add_argument("--reward", default="runs/demo/reward")
    parser.add_argument("--out", default="runs/fbbench")
    parser.add_argument("--rounds", type=int, default=2, help="iterative DPO rounds")
    parser.add_argument(
        "--steps", type=int, default=None, help="cut online DPO, RLOO, GRPO to this many steps"
    )
    parser.add_argument(
        "--online_lr",
        type=float,
        default=None,
        help="also run online DPO with oracle labels at this learning rate (the YAML's 5e-6 barely moves)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result", default=str(RESULTS / "feedback.json"))
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    for folder in (args.sft, args.reward):
        if not (Path(folder) / "run_complete.json").exists():
            sys.exit(
                f"[feedback] {folder} is not a finished run folder (run `make demo` first, or pass --sft/--reward)"
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    plan = stages(args.sft, args.reward, out, args.rounds, args.steps, args.online_lr)
    for name, command in plan.items():
        run_stage(name, command, out / name, timings, timings_path)

    systems = {"sft": args.sft, **{name: str(out / name) for name in plan}}
    eval_dir = evaluate(systems, out)

    from align_kit import demo, files

    scores = demo.oracle_means(eval_dir)
    evaluation = json.loads((eval_dir / "evaluation.json").read_text())
    versus_sft = {
        c["system"]: c for c in evaluation["judges"]["oracle"]["comparisons"] if c["baseline"] == "sft"
    }
    prompts = [row["prompt"] for row in files.read_jsonl(eval_dir / "generations" / "sft.jsonl")]
    kls = kl_to_sft(systems, prompts, args.seed)

    rows, figures = [], {}
    for name in systems:
        c = versus_sft.get(name)
        fig = {
            "oracle": scores[name]["oracle"],
            "oracle_by_family": scores[name]["by_family"],
            "n": scores[name]["n"],
            "win_rate_vs_sft": c and c["win_rate"],
            "ci": c and [c["ci_low"], c["ci_high"]],
            "counts_vs_sft": c and c["counts"],
            "kl_to_sft_sampled": kls.get(name),
            "run_policy_report": own_report(systems[name]),
            "cpu_s": timings.get(name, {}).get("cpu_s"),
            "wall_s": timings.get(name, {}).get("wall_s"),
            "command": plan.get(name),
        }
        figures[name] = fig
        wr = f"{100 * c['win_rate']:.1f}% ({100 * c['ci_low']:.1f}-{100 * c['ci_high']:.1f})" if c else "-"
        kl = f"{kls[name]:.2f}" if name in kls else "-"
        cpu = f"{fig['cpu_s']:.0f}" if fig["cpu_s"] is not None else "-"
        rows.append([name, fig["oracle"], wr, kl, cpu])
    print(table(rows, ["method", "oracle", "win rate vs SFT (95% CI)", "KL to SFT", "CPU s"]))
    beats = figures["online_dpo_oracle"]["oracle"] > figures["dpo_offline"]["oracle"]
    print(f"[feedback] online DPO with oracle labels beats offline DPO's oracle score: {beats}")
    payload = {
        "name": "feedback",
        "figures": figures,
        "targets": {"online_dpo_oracle_beats_offline_dpo": "oracle score"},
        "passed": {"online_dpo_oracle_beats_offline_dpo": beats},
        "settings": {
            "sft": args.sft,
            "reward": args.reward,
            "rounds": args.rounds,
            "steps": args.steps,
            "online_lr": args.online_lr,
        },
        "eval_config": str(out / "eval_config.yaml"),
        "machine": machine(),
    }
    result = Path(args.result)
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    print(f"[feedback] wrote {result}")
    return payload


if __name__ == "__main__":
    main()
