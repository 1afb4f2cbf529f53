"""Single-answer grading (``grading: single``, MT-Bench style): the judge gives every answer a score on its own,
and the evaluation reports each system's mean score with a bootstrap interval (overall and per category) and
win rates read off the scores (higher score wins the prompt, equal scores tie).

A judge that grades single answers has ``score_batch(items: list[ScoreItem]) -> list[float | None]`` (None: its
answer did not parse). Scores are cached in ``score_cache.jsonl`` by the judge's identity and the exact texts, so
a rerun asks nothing. Position bias does not apply to one answer at a time, so the audits are:

- re-ask consistency: up to ``REASK`` answers asked again past the cache; a re-ask within ``REASK_TOLERANCE``
  of the first score agrees;
- honeypots: the reference answer must score above each corrupted copy of itself;
- the reference's own mean score, reported beside the systems';
- the parse-failure rate over every answer asked.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from align_kit.evaluation import stats
from align_kit.evaluation.answers import CHOSEN, HeldOut, read_generations
from align_kit.evaluation.audits import trust_verdict
from align_kit.evaluation.reports import percent
from align_kit.evaluation.settings import EvalArgs
from align_kit.evaluation.stats import Judgment
from align_kit.judges.protocol import ScoreItem

SCORE_CACHE = "score_cache.jsonl"
REASK = 16  # answers asked a second time for the consistency audit
REASK_TOLERANCE = 1.0  # a re-ask within one point (of a 1-10 scale) agrees
REFERENCE = "reference"  # the reference answers' row in the score table


class ScoreCache:
    """``key -> score`` backed by an append-only JSONL file (None: the judge's answer did not parse)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.scores: dict[str, float | None] = {}
        for row in read_generations(self.path):  # a line cut short by a crash is ignored
            self.scores[row["key"]] = row["score"]

    def put(self, key: str, score: float | None, judge: str) -> None:
        self.scores[key] = score
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"key": key, "score": score, "judge": judge}) + "\n")


def score_key(identity: str, item: ScoreItem) -> str:
    payload = json.dumps([identity, item.prompt, item.answer, item.reference], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def fitting(judge: Any, items: Sequence[ScoreItem]) -> list[bool]:
    """Which items fit the judge's context (a judge without ``fits`` takes anything)."""
    fits = getattr(judge, "fits", None)
    return list(fits(list(items))) if fits is not None and items else [True] * len(items)


def score_all(
    judge: Any, items: Sequence[ScoreItem], cache: ScoreCache | None, progress: bool
) -> list[float | None]:
    """Every item's score: cached ones reused, the rest asked batch by batch and cached as they come."""
    keys = [score_key(judge.identity, item) for item in items]
    pending = {k: item for k, item in zip(keys, items, strict=True) if cache is None or k not in cache.scores}
    got: dict[str, float | None] = {
        k: cache.scores[k] for k in keys if cache is not None and k in cache.scores
    }
    todo = list(pending.items())
    with tqdm(total=len(todo), desc=f"score {judge.name}", disable=not progress) as bar:
        for start in range(0, len(todo), judge.batch_size):
            chunk = todo[start : start + judge.batch_size]
            for (key, _), score in zip(chunk, judge.score_batch([item for _, item in chunk]), strict=True):
                got[key] = None if score is None or math.isnan(score) else float(score)
                if cache is not None:
                    cache.put(key, got[key], judge.name)
                bar.update(1)
    return [got[k] for k in keys]


def score_judgments(
    scores: Mapping[str, Sequence[float | None]],
    answers: Mapping[str, Sequence[str | None]],
    held: HeldOut,
    system: str,
    baseline: str,
    judge: str,
) -> list[Judgment]:
    """One Judgment per prompt both sides have a score for: the higher score wins, equal scores tie."""
    out = []
    for i, (ours, theirs) in enumerate(zip(scores[system], scores[baseline], strict=True)):
        if ours is None or theirs is None:
            continue
        verdict = "win" if ours > theirs else "loss" if ours < theirs else "tie"
        out.append(
            Judgment(held.prompt_ids[i], system, baseline, verdict, system_len=len(answers[system][i].strip()),
                     baseline_len=len(answers[baseline][i].strip()), judge=judge)
        )  # fmt: skip
    return out


def mean_row(
    name: str, values: Sequence[float | None], args: EvalArgs, group: str | None = None
) -> dict[str, Any]:
    """Mean score of one system (over the prompts it has a score for) with its bootstrap interval."""
    kept = [v for v in values if v is not None]
    low, high = stats.bootstrap_ci(kept, seed=args.seed, n_boot=args.n_boot, level=args.level)
    row = {"system": name, "n": len(kept), "mean": sum(kept) / len(kept) if kept else math.nan}
    return row | {"ci_low": low, "ci_high": high} | ({"group": group} if group is not None else {})


def grade_single(
    judge: Any, out_dir: Path, held: HeldOut, answers: Mapping[str, Sequence[str | None]], plan: Any, args: EvalArgs,
    with_reference: bool,
) -> dict[str, Any]:  # fmt: skip
    """Everything one single-grading judge says: scores, win rates from them, audits and the prompt counts."""
    if not callable(getattr(judge, "score_batch", None)):
        raise ValueError(
            f"judge {judge.name} cannot grade single answers (no score_batch); use grading: pairwise"
        )
    cache = ScoreCache(out_dir / SCORE_CACHE)
    refs = held.chosen if with_reference else [None] * len(held.prompts)
    names = [n for n in answers if n != CHOSEN]
    scores: dict[str, list[float | None]] = {}
    asked: list[float | None] = []  # every score asked for, for the parse-failure rate
    overflow: set[int] = set()  # prompts with an answer too long for the judge
    for name in [*names, CHOSEN] if held.n_references else names:
        keep = [
            i
            for i, a in enumerate(answers[name])
            if a is not None and not (with_reference and refs[i] is None)
        ]
        fits = fitting(judge, [ScoreItem(held.prompts[i], answers[name][i], refs[i]) for i in keep])
        overflow |= {i for i, ok in zip(keep, fits, strict=True) if not ok}
        keep = [i for i, ok in zip(keep, fits, strict=True) if ok]
        got = score_all(
            judge, [ScoreItem(held.prompts[i], answers[name][i], refs[i]) for i in keep], cache, args.progress
        )
        asked += got
        scores[name] = [None] * len(held.prompts)
        for i, score in zip(keep, got, strict=True):
            scores[name][i] = score
    judgments = [
        j for s, b in plan.comparisons for j in score_judgments(scores, answers, held, s, b, judge.name)
    ]
    rows = [mean_row(REFERENCE if n == CHOSEN else n, scores[n], args) for n in scores]
    by_group = []
    for group in sorted(set(held.groups or [])):
        for name in scores:
            values = [v for v, g in zip(scores[name], held.groups, strict=True) if g == group]
            by_group.append(mean_row(REFERENCE if name == CHOSEN else name, values, args, group))
    audit = single_audits(judge, held, answers, scores, plan, refs, args, asked)
    decided = [any(scores[n][i] is not None for n in names) for i in range(len(held.prompts))]
    return {
        "grading": "single" + (" with reference" if with_reference else ""),
        "scores": rows,
        "scores_by_group": by_group,
        "judgments": judgments,
        "decided": decided,
        "overflow": overflow,
        **audit,
    }


def single_audits(
    judge: Any, held: HeldOut, answers: Mapping[str, Sequence[str | None]], scores: Mapping[str, Sequence[float | None]],
    plan: Any, refs: Sequence[str | None], args: EvalArgs, asked: Sequence[float | None],
) -> dict[str, Any]:  # fmt: skip
    """Re-ask consistency, honeypot scores below the real answer's, parse failures, and their checks."""
    base = [i for i, s in enumerate(scores[args.base]) if s is not None][:REASK]  # scored, so they fit
    items = [ScoreItem(held.prompts[i], answers[args.base][i], refs[i]) for i in base]
    again = score_all(judge, items, None, False) if items else []
    pairs = [(scores[args.base][i], s) for i, s in zip(base, again, strict=True)]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    consistency = sum(abs(a - b) <= REASK_TOLERANCE for a, b in pairs) / len(pairs) if pairs else math.nan
    index = {pid: i for i, pid in enumerate(held.prompt_ids)}
    real = [ScoreItem(p.prompt, p.first, refs[index[p.prompt_id]]) for p in plan.honeypots]
    fake = [ScoreItem(p.prompt, p.second, refs[index[p.prompt_id]]) for p in plan.honeypots]
    fit = [a and b for a, b in zip(fitting(judge, real), fitting(judge, fake), strict=True)]
    real = [item for item, ok in zip(real, fit, strict=True) if ok]
    fake = [item for item, ok in zip(fake, fit, strict=True) if ok]
    got = score_all(judge, real + fake, None, False) if real else []
    honey = [
        (a, b)
        for a, b in zip(got[: len(real)], got[len(real) :], strict=True)
        if a is not None and b is not None
    ]
    passed = sum(a > b for a, b in honey) / len(honey) if honey else math.nan
    failures = sum(s is None for s in asked) / len(asked) if asked else math.nan
    figures = {"reask_consistency": consistency, "n_reasked": len(pairs), "honeypot_pass_rate": passed,
               "n_honeypots": len(honey), "parse_failure_rate": failures}  # fmt: skip
    checks = [
        _check("reask_consistency", consistency, 0.9, 1.0),
        _check("honeypot_pass_rate", passed, 0.9, 1.0),
        _check("parse_failure_rate", failures, 0.0, 0.05),
    ]
    notes = [
        f"Re-asks: {len(pairs)} answers of {args.base} scored again past the cache; agreeing within "
        f"{REASK_TOLERANCE:g} point: {percent(consistency)}. Honeypots: the reference must score above a "
        f"corrupted copy of itself, {len(honey)} pairs. Position bias does not apply to single grading.",
    ]
    return {"audit": figures, "audit_checks": checks, "audit_notes": notes, "trust": trust_verdict(checks)}


def _check(name: str, value: float, low: float, high: float) -> dict[str, Any]:
    passed = None if value is None or math.isnan(value) else low <= value <= high
    return {"name": name, "value": value, "low": low, "high": high, "passed": passed}


def score_table(rows: Sequence[Mapping[str, Any]], level: float) -> dict[str, Any]:
    """A report table of mean scores (with the group column when the rows have one)."""
    grouped = any("group" in r for r in rows)
    headers = (["Group"] if grouped else []) + ["System", "n", "Mean score", f"{100 * level:g}% CI"]
    body = [
        ([r["group"]] if grouped else [])
        + [r["system"], str(r["n"]), f"{r['mean']:.2f}", f"{r['ci_low']:.2f}-{r['ci_high']:.2f}"]
        for r in rows
    ]
    return {"title": "Scores by category" if grouped else "Scores", "headers": headers, "rows": body}
