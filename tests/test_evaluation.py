"""Protects the judged evaluation end to end (align_kit/evaluation/pipeline.py, answers.py, audits.py,
eval/win_rate.py): answers are generated once and reused, a finished evaluation reruns with zero judge calls
and zero generations, the judge's single-order answers reach the audit in slot terms, and each audit catches
the judge it is meant to catch: a first-slot-biased judge, a length-loving judge (raw rate moves, length-
controlled does not), a random judge on honeypots, a cyclic judge on transitivity, and a judge whose output
does not parse. Every report opens with the verdict on its judge; an evaluation always finishes (n/a with the
reason, a report for a judge that died); judges are checked before generation and take their settings from
the command line; a crash in generation loses at most one batch; the judge's raw text reaches judgments.csv;
the average combine rule, per-group results, judge traffic, and the leaderboard across runs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys

import pytest
from conftest import ROOT, ScriptedJudge, keyword_judge

from align_kit.configs import DataArgs
from align_kit.evaluation import answers, audits, judge_setup
from align_kit.evaluation import pipeline as evaluation
from align_kit.evaluation.answers import CHOSEN, HeldOut
from align_kit.evaluation.pipeline import CONFIG, evaluate_systems
from align_kit.evaluation.reports import read_judgments
from align_kit.evaluation.settings import HONEYPOT_KINDS, EvalArgs
from align_kit.judges.config import read_judge_config
from align_kit.judges.protocol import PairItem
from align_kit.models import generation, rewards
from align_kit.models import loading as models
from align_kit.models.loading import TinyGPT2Shape, build_byte_tokenizer, build_tiny_gpt2
from align_kit.parsing import parse

EVAL_CONFIGS = sorted((ROOT / "eval" / "configs").glob("*.yaml"))
HEADER = re.compile(r"^# (?:python|accelerate launch(?: --\S+(?: \S+)?)*) eval/win_rate\.py --config (\S+)$")
SMALL = {  # a small embedded task and short answers: every test here stays fast
    "embedded_train_size": 60,
    "embedded_test_size": 40,
    "n_prompts": 20,
    "max_new_tokens": 8,
    "batch_size": 8,
    "n_honeypots": 20,
    "n_human": 30,
    "n_boot": 200,
    "progress": False,
}


def _uniform(*texts: str) -> float:
    """A deterministic number in (0, 1) from texts."""
    digest = hashlib.sha256("\x00".join(texts).encode()).digest()
    return (int.from_bytes(digest[:8], "big") + 0.5) / 2**64


def length_loving(beta: float = 0.05):
    """Prefers slot A with probability sigmoid(beta * (len A - len B)), the coin fixed per unordered pair
    so that both orders agree: at equal length it is a fair coin, and nothing but length moves it."""

    def verdict(item):
        a, b = item.answer_a.strip(), item.answer_b.strip()
        first, second = sorted((a, b))
        u = _uniform(item.prompt, first, second)
        noise = math.log(u / (1 - u)) * (1 if a == first else -1)  # logistic, antisymmetric in the order
        return "A" if noise + beta * (len(a) - len(b)) > 0 else "B"

    return ScriptedJudge(verdict, "length_loving", batch_size=64)


def coin_flip_judge():
    """Picks a slot by a hash of the ordered pair: no preference, and no consistency across orders."""
    return ScriptedJudge(
        lambda item: "A" if _uniform(item.prompt, item.answer_a, item.answer_b) < 0.5 else "B", "random", 64
    )


def rock_paper_scissors():
    """rock < paper < scissors < rock; anything else ties."""
    beats = {("paper", "rock"), ("scissors", "paper"), ("rock", "scissors")}

    def verdict(item):
        a, b = item.answer_a.strip(), item.answer_b.strip()
        return "A" if (a, b) in beats else "B" if (b, a) in beats else "tie"

    return ScriptedJudge(verdict, "rps", batch_size=64)


def write_answers(path, prompts, answer_of):
    path.write_text(
        "".join(json.dumps({"prompt": p, "answer": answer_of(i, p)}) + "\n" for i, p in enumerate(prompts))
    )
    return str(path)


def small_held_out(**overrides):
    args = EvalArgs(**{k: v for k, v in {**SMALL, **overrides}.items() if k in EvalArgs.__dataclass_fields__})
    data = {k: v for k, v in SMALL.items() if k.startswith("embedded")}
    return answers.held_out(args, DataArgs(**data))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Two different random tiny GPT-2s saved like any model folder."""
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for name, seed in (("a", 0), ("b", 1)):
        build_tiny_gpt2(TinyGPT2Shape(n_layer=2, n_embd=64, n_head=2, seed=seed)).save_pretrained(root / name)
        build_byte_tokenizer().save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


@pytest.fixture(scope="module")
def first_run(tiny_models, tmp_path_factory):
    """One evaluation of two random models (plus a missing system and a missing judge model) by the oracle
    and by a judge that always answers 'first slot'."""
    out = tmp_path_factory.mktemp("eval")
    systems = {**tiny_models, "c": str(out / "not_trained_yet")}
    judges = [
        "oracle",
        f"reward_model={out / 'no_reward_model'}",
        keyword_judge(always="A", name="first_slot"),
    ]
    return out, evaluate_systems(systems, "a", judges, out, optional_judges=["reward_model"], **SMALL)


# ---------------------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("path", EVAL_CONFIGS, ids=lambda p: p.name)
def test_eval_yaml_parses_with_the_evaluation_parser(path):
    match = HEADER.match(path.read_text().splitlines()[0])
    assert match, f"{path.name}: first line must be the exact 'python eval/win_rate.py --config ...' command"
    assert match.group(1) == f"eval/configs/{path.name}"
    args, data_args = parse(CONFIG, ["--config", str(path)])
    assert args.base in {answers.split_spec(s)[0] for s in args.systems}
    for spec in args.judges:
        assert read_judge_config(answers.split_spec(spec)[0]).backend
    assert set(args.honeypot_kinds) <= set(HONEYPOT_KINDS) and data_args.dataset


def test_there_is_an_embedded_config_for_the_demo():
    args, _ = parse(CONFIG, ["--config", str(ROOT / "eval" / "configs" / "embedded.yaml")])
    assert args.systems[:2] == ["sft=runs/demo/sft", "dpo=runs/demo/dpo"] and args.base == "sft"
    assert args.judges == ["oracle", "reward_model=runs/demo/reward"]


def test_unknown_settings_fail(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("systems: [a=tiny-gpt2]\nbase: a\nn_promts: 3\n")
    with pytest.raises(ValueError, match="n_promts"):
        parse(CONFIG, ["--config", str(bad)])
    with pytest.raises(TypeError, match="n_promts"):
        evaluate_systems({"a": "tiny-gpt2"}, "a", ["oracle"], tmp_path, n_promts=3)


# ---------------------------------------------------------------------------------------------------------
# Small pieces


def test_comparison_plan_and_paired_tests_for_three_systems():
    plan = evaluation.comparison_plan(["sft", "dpo", "ppo"], "sft", all_pairs=True)
    assert plan == [
        ("sft", CHOSEN), ("dpo", CHOSEN), ("ppo", CHOSEN), ("dpo", "sft"), ("ppo", "sft"), ("ppo", "dpo"),
    ]  # fmt: skip
    assert evaluation.paired_plan(plan) == [
        ("dpo", "sft", CHOSEN), ("ppo", "sft", CHOSEN), ("ppo", "dpo", CHOSEN), ("ppo", "dpo", "sft"),
    ]  # fmt: skip
    assert len(evaluation.comparison_plan(["sft", "dpo", "ppo"], "sft", all_pairs=False)) == 5


def test_honeypots_are_corrupted_copies_of_the_chosen_answer():
    held = HeldOut(
        ["p1", "p2", "p3"],
        ["\n\nHuman: q1\n\nAssistant:", "\n\nHuman: q2\n\nAssistant:", "\n\nHuman: q3\n\nAssistant:"],
        [" one two three four five six seven eight", " alpha beta gamma", " Yes"],
        [],
    )
    pairs, skipped = audits.honeypots(held, 3, HONEYPOT_KINDS, seed=0)
    fakes = {(p.prompt_id, p.corruption): p.second for p in pairs}
    assert fakes[("p1", "truncated")] == " one two"
    assert sorted(fakes[("p1", "shuffled")].split()) == sorted(held.chosen[0].split())
    assert fakes[("p1", "shuffled")] != held.chosen[0] and fakes[("p1", "empty")] == ""
    assert fakes[("p1", "off_topic")] in held.chosen[1:]
    assert all(p.first == held.chosen[int(p.prompt_id[1]) - 1] and p.expected == "win" for p in pairs)
    assert skipped == {
        "honeypot truncated: answer too short to corrupt": 1,
        "honeypot shuffled: answer too short to corrupt": 1,
    }


def test_missing_base_is_an_error_and_unfinished_runs_are_skipped(tmp_path):
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "run_config.json").write_text("{}")
    notes = []
    args = EvalArgs(systems=[f"a={tmp_path / 'gone'}", "b=tiny-gpt2"], base="a")
    with pytest.raises(FileNotFoundError, match="base system a"):
        answers.resolve_systems(args, notes)
    args = EvalArgs(systems=["b=tiny-gpt2", f"t={tmp_path / 'training'}"], base="b")
    assert [s.name for s in answers.resolve_systems(args, notes)] == ["b"]
    assert "unfinished run" in notes[0]


# ---------------------------------------------------------------------------------------------------------
# End to end on tiny random models


def test_answers_are_saved_with_their_provenance(first_run, tiny_models):
    out, result = first_run
    rows = [json.loads(line) for line in (out / "generations" / "a.jsonl").read_text().splitlines()]
    assert len(rows) == result["n_prompts"] == SMALL["n_prompts"]
    assert {"prompt_id", "prompt", "answer", "model", "model_fingerprint", "generation", "seed"} <= set(
        rows[0]
    )
    assert rows[0]["model"] == tiny_models["a"] and rows[0]["generation"]["max_new_tokens"] == 8
    assert result["generated"] == {"a": SMALL["n_prompts"], "b": SMALL["n_prompts"]}


def test_missing_system_and_judge_are_skipped_with_a_note(first_run):
    out, result = first_run
    assert set(result["systems"]) == {"a", "b"} and set(result["judges"]) == {"oracle", "first_slot"}
    assert any(n.startswith("system c skipped") for n in result["notes"])
    assert any(n.startswith("judge reward_model skipped") for n in result["notes"])
    assert "judge reward_model skipped" in (out / "oracle" / "report.md").read_text()


def test_oracle_report_has_every_comparison_and_a_trustworthy_audit(first_run):
    out, result = first_run
    oracle = result["judges"]["oracle"]
    pairs = [(c["system"], c["baseline"]) for c in oracle["comparisons"]]
    assert pairs == [("a", CHOSEN), ("b", CHOSEN), ("b", "a")]
    for c in oracle["comparisons"][:2]:  # random byte soup never beats a correct answer
        assert c["counts"] == {"win": 0, "tie": 0, "loss": SMALL["n_prompts"]} and c["win_rate"] == 0.0
    assert oracle["paired"][0]["system_a"] == "b" and oracle["paired"][0]["n"] == SMALL["n_prompts"]
    assert set(oracle["ranking"]["ratings"]) == {"a", "b", CHOSEN} and oracle["ranking"]["anchor"] == "a"
    audit = oracle["audit"]
    assert (
        audit["n_human"] == SMALL["n_human"]
        and audit["human_accuracy"] == 1.0
        and audit["human_kappa"] == 1.0
    )
    assert (
        audit["flip_rate"] == 0.0 and audit["first_slot_rate"] == 0.5 and audit["parse_failure_rate"] == 0.0
    )
    checks = {
        c["name"]: c["passed"]
        for c in json.loads((out / "oracle" / "results.json").read_text())["audit_checks"]
    }
    assert (
        checks["flip_rate"]
        and checks["first_slot_rate"]
        and checks["human_kappa"]
        and checks["n_intransitive"]
    )
    for name in ("report.md", "report.html", "results.json", "judgments.csv", "audit_judgments.jsonl"):
        assert (out / "oracle" / name).stat().st_size > 0


def test_judgments_hold_the_judges_slot_answers(first_run):
    out, _ = first_run
    rows = [j for j in read_judgments(out / "oracle" / "judgments.csv") if j.baseline == CHOSEN]
    # chosen wins both orders: shown second it is slot B, shown first it is slot A
    assert {(j.first_order_verdict, j.swapped_order_verdict) for j in rows} == {("B", "A")}
    biased = read_judgments(out / "first_slot" / "judgments.csv")
    assert {(j.first_order_verdict, j.swapped_order_verdict, j.verdict) for j in biased} == {
        ("A", "A", "tie")
    }


def test_first_slot_biased_judge_is_flagged(first_run):
    out, result = first_run
    audit = result["judges"]["first_slot"]["audit"]
    assert audit["first_slot_rate"] == 1.0 and audit["flip_rate"] == 1.0 and audit["first_slot_p"] < 1e-6
    checks = {
        c["name"]: c["passed"]
        for c in json.loads((out / "first_slot" / "results.json").read_text())["audit_checks"]
    }
    assert checks["first_slot_rate"] is False and checks["flip_rate"] is False
    assert all(c["win_rate"] == 0.5 for c in result["judges"]["first_slot"]["comparisons"])
    assert re.search(
        r"\| first_slot_rate \| 1\.000 \| 0\.4 to 0\.6 \| FAIL \|",
        (out / "first_slot" / "report.md").read_text(),
    )


def test_rerun_of_a_finished_evaluation_makes_no_judge_calls_and_no_generations(
    first_run, tiny_models, monkeypatch
):
    out, result = first_run
    generated = []
    real_generate = answers.generate_answers
    monkeypatch.setattr(
        answers, "generate_answers", lambda *a, **k: generated.append(a) or real_generate(*a, **k)
    )
    judge = keyword_judge(always="A", name="first_slot")
    again = evaluate_systems(
        {**tiny_models, "c": str(out / "not_trained_yet")}, "a", ["oracle", judge], out, **SMALL
    )
    assert generated == [] and again["generated"] == {"a": 0, "b": 0}
    assert again["judge_calls"] == {"oracle": 0, "first_slot": 0} and judge.stats.calls == 0
    assert again["judges"]["oracle"]["comparisons"] == result["judges"]["oracle"]["comparisons"]
    # more prompts: only the new ones are generated and judged
    more = evaluate_systems(
        tiny_models, "a", ["oracle"], out, **{**SMALL, "n_prompts": 24, "embedded_test_size": 40}
    )
    assert (
        more["generated"] == {"a": more["n_prompts"] - 20, "b": more["n_prompts"] - 20}
        and more["n_prompts"] > 20
    )


# ---------------------------------------------------------------------------------------------------------
# Audits that must catch a bad judge (precomputed answers: no model needed)


@pytest.fixture(scope="module")
def synthetic_dataset(tmp_path_factory):
    """A preference set with 240 distinct held-out prompts (more than the embedded task's ~120)."""
    folder = tmp_path_factory.mktemp("synthetic")
    rows = [
        {
            "prompt": f"Tell me fact number {i}.",
            "chosen": f"Fact {i} is that {i} is a number.",
            "rejected": "No.",
        }
        for i in range(260)
    ]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:20]))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[20:]))
    return {"dataset": str(folder), "dataset_format": "preference"}


def test_length_loving_judge_moves_the_raw_but_not_the_length_controlled_win_rate(
    tmp_path, synthetic_dataset
):
    held = answers.held_out(EvalArgs(n_prompts=240), DataArgs(**synthetic_dataset))
    rng = random.Random(0)
    long = write_answers(tmp_path / "long.jsonl", held.prompts, lambda i, p: " " + "x" * rng.randint(20, 140))
    short = write_answers(
        tmp_path / "short.jsonl", held.prompts, lambda i, p: " " + "y" * rng.randint(10, 90)
    )
    settings = {**SMALL, **synthetic_dataset, "n_prompts": 240, "n_boot": 500}
    result = evaluate_systems(
        {"short": short, "long": long}, "short", [length_loving()], tmp_path, **settings
    )
    (summary,) = [c for c in result["judges"]["length_loving"]["comparisons"] if c["baseline"] == "short"]
    lc = summary["length_controlled"]
    assert summary["n"] == 240 and summary["win_rate"] > 0.65 and summary["ci_low"] > 0.5  # raw: long "wins"
    assert (
        lc["method"] == "logistic" and lc["ci_low"] < 0.5 < lc["ci_high"] and abs(lc["estimate"] - 0.5) < 0.1
    )
    assert lc["length_coef"] > 0


def test_honeypots_pass_with_the_oracle_and_fail_with_a_random_judge(tmp_path):
    held = small_held_out()
    copy = write_answers(tmp_path / "copy.jsonl", held.prompts, lambda i, p: held.chosen[i])
    settings = {**SMALL, "honeypot_kinds": ["empty", "off_topic"]}
    result = evaluate_systems({"copy": copy}, "copy", ["oracle", coin_flip_judge()], tmp_path, **settings)
    oracle, random_judge = result["judges"]["oracle"]["audit"], result["judges"]["random"]["audit"]
    assert oracle["honeypot_pass_rate"] == 1.0 and oracle["n_honeypots"] == 2 * SMALL["n_honeypots"]
    assert random_judge["honeypot_pass_rate"] < 0.5
    checks = json.loads((tmp_path / "random" / "results.json").read_text())["audit_checks"]
    assert {c["name"]: c["passed"] for c in checks}["honeypot_pass_rate"] is False
    assert random_judge["flip_rate"] > 0.3 and random_judge["human_kappa"] < 0.4


def test_exact_oracle_passes_every_honeypot_kind(tmp_path):
    """The embedded oracle checks the task's whole sentence, so truncated and word-shuffled copies of a
    good answer lose as surely as empty and off-topic ones."""
    held = small_held_out()
    copy = write_answers(tmp_path / "copy.jsonl", held.prompts, lambda i, p: held.chosen[i])
    result = evaluate_systems({"copy": copy}, "copy", ["oracle"], tmp_path, **SMALL)
    by_kind = result["judges"]["oracle"]["audit"]["honeypot_pass_rate_by_kind"]
    assert by_kind == {"truncated": 1.0, "shuffled": 1.0, "empty": 1.0, "off_topic": 1.0}


def test_cyclic_preferences_are_counted_as_intransitive(tmp_path):
    held = small_held_out()
    systems = {
        name: write_answers(tmp_path / f"{name}.jsonl", held.prompts, lambda i, p, n=name: " " + n)
        for name in ("rock", "paper", "scissors")
    }
    result = evaluate_systems(systems, "rock", [rock_paper_scissors()], tmp_path, **SMALL)
    rps = result["judges"]["rps"]
    assert rps["audit"]["n_intransitive"] == 1 and rps["ranking"]["transitivity"]["n_triads"] == 1
    ratings = rps["ranking"]["ratings"]
    assert max(abs(ratings[n] - 1000.0) for n in ("paper", "scissors")) < 1e-6  # a cycle: all equal
    assert "FAIL" in (tmp_path / "rps" / "report.md").read_text().split("n_intransitive")[1].splitlines()[0]


def test_pairs_without_a_parseable_verdict_are_skipped_and_counted(tmp_path):
    held = small_held_out()
    copy = write_answers(tmp_path / "copy.jsonl", held.prompts, lambda i, p: held.chosen[i])
    judge = keyword_judge(keyword="Hello", fail_marker="plus", name="flaky")
    result = evaluate_systems({"copy": copy}, "copy", [judge], tmp_path, **SMALL)
    n_plus = sum("plus" in p for p in held.prompts)
    flaky = result["judges"]["flaky"]
    assert n_plus > 0 and flaky["skipped"]["copy vs chosen: both orders unparseable"] == n_plus
    assert flaky["comparisons"][0]["n"] == len(held.prompts) - n_plus
    audit = flaky["audit"]
    unparseable = sum(
        n for reason, n in flaky["skipped"].items() if reason.endswith("both orders unparseable")
    )
    assert audit["n_pairs_unparseable"] == unparseable > n_plus  # honeypots and labelled pairs too
    assert audit["parse_failure_rate"] == pytest.approx(unparseable / audit["n_pairs_judged"])
    assert "copy vs chosen: both orders unparseable" in (tmp_path / "flaky" / "report.md").read_text()


# ---------------------------------------------------------------------------------------------------------
# Several processes, best-of-N


@pytest.mark.slow
def test_two_processes_split_generation_and_match_one_process(tiny_models, tmp_path):
    """Under torchrun with 2 ranks each answers half the prompts; the gathered file is in prompt order and
    greedy answers equal the one-process ones."""
    config = tmp_path / "two.yaml"
    settings = {**SMALL, "n_prompts": 9, "n_honeypots": 2, "n_human": 2}
    lines = [
        f"systems: [b={tiny_models['b']}]",
        "base: b",
        "judges: [oracle]",
        f"output_dir: {tmp_path / 'two'}",
    ]
    config.write_text("\n".join(lines + [f"{k}: {v}" for k, v in settings.items()]) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "eval/win_rate.py"]
    subprocess.run(command + ["--config", str(config)], check=True, cwd=ROOT, env=env, capture_output=True)
    two = [
        json.loads(line) for line in (tmp_path / "two" / "generations" / "b.jsonl").read_text().splitlines()
    ]
    one = evaluate_systems({"b": tiny_models["b"]}, "b", ["oracle"], tmp_path / "one", **settings)
    held = small_held_out(n_prompts=9)
    assert [r["prompt"] for r in two] == held.prompts and {r["num_processes"] for r in two} == {2}
    ones = [
        json.loads(line)["answer"]
        for line in (tmp_path / "one" / "generations" / "b.jsonl").read_text().splitlines()
    ]
    assert [r["answer"] for r in two] == ones and one["generated"] == {"b": 9}
    assert (tmp_path / "two" / "oracle" / "report.html").exists()


def test_best_of_n_system_uses_align_kit_rewards(tiny_models, tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    reward_dir = tmp_path / "reward"
    config = GPT2Config(
        vocab_size=258, n_positions=256, n_embd=32, n_layer=1, n_head=2, num_labels=1, pad_token_id=257
    )
    GPT2ForSequenceClassification(config).save_pretrained(reward_dir)
    build_byte_tokenizer().save_pretrained(reward_dir)
    settings = {
        **SMALL,
        "best_of_n_policy": tiny_models["a"],
        "best_of_n_reward_model": str(reward_dir),
        "best_of_n_n": 3,
    }
    judges = ["oracle", f"reward_model={reward_dir}"]
    result = evaluate_systems({"a": tiny_models["a"]}, "a", judges, tmp_path / "out", **settings)
    assert result["generated"] == {"a": SMALL["n_prompts"], "best_of_n": SMALL["n_prompts"]}
    rows = [
        json.loads(line)
        for line in (tmp_path / "out" / "generations" / "best_of_n.jsonl").read_text().splitlines()
    ]
    assert rows[0]["generation"]["best_of_n"] == 3 and rows[0]["model"] == tiny_models["a"]
    # the same calls made directly, one per generation batch (seed + batch number), give the same answers
    from align_kit.configs import ModelArgs
    from align_kit.models.loading import load_model, load_tokenizer

    reward = models.load_reward_model(str(reward_dir), pad_token_id=257)
    policy, tokenizer = (
        load_model(ModelArgs(model_name_or_path=tiny_models["a"])),
        load_tokenizer(tiny_models["a"]),
    )
    prompts, size, direct = [r["prompt"] for r in rows], SMALL["batch_size"], []
    for number, start in enumerate(range(0, len(prompts), size)):
        direct += generation.best_of_n(
            policy, tokenizer, rewards.reward_scorer(reward, build_byte_tokenizer()), prompts[start : start + size],
            3, max_new_tokens=SMALL["max_new_tokens"], batch_size=size, seed=number,
        )  # fmt: skip
    assert [r["answer"] for r in rows] == direct
    assert set(result["judges"]) == {"oracle", "reward_model"}
    assert any("optimistic" in note for note in result["notes"])


# ---------------------------------------------------------------------------------------------------------
# Trust first, and an evaluation that always finishes (answers from files: no model needed)


def copy_of_chosen(tmp_path, **overrides):
    """A system whose answers are the chosen ones, on the small held-out set."""
    held = small_held_out(**overrides)
    return held, write_answers(tmp_path / "copy.jsonl", held.prompts, lambda i, p: held.chosen[i])


def test_reports_open_with_the_judges_verdict_random_fails_and_oracle_passes(tmp_path, monkeypatch, capsys):
    from align_kit import demo

    held, copy = copy_of_chosen(tmp_path)
    result = evaluate_systems({"copy": copy}, "copy", ["oracle", coin_flip_judge()], tmp_path, **SMALL)
    logged = capsys.readouterr().out
    lines = (tmp_path / "random" / "report.md").read_text().splitlines()
    assert lines[0] == "# Win-rate report" and lines[2].startswith(
        "**Judge random: These win rates are not evidence"
    )
    failed = [line for line in lines[3:9] if ": FAIL (allowed" in line]
    assert {line.split(" = ")[0].lstrip("- ") for line in failed} >= {
        "honeypot_pass_rate",
        "flip_rate",
        "human_kappa",
    }
    trust = result["judges"]["random"]["trust"]
    assert trust["evidence"] is False and result["evidence"] == {"oracle": True, "random": False}
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert saved["judges"]["random"]["trust"]["evidence"] is False and saved["evidence"]["oracle"] is True
    oracle = (tmp_path / "oracle" / "report.md").read_text().splitlines()
    assert oracle[2] == "**Judge oracle: The judge passed every audit.**" and oracle[3] == ""
    assert (
        "FAIL" not in "\n".join(oracle[:4])
        and "not evidence" not in (tmp_path / "oracle" / "report.md").read_text()
    )
    html = (tmp_path / "random" / "report.html").read_text()
    assert html.index('<div class="verdict bad">') < html.index("<table>") and "flip_rate = " in html
    assert '<div class="verdict good">' in (tmp_path / "oracle" / "report.html").read_text()
    # the console says it before any win rate, and so does the demo's summary
    assert logged.index("Judge random: These win rates are not evidence") < logged.index(
        "random: copy beats chosen"
    )
    monkeypatch.setattr(demo, "OUT", tmp_path)
    (tmp_path / "reward").mkdir()
    (tmp_path / "reward" / "metrics.json").write_text(json.dumps({"held_out": {"accuracy": 0.5}}))
    demo.summary(tmp_path, {})
    printed = capsys.readouterr().out
    assert printed.index("random: These win rates are not evidence") < printed.index("judged win rates")
    assert "oracle: The judge passed every audit." in printed


def test_a_judge_that_never_parses_still_gets_a_report_with_na_and_its_raw_answers(tmp_path):
    from align_kit.judges.protocol import Reply

    held, copy = copy_of_chosen(tmp_path)
    mumbler = ScriptedJudge(lambda item: Reply(None, text=f"Hmm <{len(item.answer_a)}> maybe"), "mumbler", 64)
    result = evaluate_systems({"copy": copy}, "copy", [mumbler], tmp_path, **SMALL)
    judged = result["judges"]["mumbler"]
    (comparison,) = judged["comparisons"]
    assert comparison["n"] == 0 and comparison["win_rate"] is None
    assert (
        comparison["note"]
        == f"no decided pairs: {len(held.prompts)} of {len(held.prompts)} unparseable in both orders"
    )
    assert judged["ranking"]["ratings"] == {} and judged["ranking"]["note"].startswith("no ratings")
    assert judged["trust"]["evidence"] is False and "parse_failure_rate" in judged["trust"]["failed"]
    text = (tmp_path / "mumbler" / "report.md").read_text()
    assert "copy vs chosen: n/a (no decided pairs" in text and "Ratings: n/a (no ratings" in text
    rows = (tmp_path / "mumbler" / "judgments.csv").read_text().splitlines()
    assert len(rows) == 1 + len(held.prompts) and read_judgments(tmp_path / "mumbler" / "judgments.csv") == []
    assert f"Hmm <{len(held.chosen[0])}> maybe" in rows[1]
    assert judged["unparseable"]["total"] == 2 * judged["audit"]["n_pairs_judged"]
    html = (tmp_path / "mumbler" / "report.html").read_text()
    assert "Unparseable judge answers" in html and "Hmm &lt;" in html and "Hmm <" not in html
    assert (
        json.loads((tmp_path / "evaluation.json").read_text())["judges"]["mumbler"]["comparisons"][0]["n"]
        == 0
    )


def test_judgments_csv_holds_the_judges_raw_text_and_the_gallery_shows_it(tmp_path):
    from align_kit.judges.protocol import Reply

    held, copy = copy_of_chosen(tmp_path)
    terse = write_answers(tmp_path / "terse.jsonl", held.prompts, lambda i, p: " No.")

    def verbose_judge(item):
        verdict = "A" if len(item.answer_a) > len(item.answer_b) else "B"
        return Reply(verdict, text=f"Output ({verdict.lower()})", rationale="the longer one says more")

    judge = ScriptedJudge(verbose_judge, "talker", 64)
    evaluate_systems({"copy": copy, "terse": terse}, "copy", [judge], tmp_path, **SMALL)
    rows = [j for j in read_judgments(tmp_path / "talker" / "judgments.csv") if j.system == "terse"]
    assert rows and {(j.first_order_text, j.swapped_order_text) for j in rows if j.baseline == CHOSEN} == {
        ("Output (b)", "Output (a)")
    }
    assert {j.first_order_rationale for j in rows} == {"the longer one says more"}
    assert "system shown first: Output (b)" in (tmp_path / "talker" / "report.html").read_text()
    again = ScriptedJudge(verbose_judge, "talker", 64)  # from the cache: the texts come back too
    evaluate_systems({"copy": copy, "terse": terse}, "copy", [again], tmp_path, **SMALL)
    assert again.stats.calls == 0
    assert read_judgments(tmp_path / "talker" / "judgments.csv")[0].first_order_text is not None


def test_average_rule_scores_a_win_in_one_order_and_a_tie_in_the_other_as_three_quarters(tmp_path):
    held, copy = copy_of_chosen(tmp_path)
    better = write_answers(
        tmp_path / "better.jsonl", held.prompts, lambda i, p: held.chosen[i] + " Glad to help!"
    )

    def leaning(item):  # picks the system shown first, calls it a tie when shown second
        return "A" if "Glad" in item.answer_a else "tie"

    results = {}
    for rule in ("strict", "average"):
        judge = ScriptedJudge(leaning, f"leaning_{rule}", 64, identity="leaning:v1")
        out = evaluate_systems(
            {"copy": copy, "better": better}, "copy", [judge], tmp_path / rule, combine_orders=rule, **SMALL
        )
        results[rule] = out["judges"][f"leaning_{rule}"]
    strict, average = ({(c["system"], c["baseline"]): c for c in r["comparisons"]} for r in results.values())
    assert strict[("better", "copy")]["win_rate"] == 0.5 and average[("better", "copy")]["win_rate"] == 0.75
    assert strict[("better", "copy")]["counts"] == average[("better", "copy")]["counts"] == {
        "win": 0, "tie": len(held.prompts), "loss": 0,
    }  # fmt: skip
    paired = {(p["system_a"], p["system_b"], p["baseline"]): p for p in results["average"]["paired"]}
    assert paired[("better", "copy", CHOSEN)]["mean_diff"] == pytest.approx(0.25)
    ratings = results["average"]["ranking"]["ratings"]
    n = len(held.prompts)  # 0.75 : 0.25 of the games, plus the 0.1 prior game split as a tie
    assert ratings["better"] - ratings["copy"] == pytest.approx(
        400 * math.log10((0.75 * n + 0.05) / (0.25 * n + 0.05))
    )
    assert results["strict"]["ranking"]["ratings"]["better"] == pytest.approx(1000.0)
    text = (tmp_path / "average" / "leaning_average" / "report.md").read_text()
    assert "| combine orders | average |" in text and "scored by the average (Arena-Hard)" in text
    assert "scored by the strict" in (tmp_path / "strict" / "leaning_strict" / "report.md").read_text()


def test_every_comparison_is_reported_per_group(tmp_path):
    rows = [
        {
            "prompt": f"Question {i}?",
            "chosen": f"Answer {i}.",
            "rejected": "No.",
            "subset": ["helpful", "harmless"][i % 2],
        }
        for i in range(40)
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[10:]))
    data = {"dataset": str(tmp_path), "dataset_format": "preference"}
    held = answers.held_out(EvalArgs(n_prompts=30, group_column="subset"), DataArgs(**data))
    assert held.groups == ["helpful", "harmless"] * 15
    good = write_answers(
        tmp_path / "good.jsonl", held.prompts, lambda i, p: held.chosen[i] + (" !" if i % 2 else "")
    )
    judge = keyword_judge(
        keyword="!", name="bang"
    )  # prefers the answer with '!': only the harmless half has one
    settings = {**SMALL, **data, "n_prompts": 30, "group_column": "subset"}
    result = evaluate_systems({"good": good}, "good", [judge], tmp_path / "out", **settings)
    groups = {c["group"]: c for c in result["judges"]["bang"]["by_group"]["comparisons"]}
    assert set(groups) == {"harmless", "helpful"} and groups["harmless"]["n"] == groups["helpful"]["n"] == 15
    assert groups["harmless"]["win_rate"] == 1.0 and groups["helpful"]["win_rate"] == 0.5
    assert result["judges"]["bang"]["comparisons"][0]["win_rate"] == 0.75
    text = (tmp_path / "out" / "bang" / "report.md").read_text()
    assert (
        "## By group (subset)" in text and "| harmless | good | chosen | 15 | 15 / 0 / 0 | 100.0% |" in text
    )


def test_judge_traffic_is_reported_and_a_limping_run_is_flagged(tmp_path):
    from dataclasses import dataclass

    from align_kit.judges.protocol import JudgeStats

    @dataclass
    class CostlyStats(JudgeStats):  # a field the HTTP judge may add later: rendered like the others
        cost_usd: float = 0.0

    class Limping(ScriptedJudge):
        def judge_batch(self, items):
            self.stats.requests += 2 * len(items)  # every pair needed one retry
            self.stats.retries += len(items)
            self.stats.timeouts += len(items)
            self.stats.cost_usd += 0.001 * len(items)
            return super().judge_batch(items)

    held, copy = copy_of_chosen(tmp_path)
    judge = Limping(lambda item: "A" if item.answer_a.strip() else "B", "limping", 64)
    judge.stats = CostlyStats()
    result = evaluate_systems({"copy": copy}, "copy", [judge], tmp_path, **SMALL)
    traffic = result["judges"]["limping"]["traffic"]
    calls = result["judge_calls"]["limping"]
    assert traffic["counts"]["requests"] == 2 * calls and traffic["counts"]["retries"] == calls
    assert (
        traffic["flagged"]
        and traffic["retry_rate"] == 0.5
        and traffic["counts"]["cost_usd"] == pytest.approx(0.001 * calls)
    )
    lines = (tmp_path / "limping" / "report.md").read_text().splitlines()
    flag = next(line for line in lines[:12] if "judge traffic" in line)
    assert f"{calls} of {2 * calls} requests retried (50%, over the 5% threshold; {calls} timeouts)" in flag
    assert "| cost_usd |" in "\n".join(lines) and "| timeouts | " + str(calls) + " |" in "\n".join(lines)


def test_a_judge_that_dies_mid_run_gets_a_report_and_the_others_finish(tmp_path):
    class Dying(ScriptedJudge):
        def judge_batch(self, items):
            if self.stats.calls >= 8:
                raise ConnectionError("server went away")
            return super().judge_batch(items)

    held, copy = copy_of_chosen(tmp_path)
    dying = Dying(lambda item: "A", "dying", batch_size=4)
    with pytest.raises(evaluation.JudgeFailed, match="judge dying: ConnectionError: server went away"):
        evaluate_systems({"copy": copy}, "copy", [dying, "oracle"], tmp_path, **SMALL)
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert saved["judges"]["dying"]["error"] == "ConnectionError: server went away"
    assert saved["judges"]["oracle"]["comparisons"][0]["n"] == len(held.prompts)
    report = (tmp_path / "dying" / "report.md").read_text().splitlines()
    assert report[2] == "**Judge dying could not finish: no win rates.**" and "server went away" in report[4]
    cached = [json.loads(line) for line in (tmp_path / "judge_cache.jsonl").read_text().splitlines()]
    assert sum(line["judge"] == "dying" for line in cached) == 8  # the two finished batches are kept


# ---------------------------------------------------------------------------------------------------------
# Judges checked before anything is generated; judge settings from the command line


def closed_port() -> int:
    import socket

    with socket.socket() as probe:  # bound then closed: nothing listens there afterwards
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_judge_without_its_key_stops_the_evaluation_before_generation(tmp_path, tiny_models, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    generated = []
    monkeypatch.setattr(answers, "generate_answers", lambda *a, **k: generated.append(a) or iter(()))
    port = closed_port()
    overrides = {"openai_pairwise": {"base_url": f"http://127.0.0.1:{port}/v1"}}
    judges = ["oracle", "openai_pairwise", f"reward_model={tmp_path / 'no_reward'}"]
    with pytest.raises(judge_setup.JudgeSetupError) as caught:
        evaluate_systems({"a": tiny_models["a"]}, "a", judges, tmp_path, judge_overrides=overrides, **SMALL)
    lines = str(caught.value).splitlines()
    assert lines[1:] == [
        "  judge openai_pairwise: set the environment variable OPENAI_API_KEY (its API key)",
        f"  judge openai_pairwise: nothing listening at 127.0.0.1:{port} (http://127.0.0.1:{port}/v1): Connection refused",
        f"  judge reward_model: its model {tmp_path / 'no_reward'} does not exist or is unfinished",
    ]
    assert generated == [] and not (tmp_path / "generations").exists()
    # marked optional, the same judges are left out with a note and the evaluation runs
    held, copy = copy_of_chosen(tmp_path)
    result = evaluate_systems(
        {"copy": copy}, "copy", judges, tmp_path, judge_overrides=overrides,
        optional_judges=["openai_pairwise", "reward_model"], **SMALL,
    )  # fmt: skip
    assert set(result["judges"]) == {"oracle"}
    assert any(
        n.startswith("judge openai_pairwise skipped: set the environment variable") for n in result["notes"]
    )
    with pytest.raises(judge_setup.JudgeSetupError, match="optional_judges names"):
        evaluate_systems({"copy": copy}, "copy", ["oracle"], tmp_path, optional_judges=["orcale"], **SMALL)


def test_endpoint_check_accepts_a_listening_port_within_its_bound():
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert judge_setup.endpoint_problem(f"http://127.0.0.1:{server.getsockname()[1]}/v1", 2.0) is None
    assert "names no host" in judge_setup.endpoint_problem("not a url", 1.0)


def test_judge_model_and_dtype_from_the_command_line(tiny_model_dir):
    import torch

    argv = ["--systems", "a=tiny-gpt2", "--base", "a", "--judges", "oracle", "local_hf_pairwise"]
    argv += ["--judge_model", str(tiny_model_dir), "--judge_dtype", "bfloat16"]
    argv += [
        "--judge_overrides",
        json.dumps({"local_hf_pairwise": {"use_chat_template": False, "batch_size": 2}}),
    ]
    args, _ = parse(CONFIG, argv)
    oracle, local = judge_setup.prepare_judges(args.judges, args, [])
    assert oracle.config.torch_dtype == "float32"  # judge_dtype is for local models only
    assert (local.config.model, local.config.torch_dtype, local.config.batch_size) == (
        str(tiny_model_dir),
        "bfloat16",
        2,
    )
    local.text(PairItem("\n\nHuman: Hi\n\nAssistant:", " Hello", " Go away"))  # loads the model
    assert local.lm.dtype == torch.bfloat16 and local.lm.name_or_path == str(tiny_model_dir)
    (auto,) = judge_setup.prepare_judges(
        ["local_hf_pairwise"], dataclasses.replace(args, judge_dtype="auto", judge_overrides=None), []
    )
    assert auto.config.torch_dtype == "float32" or torch.cuda.is_available()  # auto on a CPU
    clash = dataclasses.replace(args, judge_overrides={"local_hf_pairwise": {"torch_dtype": "float16"}})
    with pytest.raises(judge_setup.JudgeSetupError, match="torch_dtype.*set both"):
        judge_setup.prepare_judges(["local_hf_pairwise"], clash, [])
    several = dataclasses.replace(args, judges=["local_hf_pairwise", "openai_pairwise"])
    with pytest.raises(judge_setup.JudgeSetupError, match="judge_model applies to one judge"):
        judge_setup.prepare_judges(several.judges, several, [])


# ---------------------------------------------------------------------------------------------------------
# A crash loses at most one batch of generations


def test_a_crash_in_generation_keeps_finished_batches_and_the_rerun_generates_the_rest(
    first_run, tiny_models, tmp_path, monkeypatch
):
    real, calls = generation.generate, []

    def crash_on_second_batch(model, tokenizer, prompts, **kwargs):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(generation, "generate", crash_on_second_batch)
    with pytest.raises(RuntimeError, match="out of memory"):
        evaluate_systems({"b": tiny_models["b"]}, "b", ["oracle"], tmp_path, **SMALL)
    path = tmp_path / "generations" / "b.jsonl"
    assert len(path.read_text().splitlines()) == SMALL["batch_size"]  # the first batch survived
    calls.clear()
    monkeypatch.setattr(generation, "generate", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    result = evaluate_systems({"b": tiny_models["b"]}, "b", ["oracle"], tmp_path, **SMALL)
    assert result["generated"] == {"b": SMALL["n_prompts"] - SMALL["batch_size"]} and sum(calls) == 12
    out, _ = first_run  # greedy: the same answers as the uninterrupted run (which a test may have extended)
    rows = {"uninterrupted": out / "generations" / "b.jsonl", "resumed": path}
    by_prompt = {
        k: {json.loads(line)["prompt"]: json.loads(line)["answer"] for line in p.read_text().splitlines()}
        for k, p in rows.items()
    }
    prompts = small_held_out().prompts
    assert [by_prompt["resumed"][p] for p in prompts] == [by_prompt["uninterrupted"][p] for p in prompts]


# ---------------------------------------------------------------------------------------------------------
# A leaderboard across runs


def longer_is_better(name="longer", identity="longer:v1"):
    def verdict(item):
        a, b = len(item.answer_a.strip()), len(item.answer_b.strip())
        return "A" if a > b else "B" if b > a else "tie"

    return ScriptedJudge(verdict, name, 64, identity=identity)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two evaluations on the same prompts by the same judge: run one has copy and terse, run two copy
    (the same file) and verbose."""
    root = tmp_path_factory.mktemp("runs")
    held = small_held_out()
    copy = write_answers(root / "copy.jsonl", held.prompts, lambda i, p: held.chosen[i])
    terse = write_answers(root / "terse.jsonl", held.prompts, lambda i, p: " Ok.")
    verbose = write_answers(
        root / "verbose.jsonl", held.prompts, lambda i, p: held.chosen[i] + " More words here."
    )
    evaluate_systems({"copy": copy, "terse": terse}, "copy", [longer_is_better()], root / "one", **SMALL)
    evaluate_systems({"copy": copy, "verbose": verbose}, "copy", [longer_is_better()], root / "two", **SMALL)
    return root, held


def test_leaderboard_merges_runs_that_share_a_judge_and_prompts(two_runs, capsys):
    from align_kit import cli
    from align_kit.evaluation import leaderboard

    root, held = two_runs
    out = root / "board"
    argv = ["leaderboard", "--runs", str(root / "one"), str(root / "two"), "--output_dir", str(out)]
    board = cli.main(argv + ["--n_boot", "200"])
    printed = capsys.readouterr().out
    order = [s["system"] for s in board["systems"]]
    assert order == ["verbose", "copy", "chosen", "terse"] or order == ["verbose", "chosen", "copy", "terse"]
    by_name = {s["system"]: s for s in board["systems"]}
    assert by_name["copy"]["runs"] == [str(root / "one"), str(root / "two")]  # one system, seen in both
    assert by_name["verbose"]["win_rate_vs_chosen"] == 1.0 and by_name["terse"]["win_rate_vs_chosen"] == 0.0
    assert by_name["copy"]["win_rate_vs_chosen"] == 0.5 and by_name["chosen"]["rating"] == 1000.0
    low, high = by_name["verbose"]["rating_ci"]
    assert low <= by_name["verbose"]["rating"] <= high and by_name["terse"]["rating_ci"][1] < 1000.0
    assert board["duplicates_dropped"] == len(held.prompts)  # copy vs chosen was judged in both runs
    assert [a["run"] for a in board["audits"]] == board["runs"] and len(board["audits"][0]["checks"]) == 6
    text = (out / "leaderboard.md").read_text()
    assert text.splitlines()[2].startswith("**Judge longer:") and "| 1 | verbose | two |" in text
    assert "| 4 | terse | one |" in text and "## Audits of each run" in text and text in printed
    assert json.loads((out / "leaderboard.json").read_text())["systems"][0]["system"] == "verbose"
    assert '<img class="plot"' in (out / "leaderboard.html").read_text()
    assert leaderboard.build([root / "one", root / "two"], n_boot=200)["systems"] == board["systems"]


def test_leaderboard_refuses_other_judges_and_other_prompts(two_runs, tmp_path):
    from align_kit.evaluation import leaderboard

    root, held = two_runs
    copy = str(root / "copy.jsonl")
    other_judge = longer_is_better(identity="longer:v2")  # same name, another judge
    evaluate_systems({"copy": copy}, "copy", [other_judge], tmp_path / "judge", **SMALL)
    with pytest.raises(leaderboard.LeaderboardError, match="judge longer is not the same judge in every run"):
        leaderboard.build([root / "one", tmp_path / "judge"])
    fewer = {**SMALL, "n_prompts": 15}
    evaluate_systems({"copy": copy}, "copy", [longer_is_better()], tmp_path / "prompts", **fewer)
    with pytest.raises(leaderboard.LeaderboardError, match="other held-out prompts .*5 only in the other"):
        leaderboard.build([root / "one", tmp_path / "prompts"])
    evaluate_systems({"copy": copy}, "copy", ["oracle"], tmp_path / "oracle", **SMALL)
    with pytest.raises(leaderboard.LeaderboardError, match="share no judge; choose one with --judge"):
        leaderboard.build([root / "one", tmp_path / "oracle"])
    with pytest.raises(SystemExit):  # the command says why in one line and exits with status 2
        leaderboard.main(["--runs", str(root / "one"), str(tmp_path / "oracle")])
