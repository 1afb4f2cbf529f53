"""Known-harmless library messages are dropped (and explained once); anything else still reaches the log."""

from __future__ import annotations

import logging
import warnings

import pytest

from align_kit import console

REPORT = """GPT2ForSequenceClassification LOAD REPORT from: runs/gpt2-hh/sft
Key          | Status  |
-------------+---------+-
{rows}
Notes:
- MISSING:\tthose params were newly initialized because missing from the checkpoint."""


class Kept(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def kept():
    console.install()
    handler = Kept()
    names = ("transformers.trainer", "transformers.trainer_utils", "transformers.modeling_utils")
    for name in names:
        logging.getLogger(name).addHandler(handler)
    yield handler
    for name in names:
        logging.getLogger(name).removeHandler(handler)


def test_harmless_messages_are_dropped_and_explained_once(kept, capsys):
    trainer = logging.getLogger("transformers.trainer")
    for _ in range(2):
        trainer.warning("There were missing keys in the checkpoint model loaded: ['lm_head.weight'].")
    logging.getLogger("transformers.trainer_utils").warning(
        "mtime may not be reliable on this filesystem, falling back to numerical ordering"
    )
    logging.getLogger("transformers.modeling_utils").warning(REPORT.format(rows="score.weight | MISSING | "))
    assert kept.messages == []
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[align-kit] note:")]
    assert len(notes) == 2 and "ties it to the token embeddings" in notes[0] and "score head" in notes[1]


def test_anything_else_still_reaches_the_log(kept):
    trainer = logging.getLogger("transformers.trainer")
    trainer.warning(
        "There were missing keys in the checkpoint model loaded: ['transformer.h.0.mlp.c_fc.weight']."
    )
    trainer.warning(
        "There were missing keys in the checkpoint model loaded: ['lm_head.weight', 'score.weight']."
    )
    report = REPORT.format(rows="score.weight | MISSING | \ntransformer.wte.weight | MISSING | ")
    logging.getLogger("transformers.modeling_utils").warning(report)
    assert len(kept.messages) == 3 and kept.messages[2] == report


def test_the_checkpointing_rename_warning_is_dropped_and_others_are_not():
    console.install()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        console.install()  # after simplefilter, as at a recipe's start
        warnings.warn(
            "`gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1
        )
        warnings.warn("`something_else` is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["`something_else` is deprecated"]
