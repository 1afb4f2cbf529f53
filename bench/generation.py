"""Batched generation against one prompt at a time, same model, same prompts, measured side by side.

``align_kit.models.generation.generate`` with every prompt in one left-padded batch (KV cache, stop at EOS)
against the same function called with ``batch_size=1``. A random GPT-2 (byte tokenizer, default 4 layers
x 128) answers held-out prompts of the embedded task; it never emits EOS early, so both modes generate
every one of the ``new_tokens`` tokens and do the same work per prompt. Target: >= 3x prompts/s.
Greedy answers of the two modes are also compared (padding may change float rounding, not the text).

Run: .venv/bin/python bench/generation.py [--quick]   (writes bench/results/generation[_quick].json)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, table, write_result  # noqa: E402

from align_kit.data import task  # noqa: E402
from align_kit.models.generation import generate  # noqa: E402
from align_kit.models.loading import TinyGPT2Shape, build_byte_tokenizer, build_tiny_gpt2  # noqa: E402

TARGETS = {"batched_vs_one_at_a_time_speedup": 3.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=64, help="Prompts answered by each mode.")
    parser.add_argument("--new-tokens", type=int, default=32, help="Tokens generated per prompt.")
    parser.add_argument("--batch-size", type=int, default=64, help="Batch size of the batched mode.")
    parser.add_argument("--layers", type=int, default=4, help="Random GPT-2 depth.")
    parser.add_argument("--width", type=int, default=128, help="Random GPT-2 width.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed passes per mode; the fastest counts.")
    parser.add_argument(
        "--quick", action="store_true", help="Smoke run (16 prompts, 8 tokens); writes generation_quick.json."
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.new_tokens, args.batch_size, args.repeats = 16, 8, 16, 1
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    shape = TinyGPT2Shape(n_layer=args.layers, n_embd=args.width, n_head=4)
    model, tokenizer = build_tiny_gpt2(shape).eval(), build_byte_tokenizer()
    prompts = [e.prompt for e in task.generate(args.prompts, split="test", seed=0)]
    prompt_tokens = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    settings = {"max_new_tokens": args.new_tokens, "progress": False}

    generate(model, tokenizer, prompts[:4], batch_size=4, **settings)  # warm-up
    batched_s, single_s = [], []
    for _ in range(args.repeats):  # alternate the modes and keep the fastest: the CPU is shared
        start = time.perf_counter()
        batched = generate(model, tokenizer, prompts, batch_size=args.batch_size, **settings)
        batched_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        single = generate(model, tokenizer, prompts, batch_size=1, **settings)
        single_s.append(time.perf_counter() - start)
    batched_s, single_s = min(batched_s), min(single_s)
    answer_tokens = [len(ids) for ids in tokenizer([a[0] for a in single])["input_ids"]]

    figures = {
        "model": f"random GPT-2 {args.layers}x{args.width}",
        "prompts": len(prompts),
        "new_tokens": args.new_tokens,
        "mean_prompt_tokens": sum(prompt_tokens) / len(prompt_tokens),
        "mean_answer_tokens_one_at_a_time": sum(answer_tokens) / len(answer_tokens),
        "batch_size": args.batch_size,
        "batched_prompts_per_s": len(prompts) / batched_s,
        "one_at_a_time_prompts_per_s": len(prompts) / single_s,
        "batched_vs_one_at_a_time_speedup": single_s / batched_s,
        "same_greedy_answers": sum(a == b for a, b in zip(batched, single, strict=True)) / len(prompts),
    }
    passed = {key: figures[key] >= target for key, target in TARGETS.items()}
    rows = [
        [
            f"generate {args.new_tokens} tokens, {figures['model']}",
            figures["one_at_a_time_prompts_per_s"],
            figures["batched_prompts_per_s"],
            f"{figures['batched_vs_one_at_a_time_speedup']:.1f}x",
            f"{TARGETS['batched_vs_one_at_a_time_speedup']:.0f}x",
            "yes" if all(passed.values()) else "NO",
        ]
    ]
    print(
        table(
            rows, ["comparison", "one-at-a-time/s", f"batch {args.batch_size}/s", "speedup", "target", "ok"]
        )
    )
    print(
        f"({len(prompts)} prompts of {figures['mean_prompt_tokens']:.0f} tokens on average, "
        f"{figures['mean_answer_tokens_one_at_a_time']:.0f} answer tokens each; identical greedy answers in "
        f"{figures['same_greedy_answers']:.0%} of prompts; torch threads {machine()['torch_threads']})"
    )
    name = "generation_quick" if args.quick else "generation"
    path = write_result(name, figures, TARGETS, passed)
    return {"name": name, "figures": figures, "targets": TARGETS, "passed": passed, "path": str(path)}


if __name__ == "__main__":
    main()
