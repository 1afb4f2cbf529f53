"""Protects what the loader says about rows it does not use: every failing reason of a dropped row, the
dropped rows written whole (--write_dropped), NUL bytes and hh-rlhf's "answer begins with Human:" under their
own reasons, and rows longer than the trainer's max_length counted in data_counts.json."""

from __future__ import annotations

import json

from align_kit.configs import DataArgs
from align_kit.data.loading import count_cut, load_preferences
from align_kit.models.loading import build_byte_tokenizer
from align_kit.training import runs


def hh(history: str, answer: str) -> str:
    return f"{history}\n\nAssistant:{answer}"


def hh_pair(
    i: int, chosen: str = " Yes, gladly.", rejected: str = " No.", history: str | None = None
) -> dict:
    history = history if history is not None else f"\n\nHuman: Question {i}?"
    return {"chosen": hh(history, chosen), "rejected": hh(history, rejected)}


MULTI = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: And then?"
ROWS = [
    *[hh_pair(i) for i in range(6)],
    hh_pair(6, chosen=" "),  # 6: empty_answer
    hh_pair(7, chosen=" ", history=MULTI),  # 7: empty_answer and multi_turn
    hh_pair(8, history=MULTI),  # 8: multi_turn only
    hh_pair(9, chosen=" \n\nHuman: Are you there?"),  # 9: the hh artefact: an empty turn, then the user
    hh_pair(10, chosen=" Fine\x00", rejected=" "),  # 10: nul_bytes (chosen) and empty_answer (rejected)
    hh_pair(11, history="\n\nHuman: Nul\x00 here?"),  # 11: nul_bytes in the prompt
    {"chosen": 3, "rejected": "x"},  # 12: unreadable: not_text, nothing else to check
]


def write(tmp_path, rows) -> str:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_every_failing_reason_is_counted_and_every_dropped_row_written(tmp_path):
    dropped_file = tmp_path / "out" / "dropped.jsonl"
    args = DataArgs(dataset=write(tmp_path, ROWS), test_size=0.25, write_dropped=str(dropped_file))
    splits, counts = load_preferences(args)
    assert len(splits["train"]) + len(splits["test"]) == 6
    assert counts.dropped["train"] == {  # each row once, under its first reason: 7 rows dropped
        "empty_answer": 2,
        "multi_turn": 1,
        "answer_begins_with_human": 1,
        "nul_bytes": 2,
        "not_text": 1,
    }
    assert counts.failing["train"] == {  # every reason a dropped row fails
        "empty_answer": 3,
        "multi_turn": 2,
        "answer_begins_with_human": 1,
        "nul_bytes": 2,
        "not_text": 1,
    }
    written = [json.loads(line) for line in dropped_file.read_text().splitlines()]
    assert len(written) == sum(counts.dropped["train"].values())
    by_row = {w["row"]: [(r["reason"], r["field"]) for r in w["reasons"]] for w in written}
    assert by_row == {
        6: [("empty_answer", "chosen")],
        7: [("empty_answer", "chosen"), ("multi_turn", "chosen")],
        8: [("multi_turn", "chosen")],
        9: [("answer_begins_with_human", "chosen")],
        10: [("nul_bytes", "chosen"), ("empty_answer", "rejected")],
        11: [("nul_bytes", "prompt")],
        12: [("not_text", "chosen")],
    }
    row_7 = next(w for w in written if w["row"] == 7)
    assert row_7["line"] == 8 and row_7["row_data"] == ROWS[7] and row_7["file"].endswith("train.jsonl")
    example = next(e for e in counts.examples if e["row"] == 7)
    assert example["reason"] == "empty_answer" and example["also"] == ["multi_turn (chosen)"]
    assert "dropped rows failing each check" in counts.summary()
    assert counts.to_dict()["failing"]["train"]["multi_turn"] == 2


def test_dropped_rows_are_written_for_caps_too_and_nothing_without_the_setting(tmp_path):
    dataset = write(tmp_path, [hh_pair(i) for i in range(8)])
    dropped_file = tmp_path / "dropped.jsonl"
    _, counts = load_preferences(
        DataArgs(dataset=dataset, test_size=0.25, max_train_samples=4, write_dropped=str(dropped_file))
    )
    written = [json.loads(line) for line in dropped_file.read_text().splitlines()]
    assert [w["reasons"][0]["reason"] for w in written] == ["over_max_train_samples"] * 2
    assert counts.dropped["train"] == {"over_max_train_samples": 2}
    _, counts = load_preferences(DataArgs(dataset=dataset, test_size=0.25))
    assert counts.rows is None  # no setting: no rows kept in memory


def test_rows_longer_than_max_length_are_counted_in_data_counts(tmp_path):
    long_answer = " " + "word " * 30  # 151 bytes: over 100 byte-tokens with its prompt
    rows = [hh_pair(i) for i in range(6)] + [hh_pair(6 + i, chosen=long_answer) for i in range(2)]
    tokenizer = build_byte_tokenizer()
    splits, counts = load_preferences(DataArgs(dataset=write(tmp_path, rows), test_size=0.25), tokenizer)
    expected = {
        split: sum(
            max(len((row["prompt"] + row[k]).encode()) for k in ("chosen", "rejected")) + 1 > 100
            for row in rows_
        )
        for split, rows_ in splits.items()
    }  # the byte tokenizer: one token per byte, plus EOS
    assert expected["train"] + expected["test"] == 2
    run = runs.Run(tmp_path / "run", None, long_rows=(100, "cut"))
    runs.record_data(run, counts)
    saved = json.loads((tmp_path / "run" / "data_counts.json").read_text())
    assert saved["over_max_length"] == {"max_length": 100, "by_trl": "cut", **expected}
    assert "longer than max_length 100 (cut by TRL): train" in counts.summary()
    count_cut(counts, 10_000, "dropped")
    assert counts.over_max_length == {"max_length": 10_000, "by_trl": "dropped", "train": 0, "test": 0}
