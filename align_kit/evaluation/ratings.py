"""Ratings over several systems: pairwise win tables, Bradley-Terry strengths on the Elo scale with
bootstrap intervals over prompts, and transitivity of the pairwise preferences."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from align_kit.evaluation.stats import Judgment


def win_table(judgments: Sequence[Judgment]) -> pd.DataFrame:
    """Pairwise wins W[i, j]: how often i beat j, a tie counting half to each; systems and baselines alike.

    Rows and columns are sorted names; W[i, j] + W[j, i] is the number of pairs judged between i and j.
    """
    names = sorted({j.system for j in judgments} | {j.baseline for j in judgments})
    index = {name: i for i, name in enumerate(names)}
    wins = np.zeros((len(names), len(names)))
    for j in judgments:
        wins[index[j.system], index[j.baseline]] += j.score
        wins[index[j.baseline], index[j.system]] += 1.0 - j.score
    return pd.DataFrame(wins, index=names, columns=names)


def win_rate_table(wins: pd.DataFrame) -> pd.DataFrame:
    """Pairwise win rates W[i, j] / (W[i, j] + W[j, i]); NaN where i and j never met (and on the diagonal)."""
    games = wins + wins.T
    return wins / games.where(games > 0)


def bradley_terry(
    wins: pd.DataFrame,
    anchor: str | None = None,
    anchor_rating: float = 1000.0,
    prior: float = 0.1,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> dict[str, float]:
    """Bradley-Terry strengths fitted to a win table, on an Elo-like scale.

    Model: P(i beats j) = p_i / (p_i + p_j) = sigmoid(t_i - t_j) with t = log p. The log-likelihood
    l(t) = sum_ij W_ij log sigmoid(t_i - t_j) is concave, with gradient g_i = W_i - sum_j n_ij s_ij and
    Hessian -L, L the Laplacian of the weights n_ij s_ij s_ji (W_i is i's total wins, n_ij the games between i
    and j, s_ij = sigmoid(t_i - t_j)); it is maximised by Newton's method with t_0 fixed at 0 and step halving,
    which converges in a few steps even where Hunter's (2004) MM iteration needs thousands (a system far
    from the others). Ratings are R_i = 400 log10 p_i + c, so that P(i beats j) = 1 / (1 + 10^((R_j - R_i) /
    400)), shifted so that `anchor` sits at `anchor_rating` (or, without an anchor, their mean does).

    `prior` adds that many virtual games, split as a tie, to every pair that met: it keeps ratings finite
    when a system wins or loses every game. With prior=0 that case raises ValueError.
    """
    names = list(wins.index)
    won = np.array(wins.loc[names, names], dtype=float)  # (k, k), a writable copy
    np.fill_diagonal(won, 0.0)
    met = (won + won.T) > 0
    won = won + prior / 2 * met
    games = won + won.T  # (k, k)
    _check_connected(met, names)
    total_wins = won.sum(axis=1)  # (k,)
    if np.any(total_wins == 0) or np.any(total_wins == games.sum(axis=1)):
        raise ValueError("a system won or lost every game: the Bradley-Terry MLE is infinite; use prior > 0")

    def loglik(t: np.ndarray) -> float:
        return float(-(won * np.logaddexp(0.0, -(t[:, None] - t[None, :]))).sum())

    theta = np.zeros(len(names))
    for _ in range(max_iter):
        s = 1.0 / (1.0 + np.exp(-(theta[:, None] - theta[None, :])))  # (k, k) P(i beats j)
        grad = total_wins - (games * s).sum(axis=1)
        weights = games * s * s.T
        laplacian = np.diag(weights.sum(axis=1)) - weights
        step = np.zeros(len(names))
        step[1:] = np.linalg.solve(laplacian[1:, 1:], grad[1:])
        size, before = 1.0, loglik(theta)
        while loglik(theta + size * step) < before - 1e-12 and size > 1e-6:
            size /= 2
        theta = theta + size * step
        if np.max(np.abs(size * step)) < tol:
            break
    rating = 400.0 * theta / math.log(10.0)
    offset = anchor_rating - (rating[names.index(anchor)] if anchor is not None else rating.mean())
    return {name: float(r + offset) for name, r in zip(names, rating, strict=True)}


def _check_connected(met: np.ndarray, names: list[str]) -> None:
    """Ratings of two groups that never met are not comparable: refuse rather than print fiction."""
    reached, frontier = {0}, [0]
    while frontier:
        i = frontier.pop()
        for j in np.flatnonzero(met[i]):
            if int(j) not in reached:
                reached.add(int(j))
                frontier.append(int(j))
    if len(reached) != len(names):
        raise ValueError(
            f"comparison graph is not connected: {sorted(set(names) - {names[i] for i in reached})}"
        )


def intransitive_triads(rates: pd.DataFrame) -> dict[str, Any]:
    """Count triads {a, b, c} whose majority preferences form a cycle a > b > c > a.

    x > y means rate[x, y] > 0.5. Only triads where all three pairs met and none is exactly 0.5 are
    decided; `cycles` lists each intransitive one as [a, b, c] meaning a > b > c > a.
    """
    names = list(rates.index)
    decided, cycles = 0, []
    for a, b, c in itertools.combinations(names, 3):
        pair_rates = [rates.loc[a, b], rates.loc[b, c], rates.loc[c, a]]
        if any(pd.isna(r) or r == 0.5 for r in pair_rates):
            continue
        decided += 1
        ab, bc, ca = (r > 0.5 for r in pair_rates)
        if ab and bc and ca:
            cycles.append([a, b, c])
        elif not ab and not bc and not ca:
            cycles.append([a, c, b])
    return {"n_triads": decided, "n_intransitive": len(cycles), "cycles": cycles}


def rank_systems(
    judgments: Sequence[Judgment],
    anchor: str | None = None,
    anchor_rating: float = 1000.0,
    prior: float = 0.1,
) -> dict[str, Any]:
    """Bradley-Terry ratings, pairwise win rates and transitivity of every system in `judgments`.

    Never raises on what a judge produced: with fewer than two rated systems, or a comparison graph that
    is not connected, `ratings` is empty and `note` says why; an `anchor` with no decided pair is
    replaced by the mean rating, with a note.
    """
    wins = win_table(judgments)
    rates = win_rate_table(wins)
    out: dict[str, Any] = {
        "anchor": anchor,
        "anchor_rating": anchor_rating,
        "ratings": {},
        "win_rates": {
            a: {b: _or_none(rates.loc[a, b]) for b in rates.columns if a != b} for a in rates.index
        },
        "transitivity": intransitive_triads(rates),
        "note": "",
    }
    if len(wins) < 2:
        out["note"] = "no ratings: fewer than two systems have a decided pair"
        return out
    if anchor is not None and anchor not in wins.index:
        out["note"] = f"the anchor {anchor} has no decided pair: ratings are centred on their mean"
        out["anchor"] = anchor = None
    try:
        ratings = bradley_terry(wins, anchor=anchor, anchor_rating=anchor_rating, prior=prior)
    except ValueError as error:
        out["note"] = f"no ratings: {error}"
        return out
    out["ratings"] = dict(sorted(ratings.items(), key=lambda item: -item[1]))
    return out


def bootstrap_ratings(
    judgments: Sequence[Judgment],
    anchor: str | None = None,
    anchor_rating: float = 1000.0,
    prior: float = 0.1,
    seed: int = 0,
    n_boot: int = 200,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of the Bradley-Terry ratings, resampling prompts.

    Each resample draws as many prompts as there are, with replacement, and refits the ratings on every
    game of the drawn prompts (a prompt drawn twice counts twice): W* = sum_p c_p W_p, with c the
    multinomial draw counts and W_p the win table of prompt p. A resample whose graph is not connected is
    dropped; an interval from fewer than half the resamples is left out (NaN).
    """
    names = sorted({j.system for j in judgments} | {j.baseline for j in judgments})
    prompts = sorted({j.prompt_id for j in judgments})
    if len(names) < 2 or not prompts:
        return {}
    index, at = {n: i for i, n in enumerate(names)}, {p: i for i, p in enumerate(prompts)}
    per_prompt = np.zeros((len(prompts), len(names), len(names)))  # (P, k, k)
    for j in judgments:
        per_prompt[at[j.prompt_id], index[j.system], index[j.baseline]] += j.score
        per_prompt[at[j.prompt_id], index[j.baseline], index[j.system]] += 1.0 - j.score
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(prompts), np.full(len(prompts), 1 / len(prompts)), size=n_boot)  # (B, P)
    draws = []
    for wins in np.einsum("bp,pij->bij", counts, per_prompt):
        try:
            fitted = bradley_terry(
                pd.DataFrame(wins, index=names, columns=names), anchor, anchor_rating, prior
            )
        except ValueError:
            continue
        draws.append([fitted[n] for n in names])
    if len(draws) < n_boot / 2:
        return {n: (math.nan, math.nan) for n in names}
    alpha = 1.0 - level
    low, high = np.quantile(np.array(draws), [alpha / 2, 1.0 - alpha / 2], axis=0)  # (k,) each
    return {n: (float(lo), float(hi)) for n, lo, hi in zip(names, low, high, strict=True)}


def _or_none(value: float) -> float | None:
    return None if pd.isna(value) else float(value)
