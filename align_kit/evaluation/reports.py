"""Write an evaluation's report: report.md, a self-contained report.html, results.json and judgments.csv.

The results dict (JSON-ready; every key but `comparisons` is optional):
    metadata:     {name: value} shown as-is, e.g. judge, models, dataset, seed, n_prompts
    skipped:      {reason: count} of rows left out before judging
    notes:        [str] shown under the settings (e.g. systems or judges left out, and why)
    comparisons:  [stats.summarize(...)], one per (system, baseline)
    paired:       [stats.paired_test(...)]
    ranking:      ratings.rank_systems(...)
    audit:        the judge's audit figures (audits.audit_judge)
    audit_checks: verdicts.check_audit(audit): one row per figure with its range and pass/fail
    audit_notes:  [str] shown under the audit table (how each figure was measured, breakdowns)
    trust:        audits.trust_verdict(audit_checks): the verdict on the judge every report opens with
    traffic:      audits.judge_traffic(...): the judge's request counters and whether they flag the run
    combine_orders: the rule that scored each pair from its two orders ('strict' or 'average')
    by_group:     {column, comparisons: [stats.summarize(...) plus 'group']}: every comparison per group
    unparseable:  {total, shown: [{prompt_id, comparison, order, text}]}: judge answers that did not parse
    error:        why the judge could not finish (then only the opening, settings and notes are shown)
Gallery examples are dicts with prompt, system, baseline, system_answer, baseline_answer, verdict and
optionally prompt_id and rationale. Every string from a model or a dataset is HTML-escaped. Every file is
written whole or not at all (a temporary file, then a rename).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, PackageLoader

from align_kit import files
from align_kit.evaluation import plots, stats
from align_kit.evaluation.answers import HeldOut
from align_kit.evaluation.stats import Judgment
from align_kit.judges.protocol import PairResult

TEMPLATES = Environment(
    loader=PackageLoader("align_kit.evaluation", "templates"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
)


def write_report(
    out_dir: str | Path,
    results: Mapping[str, Any],
    judgments: Sequence[Judgment],
    examples: Sequence[Mapping[str, Any]] = (),
    undecided: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Path]:
    """Write report.md, report.html, results.json and judgments.csv into `out_dir`; return their paths.

    judgments.csv holds one row per judgment, then one per ``undecided`` pair (a dict of Judgment
    columns without a verdict: both orders unparseable), so every raw judge answer is in the file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in ("report.md", "report.html", "results.json", "judgments.csv")}
    files.write_text(paths["report.md"], render_markdown(results))
    files.write_text(paths["report.html"], render_html(results, judgments, examples))
    files.write_text(paths["results.json"], json.dumps(files.to_jsonable(results), indent=2, allow_nan=False))
    columns = [f.name for f in dataclasses.fields(Judgment)]
    rows = [j.to_row() for j in judgments] + [dict(row) for row in undecided]
    files.write_text(paths["judgments.csv"], pd.DataFrame(rows, columns=columns).to_csv(index=False))
    return paths


def read_judgments(path: str | Path) -> list[Judgment]:
    """Judgments back from a judgments.csv written by `write_report` (rows of undecided pairs, which
    have no verdict, are left out)."""
    numeric = {"system_len", "baseline_len", "parse_failures", "score"}
    text = {f.name: str for f in dataclasses.fields(Judgment) if f.name not in numeric}
    frame = pd.read_csv(path, dtype=text, keep_default_na=False, na_values=[""])  # only empty cells are None
    rows = frame.to_dict(orient="records")
    return [Judgment.from_row(row) for row in rows if isinstance(row["verdict"], str)]


# ---------------------------------------------------------------------------------------------------------
# What the gallery shows


def pick_examples(
    judgments: Sequence[Judgment], held: HeldOut, answers: Mapping[str, Sequence[str]], n: int
) -> list[dict[str, Any]]:
    """Up to ``n`` judged examples of one comparison, a win, a loss and a tie first when there are any,
    with what the judge said in each order when it gave text."""
    index = {pid: i for i, pid in enumerate(held.prompt_ids)}
    ordered = []
    for verdict in ("win", "loss", "tie"):
        ordered += [j for j in judgments if j.verdict == verdict][:1]
    ordered += [j for j in judgments if j not in ordered]
    out = []
    for j in ordered[:n]:
        i = index[j.prompt_id]
        said = [
            f"{order}: {text or rationale}"
            for order, text, rationale in (
                ("system shown first", j.first_order_text, j.first_order_rationale),
                ("system shown second", j.swapped_order_text, j.swapped_order_rationale),
            )
            if text or rationale
        ]
        out.append(
            {
                "prompt_id": j.prompt_id,
                "prompt": held.prompts[i],
                "system": j.system,
                "baseline": j.baseline,
                "system_answer": answers[j.system][i],
                "baseline_answer": answers[j.baseline][i],
                "verdict": j.verdict,
                "rationale": "\n".join(said) or None,
            }
        )
    return out


def unparseable_answers(asked: Sequence[tuple[str, PairResult]]) -> list[dict[str, Any]]:
    """Every single-order answer that did not parse: prompt, comparison (or audit pair), order, raw text."""
    out = []
    for comparison, result in asked:
        for order, verdict, reply in (
            ("first answer shown first", result.first, result.first_reply),
            ("first answer shown second", result.swapped, result.swapped_reply),
        ):
            if verdict is None:
                text = reply.text if reply else None
                out.append(
                    {"prompt_id": result.prompt_id, "comparison": comparison, "order": order, "text": text}
                )
    return out


# ---------------------------------------------------------------------------------------------------------
# Text


def headline(summary: Mapping[str, Any]) -> str:
    """One sentence a reader can quote, e.g. 'dpo beats sft 63.0% (95% CI 58.1-67.9) of the time, n=300 ...'."""
    if not summary["n"]:
        return f"{summary['system']} vs {summary['baseline']}: n/a ({summary.get('note') or 'no decided pairs'})."
    level = f"{100 * summary.get('level', 0.95):g}% CI"
    text = (
        f"{summary['system']} beats {summary['baseline']} {percent(summary['win_rate'])} "
        f"({level} {ci_range(summary['ci_low'], summary['ci_high'])}) of the time, n={summary['n']} (ties count half)"
    )
    lc = summary.get("length_controlled")
    if lc and lc.get("method") == "logistic":
        text += (
            f"; length-controlled {percent(lc['estimate'])} ({level} {ci_range(lc['ci_low'], lc['ci_high'])})"
        )
    elif lc:
        text += f"; length-controlled rate not fitted ({lc.get('note', '')})"
    if stats.is_number(summary["ci_low"]) and summary["ci_low"] <= 0.5 <= summary["ci_high"]:
        text += "; the raw-rate interval includes 50%, so this is not distinguishable from a tie"
    return text + "."


def opening(results: Mapping[str, Any]) -> tuple[str, list[str]]:
    """The verdict on the judge that every report (and the console) opens with: a headline sentence and
    one line per failed audit, unmeasured core audit or traffic flag."""
    judge = (results.get("metadata") or {}).get("judge", "the judge")
    if results.get("error"):
        return f"Judge {judge} could not finish: no win rates.", [str(results["error"])]
    trust = results.get("trust")
    if trust is None:
        return "The judge was not audited: read these win rates with care.", []
    traffic = results.get("traffic") or {}
    title, lines = (
        f"Judge {judge}: {trust['headline']}",
        trust["lines"] + ([traffic["line"]] if traffic.get("line") else []),
    )
    degenerate = (results.get("answers_audit") or {}).get("lines") or []
    if degenerate:  # answers no judge can make evidence of come before anything about the judge
        return degenerate[0], degenerate[1:] + [title] + lines
    return title, lines


def prompt_line(counts: Mapping[str, Any]) -> str:
    """'requested 80, judged 60, left out 20 (too long for system sft 15, no comparison 5)'."""
    left = counts.get("left_out") or {}
    text = f"requested {counts['requested']}, judged {counts['judged']}, left out {sum(left.values())}"
    return text + (f" ({', '.join(f'{k} {v}' for k, v in left.items())})" if left else "")


COMBINE_RULES_TEXT = {
    "scores": "single-answer scores: the answer with the higher score wins the prompt, equal scores tie",
    "strict": "strict: a pair is a win only when both orders pick the system, a loss when both pick the "
    "baseline, else a tie",
    "average": "average (Arena-Hard): a pair scores the mean of its two single-order scores (1 for the "
    "system, 0.5 for a tie, 0 for the baseline), so a win and a tie score 0.75; W / T / L still count "
    "the strict outcomes",
}


def render_markdown(results: Mapping[str, Any]) -> str:
    """report.md: the verdict on the judge, headlines, then one table per section."""
    title, reasons = opening(results)
    lines = (
        ["# Win-rate report", "", f"**{title}**", ""]
        + [f"- {r}" for r in reasons]
        + ([""] if reasons else [])
    )
    if results.get("metadata"):
        lines += markdown_table(["Setting", "Value"], _metadata_rows(results["metadata"])) + [""]
    lines += [f"- Note: {note}" for note in results.get("notes") or []] + (
        [""] if results.get("notes") else []
    )
    if results.get("error"):
        return "\n".join(lines)
    if results.get("prompts"):
        lines += ["## Prompts", "", f"Prompts: {prompt_line(results['prompts'])}.", ""]
    if results.get("audits_run"):
        lines += ["## Audits run", ""] + [f"- {k}: {v}" for k, v in results["audits_run"].items()] + [""]
    lines += ["## Headlines", ""] + [f"- {headline(s)}" for s in results.get("comparisons", [])] + [""]
    for table in results.get("tables") or []:  # tables a grading mode adds (single grading's mean scores)
        lines += [f"## {table['title']}", ""] + markdown_table(table["headers"], table["rows"]) + [""]
    lines += (
        ["## Comparisons", ""] + markdown_table(*_comparison_table(results.get("comparisons", []))) + [""]
    )
    lines += [_scoring_line(results), ""]
    if results.get("by_group"):
        by_group = results["by_group"]
        lines += [f"## By group ({by_group['column']})", ""]
        lines += markdown_table(*_group_table(by_group["comparisons"])) + [""]
    if results.get("paired"):
        lines += ["## Paired tests", ""] + markdown_table(*_paired_table(results["paired"])) + [""]
    if results.get("ranking"):
        lines += ["## Ratings", ""]
        if results["ranking"]["ratings"]:
            lines += markdown_table(*_ratings_table(results["ranking"])) + [""]
        lines += [_transitivity_line(results["ranking"]), ""]
    if results.get("audit_checks"):
        checks = results["audit_checks"]
        lines += ["## Judge audit", ""] + markdown_table(*_audit_table(checks)) + [""]
        lines += [f"- {note}" for note in results.get("audit_notes") or []]
        lines += [""] if results.get("audit_notes") else []
    if results.get("traffic"):
        lines += ["## Judge traffic", ""] + markdown_table(*_traffic_table(results["traffic"])) + [""]
    if (results.get("unparseable") or {}).get("total"):
        unparseable = results["unparseable"]
        lines += [f"## Unparseable judge answers ({unparseable['total']})", ""]
        lines += markdown_table(*_unparseable_table(unparseable["shown"])) + [""]
        lines += [_unparseable_line(unparseable), ""]
    lines += ["## Skipped rows", ""]
    skipped = results.get("skipped") or {}
    lines += (
        markdown_table(["Reason", "Rows"], [[k, str(v)] for k, v in skipped.items()])
        if skipped
        else ["None."]
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
    rated = bool(ranking and ranking["ratings"])
    decided = [s for s in comparisons if s["n"]]
    figures = {
        "win_rates": plots.plot_win_rates(decided) if decided else None,
        "lengths": plots.plot_lengths(judgments) if judgments else None,
        "ratings": plots.plot_ratings(ranking) if rated else None,
    }
    title, reasons = opening(results)
    trust, by_group = results.get("trust"), results.get("by_group")
    unparseable = results.get("unparseable") or {}
    return TEMPLATES.get_template("report.html.j2").render(
        title="Win-rate report",
        verdict={
            "title": title,
            "reasons": reasons,
            "trusted": bool(trust and trust["evidence"] and not results.get("error"))
            and not (results.get("answers_audit") or {}).get("flagged"),
        },
        error=results.get("error"),
        metadata=_metadata_rows(results.get("metadata") or {}),
        notes=results.get("notes") or [],
        headlines=[headline(s) for s in comparisons],
        comparisons=_comparison_table(comparisons),
        scoring=_scoring_line(results),
        by_group=(by_group["column"], _group_table(by_group["comparisons"])) if by_group else None,
        paired=_paired_table(results["paired"]) if results.get("paired") else None,
        ratings=_ratings_table(ranking) if rated else None,
        transitivity=_transitivity_line(ranking) if ranking else "",
        audit=_audit_table(checks) if checks else None,
        audit_classes=[{True: "pass", False: "fail", None: "na"}[c["passed"]] for c in checks or []],
        audit_notes=results.get("audit_notes") or [],
        traffic=_traffic_table(results["traffic"]) if results.get("traffic") else None,
        unparseable=unparseable.get("shown") or [],
        unparseable_line=_unparseable_line(unparseable) if unparseable.get("total") else "",
        skipped=[[k, str(v)] for k, v in (results.get("skipped") or {}).items()],
        examples=[{k: "" if v is None else v for k, v in example.items()} for example in examples],
        plots=figures,
    )


def _scoring_line(results: Mapping[str, Any]) -> str:
    rule = results.get("combine_orders", "strict")
    return (
        f"Pairs are scored by the {COMBINE_RULES_TEXT[rule]}. Win rate is the mean score (a tie counts half); "
        "intervals are percentile bootstraps over prompts. The length-controlled (LC) rate is a logistic fit "
        "of the score on the normalised length difference, read at zero difference; 'raw' means it could not "
        "be fitted and the raw rate is shown."
    )


def _group_table(comparisons: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    headers, rows = _comparison_table(comparisons)  # its first six columns: system to the interval
    return ["Group"] + headers[:6], [
        [str(s["group"])] + row[:6] for s, row in zip(comparisons, rows, strict=True)
    ]


def _traffic_table(traffic: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    runs, total = traffic.get("runs", 1), traffic.get("all_runs", {})
    rows = [[name, plain_number(value)] for name, value in traffic["counts"].items()]
    if runs > 1:  # this run beside all runs of this evaluation folder
        rows = [row + [plain_number(total.get(row[0], ""))] for row in rows]
    rate = f"{percent(traffic['retry_rate'])} (flag above {percent(traffic['threshold'])})"
    rows.append(["retried fraction of requests", *([""] if runs > 1 else []), rate])
    rows.append(["flagged", *([""] if runs > 1 else []), "YES" if traffic["flagged"] else "no"])
    headers = ["Counter", "This run", f"All {runs} runs"] if runs > 1 else ["Counter (this run)", "Value"]
    return headers, rows


def _unparseable_table(shown: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    rows = [
        [
            str(u["prompt_id"]),
            u["comparison"],
            u["order"],
            _short(u["text"]) if u["text"] is not None else "(no text)",
        ]
        for u in shown
    ]
    return ["Prompt", "Comparison", "Order", "Judge's answer"], rows


def _unparseable_line(unparseable: Mapping[str, Any]) -> str:
    shown, total = len(unparseable["shown"]), unparseable["total"]
    return f"{shown} of {total} single-order answers that did not parse are shown; judgments.csv has the comparisons' ones."


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def plain_number(value: Any) -> str:
    """A table cell for a setting's value: floats to 4 significant digits, anything else as text."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _comparison_table(comparisons: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    headers = ["System", "Baseline", "n", "W / T / L", "Win rate", "95% CI", "SE", "LC win rate", "LC 95% CI"]
    headers += ["Flip rate", "Mean length (system / baseline)"]
    rows = []
    for s in comparisons:
        lc, counts, length = s["length_controlled"], s["counts"], s["mean_length"]
        lc_rate = percent(lc["estimate"]) + ("" if lc["method"] == "logistic" else f" (raw: {lc['note']})")
        rows.append(
            [
                s["system"],
                s["baseline"],
                str(s["n"]),
                f"{counts['win']} / {counts['tie']} / {counts['loss']}",
                percent(s["win_rate"]),
                ci_range(s["ci_low"], s["ci_high"]),
                percent(s["se"]),
                lc_rate,
                ci_range(lc["ci_low"], lc["ci_high"]),
                percent(s["position_bias"]["flip_rate"]),
                f"{number(length['system'])} / {number(length['baseline'])}",
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
            number(100 * p["mean_diff"] if stats.is_number(p["mean_diff"]) else None, "+.1f") + " pp",
            ci_range(p["ci_low"], p["ci_high"]),
            number(p["p_value"], ".4f"),
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
            [label, number(ranking["ratings"][a])] + ["" if a == b else percent(rates.get(b)) for b in names]
        )
    return headers, rows


def _transitivity_line(ranking: Mapping[str, Any]) -> str:
    t = ranking["transitivity"]
    text = f"Transitivity: {t['n_intransitive']} intransitive of {t['n_triads']} decided triads"
    cycles = "; ".join(" > ".join(c + c[:1]) for c in t["cycles"])
    rating_note = "Ratings are Bradley-Terry strengths on the Elo scale (400 points = 10:1 odds)."
    if ranking.get("note"):
        rating_note = (
            f"Ratings: n/a ({ranking['note']})."
            if not ranking["ratings"]
            else f"{rating_note} Note: {ranking['note']}."
        )
    return f"{text}{' (' + cycles + ')' if cycles else ''}. {rating_note}"


def _audit_table(checks: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    headers = ["Check", "Value", "Allowed", "Result"]
    flag = {True: "PASS", False: "FAIL", None: "n/a"}
    rows = [
        [c["name"], number(c["value"], ".3f"), f"{c['low']:g} to {c['high']:g}", flag[c["passed"]]]
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


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table (pipes and newlines in cells escaped)."""

    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


def percent(value: Any) -> str:
    """A fraction as '61.7%', or 'n/a'."""
    return f"{100 * value:.1f}%" if stats.is_number(value) else "n/a"


def ci_range(low: Any, high: Any) -> str:
    """An interval of fractions as '54.2-69.2' (percent), or 'n/a'."""
    if not (stats.is_number(low) and stats.is_number(high)):
        return "n/a"
    return f"{100 * low:.1f}-{100 * high:.1f}" if low >= 0 else f"{100 * low:.1f} to {100 * high:.1f}"


def number(value: Any, fmt: str = ".1f") -> str:
    """A number in ``fmt``, or 'n/a'."""
    return format(value, fmt) if stats.is_number(value) else "n/a"


def _looks_numeric(text: Any) -> bool:
    text = str(text)
    return bool(text) and text.replace(".", "").replace("%", "").replace("-", "").replace(" ", "").isdigit()


TEMPLATES.filters["numeric"] = _looks_numeric
