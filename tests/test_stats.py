"""Protects the numbers behind every win-rate claim: each statistic is checked against a hand-computed
answer or against a simulation whose truth is known (interval coverage, length bias, rating order)."""

import math
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from align_kit.evaluation import ratings, stats
from align_kit.evaluation.stats import Judgment
from align_kit.judges.verdicts import check_audit


def _judgments(verdicts, system="dpo", baseline="sft", system_len=None, baseline_len=None, prompt_ids=None):
    n = len(verdicts)
    system_len = [100] * n if system_len is None else system_len
    baseline_len = [100] * n if baseline_len is None else baseline_len
    prompt_ids = [f"p{i}" for i in range(n)] if prompt_ids is None else prompt_ids
    return [
        Judgment(
            prompt_id=p, system=system, baseline=baseline, verdict=v, system_len=int(s), baseline_len=int(b)
        )
        for p, v, s, b in zip(prompt_ids, verdicts, system_len, baseline_len, strict=True)
    ]


def _sample_verdicts(rng, n, p_win, p_tie=0.0):
    return list(rng.choice(["win", "tie", "loss"], size=n, p=[p_win, p_tie, 1.0 - p_win - p_tie]))


def test_win_rate_and_se_on_hand_example():
    verdicts = ["win", "win", "tie", "loss", "win"]
    # scores 1, 1, .5, 0, 1: mean 3.5/5 = 0.7; squared deviations sum to 0.8, var = 0.8/4 = 0.2,
    # se = sqrt(0.2 / 5) = 0.2
    assert stats.verdict_counts(verdicts) == {"win": 3, "tie": 1, "loss": 1}
    assert stats.win_rate(verdicts) == pytest.approx(0.7)
    assert stats.win_rate_se(verdicts) == pytest.approx(0.2)
    assert math.isnan(stats.win_rate([]))


def test_bootstrap_is_seeded_and_brackets_the_mean():
    scores = stats.verdict_scores(["win"] * 60 + ["tie"] * 20 + ["loss"] * 20)
    low, high = stats.bootstrap_ci(scores, seed=3)
    assert (low, high) == stats.bootstrap_ci(scores, seed=3)
    assert low < 0.7 < high
    # the normal interval 0.7 +/- 1.96 * se is about +/- 0.085 here
    assert high - low == pytest.approx(2 * 1.96 * scores.std() / 10, abs=0.02)


@pytest.mark.parametrize("p_tie", [0.0, 0.2])
def test_bootstrap_ci_covers_the_true_win_rate_95_percent_of_the_time(p_tie):
    true_rate, n, n_datasets = 0.6, 200, 2000
    p_win = true_rate - p_tie / 2
    rng = np.random.default_rng(0)
    data = rng.choice([1.0, 0.5, 0.0], size=(n_datasets, n), p=[p_win, p_tie, 1.0 - p_win - p_tie])
    covered = 0
    for i, scores in enumerate(data):
        low, high = stats.bootstrap_ci(scores, seed=i)
        covered += low <= true_rate <= high
    # 2000 data sets: the Monte Carlo standard error of the coverage is 0.005
    assert 0.93 <= covered / n_datasets <= 0.97


def test_paired_test_detects_a_real_difference():
    rng = np.random.default_rng(1)
    rows = _judgments(_sample_verdicts(rng, 300, 0.7), system="dpo") + _judgments(
        _sample_verdicts(rng, 300, 0.5), system="ppo"
    )
    result = stats.paired_test(rows, "dpo", "ppo", "sft", seed=0)
    assert result["n"] == 300
    assert result["mean_diff"] == pytest.approx(
        stats.win_rate([j.verdict for j in rows[:300]]) - stats.win_rate([j.verdict for j in rows[300:]])
    )
    assert result["ci_low"] > 0.0
    assert result["p_value"] < 0.001


def test_paired_test_rejects_a_true_null_at_about_its_level():
    rng = np.random.default_rng(2)
    rejections, trials = 0, 400
    for trial in range(trials):
        rows = _judgments(_sample_verdicts(rng, 100, 0.5, 0.2), system="a") + _judgments(
            _sample_verdicts(rng, 100, 0.5, 0.2), system="b"
        )
        rejections += (
            stats.paired_test(rows, "a", "b", "sft", seed=trial, n_boot=10, n_perm=1000)["p_value"] < 0.05
        )
    assert 0.02 <= rejections / trials <= 0.08


def test_paired_test_aligns_on_shared_prompts():
    rows = _judgments(["win", "win", "loss"], system="a", prompt_ids=["x", "y", "z"])
    rows += _judgments(["loss", "win"], system="b", prompt_ids=["y", "x"])
    result = stats.paired_test(rows, "a", "b", "sft")
    # shared x: 1 - 1 = 0, y: 1 - 0 = 1
    assert result["n"] == 2
    assert result["mean_diff"] == pytest.approx(0.5)


def test_length_controlled_rate_removes_a_pure_length_preference():
    # Equally good systems; the judge picks the longer answer with probability 0.9; dpo writes longer.
    rng = np.random.default_rng(0)
    n = 2000
    system_len = rng.normal(300, 60, n).clip(10)
    baseline_len = rng.normal(200, 60, n).clip(10)
    picks_longer = rng.random(n) < 0.9
    verdicts = np.where((system_len > baseline_len) == picks_longer, "win", "loss").tolist()
    raw = stats.win_rate(verdicts)
    lc = stats.length_controlled_win_rate(verdicts, system_len, baseline_len)
    assert raw > 0.7
    assert lc["method"] == "logistic"
    assert abs(lc["estimate"] - 0.5) < 0.08
    assert lc["ci_low"] < 0.5 < lc["ci_high"]
    assert lc["length_coef"] > 0


def test_length_controlled_rate_keeps_a_real_quality_gap():
    rng = np.random.default_rng(1)
    n = 2000
    system_len = rng.normal(200, 60, n).clip(10)
    baseline_len = rng.normal(200, 60, n).clip(10)
    verdicts = _sample_verdicts(rng, n, 0.7)  # length plays no part
    lc = stats.length_controlled_win_rate(verdicts, system_len, baseline_len)
    assert lc["estimate"] == pytest.approx(stats.win_rate(verdicts), abs=0.02)


def test_length_controlled_rate_falls_back_to_raw_rate_in_degenerate_cases():
    all_wins = stats.length_controlled_win_rate(["win"] * 10, range(10), [5] * 10)
    assert (all_wins["method"], all_wins["estimate"], all_wins["note"]) == (
        "raw",
        1.0,
        "every verdict is the same",
    )
    same_gap = stats.length_controlled_win_rate(
        ["win", "loss", "win", "tie"], [10, 20, 30, 40], [5, 15, 25, 35]
    )
    assert same_gap["method"] == "raw" and same_gap["estimate"] == pytest.approx(0.625)
    assert same_gap["note"] == "no variation in length difference"
    separated = stats.length_controlled_win_rate(["loss", "loss", "win", "win"], [1, 2, 8, 9], [5, 5, 5, 5])
    assert separated["method"] == "raw" and separated["note"].startswith("logistic fit failed")


def test_bradley_terry_two_systems_matches_closed_form():
    # With two systems the MLE is p_a / p_b = 75 / 25, so the gap is 400 log10(3) = 190.85 points.
    wins = pd.DataFrame([[0.0, 75.0], [25.0, 0.0]], index=["a", "b"], columns=["a", "b"])
    fitted = ratings.bradley_terry(wins, anchor="b", prior=0.0)
    assert fitted["b"] == pytest.approx(1000.0)
    assert fitted["a"] == pytest.approx(1000.0 + 400 * math.log10(3), abs=1e-6)


def test_bradley_terry_recovers_known_strengths():
    true = {"sft": 1000.0, "ppo": 1100.0, "dpo": 1300.0}
    rng = np.random.default_rng(0)
    rows = []
    for system, baseline in [("dpo", "sft"), ("ppo", "sft"), ("dpo", "ppo")]:
        p_win = 1.0 / (1.0 + 10 ** ((true[baseline] - true[system]) / 400))
        rows += _judgments(_sample_verdicts(rng, 1000, p_win), system=system, baseline=baseline)
    ranked = ratings.rank_systems(rows, anchor="sft")
    assert list(ranked["ratings"]) == ["dpo", "ppo", "sft"]
    for name, rating in true.items():
        assert ranked["ratings"][name] == pytest.approx(rating, abs=50)
    assert ranked["transitivity"] == {"n_triads": 1, "n_intransitive": 0, "cycles": []}


def test_bradley_terry_refuses_disconnected_or_unbounded_tables():
    names = ["a", "b", "c", "d"]
    wins = pd.DataFrame(0.0, index=names, columns=names)
    wins.loc["a", "b"], wins.loc["b", "a"], wins.loc["c", "d"], wins.loc["d", "c"] = 3, 2, 3, 2
    with pytest.raises(ValueError, match="not connected"):
        ratings.bradley_terry(wins)
    sweep = pd.DataFrame([[0.0, 10.0], [0.0, 0.0]], index=["a", "b"], columns=["a", "b"])
    with pytest.raises(ValueError, match="infinite"):
        ratings.bradley_terry(sweep, prior=0.0)
    assert ratings.bradley_terry(sweep, prior=0.1)["a"] > ratings.bradley_terry(sweep, prior=0.1)["b"]


def test_win_rate_table_counts_ties_as_half():
    rows = _judgments(["win", "tie", "loss", "win"], system="dpo", baseline="sft")
    wins = ratings.win_table(rows)
    assert wins.loc["dpo", "sft"] == 2.5 and wins.loc["sft", "dpo"] == 1.5
    rates = ratings.win_rate_table(wins)
    assert rates.loc["dpo", "sft"] == pytest.approx(0.625)
    assert math.isnan(rates.loc["dpo", "dpo"])


def test_transitivity_counts_cycles_in_a_hand_made_table():
    names = ["a", "b", "c", "d"]
    beats = {
        ("a", "b"): 0.7,
        ("b", "c"): 0.6,
        ("c", "a"): 0.8,
        ("d", "a"): 0.9,
        ("d", "b"): 0.9,
        ("d", "c"): 0.9,
    }
    rates = pd.DataFrame(np.nan, index=names, columns=names)
    for (x, y), r in beats.items():
        rates.loc[x, y], rates.loc[y, x] = r, 1 - r
    # triads abc (cycle a > b > c > a), abd, acd, bcd (each d on top, transitive)
    assert ratings.intransitive_triads(rates) == {
        "n_triads": 4,
        "n_intransitive": 1,
        "cycles": [["a", "b", "c"]],
    }
    rates.loc["c", "a"], rates.loc["a", "c"] = 0.2, 0.8
    assert ratings.intransitive_triads(rates)["n_intransitive"] == 0
    rates.loc["a", "b"], rates.loc["b", "a"] = 0.5, 0.5  # an undecided pair leaves its triads out
    assert ratings.intransitive_triads(rates)["n_triads"] == 2


def test_cohens_kappa_on_hand_example():
    judge = ["win", "win", "win", "loss", "loss", "tie", "win", "loss", "win", "tie"]
    human = ["win", "win", "loss", "loss", "loss", "win", "win", "loss", "tie", "tie"]
    # p_o = 7/10; marginals judge (win .5, loss .3, tie .2), human (win .4, loss .4, tie .2)
    # p_e = .5*.4 + .3*.4 + .2*.2 = .36; kappa = (.7 - .36) / (1 - .36) = .53125
    assert stats.cohens_kappa(judge, human) == pytest.approx(0.53125)
    assert stats.agreement(judge, human) == {
        "n": 10,
        "accuracy": pytest.approx(0.7),
        "kappa": pytest.approx(0.53125),
    }
    assert stats.cohens_kappa(human, human) == pytest.approx(1.0)
    assert math.isnan(stats.cohens_kappa(["win"] * 3, ["win"] * 3))
    assert stats.honeypot_pass_rate(["win", "win", "loss", "win"], ["win"] * 4) == pytest.approx(0.75)


def test_position_bias_audit_flags_a_judge_that_always_picks_slot_a():
    rows = _judgments(["tie"] * 40)
    for j in rows:
        j.first_order_verdict, j.swapped_order_verdict = "A", "A"
    bias = stats.position_bias(rows)
    assert bias["flip_rate"] == 1.0 and bias["first_slot_rate"] == 1.0
    assert bias["n_decided"] == 80 and bias["first_slot_p"] < 1e-20
    failed = {row["name"] for row in check_audit(stats.audit(rows)) if row["passed"] is False}
    assert failed == {"flip_rate", "first_slot_rate"}


def test_position_bias_audit_passes_a_consistent_judge():
    verdicts = ["win", "loss", "tie", "win"] * 10
    slots = {"win": ("A", "B"), "loss": ("B", "A"), "tie": ("tie", "tie")}
    rows = _judgments(verdicts)
    for j in rows:
        j.first_order_verdict, j.swapped_order_verdict = slots[j.verdict]
    rows[0].swapped_order_verdict, rows[0].parse_failures = None, 1  # unparsed: left out of the flip rate
    bias = stats.position_bias(rows)
    assert bias["n_pairs"] == 39 and bias["flip_rate"] == 0.0
    assert bias["first_slot_rate"] == pytest.approx(30 / 59)  # 60 decided, one of the A's unparsed
    assert stats.parse_failure_rate(rows) == pytest.approx(1 / 40)


def test_audit_checks_against_thresholds():
    rows = _judgments(["win", "loss"])
    figures = stats.audit(
        rows, honeypots=(["win", "loss"], ["win", "win"]), human=(["win", "loss"], ["win", "loss"])
    )
    checks = {row["name"]: row for row in check_audit(figures)}
    assert checks["honeypot_pass_rate"]["value"] == 0.5 and checks["honeypot_pass_rate"]["passed"] is False
    assert checks["human_kappa"]["passed"] is True
    assert checks["flip_rate"]["passed"] is None  # no single-order verdicts recorded
    assert checks["n_intransitive"]["passed"] is None


def test_summarize_gathers_one_comparison():
    rows = _judgments(["win", "win", "tie", "loss", "win"], system_len=[120, 130, 90, 80, 150])
    rows += _judgments(["loss"], system="ppo")
    summary = stats.summarize(rows, "dpo", "sft", seed=0)
    assert summary["n"] == 5 and summary["counts"] == {"win": 3, "tie": 1, "loss": 1}
    assert summary["win_rate"] == pytest.approx(0.7) and summary["se"] == pytest.approx(0.2)
    assert summary["ci_low"] <= 0.7 <= summary["ci_high"]
    assert summary["mean_length"] == {"system": pytest.approx(114.0), "baseline": pytest.approx(100.0)}
    assert set(summary["length_controlled"]) >= {"estimate", "ci_low", "ci_high", "method", "note"}


def test_judgment_rejects_unknown_verdicts_and_round_trips_rows():
    with pytest.raises(ValueError, match="verdict"):
        Judgment(prompt_id="p", system="a", baseline="b", verdict="draw")
    with pytest.raises(ValueError, match="first_order_verdict"):
        Judgment(prompt_id="p", system="a", baseline="b", verdict="win", first_order_verdict="C")
    j = Judgment("7", "dpo", "sft", "win", "A", None, 12, 9, "fake-judge", 1)
    assert Judgment.from_row(j.to_row()) == j
    assert Judgment.from_row({**j.to_row(), "prompt_id": 7, "swapped_order_verdict": float("nan")}) == j


def test_evaluate_metric_loads_offline_and_matches_stats(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise OSError("network access attempted while loading a local metric")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    folder = Path(__file__).resolve().parents[1] / "eval" / "metrics" / "win_rate"
    verdicts = ["win", "win", "tie", "loss", "win", "loss", "win", "tie"]
    human = ["win", "loss", "tie", "loss", "win", "loss", "win", "win"]

    plain = evaluate.load(str(folder), keep_in_memory=True).compute(predictions=verdicts, seed=5)
    ci_low, ci_high = stats.bootstrap_ci(stats.verdict_scores(verdicts), seed=5)
    assert plain["win_rate"] == pytest.approx(stats.win_rate(verdicts)) == pytest.approx(0.625)
    assert plain["se"] == pytest.approx(stats.win_rate_se(verdicts))
    assert (plain["ci_low"], plain["ci_high"]) == pytest.approx((ci_low, ci_high))
    assert (plain["wins"], plain["ties"], plain["losses"], plain["n"]) == (4, 2, 2, 8)
    assert "kappa" not in plain

    from_file = evaluate.load(str(folder / "win_rate.py"), keep_in_memory=True)
    from_file.add_batch(predictions=verdicts[:5])
    from_file.add_batch(predictions=verdicts[5:])
    with_labels = from_file.compute(references=human, seed=5)
    assert with_labels["win_rate"] == pytest.approx(0.625)
    assert with_labels["accuracy"] == pytest.approx(0.75)
    assert with_labels["kappa"] == pytest.approx(stats.cohens_kappa(verdicts, human))


def test_rank_systems_gives_na_with_a_reason_instead_of_raising():
    empty = ratings.rank_systems([], anchor="x")  # raised IndexError before
    assert empty["ratings"] == {} and empty["note"].startswith("no ratings: fewer than two systems")
    rows = _judgments(["win", "loss", "tie"], system="dpo", baseline="chosen")
    moved = ratings.rank_systems(rows, anchor="sft")  # the anchor has no decided pair
    assert "anchor sft has no decided pair" in moved["note"] and moved["anchor"] is None
    assert sum(moved["ratings"].values()) == pytest.approx(2000.0)  # centred on the mean
    apart = rows + _judgments(["win"], system="ppo", baseline="kto")
    assert (
        ratings.rank_systems(apart)["ratings"] == {}
        and "not connected" in ratings.rank_systems(apart)["note"]
    )


def test_scores_under_the_average_rule_drive_win_rates_paired_tests_and_ratings():
    # (A, tie) is a strict tie but scores 0.75 under the average rule: every statistic must use the score
    rows = [Judgment(f"p{i}", "dpo", "sft", "tie", "A", "tie", score=0.75) for i in range(3)] + [
        Judgment("p3", "dpo", "sft", "win", "A", "B")
    ]
    summary = stats.summarize(rows, "dpo", "sft", n_boot=200)
    assert summary["counts"] == {"win": 1, "tie": 3, "loss": 0}  # outcomes stay strict
    assert summary["win_rate"] == pytest.approx((3 * 0.75 + 1.0) / 4)
    # resampling 4 prompts: P(mean >= 0.9375) = P(>= 3 draws of the win) = 0.051 > 2.5% > P(mean = 1) = 0.004
    assert summary["ci_low"] == pytest.approx(0.75) and summary["ci_high"] == pytest.approx(0.9375)
    wins = ratings.win_table(rows)
    assert wins.loc["dpo", "sft"] == pytest.approx(3.25) and wins.loc["sft", "dpo"] == pytest.approx(0.75)
    against = [Judgment(f"p{i}", "ppo", "sft", "tie", "tie", "tie") for i in range(4)]
    paired = stats.paired_test(rows + against, "dpo", "ppo", "sft", n_boot=200, n_perm=500)
    assert paired["mean_diff"] == pytest.approx(0.8125 - 0.5)
    with pytest.raises(ValueError, match="score"):
        Judgment("p", "a", "b", "win", score=1.5)
    assert Judgment("p", "a", "b", "loss").score == 0.0


def test_bootstrap_ratings_bracket_the_fit_and_are_seeded():
    rng = np.random.default_rng(1)
    rows = _judgments(_sample_verdicts(rng, 150, 0.7), system="dpo", baseline="sft")
    rows += _judgments(_sample_verdicts(rng, 150, 0.6), system="ppo", baseline="sft")
    fit = ratings.rank_systems(rows, anchor="sft")["ratings"]
    intervals = ratings.bootstrap_ratings(rows, anchor="sft", n_boot=300, seed=3)
    assert intervals == ratings.bootstrap_ratings(rows, anchor="sft", n_boot=300, seed=3)
    assert intervals["sft"] == pytest.approx((1000.0, 1000.0))  # the anchor does not move
    for name in ("dpo", "ppo"):
        low, high = intervals[name]
        assert low < fit[name] < high and 40 < high - low < 250
    # two systems: 0.7 = 1 / (1 + 10^(-d/400)) gives d = 147 points; the interval covers it
    assert intervals["dpo"][0] < 1000 + 400 * math.log10(0.7 / 0.3) < intervals["dpo"][1]
