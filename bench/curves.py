"""Over-optimisation curves on the embedded default, and what measuring them costs.

Trains (or reuses) the demo's SFT model and reward model (recipes/configs/sft_tiny.yaml, reward_tiny.yaml), then
runs the demo's PPO (ppo_tiny.yaml) and best-of-N fine-tuning (best_of_n_tiny.yaml, more rounds) with curves on:
proxy = the demo's reward model, gold = the task's exact oracle, sampled KL (k1) to the SFT model. Writes
bench/results/curves.json (peaks, ends, fits, the callback's overhead as a fraction of PPO's training time) and
bench/results/curves/ (curves.png, curves.html, curves.json from ``align-kit curves``).

    .venv/bin/python bench/curves.py [--ppo_curve_steps 2] [--bon_rounds 4] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from common import RESULTS, table, write_result

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.10  # the curve callback's share of a PPO run's training time
SELECTED: set[str] = set()  # the stages --stages asks for


def stage(name: str, argv: list[str], done: Path) -> float:
    """Run a recipe's main unless ``done`` exists; seconds taken."""
    from align_kit.resources import load_script

    if done.exists() or name not in SELECTED:
        print(
            f"[bench] {name}: {'reusing' if done.exists() else 'not selected, skipped'} {done.parent}",
            flush=True,
        )
        return 0.0
    start = time.perf_counter()
    load_script(ROOT / "recipes" / f"{name}.py", f"bench_{name}").main(argv)
    return time.perf_counter() - start


def measure_tax(out: Path, n_prompts: int = 64) -> dict:
    """Each trained system's alignment tax against the SFT model on the embedded task: perplexity on held-out
    prompts with their chosen answers, and the oracle per family of greedy answers; written to
    bench/results/alignment_tax.json."""
    from align_kit.configs import DataArgs, ModelArgs
    from align_kit.data.loading import load_preferences
    from align_kit.evaluation import tax
    from align_kit.models.generation import generate
    from align_kit.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(out / "sft"))
    rows = load_preferences(DataArgs(dataset="embedded"), tokenizer)[0]["test"]
    first = list({row["prompt"]: row for row in rows}.values())[:n_prompts]
    prompts = [row["prompt"] for row in first]
    texts = [f"{row['prompt']} {row['chosen']}" for row in first]
    systems = {
        name: str(out / name)
        for name in ("sft", "dpo", "ppo", "best_of_n")
        if (out / name / "run_complete.json").exists()
    }
    answers = {
        name: [
            a[0]
            for a in generate(
                load_model(ModelArgs(model_name_or_path=path)), tokenizer, prompts, 48, progress=False
            )
        ]
        for name, path in systems.items()
    }
    result = tax.alignment_tax(systems, "sft", texts, prompts, answers)
    for line in tax.tax_lines(result):
        print(line)
    write_result("alignment_tax", result, {}, {})
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ppo_curve_steps", type=int, default=2, help="PPO updates between curve points.")
    parser.add_argument(
        "--bon_rounds", type=int, default=4, help="Best-of-N fine-tuning rounds (a point each)."
    )
    parser.add_argument(
        "--out",
        default="runs/curves",
        help="Folder of the PPO and best-of-N runs (run from the repository root).",
    )
    parser.add_argument(
        "--sft_epochs", type=float, default=None, help="SFT epochs (default: sft_tiny.yaml's 3)."
    )
    parser.add_argument(
        "--ppo_episodes", type=int, default=None, help="PPO total_episodes (default: ppo_tiny's 512)."
    )
    parser.add_argument(
        "--bon_prompts", type=int, default=None, help="Best-of-N prompts_per_round (default 256)."
    )
    parser.add_argument(
        "--stages", nargs="+", default=["sft", "reward", "ppo", "best_of_n", "report"],
        help="What to run (separate processes can train ppo and best_of_n side by side, then 'report').",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="Smoke version: 64 PPO episodes, 2 rounds.")
    args = parser.parse_args(argv)
    out = Path(args.out)
    SELECTED.update(args.stages)
    # the demo's SFT and reward models (their own YAML, written under --out; --sft_epochs shortens SFT on a
    # machine too busy for the demo's three epochs)
    sft = ["--config", "recipes/configs/sft_tiny.yaml", "--output_dir", str(out / "sft")]
    sft += ["--num_train_epochs", str(args.sft_epochs)] if args.sft_epochs else []
    stage("sft", sft, out / "sft" / "run_complete.json")
    models = ["--model_name_or_path", str(out / "sft")]
    reward = ["--config", "recipes/configs/reward_tiny.yaml", "--output_dir", str(out / "reward"), *models]
    stage("reward", reward, out / "reward" / "run_complete.json")
    models += ["--reward_models", str(out / "reward")]
    curve = ["--curve_prompts", "64", "--curve_max_new_tokens", "48", "--curve_greedy", "true", *models]
    quick = ["--total_episodes", "64"] if args.quick else []
    quick += ["--total_episodes", str(args.ppo_episodes)] if args.ppo_episodes else []
    ppo_s = stage(
        "ppo",
        ["--config", "recipes/configs/ppo_tiny.yaml", "--output_dir", str(out / "ppo"), *curve, *quick]
        + ["--curve_steps", str(args.ppo_curve_steps)],
        out / "ppo" / "run_complete.json",
    )
    rounds = 2 if args.quick else args.bon_rounds
    bon_s = stage(
        "best_of_n",
        ["--config", "recipes/configs/best_of_n_tiny.yaml", "--output_dir", str(out / "best_of_n"), *curve]
        + ["--rounds", str(rounds), "--curve_steps", "1"]
        + (["--prompts_per_round", str(args.bon_prompts)] if args.bon_prompts else []),
        out / "best_of_n" / "run_complete.json",
    )
    if "tax" in SELECTED:
        measure_tax(out)
    if "report" not in SELECTED:
        return {}
    from align_kit.evaluation import curve_report

    report = curve_report.main([str(out / "ppo"), str(out / "best_of_n"), "--out", str(RESULTS / "curves")])
    ppo_points = [json.loads(line) for line in (out / "ppo" / "curves.jsonl").read_text().splitlines()]
    # the PPO stage's wall time from its run folder (run_config.json is written at the start, run_complete.json
    # last), so a stage trained by another process counts too; the curves' share of the rest is the overhead
    stage_wall = (out / "ppo" / "run_complete.json").stat().st_mtime - (
        out / "ppo" / "run_config.json"
    ).stat().st_mtime
    curve_s = sum(p["seconds"] for p in ppo_points)
    overhead = curve_s / (stage_wall - curve_s)
    per_point = curve_s / len(ppo_points)
    per_update = (stage_wall - curve_s) / max(p["step"] for p in ppo_points)  # loading and report included
    rows = [
        [s["method"], s["gold_peak"]["kl"], s["gold_peak"]["gold"], s["gold_peak"]["step"], s["gold_end"],
         s["proxy_peak"]["kl"], s["proxy_end"], s["kl_end"], s["gold_peaks_before_proxy"]]
        for s in report["runs"]
    ]  # fmt: skip
    print(
        table(
            rows,
            [
                "method",
                "KL@gold peak",
                "gold@peak",
                "peak step",
                "gold end",
                "KL@proxy peak",
                "proxy end",
                "KL end",
                "gold before proxy",
            ],
        )  # fmt: skip
    )
    print(
        f"\nPPO: {len(ppo_points)} points at curve_steps {args.ppo_curve_steps}, {curve_s:.1f} s of curves in a "
        f"{stage_wall:.1f} s stage: overhead {100 * overhead:.1f}% of the stage without them (target <= 10%); "
        f"{per_point:.1f} s a point vs {per_update:.1f} s an update: <= 10% from curve_steps "
        f"{math.ceil(per_point / (0.1 * per_update))}"
    )
    figures = {
        "runs": report["runs"],
        "ppo": {"curve_steps": args.ppo_curve_steps, "points": len(ppo_points), "curve_seconds": curve_s,
                "stage_wall_s": stage_wall, "overhead": overhead, "seconds_per_point": per_point,
                "seconds_per_update": per_update,
                "stage_s": ppo_s},
        "best_of_n": {"rounds": rounds, "stage_s": bon_s},
        "quick": args.quick,
    }  # fmt: skip
    path = write_result("curves", figures, {"overhead_max": TARGET}, {"overhead": overhead <= TARGET})
    print(f"[bench] {path}")
    return figures


if __name__ == "__main__":
    main()
