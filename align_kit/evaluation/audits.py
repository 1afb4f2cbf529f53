"""Auditing a judge on pairs whose better answer is known: honeypots (the chosen answer against a
truncated, word-shuffled, empty or off-topic copy of itself) and the dataset's own chosen/rejected labels;
and the audit figures with their pass/fail checks, computed here once for every report."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from align_kit.evaluation import ratings, stats
from align_kit.evaluation.answers import HeldOut, prompt_id
from align_kit.evaluation.settings import HONEYPOT_KINDS
from align_kit.evaluation.stats import Judgment
from align_kit.judges.labelling import corrupt
from align_kit.judges.protocol import PairResult, total_traffic
from align_kit.judges.verdicts import Outcome, check_audit

AuditKind = Literal["honeypot", "labels"]


@dataclass(frozen=True)
class AuditPair:
    """One audit pair: ``first`` against ``second``; ``expected`` is the outcome for ``first``."""

    kind: AuditKind
    prompt_id: str
    prompt: str
    first: str
    second: str
    expected: Outcome
    corruption: str | None = None  # honeypots: which of HONEYPOT_KINDS made ``second``

    @property
    def label(self) -> str:
        """How the pair's comparison is named in judgments ('honeypot:shuffled', 'labels')."""
        return f"{self.kind}:{self.corruption}" if self.corruption else self.kind


def _words(text: str) -> list[str]:
    return text.split()


def honeypots(held: HeldOut, n: int, kinds: Sequence[str], seed: int) -> tuple[list[AuditPair], Counter]:
    """The chosen answer of the first ``n`` held-out prompts against corrupted copies of itself:
    truncated to its first quarter of words, its words shuffled, empty, or the answer to another prompt
    sharing the fewest words with it. Answers too short to corrupt are counted, not used."""
    unknown = sorted(set(kinds) - set(HONEYPOT_KINDS))
    if unknown:
        raise ValueError(f"unknown honeypot kind(s) {unknown}; choose from {HONEYPOT_KINDS}")
    rng = random.Random(seed)
    pairs, skipped = [], Counter()
    with_reference = [i for i, answer in enumerate(held.chosen) if answer is not None][:n]
    for i in with_reference:
        pid, prompt, real = held.prompt_ids[i], held.prompts[i], held.chosen[i]
        for kind in kinds:  # the corruptions labelling plants too, plus another prompt's answer
            fake = _off_topic(i, held, rng) if kind == "off_topic" else corrupt(real, kind, rng)
            if fake is None or fake.strip() == real.strip():
                skipped[f"honeypot {kind}: answer too short to corrupt"] += 1
            else:
                pairs.append(AuditPair("honeypot", pid, prompt, real, fake, "win", corruption=kind))
    return pairs, skipped


def _off_topic(index: int, held: HeldOut, rng: random.Random, candidates: int = 16) -> str | None:
    """The chosen answer of another prompt with the least word overlap (Jaccard) with this one's."""
    others = [
        k
        for k in range(len(held.prompts))
        if k != index and held.chosen[k] is not None and held.chosen[k] != held.chosen[index]
    ]
    if not others:
        return None
    own = set(w.lower() for w in _words(held.chosen[index]))

    def overlap(k: int) -> float:
        theirs = set(w.lower() for w in _words(held.chosen[k]))
        return len(own & theirs) / max(1, len(own | theirs))

    return held.chosen[min(rng.sample(others, min(candidates, len(others))), key=overlap)]


def label_pairs(held: HeldOut, n: int, seed: int) -> list[AuditPair]:
    """Held-out chosen/rejected rows as pairs, the chosen answer first or second by a seeded coin, so the
    dataset's labels hold both 'win' and 'loss' and Cohen's kappa is defined."""
    rng = random.Random(seed + 1)
    pairs = []
    for row in held.rows[:n]:
        pid = prompt_id(row["prompt"])
        if rng.random() < 0.5:
            pairs.append(AuditPair("labels", pid, row["prompt"], row["chosen"], row["rejected"], "win"))
        else:
            pairs.append(AuditPair("labels", pid, row["prompt"], row["rejected"], row["chosen"], "loss"))
    return pairs


def audit_judge(
    judgments: Sequence[Judgment],
    asked: Sequence[PairResult],
    audited: Sequence[tuple[AuditPair, PairResult]],
    rates: Any = None,
) -> dict[str, Any]:
    """Every audit figure of one judge, its checks against ``verdicts.AUDIT_THRESHOLDS`` and the notes that say
    how each was measured; computed once, here, and only rendered by the reports.

    ``judgments``: every decided pair (comparisons and audit pairs) for position bias; ``asked``: every pair
    asked in both orders, decided or not, for the parse-failure rate; ``audited``: the audit pairs with their
    results; ``rates``: the comparisons' win-rate table for transitivity (None with fewer than 3 systems).
    """
    decided = {kind: ([], []) for kind in ("honeypot", "labels")}  # (judge outcomes, expected outcomes)
    by_kind: dict[str, list[bool]] = {}
    for pair, result in audited:
        if result.outcome is None:
            continue
        decided[pair.kind][0].append(result.outcome)
        decided[pair.kind][1].append(pair.expected)
        if pair.corruption:
            by_kind.setdefault(pair.corruption, []).append(result.outcome == pair.expected)
    honey, labels = decided["honeypot"], decided["labels"]
    figures = stats.audit(
        judgments,
        honeypots=honey if honey[0] else None,
        human=labels if labels[0] else None,
        n_intransitive=ratings.intransitive_triads(rates)["n_intransitive"] if rates is not None else None,
    )
    # over every pair asked: a pair unparseable in both orders has no Judgment, but is the worst failure
    figures["n_pairs_judged"] = len(asked)
    figures["n_pairs_unparseable"] = sum(r.outcome is None for r in asked)
    figures["parse_failure_rate"] = (
        sum(r.parse_failures > 0 for r in asked) / len(asked) if asked else math.nan
    )
    figures["honeypot_pass_rate_by_kind"] = {kind: sum(v) / len(v) for kind, v in by_kind.items()}
    notes = [
        f"Position bias covers all {len(judgments)} pairs with a verdict (comparisons, honeypots and "
        f"labelled pairs), first-slot binomial p = {_fmt(figures['first_slot_p'])}; the parse-failure rate "
        f"covers all {len(asked)} pairs asked, {figures['n_pairs_unparseable']} of them unparseable in "
        "both orders.",
        "Honeypots: the chosen answer must win against a corrupted copy; passed by kind: "
        + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in by_kind.items())
        + ".",
        f"Labels: {len(labels[0])} held-out chosen/rejected pairs, the chosen one shown first or second by a "
        "seeded coin; a tie counts as disagreement.",
    ]
    if figures["n_intransitive"] is None:
        notes.append("Transitivity needs at least 3 systems (counting chosen).")
    return {"audit": figures, "audit_checks": check_audit(figures), "audit_notes": notes}


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------------------
# The verdict on a judge, that every report opens with

# Audits without which a win rate says nothing: a judge that fails one of them is not evidence.
CORE_AUDITS: dict[str, str] = {
    "honeypot_pass_rate": "it does not reliably prefer the real answer to a corrupted copy (honeypots)",
    "human_kappa": "it disagrees with the dataset's human labels",
    "flip_rate": "its verdict changes when the two answers swap places (position bias)",
    "first_slot_rate": "it favours one presentation slot (position bias)",
    "parse_failure_rate": "too many of its answers did not parse",
}
OTHER_AUDITS: dict[str, str] = {"n_intransitive": "its preferences between systems form a cycle"}
NOT_EVIDENCE = "these win rates are not evidence"


def trust_verdict(checks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What a reader must know about a judge before any win rate: ``evidence`` is False when a core audit
    (``CORE_AUDITS``) failed; ``lines`` has one line per failed check, then one naming the core audits
    that could not be measured; ``headline`` is the sentence a report opens with."""
    reasons = CORE_AUDITS | OTHER_AUDITS
    failed = [c for c in checks if c["passed"] is False]
    core_failed = [c["name"] for c in failed if c["name"] in CORE_AUDITS]
    unmeasured = [c["name"] for c in checks if c["passed"] is None and c["name"] in CORE_AUDITS]
    lines = [
        f"{c['name']} = {_value(c['value'])}: FAIL (allowed {c['low']:g} to {c['high']:g}): "
        f"{reasons.get(c['name'], 'outside its allowed range')}"
        for c in failed
    ]
    if unmeasured:
        lines.append(f"not measured: {', '.join(unmeasured)} (no pairs to measure them on)")
    if core_failed:
        headline = f"{NOT_EVIDENCE[0].upper()}{NOT_EVIDENCE[1:]}: the judge failed {len(core_failed)} core "
        headline += f"audit{'s' if len(core_failed) > 1 else ''} ({', '.join(core_failed)})."
    elif failed:
        headline = f"The judge passed every core audit; {len(failed)} other check failed."
    elif unmeasured:
        headline = "The judge passed every audit that could be measured."
    else:
        headline = "The judge passed every audit."
    return {
        "evidence": not core_failed,
        "headline": headline,
        "failed": [c["name"] for c in failed],
        "unmeasured": unmeasured,
        "lines": lines,
    }


def judge_traffic(
    counts: dict[str, Any], threshold: float, earlier: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    """A judge's request counters for this run (every ``JudgeStats`` field) and, with the counters of
    ``earlier`` runs of the same evaluation, for all runs; they flag it when more than ``threshold`` of all
    runs' requests were retried (a rerun answered from the cache keeps an earlier run's flag). ``line`` says
    why when flagged."""
    total = total_traffic([*earlier, counts])
    requests, retries = total.get("requests") or 0, total.get("retries") or 0
    rate = retries / requests if requests else 0.0
    flagged = bool(requests) and rate > threshold
    failures = {
        "timeouts": total.get("timeouts", 0),
        "429s": total.get("rate_limited", 0),
        "5xx": total.get("server_errors", 0),
        "bad bodies": total.get("bad_bodies", 0),
        "connection errors": total.get("connection_errors", 0),
    }
    line = ""
    if flagged:
        causes = ", ".join(f"{v} {k}" for k, v in failures.items() if v) or "no cause counted"
        runs = f" over {len(earlier) + 1} runs" if earlier else ""
        line = (
            f"judge traffic: {retries} of {requests} requests retried{runs} ({100 * rate:.0f}%, over the "
            f"{100 * threshold:g}% threshold; {causes}): the run limped, check the endpoint"
        )
    return {
        "counts": dict(counts),
        "runs": len(earlier) + 1,
        "all_runs": total,
        "retry_rate": rate,
        "threshold": threshold,
        "flagged": flagged,
        "line": line,
    }


def _value(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------------------
# Degenerate answers: a judge cannot make evidence of answers that are blank or loop

MIN_REPEAT_WORDS = 6  # shorter answers are never called self-repeating
MIN_REPEAT_CHARS = 16


def repeats_itself(answer: str, threshold: float = 0.5) -> bool:
    """True when fewer than ``threshold`` of an answer's word trigrams are distinct (or, for an answer of few
    words, of its character 4-grams): the answer loops."""
    words = answer.split()
    if len(words) >= MIN_REPEAT_WORDS:
        grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    elif len(answer.strip()) >= MIN_REPEAT_CHARS:
        text = answer.strip()
        grams = [text[i : i + 4] for i in range(len(text) - 3)]
    else:
        return False
    return len(set(grams)) / len(grams) < threshold


def degenerate_answers(answered: dict[str, Any], max_share: float) -> dict[str, Any]:
    """Per system (``Answered`` objects by name): the share of empty or whitespace-only answers, of answers cut
    at max_new_tokens and of self-repeating ones; a system whose empty or repeating share is over
    ``max_share`` is ``flagged`` and ``lines`` say, naming it, that its win rates are not evidence."""
    systems, flagged, lines = {}, [], []
    for name, done in answered.items():
        texts = [a for a in done.answers if a is not None]
        n = len(texts)
        empty = sum(not a.strip() for a in texts)
        repeating = sum(repeats_itself(a) for a in texts if a.strip())
        systems[name] = {
            "n": n,
            "empty": empty / n if n else math.nan,
            "repeating": repeating / n if n else math.nan,
            "cut_at_max_new_tokens": done.cut / n if n and done.cut is not None else None,
        }
        bad = {k: systems[name][k] for k in ("empty", "repeating") if n and systems[name][k] > max_share}
        if bad:
            flagged.append(name)
            shares = " and ".join(f"{100 * v:.0f}% {k}" for k, v in bad.items())
            lines.append(
                f"{NOT_EVIDENCE[0].upper()}{NOT_EVIDENCE[1:]} for system {name}: {shares} answers "
                f"(over the {100 * max_share:g}% allowed by max_degenerate)"
            )
    return {"systems": systems, "flagged": flagged, "lines": lines, "max_share": max_share}
