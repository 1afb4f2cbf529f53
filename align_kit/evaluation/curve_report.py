"""``align-kit curves RUN [RUN ...]``: proxy and gold scores against sqrt(KL) for one or several runs' curves.jsonl,
each run's gold peak marked, and Gao, Schulman and Hilton's (2022, Eq. 1-2) functional forms fitted to the gains
over the first point, d = sqrt(KL):

    best-of-N:  R(d) = d (alpha - beta d)
    RL:         R(d) = d (alpha - beta log d)

with coefficient standard errors from the fit's covariance (scipy ``curve_fit``), and a flag where a fit is poor.
Writes curves.json, curves.png and curves.html to ``--out``, and prints the table.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

from align_kit import files
from align_kit.configs import ConfigError

CURVES = "curves.jsonl"  # written by the training-side recorder (align_kit.training.curves)
FORMS = {
    "bon": "d (alpha - beta d)",
    "rl": "d (alpha - beta log d)",
}


def bon_form(d: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    return d * (alpha - beta * d)


def rl_form(d: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    log_d = np.log(np.where(d > 0, d, 1.0))  # d log d -> 0 as d -> 0
    return d * (alpha - beta * log_d)


def form_for(method: str) -> str:
    """Best-of-N fine-tuning takes the best-of-N form; every optimiser-driven method the RL form."""
    return "bon" if method == "best_of_n" else "rl"


def fit_form(d: Sequence[float], gain: Sequence[float], form: str) -> dict[str, Any]:
    """Least-squares fit of ``form`` to (d, gain); coefficients, their standard errors (square roots of the
    covariance's diagonal), R^2, and ``poor``: why the fit should not be trusted, or None."""
    x, y = np.asarray(d, dtype=float), np.asarray(gain, dtype=float)
    out: dict[str, Any] = {"form": FORMS[form], "n": len(x)}
    if len(x) < 3:
        return {**out, "poor": f"{len(x)} points: a two-coefficient fit needs at least 3"}
    function = bon_form if form == "bon" else rl_form
    try:
        with warnings.catch_warnings():  # an undetermined covariance is reported as a poor fit below
            warnings.simplefilter("ignore", OptimizeWarning)
            (alpha, beta), cov = curve_fit(function, x, y, p0=(1.0, 0.1), maxfev=20000)
    except RuntimeError as error:
        return {**out, "poor": f"no fit: {error}"}
    se = np.sqrt(np.diag(cov)) if np.all(np.isfinite(cov)) else np.array([math.inf, math.inf])
    residual = float(np.sum((y - function(x, alpha, beta)) ** 2))
    total = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - residual / total if total > 0 else (1.0 if residual == 0 else 0.0)
    reasons = []
    if len(x) < 5:
        reasons.append(f"only {len(x)} points")
    if r2 < 0.7:
        reasons.append(f"R^2 {r2:.2f} < 0.7")
    if not np.all(np.isfinite(se)):
        reasons.append("covariance could not be estimated")
    elif not se[0] < abs(alpha) or not se[1] < abs(beta):
        reasons.append("a coefficient is within one standard error of 0")
    out |= {"alpha": float(alpha), "beta": float(beta), "alpha_se": float(se[0]), "beta_se": float(se[1])}
    return {**out, "r2": r2, "poor": "; ".join(reasons) or None}


def read_curves(run: str | Path) -> list[dict[str, Any]]:
    """A run's curve points in step order; ConfigError naming the run when it has none."""
    path = Path(run) / CURVES
    if not path.is_file():
        raise ConfigError(f"{run}: no {CURVES} (train it with curve_steps > 0)")
    points = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                points.append(json.loads(line))
            except ValueError as error:
                raise ConfigError(f"{path}:{number}: not JSON ({error})") from error
    if not points:
        raise ConfigError(f"{path}: no points")
    return sorted(points, key=lambda p: p["step"])


def summarise(name: str, points: list[dict[str, Any]]) -> dict[str, Any]:
    """One run: gold and proxy peaks (step, KL), end values, and fits of gold and proxy gains."""
    method = points[0].get("method", "?")
    form = form_for(method)
    d = [p["sqrt_kl"] for p in points]
    proxy = [p["proxy"] for p in points]
    proxy_peak = max(range(len(points)), key=lambda i: proxy[i])
    out: dict[str, Any] = {
        "run": name,
        "method": method,
        "points": len(points),
        "proxy_kind": points[0].get("proxy_kind"),
        "kl_estimator": points[0].get("kl_estimator"),
        "proxy_peak": {
            "step": points[proxy_peak]["step"],
            "kl": points[proxy_peak]["kl"],
            "proxy": proxy[proxy_peak],
        },
        "proxy_end": proxy[-1],
        "kl_end": points[-1]["kl"],
        "fits": {"proxy": fit_form(d, [v - proxy[0] for v in proxy], form)},
        "alarm": next((p["alarm"] for p in points if p.get("alarm")), None),
    }
    gold_names = list(points[0].get("gold") or {})
    if gold_names:
        gold = [p["gold"][gold_names[0]] for p in points]
        peak = max(range(len(points)), key=lambda i: gold[i])  # first of tied peaks
        out |= {
            "gold_name": gold_names[0],
            "gold_start": gold[0],
            "gold_peak": {"step": points[peak]["step"], "kl": points[peak]["kl"], "gold": gold[peak]},
            "gold_end": gold[-1],
            # None when gold never moved: a flat gold has no peak to compare
            "gold_peaks_before_proxy": points[peak]["step"] < points[proxy_peak]["step"]
            if max(gold) > min(gold)
            else None,
        }
        out["fits"]["gold"] = fit_form(d, [v - gold[0] for v in gold], form)
    if gold_names and all("gold_greedy" in p for p in points):  # curve_greedy: what an evaluation would score
        greedy = [p["gold_greedy"][gold_names[0]] for p in points]
        peak = max(range(len(points)), key=lambda i: greedy[i])
        out["greedy"] = {
            "gold_start": greedy[0],
            "gold_peak": {"step": points[peak]["step"], "kl": points[peak]["kl"], "gold": greedy[peak]},
            "gold_end": greedy[-1],
            "proxy_end": points[-1].get("proxy_greedy"),
        }
    return out


def plot(curves: dict[str, list[dict[str, Any]]], summaries: list[dict[str, Any]], path: Path) -> str:
    """Gold gain and proxy gain against sqrt(KL), a line per run with its fit (dotted) and its gold peak (star);
    written to ``path``, returned as base64 PNG for the page."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    keys = ("gold", "proxy", "greedy") if any("greedy" in s for s in summaries) else ("gold", "proxy")
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.2))
    for (name, points), summary, color in zip(curves.items(), summaries, plt.cm.tab10.colors, strict=False):
        d = np.array([p["sqrt_kl"] for p in points])
        grid = np.linspace(0, max(d.max(), 1e-3), 100)
        function = bon_form if form_for(summary["method"]) == "bon" else rl_form
        for axis, key in zip(axes, keys, strict=True):
            if (key == "gold" and "gold_name" not in summary) or (
                key == "greedy" and "greedy" not in summary
            ):
                continue
            if key == "proxy":
                values = np.array([p["proxy"] for p in points])
            else:
                field = "gold" if key == "gold" else "gold_greedy"
                values = np.array([p[field][summary["gold_name"]] for p in points])
            label = name if name == summary["method"] else f"{name} ({summary['method']})"
            axis.plot(d, values - values[0], "o-", color=color, label=label)
            fit = summary["fits"].get(key, {})
            if "alpha" in fit:
                axis.plot(grid, function(grid, fit["alpha"], fit["beta"]), ":", color=color)
            peak = summary["greedy"]["gold_peak"] if key == "greedy" else summary.get("gold_peak")
            if peak:
                i = [p["step"] for p in points].index(peak["step"])
                axis.plot(d[i], values[i] - values[0], "*", color=color, markersize=16, markeredgecolor="k")
    axes[0].set(title="gold gain (star: gold peak; dotted: fitted form)", xlabel="sqrt(KL to reference)")
    axes[1].set(title="proxy gain (star: where gold peaked)", xlabel="sqrt(KL to reference)")
    if len(keys) == 3:
        axes[2].set(title="gold gain of greedy answers (star: its peak)", xlabel="sqrt(KL to reference)")
    for axis in axes:
        axis.axhline(0, color="grey", linewidth=0.5)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def table(summaries: list[dict[str, Any]]) -> list[str]:
    """Markdown: method, KL at gold peak, gold at peak, gold at end, proxy at end; and the fits."""
    lines = [
        "| run | method | KL at gold peak | gold at peak (step) | gold at end | proxy peak (KL) | proxy at end | KL at end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        peak = s.get("gold_peak")
        gold = f"{peak['gold']:.3f} ({peak['step']})" if peak else "-"
        lines.append(
            f"| {s['run']} | {s['method']} | {peak['kl']:.2f} | {gold} | {s['gold_end']:.3f} | "
            if peak
            else f"| {s['run']} | {s['method']} | - | - | - | "
        )
        lines[-1] += (
            f"{s['proxy_peak']['proxy']:+.3f} ({s['proxy_peak']['kl']:.2f}) | {s['proxy_end']:+.3f} | {s['kl_end']:.2f} |"
        )
    greedy = [s for s in summaries if "greedy" in s]
    if greedy:
        lines += [
            "",
            "Greedy answers (curve_greedy), KL of the sampling policy:",
            "",
            "| run | method | gold at start | KL at greedy gold peak | greedy gold at peak (step) | greedy gold at end | greedy proxy at end |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in greedy:
            g = s["greedy"]
            proxy = "-" if g["proxy_end"] is None else f"{g['proxy_end']:+.3f}"
            lines.append(
                f"| {s['run']} | {s['method']} | {g['gold_start']:.3f} | {g['gold_peak']['kl']:.2f} | "
                f"{g['gold_peak']['gold']:.3f} ({g['gold_peak']['step']}) | {g['gold_end']:.3f} | {proxy} |"
            )
    lines += ["", "| run | curve | form | alpha | beta | R^2 | poor fit |", "|---|---|---|---|---|---|---|"]
    for s in summaries:
        for key, fit in s["fits"].items():
            if "alpha" in fit:
                coef = (
                    f"{fit['alpha']:.3f} ± {fit['alpha_se']:.3f} | {fit['beta']:.3f} ± {fit['beta_se']:.3f}"
                )
                lines.append(
                    f"| {s['run']} | {key} | {fit['form']} | {coef} | {fit['r2']:.2f} | {fit['poor'] or ''} |"
                )
            else:
                lines.append(f"| {s['run']} | {key} | {fit['form']} | - | - | - | {fit['poor']} |")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="align-kit curves", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders holding curves.jsonl")
    parser.add_argument(
        "--out", default="curves_report", help="folder for curves.json, curves.png, curves.html"
    )
    args = parser.parse_args(argv)
    curves = {
        Path(run).name if Path(run).name not in ("", ".") else str(run): read_curves(run) for run in args.runs
    }
    summaries = [summarise(name, points) for name, points in curves.items()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image = plot(curves, summaries, out / "curves.png")
    lines = table(summaries)
    alarms = [f"{s['run']}: {s['alarm']}" for s in summaries if s["alarm"]]
    files.write_json(out / "curves.json", {"runs": summaries, "curves": curves}, indent=2)
    page = (
        "<!doctype html><meta charset='utf-8'><title>align-kit curves</title>"
        "<h1>Over-optimisation curves</h1><p>Gains over each run's first point against sqrt(KL) (estimator: "
        f"{html.escape(str(summaries[0]['kl_estimator']))}).</p><img src='data:image/png;base64,{image}'>"
        f"<pre>{html.escape(chr(10).join(lines))}</pre>"
        + "".join(f"<p><b>alarm</b> {html.escape(a)}</p>" for a in alarms)
    )
    files.write_text(out / "curves.html", page)
    print("\n".join(lines))
    for alarm in alarms:
        print(f"alarm: {alarm}")
    print(f"[align-kit] curves: {out}/curves.html, curves.png, curves.json")
    return {"runs": summaries}


if __name__ == "__main__":
    main()
