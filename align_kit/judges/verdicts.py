"""The words of a judgment, defined once.

A judge answers one presentation order of a pair with a *slot*: ``'A'`` (the answer shown first),
``'B'`` (shown second) or ``'tie'``; ``None`` is an answer that did not parse. Every pair is asked in
both orders, the system under test first and then second, and the two slots combine into the system's
*outcome*: ``'win'``, ``'tie'`` or ``'loss'``, scored 1, 0.5 and 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

Slot = Literal["A", "B", "tie"]
Outcome = Literal["win", "tie", "loss"]
SLOTS: tuple[Slot, ...] = ("A", "B", "tie")
OUTCOMES: tuple[Outcome, ...] = ("win", "tie", "loss")
OUTCOME_SCORES: dict[str, float] = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def combine_orders(first: Slot | None, swapped: Slot | None) -> tuple[Outcome | None, int]:
    """The system's outcome from its two single-order verdicts, and the number of parse failures.

    ``first`` was given with the system in slot A, ``swapped`` with it in slot B.
    - both orders pick the system ('A' then 'B'): win; both pick the baseline ('B' then 'A'): loss;
    - they disagree, or either says tie: tie (a position-dependent preference is no preference);
    - one order failed to parse: tie, one failure counted: a lone order cannot be checked for position
      bias, so it may not decide a pair;
    - both failed: None, two failures counted; the caller leaves the pair out and reports the count.
    """
    failures = (first is None) + (swapped is None)
    if failures == 2:
        return None, 2
    if failures == 1:
        return "tie", 1
    if (first, swapped) == ("A", "B"):
        return "win", 0
    if (first, swapped) == ("B", "A"):
        return "loss", 0
    return "tie", 0


CombineRule = Literal["strict", "average"]
COMBINE_RULES: tuple[CombineRule, ...] = ("strict", "average")
# What one order's slot is worth to the system: shown first it is slot A, shown second slot B.
_FIRST_ORDER_SCORES: dict[str, float] = {"A": 1.0, "tie": 0.5, "B": 0.0}
_SWAPPED_ORDER_SCORES: dict[str, float] = {"B": 1.0, "tie": 0.5, "A": 0.0}


def pair_score(first: Slot | None, swapped: Slot | None, rule: CombineRule = "strict") -> float | None:
    """The system's score for one pair under ``rule``; None when neither order parsed.

    - ``strict``: the score of ``combine_orders``'s outcome (win 1, tie 0.5, loss 0), so a pair is won
      only when both orders pick the system;
    - ``average`` (Arena-Hard's rule): the mean of the two single-order scores from the system's side,
      each 1 (picks the system), 0.5 (tie) or 0 (picks the baseline): a win in one order and a tie in the
      other scores 0.75, a win and a loss 0.5. With one order unparseable the pair scores 0.5, as under
      strict: a lone order cannot be checked for position bias.
    """
    if rule not in COMBINE_RULES:
        raise ValueError(f"combine rule must be one of {COMBINE_RULES}, got {rule!r}")
    outcome, failures = combine_orders(first, swapped)
    if outcome is None:
        return None
    if rule == "strict" or failures:
        return OUTCOME_SCORES[outcome]
    return (_FIRST_ORDER_SCORES[first] + _SWAPPED_ORDER_SCORES[swapped]) / 2


# Allowed closed range [low, high] of each audit figure of a judge, in evaluations and in labelling; a figure
# outside fails the audit.
AUDIT_THRESHOLDS: dict[str, tuple[float, float]] = {
    "flip_rate": (0.0, 0.25),  # a verdict that changes when the order is swapped is noise
    "first_slot_rate": (0.4, 0.6),  # an unbiased judge picks slot A half of the decided times
    "parse_failure_rate": (0.0, 0.05),
    "honeypot_pass_rate": (0.9, 1.0),  # honeypots have an obvious answer
    "human_kappa": (0.4, 1.0),  # at least "moderate" agreement (Landis & Koch, 1977)
    "n_intransitive": (0.0, 0.0),
}


def check_audit(
    figures: Mapping[str, Any], thresholds: Mapping[str, tuple[float, float]] | None = None
) -> list[dict[str, Any]]:
    """One row per threshold: {name, value, low, high, passed}; passed is None when the figure is missing."""
    rows = []
    for name, (low, high) in (thresholds or AUDIT_THRESHOLDS).items():
        value = figures.get(name)
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        passed = None if missing else bool(low <= value <= high)
        rows.append(
            {"name": name, "value": None if missing else value, "low": low, "high": high, "passed": passed}
        )
    return rows


def cohens_kappa(labels_a: Sequence[str], labels_b: Sequence[str]) -> float:
    """Cohen's (1960) kappa, (p_o - p_e) / (1 - p_e), with p_o the observed agreement and
    p_e = sum_k P_a(k) P_b(k) the agreement expected by chance from each rater's marginals.
    NaN when p_e = 1 (both raters always give the same single label)."""
    if len(labels_a) != len(labels_b):
        raise ValueError(f"label lists differ in length: {len(labels_a)} vs {len(labels_b)}")
    if not labels_a:
        return math.nan
    n = len(labels_a)
    observed = sum(1 for a, b in zip(labels_a, labels_b, strict=True) if a == b) / n
    chance = sum(
        (sum(1 for a in labels_a if a == k) / n) * (sum(1 for b in labels_b if b == k) / n)
        for k in set(labels_a) | set(labels_b)
    )
    return (observed - chance) / (1.0 - chance) if chance < 1.0 else math.nan
