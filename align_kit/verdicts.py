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
