"""A leaderboard across evaluation runs: the systems of several evaluation folders that share a judge and
their held-out prompts, rated together.

    python eval/leaderboard.py --runs runs/demo/eval runs/other/eval --output_dir runs/leaderboard
    align-kit leaderboard --runs runs/demo/eval runs/other/eval --judge oracle

Every run's games under the judge (its ``judgments.csv``: each system against chosen, against the base and
against each other) are pooled and one set of Bradley-Terry ratings is fitted, anchored on ``chosen`` (the
dataset's answers, which every run meets), with percentile bootstrap intervals over prompts; beside them
each system's win rate against chosen, and each run's judge audits. A system is the same in two runs when
it has the same name and path; otherwise it is named ``<run>/<system>``. A game judged in two runs (the same
system, baseline and prompt) counts once.

The runs must be comparable, or the leaderboard refuses and says why: the same judge (by its identity, the
hash of every setting that changes a verdict, not only its name), the same held-out prompts (by their ids),
and the same rule for combining the two presentation orders.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from align_kit import files
from align_kit.configs import ConfigError
from align_kit.evaluation import plots, ratings, stats
from align_kit.evaluation.answers import CHOSEN
from align_kit.evaluation.pipeline import judge_folder
from align_kit.evaluation.reports import (
    TEMPLATES,
    _ci,
    _md_table,
    _num,
    _pct,
    _plain,
    read_judgments,
    to_jsonable,
)
from align_kit.evaluation.stats import Judgment


class LeaderboardError(ConfigError):
    """Runs that cannot share a leaderboard, with the reason."""


def read_run(folder: str | Path) -> dict[str, Any]:
    """A run's evaluation.json, with ``folder`` and a short ``label`` added."""
    folder = Path(folder)
    path = folder / "evaluation.json"
    if not path.is_file():
        raise LeaderboardError(f"{folder}: no evaluation.json; pass folders written by eval/win_rate.py")
    run = json.loads(path.read_text(encoding="utf-8"))
    return {**run, "folder": folder, "label": folder.name}


def pick_judge(runs: Sequence[dict[str, Any]], judge: str | None) -> str:
    """The judge the leaderboard is built on: ``judge``, which every run must have, or else the one judge
    name all runs share."""
    if judge is not None:
        for run in runs:
            if judge not in run["judges"]:
                raise LeaderboardError(
                    f"{run['folder']}: no judge {judge!r} (it has {sorted(run['judges'])})"
                )
        return judge
    shared = sorted(set.intersection(*(set(run["judges"]) for run in runs)))
    if len(shared) != 1:
        what = f"share the judges {shared}" if shared else "share no judge"
        raise LeaderboardError(f"the runs {what}; choose one with --judge")
    return shared[0]


def check_comparable(runs: Sequence[dict[str, Any]], judge: str) -> None:
    """Refuse runs that mix judges, prompt sets or combine rules, or whose judge did not finish."""
    first = runs[0]
    for run in runs:
        if run["judges"][judge].get("error"):
            raise LeaderboardError(
                f"{run['folder']}: judge {judge} did not finish: {run['judges'][judge]['error']}"
            )
        if "prompt_ids" not in run:
            raise LeaderboardError(
                f"{run['folder']}: its evaluation.json has no prompt ids (written by an older align-kit); rerun "
                "its evaluation, which costs no generation and no judge call"
            )
    identities = {str(run["folder"]): run["judges"][judge]["metadata"]["judge identity"] for run in runs}
    if len(set(identities.values())) > 1:
        listed = "; ".join(f"{folder}: {identity}" for folder, identity in identities.items())
        raise LeaderboardError(
            f"judge {judge} is not the same judge in every run (model, template or decoding differ: {listed}); "
            "ratings under different judges are not comparable"
        )
    for run in runs[1:]:
        ours, theirs = set(first["prompt_ids"]), set(run["prompt_ids"])
        if ours != theirs:
            raise LeaderboardError(
                f"{run['folder']} was evaluated on other held-out prompts than {first['folder']} "
                f"({len(theirs - ours)} prompts only in the one, {len(ours - theirs)} only in the other); use "
                "the same dataset, data settings and n_prompts"
            )
        if run.get("combine_orders", "strict") != first.get("combine_orders", "strict"):
            raise LeaderboardError(
                f"{run['folder']} combines the two orders by {run.get('combine_orders', 'strict')!r}, "
                f"{first['folder']} by {first.get('combine_orders', 'strict')!r}: their scores differ"
            )


def system_names(runs: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """{run's name: leaderboard name} per run: a system keeps its name unless another run has a system of
    that name with another path; then both are named ``<run label>/<name>``."""
    paths: dict[str, set[str]] = {}
    for run in runs:
        for name, path in run["systems"].items():
            paths.setdefault(name, set()).add(path)
    labels = [run["label"] for run in runs]
    if len(set(labels)) != len(labels):  # two folders of the same name: use the parent too
        labels = [f"{run['folder'].parent.name}/{run['label']}" for run in runs]
    return [
        {name: name if len(paths[name]) == 1 else f"{label}/{name}" for name in run["systems"]}
        for run, label in zip(runs, labels, strict=True)
    ]


def merged_judgments(runs: Sequence[dict[str, Any]], judge: str) -> tuple[list[Judgment], int]:
    """Every run's judgments under the judge, systems renamed for the leaderboard; a game already taken
    from an earlier run is dropped. Returns (judgments, games dropped as duplicates)."""
    seen, out, duplicates = set(), [], 0
    for run, names in zip(runs, system_names(runs), strict=True):
        for j in read_judgments(judge_folder(run["folder"], judge) / "judgments.csv"):
            system, baseline = names.get(j.system, j.system), names.get(j.baseline, j.baseline)
            key = (system, baseline, j.prompt_id)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            out.append(Judgment(**{**j.to_row(), "system": system, "baseline": baseline}))
    return out, duplicates


def run_audits(runs: Sequence[dict[str, Any]], judge: str) -> list[dict[str, Any]]:
    """Each run's judge audit: its verdict and every check."""
    return [
        {
            "run": str(run["folder"]),
            "evidence": bool(run["judges"][judge].get("trust", {}).get("evidence")),
            "verdict": run["judges"][judge].get("trust", {}).get("headline", "not audited"),
            "checks": run["judges"][judge].get("audit_checks", []),
        }
        for run in runs
    ]


def build(
    run_dirs: Sequence[str | Path],
    judge: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """The leaderboard of ``run_dirs`` under ``judge`` (see the module docstring); raises LeaderboardError
    when the runs cannot be compared."""
    if not run_dirs:
        raise LeaderboardError("no runs given")
    runs = [read_run(folder) for folder in run_dirs]
    judge = pick_judge(runs, judge)
    check_comparable(runs, judge)
    judgments, duplicates = merged_judgments(runs, judge)
    ranking = ratings.rank_systems(judgments, anchor=CHOSEN)
    intervals = ratings.bootstrap_ratings(judgments, anchor=CHOSEN, seed=seed, n_boot=n_boot, level=level)
    origin = {}
    for run, names in zip(runs, system_names(runs), strict=True):
        for name, new in names.items():
            origin.setdefault(new, {"runs": [], "path": run["systems"][name]})["runs"].append(
                str(run["folder"])
            )
    systems = []
    for name, rating in ranking["ratings"].items():
        against = [j.score for j in stats.select(judgments, name, CHOSEN)]
        low, high = stats.bootstrap_ci(against, seed=seed, n_boot=n_boot, level=level)
        systems.append(
            {
                "system": name,
                **origin.get(name, {"runs": [], "path": ""}),
                "rating": rating,
                "rating_ci": intervals.get(name, (None, None)),
                "win_rate_vs_chosen": stats.win_rate(against) if name != CHOSEN else None,
                "win_rate_ci": (low, high) if name != CHOSEN else (None, None),
                "n_vs_chosen": len(against),
            }
        )
    audits = run_audits(runs, judge)
    failing = [a["run"] for a in audits if not a["evidence"]]
    return {
        "judge": judge,
        "judge identity": runs[0]["judges"][judge]["metadata"]["judge identity"],
        "evidence": not failing,
        "not_evidence_runs": failing,
        "n_prompts": len(runs[0]["prompt_ids"]),
        "combine_orders": runs[0].get("combine_orders", "strict"),
        "runs": [str(run["folder"]) for run in runs],
        "n_judgments": len(judgments),
        "duplicates_dropped": duplicates,
        "ci_method": f"percentile bootstrap over prompts, n_boot={n_boot}, seed={seed}",
        "level": level,
        "systems": systems,
        "ranking": ranking,
        "audits": audits,
    }


def write(board: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """leaderboard.json, leaderboard.md and leaderboard.html in ``out_dir``, each written whole."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in ("leaderboard.json", "leaderboard.md", "leaderboard.html")}
    files.write_text(paths["leaderboard.json"], json.dumps(to_jsonable(board), indent=2, allow_nan=False))
    files.write_text(paths["leaderboard.md"], render_leaderboard_markdown(board))
    files.write_text(paths["leaderboard.html"], render_leaderboard_html(board))
    return paths


# ---------------------------------------------------------------------------------------------------------
# Rendering


LEADERBOARD_AUDITS = (
    "honeypot_pass_rate",
    "human_kappa",
    "flip_rate",
    "first_slot_rate",
    "parse_failure_rate",
)
LEADERBOARD_AUDITS += ("n_intransitive",)


def leaderboard_opening(board: Mapping[str, Any]) -> tuple[str, list[str]]:
    """The verdict on the leaderboard's judge: one line per run whose judge audit failed a core check."""
    title = f"Judge {board['judge']}: "
    if board["evidence"]:
        return title + "its audits pass in every run.", []
    reasons = [f"{a['run']}: {a['verdict']}" for a in board["audits"] if not a["evidence"]]
    return title + "these ratings are not evidence: a core audit failed in a run.", reasons


def _leaderboard_tables(board: Mapping[str, Any]) -> dict[str, Any]:
    systems = [
        [
            str(rank),
            s["system"],
            ", ".join(Path(r).name for r in s["runs"]) or "-",
            _num(s["rating"], ".0f"),
            _range(s["rating_ci"], ".0f"),
            _pct(s["win_rate_vs_chosen"]),
            _ci(*s["win_rate_ci"]),
            str(s["n_vs_chosen"]) if s["system"] != "chosen" else "",
        ]
        for rank, s in enumerate(board["systems"], start=1)
    ]
    flag = {True: "PASS", False: "FAIL", None: "n/a"}
    audits = []
    for a in board["audits"]:
        checks = {c["name"]: c for c in a["checks"]}
        cells = [
            f"{_num(checks[n]['value'], '.3f') if isinstance(checks[n]['value'], float) else _plain(checks[n]['value'])} "
            f"{flag[checks[n]['passed']]}"
            if n in checks
            else "n/a"
            for n in LEADERBOARD_AUDITS
        ]
        audits.append([a["run"], "evidence" if a["evidence"] else "NOT evidence", *cells])
    level = f"{100 * board['level']:g}% CI"
    return {
        "systems": (["#", "System", "Runs", "Rating", level, "Win rate vs chosen", level, "n"], systems),
        "audits": (["Run", "Judge verdict", *LEADERBOARD_AUDITS], audits),
        "settings": [
            ["judge", board["judge"]],
            ["judge identity", board["judge identity"]],
            ["held-out prompts", str(board["n_prompts"])],
            ["combine orders", board["combine_orders"]],
            ["runs", ", ".join(board["runs"])],
            [
                "games",
                f"{board['n_judgments']} ({board['duplicates_dropped']} judged in two runs counted once)",
            ],
        ],
        "explanation": (
            "Ratings are Bradley-Terry strengths on the Elo scale (400 points = 10:1 odds), fitted to every game "
            f"of every run and anchored on chosen at {_num(board['ranking']['anchor_rating'], '.0f')}; intervals "
            f"are {board['ci_method']}. "
            + (f"Note: {board['ranking']['note']}." if board["ranking"].get("note") else "")
        ),
    }


def render_leaderboard_markdown(board: Mapping[str, Any]) -> str:
    """leaderboard.md: the verdict on the judge, the systems by rating, each run's audits."""
    title, reasons = leaderboard_opening(board)
    tables = _leaderboard_tables(board)
    lines = (
        ["# Leaderboard", "", f"**{title}**", ""] + [f"- {r}" for r in reasons] + ([""] if reasons else [])
    )
    lines += _md_table(["Setting", "Value"], tables["settings"]) + [""]
    lines += ["## Systems", ""] + _md_table(*tables["systems"]) + ["", tables["explanation"], ""]
    lines += ["## Audits of each run", ""] + _md_table(*tables["audits"]) + [""]
    return "\n".join(lines)


def render_leaderboard_html(board: Mapping[str, Any]) -> str:
    """leaderboard.html from templates/leaderboard.html.j2, with the ratings plot."""
    title, reasons = leaderboard_opening(board)
    ranking = board["ranking"]
    return TEMPLATES.get_template("leaderboard.html.j2").render(
        title="Leaderboard",
        opening=title,
        reasons=reasons,
        trusted=board["evidence"],
        plot_png=plots.plot_ratings(ranking, {s["system"]: s["rating_ci"] for s in board["systems"]})
        if ranking["ratings"]
        else None,
        **_leaderboard_tables(board),
    )


def _range(bounds: Sequence[Any], fmt: str) -> str:
    low, high = bounds
    return (
        f"{_num(low, fmt)} to {_num(high, fmt)}" if stats.is_number(low) and stats.is_number(high) else "n/a"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point (eval/leaderboard.py, ``align-kit leaderboard``)."""
    parser = argparse.ArgumentParser(prog="leaderboard", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", nargs="+", required=True, help="Evaluation folders (each with evaluation.json)."
    )
    parser.add_argument("--judge", default=None, help="Judge name; default: the one judge every run has.")
    parser.add_argument("--output_dir", default="leaderboard", help="Where leaderboard.{md,html,json} go.")
    parser.add_argument("--n_boot", type=int, default=1000, help="Bootstrap resamples of the prompts.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the bootstrap.")
    parser.add_argument("--level", type=float, default=0.95, help="Confidence level of every interval.")
    args = parser.parse_args(argv)
    try:
        board = build(args.runs, args.judge, args.n_boot, args.seed, args.level)
    except LeaderboardError as error:
        parser.exit(2, f"leaderboard: {error}\n")
    paths = write(board, args.output_dir)
    print(render_leaderboard_markdown(board))
    print(f"[align-kit] leaderboard in {paths['leaderboard.md']} and {paths['leaderboard.html']}")
    return board
