"""Library messages that look alarming on every real run but are harmless here: each is dropped and, where a
reader might miss it, explained once in align-kit's words.

Installed by ``console.run_command`` (every recipe, ``align-kit`` and the evaluation started from a shell).
Only the exact cases below are touched: a missing key other than GPT-2's tied head, or a new head other than a
reward model's score, still reaches the log.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

# transformers 5 renamed gradient checkpointing; TRL 1.12's configs and trainers still use the old names.
DEPRECATIONS = (r"`gradient_checkpointing` is deprecated", r"`is_gradient_checkpointing` is deprecated")


@dataclass(frozen=True)
class Harmless:
    logger: str  # the library logger that emits it
    pattern: str  # a regular expression the whole message must match
    explanation: str | None  # said once instead, or None to drop it silently
    when: Callable[[str], bool] | None = None  # a further test of the message, where a pattern cannot say it

    def matches(self, message: str) -> bool:
        return bool(re.fullmatch(self.pattern, message)) and (self.when is None or self.when(message))


def _only_new_score_head(message: str) -> bool:
    """Whether a transformers load report lists nothing but a MISSING ``score.weight`` (or ``score.bias``)."""
    rows = [line for line in message.splitlines() if "|" in line and not set(line) <= set("-+| ")]
    keyed = [[cell.strip() for cell in row.split("|")] for row in rows[1:]]  # the first row is the header
    return bool(keyed) and all(
        cells[0] in ("score.weight", "score.bias") and cells[1] == "MISSING" for cells in keyed
    )


TIED = r"\['lm_head\.weight'\]"
HARMLESS = (
    Harmless(
        "transformers.trainer",
        rf"There were missing keys in the checkpoint model loaded: {TIED}\.",
        "the best checkpoint has no lm_head.weight because GPT-2 ties it to the token embeddings; it is "
        "tied again on loading",
    ),
    Harmless(
        "transformers.trainer_utils",
        r"(?s)The tokenizer has new PAD/BOS/EOS tokens that differ from the model config.*",
        "the model's config gets the tokenizer's pad token (GPT-2 has none; align-kit pads with EOS)",
    ),
    Harmless("transformers.trainer_utils", r"mtime may not be reliable on this filesystem.*", None),
    Harmless(
        "transformers.modeling_utils",
        r"(?s).*LOAD REPORT.*",
        "the reward model's score head is new (a causal LM has none) and starts from transformers' "
        "initialisation; training learns it",
        when=_only_new_score_head,
    ),
)


class _Filter(logging.Filter):
    def __init__(self, cases: list[Harmless]):
        super().__init__()
        self.cases, self.explained = cases, set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        for case in self.cases:
            if not case.matches(message):
                continue
            if case.explanation and case.pattern not in self.explained:
                self.explained.add(case.pattern)
                print(f"[align-kit] note: {case.explanation}", flush=True)
            return False
        return True


_installed: dict[str, _Filter] = {}


def install() -> None:
    """Drop the known-harmless messages (idempotent)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # PPO is in trl.experimental in 1.12, on purpose
    for text in DEPRECATIONS:
        warnings.filterwarnings("ignore", message=text, category=FutureWarning)
    for name in sorted({case.logger for case in HARMLESS}):
        if name not in _installed:
            _installed[name] = _Filter([case for case in HARMLESS if case.logger == name])
            logging.getLogger(name).addFilter(_installed[name])
