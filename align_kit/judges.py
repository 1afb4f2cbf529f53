"""Pairwise judges for win rates, and the both-orders protocol that removes their position bias.

A judge compares ``(prompt, answer_a, answer_b)`` in ONE order and returns ``'A'``, ``'B'``, ``'tie'``
or ``None`` (its output could not be parsed; never guessed). ``judge_both_orders`` asks every pair
with the system in slot A and again swapped, caches each single-order verdict on disk, and combines
the two: see ``combine_orders``.

A judge is data: ``eval/judges/<name>/judge.yaml`` (read into ``JudgeConfig``; unknown keys fail)
next to a prompt template in which ``{instruction}``, ``{output_1}`` (slot A) and ``{output_2}``
(slot B) are replaced in one pass. Backends (in ``align_kit/judge_backends.py``):

- ``oracle``: the embedded task's exact checker ``align_kit.task.oracle_score``; higher score wins.
- ``reward_model``: any object with ``score(prompts, answers) -> list[float]`` (an ensemble fits),
  or a sequence-classification model loaded from ``model``; higher score wins.
- ``hf_logits``: a local causal LM reads the rendered template and the verdict is the sign of
  ``logit(label_1) - logit(label_2)`` at the next token, one forward pass per left-padded batch
  (``mode: generate`` instead generates text and parses it, for comparison only).
- ``openai``: an OpenAI-compatible chat-completions endpoint, concurrent, with counted retries.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml
from tqdm import tqdm

from align_kit.judge_cache import JudgmentCache, cache_key
from align_kit.prompts import instruction_of
from align_kit.resources import judges_dir
from align_kit.verdicts import Outcome, Slot, combine_orders

Verdict = Slot | None  # one order's answer; None for an answer that did not parse
BACKENDS = ("oracle", "reward_model", "hf_logits", "openai")
PLACEHOLDERS = ("{instruction}", "{output_1}", "{output_2}")


@dataclass(frozen=True)
class PairItem:
    """One question for a judge, in one order: which of ``answer_a`` (slot A) and ``answer_b`` is better."""

    prompt: str
    answer_a: str
    answer_b: str


@dataclass
class JudgeStats:
    """What a judge did; read by tests and benchmarks (a rerun from a full cache leaves ``calls`` at 0)."""

    calls: int = 0  # single-order pairs handed to the backend
    requests: int = 0  # HTTP requests, retries included (openai only)
    retries: int = 0
    timeouts: int = 0
    rate_limited: int = 0
    server_errors: int = 0
    connection_errors: int = 0
    parse_failures: int = 0


class Judge(Protocol):
    """What ``judge_both_orders`` needs from a judge."""

    name: str
    identity: str  # everything that changes a verdict (model, template, decoding); keys the cache
    batch_size: int  # pairs per ``judge_batch`` call, and so per cache flush
    stats: JudgeStats

    def judge_batch(self, items: list[PairItem]) -> list[Verdict]: ...


class Scorer(Protocol):
    """Anything that scores answers: a reward model, an ensemble of them, the task oracle."""

    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]: ...


@dataclass
class JudgeConfig:
    """One judge as written in ``eval/judges/<name>/judge.yaml``."""

    backend: str = field(metadata={"help": f"One of {BACKENDS}."})
    name: str = field(default="", metadata={"help": "Shown in results; defaults to the judge's folder name."})
    description: str = field(default="", metadata={"help": "One line for humans."})
    model: str | None = field(
        default=None,
        metadata={
            "help": "hf_logits: causal LM (Hub id, local folder, 'tiny-gpt2'); reward_model: sequence-classification "
            "model folder; openai: the served model name. Part of the cache key, so it must name the weights."
        },
    )
    cache_tag: str = field(
        default="",
        metadata={"help": "Change it to invalidate cached verdicts when the weights behind `model` change."},
    )
    template: str | None = field(
        default=None,
        metadata={
            "help": "Prompt template file next to judge.yaml, with {instruction}, {output_1}, {output_2}."
        },
    )
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "System message for chat backends (openai, and hf_logits with a chat template)."},
    )
    use_chat_template: bool = field(
        default=False,
        metadata={
            "help": "hf_logits: wrap the rendered template as a user turn in the tokenizer's chat template."
        },
    )
    labels: list[str] = field(
        default_factory=lambda: ["1", "2"],
        metadata={"help": "What the judge says for slot A and for slot B; quote them in YAML."},
    )
    tie_label: str | None = field(
        default=None, metadata={"help": "Optional answer meaning a tie (text backends)."}
    )
    parser: str = field(
        default="exact",
        metadata={
            "help": "'exact': the stripped answer must equal a label; 'regex': parse_regex must fullmatch."
        },
    )
    parse_regex: str | None = field(
        default=None,
        metadata={
            "help": "parser=regex: must fullmatch the stripped answer; its group 'verdict' (or 1) is the label."
        },
    )
    mode: str = field(
        default="logits",
        metadata={
            "help": "hf_logits: 'logits' (one forward pass) or 'generate' (free text then parse; slower)."
        },
    )
    tie_margin: float = field(
        default=0.0,
        metadata={
            "help": "Tie when |logit or score difference| <= tie_margin (0: only exact equality ties)."
        },
    )
    max_new_tokens: int = field(
        default=8, metadata={"help": "Tokens generated (generate mode, openai max_tokens)."}
    )
    temperature: float = field(
        default=0.0, metadata={"help": "0 is greedy; cached verdicts assume a deterministic judge."}
    )
    batch_size: int = field(
        default=16,
        metadata={"help": "Pairs per backend batch; also how many verdicts a crash can lose at most."},
    )
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "hf_logits/reward_model: longest input in tokens (None: the model's limit); longer fails."
        },
    )
    append_eos: bool = field(
        default=True,
        metadata={"help": "reward_model: append EOS to prompt+answer, as TRL's RewardTrainer does."},
    )
    device: str | None = field(
        default=None, metadata={"help": "Torch device; None picks cuda when available."}
    )
    torch_dtype: str = field(default="float32", metadata={"help": "Weights dtype for local models."})
    base_url: str | None = field(
        default=None, metadata={"help": "openai: endpoint root, e.g. http://host:8000/v1."}
    )
    api_key_env: str | None = field(
        default="OPENAI_API_KEY",
        metadata={
            "help": "openai: environment variable holding the key (never the key itself); null sends 'EMPTY'."
        },
    )
    max_concurrency: int = field(default=8, metadata={"help": "openai: requests in flight at once."})
    timeout: float = field(
        default=60.0, metadata={"help": "openai: seconds before a request counts as timed out."}
    )
    max_retries: int = field(
        default=5, metadata={"help": "openai: retries after a timeout, 429, 5xx or connection error."}
    )
    backoff_base: float = field(
        default=1.0, metadata={"help": "openai: first retry waits about this long; each further one doubles."}
    )
    backoff_max: float = field(
        default=60.0, metadata={"help": "openai: cap on one wait (also on Retry-After)."}
    )

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if (
            len(self.labels) != 2
            or len(set(self.labels)) != 2
            or not all(isinstance(x, str) for x in self.labels)
        ):
            raise ValueError(
                f"labels must be two different strings (quote them in YAML), got {self.labels!r}"
            )
        if self.parser not in ("exact", "regex"):
            raise ValueError(f"parser must be 'exact' or 'regex', got {self.parser!r}")
        if self.parser == "regex":
            if not self.parse_regex:
                raise ValueError("parser: regex needs parse_regex")
            re.compile(self.parse_regex)
        if self.mode not in ("logits", "generate"):
            raise ValueError(f"mode must be 'logits' or 'generate', got {self.mode!r}")
        if self.backend in ("hf_logits", "openai") and not (self.template and self.model):
            raise ValueError(f"backend {self.backend} needs both `model` and `template`")
        if self.batch_size < 1 or self.max_concurrency < 1 or self.max_retries < 0:
            raise ValueError("batch_size and max_concurrency must be >= 1 and max_retries >= 0")


# Settings that change how fast a judge answers, not what it answers; they stay out of the cache key.
_OPERATIONAL = {"name", "description", "batch_size", "device", "api_key_env", "max_concurrency", "timeout"}
_OPERATIONAL |= {"max_retries", "backoff_base", "backoff_max", "max_length", "template"}


def judge_identity(config: JudgeConfig, template_text: str | None) -> str:
    """Stable hash of every setting that can change a verdict, plus the template's text (not its path)."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in _OPERATIONAL}
    payload = json.dumps({"settings": settings, "template": template_text}, sort_keys=True)
    return f"{config.backend}:{config.model}:{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


# ---------------------------------------------------------------------------------------------------
# Reading judges


def _check_keys(values: dict[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(JudgeConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown judge key(s) {unknown}; known keys: {sorted(known)}")


def read_judge_config(name_or_path: str | Path, **overrides: Any) -> JudgeConfig:
    """Read ``judge.yaml`` (a shipped judge's name, its folder, or the file) plus overrides.

    Unknown keys in the file or in ``overrides`` raise ValueError. ``template`` comes back as an
    absolute path resolved against the YAML's folder.
    """
    path = Path(name_or_path)
    if not path.exists():
        path = judges_dir() / str(name_or_path)
    if path.is_dir():
        path = path / "judge.yaml"
    if not path.is_file():
        shipped = sorted(p.name for p in judges_dir().iterdir() if (p / "judge.yaml").exists())
        raise FileNotFoundError(f"no judge {str(name_or_path)!r}: not a judge.yaml path nor one of {shipped}")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of judge settings")
    _check_keys(values, str(path))
    _check_keys(overrides, "overrides")
    values.update(overrides)
    if not values.get("name"):
        values["name"] = path.parent.name
    if values.get("template"):
        values["template"] = str((path.parent / values["template"]).resolve())
    return JudgeConfig(**values)


def read_template(path: str | Path) -> str:
    """The template text, final newline(s) dropped so a label follows the last line directly."""
    text = Path(path).read_text().rstrip("\n")
    missing = [p for p in PLACEHOLDERS if p not in text]
    if missing:
        raise ValueError(f"{path}: template lacks placeholder(s) {missing}")
    return text


# ---------------------------------------------------------------------------------------------------
# Prompts and parsing


def render_prompt(template: str, item: PairItem) -> str:
    """Fill the three placeholders in one pass, so text inside an answer is never substituted again."""
    values = {
        "instruction": instruction_of(item.prompt),
        "output_1": item.answer_a.strip(),
        "output_2": item.answer_b.strip(),
    }
    return re.sub(r"\{(instruction|output_1|output_2)\}", lambda m: values[m.group(1)], template)


def parse_verdict(
    text: str | None, labels: Sequence[str], tie_label: str | None = None, regex: str | None = None
) -> Verdict:
    """Strict parse of a judge's answer: the stripped text must be a label (or, with ``regex``, the
    regex must fullmatch it and its group 'verdict' or 1 must be a label). Anything else is None."""
    if text is None:
        return None
    answer = text.strip()
    if regex is not None:
        match = re.fullmatch(regex, answer, flags=re.DOTALL)
        if match is None:
            return None
        answer = (
            match.group("verdict") if "verdict" in match.re.groupindex else match.group(1) or ""
        ).strip()
    if answer == labels[0].strip():
        return "A"
    if answer == labels[1].strip():
        return "B"
    if tie_label is not None and answer == tie_label.strip():
        return "tie"
    return None


def verdict_from_margin(margin: float, tie_margin: float) -> Verdict:
    """'A' when slot A leads by more than ``tie_margin``, 'B' when it trails by more, else 'tie'."""
    if abs(margin) <= tie_margin:
        return "tie"
    return "A" if margin > 0 else "B"


# ---------------------------------------------------------------------------------------------------
# Both orders


@dataclass(frozen=True)
class PairResult:
    """One prompt judged in both orders: the judge's slot verdict with the system shown first (``first``,
    system in slot A) and shown second (``swapped``, system in slot B), and the system's ``outcome``
    (None when neither order parsed)."""

    prompt_id: Any
    outcome: Outcome | None
    first: Verdict
    swapped: Verdict
    parse_failures: int
    judge: str


def judge_both_orders(
    judge: Judge,
    prompts: Sequence[str],
    system_answers: Sequence[str],
    baseline_answers: Sequence[str],
    cache: JudgmentCache | None = None,
    prompt_ids: Sequence[Any] | None = None,
    progress: bool = False,
) -> list[PairResult]:
    """Judge each (prompt, system, baseline) with the system in slot A, then swapped.

    Verdicts already in ``cache`` are not asked again; new ones are appended batch by batch as they
    arrive. Identical items (e.g. both answers the same) are asked once.
    """
    if not len(prompts) == len(system_answers) == len(baseline_answers):
        raise ValueError("prompts, system_answers and baseline_answers must have the same length")
    ids = list(prompt_ids) if prompt_ids is not None else list(range(len(prompts)))
    orders = [
        (PairItem(p, s, b), PairItem(p, b, s))
        for p, s, b in zip(prompts, system_answers, baseline_answers, strict=True)
    ]
    keys = {
        item: cache_key(judge.identity, item.prompt, item.answer_a, item.answer_b)
        for pair in orders
        for item in pair
    }
    verdicts: dict[str, Verdict] = {}
    pending: dict[str, PairItem] = {}  # both orders of a prompt side by side, so scorers can share work
    for item, key in keys.items():
        if cache is not None and key in cache:
            verdicts[key] = cache.get(key)
        else:
            pending.setdefault(key, item)
    todo = list(pending.items())
    with tqdm(total=len(todo), desc=f"judge {judge.name}", disable=not progress) as bar:
        for start in range(0, len(todo), judge.batch_size):
            chunk = todo[start : start + judge.batch_size]
            for (key, _), verdict in zip(chunk, judge.judge_batch([item for _, item in chunk]), strict=True):
                verdicts[key] = verdict
                if cache is not None:
                    cache.put(key, verdict, judge.name)
            bar.update(len(chunk))
    results = []
    for prompt_id, (first_item, swapped_item) in zip(ids, orders, strict=True):
        first, swapped = verdicts[keys[first_item]], verdicts[keys[swapped_item]]
        outcome, failures = combine_orders(first, swapped)
        results.append(PairResult(prompt_id, outcome, first, swapped, failures, judge.name))
    return results
