"""Protects preference-data parsing: hh-rlhf splitting, filters, counted drops, splits and clear errors."""

from __future__ import annotations

import json

import pytest
from conftest import ASSETS

from align_kit.configs import DataArgs
from align_kit.data.loading import (
    ASSISTANT,
    DataError,
    RowError,
    count_turns,
    load_preferences,
    split_by_prompt,
    split_hh,
    to_sft,
)
from align_kit.models.loading import build_byte_tokenizer

HH = ASSETS / "hh_rlhf_tiny.jsonl"


def test_split_hh_single_turn_keeps_marker_and_leading_space():
    prompt, chosen, rejected = split_hh(
        "\n\nHuman: Hi?\n\nAssistant: Hello there.", "\n\nHuman: Hi?\n\nAssistant: Go away."
    )
    assert prompt == "\n\nHuman: Hi?\n\nAssistant:"
    assert (chosen, rejected) == (" Hello there.", " Go away.")


def test_split_hh_when_one_answer_is_a_prefix_of_the_other():
    # The longest-common-prefix split used by trl.extract_prompt would cut inside the answer here.
    prompt, chosen, rejected = split_hh(
        "\n\nHuman: Count.\n\nAssistant: One, two, three.", "\n\nHuman: Count.\n\nAssistant: One, two"
    )
    assert prompt.endswith(ASSISTANT)
    assert (chosen, rejected) == (" One, two, three.", " One, two")


def test_split_hh_multi_turn_splits_at_last_assistant_turn():
    history = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant:"
    prompt, chosen, _ = split_hh(history + " A pun.", history + " No.")
    assert prompt == history
    assert count_turns(prompt) == (2, 2)
    assert chosen == " A pun."


@pytest.mark.parametrize(
    ("chosen", "rejected", "reason", "field"),
    [
        (None, "\n\nHuman: a\n\nAssistant: b", "not_text", "chosen"),
        ("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: a", "no_assistant_turn", "rejected"),
        ("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: c\n\nAssistant: b", "history_mismatch", "rejected"),
        ("\n\nAssistant: b", "\n\nAssistant: c", "no_human_turn", "chosen"),
    ],
)
def test_split_hh_malformed_rows_name_reason_and_field(chosen, rejected, reason, field):
    with pytest.raises(RowError) as error:
        split_hh(chosen, rejected)
    assert (error.value.reason, error.value.field) == (reason, field)


def test_tiny_hh_file_counts_every_drop_by_reason():
    args = DataArgs(dataset=str(HH), test_size=0.25, split_seed=0)
    splits, counts = load_preferences(args)
    assert counts.dropped["train"] == {
        "multi_turn": 1,
        "history_mismatch": 1,
        "no_assistant_turn": 1,
        "not_text": 1,
        "duplicate": 1,
        "identical_answers": 1,
        "empty_answer": 1,
        "no_human_turn": 1,
    }
    assert len(splits["train"]) + len(splits["test"]) == 4
    assert counts.kept["train"] + counts.kept["test"] == 4
    located = {(e["reason"], e["row"], e["field"]) for e in counts.examples}
    assert ("history_mismatch", 3, "rejected") in located
    assert ("not_text", 5, "rejected") in located
    assert all(e["file"] == str(HH) for e in counts.examples)


def test_multi_turn_rows_kept_when_filter_off():
    splits, counts = load_preferences(DataArgs(dataset=str(HH), single_turn=False, test_size=0.25))
    assert "multi_turn" not in counts.dropped["train"]
    assert len(splits["train"]) + len(splits["test"]) == 5


def test_token_length_filter_counts_too_long_rows():
    args = DataArgs(dataset=str(HH), max_pair_tokens=120, test_size=0.25)
    splits, counts = load_preferences(args, build_byte_tokenizer())
    assert counts.dropped["train"]["too_long"] == 1  # the 500-byte answer about the sea
    assert all("sea" not in r["prompt"] for r in splits["train"] + splits["test"])


def test_split_is_seeded_and_keeps_prompts_on_one_side():
    rows = [{"prompt": f"p{i % 10}", "chosen": "a", "rejected": "b"} for i in range(40)]
    train_a, test_a = split_by_prompt(rows, 0.2, seed=3)
    train_b, test_b = split_by_prompt(rows, 0.2, seed=3)
    assert (train_a, test_a) == (train_b, test_b)
    assert len({r["prompt"] for r in test_a}) == 2
    assert not {r["prompt"] for r in test_a} & {r["prompt"] for r in train_a}
    _, test_c = split_by_prompt(rows, 0.2, seed=4)
    assert {r["prompt"] for r in test_c} != {r["prompt"] for r in test_a}


def test_preference_format_with_column_mapping(tmp_path):
    args = DataArgs(
        dataset=str(ASSETS / "tldr_tiny.jsonl"),
        dataset_format="preference",
        prompt_column="post",
        chosen_column="summary_good",
        rejected_column="summary_bad",
        test_size=0.5,
    )
    splits, counts = load_preferences(args)
    rows = splits["train"] + splits["test"]
    assert len(rows) == 2 and counts.dropped["train"] == {"not_text": 1}
    assert all(r["prompt"].startswith("\n\nHuman: ") and r["prompt"].endswith(ASSISTANT) for r in rows)
    assert all(r["chosen"].startswith(" ") for r in rows)


def test_folder_with_train_and_test_files_and_parquet(tmp_path):
    import pandas as pd

    lines = [json.loads(line) for line in HH.read_text().splitlines()]
    pd.DataFrame(lines[:2]).to_parquet(tmp_path / "train.parquet")
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in lines[9:10]) + "\n")
    splits, counts = load_preferences(DataArgs(dataset=str(tmp_path)))
    assert (len(splits["train"]), len(splits["test"])) == (2, 1)
    assert counts.kept == {"train": 2, "test": 1}


def test_missing_column_is_an_error_naming_file_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"chosen": "x", "answer": "y"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl.*rejected"):
        load_preferences(DataArgs(dataset=str(path)))


def test_file_without_usable_rows_is_an_error_with_reasons(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(
        "\n".join(json.dumps({"chosen": "no turns", "rejected": "here"}) for _ in range(3)) + "\n"
    )
    with pytest.raises(DataError, match=r"broken\.jsonl: no usable rows.*no_human_turn': 3"):
        load_preferences(DataArgs(dataset=str(path)))


def test_missing_local_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_preferences(DataArgs(dataset=str(tmp_path / "nope.jsonl")))


def test_to_sft_mix_is_seeded_half_and_half():
    rows = [{"prompt": "p", "chosen": " good", "rejected": " bad"}] * 400
    mixed = to_sft(rows, "mix", seed=0)
    share = sum(r["completion"] == " good" for r in mixed) / len(mixed)
    assert 0.4 < share < 0.6
    assert mixed == to_sft(rows, "mix", seed=0)
    assert {r["completion"] for r in to_sft(rows, "chosen", 0)} == {" good"}


# ---------------------------------------------------------------------------------------------------------
# Files that cannot be read, held-out splits that cannot be made, prompts that cannot be used


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def pair(i: int, answer: str = "Yes.") -> dict:
    return {"prompt": f"Question {i}?", "chosen": answer, "rejected": "No."}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "\xff"}\n',
            r"line 2: not UTF-8 text \(byte 0xff at column 13\)",
        ),
        (b"", "the file is empty"),
        (b"\n  \n", "the file is empty"),
        (
            b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": "a",\n',
            r"line 3: invalid JSON \(Expecting",
        ),
        (
            b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n[1, 2]\n',
            "line 2: expected a JSON object, got list",
        ),
    ],
    ids=["non-utf8", "empty", "blank", "invalid-json", "not-an-object"],
)
def test_unreadable_files_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"^{tmp_path}/bad\.jsonl: {message}"):
        load_preferences(DataArgs(dataset=str(path)))


def test_a_json_file_holds_a_list_of_objects(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps([pair(i) for i in range(4)], indent=2))
    splits, counts = load_preferences(DataArgs(dataset=str(tmp_path / "list.json"), test_size=0.25))
    assert counts.kept["train"] + counts.kept["test"] == 4
    (tmp_path / "object.json").write_text(json.dumps({"data": [pair(0)]}, indent=2))
    with pytest.raises(DataError, match=r"object\.json: expected a list of objects or one object per line"):
        load_preferences(DataArgs(dataset=str(tmp_path / "object.json")))


def test_too_small_held_out_splits_are_clear_errors_not_trainer_crashes(tmp_path):
    one = write_rows(tmp_path / "one.jsonl", [pair(0)])
    with pytest.raises(
        DataError, match=r"one\.jsonl: 1 usable row\(s\) with 1 distinct prompt, nothing left to hold out"
    ):
        load_preferences(DataArgs(dataset=str(one)))
    duplicates = write_rows(tmp_path / "dups.jsonl", [pair(0)] * 5)
    with pytest.raises(DataError, match=r"dups\.jsonl: 1 usable row.*'duplicate': 4"):
        load_preferences(DataArgs(dataset=str(duplicates)))
    folder = tmp_path / "folder"
    folder.mkdir()
    write_rows(folder / "train.jsonl", [pair(i) for i in range(4)])
    write_rows(folder / "test.jsonl", [{"prompt": "", "chosen": "a", "rejected": "b"}])
    with pytest.raises(
        DataError, match=r"test\.jsonl: no usable rows in the held-out split; .*'empty_prompt': 1"
    ):
        load_preferences(DataArgs(dataset=str(folder)))
    two = write_rows(tmp_path / "two.jsonl", [pair(0), pair(1)])
    splits, _ = load_preferences(DataArgs(dataset=str(two), test_size=0.9))  # each side keeps a prompt
    assert (len(splits["train"]), len(splits["test"])) == (1, 1)


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1"])
def test_test_size_outside_zero_one_is_refused_when_parsed(value):
    from align_kit.configs import ConfigError
    from align_kit.parsing import parse

    with pytest.raises(ConfigError, match=rf"test_size: {float(value)} must be between 0 and 1"):
        parse((DataArgs,), ["--test_size", value])


@pytest.mark.parametrize(
    ("row", "reason", "field"),
    [
        ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "empty_prompt", "prompt"),
        ({"prompt": "\n\nHuman: \n\nAssistant:", "chosen": "a", "rejected": "b"}, "empty_prompt", "prompt"),
        ({"prompt": "Human: hi", "chosen": "a", "rejected": "b"}, "broken_markers", "prompt"),
        ({"prompt": "What is it?\n\nAssistant:", "chosen": "a", "rejected": "b"}, "broken_markers", "prompt"),
        (
            {"prompt": "\n\nHuman: a\n\nAssistant: b\n\nAssistant:", "chosen": "c", "rejected": "d"},
            "broken_markers",
            "prompt",
        ),
        (
            {"prompt": "Hi", "chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "b"},
            "answer_holds_transcript",
            "chosen",
        ),
    ],
    ids=[
        "blank",
        "empty-turn",
        "no-assistant-marker",
        "no-human-marker",
        "assistant-twice",
        "transcript-answer",
    ],
)
def test_preference_prompts_are_validated_with_counted_reasons(tmp_path, row, reason, field):
    path = write_rows(tmp_path / "p.jsonl", [pair(i) for i in range(4)] + [row])
    _, counts = load_preferences(DataArgs(dataset=str(path), test_size=0.25))
    assert counts.dropped["train"] == {reason: 1}
    assert [(e["reason"], e["row"], e["line"], e["field"]) for e in counts.examples] == [
        (reason, 4, 5, field)
    ]


def test_a_quoted_marker_inside_an_answer_is_not_a_turn_boundary():
    quoted = ' Turns start with "\n\nHuman:" and "\n\nAssistant:" markers.'
    history = "\n\nHuman: How are turns marked?\n\nAssistant:"
    assert split_hh(history + quoted, history + " No idea.") == (history, quoted, " No idea.")
    assert split_hh(history + " No idea.", history + quoted) == (history, " No idea.", quoted)
    multi = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Quote a turn.\n\nAssistant:"
    assert split_hh(multi + ' "\n\nHuman: hi"', multi + " No.") == (multi, ' "\n\nHuman: hi"', " No.")


def test_rows_cut_by_sample_caps_are_counted(tmp_path):
    path = write_rows(tmp_path / "p.jsonl", [pair(i) for i in range(20)])
    splits, counts = load_preferences(
        DataArgs(dataset=str(path), test_size=0.25, max_train_samples=10, max_eval_samples=2)
    )
    assert counts.kept == {"train": 10, "test": 2}
    assert counts.dropped == {"train": {"over_max_train_samples": 5}, "test": {"over_max_eval_samples": 3}}
    cut = {e["row"] for e in counts.examples if e["reason"] == "over_max_train_samples"}
    assert len(cut) == 5 and not cut & {r["source_row"] for r in splits["train"]}
    assert {e["field"] for e in counts.examples} == {"max_train_samples", "max_eval_samples"}


def test_the_length_filter_compares_answers_in_tokens_not_characters(tmp_path):
    # 8 characters and 8 bytes against 6 characters and 12 bytes: the byte tokenizer counts the second longer.
    row = {"prompt": "Q?", "chosen": "abcdefgh", "rejected": "éééééé"}
    prompt_tokens = len(b"\n\nHuman: Q?\n\nAssistant:")
    short = [{"prompt": f"Q{i}", "chosen": "Yes.", "rejected": "No."} for i in range(4)]
    path = write_rows(tmp_path / "p.jsonl", [row, *short])
    limit = prompt_tokens + 1 + 12  # prompt, a space, the 12-byte answer: no room for the EOS
    _, counts = load_preferences(
        DataArgs(dataset=str(path), max_pair_tokens=limit, test_size=0.25), build_byte_tokenizer()
    )
    assert counts.dropped["train"] == {"too_long": 1}
    assert [(e["row"], e["field"]) for e in counts.examples] == [(0, "rejected")]
