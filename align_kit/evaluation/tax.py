"""The alignment tax: what a run cost outside its preference data, per system against its base.

- Held-out log-likelihood and perplexity, exp(mean token NLL), on a general-text file the user names (.txt:
  one text per blank-line-separated paragraph; .jsonl: a ``text`` field per row), or with ``embedded``
  the task's own good transcripts (prompt and chosen answer) of held-out prompts.
- The oracle per family on the embedded task, from the answers the evaluation generated.
- Optional lm-evaluation-harness tasks (``pip install align-kit[lm-eval]``) through its Python API, including
  tasks defined in a local YAML folder (``include_path``); skipped with a note when lm-eval is absent.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from align_kit.configs import ModelArgs
from align_kit.data.formats import DataError
from align_kit.models.generation import oracle_scores
from align_kit.models.loading import load_model, load_tokenizer


def read_general_text(path: str | Path) -> list[str]:
    """Texts of a .txt file (paragraphs) or a .jsonl file (``text`` of each row); DataError names the row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tax_text: no such file {path}")
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise DataError(f"{path}:{number}: not JSON ({error})") from error
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{path}:{number}: no string field 'text'")
            texts.append(row["text"])
    else:
        texts = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    if not texts:
        raise DataError(f"{path}: no text")
    return texts


@torch.no_grad()
def perplexity(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int = 16, max_length: int = 512
) -> dict[str, float]:  # fmt: skip
    """Token-level log-likelihood of ``texts`` (each cut at ``max_length`` tokens; every token after a text's
    first is predicted): total log-likelihood, mean NLL per predicted token, and perplexity = exp(mean NLL)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll, tokens = 0.0, 0
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]), return_tensors="pt", padding=True, truncation=True,
                max_length=max_length,
            ).to(device)  # fmt: skip
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits  # (B, T, V)
            log_p = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
            target = batch["input_ids"][:, 1:]  # (B, T-1)
            nll = -log_p.gather(-1, target[..., None]).squeeze(-1)  # (B, T-1)
            mask = batch["attention_mask"][:, 1:].bool()
            total_nll += nll[mask].sum().item()
            tokens += int(mask.sum())
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    mean_nll = total_nll / max(tokens, 1)
    return {
        "log_likelihood": -total_nll,
        "nll_per_token": mean_nll,
        "perplexity": math.exp(mean_nll),
        "tokens": tokens,
    }


def lm_eval_tasks(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, tasks: Sequence[str], include_path: str | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:  # fmt: skip
    """lm-evaluation-harness results of ``tasks`` on ``model`` (its ``HFLM`` wrapper, no download), as
    {task: {metric: value}}; {"skipped": why} when lm-eval is not installed."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        return {"skipped": "lm-eval is not installed (pip install 'align-kit[lm-eval]')"}
    # lm-eval's own task index (thousands of YAML files) takes minutes to build: skip it when every task
    # asked for is defined in include_path
    local = _local_task_names(include_path) if include_path else set()
    manager = TaskManager(include_path=include_path, include_defaults=not set(tasks) <= local)
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(model=wrapped, tasks=list(tasks), task_manager=manager, log_samples=False)
    return {
        task: {
            k: v
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and k not in ("alias", "sample_len")
        }
        for task, metrics in results["results"].items()
    }


def _local_task_names(folder: str) -> set[str]:
    """The ``task:`` names of the YAML files under ``folder``."""
    import yaml

    names = set()
    for path in Path(folder).rglob("*.yaml"):
        try:
            config = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            continue  # lm-eval's own YAML tags (!function) are not plain YAML: left to lm-eval
        if isinstance(config, dict) and isinstance(config.get("task"), str):
            names.add(config["task"])
    return names


def system_tax(
    path: str, texts: Sequence[str], lm_eval: Sequence[str] = (), include_path: str | None = None
) -> dict[str, Any]:
    """Perplexity (and lm-eval tasks) of one system's model folder."""
    model = load_model(ModelArgs(model_name_or_path=path))
    tokenizer = load_tokenizer(path)
    out: dict[str, Any] = perplexity(model, tokenizer, texts)
    if lm_eval:
        out["lm_eval"] = lm_eval_tasks(model, tokenizer, lm_eval, include_path)
    return out


def alignment_tax(
    systems: dict[str, str],
    base: str,
    texts: Sequence[str],
    prompts: Sequence[str] | None = None,
    answers: dict[str, list[str]] | None = None,
    lm_eval: Sequence[str] = (),
    include_path: str | None = None,
) -> dict[str, Any]:
    """Per system ({name: model folder}) against ``base``: perplexity on ``texts`` and its change in %, the
    oracle per family and its change (embedded task: ``prompts`` and each system's ``answers``), and lm-eval
    metrics and their change."""
    measured = {name: system_tax(path, texts, lm_eval, include_path) for name, path in systems.items()}
    if prompts is not None and answers:
        for name in measured:
            if name in answers:
                measured[name]["oracle_by_family"] = oracle_scores(list(prompts), answers[name])["by_family"]
    reference = measured[base]
    for row in measured.values():
        row["perplexity_change_pct"] = 100 * (row["perplexity"] / reference["perplexity"] - 1)
        if "oracle_by_family" in row and "oracle_by_family" in reference:
            row["oracle_change"] = {
                f: row["oracle_by_family"][f] - reference["oracle_by_family"].get(f, 0.0)
                for f in row["oracle_by_family"]
            }
        for task, metrics in row.get("lm_eval", {}).items():
            base_metrics = reference.get("lm_eval", {}).get(task)
            if isinstance(metrics, dict) and isinstance(base_metrics, dict):
                row.setdefault("lm_eval_change", {})[task] = {
                    k: v - base_metrics[k]
                    for k, v in metrics.items()
                    if k in base_metrics and "stderr" not in k
                }
    return {"base": base, "n_texts": len(texts), "systems": measured}


def tax_lines(tax: dict[str, Any]) -> list[str]:
    """One line per system for the report, e.g. "dpo vs sft: perplexity on general text +4.0%; oracle add -0.10"."""
    lines = []
    for name, row in tax["systems"].items():
        if name == tax["base"]:
            continue
        parts = [f"perplexity on general text {row['perplexity_change_pct']:+.1f}% ({row['perplexity']:.3f})"]
        parts += [f"oracle {f} {d:+.3f}" for f, d in row.get("oracle_change", {}).items()]
        for task, change in row.get("lm_eval_change", {}).items():
            parts += [f"lm-eval {task} {k} {v:+.3f}" for k, v in change.items()]
        lines.append(f"alignment tax, {name} vs {tax['base']}: " + "; ".join(parts))
    return lines


def evaluation_tax(
    args: Any, systems: Sequence[Any], held: Any, answers: dict[str, list[str]]
) -> dict[str, Any]:
    """The evaluation's tax section (``tax_text`` set): every model system against the base, on the named
    file or, with ``embedded``, on the held-out prompts with their chosen answers."""
    if args.tax_text == "embedded":
        texts = [f"{prompt} {chosen}" for prompt, chosen in zip(held.prompts, held.chosen, strict=True)]
    else:
        texts = read_general_text(args.tax_text)
    models = {s.name: s.path for s in systems if s.kind == "model"}
    if args.base not in models:
        return {"skipped": f"base {args.base} is not a model folder: no tax to measure against"}
    embedded = all(_is_task_prompt(p) for p in held.prompts[:5])
    return alignment_tax(
        models, args.base, texts, held.prompts if embedded else None, answers, args.tax_lm_eval_tasks,
        args.tax_lm_eval_include,
    )  # fmt: skip


def _is_task_prompt(prompt: str) -> bool:
    from align_kit.data.task import judge_answer

    try:
        judge_answer(prompt, "")
    except ValueError:
        return False
    return True
