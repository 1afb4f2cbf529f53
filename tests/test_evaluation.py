"""Protects the judged evaluation end to end (align_kit/evaluation.py, answers.py, audits.py,
eval/win_rate.py): answers are generated once and reused, a finished evaluation reruns with zero judge calls
and zero generations, the judge's single-order answers reach the audit in slot terms, and each audit catches
the judge it is meant to catch: a first-slot-biased judge, a length-loving judge (raw rate moves, length-
controlled does not), a random judge on honeypots, a cyclic judge on transitivity, and a judge whose output
does not parse."""

from __future__ import annotations

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

from align_kit import answers, audits, evaluation, generation, models, rewards
from align_kit.answers import CHOSEN, HeldOut
from align_kit.configs import HONEYPOT_KINDS, DataArgs, EvalArgs, parse
from align_kit.evaluation import CONFIG, evaluate_systems
from align_kit.judges import read_judge_config
from align_kit.models import TinyGPT2Shape, build_byte_tokenizer, build_tiny_gpt2
from align_kit.reports import read_judgments

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
    return out, evaluate_systems(systems, "a", judges, out, **SMALL)


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
    # the same call made directly gives the same answers
    from align_kit.configs import ModelArgs
    from align_kit.models import load_model, load_tokenizer

    reward = models.load_reward_model(str(reward_dir), pad_token_id=257)
    direct = generation.best_of_n(
        load_model(ModelArgs(model_name_or_path=tiny_models["a"])), load_tokenizer(tiny_models["a"]),
        rewards.reward_scorer(reward, build_byte_tokenizer()), [r["prompt"] for r in rows], 3,
        max_new_tokens=SMALL["max_new_tokens"], batch_size=SMALL["batch_size"], seed=0,
    )  # fmt: skip
    assert [r["answer"] for r in rows] == direct
    assert set(result["judges"]) == {"oracle", "reward_model"}
    assert any("optimistic" in note for note in result["notes"])
