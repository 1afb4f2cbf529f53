"""Protects recipes/label.py and align_kit/judges/labelling.py: the labelled dataset is the preference layout that
recipes/dpo.py and recipes/reward.py read (``load_preferences``) (chosen = the answer the judge preferred in both orders, ties
counted and left out); the labelling audit's position-bias, honeypot and human-agreement figures equal those
of a scripted judge whose bias is known exactly; a judge that fails its audits marks the dataset and the
mark reaches the folder of a run trained on it; a judge spec that names nothing is one clear line."""

from __future__ import annotations

import json
import zlib

import pytest
from conftest import ScriptedJudge, load_recipe, recipe_argv

from align_kit.configs import ConfigError, DataArgs
from align_kit.data.loading import LABELLING_MARK, load_preferences
from align_kit.data.task import generate as generate_task
from align_kit.data.task import oracle_score
from align_kit.judges import labelling
from align_kit.judges.cache import JudgmentCache
from align_kit.models.loading import EMBEDDED_NAME, build_byte_tokenizer


def biased(prompt: str) -> bool:
    """The prompts on which the scripted judge always answers slot A (about one in three, by a stable hash)."""
    return zlib.crc32(prompt.encode()) % 3 == 0


def oracle_judge(position_biased: bool = False) -> ScriptedJudge:
    """Prefers the oracle's better answer, then the larger sum of character codes (so sampled answers of an
    untrained model are decided too); with ``position_biased``, says 'A' whatever the answers on ``biased``
    prompts."""

    def verdict(item):
        if position_biased and biased(item.prompt):
            return "A"
        key_a, key_b = (
            (oracle_score(item.prompt, a), sum(map(ord, a))) for a in (item.answer_a, item.answer_b)
        )
        return "A" if key_a > key_b else "B" if key_b > key_a else "tie"

    return ScriptedJudge(verdict, "scripted", identity=f"scripted:oracle:{position_biased}")


def test_audit_figures_equal_the_known_position_bias(tmp_path):
    examples = generate_task(60, "test")
    prompts = [e.prompt for e in examples]
    rows = [{"prompt": e.prompt, "chosen": " " + e.chosen, "rejected": " " + e.rejected} for e in examples]
    labelled = [(r["prompt"], r["chosen"], r["rejected"]) for r in rows[:30]]
    honey, _ = labelling.honeypot_pairs(
        prompts[30:45], [r["chosen"] for r in rows[30:45]], labelling.HONEYPOT_KINDS, 0
    )
    human = labelling.human_pairs(rows[45:], 15, 0)
    judge, cache = oracle_judge(position_biased=True), JudgmentCache(tmp_path / "cache.jsonl")
    results = labelling.judge_pairs(judge, labelled, cache)
    honey_results = labelling.judge_pairs(judge, honey, cache)
    human_results = labelling.judge_pairs(judge, human, cache)
    audit = labelling.labelling_audit(
        results,
        [(h[3], r) for h, r in zip(honey, honey_results, strict=True)],
        [(h[3], r) for h, r in zip(human, human_results, strict=True)],
    )
    figures = audit["figures"]
    everything = [p[0] for p in labelled] + [h[0] for h in honey] + [h[0] for h in human]
    n, n_biased = len(everything), sum(map(biased, everything))
    assert 0 < n_biased < n
    # a biased pair answers A in both orders (a flip, two slot-A verdicts); any other pair A once and B once
    assert figures["flip_rate"] == pytest.approx(n_biased / n)
    assert figures["first_slot_rate"] == pytest.approx((2 * n_biased + (n - n_biased)) / (2 * n))
    assert figures["honeypot_pass_rate"] == pytest.approx(sum(not biased(h[0]) for h in honey) / len(honey))
    assert figures["human_accuracy"] == pytest.approx(sum(not biased(h[0]) for h in human) / len(human))
    assert (
        figures["n_tie"] == sum(map(biased, (p[0] for p in labelled))) and figures["parse_failure_rate"] == 0
    )
    assert audit["passed"] is False and {"flip_rate", "honeypot_pass_rate"} <= set(audit["failed"])
    fair = labelling.labelling_audit(labelling.judge_pairs(oracle_judge(), labelled, cache), [], [])
    assert fair["figures"]["flip_rate"] == 0 and fair["figures"]["first_slot_rate"] == 0.5
    assert fair["figures"]["n_win"] + fair["figures"]["n_loss"] == 30


@pytest.fixture(scope="module")
def label():
    return load_recipe("label")


def label_args(out, **overrides) -> list[str]:
    values = {
        "model_name_or_path": EMBEDDED_NAME,
        "judge": "oracle",
        "dataset": "embedded",
        "embedded_train_size": "80",
        "embedded_test_size": "24",
        "output_dir": str(out),
        "samples_per_prompt": "3",
        "pairs_per_prompt": "2",
        "max_prompts": "24",
        "test_fraction": "0.25",
        "max_new_tokens": "6",
        "n_honeypots": "8",
        "n_human": "16",
        **overrides,
    }
    return [item for key, value in values.items() for item in (f"--{key}", value)]


def labelled_folder(label, monkeypatch, out, position_biased: bool):
    monkeypatch.setattr(label, "judge_from_spec", lambda spec: oracle_judge(position_biased))
    return label.main(label_args(out))


def test_labelling_writes_the_layout_reward_and_dpo_read_and_the_mark_reaches_the_run(
    label, monkeypatch, tmp_path
):
    out = tmp_path / "labels"
    audit = labelled_folder(label, monkeypatch, out, position_biased=False)
    assert audit["passed"] is True and not (out / LABELLING_MARK).exists()
    written = {
        split: [json.loads(x) for x in (out / f"{split}.jsonl").read_text().splitlines()]
        for split in ("train", "test")
    }
    assert audit["n_rows"] == {"train": len(written["train"]), "test": len(written["test"])}
    assert written["train"] and written["test"]
    assert audit["outcomes"]["win"] + audit["outcomes"]["loss"] == sum(audit["n_rows"].values())
    for row in written["train"] + written["test"]:  # chosen is what the judge preferred
        assert sum(map(ord, row["chosen"])) > sum(map(ord, row["rejected"]))
    splits, counts = load_preferences(DataArgs(dataset=str(out)), build_byte_tokenizer())
    for split in ("train", "test"):  # the loader renders each answer in the hh format: one leading space
        got = [(r["prompt"], r["chosen"], r["rejected"]) for r in splits[split]]
        usable = [r for r in written[split] if "\x00" not in r["prompt"] + r["chosen"] + r["rejected"]]
        assert got == [(r["prompt"], " " + r["chosen"].strip(), " " + r["rejected"].strip()) for r in usable]
        # a random model's answers may hold NUL bytes: the loader counts those rows instead of training on them
        assert sum(counts.dropped.get(split, {}).values()) == len(written[split]) - len(usable)
    assert audit["judge_traffic"]["calls"] > 0 and audit["figures"]["human_kappa"] == 1.0

    biased_out = tmp_path / "biased_labels"
    biased_audit = labelled_folder(label, monkeypatch, biased_out, position_biased=True)
    mark = json.loads((biased_out / LABELLING_MARK).read_text())
    assert biased_audit["passed"] is False and mark["failed"] == biased_audit["failed"]
    assert "flip_rate" in mark["failed"]
    run = (
        tmp_path / "reward_on_marked"
    )  # every recipe copies the mark in runs.start; reward.py stands for all
    values = {
        "model_name_or_path": EMBEDDED_NAME, "dataset": str(biased_out), "output_dir": str(run),
        "max_steps": "1", "per_device_train_batch_size": "4", "logging_steps": "1", "save_strategy": "no",
        "eval_strategy": "no", "max_length": "64",
    }  # fmt: skip
    metrics = load_recipe("reward").main(recipe_argv(values))
    assert json.loads((run / LABELLING_MARK).read_text()) == mark
    kept, _ = load_preferences(DataArgs(dataset=str(biased_out)), build_byte_tokenizer())
    assert metrics["held_out"]["n_pairs"] == len(kept["test"]) > 0  # trained on the labels unchanged


def test_a_judge_spec_that_names_nothing_is_one_line():
    with pytest.raises(ConfigError, match=r"judge: 'no_such_judge': no judge 'no_such_judge'") as error:
        labelling.judge_from_spec("no_such_judge")
    assert "\n" not in str(error.value)
