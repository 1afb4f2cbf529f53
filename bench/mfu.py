"""How close a training step comes to this machine's own limit: model FLOPs utilisation (MFU) of SFT, DPO and
reward-model steps of the GPT-2 124M shape, the memory of chunked log-probabilities against TRL's full logits,
and bf16 against float32.

    .venv/bin/python bench/mfu.py [--quick] [--parts peak,steps,memory,bf16] [--threads N]

- peak: float32 and bf16 matrix products of the model's own shapes (tokens x 768 x 768/2304/3072 and
  tokens x 768 x 50257), timed in this process; the best rate of each dtype is the peak MFU is quoted against.
  Measured at the start and again at the end of the run; the higher of the two is used (the conservative MFU).
  On a GPU the datasheet peak (989 TFLOP/s dense bf16, H100/H200) is reported beside the measured one.
- steps: each case runs in its own child process (so its peak RSS is its own) through the trainer align-kit
  uses (align_kit.training.sft.SFTTrainer, align_kit.training.losses.DPOTrainer, trl.RewardTrainer), GPT2Config with random weights and
  vocabulary 50257 (nothing downloaded), batch 4 (pairs for DPO and the reward model) x 128 tokens, one warm-up
  step then timed steps. SFT: align-kit's chunked NLL (logprob_chunk_size 1024, its gradient made in the forward)
  and TRL's own chunked_nll (which recomputes the head in backward). DPO: full model and residual adapter,
  chunked (logprob_chunk_size 1024) and TRL's path.
- Model FLOPs per step, counted from the shapes: forward 2N per token (N = the matmul weights: 12 L d^2 + d V,
  the head counted for every token as in the standard MFU count) plus attention 4 L T d per token (QK^T and AV,
  not halved for the causal mask); backward 4N for trained weights and 2N for frozen weights that gradients
  pass through (an adapter's base); DPO adds the reference's forward. ``hw_flops`` counts what the chunked path
  really executes instead: the head only on answer tokens, recomputed once in backward (DPO; TRL's SFT).
- memory: one DPO step of 4 pairs at 256/512/1024 tokens (half prompt, half answer), chunked and TRL's path,
  each with every activation kept and with activation checkpointing (TRL's default): peak RSS above the child's
  baseline after imports. Models get ``adapters.lean_activations`` as align-kit's loaders give them.
- bf16: the SFT and full DPO steps under bf16 autocast against float32, where the CPU reports AVX512-BF16 or AMX.
- precompute: DPO steps with the reference's log-probabilities precomputed (``precompute_ref_log_probs``, kept in
  the run folder by align_kit/training/ref_cache.py) against the live reference; the precomputation runs before the
  first step, so every timed step is what a second epoch costs.

Writes bench/results/mfu.json (``--quick``: mfu_quick.json, a tiny shape for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PARTS = ("peak", "steps", "memory", "bf16", "precompute")
SHAPES = {
    "full": {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab": 50257, "seq": 128, "batch": 4, "steps": 3},
    "quick": {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab": 2048, "seq": 32, "batch": 2, "steps": 1},
}
MEMORY_SEQS = {"full": (256, 512, 1024), "quick": (32, 64)}
DATASHEET_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16
TARGETS = {
    "memory_chunked_over_trl_at_longest_plain": "<= 0.5 (every activation kept)",
    "memory_chunked_over_trl_at_longest_checkpointed": "<= 0.5 (activation checkpointing, TRL's default)",
    "time_chunked_over_trl": "<= 1.10",
    "mfu_fp32_sft_and_dpo": ">= 0.7",
    "bf16_over_fp32_step_time": "<= 0.6 where the CPU has native bf16",
    "precomputed_over_live_step_time": "<= 0.8",
}
CHUNK = 1024
CASE_LOG = common.RESULTS / "mfu_cases.jsonl"  # every finished case, one line each, as it finishes


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def machine_line(threads: int) -> dict:
    flags = set()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
    return {
        "threads": threads,
        "cpu_flags": [f for f in wanted if f in flags],
        "native_bf16": bool({"avx512_bf16", "amx_bf16"} & flags),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


# ---------------------------------------------------------------------------------------------------------
# FLOPs from the shapes


def flops(shape: dict, case: dict, seq: int, answer_tokens: int) -> dict:
    """Model FLOPs of one step (standard count) and the FLOPs the chosen path executes."""
    n_layer, d, vocab = shape["n_layer"], shape["n_embd"], shape["vocab"]
    body, head = 12 * n_layer * d * d, d * vocab
    attention = 4 * n_layer * seq * d  # per token, forward
    rows = shape["batch"] * (2 if case["method"] in ("dpo", "rm") else 1)
    tokens = rows * seq
    if case["method"] == "rm":
        head = d  # the score head, one output
    adapter = case.get("adapter_params", 0)
    forward = tokens * (2 * (body + head + adapter) + attention)
    if case.get("adapter"):  # frozen base: input gradients only; adapter weights: 4N
        backward = tokens * (2 * (body + head) + 4 * adapter + 2 * attention)
    else:
        backward = 2 * forward
    model = forward + backward
    if case["method"] == "dpo":
        model += tokens * (2 * (body + head) + attention)  # the reference's forward
    executed = model
    if case["method"] == "sft":  # the head only on tokens with a label; TRL's chunked_nll recomputes it
        executed = model - 6 * head * (tokens - answer_tokens)
        if not case.get("chunk"):
            executed += 2 * head * answer_tokens
    if case["method"] == "dpo" and case.get("chunk"):  # head only on answer tokens, + its recompute
        skipped = 2 * head * (tokens - answer_tokens)
        skipped_bwd = (4 if not case.get("adapter") else 2) * head * (tokens - answer_tokens)
        executed = model - 2 * skipped - skipped_bwd + 2 * head * answer_tokens
    return {"model_flops": float(model), "hw_flops": float(executed), "tokens": tokens}


# ---------------------------------------------------------------------------------------------------------
# The peak


def matmul_rate(m: int, k: int, n: int, dtype, seconds: float = 1.0) -> float:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype)
    a @ b  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * m * k * n * count / (time.perf_counter() - start)


def measure_peak(shape: dict, quick: bool) -> dict:
    import torch

    tokens, d = shape["batch"] * shape["seq"], shape["n_embd"]
    shapes = [
        (tokens, d, d),
        (tokens, d, 3 * d),
        (tokens, d, 4 * d),
        (tokens, 4 * d, d),
        (tokens, d, shape["vocab"]),
    ]
    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        rates = {f"{m}x{k}x{n}": matmul_rate(m, k, n, dtype, 0.2 if quick else 1.0) for m, k, n in shapes}
        out[name] = {"by_shape": rates, "peak_flops": max(rates.values())}
    return out


# ---------------------------------------------------------------------------------------------------------
# One case, in a child process


def letters(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


def child(job: dict) -> dict:
    import torch

    torch.set_num_threads(job["threads"])
    from datasets import Dataset
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, TrainerCallback

    from align_kit.configs import AdapterArgs
    from align_kit.models import adapters
    from align_kit.models.loading import build_byte_tokenizer
    from align_kit.training import launch

    baseline = rss_mb()
    shape, case, seq = job["shape"], job["case"], job["seq"]
    # as align_kit.training.runs.start does for every run (RunArgs.keep_freed_memory, default auto)
    cpu_autocast = case.get("bf16", False) and not torch.cuda.is_available()
    launch.keep_freed_memory(job.get("keep_freed_memory", "auto"), cpu_autocast)
    rng = random.Random(0)
    tokenizer = build_byte_tokenizer()  # one token per letter, so lengths are exact
    config = GPT2Config(
        vocab_size=shape["vocab"], n_positions=max(1024, seq), n_embd=shape["n_embd"], n_layer=shape["n_layer"],
        n_head=shape["n_head"], pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, num_labels=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = (GPT2ForSequenceClassification if case["method"] == "rm" else GPT2LMHeadModel)(config)
    adapters.lean_activations(model)  # as align_kit.models.loading does for every model it loads
    steps = job["steps"] + 1
    rows = shape["batch"] * steps
    half = seq // 2
    common_args = dict(
        output_dir=job["out"], per_device_train_batch_size=shape["batch"], max_steps=steps,
        use_cpu=not torch.cuda.is_available(),
        bf16=case.get("bf16", False), gradient_checkpointing=case.get("checkpointing", False),
        gradient_checkpointing_kwargs={"use_reentrant": False}, report_to="none", save_strategy="no",
        logging_steps=1, learning_rate=1e-6, dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )  # fmt: skip
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    if case["method"] == "sft":
        from align_kit.training.sft import SFTConfig, SFTTrainer

        data = Dataset.from_list([{"text": letters(rng, seq - 1)} for _ in range(rows)])
        args = SFTConfig(**common_args, max_length=seq, logprob_chunk_size=case.get("chunk", 0))
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        answer_tokens = shape["batch"] * (seq - 1)  # every token but the first is a label
    elif case["method"] == "rm":
        import trl

        data = Dataset.from_list(
            [{"chosen": letters(rng, seq - 1), "rejected": letters(rng, seq - 1)} for _ in range(rows)]
        )
        args = trl.RewardConfig(**common_args, max_length=seq)
        trainer = trl.RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        answer_tokens = 2 * shape["batch"] * seq
    else:
        from align_kit.training.losses import DPOConfig, DPOTrainer

        data = Dataset.from_list(
            [
                {
                    "prompt": letters(rng, half),
                    "chosen": letters(rng, half - 1),
                    "rejected": letters(rng, half - 1),
                }
                for _ in range(rows)
            ]
        )
        if case.get("adapter"):
            adapters.inject_adapters(model, AdapterArgs(adapter="residual", adapter_rank=16))
            adapters.freeze_non_adapter(model)
            reference = adapters.AdapterOffReference(model)
        else:
            reference = GPT2LMHeadModel(config).eval().requires_grad_(False)
            reference.load_state_dict(model.state_dict())
            adapters.lean_activations(reference)
        args = DPOConfig(
            **common_args,
            max_length=seq + 8,
            logprob_chunk_size=case.get("chunk", 0),
            precompute_ref_log_probs=case.get("precompute", False),
        )
        trainer = DPOTrainer(
            model=model, ref_model=reference, args=args, train_dataset=data, processing_class=tokenizer
        )
        answer_tokens = 2 * shape["batch"] * half
    trainer.add_callback(Clock())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = trainer.train()
    step_s = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():  # the allocator's peak on a GPU, from 0
        peak, baseline = torch.cuda.max_memory_allocated() / 2**20, 0.0
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    adapter_params = trained if case.get("adapter") else 0
    return {
        "step_s": step_s,
        "peak_rss_mb": peak,
        "baseline_rss_mb": baseline,
        "peak_above_baseline_mb": peak - baseline,
        "losses": losses,
        "train_runtime": result.metrics.get("train_runtime"),
        "answer_tokens": answer_tokens,
        "adapter_params": adapter_params,
    }


def run_case(shape: dict, case: dict, seq: int, steps: int, threads: int, work: Path) -> dict:
    job = {"shape": shape, "case": case, "seq": seq, "steps": steps, "threads": threads}
    job["out"] = str(work / f"run-{time.monotonic_ns()}")
    spec, result = work / "job.json", work / "result.json"
    spec.write_text(json.dumps(job))
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(spec), "--result", str(result)],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"case {case} at {seq} tokens failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.read_text())


# ---------------------------------------------------------------------------------------------------------
# Parts


STEP_CASES = {
    "sft": {"method": "sft", "chunk": CHUNK},
    "sft trl": {"method": "sft", "chunk": 0},
    "dpo full chunked": {"method": "dpo", "chunk": CHUNK},
    "dpo full trl": {"method": "dpo", "chunk": 0},
    "dpo residual chunked": {"method": "dpo", "chunk": CHUNK, "adapter": "residual"},
    "dpo residual trl": {"method": "dpo", "chunk": 0, "adapter": "residual"},
    "reward model": {"method": "rm"},
}
PRECOMPUTE_CASES = {  # the reference is computed before the first step, so every step is a second epoch's
    "dpo full chunked, live reference": {"method": "dpo", "chunk": CHUNK},
    "dpo full chunked, precomputed reference": {"method": "dpo", "chunk": CHUNK, "precompute": True},
    "dpo residual chunked, live reference": {"method": "dpo", "chunk": CHUNK, "adapter": "residual"},
    "dpo residual chunked, precomputed reference": {
        "method": "dpo",
        "chunk": CHUNK,
        "adapter": "residual",
        "precompute": True,
    },
}
BF16_CASES = {
    "sft bf16": {"method": "sft", "chunk": CHUNK, "bf16": True},
    "dpo full chunked bf16": {"method": "dpo", "chunk": CHUNK, "bf16": True},
}


def step_row(shape: dict, case: dict, outcome: dict, peak: dict, seq: int) -> dict:
    case = {**case, "adapter_params": outcome["adapter_params"]}
    count = flops(shape, case, seq, outcome["answer_tokens"])
    step = sorted(outcome["step_s"])[len(outcome["step_s"]) // 2]  # median
    dtype = "bfloat16" if case.get("bf16") else "float32"
    return {
        **outcome,
        **count,
        "step_s_median": step,
        "tokens_per_s": count["tokens"] / step,
        "achieved_flops": count["model_flops"] / step,
        "mfu": count["model_flops"] / step / peak[dtype]["peak_flops"],
        "hw_mfu": count["hw_flops"] / step / peak[dtype]["peak_flops"],
        "peak_dtype": dtype,
    }


def part_cases(cases: dict, shape: dict, peak: dict, threads: int, work: Path) -> dict:
    rows = {}
    for name, case in cases.items():
        print(f"[mfu] {name} ...", flush=True)
        outcome = run_case(shape, case, shape["seq"], shape["steps"], threads, work)
        rows[name] = step_row(shape, case, outcome, peak, shape["seq"])
    return rows


def part_memory(shape: dict, seqs: tuple[int, ...], threads: int, work: Path) -> dict:
    """One DPO step per (activation checkpointing, length, path): without checkpointing every layer's
    activations are kept and weigh against the logits; with it (TRL's own default) the logits dominate."""
    rows = {}
    for checkpointing in (False, True):
        label = "checkpointed" if checkpointing else "plain"
        for seq in seqs:
            for path, chunk in (("chunked", CHUNK), ("trl", 0)):
                print(f"[mfu] memory {label} {seq} {path} ...", flush=True)
                case = {"method": "dpo", "chunk": chunk, "checkpointing": checkpointing}
                outcome = run_case(shape, case, seq, 0, threads, work)
                rows[f"{label} {seq} {path}"] = {
                    "activations": label,
                    "seq": seq,
                    "path": path,
                    "peak_above_baseline_mb": outcome["peak_above_baseline_mb"],
                    "loss": outcome["losses"][0] if outcome["losses"] else None,
                }
            c, t = rows[f"{label} {seq} chunked"], rows[f"{label} {seq} trl"]
            c["ratio_to_trl"] = c["peak_above_baseline_mb"] / t["peak_above_baseline_mb"]
    return rows


def tables(figures: dict) -> str:
    out = []
    if {"steps", "bf16", "precompute"} & set(figures):
        rows = [
            [name, r["step_s_median"], f"{r['tokens_per_s']:.0f}", f"{r['model_flops']:.3g}",
             f"{r['achieved_flops'] / 1e9:.1f}", r["mfu"], r["hw_mfu"], f"{r['peak_rss_mb']:.0f}"]
            for part in ("steps", "bf16", "precompute")
            for name, r in figures.get(part, {}).items()
        ]  # fmt: skip
        header = ["case", "s/step", "tokens/s", "FLOPs/step", "GFLOP/s", "MFU", "hw MFU", "peak RSS MB"]
        out.append(common.table(rows, header))
    if "memory" in figures:
        rows = [
            [r.get("activations", "plain"), r["seq"], r["path"], f"{r['peak_above_baseline_mb']:.0f}",
             f"{r.get('ratio_to_trl', 1.0):.2f}", r["loss"]]
            for r in figures["memory"].values()
        ]  # fmt: skip
        header = ["activations", "seq", "path", "peak above baseline MB", "/ TRL", "loss"]
        out.append(common.table(rows, header))
    return "\n\n".join(out)


def judge(figures: dict, info: dict) -> dict[str, bool]:
    passed = {}
    memory = figures.get("memory")
    if memory:
        longest = max(r["seq"] for r in memory.values())
        for label in ("plain", "checkpointed"):
            row = memory.get(f"{label} {longest} chunked")
            if row:
                passed[f"memory_chunked_over_trl_at_longest_{label}"] = row["ratio_to_trl"] <= 0.5
    steps = figures.get("steps")
    if steps and {"sft", "dpo full chunked", "dpo full trl"} <= set(steps):
        ratio = steps["dpo full chunked"]["step_s_median"] / steps["dpo full trl"]["step_s_median"]
        figures["time_chunked_over_trl"] = ratio
        passed["time_chunked_over_trl"] = ratio <= 1.10
        passed["mfu_fp32_sft_and_dpo"] = min(steps["sft"]["mfu"], steps["dpo full chunked"]["mfu"]) >= 0.7
    pre = figures.get("precompute")
    if pre:
        ratios = {
            design: pre[f"dpo {design} chunked, precomputed reference"]["step_s_median"]
            / pre[f"dpo {design} chunked, live reference"]["step_s_median"]
            for design in ("full", "residual")
        }
        figures["precomputed_over_live_step_time"] = ratios
        passed["precomputed_over_live_step_time"] = max(ratios.values()) <= 0.8
    if steps and figures.get("bf16") and info["native_bf16"]:
        bf16 = figures["bf16"]
        ratios = {
            "sft": bf16["sft bf16"]["step_s_median"] / steps["sft"]["step_s_median"],
            "dpo": bf16["dpo full chunked bf16"]["step_s_median"]
            / steps["dpo full chunked"]["step_s_median"],
        }
        figures["bf16_over_fp32_step_time"] = ratios
        passed["bf16_over_fp32_step_time"] = max(ratios.values()) <= 0.6
    return passed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="A tiny shape: seconds, not minutes.")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help="Comma-separated subset of " + ", ".join(PARTS)
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=None)
    parser.add_argument("--cases", default="", help="Comma-separated step cases to run (default: all).")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        job = json.loads(Path(args.child).read_text())
        outcome = child(job)
        Path(args.result).write_text(json.dumps(outcome))
        with open(CASE_LOG, "a") as log:  # a run cut short keeps what it measured
            keep = {k: job[k] for k in ("case", "seq", "steps", "threads")}
            log.write(json.dumps({**keep, **outcome, "load_average": os.getloadavg()}) + "\n")
        return outcome

    import torch

    torch.set_num_threads(args.threads)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"bench/mfu.py: unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    kind = "quick" if args.quick else "full"
    shape = SHAPES[kind]
    out = Path(args.out or common.RESULTS / ("mfu_quick.json" if args.quick else "mfu.json"))
    info = {"shape": kind, **machine_line(args.threads)}
    started = time.perf_counter()
    peak = measure_peak(shape, args.quick)
    figures: dict = {"shape": shape, "peak_at_start": peak}
    if out.exists() and set(parts) != set(PARTS):  # a partial run keeps the other parts' committed figures
        previous = json.loads(out.read_text())
        kept = {k: v for k, v in previous["figures"].items() if k in PARTS and k not in parts}
        figures.update(kept)
        earlier = previous["machine"].get("kept_from_previous_run", {})
        own = {k: v for k, v in previous["machine"].items() if k != "kept_from_previous_run"}
        own.update({k: previous["figures"][k] for k in ("peak_float32_flops", "peak_bfloat16_flops")})
        # where and against which peak each kept part was measured
        info["kept_from_previous_run"] = {k: earlier.get(k, own) for k in kept}
    if torch.cuda.is_available():
        figures["datasheet_bf16_flops"] = DATASHEET_BF16_FLOPS
    with tempfile.TemporaryDirectory(prefix="align-kit-mfu-") as tmp:
        work = Path(tmp)
        if "steps" in parts:
            chosen = [c for c in args.cases.split(",") if c] or list(STEP_CASES)
            cases = {name: STEP_CASES[name] for name in chosen}
            figures["steps"] = part_cases(cases, shape, peak, args.threads, work)
        if "bf16" in parts:
            figures["bf16"] = part_cases(BF16_CASES, shape, peak, args.threads, work)
        if "precompute" in parts:
            figures["precompute"] = part_cases(PRECOMPUTE_CASES, shape, peak, args.threads, work)
        if "memory" in parts:
            figures["memory"] = part_memory(shape, MEMORY_SEQS[kind], args.threads, work)
    end_peak = measure_peak(shape, args.quick)
    figures["peak_at_end"] = end_peak
    for dtype in ("float32", "bfloat16"):  # the higher peak: MFU never flatters
        best = max(peak[dtype]["peak_flops"], end_peak[dtype]["peak_flops"])
        figures[f"peak_{dtype}_flops"] = best
        for part in [p for p in ("steps", "bf16", "precompute") if p in parts]:
            for row in figures.get(part, {}).values():
                if row["peak_dtype"] == dtype:
                    row["mfu"] = row["achieved_flops"] / best
                    row["hw_mfu"] = row["hw_flops"] / row["step_s_median"] / best
    info["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    info["wall_s"] = round(time.perf_counter() - started, 1)
    passed = judge(figures, info)
    common.write_result("mfu", figures, TARGETS, passed, info, path=out)
    print(tables(figures))
    print(
        f"peak (measured matmul of the model's shapes): float32 {figures['peak_float32_flops'] / 1e9:.1f} GFLOP/s, "
        f"bf16 {figures['peak_bfloat16_flops'] / 1e9:.1f} GFLOP/s"
    )
    print(f"machine: {json.dumps(info)}")
    print("targets:", ", ".join(f"{name} {'ok' if ok else 'MISSED'}" for name, ok in passed.items()))
    print(f"wrote {out}")
    return {"name": "mfu", "figures": figures, "passed": passed, "machine": info}


if __name__ == "__main__":
    main()
