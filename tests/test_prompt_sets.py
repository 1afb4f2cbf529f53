"""Protects evaluation on benchmark prompt sets (align_kit/data/prompt_sets.py, answers.held_out, judging.py): the
prompts, MT-Bench, AlpacaEval and Arena-Hard layouts are detected and used whole; every layout evaluates from
the command line with requested = judged + counted; comparisons against the reference run only where one
exists and the label audit only on labelled data, and the report says which audits ran; a prompt longer than a
system's context and an audit pair longer than the judge's context are counted skips, not crashes; an unknown
template placeholder stops the evaluation before generation; blank answers put the "not evidence" banner on
top. The files are written here in each layout (our own words, no benchmark text)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import ScriptedJudge, keyword_judge

from align_kit.configs import DataArgs
from align_kit.data import prompt_sets
from align_kit.data.prompts import format_prompt
from align_kit.evaluation import answers, audits, judge_setup
from align_kit.evaluation import pipeline as evaluation
from align_kit.evaluation.answers import Answered
from align_kit.evaluation.pipeline import evaluate_systems
from align_kit.evaluation.settings import EvalArgs, audit_sizes
from align_kit.judges.backends import HFLogitsJudge
from align_kit.judges.config import read_judge_config, read_template
from align_kit.judges.protocol import JudgeStats, PairItem, ScoreItem
from align_kit.models.loading import TinyGPT2Shape, build_byte_tokenizer, build_tiny_gpt2

QUESTIONS = ["Add three and four.", "Name a warm colour.", "One word for a small dog?", "Greet me briefly."]
LONG = "Tell me about this: " + "many words here " * 20  # 340 bytes: over a 256-position context
FAST = ["--max_new_tokens", "8", "--n_boot", "50", "--progress", "false", "--batch_size", "8"]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def layout_rows(layout):
    """Rows of each layout: the four questions and the long one, one reference (on the first question)."""
    questions = [*QUESTIONS, LONG]
    if layout == "mt-bench":
        return [
            {"question_id": 100 + i, "category": "maths" if i == 0 else "chat", "turns": [q, "Say more."]}
            | ({"reference": ["Seven."]} if i == 0 else {})
            for i, q in enumerate(questions)
        ]
    if layout == "arena-hard":
        return [
            {"question_id": f"id{i}", "category": "hard", "cluster": "c", "turns": [{"content": q}]}
            for i, q in enumerate(questions)
        ]
    if layout == "alpacaeval":
        return [
            {"instruction": q, "dataset": "mixed"} | ({"output": "Seven."} if i == 0 else {})
            for i, q in enumerate(questions)
        ]
    if layout == "prompts-with-references":
        return [{"prompt": q} | ({"reference": "Seven."} if i == 0 else {}) for i, q in enumerate(questions)]
    return [{"prompt": q} for q in questions]


def short_judge_folder(tmp_path, model_dir):
    """An hf_logits judge on the 256-position test model with a short template (our own words)."""
    folder = tmp_path / "short_judge"
    folder.mkdir()
    (folder / "prompt.txt").write_text("Q: {question}\nA1: {answer_a}\nA2: {answer_b}\nBetter:")
    (folder / "judge.yaml").write_text(
        f"backend: hf_logits\nmodel: {model_dir}\ntemplate: prompt.txt\nlabels: [' 1', ' 2']\n"
        "torch_dtype: float32\nbatch_size: 8\n"
    )
    return folder


# ---------------------------------------------------------------------------------------------------------
# Reading


@pytest.mark.parametrize("layout", ["mt-bench", "arena-hard", "alpacaeval", "prompts"])
def test_each_layout_is_detected_and_read_whole(tmp_path, layout):
    rows = layout_rows(layout) + [layout_rows(layout)[1]]  # one duplicate
    data = DataArgs(dataset=str(write_rows(tmp_path / "test.jsonl", rows)))  # a folder with only test.jsonl
    found = prompt_sets.read_prompt_set(DataArgs(dataset=str(tmp_path)), n_prompts=100)
    assert found.layout == layout and found.rows_read == 6 and len(found.items) == 5
    assert found.left_out == Counter({"duplicate prompt": 1})
    assert [item.turns[0] for item in found.items] == [*QUESTIONS, LONG]
    held = answers.held_out(EvalArgs(n_prompts=3), data)
    assert held.prompts == [format_prompt(q) for q in QUESTIONS[:3]] and held.rows == []
    assert held.requested == 3 and held.layout == layout
    assert held.chosen == ([None] * 3 if layout in ("arena-hard", "prompts") else ["Seven.", None, None])


def test_a_prompt_set_counts_rows_it_cannot_use():
    raw = [{"prompt": "Hi there."}, {"prompt": ""}, {"prompt": 3}, {"prompt": "Hi there."}]
    items = []
    for i, row in enumerate(raw):
        try:
            items.append(prompt_sets.parse_row(row, "prompts", i))
        except ValueError as error:
            items.append(str(error))
    assert items[1] == "prompt is empty" and items[2] == "prompt is not text"
    assert prompt_sets.layout_of_columns(prompt_sets.RawSplit("x", [{"prompt": "a", "chosen": "b"}], [
        "prompt", "chosen", "rejected"])) is None  # fmt: skip


def test_preference_data_counts_prompts_the_test_split_does_not_have():
    held = answers.held_out(
        EvalArgs(n_prompts=500), DataArgs(embedded_train_size=60, embedded_test_size=20, test_size=0.5)
    )
    assert held.requested == 500 and sum(held.left_out.values()) == 500 - len(held.prompts)
    assert next(iter(held.left_out)).startswith("not in the test split")


def test_audit_sizes_scale_with_the_prompts_unless_set():
    assert audit_sizes(EvalArgs(), 80) == (10, 40)
    assert audit_sizes(EvalArgs(n_honeypots=3, n_human=0), 80) == (3, 0)


# ---------------------------------------------------------------------------------------------------------
# Whole evaluations from the command line


SLOW = pytest.mark.quality  # the same path as the two layouts in the default suite: run by make test-all
LAYOUTS = [
    "mt-bench",
    "prompts-with-references",
    pytest.param("arena-hard", marks=SLOW),
    pytest.param("alpacaeval", marks=SLOW),
    pytest.param("prompts", marks=SLOW),
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_evaluates_from_the_command_line(tmp_path, layout, micro_model_dir, tiny_model_dir):
    data = write_rows(tmp_path / "set.jsonl", layout_rows(layout))
    judge = short_judge_folder(tmp_path, micro_model_dir)
    out = tmp_path / "out"
    argv = ["--dataset", str(data), "--systems", f"a={micro_model_dir}", f"b={tiny_model_dir}", "--base", "a"]
    argv += ["--judges", str(judge), "--output_dir", str(out), *FAST]
    summary = evaluation.main(argv)
    saved = json.loads((out / "evaluation.json").read_text())
    counts = saved["prompts"]["short_judge"]
    assert counts["requested"] == 5 and counts["requested"] == counts["judged"] + sum(
        counts["left_out"].values()
    )
    assert counts["left_out"] in ({"too long for system a": 1}, {"too long for system b": 1})  # no IndexError
    judged = summary["judges"]["short_judge"]
    with_reference = layout in ("mt-bench", "alpacaeval", "prompts-with-references")
    pairs = [(c["system"], c["baseline"]) for c in judged["comparisons"]]
    assert pairs == ([("a", "chosen"), ("b", "chosen")] if with_reference else []) + [("b", "a")]
    assert judged["audits_run"]["labels"] == "not run: a prompt set has no human labels"
    assert judged["audits_run"]["honeypots"].startswith(
        "ran on" if with_reference else "not run: no reference"
    )
    report = (out / "short_judge" / "report.md").read_text()
    assert "Prompts: requested 5, judged 4, left out 1 (too long for system " in report
    assert "- labels: not run: a prompt set has no human labels" in report
    assert saved["plan"]["comparison pairs"] == 5 * len(pairs) and saved["plan"]["actual generation s"] > 0
    if layout == "mt-bench":  # turn 2 answered given each system's own turn 1, judged over the conversation
        second = judged["turn_2"]
        assert second["prompts"]["requested"] == 5 and second["prompts"]["judged"] == 4
        assert [(c["system"], c["baseline"]) for c in second["comparisons"]] == [
            ("b", "a")
        ]  # no turn-2 reference
        assert "## Turn 2 (the whole conversation)" in report
        assert {g["group"] for g in judged["by_group"]["comparisons"]} == {"maths", "chat"}
        rows = [json.loads(line) for line in (out / "generations" / "a.jsonl").read_text().splitlines()]
        turn_two = [r for r in rows if r["prompt"].count("Human:") == 2]
        first = {r["prompt"]: r["answer"] for r in rows if r["prompt"].count("Human:") == 1}
        assert len(turn_two) == 4 and all(
            any(p + " " + a.strip() in r["prompt"] for p, a in first.items()) for r in turn_two
        )  # each turn-2 prompt holds the system's own turn-1 answer


def test_overflowing_audit_pairs_and_comparisons_are_counted_for_the_judge(tmp_path, micro_model_dir):
    long_ref = "A reply that goes on. " * 10  # fits the systems' answers files, not the judge with two copies
    rows = [
        {"prompt": q, "reference": long_ref if i == 0 else "Short reply."} for i, q in enumerate(QUESTIONS)
    ]
    data = write_rows(tmp_path / "set.jsonl", rows)
    prompts = [format_prompt(q) for q in QUESTIONS]
    files = {}
    for name, text in (("x", "fine"), ("y", "also fine")):
        files[name] = str(
            write_rows(tmp_path / f"{name}.jsonl", [{"prompt": p, "answer": text} for p in prompts])
        )
    judge = str(short_judge_folder(tmp_path, micro_model_dir))
    result = evaluate_systems(
        files, "x", [judge], tmp_path / "out", dataset=str(data), n_boot=50, progress=False
    )
    judged = result["judges"]["short_judge"]
    assert judged["skipped"]["x vs chosen: too long for judge short_judge"] == 1
    assert sum(v for k, v in judged["skipped"].items() if k.startswith("honeypot:") and "too long" in k) >= 2
    assert result["prompts"]["short_judge"] == {
        "requested": 4,
        "judged": 4,
        "left_out": {},
    }  # y vs x judged it


def test_hf_logits_judge_reports_which_items_fit_its_context():
    model = build_tiny_gpt2(TinyGPT2Shape(n_layer=1, n_embd=32, n_head=2, n_positions=128))
    config = read_judge_config("local_hf_pairwise", model="tiny", use_chat_template=False)
    assert judge_text_starts_with_system_prompt(config, model)
    judge = HFLogitsJudge(config, "{instruction} | {output_1} | {output_2} ?", model, build_byte_tokenizer())
    assert judge.fits([PairItem("\n\nHuman: hi\n\nAssistant:", "a", "b"), PairItem("q", "x" * 120, "y")]) == [
        True,
        False,
    ]


def judge_text_starts_with_system_prompt(config, model):
    """Without a chat template the system prompt leads the judge's text instead of being dropped."""
    judge = HFLogitsJudge(config, "{question} {answer_a} {answer_b}", model, build_byte_tokenizer())
    return judge.text(PairItem("q", "a", "b")).startswith(config.system_prompt + "\n\n")


# ---------------------------------------------------------------------------------------------------------
# Templates and degenerate answers


def test_an_unknown_placeholder_is_refused_before_generation(tmp_path, micro_model_dir):
    folder = short_judge_folder(tmp_path, micro_model_dir)
    (folder / "prompt.txt").write_text("Q: {question}\nRef: {ref_answer_1}\nA1: {answer_a}\nA2: {answer_b}\n")
    with pytest.raises(ValueError, match=r"unknown placeholder\(s\) \['\{ref_answer_1\}'\]"):
        read_template(folder / "prompt.txt")
    data = write_rows(tmp_path / "set.jsonl", layout_rows("prompts"))
    with pytest.raises(judge_setup.JudgeSetupError, match="ref_answer_1"):
        evaluate_systems({"a": str(micro_model_dir)}, "a", [str(folder)], tmp_path / "out", dataset=str(data))
    assert not (tmp_path / "out" / "generations").exists()


def test_blank_answers_put_the_not_evidence_banner_on_top(tmp_path):
    data = write_rows(tmp_path / "set.jsonl", [{"prompt": q, "reference": "good reply"} for q in QUESTIONS])
    prompts = [format_prompt(q) for q in QUESTIONS]
    blank = write_rows(tmp_path / "blank.jsonl", [{"prompt": p, "answer": " " * 64} for p in prompts])
    real = write_rows(tmp_path / "real.jsonl", [{"prompt": p, "answer": "a good one"} for p in prompts])
    result = evaluate_systems(
        {"real": str(real), "blank": str(blank)}, "real", [keyword_judge()], tmp_path / "out",
        dataset=str(data), n_boot=50, progress=False,
    )  # fmt: skip
    lines = (tmp_path / "out" / "fake" / "report.md").read_text().splitlines()
    assert lines[2] == (
        "**These win rates are not evidence for system blank: 100% empty answers (over the 25% allowed by "
        "max_degenerate)**"
    )
    assert result["evidence"] == {"fake": False} and result["answers_audit"]["flagged"] == ["blank"]
    assert result["answers_audit"]["systems"]["real"]["empty"] == 0.0


def test_self_repeating_answers_are_detected():
    assert audits.repeats_itself("the cat sat " * 6) and audits.repeats_itself("ababababababababab")
    assert not audits.repeats_itself("A short and varied reply about several unrelated topics today.")
    done = {"s": Answered(["", "ok", "loop loop loop loop loop loop loop", None], cut=1)}
    shares = audits.degenerate_answers(done, 0.5)["systems"]["s"]
    assert shares == {"n": 3, "empty": 1 / 3, "repeating": 1 / 3, "cut_at_max_new_tokens": 1 / 3}


# ---------------------------------------------------------------------------------------------------------
# Single-answer grading


class ScriptedScorer:
    """A single-grading judge double: the score of an answer is looked up in ``table``; ``template`` says
    whether it is shown the reference (as a judge folder's template would)."""

    def __init__(self, table, template="{question} {answer}", name="scorer"):
        self.table, self.template, self.name = table, template, name
        self.identity, self.batch_size = f"{name}:{template}", 4
        self.stats = JudgeStats()
        self.seen = []

    def score_batch(self, items):
        self.stats.calls += len(items)
        self.seen += items
        return [self.table.get(item.answer.strip()) for item in items]


def single_setup(tmp_path, references):
    rows = [{"prompt": q, "category": "odd" if i % 2 else "even"} for i, q in enumerate(QUESTIONS)]
    for i, ref in enumerate(references):
        if ref is not None:
            rows[i]["reference"] = ref
    data = write_rows(tmp_path / "set.jsonl", rows)
    prompts = [format_prompt(q) for q in QUESTIONS]
    files = {}
    for name, texts in (("x", ["x0", "x1", "x2", "x3"]), ("y", ["y0", "y1", "y2", "y3"])):
        rows = [{"prompt": p, "answer": t} for p, t in zip(prompts, texts, strict=True)]
        files[name] = str(write_rows(tmp_path / f"{name}.jsonl", rows))
    return data, files


def test_single_grading_matches_a_hand_computation(tmp_path):
    table = {"x0": 2, "x1": 5, "x2": 7, "x3": 4, "y0": 6, "y1": 5, "y2": 3, "y3": 9}
    data, files = single_setup(tmp_path, [None] * 4)
    scorer = ScriptedScorer(table)
    result = evaluate_systems(files, "x", [scorer], tmp_path / "out", dataset=str(data), grading="single",
                              n_boot=200, progress=False)  # fmt: skip
    judged = result["judges"]["scorer"]
    means = {row["system"]: row["mean"] for row in judged["scores"]}
    assert means == {"x": (2 + 5 + 7 + 4) / 4, "y": (6 + 5 + 3 + 9) / 4}
    (y_vs_x,) = judged["comparisons"]  # no reference: only y against the base
    assert y_vs_x["counts"] == {"win": 2, "tie": 1, "loss": 1} and y_vs_x["win_rate"] == (2 + 0.5) / 4
    by_group = {(r["group"], r["system"]): r["mean"] for r in judged["scores_by_group"]}
    assert by_group[("even", "x")] == (2 + 7) / 2 and by_group[("odd", "y")] == (5 + 9) / 2
    assert (
        judged["audit"]["reask_consistency"] == 1.0
        and judged["audits_run"]["position bias"] == "does not apply"
    )
    assert result["prompts"]["scorer"] == {"requested": 4, "judged": 4, "left_out": {}}
    report = (tmp_path / "out" / "scorer" / "report.md").read_text()
    assert "## Scores" in report and "| y | 4 | 5.75 |" in report
    calls = scorer.stats.calls
    evaluate_systems(files, "x", [scorer], tmp_path / "out", dataset=str(data), grading="single", n_boot=200,
                     progress=False)  # fmt: skip
    assert scorer.stats.calls - calls == len([i for i in range(4)])  # only the re-asks: the scores are cached


def test_reference_guided_single_grading_counts_prompts_without_a_reference(tmp_path):
    table = {"x0": 2, "x1": 5, "x2": 7, "x3": 4, "y0": 6, "y1": 5, "y2": 3, "y3": 9, "ref a": 8, "ref b": 9}
    data, files = single_setup(tmp_path, ["ref a", None, "ref b", None])
    scorer = ScriptedScorer(table, template="{question} {reference} {answer}")
    result = evaluate_systems(files, "x", [scorer], tmp_path / "out", dataset=str(data), grading="single",
                              n_boot=200, progress=False, n_honeypots=0)  # fmt: skip
    judged = result["judges"]["scorer"]
    assert {item.reference for item in scorer.seen} == {"ref a", "ref b"}  # the judge saw the reference
    assert result["prompts"]["scorer"] == {
        "requested": 4, "judged": 2, "left_out": {"no reference answer for judge scorer": 2}
    }  # fmt: skip
    means = {row["system"]: row["mean"] for row in judged["scores"]}
    assert means == {"x": (2 + 7) / 2, "y": (6 + 3) / 2, "reference": (8 + 9) / 2}
    assert [(c["system"], c["baseline"], c["n"]) for c in judged["comparisons"]] == [
        ("x", "chosen", 2), ("y", "chosen", 2), ("y", "x", 2)
    ]  # fmt: skip


def test_local_judge_grades_single_answers_from_its_label_logits():
    model = build_tiny_gpt2(TinyGPT2Shape(n_layer=1, n_embd=32, n_head=2, n_positions=128))
    config = read_judge_config("benchmark_single", model="tiny", use_chat_template=False)
    judge = HFLogitsJudge(config, "Q {question} A {answer} score:", model, build_byte_tokenizer())
    scores = judge.score_batch([ScoreItem("\n\nHuman: hi\n\nAssistant:", "hello"), ScoreItem("q", "no")])
    assert all(1.0 <= s <= 9.0 for s in scores) and scores[0] != scores[1]


def test_reference_guided_pairwise_judge_sees_the_reference_and_counts_prompts_without_one(tmp_path):
    data, files = single_setup(tmp_path, ["ref a", None, "ref b", None])
    seen = []

    def verdict(item):
        seen.append(item.reference)
        return "A" if item.answer_a.startswith("y") else "B" if item.answer_b.startswith("y") else "tie"

    judge = ScriptedJudge(verdict, "guided", 8, identity="guided:v1")
    judge.template = "{question} {reference} {answer_a} {answer_b}"
    result = evaluate_systems(
        files, "x", [judge], tmp_path / "out", dataset=str(data), n_boot=50, progress=False
    )
    judged = result["judges"]["guided"]
    assert set(seen) == {"ref a", "ref b"}  # comparisons and honeypots alike
    assert result["prompts"]["guided"] == {
        "requested": 4, "judged": 2, "left_out": {"no reference answer for judge guided": 2}
    }  # fmt: skip
    y_vs_x = next(c for c in judged["comparisons"] if (c["system"], c["baseline"]) == ("y", "x"))
    assert y_vs_x["n"] == 2 and y_vs_x["win_rate"] == 1.0


def test_the_length_controlled_fit_survives_separated_data():
    from align_kit.evaluation import stats

    assert stats._sigmoid(-1e4) == 0.0 and stats._sigmoid(1e4) == 1.0 and stats._sigmoid(0.0) == 0.5


def test_single_grading_counts_answers_too_long_for_the_judge(tmp_path):
    table = {"x0": 2, "x1": 5, "x2": 7, "x3": 4, "y0": 6, "y1": 5, "y2": 3, "y3": 9}
    data, files = single_setup(tmp_path, [None] * 4)
    scorer = ScriptedScorer(table)
    scorer.fits = lambda items: [not item.answer.endswith("2") for item in items]  # x2 and y2 overflow
    result = evaluate_systems(files, "x", [scorer], tmp_path / "out", dataset=str(data), grading="single",
                              n_boot=50, progress=False)  # fmt: skip
    assert result["prompts"]["scorer"] == {
        "requested": 4,
        "judged": 3,
        "left_out": {"too long for judge scorer": 1},
    }
    assert all(not item.answer.endswith("2") for item in scorer.seen)
