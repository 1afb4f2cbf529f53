"""GPU benchmarks in one command: DPO throughput and MFU against raw TRL, adapter cost, the adapter-off
reference's memory, and logit judging against generating a verdict.

    python bench/gpu.py [--out bench/results/gpu.json] [--parts dpo,reference,adapters,judge]
    python bench/gpu.py --dry-run [--out bench/results/gpu_dry_run.json]   # CPU, tiny shapes, same code

Parts (each DPO run in a fresh interpreter, so its peak memory holds nothing from the others):

1. dpo: DPO on the GPT-2 124M shape (``GPT2Config()``, random weights, GPT-2's vocabulary size with the
   byte tokenizer), bf16 mixed precision, full fine-tuning, the reference loaded from disk. ``recipe`` is
   recipes/dpo.py's ``main()`` (a step clock is added to its ``trainer_callbacks``, nothing else changes);
   ``raw_trl`` is the same job written directly against TRL's DPOTrainer, read from the same YAML. The two
   alternate (recipe first, then raw first, ...), each after its own warm-up steps; a step is timed from
   the end of one optimizer step to the end of the next, with the device synchronised. Every row has the
   same length T (no padding), so a step trains tokens = 2·B·T (chosen and rejected rows).
   Model FLOPs per step, as in the PaLM paper (Chowdhery et al. 2022), appendix B:
       policy, forward and backward:  tokens · (6·N + 12·L·H·Q·T)
       reference, forward only:       tokens · (2·N +  4·L·H·Q·T)
       DPO step:                      tokens · (8·N + 16·L·H·Q·T)
   N counts the parameters that enter matrix products (all of them but the position embeddings; the tied
   token embedding once, as the LM head), L layers, H heads, Q head width; attention is counted in full,
   not halved for the causal mask, as PaLM does. MFU = FLOPs per step / step time / peak. The peak is the
   GPU's dense bf16 rate from NVIDIA's datasheet, 989 TFLOP/s for H100 and H200 SXM (1,979 with 2:4
   sparsity, which these dense products do not use): that is the figure published MFUs are quoted
   against. The bf16 matrix product measured at the start (8192³, about 790 TFLOP/s on this workplace's
   H200s) is reported beside it. On a GPU without a datasheet entry, and in the dry run, the measured rate
   is the peak.
2. reference: DPO through the recipe with a residual adapter, the reference either the adapter-off view of
   the policy (``AdapterOffReference``) or a second copy of the weights from disk; peak
   ``torch.cuda.max_memory_allocated``. The batch is small (B=2, T=128) so that weights, not
   activations, dominate; the saving in MB is one model's weights at any batch, the ratio is not.
3. adapters: a plain AdamW loop (bf16 autocast, causal-LM loss, B=16, T=512) on the GPT-2 124M shape: full
   fine-tuning, the residual adapter and peft LoRA at the same trainable count (model and ranks from
   bench/adapters.py), one after the other in one process with the allocator's peak reset between them:
   median step time and peak allocated memory.
4. judge: GPT-2 medium shape (24 x 1024, random, bf16), in this process: the local judge reading logits
   (``mode: logits``) against the same model generating a reason and verdict of 64 tokens (``mode:
   generate``, greedy; a random model never stops early); pairs/s over the same pairs and batches, the
   fastest of alternating passes (bench/judges.py does this on a CPU).

Targets (``targets`` and ``passed`` in the JSON): recipe tokens/s >= 0.97x raw TRL; adapter-off reference
peak memory <= 0.7x the copied reference; logit judging >= 10x generating; MFU reported. A dry run's
figures are CPU numbers: bench/run.py does not judge them, and the dry run refuses to write gpu.json.

On the device machine (one H200; its image has torch, transformers, accelerate, peft and pyarrow but not
trl or datasets, and no network), first, here, in the repository root (.gitignore already ignores .whl/):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl trl==1.12.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pyarrow==26.0.1

(57 MB, under the 64 MiB a call carries; pyarrow is installed there only if the image's is older than
the 24 that datasets 5.2 asks for), then one call of the device tool's run with carry [".whl"] and
timeout_s 420 (estimated from the shapes, not yet measured: about 4 minutes; 420 s leaves time in a
15-minute lease to rerun a failed part with --parts), command:

    W=".whl/trl-* .whl/datasets-* .whl/dill-* .whl/multiprocess-*"; python3 -c 'import pyarrow as p, sys; sys.exit(int(p.__version__.split(".")[0]) < 24)' || W="$W .whl/pyarrow-*"; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $W && export PYTHONPATH=/tmp/site:$PWD || exit; export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false; nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv; set -o pipefail; timeout 400 python3 bench/gpu.py --out $OUT/gpu.json 2>&1 | tee $OUT/gpu.log

and copy the returned gpu.json to bench/results/gpu.json. The JSON is rewritten after each part, so a run
cut short still returns the parts it finished; ``--parts judge --out $OUT/gpu_judge.json`` reruns one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import adapters as adapter_bench
import common

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("dpo", "reference", "adapters", "judge")
GPT2_VOCAB = 50257
# NVIDIA's H100 and H200 SXM datasheets: 1,979 TFLOP/s bf16 with 2:4 sparsity, 989 dense.
DENSE_BF16_PEAK = {"NVIDIA H200": 989e12, "NVIDIA H100 80GB HBM3": 989e12}
FLOPS_FORMULA = (
    "tokens * (8*N + 16*L*H*Q*T) per DPO step: policy forward and backward tokens * (6*N + 12*L*H*Q*T) plus "
    "reference forward tokens * (2*N + 4*L*H*Q*T); tokens = 2*B*T (chosen and rejected rows, no padding); "
    "N = parameters in matrix products (all but the position embeddings, the tied token embedding once); "
    "PaLM (Chowdhery et al. 2022), appendix B"
)
TARGETS = {
    "recipe_vs_raw_trl_tokens_per_s_min": 0.97,
    "adapter_off_vs_copied_reference_memory_max": 0.7,
    "logits_vs_generate_speedup_min": 10.0,
    "mfu_reported": "finite and above 0",
}

# Model shapes, batches and step counts. The dry run keeps every code path with tiny models and few steps.
SHAPES = {
    "gpu": {
        "matmul": 8192,
        "child_timeout_s": 180,  # a hung case fails alone instead of eating the lease
        "dpo": {
            "model": {}, "batch": 16, "prompt_tokens": 256, "answer_tokens": 255,
            "warmup": 5, "steps": 30, "repeats": 3, "logging_steps": 5,
        },
        "reference": {
            "batch": 2, "prompt_tokens": 64, "answer_tokens": 63, "warmup": 2, "steps": 5, "logging_steps": 1,
        },
        "adapters": {"batch": 16, "seq": 512, "warmup": 3, "steps": 10},
        "judge": {
            "model": {"vocab_size": GPT2_VOCAB, "n_layer": 24, "n_embd": 1024, "n_head": 16},
            "pairs": 128, "batch": 32, "new_tokens": 64, "repeats": 2,
        },
    },
    "dry_run": {
        "matmul": 1024,
        "child_timeout_s": 900,
        "dpo": {
            "model": {"vocab_size": 320, "n_layer": 2, "n_embd": 64, "n_head": 2}, "batch": 2, "prompt_tokens": 24,
            "answer_tokens": 23, "warmup": 1, "steps": 2, "repeats": 1, "logging_steps": 1,
        },
        "reference": {
            "batch": 2, "prompt_tokens": 24, "answer_tokens": 23, "warmup": 1, "steps": 2, "logging_steps": 1,
        },
        "adapters": {"vocab_size": 320, "batch": 2, "seq": 32, "warmup": 1, "steps": 2},
        "judge": {
            "model": {"vocab_size": 320, "n_layer": 2, "n_embd": 64, "n_head": 2},
            "pairs": 4, "batch": 2, "new_tokens": 8, "repeats": 1,
        },
    },
}  # fmt: skip


class ChildFailed(RuntimeError):
    """One benchmark case's process exited with an error."""


# ----------------------------------------------------------------------------------------------------
# Measuring inside a case's process


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def peak_memory_mb(device: str) -> float:
    """Peak allocated GPU memory on CUDA; on a CPU this process's peak RSS (VmHWM, which
    ``reset_peak_memory`` resets, else ``ru_maxrss``), in MB."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def reset_peak_memory(device: str) -> None:
    """Free what the last case left and restart the peak from the memory in use now."""
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM back to the current RSS
    except OSError:
        pass  # the peak then covers every case so far


def matmul_params(model) -> int:
    """Parameters that take part in matrix products: all but the position embeddings (tied ones once)."""
    return sum(p.numel() for name, p in model.named_parameters() if not name.endswith("wpe.weight"))


def step_clock(device: str):
    """A TrainerCallback that times optimizer steps and reads what the trainer trains on."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.step_ends: list[float] = []
            self.facts: dict = {}

        def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
            data = train_dataloader.dataset
            lengths = {len(p) + len(a) for p, a in zip(data["prompt_ids"], data["chosen_ids"], strict=True)}
            lengths |= {
                len(p) + len(a) for p, a in zip(data["prompt_ids"], data["rejected_ids"], strict=True)
            }
            config = model.config
            self.facts = {
                "sequence_lengths": sorted(lengths),
                "batch": args.per_device_train_batch_size * args.gradient_accumulation_steps,
                "matmul_params": matmul_params(model),
                "n_layer": config.n_layer,
                "n_head": config.n_head,
                "head_dim": config.n_embd // config.n_head,
            }

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            self.step_ends.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kwargs):
            self.facts["peak_memory_mb"] = peak_memory_mb(device)
            self.facts["losses"] = [entry["loss"] for entry in state.log_history if "loss" in entry]
            tokens = [entry["num_tokens"] for entry in state.log_history if "num_tokens" in entry]
            steps = [entry["step"] for entry in state.log_history if "num_tokens" in entry]
            self.facts["trl_tokens_per_step"] = tokens[-1] / steps[-1] if tokens else None

        def result(self, warmup: int) -> dict:
            ends = self.step_ends
            return {**self.facts, "step_s": [ends[k] - ends[k - 1] for k in range(max(warmup, 1), len(ends))]}

    return StepClock()


def raw_trl_dpo(config_path: str, clock) -> None:
    """The DPO job written directly against TRL, with no align-kit code: the baseline of the recipe."""
    import yaml
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    with open(config_path) as handle:
        settings = yaml.safe_load(handle)
    fields = {f.name for f in dataclasses.fields(DPOConfig)}
    args = DPOConfig(**{key: value for key, value in settings.items() if key in fields})
    folder = settings["model_name_or_path"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ref_model = AutoModelForCausalLM.from_pretrained(folder)
    train = load_dataset("json", data_files=f"{settings['dataset']}/train.jsonl", split="train")
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    trainer.train()
    trainer.save_model(args.output_dir)


def child_dpo(job: dict) -> dict:
    """One DPO run, the recipe's ``main()`` or the raw TRL job, timed by a step clock."""
    clock = step_clock(job["device"])
    if job["case"] == "raw_trl":
        raw_trl_dpo(job["config"], clock)
    else:
        from align_kit.resources import load_script

        recipe = load_script(ROOT / "recipes" / "dpo.py", "recipe_dpo")
        callbacks = recipe.trainer_callbacks
        with mock.patch.object(recipe, "trainer_callbacks", lambda *a, **k: [*callbacks(*a, **k), clock]):
            recipe.main(["--config", job["config"]])
    return clock.result(job["warmup"])


def child_train(job: dict) -> dict:
    """Full fine-tuning, the residual adapter and LoRA one after the other, peak memory reset between."""
    results = {}
    for case in job["cases"]:
        reset_peak_memory(job["device"])
        results[case] = train_case(case, job["shape"], job["device"])
    return results


def train_case(case: str, cfg: dict, device: str) -> dict:
    """AdamW steps on a causal-LM loss of random tokens; step times and peak memory."""
    import torch

    model = adapter_bench.build(cfg)
    base_params = sum(p.numel() for p in model.parameters())
    model = adapter_bench.adapt(model, case, cfg).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    model.train()
    times = []
    for step in range(cfg["warmup"] + cfg["steps"]):
        input_ids = torch.randint(0, cfg["vocab_size"], (cfg["batch"], cfg["seq"]), generator=generator)
        input_ids = input_ids.to(device)
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= cfg["warmup"]:
            times.append(time.perf_counter() - start)
    n_trainable = sum(p.numel() for p in trainable)
    return {
        "trainable": n_trainable,
        "trainable_pct": 100 * n_trainable / base_params,
        "step_s": times,
        "peak_memory_mb": peak_memory_mb(device),
        "final_loss": loss.item(),
    }


def judge_speed(cfg: dict, device: str) -> dict:
    """Seconds per pass of the local judge in logits mode and in generate mode over the same pairs and
    batches, alternating, after one warm-up batch each."""
    import judges as judge_bench
    import torch

    from align_kit.judges.backends import load_judge
    from align_kit.models.loading import build_byte_tokenizer

    dtype = "bfloat16" if device == "cuda" else "float32"
    lm = adapter_bench.build(cfg["model"]).to(getattr(torch, dtype))
    tokenizer = build_byte_tokenizer()
    tokenizer.model_max_length = lm.config.n_positions
    shape = f"{cfg['model']['n_layer']}x{cfg['model']['n_embd']}"
    common_args = {"lm": lm, "tokenizer": tokenizer, "model": f"random-gpt2-{shape}", "device": device}
    common_args |= {"batch_size": cfg["batch"], "torch_dtype": dtype}
    logits_judge = load_judge("local_hf_pairwise", mode="logits", **common_args)
    with tempfile.TemporaryDirectory() as folder:  # the judge reads its template once, when built
        template = Path(folder) / "explained.txt"
        template.write_text(judge_bench.EXPLAINED_TEMPLATE)
        generate_judge = load_judge(
            "local_hf_pairwise",
            mode="generate",
            template=str(template),
            parser="regex",
            parse_regex=judge_bench.EXPLAINED_REGEX,
            max_new_tokens=cfg["new_tokens"],
            **common_args,
        )
    items = judge_bench.embedded_pairs(cfg["pairs"])
    logits_judge.judge_batch(items[: cfg["batch"]])  # warm-up: kernels, allocator, tokenizer
    generate_judge.judge_batch(items[: cfg["batch"]])
    logits_s, generate_s = [], []
    for _ in range(cfg["repeats"]):  # alternate; the fastest pass counts
        start = time.perf_counter()
        logits_judge.judge_batch(items)  # verdicts come back as Python values: the device has finished
        logits_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        verdicts = generate_judge.judge_batch(items)
        generate_s.append(time.perf_counter() - start)
    prompt_tokens = [len(tokenizer(generate_judge.text(item))["input_ids"]) for item in items]
    return {
        "pairs": len(items),
        "logits_s": logits_s,
        "generate_s": generate_s,
        "generate_max_new_tokens": cfg["new_tokens"],
        "generate_mean_prompt_tokens": sum(prompt_tokens) / len(prompt_tokens),
        "generate_parse_failure_rate": sum(v is None for v in verdicts) / len(verdicts),
    }


CHILDREN = {"dpo": child_dpo, "train": child_train}


# ----------------------------------------------------------------------------------------------------
# The parent: model and data folders, cases in fresh processes, figures and targets


def letters(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))


def seq_len(part: dict) -> int:
    return part["prompt_tokens"] + part["answer_tokens"] + 1  # TRL appends EOS to each answer


def write_pairs(folder: Path, part: dict) -> Path:
    """train.jsonl (one pair per trained row) and test.jsonl of distinct single-turn pairs whose every text
    has a fixed byte length, so with the byte tokenizer every sequence has ``seq_len(part)`` tokens."""
    rng = random.Random(0)
    frame = len("\n\nHuman: ") + len("\n\nAssistant:")
    prompt_tokens, answer_tokens = part["prompt_tokens"], part["answer_tokens"]
    folder.mkdir(parents=True)
    for split, count in (("train", part["batch"] * (part["warmup"] + part["steps"])), ("test", 4)):
        with open(folder / f"{split}.jsonl", "w") as handle:
            for _ in range(count):
                row = {
                    "prompt": f"\n\nHuman: {letters(rng, prompt_tokens - frame)}\n\nAssistant:",
                    "chosen": " " + letters(rng, answer_tokens - 1),
                    "rejected": " " + letters(rng, answer_tokens - 1),
                }
                handle.write(json.dumps(row) + "\n")
    return folder


def save_model(folder: Path, model_shape: dict) -> tuple[Path, int]:
    """A randomly initialised GPT-2 (``GPT2Config`` defaults unless ``model_shape`` says otherwise) with
    GPT-2's vocabulary size and the byte tokenizer, saved as a model folder for the recipe and for TRL."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from align_kit.models.loading import build_byte_tokenizer

    torch.manual_seed(0)
    config = GPT2Config(**model_shape, bos_token_id=256, eos_token_id=256, pad_token_id=257)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    tokenizer = build_byte_tokenizer()
    tokenizer.model_max_length = config.n_positions
    tokenizer.save_pretrained(folder)
    return folder, model.num_parameters()


def dpo_config(path: Path, model: Path, data: Path, part: dict, device: str, **extra) -> Path:
    """The YAML both DPO jobs read: the recipe all of it, the raw TRL job its DPOConfig fields."""
    import yaml

    settings = {
        "model_name_or_path": str(model),
        "dataset": str(data),
        "dataset_format": "preference",
        "output_dir": str(path.with_suffix("")),
        "per_device_train_batch_size": part["batch"],
        "max_steps": part["warmup"] + part["steps"],
        "max_length": seq_len(part),
        "learning_rate": 1.0e-5,
        "lr_scheduler_type": "constant",
        "beta": 0.1,
        "loss_type": ["sigmoid"],
        "logging_steps": part["logging_steps"],
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
        "bf16": device == "cuda",
        "use_cpu": device != "cuda",
        "gradient_checkpointing": False,
        **extra,
    }
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def run_child(work: Path, kind: str, case: str, device: str, **job) -> dict:
    """Run one case in a fresh interpreter; it writes its figures to a JSON file."""
    mode = "gpu" if device == "cuda" else "dry_run"
    job_file = work / f"job-{kind}-{case}-{time.monotonic_ns()}.json"
    job = {**job, "kind": kind, "case": case, "device": device}
    job["result"] = str(job_file.with_suffix(".result.json"))
    job_file.write_text(json.dumps(job))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(work / "datasets-cache"),
        "ALIGN_KIT_HOME": str(work / "align-kit-home"),
        "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1",
    }
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(job_file)]
    started, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    timeout = SHAPES[mode]["child_timeout_s"]
    try:
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise ChildFailed(f"{kind} case {case} ran past {timeout} s and was stopped") from error
    if done.returncode != 0:
        raise ChildFailed(f"{kind} case {case} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(Path(job["result"]).read_text())
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    print(f"  {kind}/{case}: {time.perf_counter() - started:.1f} s wall, {cpu_s:.1f} s CPU", flush=True)
    return result


def measure_peak(device: str, n: int) -> dict:
    """The peak MFU is quoted against, and a measured n x n x n matrix product rate beside it."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    repeats = 10
    for _ in range(repeats):
        a @ b
    synchronize(device)
    measured = 2 * n**3 * repeats / (time.perf_counter() - start)
    del a, b
    if device == "cuda":
        torch.cuda.empty_cache()  # the cases run in other processes
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    datasheet = DENSE_BF16_PEAK.get(name)
    return {
        "device_name": name,
        "peak_flops": datasheet or measured,
        "peak_source": "NVIDIA datasheet, dense bf16"
        if datasheet
        else f"measured {n}^3 {str(dtype)[6:]} matmul",
        "measured_matmul_flops": measured,
        "matmul_size": n,
        "matmul_dtype": str(dtype)[6:],
    }


def dpo_figures(results: list[dict], peak: dict) -> dict:
    """Step time, tokens/s, model FLOPs, MFU and peak memory of one variant over its runs."""
    first = results[0]
    if len(first["sequence_lengths"]) != 1:
        raise ValueError(
            f"DPO rows differ in length {first['sequence_lengths']}: tokens per step are not fixed"
        )
    (seq,) = first["sequence_lengths"]
    tokens = 2 * first["batch"] * seq  # TRL's own count, trl_tokens_per_step, is kept beside it
    n, layers, heads, width = first["matmul_params"], first["n_layer"], first["n_head"], first["head_dim"]
    flops = tokens * (8 * n + 16 * layers * heads * width * seq)
    step = statistics.median(s for r in results for s in r["step_s"])
    return {
        "step_s_median": step,
        "step_s": [r["step_s"] for r in results],
        "tokens_per_step": tokens,
        "trl_tokens_per_step": first["trl_tokens_per_step"],
        "tokens_per_s": tokens / step,
        "model_flops_per_step": flops,
        "achieved_tflops": flops / step / 1e12,
        "mfu": flops / step / peak["peak_flops"],
        "mfu_vs_measured_matmul": flops / step / peak["measured_matmul_flops"],
        "peak_memory_mb": max(r["peak_memory_mb"] for r in results),
        "losses": first["losses"],
        "batch": first["batch"],
        "seq_len": seq,
        "matmul_params": n,
        "n_layer": layers,
        "n_head": heads,
        "head_dim": width,
    }


def part_dpo(shape: dict, device: str, model: Path, work: Path, peak: dict) -> dict:
    part = shape["dpo"]
    data = write_pairs(work / "dpo-data", part)
    runs: dict[str, list[dict]] = {"recipe": [], "raw_trl": []}
    for i in range(part["repeats"]):
        for case in ["recipe", "raw_trl"] if i % 2 == 0 else ["raw_trl", "recipe"]:
            config = dpo_config(work / f"dpo-{case}-{i}.yaml", model, data, part, device)
            runs[case].append(run_child(work, "dpo", case, device, config=str(config), warmup=part["warmup"]))
            shutil.rmtree(config.with_suffix(""), ignore_errors=True)  # a saved 124M model per run adds up
    figures = {case: dpo_figures(results, peak) for case, results in runs.items()}
    figures["recipe_vs_raw_trl_tokens_per_s"] = (
        figures["recipe"]["tokens_per_s"] / figures["raw_trl"]["tokens_per_s"]
    )
    figures["flops_formula"] = FLOPS_FORMULA
    figures["repeats"] = part["repeats"]
    figures["warmup_steps"] = part["warmup"]
    return figures


def part_reference(
    shape: dict, device: str, model: Path, model_params: int, work: Path, dry_run: bool
) -> dict:
    part = shape["reference"]
    data = write_pairs(work / "reference-data", part)
    rank = adapter_bench.shape(dry_run)["rank"]
    cases = {
        "copied": {"ref_model_name_or_path": str(model)},  # a second copy of the weights, from disk
        "adapter_off": {},  # a new adapter: policy_and_reference gives AdapterOffReference(policy)
    }
    figures = {}
    for case, extra in cases.items():
        config = work / f"reference-{case}.yaml"
        dpo_config(config, model, data, part, device, adapter="residual", adapter_rank=rank, **extra)
        result = run_child(work, "dpo", f"recipe_{case}", device, config=str(config), warmup=part["warmup"])
        shutil.rmtree(config.with_suffix(""), ignore_errors=True)
        figures[case] = {
            "peak_memory_mb": result["peak_memory_mb"],
            "step_s_median": statistics.median(result["step_s"]),
            "losses": result["losses"],
        }
    off, copied = figures["adapter_off"]["peak_memory_mb"], figures["copied"]["peak_memory_mb"]
    figures["adapter_off_vs_copied_memory"] = off / copied
    figures["saving_mb"] = copied - off
    figures["model_mb_fp32"] = 4 * model_params / 2**20
    figures |= {"adapter_rank": rank, "batch": part["batch"], "seq_len": seq_len(part)}
    return figures


def part_adapters(shape: dict, device: str, work: Path, dry_run: bool) -> dict:
    cfg = {**adapter_bench.shape(dry_run), **shape["adapters"]}
    cases = ["full", "residual", "lora"]
    figures = run_child(work, "train", "adapters", device, cases=cases, shape=cfg)
    for row in figures.values():
        row["step_s_median"] = statistics.median(row["step_s"])
    for row in figures.values():
        row["step_time_vs_full"] = row["step_s_median"] / figures["full"]["step_s_median"]
        row["memory_vs_full"] = row["peak_memory_mb"] / figures["full"]["peak_memory_mb"]
    figures["shape"] = cfg
    return figures


def part_judge(shape: dict, device: str) -> dict:
    cfg = shape["judge"]
    result = judge_speed(cfg, device)  # in this process: no memory is measured
    logits_s, generate_s = min(result["logits_s"]), min(result["generate_s"])
    return {
        **result,
        "logits_pairs_per_s": result["pairs"] / logits_s,
        "generate_pairs_per_s": result["pairs"] / generate_s,
        "logits_vs_generate_speedup": generate_s / logits_s,
        "model": cfg["model"],
        "batch": cfg["batch"],
    }


def judge_targets(figures: dict) -> dict[str, bool]:
    """Met flags for the targets whose part ran without an error."""
    passed = {}
    dpo, reference, judge = (figures.get(part, {}) for part in ("dpo", "reference", "judge"))
    if "recipe" in dpo:
        ratio = dpo["recipe_vs_raw_trl_tokens_per_s"]
        passed["recipe_vs_raw_trl_tokens_per_s"] = ratio >= TARGETS["recipe_vs_raw_trl_tokens_per_s_min"]
        mfu = dpo["recipe"]["mfu"]
        passed["mfu_reported"] = math.isfinite(mfu) and mfu > 0
    if "copied" in reference:
        ratio = reference["adapter_off_vs_copied_memory"]
        passed["adapter_off_reference_memory"] = (
            ratio <= TARGETS["adapter_off_vs_copied_reference_memory_max"]
        )
    if "logits_vs_generate_speedup" in judge:
        speedup = judge["logits_vs_generate_speedup"]
        passed["logits_vs_generate_speedup"] = speedup >= TARGETS["logits_vs_generate_speedup_min"]
    return passed


def table(figures: dict) -> str:
    """The printed summary: a few rows per part that ran."""
    rows = []
    dpo, reference = figures.get("dpo", {}), figures.get("reference", {})
    adapters, judge = figures.get("adapters", {}), figures.get("judge", {})
    for case in ("recipe", "raw_trl"):
        if case in dpo:
            row = dpo[case]
            tokens, mfu = f"{row['tokens_per_s']:,.0f} tok/s", f"MFU {row['mfu']:.3f}"
            rows.append([f"dpo {case}", row["step_s_median"], tokens, mfu, row["peak_memory_mb"]])
    if "recipe" in dpo:
        rows.append(["dpo recipe/raw", "", "", f"{dpo['recipe_vs_raw_trl_tokens_per_s']:.3f}x tok/s", ""])
    for case in ("copied", "adapter_off"):
        if case in reference:
            row = reference[case]
            rows.append([f"reference {case}", row["step_s_median"], "", "", row["peak_memory_mb"]])
    if "copied" in reference:
        rows.append(
            ["reference off/copied", "", "", f"{reference['adapter_off_vs_copied_memory']:.3f}x mem", ""]
        )
    for case in ("full", "residual", "lora"):
        if case in adapters:
            row = adapters[case]
            trainable, ratio = f"{row['trainable']:,} trained", f"{row['step_time_vs_full']:.2f}x time"
            rows.append([f"train {case}", row["step_s_median"], trainable, ratio, row["peak_memory_mb"]])
    if "logits_s" in judge:
        rows.append(["judge logits", "", f"{judge['logits_pairs_per_s']:.1f} pairs/s", "", ""])
        speedup = f"{judge['logits_vs_generate_speedup']:.1f}x pairs/s"
        rows.append(["judge generate", "", f"{judge['generate_pairs_per_s']:.1f} pairs/s", speedup, ""])
    rows += [[part, "", "ERROR", "", ""] for part in PARTS if "error" in figures.get(part, {})]
    return common.table(rows, ["case", "step_s", "throughput", "ratio", "peak MB"])


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU, tiny shapes, few steps: the same code paths."
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON results (default bench/results/gpu.json; dry run: gpu_dry_run.json).",
    )
    parser.add_argument(
        "--parts", default=",".join(PARTS), help="Comma-separated subset of: " + ", ".join(PARTS)
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        job = json.loads(Path(args.child).read_text())
        result = CHILDREN[job["kind"]](job)
        Path(job["result"]).write_text(json.dumps(result))
        return result

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit(
            f"bench/gpu.py: torch {torch.__version__} sees no CUDA GPU here; "
            "`python bench/gpu.py --dry-run` runs the same code on the CPU with tiny shapes"
        )
    out = Path(args.out or common.RESULTS / ("gpu_dry_run.json" if args.dry_run else "gpu.json")).resolve()
    if args.dry_run and out == (common.RESULTS / "gpu.json").resolve():
        raise SystemExit("bench/gpu.py: a dry run never writes bench/results/gpu.json (the GPU result)")
    parts = [part for part in args.parts.split(",") if part]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise SystemExit(f"bench/gpu.py: unknown part(s) {unknown}; choose from {', '.join(PARTS)}")

    started = time.perf_counter()
    device = "cpu" if args.dry_run else "cuda"
    memory = "cuda.max_memory_allocated" if device == "cuda" else "peak RSS"
    shape = SHAPES["dry_run" if args.dry_run else "gpu"]
    peak = measure_peak(device, shape["matmul"])
    info = {
        "dry_run": args.dry_run,
        "gpu": peak["device_name"] if device == "cuda" else None,
        "cuda": torch.version.cuda,
        **versions(),
    }
    figures: dict = {"peak": peak, "memory_basis": memory, "shapes": shape}
    with tempfile.TemporaryDirectory(prefix="align-kit-gpu-bench-") as tmp:
        work = Path(tmp)
        needs_model = {"dpo", "reference"} & set(parts)
        model, model_params = save_model(work / "gpt2", shape["dpo"]["model"]) if needs_model else (None, 0)
        steps = {
            "dpo": lambda: part_dpo(shape, device, model, work, peak),
            "reference": lambda: part_reference(shape, device, model, model_params, work, args.dry_run),
            "adapters": lambda: part_adapters(shape, device, work, args.dry_run),
            "judge": lambda: part_judge(shape, device),
        }
        for part in parts:
            print(f"[gpu bench] {part} ({time.perf_counter() - started:.0f} s in)", flush=True)
            try:
                figures[part] = steps[part]()
            except (RuntimeError, ValueError) as error:  # a failed case, or a CUDA error in the judge
                print(f"[gpu bench] {part} failed: {error}", flush=True)
                figures[part] = {"error": str(error)}
            info["wall_s"] = round(time.perf_counter() - started, 1)
            passed = judge_targets(figures)
            common.write_result("gpu", figures, TARGETS, passed, info, path=out)  # after every part
    print(table(figures))
    print(f"memory: {memory}; MFU against {peak['peak_flops'] / 1e12:.3g} TFLOP/s ({peak['peak_source']})")
    print(f"measured {peak['matmul_size']}^3 matmul: {peak['measured_matmul_flops'] / 1e12:.3g} TFLOP/s")
    print("targets:", ", ".join(f"{name} {'ok' if ok else 'MISSED'}" for name, ok in passed.items()))
    print(f"wrote {out} in {info['wall_s']} s{' (dry run: CPU figures, not judged)' if args.dry_run else ''}")
    if not args.dry_run:  # the same MFU table as on the CPU, against the measured and the datasheet peak
        import mfu

        mfu.main(["--out", str(common.RESULTS / "mfu_gpu.json")])
    failed = [part for part in parts if "error" in figures[part]]
    if failed:
        raise SystemExit(f"bench/gpu.py: part(s) {', '.join(failed)} failed; their errors are in {out}")
    return {"name": "gpu", "figures": figures, "targets": TARGETS, "passed": passed, "machine": info}


if __name__ == "__main__":
    main()
