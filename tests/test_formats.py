"""Protects the dataset layouts users bring and how conversations are rendered (align_kit/data/loading.py,
align_kit/data/prompts.py): auto detection of every layout and one clear error on a mixed or unknown one;
conversational rows with an explicit or an implicit prompt, TL;DR comparisons with the paper's prompt,
instruction rows, unpaired rows; malformed messages counted with file, row, line and field; chat templates
(auto, hh, the tokenizer's, a .jinja file) and the rendering the evaluation gives each system; Hub datasets
read through the same code as local files."""

from __future__ import annotations

import json

import pytest
from conftest import ASSETS

from align_kit.configs import ConfigError, DataArgs
from align_kit.data.loading import (
    TLDR_QUERY,
    DataError,
    load_preferences,
    load_sft,
    load_unpaired,
    render_held_out,
    system_chat_format,
)
from align_kit.data.prompts import ChatFormat, chat_format, hh_prompt, instruction_of, parse_hh
from align_kit.models.loading import build_byte_tokenizer, load_tokenizer

CHAT_PREFERENCE = ASSETS / "chat_preference_tiny.jsonl"
CHAT_TRANSCRIPTS = ASSETS / "chat_transcripts_tiny.jsonl"
TLDR = ASSETS / "tldr_comparisons_tiny.jsonl"
INSTRUCTION = ASSETS / "instruction_tiny.jsonl"
TEMPLATE = ASSETS / "tiny_chat_template.jinja"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def templated_tokenizer(template: str | None = None):
    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = template or TEMPLATE.read_text()
    return tokenizer


def all_rows(splits):
    return splits["train"] + splits["test"]


def located(counts):
    return {(e["reason"], e["row"], e["line"], e["field"]) for e in counts.examples}


# ---------------------------------------------------------------------------------------------------------
# Detection


@pytest.mark.parametrize(
    ("path", "loader", "expected"),
    [
        (ASSETS / "hh_rlhf_tiny.jsonl", load_preferences, "hh-rlhf"),
        (CHAT_PREFERENCE, load_preferences, "chat-preference"),
        (CHAT_TRANSCRIPTS, load_preferences, "chat-transcripts"),
        (TLDR, load_preferences, "tldr-comparisons"),
        (INSTRUCTION, load_sft, "instruction"),
    ],
    ids=lambda v: getattr(v, "name", None) or getattr(v, "__name__", v),
)
def test_auto_detects_the_layout_and_records_it(path, loader, expected):
    _, counts = loader(DataArgs(dataset=str(path), test_size=0.25))
    assert counts.formats == {"train": expected, "test": expected}
    assert counts.to_dict()["dataset_format"] == {"requested": "auto", "train": expected, "test": expected}
    assert counts.to_dict()["chat_template"] == "hh"


def test_flat_preference_strings_and_unpaired_rows_are_detected(tmp_path):
    flat = write_jsonl(
        tmp_path / "flat.jsonl", [{"prompt": f"Q{i}?", "chosen": "Yes.", "rejected": "No."} for i in range(4)]
    )
    _, counts = load_preferences(DataArgs(dataset=str(flat), test_size=0.25))
    assert counts.formats["train"] == "preference"
    unpaired = [
        {"prompt": [user(f"Q{i}?")], "completion": [assistant("Yes.")], "label": i % 2} for i in range(4)
    ]
    splits, counts = load_unpaired(
        DataArgs(dataset=str(write_jsonl(tmp_path / "u.jsonl", unpaired)), test_size=0.25)
    )
    assert counts.formats["train"] == "unpaired"
    assert sorted(r["label"] for r in all_rows(splits)) == [False, False, True, True]
    assert {r["completion"] for r in all_rows(splits)} == {" Yes."}


def test_mixed_layouts_stop_with_one_line_naming_rows_and_lines(tmp_path):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
            {"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("c")]},
            {"chosen": "\n\nHuman: d\n\nAssistant: e", "rejected": "\n\nHuman: d\n\nAssistant: f"},
        ],
    )
    with pytest.raises(DataError) as error:
        load_preferences(DataArgs(dataset=str(path)))
    assert str(error.value) == (
        f"{path}: mixed layouts: 2 row(s) hh-rlhf, first row 0 (line 1); 1 row(s) chat-transcripts, first "
        "row 1 (line 2); a file holds one layout (or set dataset_format)"
    )


def test_unknown_layout_names_the_columns_and_the_layouts(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(
        DataError, match=r"odd\.jsonl: unknown layout: columns \['question', 'answer'\]; expected"
    ):
        load_preferences(DataArgs(dataset=str(path)))


def test_each_loader_refuses_layouts_it_cannot_train_on():
    with pytest.raises(DataError, match=r"instruction_tiny\.jsonl: instruction rows are read by SFT only"):
        load_preferences(DataArgs(dataset=str(INSTRUCTION)))
    with pytest.raises(DataError, match="instruction rows are read by SFT only"):
        load_unpaired(DataArgs(dataset=str(INSTRUCTION)))


def test_an_explicit_format_that_fits_no_row_points_at_the_detected_one():
    with pytest.raises(DataError, match=r"no usable rows; .*'not_text': 13.*look like 'chat-preference'"):
        load_preferences(DataArgs(dataset=str(CHAT_PREFERENCE), dataset_format="preference"))


# ---------------------------------------------------------------------------------------------------------
# Conversational rows


def test_explicit_prompt_rows_keep_every_valid_row_and_count_malformed_messages():
    splits, counts = load_preferences(DataArgs(dataset=str(CHAT_PREFERENCE), test_size=0.25))
    assert counts.kept["train"] + counts.kept["test"] == 7
    assert counts.dropped["train"] == {
        "unknown_role": 1,
        "empty_content": 1,
        "no_assistant_turn": 1,
        "history_mismatch": 1,
        "multi_turn": 1,
        "last_turn_not_user": 1,
    }
    assert located(counts) == {
        ("unknown_role", 7, 8, "prompt[0].role"),
        ("empty_content", 8, 9, "chosen[0].content"),
        ("no_assistant_turn", 9, 10, "chosen[0].role"),
        ("history_mismatch", 10, 11, "chosen"),
        ("multi_turn", 11, 12, "chosen"),
        ("last_turn_not_user", 12, 13, "prompt[1].role"),
    }
    assert {e["file"] for e in counts.examples} == {str(CHAT_PREFERENCE)}
    by_row = {r["source_row"]: r for r in all_rows(splits)}
    assert by_row[1]["prompt"] == "Answer briefly.\n\nHuman: Name a colour.\n\nAssistant:"  # system preamble
    assert (by_row[3]["prompt"], by_row[3]["chosen"]) == ("\n\nHuman: Say hello.\n\nAssistant:", " Hello!")
    assert (by_row[6]["prompt"], by_row[6]["rejected"]) == (
        "\n\nHuman: Give me a number.\n\nAssistant:",
        " Banana.",
    )
    assert (
        by_row[5]["chosen"] == ' Each turn starts with "\n\nHuman:" or "\n\nAssistant:".'
    )  # a quoted marker


def test_multi_turn_conversations_are_kept_whole_when_single_turn_is_off():
    splits, counts = load_preferences(
        DataArgs(dataset=str(CHAT_PREFERENCE), single_turn=False, test_size=0.25)
    )
    assert counts.kept["train"] + counts.kept["test"] == 8 and "multi_turn" not in counts.dropped["train"]
    row = next(r for r in all_rows(splits) if r["source_row"] == 11)
    assert (
        row["prompt"]
        == "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant:"
    )
    assert row["messages"] == [user("Hi"), assistant("Hello! How can I help?"), user("Tell me a joke.")]


def test_implicit_prompt_rows_share_their_history_or_are_counted():
    splits, counts = load_preferences(DataArgs(dataset=str(CHAT_TRANSCRIPTS), test_size=0.25))
    assert counts.kept["train"] + counts.kept["test"] == 6
    assert located(counts) == {
        ("multi_turn", 6, 7, "chosen"),
        ("history_mismatch", 7, 8, "rejected"),
        ("no_assistant_turn", 8, 9, "chosen[2].role"),
        ("empty_content", 9, 10, "chosen[0].content"),
        ("unknown_role", 10, 11, "chosen[0].role"),
    }
    first = next(r for r in all_rows(splits) if r["source_row"] == 0)
    assert (first["prompt"], first["chosen"], first["rejected"]) == (
        "\n\nHuman: What is 2 plus 3?\n\nAssistant:", " 2 plus 3 is 5.", " It is 6."
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# TL;DR comparisons, instruction rows, unpaired rows


def test_tldr_comparisons_build_the_papers_prompt_and_follow_choice():
    splits, counts = load_preferences(
        DataArgs(dataset=str(TLDR), dataset_format="tldr-comparisons", test_size=0.25)
    )
    assert counts.kept["train"] + counts.kept["test"] == 5
    assert located(counts) == {
        ("bad_choice", 5, 6, "choice"),
        ("not_text", 6, 7, "info.post"),
        ("not_two_summaries", 7, 8, "summaries"),
        ("identical_answers", 8, 9, "summaries"),
    }
    by_row = {r["source_row"]: r for r in all_rows(splits)}
    query = "SUBREDDIT: r/cats\n\nTITLE: Cat wakes me\n\nPOST: My cat wakes me at 5am for food.\n\nTL;DR:"
    assert (
        TLDR_QUERY.format(subreddit="cats", title="Cat wakes me", post="My cat wakes me at 5am for food.")
        == query
    )
    assert by_row[0]["messages"] == [user(query)]
    assert by_row[0]["prompt"] == f"\n\nHuman: {query}\n\nAssistant:"
    assert (by_row[0]["chosen"], by_row[0]["rejected"]) == (" Cat wakes me for food.", " I have a cat.")
    assert (by_row[1]["chosen"], by_row[1]["rejected"]) == (
        " Better pay, long commute.",
        " Work is hard.",
    )  # choice 1


def test_instruction_rows_and_conversations_become_sft_rows():
    splits, counts = load_sft(DataArgs(dataset=str(INSTRUCTION), test_size=0.25))
    assert counts.kept["train"] + counts.kept["test"] == 7
    assert located(counts) == {
        ("no_assistant_turn", 7, 8, "messages[1].role"),
        ("empty_answer", 8, 9, "completion"),
        ("broken_markers", 9, 10, "prompt"),
        ("answer_holds_transcript", 10, 11, "completion"),
    }
    pairs = {(r["prompt"], r["completion"]) for r in all_rows(splits)}
    assert ("\n\nHuman: Name a shape.\n\nAssistant:", " A circle.") in pairs  # an hh prompt read turn by turn
    assert ("\n\nHuman: Name a sea.\n\nAssistant:", " The North Sea.") in pairs  # prompt/completion messages
    assert ("Answer in one word.\n\nHuman: Opposite of hot?\n\nAssistant:", " Cold.") in pairs  # messages


def test_sft_on_preference_rows_trains_on_one_answer_per_pair():
    splits, _ = load_sft(DataArgs(dataset=str(CHAT_TRANSCRIPTS), test_size=0.25, sft_target="rejected"))
    assert {(r["prompt"], r["completion"]) for r in all_rows(splits)} >= {
        ("\n\nHuman: What is 2 plus 3?\n\nAssistant:", " It is 6.")
    }
    assert all(set(r) == {"prompt", "completion"} for r in all_rows(splits))


def test_kto_reader_splits_preference_pairs_into_desirable_and_undesirable_rows():
    pairs, _ = load_preferences(DataArgs(dataset=str(CHAT_TRANSCRIPTS), test_size=0.25))
    unpaired, counts = load_unpaired(DataArgs(dataset=str(CHAT_TRANSCRIPTS), test_size=0.25))
    assert counts.kept["train"] == len(pairs["train"])  # counts are of pairs
    assert len(unpaired["train"]) == 2 * len(pairs["train"])
    assert {(r["prompt"], r["completion"]) for r in unpaired["train"] if r["label"]} == {
        (r["prompt"], r["chosen"]) for r in pairs["train"]
    }
    assert {(r["prompt"], r["completion"]) for r in unpaired["train"] if not r["label"]} == {
        (r["prompt"], r["rejected"]) for r in pairs["train"]
    }


@pytest.mark.parametrize("path", [CHAT_TRANSCRIPTS, TLDR], ids=lambda p: p.name)
def test_a_hub_dataset_in_these_layouts_reads_like_the_local_file(path, monkeypatch):
    import datasets

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    hub = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: hub)
    layout = "tldr-comparisons" if path == TLDR else "auto"
    local, local_counts = load_preferences(DataArgs(dataset=str(path), dataset_format=layout, test_size=0.25))
    remote, remote_counts = load_preferences(
        DataArgs(dataset="someone/set", dataset_format=layout, test_size=0.25)
    )
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in all_rows(remote)] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in all_rows(local)
    ]
    assert remote_counts.dropped == local_counts.dropped and remote_counts.formats == local_counts.formats
    assert {e["file"] for e in remote_counts.examples} == {"someone/set[train]"}


# ---------------------------------------------------------------------------------------------------------
# Chat templates


def test_hh_rendering_round_trips_through_parse_hh():
    messages = [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello!"), user("Joke?")]
    prompt = hh_prompt(messages)
    assert prompt == "Be brief.\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant:"
    assert parse_hh(prompt) == messages
    assert instruction_of(prompt) == prompt.strip()  # the judge sees the system text and every turn
    assert instruction_of(hh_prompt([user("Hi")])) == "Hi"


def test_auto_renders_with_the_tokenizers_template_when_it_has_one():
    assert chat_format("auto", build_byte_tokenizer()).name == "hh"
    splits, counts = load_preferences(
        DataArgs(dataset=str(CHAT_TRANSCRIPTS), test_size=0.25), templated_tokenizer()
    )
    assert counts.chat_template == "tokenizer"
    first = next(r for r in all_rows(splits) if r["source_row"] == 0)
    assert first["prompt"] == "<|user|>What is 2 plus 3?<|assistant|>"
    assert (first["chosen"], first["rejected"]) == ("2 plus 3 is 5.<|endoftext|>", "It is 6.<|endoftext|>")
    _, counts = load_preferences(
        DataArgs(dataset=str(CHAT_TRANSCRIPTS), chat_template="hh"), templated_tokenizer()
    )
    assert counts.chat_template == "hh"


def test_a_jinja_file_renders_the_rows_and_becomes_the_tokenizers_template():
    tokenizer = build_byte_tokenizer()
    args = DataArgs(dataset=str(CHAT_TRANSCRIPTS), chat_template=str(TEMPLATE), test_size=0.25)
    splits, counts = load_preferences(args, tokenizer)
    assert counts.chat_template == str(TEMPLATE)
    assert all(r["prompt"].startswith("<|") for r in all_rows(splits))
    assert tokenizer.chat_template == TEMPLATE.read_text()  # saved with the run, read by its evaluation


def test_chat_template_settings_are_checked(tmp_path):
    with pytest.raises(
        ConfigError, match="chat_template: 'chatml' is not auto, hh, tokenizer or a .jinja file"
    ):
        DataArgs(chat_template="chatml")
    with pytest.raises(ConfigError, match=r"chat_template: .*missing\.jinja: no such file"):
        DataArgs(chat_template=str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="the tokenizer has no chat template"):
        load_preferences(
            DataArgs(dataset=str(CHAT_TRANSCRIPTS), chat_template="tokenizer"), build_byte_tokenizer()
        )


def test_a_template_that_refuses_a_row_is_a_counted_skip():
    refuses_system = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        + TEMPLATE.read_text()
    )
    splits, counts = load_preferences(
        DataArgs(dataset=str(CHAT_TRANSCRIPTS), test_size=0.25), templated_tokenizer(refuses_system)
    )
    assert counts.dropped["train"]["template_error"] == 1
    assert ("template_error", 2, 3, "chosen") in located(counts)
    assert counts.kept["train"] + counts.kept["test"] == 5


def test_a_bos_the_tokenizer_adds_itself_is_not_doubled():
    from tokenizers.processors import TemplateProcessing

    tokenizer = templated_tokenizer("{{ bos_token }}" + TEMPLATE.read_text())
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 256)]
    )
    fmt = chat_format("tokenizer", tokenizer)
    prompt = fmt.prompt([user("Hi")])
    assert fmt.strip_bos and prompt == "<|user|>Hi<|assistant|>"
    assert tokenizer(prompt)["input_ids"].count(256) == 1


def test_the_evaluation_renders_a_runs_prompts_as_its_training_did(tmp_path):
    rows = load_preferences(DataArgs(dataset=str(CHAT_TRANSCRIPTS), chat_template="hh", single_turn=False))[
        0
    ]["train"]
    prompts = [r["prompt"] for r in rows]
    run = tmp_path / "run"
    templated_tokenizer().save_pretrained(run)
    (run / "run_complete.json").write_text("{}")  # an evaluated run is a finished one
    loads = []

    def loader(path):
        loads.append(path)
        return load_tokenizer(path)

    (run / "run_config.json").write_text(
        json.dumps({"chat_template": "auto", "chat_template_used": "tokenizer"})
    )
    fmt = system_chat_format(str(run), "hh", loader)  # the run's record wins over the evaluation's setting
    rendered = render_held_out(prompts, rows, fmt)
    assert rendered == [ChatFormat("tokenizer", loader(str(run))).prompt(r["messages"]) for r in rows]
    multi = next(p for p in rendered if p.count("<|user|>") == 2)
    assert multi == "<|user|>Hi<|assistant|>Hello!<|endoftext|><|user|>What is 1 plus 1?<|assistant|>"
    assert (
        render_held_out(prompts, [], fmt) == rendered
    )  # read back from the hh text when no messages are kept
    (run / "run_config.json").write_text(json.dumps({"chat_template_used": "hh"}))
    loads.clear()
    assert render_held_out(prompts, rows, system_chat_format(str(run), "auto", loader)) == prompts
    assert loads == []  # an hh run needs no tokenizer
    (run / "run_config.json").unlink()  # not an align-kit run: the evaluation's setting decides
    assert system_chat_format(str(run), "auto", loader).name == "tokenizer"
    assert system_chat_format(str(run), "hh", loader).name == "hh"
