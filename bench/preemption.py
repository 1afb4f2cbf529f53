"""What a preemption costs, per recipe: SIGTERM after the first checkpoint, then the same command again.

Each recipe runs on the embedded task as a fresh process; once its checkpoint-2 is verified (best-of-N: once
round 1 is finished) it gets SIGTERM. The table gives the exit status, the seconds from the signal to the
exit, the step it stopped after, whether its checkpoint verified, and the resumed run: its final step, and
how many optimizer steps were trained twice (0 means nothing but the step in flight was lost, and that one
was finished). PPO cannot resume in TRL 1.12: it says what is lost.

    .venv/bin/python bench/preemption.py [--recipes sft dpo ...]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import PYTHON, table, write_result

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import recipe_argv  # noqa: E402

from align_kit.training import checkpoints  # noqa: E402

COMMON = {
    "dataset": "embedded", "embedded_train_size": "48", "embedded_test_size": "24", "logging_steps": "1",
    "per_device_train_batch_size": "8", "max_length": "128", "seed": "0", "learning_rate": "1e-3",
    "eval_strategy": "no", "dataloader_num_workers": "0",
}  # fmt: skip
STEPS = {"max_steps": "8", "save_strategy": "steps", "save_steps": "2"}
RECIPES = {
    "sft": STEPS,
    "dpo": {**STEPS, "beta": "0.1"},
    "kto": {**STEPS, "beta": "0.1"},
    "reward": STEPS,
    "grpo": {**STEPS, "num_generations": "4", "max_completion_length": "8", "beta": "0.1", "report_prompts": "4"},
    "best_of_n": {"rounds": "3", "samples_per_prompt": "3", "keep_top_k": "1", "prompts_per_round": "6",
                  "max_new_tokens": "10", "report_prompts": "4", "max_steps": "2", "per_device_train_batch_size": "3"},
    "ppo": {"total_episodes": "64", "per_device_train_batch_size": "4", "num_ppo_epochs": "1",
            "response_length": "8", "num_sample_generations": "0", "report_prompts": "4", "save_strategy": "no"},
}  # fmt: skip
NEEDS_REWARD = {"grpo", "best_of_n", "ppo"}


def started(recipe: str, out: Path) -> bool:
    """The point to send SIGTERM at: a verified first checkpoint, round 1 finished, or PPO's first update."""
    if recipe == "best_of_n":
        return (out / "round_1" / "report.json").exists()
    if recipe == "ppo":
        return any(out.glob("*.json")) and time.sleep(8) is None  # past loading, into its updates
    return (out / "checkpoint-2" / checkpoints.MANIFEST).exists()


def trained_steps(out: Path) -> list[int]:
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    return [e["step"] for e in history if "loss" in e]


def one(recipe: str, tmp: Path, reward_dir: Path | None) -> list:
    out = tmp / recipe
    values = {**COMMON, "output_dir": str(out), **RECIPES[recipe]}
    if recipe in ("grpo", "ppo"):
        values.pop("max_length")  # online methods bound the answer instead
    if recipe in NEEDS_REWARD:
        values["reward_models" if recipe != "grpo" else "reward_funcs"] = str(reward_dir)
    command = [PYTHON, str(ROOT / "recipes" / f"{recipe}.py"), *recipe_argv(values)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp / f"{recipe}.log", "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        while not started(recipe, out) and process.poll() is None:
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        status = process.wait()
    seconds = time.monotonic() - sent
    line = next(
        (t for t in (tmp / f"{recipe}.log").read_text().splitlines() if t.startswith("align-kit:")), ""
    )
    stops = json.loads((out / "stopped.json").read_text()) if (out / "stopped.json").exists() else []
    step = stops[-1]["step"] if stops else None
    verified = checkpoints.checkpoint_problem(Path(stops[-1]["checkpoint"])) is None if stops else None
    if recipe == "ppo":
        return [recipe, status, round(seconds, 2), "-", "-", "-", "-", line.split(": ", 1)[-1][:90]]
    again = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if again.returncode != 0:
        return [
            recipe,
            status,
            round(seconds, 2),
            step,
            verified,
            f"resume failed ({again.returncode})",
            "-",
            line,
        ]
    steps = trained_steps(out)
    redone = len(steps) - len(set(steps))
    final = json.loads((out / "run_complete.json").read_text())["global_step"]
    return [recipe, status, round(seconds, 2), step, verified, final, redone, line.split(": ", 1)[-1][:60]]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="preemption-"))
    reward_dir = None
    if NEEDS_REWARD & set(args.recipes):
        from conftest import EMBEDDED_NAME, build_byte_tokenizer

        from align_kit.models.loading import load_reward_model

        reward_dir = tmp / "reward_model"
        load_reward_model(EMBEDDED_NAME, pad_token_id=257).save_pretrained(reward_dir)
        build_byte_tokenizer().save_pretrained(reward_dir)
    rows = [one(recipe, tmp, reward_dir) for recipe in args.recipes]
    header = [
        "recipe",
        "exit",
        "s to exit",
        "stopped after",
        "verified",
        "final step",
        "steps redone",
        "line",
    ]
    print(table(rows, header))
    figures = {row[0]: dict(zip(header[1:], row[1:], strict=True)) for row in rows}
    passed = {r[0]: r[1] == 75 and (r[0] == "ppo" or r[6] == 0) for r in rows}
    write_result("preemption", figures, {"exit": 75, "steps redone": 0}, passed)
    return figures


if __name__ == "__main__":
    main()
