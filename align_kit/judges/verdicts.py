"""The words of a judgment, defined once.

A judge answers one presentation order of a pair with a *slot*: ``'A'`` (the answer shown first),
``'B'`` (shown second) or ``'tie'``; ``None`` is an answer that did not parse. Every pair is asked in
both orders, the system under test first and then second, and the two slots combine into the system's
*outcome*: ``'win'``, ``'tie'`` or ``'loss'``, scored 1, 0.5 and 0.
"""

from __future__ import annotations

from typing import Literal

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
