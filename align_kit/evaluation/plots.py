"""The report's plots, drawn by matplotlib's Agg canvas (no pyplot, no global state) and returned as base64
PNG strings for a self-contained page: win rates with their intervals, answer lengths, ratings."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from align_kit.evaluation import stats
from align_kit.evaluation.stats import Judgment


def plot_win_rates(comparisons: Sequence[Mapping[str, Any]]) -> str:
    """Raw and length-controlled win rate of each comparison with its CI as error bars."""
    fig = _figure(7, 0.6 * len(comparisons) + 1.4)
    ax = fig.add_subplot()
    labels = [f"{s['system']} vs {s['baseline']}" for s in comparisons]
    y = np.arange(len(comparisons))
    raw = [(s["win_rate"], s["ci_low"], s["ci_high"]) for s in comparisons]
    lc = [tuple(s["length_controlled"][k] for k in ("estimate", "ci_low", "ci_high")) for s in comparisons]
    for offset, points, marker, name in [(-0.15, raw, "o", "win rate"), (0.15, lc, "s", "length-controlled")]:
        centre, low, high = np.array(points, dtype=float).T  # (3, comparisons)
        # bootstrap quantiles can sit a rounding error off the mean; errorbar refuses negative lengths
        spread = [np.maximum(centre - low, 0.0), np.maximum(high - centre, 0.0)]
        ax.errorbar(centre, y + offset, xerr=spread, fmt=marker, capsize=4, label=name)
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(y, labels)
    ax.set_xlim(0, 1)
    ax.set_xlabel("win rate (ties count half)")
    ax.invert_yaxis()
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    return _png_base64(fig)


def plot_lengths(judgments: Sequence[Judgment], max_panels: int = 6) -> str:
    """Histograms of system and baseline answer lengths, one panel per comparison."""
    pairs = sorted({(j.system, j.baseline) for j in judgments})[:max_panels]
    fig = _figure(3.4 * len(pairs), 2.8)
    for k, (system, baseline) in enumerate(pairs, start=1):
        ax = fig.add_subplot(1, len(pairs), k)
        rows = stats.select(judgments, system, baseline)
        system_len, baseline_len = [j.system_len for j in rows], [j.baseline_len for j in rows]
        bins = np.histogram_bin_edges(system_len + baseline_len, bins=20)
        ax.hist(baseline_len, bins=bins, alpha=0.6, label=baseline)
        ax.hist(system_len, bins=bins, alpha=0.6, label=system)
        ax.set_title(f"{system} vs {baseline}", fontsize=9)
        ax.set_xlabel("answer length")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png_base64(fig)


def plot_ratings(ranking: Mapping[str, Any], intervals: Mapping[str, Sequence[Any]] | None = None) -> str:
    """Bradley-Terry ratings as horizontal bars, best on top, with ``intervals`` as error bars if given."""
    names = list(ranking["ratings"])
    fig = _figure(6, 0.45 * len(names) + 1.2)
    ax = fig.add_subplot()
    anchor_rating = ranking.get("anchor_rating", 1000.0)
    ratings = np.array([ranking["ratings"][n] for n in names], dtype=float)
    ax.barh(names, ratings - anchor_rating, left=anchor_rating, color="#4a7fb5")  # bars grow from the anchor
    if intervals:
        bounds = np.array([[_nan(v) for v in intervals.get(n, (None, None))] for n in names])  # (k, 2)
        spread = [np.maximum(ratings - bounds[:, 0], 0.0), np.maximum(bounds[:, 1] - ratings, 0.0)]
        ax.errorbar(ratings, np.arange(len(names)), xerr=spread, fmt="none", ecolor="#222", capsize=3)
        ratings = np.concatenate([ratings, bounds[np.isfinite(bounds)]])
    ax.axvline(anchor_rating, color="grey", linestyle="--", linewidth=1)
    ax.invert_yaxis()
    ax.set_xlabel("Bradley-Terry rating (Elo scale)")
    ax.set_xlim(min(ratings.min(), anchor_rating) - 100, max(ratings.max(), anchor_rating) + 100)
    fig.tight_layout()
    return _png_base64(fig)


def _nan(value: Any) -> float:
    return float(value) if stats.is_number(value) else math.nan


def _figure(width: float, height: float) -> Figure:
    """A figure drawn by the Agg canvas directly: no pyplot, no global backend state."""
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png_base64(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.canvas.print_png(buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_frontier(ranking: list[dict[str, Any]], path: Path) -> None:
    """Win rate against KL to the reference, one point per member with its CI (the DPO paper's Figure 2)."""
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    losses = sorted({row["loss"] for row in ranking})
    betas = sorted({row["beta"] for row in ranking})
    markers = "osD^v<>Ph*"
    for row in ranking:
        color = f"C{losses.index(row['loss']) % 10}"
        marker = markers[betas.index(row["beta"]) % len(markers)]
        spread = [[max(row["win_rate"] - row["ci_low"], 0.0)], [max(row["ci_high"] - row["win_rate"], 0.0)]]
        ax.errorbar(row["kl"], row["win_rate"], yerr=spread, fmt=marker, color=color, capsize=3)
    for loss in losses:
        ax.plot([], [], "o", color=f"C{losses.index(loss) % 10}", label=loss)
    for beta in betas:
        ax.plot([], [], markers[betas.index(beta) % len(markers)], color="grey", label=f"beta {beta:g}")
    ax.plot([0.0], [0.5], "k*", markersize=10, label="starting model")  # KL 0, a tie with itself
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("KL(policy || reference), nats per answer")
    ax.set_ylabel("win rate vs the starting model")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
