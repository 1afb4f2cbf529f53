"""Write an evaluation's report: report.md, a self-contained report.html, results.json and judgments.csv.

The results dict (JSON-ready; every key but `comparisons` is optional):
    metadata:     {name: value} shown as-is, e.g. judge, models, dataset, seed, n_prompts
    skipped:      {reason: count} of rows left out before judging
    notes:        [str] shown under the settings (e.g. systems or judges left out, and why)
    comparisons:  [stats.summarize(...)], one per (system, baseline)
    paired:       [stats.paired_test(...)]
    ranking:      stats.rank_systems(...)
    audit:        the judge's audit figures (audits.audit_judge)
    audit_checks: stats.check_audit(audit): one row per figure with its range and pass/fail
    audit_notes:  [str] shown under the audit table (how each figure was measured, breakdowns)
Gallery examples are dicts with prompt, system, baseline, system_answer, baseline_answer, verdict and
optionally prompt_id and rationale. Every string from a model or a dataset is HTML-escaped.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from align_kit import stats
from align_kit.stats import Judgment

TEMPLATES = Environment(
    loader=PackageLoader("align_kit", "templates"), autoescape=True, trim_blocks=True, lstrip_blocks=True
)


def write_report(
    out_dir: str | Path,
    results: Mapping[str, Any],
    judgments: Sequence[Judgment],
    examples: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Path]:
    """Write report.md, report.html, results.json and judgments.csv into `out_dir`; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in ("report.md", "report.html", "results.json", "judgments.csv")}
    paths["report.md"].write_text(render_markdown(results), encoding="utf-8")
    paths["report.html"].write_text(render_html(results, judgments, examples), encoding="utf-8")
    paths["results.json"].write_text(
        json.dumps(to_jsonable(results), indent=2, allow_nan=False), encoding="utf-8"
    )
    columns = [f.name for f in dataclasses.fields(Judgment)]
    pd.DataFrame([j.to_row() for j in judgments], columns=columns).to_csv(paths["judgments.csv"], index=False)
    return paths


def read_judgments(path: str | Path) -> list[Judgment]:
    """Judgments back from a judgments.csv written by `write_report`."""
    numeric = {"system_len", "baseline_len", "parse_failures"}
    text = {f.name: str for f in dataclasses.fields(Judgment) if f.name not in numeric}
    frame = pd.read_csv(path, dtype=text, keep_default_na=False, na_values=[""])  # only empty cells are None
    return [Judgment.from_row(row) for row in frame.to_dict(orient="records")]


def to_jsonable(value: Any) -> Any:
    """`value` with numpy scalars as Python numbers, NaN and infinities as None, tuples and Paths as lists
    and strings, and dataclasses as dicts, so that json.dumps(..., allow_nan=False) accepts it."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [to_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


# ---------------------------------------------------------------------------------------------------------
# Text


def headline(summary: Mapping[str, Any]) -> str:
    """One sentence a reader can quote, e.g. 'dpo beats sft 63.0% (95% CI 58.1-67.9) of the time, n=300 ...'."""
    level = f"{100 * summary.get('level', 0.95):g}% CI"
    text = (
        f"{summary['system']} beats {summary['baseline']} {_pct(summary['win_rate'])} "
        f"({level} {_ci(summary['ci_low'], summary['ci_high'])}) of the time, n={summary['n']} (ties count half)"
    )
    lc = summary.get("length_controlled")
    if lc and lc.get("method") == "logistic":
        text += f"; length-controlled {_pct(lc['estimate'])} ({level} {_ci(lc['ci_low'], lc['ci_high'])})"
    elif lc:
        text += f"; length-controlled rate not fitted ({lc.get('note', '')})"
    if _is_number(summary["ci_low"]) and summary["ci_low"] <= 0.5 <= summary["ci_high"]:
        text += "; the raw-rate interval includes 50%, so this is not distinguishable from a tie"
    return text + "."


def render_markdown(results: Mapping[str, Any]) -> str:
    """report.md: headlines, then one table per section."""
    lines = ["# Win-rate report", ""]
    if results.get("metadata"):
        lines += _md_table(["Setting", "Value"], _metadata_rows(results["metadata"])) + [""]
    lines += [f"- Note: {note}" for note in results.get("notes") or []] + (
        [""] if results.get("notes") else []
    )
    lines += ["## Headlines", ""] + [f"- {headline(s)}" for s in results.get("comparisons", [])] + [""]
    lines += ["## Comparisons", ""] + _md_table(*_comparison_table(results.get("comparisons", []))) + [""]
    lines += [
        "Win rate counts a tie as half a win; intervals are percentile bootstraps over prompts. The "
        "length-controlled (LC) rate is a logistic fit of the verdict on the normalised length difference, "
        "read at zero difference; 'raw' means it could not be fitted and the raw rate is shown.",
        "",
    ]
    if results.get("paired"):
        lines += ["## Paired tests", ""] + _md_table(*_paired_table(results["paired"])) + [""]
    if results.get("ranking"):
        lines += ["## Ratings", ""] + _md_table(*_ratings_table(results["ranking"])) + [""]
        lines += [_transitivity_line(results["ranking"]), ""]
    if results.get("audit_checks"):
        checks = results["audit_checks"]
        lines += ["## Judge audit", ""] + _md_table(*_audit_table(checks)) + [""]
        lines += [f"- {note}" for note in results.get("audit_notes") or []]
        lines += [""] if results.get("audit_notes") else []
    lines += ["## Skipped rows", ""]
    skipped = results.get("skipped") or {}
    lines += (
        _md_table(["Reason", "Rows"], [[k, str(v)] for k, v in skipped.items()]) if skipped else ["None."]
    )
    lines += ["", "Judged examples are in report.html.", ""]
    return "\n".join(lines)


def render_html(
    results: Mapping[str, Any], judgments: Sequence[Judgment], examples: Sequence[Mapping[str, Any]] = ()
) -> str:
    """report.html from templates/report.html.j2: inline CSS, the plots as base64 PNGs, every string
    from a model or a dataset escaped by Jinja2's autoescape."""
    comparisons = results.get("comparisons", [])
    ranking, checks = results.get("ranking"), results.get("audit_checks")
    plots = {
        "win_rates": plot_win_rates(comparisons) if comparisons else None,
        "lengths": plot_lengths(judgments) if judgments else None,
        "ratings": plot_ratings(ranking) if ranking else None,
    }
    return TEMPLATES.get_template("report.html.j2").render(
        title="Win-rate report",
        metadata=_metadata_rows(results.get("metadata") or {}),
        notes=results.get("notes") or [],
        headlines=[headline(s) for s in comparisons],
        comparisons=_comparison_table(comparisons),
        paired=_paired_table(results["paired"]) if results.get("paired") else None,
        ratings=_ratings_table(ranking) if ranking else None,
        transitivity=_transitivity_line(ranking) if ranking else "",
        audit=_audit_table(checks) if checks else None,
        audit_classes=[{True: "pass", False: "fail", None: "na"}[c["passed"]] for c in checks or []],
        audit_notes=results.get("audit_notes") or [],
        skipped=[[k, str(v)] for k, v in (results.get("skipped") or {}).items()],
        examples=[{k: "" if v is None else v for k, v in example.items()} for example in examples],
        plots=plots,
    )


def _comparison_table(comparisons: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    headers = ["System", "Baseline", "n", "W / T / L", "Win rate", "95% CI", "SE", "LC win rate", "LC 95% CI"]
    headers += ["Flip rate", "Mean length (system / baseline)"]
    rows = []
    for s in comparisons:
        lc, counts, length = s["length_controlled"], s["counts"], s["mean_length"]
        lc_rate = _pct(lc["estimate"]) + ("" if lc["method"] == "logistic" else f" (raw: {lc['note']})")
        rows.append(
            [
                s["system"],
                s["baseline"],
                str(s["n"]),
                f"{counts['win']} / {counts['tie']} / {counts['loss']}",
                _pct(s["win_rate"]),
                _ci(s["ci_low"], s["ci_high"]),
                _pct(s["se"]),
                lc_rate,
                _ci(lc["ci_low"], lc["ci_high"]),
                _pct(s["position_bias"]["flip_rate"]),
                f"{_num(length['system'])} / {_num(length['baseline'])}",
            ]
        )
    return headers, rows


def _paired_table(paired: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    headers = ["System A", "System B", "Baseline", "n", "Win rate A - B", "95% CI (pp)", "p (sign-flip)"]
    rows = [
        [
            p["system_a"],
            p["system_b"],
            p["baseline"],
            str(p["n"]),
            _num(100 * p["mean_diff"] if _is_number(p["mean_diff"]) else None, "+.1f") + " pp",
            _ci(p["ci_low"], p["ci_high"]),
            _num(p["p_value"], ".4f"),
        ]
        for p in paired
    ]
    return headers, rows


def _ratings_table(ranking: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    names = list(ranking["ratings"])
    headers = ["System", "Rating"] + [f"win rate vs {n}" for n in names]
    anchor = ranking.get("anchor")
    rows = []
    for a in names:
        label = f"{a} (anchor)" if a == anchor else a
        rates = ranking["win_rates"].get(a, {})
        rows.append(
            [label, _num(ranking["ratings"][a])] + ["" if a == b else _pct(rates.get(b)) for b in names]
        )
    return headers, rows


def _transitivity_line(ranking: Mapping[str, Any]) -> str:
    t = ranking["transitivity"]
    text = f"Transitivity: {t['n_intransitive']} intransitive of {t['n_triads']} decided triads"
    cycles = "; ".join(" > ".join(c + c[:1]) for c in t["cycles"])
    rating_note = "Ratings are Bradley-Terry strengths on the Elo scale (400 points = 10:1 odds)."
    return f"{text}{' (' + cycles + ')' if cycles else ''}. {rating_note}"


def _audit_table(checks: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    headers = ["Check", "Value", "Allowed", "Result"]
    flag = {True: "PASS", False: "FAIL", None: "n/a"}
    rows = [
        [c["name"], _num(c["value"], ".3f"), f"{c['low']:g} to {c['high']:g}", flag[c["passed"]]]
        for c in checks
    ]
    return headers, rows


def _metadata_rows(metadata: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for key, value in metadata.items():
        if isinstance(value, Mapping):
            rows += [[f"{key}.{k}", str(v)] for k, v in value.items()]
        else:
            rows.append([str(key), str(value)])
    return rows


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.number) and not isinstance(value, bool) and math.isfinite(value)


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if _is_number(value) else "n/a"


def _ci(low: Any, high: Any) -> str:
    if not (_is_number(low) and _is_number(high)):
        return "n/a"
    return f"{100 * low:.1f}-{100 * high:.1f}" if low >= 0 else f"{100 * low:.1f} to {100 * high:.1f}"


def _num(value: Any, fmt: str = ".1f") -> str:
    return format(value, fmt) if _is_number(value) else "n/a"


def _looks_numeric(text: Any) -> bool:
    text = str(text)
    return bool(text) and text.replace(".", "").replace("%", "").replace("-", "").replace(" ", "").isdigit()


TEMPLATES.filters["numeric"] = _looks_numeric


# ---------------------------------------------------------------------------------------------------------
# Plots, as base64 PNG strings


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


def plot_ratings(ranking: Mapping[str, Any]) -> str:
    """Bradley-Terry ratings as horizontal bars, best on top."""
    names = list(ranking["ratings"])
    fig = _figure(6, 0.45 * len(names) + 1.2)
    ax = fig.add_subplot()
    anchor_rating = ranking.get("anchor_rating", 1000.0)
    ratings = np.array([ranking["ratings"][n] for n in names], dtype=float)
    ax.barh(names, ratings - anchor_rating, left=anchor_rating, color="#4a7fb5")  # bars grow from the anchor
    ax.axvline(anchor_rating, color="grey", linestyle="--", linewidth=1)
    ax.invert_yaxis()
    ax.set_xlabel("Bradley-Terry rating (Elo scale)")
    ax.set_xlim(min(ratings.min(), anchor_rating) - 100, max(ratings.max(), anchor_rating) + 100)
    fig.tight_layout()
    return _png_base64(fig)


def _figure(width: float, height: float) -> Figure:
    """A figure drawn by the Agg canvas directly: no pyplot, no global backend state."""
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png_base64(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.canvas.print_png(buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
