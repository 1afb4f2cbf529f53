"""Evaluation on a benchmark prompt set in each layout: two tiny systems (random 1-layer GPT-2s with a
256-token context, so the long prompts of each set do not fit) judged pairwise by a random-head reward model,
and once more with single-answer grading. Prints the requested / judged / left-out table and the plan's
generation-time estimate (from the first batch) against the time generation took.

Usage: python bench/prompt_sets.py [--prompts 40]

The prompt files are written here in each layout (our own generated questions, no benchmark text); every
fifth prompt is long (about 200 tokens), every third has a reference answer, MT-Bench rows have two turns.
Writes bench/results/prompt_sets.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from align_kit.evaluation.pipeline import main as evaluate  # noqa: E402
from align_kit.models.loading import (  # noqa: E402
    EMBEDDED_NAME,
    TinyGPT2Shape,
    build_byte_tokenizer,
    build_tiny_gpt2,
    load_reward_model,
)

TOPICS = ["rivers", "bread", "clocks", "bridges", "owls", "glass", "chess", "tides", "maps", "bees"]


def question(i: int) -> str:
    text = f"In two sentences, what should a beginner know about {TOPICS[i % len(TOPICS)]} (case {i})?"
    return text + " Please be specific and keep in mind the following context. " * 6 if i % 5 == 4 else text


def rows(layout: str, n: int) -> list[dict]:
    out = []
    for i in range(n):
        q, ref = (
            question(i),
            (f"A short correct answer about {TOPICS[i % len(TOPICS)]}." if i % 3 == 0 else None),
        )
        if layout == "mt-bench":
            out.append({"question_id": i, "category": ["writing", "reasoning"][i % 2], "turns": [q, "Now say it in one sentence."]}
                       | ({"reference": [ref]} if ref else {}))  # fmt: skip
        elif layout == "arena-hard":
            out.append(
                {
                    "question_id": f"q{i}",
                    "category": "hard",
                    "cluster": TOPICS[i % 10],
                    "turns": [{"content": q}],
                }
            )
        elif layout == "alpacaeval":
            out.append({"instruction": q, "dataset": "mixed"} | ({"output": ref} if ref else {}))
        else:
            out.append({"prompt": q} | ({"reference": ref} if ref and layout == "prompts+ref" else {}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=40)
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="prompt_sets_"))
    for name, seed in (("a", 0), ("b", 1)):
        build_tiny_gpt2(
            TinyGPT2Shape(n_layer=1, n_embd=32, n_head=2, n_positions=256, seed=seed)
        ).save_pretrained(work / name)
        build_byte_tokenizer().save_pretrained(work / name)
    load_reward_model(EMBEDDED_NAME, pad_token_id=257).save_pretrained(work / "rm")
    build_byte_tokenizer().save_pretrained(work / "rm")
    results = []
    cases = [
        (layout, "pairwise") for layout in ("mt-bench", "arena-hard", "alpacaeval", "prompts", "prompts+ref")
    ]
    for layout, grading in cases + [("mt-bench", "single")]:
        data = work / f"{layout}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows(layout, options.prompts)))
        out = work / f"out_{layout}_{grading}"
        start = time.perf_counter()
        summary = evaluate(["--dataset", str(data), "--systems", f"a={work / 'a'}", f"b={work / 'b'}", "--base", "a",
                            "--judges", f"reward_model={work / 'rm'}", "--grading", grading, "--max_new_tokens", "24",
                            "--batch_size", "8", "--n_boot", "200", "--progress", "false", "--output_dir", str(out)])  # fmt: skip
        wall = time.perf_counter() - start
        counts = summary["judges"]["reward_model"]["prompts"]
        second = summary["judges"]["reward_model"].get("turn_2", {}).get("prompts")
        results.append({"layout": layout, "grading": grading, **counts, "turn_2": second, "plan": summary["plan"],
                        "wall_s": round(wall, 1)})  # fmt: skip
    print(
        "| layout | grading | requested | judged | left out (by reason) | turn 2 judged | est. generation s | actual generation s | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        left = ", ".join(f"{k}: {v}" for k, v in r["left_out"].items()) or "none"
        turn = f"{r['turn_2']['judged']}/{r['turn_2']['requested']}" if r["turn_2"] else "-"
        print(f"| {r['layout']} | {r['grading']} | {r['requested']} | {r['judged']} | {left} | {turn} | "
              f"{r['plan'].get('estimated generation s', '-')} | {r['plan'].get('actual generation s')} | {r['wall_s']} |")  # fmt: skip
    target = ROOT / "bench" / "results" / "prompt_sets.json"
    target.write_text(json.dumps(results, indent=2))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
