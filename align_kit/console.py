"""What a user sees on the console: one line per event from the main process (``log``), a user's mistake as one
line and an exit status (``OneLineError``, ``exit_status``, ``run_command``), and library messages that look
alarming on every real run but are harmless here, each dropped and, where a reader might miss it, explained once
in align-kit's words (``install``).

``run_command`` installs the filter (every recipe, ``align-kit`` and the evaluation started from a shell).
Only the exact cases below are touched: a missing key other than GPT-2's tied head, or a new head other than a
reward model's score, still reaches the log.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from accelerate import PartialState

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


# ---------------------------------------------------------------------------------------------------------
# Lines and exit statuses

EXIT_MISTAKE, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130
# A stop on request (SIGTERM from a scheduler, `docker stop`): exit status 75 (EX_TEMPFAIL), the same command
# continues. Training saves a checkpoint first (``training.stops``); anywhere else the process stops at once,
# keeping what it finished (an evaluation's answers and verdicts are written as each arrives).
EXIT_STOPPED = 75


class OneLineError(Exception):
    """An error whose message is the whole story for the user (it names the file, row, field or setting):
    printed as one line without a traceback, exiting with ``exit_code``. A bad setting, bad data, a run folder
    that cannot take the run, a diverged run and a stop on a signal are kinds of it; anything else is a bug
    and keeps its traceback."""

    exit_code = EXIT_MISTAKE


# Kept for callers that catch "a user's mistake": every one-line error is one.
USER_MISTAKES: tuple[type[BaseException], ...] = (OneLineError,)


class Stopped(OneLineError):
    """Stopped by a signal; the message is the one line to print."""

    exit_code = EXIT_STOPPED


def stop_now(signum: int, frame: object) -> None:
    """SIGTERM handler outside training: raise ``Stopped`` where the program is."""
    raise Stopped(
        f"stopped by {signal.Signals(signum).name}: what was finished is kept (an evaluation's answers and "
        f"verdicts, a run's checkpoints); run the same command to continue (exit status {EXIT_STOPPED})"
    )


def is_main_process() -> bool:
    return PartialState().is_main_process


def log(message: str) -> None:
    """Print on the main process only (one line per event, whatever the process count)."""
    if is_main_process():
        print(f"[align-kit] {message}", flush=True)


def exit_status(main: Callable[[], Any]) -> int:
    """Run ``main``: 0 when it returns (or the int it returns); a ``OneLineError`` is printed as one line on
    stderr and gives its ``exit_code`` (EXIT_MISTAKE, EXIT_DIVERGED for a divergence, EXIT_STOPPED for a stop
    on a signal); a full disk is one line and EXIT_MISTAKE. ``ALIGN_KIT_DEBUG=1`` lets them raise with their
    traceback; other exceptions always do."""
    if os.environ.get("ALIGN_KIT_DEBUG", "") not in ("", "0"):
        result = main()
        return result if isinstance(result, int) and not isinstance(result, bool) else 0
    try:
        result = main()
    except OneLineError as error:
        say(error)
        return error.exit_code
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        say(error.strerror if error.filename is None else f"no space left on the device for {error.filename}")
        return EXIT_MISTAKE
    except KeyboardInterrupt:
        say("interrupted: what was finished is kept; run the same command to continue")
        return EXIT_INTERRUPTED
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def say(error: BaseException | str) -> None:
    """One line on stderr, prefixed with the rank when several processes run."""
    rank = f"[rank {os.environ.get('RANK', '0')}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    text = " ".join(str(error).split("\n"))
    print(f"align-kit: {rank}{text}", file=sys.stderr, flush=True)


def run_command(main: Callable[[], Any]) -> NoReturn:
    """A script's ``if __name__ == "__main__"``: run ``main`` with the known-harmless library messages dropped
    (``install``), SIGTERM stopping it in one line (training replaces that with a graceful stop,
    ``training.stops``), and exit with ``exit_status``."""
    install()
    signal.signal(signal.SIGTERM, stop_now)
    sys.exit(exit_status(main))
