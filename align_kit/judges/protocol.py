"""Pairwise judges for win rates, and the both-orders protocol that removes their position bias.

A judge compares ``(prompt, answer_a, answer_b)`` in ONE order and returns ``'A'``, ``'B'``, ``'tie'``
or ``None`` (its output could not be parsed; never guessed), or a ``Reply`` holding that verdict with
the raw text it was parsed from and any rationale. ``judge_both_orders`` asks every pair with the system
in slot A and again swapped, caches each single-order reply on disk, and combines the two verdicts: see
``combine_orders``.

A judge is data: ``eval/judges/<name>/judge.yaml`` (read into ``judges.config.JudgeConfig``; unknown keys fail)
next to a prompt template in which ``{instruction}``, ``{output_1}`` (slot A) and ``{output_2}``
(slot B) are replaced in one pass. Backends (in ``align_kit/judges/backends.py``):

- ``oracle``: the embedded task's exact checker ``align_kit.data.task.oracle_score``; higher score wins.
- ``reward_model``: any object with ``score(prompts, answers) -> list[float]`` (an ensemble fits),
  or a sequence-classification model loaded from ``model``; higher score wins.
- ``hf_logits``: a local causal LM reads the rendered template and the verdict is the sign of
  ``logit(label_1) - logit(label_2)`` at the next token, one forward pass per left-padded batch
  (``mode: generate`` instead generates text and parses it, for comparison only).
- ``openai``: an OpenAI-compatible chat-completions endpoint (``align_kit/judges/openai_client.py``): concurrent,
  retried by the openai client, counted, failing fast on permanent errors, with costs and a budget.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from align_kit.data.prompts import instruction_of
from align_kit.judges.cache import JudgmentCache, cache_key
from align_kit.judges.verdicts import Outcome, Slot, combine_orders

Verdict = Slot | None  # one order's answer; None for an answer that did not parse


@dataclass(frozen=True)
class PairItem:
    """One question for a judge, in one order: which of ``answer_a`` (slot A) and ``answer_b`` is better."""

    prompt: str
    answer_a: str
    answer_b: str
    reference: str | None = None  # the data's reference answer, for templates with {reference}


@dataclass(frozen=True)
class ScoreItem:
    """One answer for a single-grading judge to score, with the reference answer where there is one."""

    prompt: str
    answer: str
    reference: str | None = None


@dataclass(frozen=True)
class Reply:
    """One order's answer from a judge: the ``verdict`` and, when the backend has them, the ``text`` it
    was parsed from and a ``rationale`` given before it. A backend may return bare verdicts instead."""

    verdict: Verdict
    text: str | None = None
    rationale: str | None = None


def as_reply(answer: Reply | Verdict) -> Reply:
    """A backend's answer for one item as a Reply (a bare verdict has no text)."""
    return answer if isinstance(answer, Reply) else Reply(answer)


@dataclass
class JudgeStats:
    """What a judge did; read by tests and benchmarks (a rerun from a full cache leaves ``calls`` at 0)."""

    calls: int = 0  # single-order pairs handed to the backend
    requests: int = 0  # HTTP requests, retries included (openai only)
    retries: int = 0
    timeouts: int = 0
    rate_limited: int = 0
    server_errors: int = 0
    connection_errors: int = 0
    bad_bodies: int = 0  # 2xx replies that were no chat completion (malformed JSON, HTML, no choices)
    parse_failures: int = 0
    prompt_tokens: int = 0  # from each response's usage (openai only)
    completion_tokens: int = 0
    cost: float = 0.0  # from the judge's prices per million tokens; 0 without prices
    logprob_fallbacks: int = 0  # verdict_from=logprobs answers read as text (a label not listed)
    lowest_concurrency: int = 0  # fewest requests let in flight after a timeout or 429 (openai; 0: no cut)
    first_bad_body: str = ""  # the first bytes of the first bad body


TRAFFIC_LOG = "traffic.jsonl"  # one line of counters per run, in a judge's (or a served system's) folder


def log_traffic(folder: str | Path, counts: dict[str, Any]) -> list[dict[str, Any]]:
    """Append one run's counters (``JudgeStats`` fields) to ``folder/traffic.jsonl`` and return those of
    the runs before it, so a rerun of one evaluation reports its traffic beside all of theirs; a line
    cut short by a crash is ignored."""
    path = Path(folder) / TRAFFIC_LOG
    earlier = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                earlier.append(dict(json.loads(line)))
            except (ValueError, TypeError):
                continue
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(counts, ensure_ascii=False, default=str) + "\n")
    return earlier


def total_traffic(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counters of several runs added up: numbers summed, ``lowest_concurrency`` the smallest cut (0: none),
    any other value the first one given."""
    total: dict[str, Any] = {}
    for run in runs:
        for key, value in run.items():
            before = total.get(key)
            if not isinstance(value, int | float) or isinstance(value, bool):
                total[key] = before if before else value
            elif key == "lowest_concurrency":
                total[key] = min(v for v in (before, value) if v) if before or value else 0
            else:
                total[key] = (before or 0) + value
    return total


class Judge(Protocol):
    """What ``judge_both_orders`` needs from a judge."""

    name: str
    identity: str  # everything that changes a verdict (model, template, decoding); keys the cache
    batch_size: int  # pairs per ``judge_batch`` call, and so per cache flush
    stats: JudgeStats

    def judge_batch(self, items: list[PairItem]) -> list[Reply | Verdict]: ...


class Scorer(Protocol):
    """Anything that scores answers: a reward model, an ensemble of them, the task oracle."""

    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]: ...


# ---------------------------------------------------------------------------------------------------
# Prompts and parsing


PLACEHOLDER = re.compile(r"\{(instruction|output_1|output_2|question|answer_a|answer_b|answer|reference)\}")


def render_prompt(template: str, item: PairItem | ScoreItem) -> str:
    """Fill the placeholders in one pass, so text inside an answer is never substituted again;
    ``{question}``, ``{answer_a}`` and ``{answer_b}`` are other names of ``{instruction}``, ``{output_1}``
    and ``{output_2}``; a ScoreItem fills ``{answer}``; ``{reference}`` is the reference answer."""
    values = {"instruction": instruction_of(item.prompt), "reference": (item.reference or "").strip()}
    if isinstance(item, ScoreItem):
        values["answer"] = item.answer.strip()
    else:
        values |= {"output_1": item.answer_a.strip(), "output_2": item.answer_b.strip()}
        values |= {"answer_a": values["output_1"], "answer_b": values["output_2"]}
    values["question"] = values["instruction"]
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def parse_verdict(
    text: str | None, labels: Sequence[str], tie_label: str | None = None, regex: str | None = None
) -> Verdict:
    """Strict parse of a judge's answer: the stripped text must be a label (or, with ``regex``, the
    regex must fullmatch it and its group 'verdict' or 1 must be a label). Anything else is None."""
    if text is None:
        return None
    answer = text.strip()
    if regex is not None:
        match = re.fullmatch(regex, answer, flags=re.DOTALL)
        if match is None:
            return None
        answer = (
            match.group("verdict") if "verdict" in match.re.groupindex else match.group(1) or ""
        ).strip()
    if answer == labels[0].strip():
        return "A"
    if answer == labels[1].strip():
        return "B"
    if tie_label is not None and answer == tie_label.strip():
        return "tie"
    return None


def verdict_from_margin(margin: float, tie_margin: float) -> Verdict:
    """'A' when slot A leads by more than ``tie_margin``, 'B' when it trails by more, else 'tie'."""
    if abs(margin) <= tie_margin:
        return "tie"
    return "A" if margin > 0 else "B"


# ---------------------------------------------------------------------------------------------------
# Both orders


@dataclass(frozen=True)
class PairResult:
    """One prompt judged in both orders: the judge's slot verdict with the system shown first (``first``,
    system in slot A) and shown second (``swapped``, system in slot B), and the system's ``outcome``
    (None when neither order parsed)."""

    prompt_id: Any
    outcome: Outcome | None
    first: Verdict
    swapped: Verdict
    parse_failures: int
    judge: str
    first_reply: Reply | None = None  # the judge's raw text and rationale in each order, when it gave them
    swapped_reply: Reply | None = None


def _keyed_prompt(item: PairItem | ScoreItem) -> str:
    """The prompt as the cache key sees it: with the reference answer when the judge is shown one."""
    return item.prompt if item.reference is None else f"{item.prompt}\x00reference:{item.reference}"


def judge_both_orders(
    judge: Judge,
    prompts: Sequence[str],
    system_answers: Sequence[str],
    baseline_answers: Sequence[str],
    cache: JudgmentCache | None = None,
    prompt_ids: Sequence[Any] | None = None,
    progress: bool = False,
    references: Sequence[str | None] | None = None,
) -> list[PairResult]:
    """Judge each (prompt, system, baseline) with the system in slot A, then swapped.

    Replies already in ``cache`` are not asked again; new ones are appended as they arrive (with their
    raw text and rationale when the judge gives them): one by one from a judge with ``judge_stream``
    (openai), else batch by batch. Identical items (e.g. both answers the same) are asked once.
    """
    if not len(prompts) == len(system_answers) == len(baseline_answers):
        raise ValueError("prompts, system_answers and baseline_answers must have the same length")
    ids = list(prompt_ids) if prompt_ids is not None else list(range(len(prompts)))
    refs = list(references) if references is not None else [None] * len(prompts)
    orders = [
        (PairItem(p, s, b, r), PairItem(p, b, s, r))
        for p, s, b, r in zip(prompts, system_answers, baseline_answers, refs, strict=True)
    ]
    keys = {
        item: cache_key(judge.identity, _keyed_prompt(item), item.answer_a, item.answer_b)
        for pair in orders
        for item in pair
    }
    replies: dict[str, Reply] = {}
    pending: dict[str, PairItem] = {}  # both orders of a prompt side by side, so scorers can share work
    for item, key in keys.items():
        if cache is not None and key in cache:
            replies[key] = Reply(cache.get(key), cache.text(key), cache.rationale(key))
        else:
            pending.setdefault(key, item)
    todo = list(pending.items())
    stream = getattr(judge, "judge_stream", None)  # (index, reply) as each arrives (openai)
    with tqdm(total=len(todo), desc=f"judge {judge.name}", disable=not progress) as bar:
        for start in range(0, len(todo), judge.batch_size):
            chunk = todo[start : start + judge.batch_size]
            batch = [item for _, item in chunk]
            # a streaming judge's replies are cached on arrival, whatever happens to the rest of the batch
            answers = stream(batch) if stream is not None else enumerate(judge.judge_batch(batch))
            for index, answer in answers:
                key = chunk[index][0]
                replies[key] = reply = as_reply(answer)
                if cache is not None:
                    cache.put(key, reply.verdict, judge.name, text=reply.text, rationale=reply.rationale)
                bar.update(1)
    results = []
    for prompt_id, (first_item, swapped_item) in zip(ids, orders, strict=True):
        first, swapped = replies[keys[first_item]], replies[keys[swapped_item]]
        outcome, failures = combine_orders(first.verdict, swapped.verdict)
        results.append(
            PairResult(
                prompt_id, outcome, first.verdict, swapped.verdict, failures, judge.name, first, swapped
            )
        )
    return results
