"""Preference pairs labelled by a judge (AI feedback), and the audit of the labelling itself.

A policy's sampled answers to one prompt are paired (``candidate_pairs``) and every pair is judged in both
orders by ``judges.judge_both_orders`` (cached, counted): the answer that wins both orders becomes
``chosen``; a tie (the orders disagree, or the judge said tie) or a pair unparseable in both orders is
counted and left out (``preference_rows``). Nothing is guessed.

The labelling is audited on what it judged (``labelling_audit``): position bias (how often the verdict
flips when the answers swap slots, and how often slot A is picked among decided single-order verdicts),
the parse-failure rate, honeypots (a real answer against a truncated, word-shuffled or empty copy of
itself; ``honeypot_pairs``) and agreement with human labels where the prompts carry them (the dataset's
chosen/rejected rows, accuracy and Cohen's kappa). Each figure is checked against the evaluation's
``verdicts.AUDIT_THRESHOLDS``; a labelling that fails a check is marked (``data.LABELLING_MARK``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

from scipy import stats as scipy_stats

from align_kit.configs import ConfigError
from align_kit.judges.backends import load_judge
from align_kit.judges.cache import JudgmentCache
from align_kit.judges.protocol import Judge, PairResult, judge_both_orders
from align_kit.judges.verdicts import AUDIT_THRESHOLDS, OUTCOME_SCORES, Outcome, check_audit, cohens_kappa

HONEYPOT_KINDS = ("truncated", "shuffled", "empty")  # corruptions any answer of two words or more allows
CHECKED = ("flip_rate", "first_slot_rate", "parse_failure_rate", "honeypot_pass_rate", "human_kappa")
CONSISTENT = {("A", "B"), ("B", "A"), ("tie", "tie")}  # swapping moves the same answer to the other slot


def candidate_pairs(
    prompts: Sequence[str], samples: Sequence[Sequence[str]], pairs_per_prompt: int, seed: int
) -> tuple[list[tuple[str, str, str]], Counter]:
    """Up to ``pairs_per_prompt`` (prompt, answer_a, answer_b) per prompt, drawn (seeded) from the pairs of
    its distinct sampled answers, the two answers in a seeded random order. A prompt whose samples are all
    the same answer gives no pair and is counted."""
    rng = random.Random(seed)
    pairs, skipped = [], Counter()
    for prompt, group in zip(prompts, samples, strict=True):
        distinct = list(dict.fromkeys(group))
        combos = list(itertools.combinations(distinct, 2))
        if not combos:
            skipped["prompt: all sampled answers identical"] += 1
            continue
        rng.shuffle(combos)
        for a, b in combos[:pairs_per_prompt]:
            pairs.append((prompt, a, b) if rng.random() < 0.5 else (prompt, b, a))
    return pairs, skipped


def preference_rows(
    pairs: Sequence[tuple[str, str, str]], results: Sequence[PairResult]
) -> tuple[list[dict[str, str]], Counter]:
    """Preference rows (prompt, chosen, rejected) of the pairs the judge decided in both orders; ties and
    pairs unparseable in both orders are counted, not written."""
    rows, counts = [], Counter()
    for (prompt, a, b), result in zip(pairs, results, strict=True):
        counts[result.outcome or "unparseable"] += 1
        if result.outcome == "win":
            rows.append({"prompt": prompt, "chosen": a, "rejected": b})
        elif result.outcome == "loss":
            rows.append({"prompt": prompt, "chosen": b, "rejected": a})
    return rows, counts


def corrupt(answer: str, kind: str, rng: random.Random) -> str | None:
    """A copy of ``answer`` that a working judge must rank below it, or None when it is too short for
    ``kind``: its first quarter of words, its words shuffled, or nothing at all. The labelling audit and the
    evaluation's honeypots both plant it."""
    words = answer.split()
    if kind == "truncated" and len(words) >= 2:
        return " " + " ".join(words[: max(1, len(words) // 4)])
    if kind == "shuffled" and len(set(words)) >= 2:
        shuffled = list(words)
        while shuffled == words:
            rng.shuffle(shuffled)
        return " " + " ".join(shuffled)
    if kind == "empty" and words:
        return ""
    if kind not in HONEYPOT_KINDS:
        raise ValueError(f"unknown honeypot kind {kind!r}; choose from {HONEYPOT_KINDS}")
    return None


def honeypot_pairs(
    prompts: Sequence[str], answers: Sequence[str], kinds: Sequence[str], seed: int
) -> tuple[list[tuple[str, str, str, str]], Counter]:
    """(prompt, real answer, corrupted copy, kind) for each answer and kind; too-short answers counted."""
    rng = random.Random(seed)
    pairs, skipped = [], Counter()
    for prompt, real in zip(prompts, answers, strict=True):
        for kind in kinds:
            fake = corrupt(real, kind, rng)
            if fake is None or fake.strip() == real.strip():
                skipped[f"honeypot {kind}: answer too short to corrupt"] += 1
            else:
                pairs.append((prompt, real, fake, kind))
    return pairs, skipped


def human_pairs(rows: Sequence[dict[str, Any]], n: int, seed: int) -> list[tuple[str, str, str, Outcome]]:
    """(prompt, first, second, expected outcome for first) from ``n`` human-labelled rows, the chosen answer
    first or second by a seeded coin so that both outcomes occur and kappa is defined."""
    rng = random.Random(seed + 1)
    out = []
    for row in rows[:n]:
        if rng.random() < 0.5:
            out.append((row["prompt"], row["chosen"], row["rejected"], "win"))
        else:
            out.append((row["prompt"], row["rejected"], row["chosen"], "loss"))
    return out


def slot_figures(results: Sequence[PairResult]) -> dict[str, Any]:
    """Position bias and parse failures over pairs judged in both orders: ``flip_rate`` among pairs where
    both orders parsed; ``first_slot_rate`` among decided single-order verdicts (A or B), with the two-sided
    exact binomial p of rate 0.5; ``parse_failure_rate``: pairs with at least one unparsed order."""
    both = [(r.first, r.swapped) for r in results if r.first is not None and r.swapped is not None]
    decided = [v for r in results for v in (r.first, r.swapped) if v in ("A", "B")]
    first = sum(v == "A" for v in decided)
    return {
        "n_pairs_judged": len(results),
        "flip_rate": sum(pair not in CONSISTENT for pair in both) / len(both) if both else math.nan,
        "first_slot_rate": first / len(decided) if decided else math.nan,
        "first_slot_p": float(scipy_stats.binomtest(first, len(decided), 0.5).pvalue)
        if decided
        else math.nan,
        "parse_failure_rate": sum(r.parse_failures > 0 for r in results) / len(results)
        if results
        else math.nan,
    }


def labelling_audit(
    labelled: Sequence[PairResult],
    honeypots: Sequence[tuple[str, PairResult]],
    human: Sequence[tuple[Outcome, PairResult]],
) -> dict[str, Any]:
    """Every figure of one labelling, its checks against ``AUDIT_THRESHOLDS`` and whether it passed.

    ``labelled``: the sampled pairs; ``honeypots``: (kind, result) with the real answer in the first seat;
    ``human``: (the human label's outcome for the first answer, result). Position bias and parse failures
    cover all three; a tie counts as a failed honeypot and as disagreement with the human label."""
    figures: dict[str, Any] = slot_figures([*labelled, *(r for _, r in honeypots), *(r for _, r in human)])
    outcomes = Counter(r.outcome or "unparseable" for r in labelled)
    figures |= {f"n_{k}": outcomes[k] for k in ("win", "loss", "tie", "unparseable")}
    passed_by_kind: dict[str, list[bool]] = {}
    for kind, result in honeypots:
        passed_by_kind.setdefault(kind, []).append(result.outcome == "win")
    passes = [p for v in passed_by_kind.values() for p in v]
    figures["n_honeypots"] = len(passes)
    figures["honeypot_pass_rate"] = sum(passes) / len(passes) if passes else None
    figures["honeypot_pass_rate_by_kind"] = {k: sum(v) / len(v) for k, v in passed_by_kind.items()}
    decided = [(expected, r.outcome) for expected, r in human if r.outcome is not None]
    figures["n_human"] = len(decided)
    figures["human_accuracy"] = sum(e == o for e, o in decided) / len(decided) if decided else None
    kappa = cohens_kappa([o for _, o in decided], [e for e, _ in decided]) if decided else math.nan
    figures["human_kappa"] = None if math.isnan(kappa) else kappa
    checks = check_audit(figures, {name: AUDIT_THRESHOLDS[name] for name in CHECKED})
    failed = [c["name"] for c in checks if c["passed"] is False]
    return {"figures": figures, "checks": checks, "failed": failed, "passed": not failed}


def judge_from_spec(spec: str) -> Any:
    """The judge named by a spec the evaluation takes ('name', 'name=model', a folder or judge.yaml), or a
    ConfigError naming the setting."""
    name, _, model = spec.partition("=")
    try:
        return load_judge(name, **({"model": model} if model else {}))
    except (FileNotFoundError, ValueError, TypeError) as error:
        raise ConfigError(f"judge: {spec!r}: {error}") from None


def judge_pairs(judge: Judge, pairs: Sequence[tuple[str, ...]], cache: JudgmentCache) -> list[PairResult]:
    """Each (prompt, first, second, ...) judged in both orders, ``first`` in the system's seat (cached)."""
    if not pairs:
        return []
    return judge_both_orders(
        judge, [p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs], cache
    )


class PairwiseLabeller:
    """A judge as the reward function of TRL's online DPO. TRL hands over 2B answers to B prompts, answer i
    and answer i + B sampled for the same prompt; each pair is judged in both orders (cached) and answer i
    gets 1 (won both orders), 0.5 (tie, or unparseable) or 0, answer i + B the rest. TRL trains on every
    pair, the first answer as chosen on a tie: ``counts`` says how many pairs that was."""

    def __init__(self, judge: Judge, cache: JudgmentCache | None = None):
        self.judge, self.cache, self.results = judge, cache, []
        self.__name__ = f"judge_{judge.name}"  # TRL logs rewards/<name>/mean

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **unused: Any) -> list[float]:
        half = len(completions) // 2
        results = judge_both_orders(
            self.judge, list(prompts[:half]), list(completions[:half]), list(completions[half:]), self.cache
        )
        self.results += results
        first = [OUTCOME_SCORES[r.outcome] if r.outcome else 0.5 for r in results]
        return first + [1.0 - s for s in first]

    def stats(self) -> dict[str, Any]:
        """Outcomes of every pair labelled, position bias and parse failures, and the judge's traffic."""
        outcomes = Counter(r.outcome or "unparseable" for r in self.results)
        return {
            "outcomes": dict(outcomes),
            **slot_figures(self.results),
            "traffic": dataclasses.asdict(self.judge.stats),
        }
