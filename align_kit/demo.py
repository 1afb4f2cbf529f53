"""The main job on the embedded default (``make demo``): embedded task, SFT, DPO, and an oracle summary.

Each stage is its recipe run as a separate process with its YAML, exactly as a user would launch it.
A stage whose run folder is already complete is not run again, so rerunning the demo loses nothing
and costs only the summary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = [
    ("sft", "recipes/sft.py", "recipes/configs/sft_tiny.yaml"),
    ("dpo", "recipes/dpo.py", "recipes/configs/dpo_tiny.yaml"),
]


def run_stage(name: str, script: str, config: str, out_dir: Path) -> float:
    """Run one recipe unless its output folder already holds a finished run; returns seconds spent."""
    if (out_dir / name / "run_complete.json").exists():
        print(f"[demo] {name}: already complete in {out_dir / name}, skipped")
        return 0.0
    start = time.time()
    command = [sys.executable, str(ROOT / script), "--config", str(ROOT / config), "--output_dir", str(out_dir / name)]
    if name != "sft":
        command += ["--model_name_or_path", str(out_dir / "sft")]
    print(f"[demo] {name}: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True)
    return time.time() - start


def oracle_table(out_dir: Path, systems: dict[str, str], n_prompts: int) -> dict[str, dict]:
    """Greedy answers of each system on held-out prompts, scored by the embedded task's oracle."""
    from align_kit.configs import DataArgs, ModelArgs
    from align_kit.data import load_preferences
    from align_kit.generation import generate, oracle_scores
    from align_kit.models import load_model, load_tokenizer

    splits, _ = load_preferences(DataArgs())
    prompts = list(dict.fromkeys(row["prompt"] for row in splits["test"]))[:n_prompts]
    tokenizer = load_tokenizer(str(out_dir / "sft"))
    table = {}
    for name, path in systems.items():
        model = load_model(ModelArgs(model_name_or_path=path))
        answers = [a[0] for a in generate(model, tokenizer, prompts, max_new_tokens=48, batch_size=64)]
        table[name] = {**oracle_scores(prompts, answers), "example": answers[0]}
    return table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="runs/demo", help="Folder for every stage's run.")
    parser.add_argument("--n_prompts", type=int, default=200, help="Held-out prompts scored by the oracle.")
    args = parser.parse_args(argv)
    out_dir = Path(args.output_dir)
    timings = {name: run_stage(name, script, config, out_dir) for name, script, config in STAGES}
    systems = {"tiny-gpt2 (untrained)": "tiny-gpt2", "sft": str(out_dir / "sft"), "dpo": str(out_dir / "dpo")}
    table = oracle_table(out_dir, systems, args.n_prompts)
    summary = {"timings_s": timings, "oracle": table}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n[demo] oracle score on held-out prompts of the embedded task (1 = correct, helpful, harmless)")
    print(f"{'system':<24}{'oracle':>8}{'add':>8}{'greet':>8}{'harm':>8}{'n':>6}")
    for name, row in table.items():
        fam = row["by_family"]
        print(f"{name:<24}{row['oracle']:>8.3f}{fam.get('add', 0):>8.3f}{fam.get('greet', 0):>8.3f}"
              f"{fam.get('harm', 0):>8.3f}{row['n']:>6}")
    gain = table["dpo"]["oracle"] - table["sft"]["oracle"]
    print(f"[demo] DPO vs SFT: {gain:+.3f}; outputs in {out_dir}/ (summary.json, sft/, dpo/)")
    return summary


if __name__ == "__main__":
    main()
