"""A judge as data: ``eval/judges/<name>/judge.yaml`` read into ``JudgeConfig`` (unknown keys fail) next to
a prompt template in which ``{instruction}``, ``{output_1}`` (slot A) and ``{output_2}`` (slot B) are filled;
and the judge's identity, the hash of every setting that can change a verdict, which keys the cache."""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align_kit.parsing import load_yaml
from align_kit.resources import judges_dir

BACKENDS = ("oracle", "reward_model", "hf_logits", "openai")
MODES = ("logits", "generate", "reason")
MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens")
VERDICT_SOURCES = ("text", "logprobs")
PLACEHOLDERS = ("{instruction}", "{output_1}", "{output_2}")
ALIASES = {"{instruction}": "{question}", "{output_1}": "{answer_a}", "{output_2}": "{answer_b}"}
GRADINGS = ("pairwise", "single")  # which of two answers is better, or a score for one answer
SINGLE_PLACEHOLDERS = ("{question}", "{answer}")  # a single-grading template needs both
REFERENCE = "{reference}"  # optional in either: the data's reference answer (reference-guided grading)
NAMED = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")  # anything written like a placeholder


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
    grading: str = field(
        default="pairwise",
        metadata={
            "help": f"One of {GRADINGS}: pairwise templates fill {{question}}, {{answer_a}}, {{answer_b}} "
            "(or {instruction}, {output_1}, {output_2}); single templates fill {question} and {answer} and the "
            "judge answers a score. Either may hold {reference}: the data's reference answer."
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
            "help": "hf_logits: 'logits' (one forward pass) or 'generate' (free text then parse; slower). "
            "openai: 'reason' asks for a short rationale before the verdict (parser: regex; its group "
            "'rationale', or the text before the verdict, is kept); any other mode asks for the verdict alone."
        },
    )
    tie_margin: float = field(
        default=0.0,
        metadata={
            "help": "Tie when |logit or score difference| <= tie_margin (0: only exact equality ties)."
        },
    )
    max_new_tokens: int = field(
        default=8, metadata={"help": "Tokens generated (generate mode; openai: sent as max_tokens_field)."}
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
    torch_dtype: str = field(
        default="float32",
        metadata={
            "help": "Weights dtype for local models: float32, bfloat16, float16, or auto (bfloat16 on a GPU "
            "that supports it, float32 otherwise)."
        },
    )
    base_url: str | None = field(
        default=None, metadata={"help": "openai: endpoint root, e.g. http://host:8000/v1."}
    )
    api_key_env: str | None = field(
        default="OPENAI_API_KEY",
        metadata={
            "help": "openai: environment variable holding the key (never the key itself); null sends 'EMPTY'."
        },
    )
    max_concurrency: int = field(
        default=8,
        metadata={
            "help": "openai: most requests in flight; the judge starts at 1, doubles while requests succeed, "
            "halves after a timeout or 429 and then grows by one per round of successes."
        },
    )
    timeout: float = field(
        default=60.0, metadata={"help": "openai: seconds before a request counts as timed out."}
    )
    max_retries: int = field(
        default=5,
        metadata={
            "help": "openai: retries by the openai client after a timeout, connection error, 408, 409, 429 or "
            "5xx (waits 0.5 s doubling to 8 s, or the server's Retry-After); a refused connection stops "
            "sooner (see judges.openai_client.REFUSED_ATTEMPTS)."
        },
    )
    max_tokens_field: str = field(
        default="max_tokens",
        metadata={
            "help": f"openai: request field carrying max_new_tokens, one of {MAX_TOKENS_FIELDS} (newer "
            "OpenAI models refuse max_tokens)."
        },
    )
    verdict_from: str = field(
        default="text",
        metadata={
            "help": f"openai: one of {VERDICT_SOURCES}. 'logprobs' asks for top_logprobs of the first answer "
            "token and compares the two labels' log-probabilities (tie within tie_margin); when a label is "
            "missing from that list the answer text is parsed instead (counted as a logprob fallback)."
        },
    )
    top_logprobs: int = field(
        default=20,
        metadata={
            "help": "openai, verdict_from=logprobs: alternatives asked for the first token (OpenAI: <= 20)."
        },
    )
    input_price_per_million: float | None = field(
        default=None, metadata={"help": "openai: price of a million prompt tokens; null: no cost computed."}
    )
    output_price_per_million: float | None = field(
        default=None,
        metadata={"help": "openai: price of a million completion tokens; null: no cost computed."},
    )
    max_cost: float | None = field(
        default=None,
        metadata={
            "help": "openai: budget in the prices' currency, checked before each request (needs both prices; "
            "requests already in flight may end past it); null: no limit."
        },
    )
    max_requests: int | None = field(
        default=None,
        metadata={
            "help": "openai: most HTTP requests (retries included) this judge may send; null: no limit."
        },
    )

    def __post_init__(self) -> None:
        if self.grading not in GRADINGS:
            raise ValueError(f"grading must be one of {GRADINGS}, got {self.grading!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.grading == "single":  # score labels: distinct numbers written as strings
            if len(set(self.labels)) != len(self.labels) or not all(_number(x) for x in self.labels):
                raise ValueError(
                    f"labels of a single-grading judge must be distinct numbers as strings, got {self.labels!r}"
                )
        elif (
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
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "reason" and (self.backend != "openai" or self.parser != "regex"):
            raise ValueError("mode: reason needs backend: openai and parser: regex (to find the verdict)")
        if self.max_tokens_field not in MAX_TOKENS_FIELDS:
            raise ValueError(
                f"max_tokens_field must be one of {MAX_TOKENS_FIELDS}, got {self.max_tokens_field!r}"
            )
        if self.verdict_from not in VERDICT_SOURCES:
            raise ValueError(f"verdict_from must be one of {VERDICT_SOURCES}, got {self.verdict_from!r}")
        if self.verdict_from == "logprobs" and (self.backend != "openai" or self.mode == "reason"):
            raise ValueError("verdict_from: logprobs needs backend: openai and a mode other than reason")
        if self.top_logprobs < 1:
            raise ValueError(f"top_logprobs must be >= 1, got {self.top_logprobs}")
        prices = (self.input_price_per_million, self.output_price_per_million)
        if any(p is not None and p < 0 for p in prices):
            raise ValueError(f"prices per million tokens must be >= 0, got {prices}")
        if self.max_cost is not None and (self.max_cost <= 0 or None in prices):
            raise ValueError(
                "max_cost must be > 0 and needs input_price_per_million and output_price_per_million"
            )
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {self.max_requests}")
        if self.backend in ("hf_logits", "openai") and not (self.template and self.model):
            raise ValueError(f"backend {self.backend} needs both `model` and `template`")
        if self.batch_size < 1 or self.max_concurrency < 1 or self.max_retries < 0:
            raise ValueError("batch_size and max_concurrency must be >= 1 and max_retries >= 0")


# Settings that change how fast, where or at what price a judge answers, not what it answers; they stay
# out of the cache key (a judge served at a new address keeps its verdicts; cache_tag retires them).
_OPERATIONAL = {"name", "description", "batch_size", "device", "api_key_env", "max_concurrency", "timeout"}
_OPERATIONAL |= {"max_retries", "max_length", "template", "base_url", "max_tokens_field"}
_OPERATIONAL |= {"input_price_per_million", "output_price_per_million", "max_cost", "max_requests"}


def judge_identity(config: JudgeConfig, template_text: str | None) -> str:
    """Stable hash of every setting that can change a verdict, plus the template's text (not its path)."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in _OPERATIONAL}
    payload = json.dumps({"settings": settings, "template": template_text}, sort_keys=True)
    return f"{config.backend}:{config.model}:{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


# ---------------------------------------------------------------------------------------------------
# Reading judges


def check_keys(values: dict[str, Any], where: str) -> None:
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
    values = copy.deepcopy(judge_file(path))  # the cached mapping stays as read
    check_keys(values, str(path))
    check_keys(overrides, "overrides")
    values.update(overrides)
    if not values.get("name"):
        values["name"] = path.parent.name
    if values.get("template"):
        values["template"] = str((path.parent / values["template"]).resolve())
    return JudgeConfig(**values)


def judge_file(path: Path) -> dict[str, Any]:
    """The settings a ``judge.yaml`` holds (``parsing.load_yaml``: a key given twice is refused with its
    line), read once while the file is unchanged: an evaluation asks for each judge's config several times."""
    stat = path.stat()
    return _read_judge_file(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _read_judge_file(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    return load_yaml(path)[0]


def read_template(path: str | Path, grading: str = "pairwise") -> str:
    """The template text, final newline(s) dropped so a label follows the last line directly. Every
    placeholder the grading needs must be there and every other ``{name}`` is refused: it would reach the
    judge as literal text."""
    text = Path(path).read_text().rstrip("\n")
    if grading == "single":
        missing = [
            p
            for p in SINGLE_PLACEHOLDERS
            if p not in text and not (p == "{question}" and "{instruction}" in text)
        ]
        known = {*SINGLE_PLACEHOLDERS, "{instruction}", REFERENCE}
    else:
        missing = [p for p in PLACEHOLDERS if p not in text and ALIASES[p] not in text]
        known = {*PLACEHOLDERS, *ALIASES.values(), REFERENCE}
    if missing:
        raise ValueError(f"{path}: template lacks placeholder(s) {missing}")
    unknown = sorted(set(NAMED.findall(text)) - known)
    if unknown:
        raise ValueError(
            f"{path}: unknown placeholder(s) {unknown}; a {grading} template fills {sorted(known)}"
        )
    return text


def _number(text: object) -> bool:
    try:
        float(str(text))
    except ValueError:
        return False
    return isinstance(text, str)


def uses_reference(template: str | None) -> bool:
    """Whether a judge's template puts the reference answer in front of it."""
    return bool(template) and REFERENCE in template
