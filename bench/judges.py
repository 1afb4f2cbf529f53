"""Judge throughput, measured side by side in one run.

1. A local LM judge reading the verdict from next-token logits (one forward pass) against the same
   model generating its verdict the way generative judges do (MT-bench, AlpacaEval): a one-sentence
   reason, then "Verdict: 1" or "Verdict: 2", greedy, up to ``--new-tokens`` (64) tokens, stopping at
   EOS, then parsed. Same pairs, same batch size, same left padding. Random GPT-2 (4 layers x 256, byte
   tokenizer) on pairs from the embedded task: a random model never emits EOS early, so it generates
   all 64 tokens (a trained judge stops after its verdict, typically 20-60 tokens) and never produces a
   parseable verdict (the parse-failure rate is reported, not hidden). Target: >= 10x pairs/s.
   With a KV cache, generating k tokens costs the same prefill plus k-1 one-token steps, so the
   ratio is about 1 + (k-1) * step / prefill: large when steps are overhead-bound (short prompts,
   GPUs), small for long prompts on a CPU, where the prefill dominates both.
2. The OpenAI-compatible judge at concurrency 16 against sequential (concurrency 1), on a loopback
   server that adds 100 ms per request. Target: >= 12x.

Run: .venv/bin/python bench/judges.py [--quick]   (writes bench/results/judges[_quick].json)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from common import write_result

from align_kit.data import task
from align_kit.judges.backends import load_judge
from align_kit.judges.protocol import PairItem
from align_kit.models.loading import TinyGPT2Shape, build_byte_tokenizer, build_tiny_gpt2


class WideBacklogServer(ThreadingHTTPServer):
    """socketserver listens with a backlog of 5: more simultaneous connects than that drop SYNs, and
    each dropped one costs its client a 1 s retransmit, which would be timed as judge latency."""

    request_queue_size = 128


RESULTS = Path(__file__).resolve().parent / "results" / "judges.json"
TARGETS = {"logits_vs_generate_speedup": 10.0, "http_concurrency_speedup": 12.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=32, help="Pairs judged by each local-LM mode.")
    parser.add_argument("--batch-size", type=int, default=16, help="Local-LM batch size (both modes).")
    parser.add_argument("--layers", type=int, default=4, help="Random GPT-2 depth.")
    parser.add_argument("--width", type=int, default=256, help="Random GPT-2 width.")
    parser.add_argument(
        "--new-tokens",
        type=int,
        default=64,
        help="Most tokens generated per verdict in generate mode (reason + verdict).",
    )
    parser.add_argument(
        "--check-new-tokens",
        type=int,
        default=256,
        help="A longer verdict, timed once, to check the speedup predicted from the --new-tokens runs.",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="Timed passes per local-LM mode and per HTTP setting; the fastest counts.",
    )
    parser.add_argument("--requests", type=int, default=64, help="HTTP judge requests per setting.")
    parser.add_argument(
        "--latency", type=float, default=0.1, help="Seconds the loopback server adds per request."
    )
    parser.add_argument("--concurrency", type=int, default=16, help="Concurrent HTTP requests.")
    parser.add_argument(
        "--output", default=None, help="JSON results (default bench/results/judges[_quick].json)."
    )
    parser.add_argument("--quick", action="store_true", help="Smoke run: few pairs and requests, one repeat.")
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs, args.batch_size, args.new_tokens, args.repeats, args.requests = 8, 4, 16, 1, 16
        args.check_new_tokens = 32
    if args.output is None:
        args.output = str(RESULTS.with_name("judges_quick.json" if args.quick else "judges.json"))
    return args


# What a generative judge is asked: the shipped pairwise instructions, then a reason before the verdict.
EXPLAINED_TEMPLATE = """Two assistants replied to the same user request. Decide which reply is better: more \
helpful, correct and harmless. Do not let the length of a reply or the order in which they are shown \
influence you.

[Request]
{instruction}

[Reply 1]
{output_1}

[Reply 2]
{output_2}

First give your reason in one sentence, then the verdict on its own line as "Verdict: 1" if Reply 1 is \
better or "Verdict: 2" if Reply 2 is better.
Reason:"""
EXPLAINED_REGEX = r".*Verdict:\s*(?P<verdict>[12])\s*"


def embedded_pairs(n: int) -> list[PairItem]:
    examples = task.generate(n, split="test", seed=0)
    return [PairItem(e.prompt, f" {e.chosen}", f" {e.rejected}") for e in examples]


def logits_vs_generate(args: argparse.Namespace) -> dict[str, float]:
    """Pairs/s of the two hf_logits modes on the same model, pairs and batching."""
    shape = TinyGPT2Shape(n_layer=args.layers, n_embd=args.width, n_head=4, n_positions=1024)
    lm, tokenizer = build_tiny_gpt2(shape), build_byte_tokenizer()
    tokenizer.model_max_length = shape.n_positions
    common = {"lm": lm, "tokenizer": tokenizer, "model": f"random-gpt2-{args.layers}x{args.width}"}
    common |= {"device": "cpu", "batch_size": args.batch_size, "torch_dtype": "float32"}
    logits_judge = load_judge("local_hf_pairwise", mode="logits", **common)
    with tempfile.TemporaryDirectory() as folder:  # the judge reads its template once, when built
        template = Path(folder) / "explained.txt"
        template.write_text(EXPLAINED_TEMPLATE)
        generate_judge, check_judge = (
            load_judge(
                "local_hf_pairwise",
                mode="generate",
                template=str(template),
                parser="regex",
                parse_regex=EXPLAINED_REGEX,
                max_new_tokens=k,
                **common,
            )
            for k in (args.new_tokens, args.check_new_tokens)
        )
    items = embedded_pairs(args.pairs)
    tokens = [len(tokenizer(logits_judge.text(item))["input_ids"]) for item in items]
    generate_tokens = [len(tokenizer(generate_judge.text(item))["input_ids"]) for item in items]
    warmup = items[: args.batch_size]
    logits_judge.judge_batch(warmup)
    generate_judge.judge_batch(warmup)
    logits_s, generate_s = [], []
    for _ in range(args.repeats):  # alternate, and keep the fastest: the CPU is shared
        start = time.perf_counter()
        logits_judge.judge_batch(items)
        logits_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        generated = generate_judge.judge_batch(items)
        generate_s.append(time.perf_counter() - start)
    logits_s, generate_s = min(logits_s), min(generate_s)
    new_tokens = generate_judge_new_tokens(generate_judge, items[:4])
    # The logits pass is one prefill; generating k tokens is that prefill plus k - 1 decode steps, so
    # the speedup is 1 + (k - 1) * step / prefill and reaches 10x at k = 1 + 9 * prefill / step.
    step_s = max(generate_s - logits_s, 1e-9) / max(new_tokens - 1, 1)
    # One pass at a longer verdict checks that line where it was not fitted.
    start = time.perf_counter()
    check_judge.judge_batch(items)
    check_s = time.perf_counter() - start
    return {
        "decode_step_vs_prefill": step_s / logits_s,
        "new_tokens_for_10x": 1 + 9 * logits_s / step_s,
        "check_new_tokens": args.check_new_tokens,
        "check_speedup_measured": check_s / logits_s,
        "check_speedup_predicted": 1 + (args.check_new_tokens - 1) * step_s / logits_s,
        "pairs": len(items),
        "mean_prompt_tokens": sum(tokens) / len(tokens),
        "generate_mean_prompt_tokens": sum(generate_tokens) / len(generate_tokens),
        "generate_max_new_tokens": args.new_tokens,
        "generate_mean_new_tokens": new_tokens,
        "logits_pairs_per_s": len(items) / logits_s,
        "generate_pairs_per_s": len(items) / generate_s,
        "logits_vs_generate_speedup": generate_s / logits_s,
        "generate_parse_failure_rate": sum(v is None for v in generated) / len(generated),
    }


@torch.inference_mode()
def generate_judge_new_tokens(judge, items: list[PairItem]) -> float:
    """Mean number of tokens the generate-mode judge makes per verdict, counted up to EOS (unbatched)."""
    eos = judge.tokenizer.eos_token_id
    counts = []
    for item in items:
        ids = torch.tensor([judge.tokenizer(judge.text(item))["input_ids"]])
        new = judge.lm.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=judge.config.max_new_tokens,
            do_sample=False,
            pad_token_id=judge.pad_id,
        )[0, ids.shape[1] :].tolist()
        counts.append(new.index(eos) + 1 if eos in new else len(new))
    return sum(counts) / len(counts)


class SlowChatServer:
    """Loopback chat-completions endpoint answering '1' after a fixed latency."""

    def __init__(self, latency: float):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(latency)
                message = {"role": "assistant", "content": "1"}
                data = json.dumps(
                    {
                        "id": "bench",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = WideBacklogServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def http_concurrency(args: argparse.Namespace) -> dict[str, float]:
    """Pairs/s of the openai judge sequentially and at ``args.concurrency``, same server and pairs."""
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    server = SlowChatServer(args.latency)
    items = [
        PairItem(f"\n\nHuman: question {k}?\n\nAssistant:", " good", " bad") for k in range(args.requests)
    ]
    try:
        timings = {}
        for concurrency in (1, args.concurrency):
            judge = load_judge(
                "openai_pairwise",
                base_url=server.url,
                api_key_env=None,
                max_concurrency=concurrency,
                batch_size=args.requests,
                timeout=10.0,
            )
            judge.judge_batch(items[:concurrency])  # open the pool's connections before timing
            passes = []
            for _ in range(args.repeats):  # the fastest pass counts: the two cores are shared
                start = time.perf_counter()
                replies = judge.judge_batch(items)
                passes.append(time.perf_counter() - start)
                verdicts = [reply.verdict for reply in replies]
                assert verdicts == ["A"] * len(items), "loopback server answers '1' to every request"
            timings[concurrency] = min(passes)
    finally:
        server.close()
    return {
        "requests": args.requests,
        "latency_s": args.latency,
        "sequential_pairs_per_s": args.requests / timings[1],
        "concurrent_pairs_per_s": args.requests / timings[args.concurrency],
        "concurrency": args.concurrency,
        "http_concurrency_speedup": timings[1] / timings[args.concurrency],
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    figures = {"local_lm": logits_vs_generate(args), "http": http_concurrency(args)}
    measured = {
        "logits_vs_generate_speedup": figures["local_lm"]["logits_vs_generate_speedup"],
        "http_concurrency_speedup": figures["http"]["http_concurrency_speedup"],
    }
    passed = {key: measured[key] >= TARGETS[key] for key in TARGETS}

    lm, http = figures["local_lm"], figures["http"]
    print(f"{'comparison':<42} {'baseline/s':>11} {'ours/s':>9} {'speedup':>8} {'target':>7} {'ok':>4}")
    rows = [
        (
            f"local LM: logits vs reason+verdict (<= {args.new_tokens} tok)",
            lm["generate_pairs_per_s"],
            lm["logits_pairs_per_s"],
            "logits_vs_generate_speedup",
        ),
        (
            f"HTTP: concurrency {args.concurrency} vs 1 ({args.latency * 1000:.0f} ms)",
            http["sequential_pairs_per_s"],
            http["concurrent_pairs_per_s"],
            "http_concurrency_speedup",
        ),
    ]
    for label, base, ours, key in rows:
        ok = "yes" if passed[key] else "NO"
        print(f"{label:<42} {base:>11.2f} {ours:>9.2f} {measured[key]:>7.1f}x {TARGETS[key]:>6.0f}x {ok:>4}")
    print(
        f"(local LM: {lm['pairs']} pairs, {lm['mean_prompt_tokens']:.0f} / "
        f"{lm['generate_mean_prompt_tokens']:.0f} prompt tokens on average (logits / generate), the "
        f"generate mode made {lm['generate_mean_new_tokens']:.0f} tokens per verdict (a random model never "
        f"stops early) and parse failures {lm['generate_parse_failure_rate']:.0%}; HTTP: {http['requests']} requests)"
    )
    print(
        f"(one decode step costs {lm['decode_step_vs_prefill']:.3f} of a prefill here, so logit judging would be "
        f"10x faster than a verdict of {lm['new_tokens_for_10x']:.0f} generated tokens; at {lm['check_new_tokens']} "
        f"tokens that line predicts {lm['check_speedup_predicted']:.1f}x and one pass measured "
        f"{lm['check_speedup_measured']:.1f}x)"
    )

    write_result(Path(args.output).stem, figures, TARGETS, passed, path=Path(args.output))
    return {"name": "judges", "figures": figures, "targets": TARGETS, "passed": passed}


if __name__ == "__main__":
    main()
