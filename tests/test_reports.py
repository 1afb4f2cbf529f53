"""Protects the report files a reader sees: the verdict on the judge first, the headline numbers as
formatted (n/a with its reason when nothing was decided), a self-contained HTML page with embedded plots and
escaped model text, and results.json / judgments.csv that read back unchanged and are written whole."""

import json

import numpy as np
import pytest

from align_kit import files
from align_kit.evaluation import ratings, reports, stats
from align_kit.evaluation.stats import Judgment
from align_kit.judges.verdicts import check_audit


def _synthetic_run(seed=0):
    rng = np.random.default_rng(seed)
    judgments = []
    for system, p_win in [("dpo", 0.65), ("ppo", 0.55)]:
        for i in range(60):
            verdict = str(rng.choice(["win", "tie", "loss"], p=[p_win - 0.05, 0.1, 0.95 - p_win]))
            slots = {"win": ("A", "B"), "loss": ("B", "A"), "tie": ("tie", "tie")}[verdict]
            judgments.append(
                Judgment(
                    prompt_id=f"q{i}",
                    system=system,
                    baseline="sft",
                    verdict=verdict,
                    first_order_verdict=slots[0],
                    swapped_order_verdict=slots[1] if i != 3 else None,
                    system_len=int(rng.integers(50, 300)),
                    baseline_len=int(rng.integers(50, 200)),
                    judge="fake-judge",
                    parse_failures=int(i == 3),
                )
            )
    comparisons = [stats.summarize(judgments, s, "sft", seed=seed) for s in ("dpo", "ppo")]
    ranking = ratings.rank_systems(judgments, anchor="sft")
    results = {
        "metadata": {"judge": "fake-judge", "models": {"dpo": "runs/dpo", "ppo": "runs/ppo"}, "seed": seed},
        "skipped": {"too_long": 4, "empty_answer": 1},
        "comparisons": comparisons,
        "paired": [stats.paired_test(judgments, "dpo", "ppo", "sft", seed=seed)],
        "ranking": ranking,
        "audit": stats.audit(judgments, honeypots=(["win"] * 9 + ["loss"], ["win"] * 10)),
    }
    results["audit_checks"] = check_audit(results["audit"])
    examples = [
        {
            "prompt_id": "q0",
            "prompt": "What does <b>bold</b> do & why?",
            "system": "dpo",
            "baseline": "sft",
            "system_answer": '<script>alert("pwned")</script> It makes text bold.',
            "baseline_answer": "I don't know <img src=x onerror=alert(1)>",
            "verdict": "win",
            "rationale": "Output (a) is better: it answers.",
        }
    ]
    return results, judgments, examples


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    results, judgments, examples = _synthetic_run()
    out = tmp_path_factory.mktemp("report")
    paths = reports.write_report(out, results, judgments, examples)
    return out, paths, results, judgments


def test_all_files_are_written(written):
    out, paths, _, _ = written
    assert set(paths) == {"report.md", "report.html", "results.json", "judgments.csv"}
    for name, path in paths.items():
        assert path == out / name and path.stat().st_size > 0


def test_markdown_states_headline_numbers(written):
    _, paths, results, _ = written
    text = paths["report.md"].read_text()
    dpo = results["comparisons"][0]
    expected = (
        f"dpo beats sft {100 * dpo['win_rate']:.1f}% "
        f"(95% CI {100 * dpo['ci_low']:.1f}-{100 * dpo['ci_high']:.1f}) of the time, n=60"
    )
    assert expected in text
    assert "| too_long | 4 |" in text and "| empty_answer | 1 |" in text
    assert "| honeypot_pass_rate | 0.900 | 0.9 to 1 | PASS |" in text
    assert "| parse_failure_rate | 0.017 | 0 to 0.05 | PASS |" in text
    assert "sft (anchor)" in text


def test_headline_formats_known_numbers():
    summary = {
        "system": "dpo",
        "baseline": "sft",
        "n": 300,
        "win_rate": 0.63,
        "ci_low": 0.581,
        "ci_high": 0.679,
    }
    summary["length_controlled"] = {
        "method": "logistic",
        "estimate": 0.552,
        "ci_low": 0.49,
        "ci_high": 0.6134,
    }
    text = reports.headline(summary)
    assert text.startswith("dpo beats sft 63.0% (95% CI 58.1-67.9) of the time, n=300")
    assert "length-controlled 55.2% (95% CI 49.0-61.3)" in text
    assert "not distinguishable from a tie" not in text
    summary.update(win_rate=0.52, ci_low=0.46, ci_high=0.58)
    assert "not distinguishable from a tie" in reports.headline(summary)


def test_html_is_self_contained_with_embedded_plots(written):
    _, paths, _, _ = written
    page = paths["report.html"].read_text()
    assert page.count('<img class="plot" alt="') >= 2
    assert page.count('src="data:image/png;base64,') >= 2
    assert "<style>" in page and "<link" not in page and "http://" not in page and "https://" not in page
    assert '<tr class="pass">' in page and '<td class="flag">PASS</td>' in page


def test_html_escapes_model_text(written):
    _, paths, _, _ = written
    page = paths["report.html"].read_text()
    assert "<script>" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt;" in page  # markupsafe spells " as &#34;
    assert "I don&#39;t know &lt;img src=x onerror=alert(1)&gt;" in page
    assert "What does &lt;b&gt;bold&lt;/b&gt; do &amp; why?" in page


def test_results_json_round_trips(written):
    _, paths, results, _ = written
    loaded = json.loads(paths["results.json"].read_text())
    checks = loaded["audit_checks"]
    assert loaded == files.to_jsonable(results)
    assert {c["name"]: c["passed"] for c in checks}["honeypot_pass_rate"] is True
    assert loaded["comparisons"][0]["win_rate"] == pytest.approx(results["comparisons"][0]["win_rate"])


def test_judgments_csv_has_one_row_per_judgment_and_reads_back(written):
    _, paths, _, judgments = written
    assert len(paths["judgments.csv"].read_text().strip().splitlines()) == len(judgments) + 1
    assert reports.read_judgments(paths["judgments.csv"]) == judgments


def test_to_jsonable_turns_nan_and_numpy_into_plain_json():
    value = {"a": np.float64(0.5), "b": float("nan"), "c": (np.int64(3), None), 4: np.array([1.0, np.inf])}
    assert files.to_jsonable(value) == {"a": 0.5, "b": None, "c": [3, None], "4": [1.0, None]}
    json.dumps(files.to_jsonable(value), allow_nan=False)


def test_report_without_optional_sections(tmp_path):
    rows = [Judgment(prompt_id=str(i), system="dpo", baseline="chosen", verdict="win") for i in range(3)]
    results = {"comparisons": [stats.summarize(rows, "dpo", "chosen")]}
    paths = reports.write_report(tmp_path, results, rows)
    text = paths["report.md"].read_text()
    assert "dpo beats chosen 100.0% (95% CI 100.0-100.0) of the time, n=3" in text
    assert "raw: every verdict is the same" in text
    assert "length-controlled rate not fitted (every verdict is the same)" in text
    assert "## Skipped rows\n\nNone." in text


def test_report_opens_with_the_judges_verdict_and_files_are_written_whole(tmp_path):
    from align_kit.evaluation import audits

    results, judgments, examples = _synthetic_run()
    checks = [dict(c) for c in results["audit_checks"]]
    for check in checks:
        if check["name"] == "flip_rate":
            check.update(value=0.7, passed=False)
    results = {**results, "audit_checks": checks, "trust": audits.trust_verdict(checks)}
    undecided = [
        {
            "prompt_id": "q99",
            "system": "dpo",
            "baseline": "sft",
            "judge": "fake-judge",
            "first_order_text": "?",
        }
    ]
    paths = reports.write_report(tmp_path, results, judgments, examples, undecided)
    lines = paths["report.md"].read_text().splitlines()
    assert (
        lines[2]
        == "**Judge fake-judge: These win rates are not evidence: the judge failed 1 core audit (flip_rate).**"
    )
    assert lines[4].startswith("- flip_rate = 0.700: FAIL (allowed 0 to 0.25): its verdict changes")
    assert lines[5].startswith("- not measured: human_kappa") and lines.index("## Headlines") > 6
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(paths)  # no temporary file left behind
    assert reports.read_judgments(paths["judgments.csv"]) == judgments  # the undecided row is skipped
    assert paths["judgments.csv"].read_text().splitlines()[-1].startswith("q99,dpo,sft,,")


def test_a_comparison_without_decided_pairs_reads_na():
    summary = stats.summarize([], "dpo", "chosen")
    assert reports.headline(summary) == "dpo vs chosen: n/a (no decided pairs)."
    results = {"comparisons": [summary], "ranking": ratings.rank_systems([], anchor="sft")}
    text = reports.render_markdown(results)
    assert "| dpo | chosen | 0 | 0 / 0 / 0 | n/a |" in text and "Ratings: n/a (no ratings" in text
    assert "not audited" in text.splitlines()[2]
    assert "<h2>Ratings</h2>" in reports.render_html(results, [])
