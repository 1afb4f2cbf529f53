"""LLM-driven discovery of preference losses (DiscoPOP: Lu et al. 2024, "Discovering Preference Optimization
Algorithms with and for Large Language Models").

An LLM behind any OpenAI-compatible endpoint writes a candidate DPO-family loss as one Python function,
given the scored table of earlier losses (``OpenAIProposer``, ``build_prompt``). Each proposal is checked
statically (``align_kit.loss_lab.checks``) and unit-checked in a worker process (``align_kit.loss_lab.sandbox``), saved as a ``.py`` file the
DPO recipe loads, and trained and scored by an injected ``evaluate``. ``discover`` repeats this for N
generations, appending one JSON line per proposal to ``discovery.jsonl``; a rerun resumes from it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from align_kit import files
from align_kit.judges.openai_client import OpenAIClient
from align_kit.loss_lab.checks import (
    FUNCTIONAL_FUNCTIONS,
    MAX_RANGE,
    SAFE_BUILTINS,
    TENSOR_ATTRIBUTES,
    TORCH_FUNCTIONS,
    ProposalRefused,
    check_source,
)
from align_kit.loss_lab.sandbox import LossSandbox, write_loss_file

logger = logging.getLogger("align_kit")

# ---------------------------------------------------------------------------------------------------
# The proposer: an LLM behind any OpenAI-compatible endpoint


@dataclass
class ProposerConfig:
    """The LLM that writes losses; the settings have the names and meaning of the OpenAI judge's."""

    model: str = field(metadata={"help": "The served model name."})
    base_url: str | None = field(
        default=None, metadata={"help": "Endpoint root, e.g. http://host:8000/v1 (None: api.openai.com)."}
    )
    api_key_env: str | None = field(
        default="OPENAI_API_KEY",
        metadata={"help": "Environment variable holding the key (never the key itself); null sends 'EMPTY'."},
    )
    timeout: float = field(
        default=300.0,
        metadata={"help": "Seconds before a request counts as timed out (a judge's 60 is short for code)."},
    )
    max_retries: int = field(
        default=5,
        metadata={
            "help": "Retries after a timeout, 429, 5xx or connection error (the openai client's backoff)."
        },
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Unlike a judge's 0: a search wants a different proposal each time."}
    )
    max_new_tokens: int = field(default=2048, metadata={"help": "Longest reply (max_tokens)."})
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message."})
    max_requests: int | None = field(
        default=None,
        metadata={"help": "Stop after this many HTTP requests, retries included (None: no limit)."},
    )
    max_cost: float | None = field(
        default=None, metadata={"help": "Stop once the priced tokens cost this much (needs both prices)."}
    )
    input_price_per_million: float | None = field(
        default=None, metadata={"help": "Price per million prompt tokens."}
    )
    output_price_per_million: float | None = field(
        default=None, metadata={"help": "Price per million completion tokens."}
    )

    @classmethod
    def from_judge(cls, judge: Any, **overrides: Any) -> ProposerConfig:
        """The endpoint settings of an OpenAI judge's ``JudgeConfig``, plus ``overrides``."""
        values = {f.name: getattr(judge, f.name) for f in fields(cls)}
        return cls(**{**values, **overrides})


class OpenAIProposer:
    """``prompt -> reply`` through an OpenAI-compatible chat-completions endpoint, over the judge's client
    (``judges.openai_client.OpenAIClient``: its retries, metering in ``stats``, budget and proxy handling)."""

    def __init__(self, config: ProposerConfig):
        self.config = config
        self.client = OpenAIClient(config.model, config, role="proposer")
        self.client.connect()  # a missing key fails here, before any loss is trained
        self.stats = self.client.stats

    def __call__(self, prompt: str) -> str:
        messages = (
            [{"role": "system", "content": self.config.system_prompt}] if self.config.system_prompt else []
        )
        messages.append({"role": "user", "content": prompt})
        response = self.client.complete(
            messages, temperature=self.config.temperature, max_tokens=self.config.max_new_tokens
        )
        return response.choices[0].message.content or ""


_CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(reply: str) -> str:
    """The first fenced code block that defines a function (else the first block, else the whole reply);
    a block cut short by the token limit is taken up to the end."""
    blocks = _CODE_BLOCK.findall(reply)
    defining = [block for block in blocks if "def " in block]
    return (defining or blocks or [reply])[0].strip("\n")


PROMPT = """You are a machine-learning researcher who designs loss functions for offline preference \
optimisation of language models (the family of DPO, IPO, hinge and DiscoPOP). Each training pair has a \
prompt, a preferred (chosen) answer and a dispreferred (rejected) answer. Write one new loss as a single \
Python function:

```python
def my_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    ...
    return losses
```

`chosen_logps` and `rejected_logps` are the trained policy's summed log-probabilities of the chosen and \
rejected answers, `ref_chosen_logps` and `ref_rejected_logps` the same for the frozen reference model: \
each a float tensor of shape (B,). `beta` is a float ({beta_hint}). Return per-example losses of shape (B,), \
or a tuple `(losses, chosen_rewards, rejected_rewards)` of three (B,) tensors. For example, DPO is \
`-F.logsigmoid(beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)))`.

Rules (a proposal that breaks one is refused without running):
- exactly one function, with a short name that says what the loss does and exactly these five arguments, \
no defaults; nothing else at the top level;
- `torch` and `F` (torch.nn.functional) are already defined: no imports;
- arithmetic, comparisons, `x if c else y`, local variables, `if`, `return`; hyperparameters as constants \
inside the function;
- calls only to torch.{{{torch_functions}}}, F.{{{functional}}}, the tensor methods and attributes \
{{{tensor}}}, and the builtins {builtins};
- no other attributes, no double-underscore names, no I/O, no nested functions, lambdas, classes or \
comprehensions, no while loops; a for loop only over range() of integer literals (at most {max_range} steps);
- the losses must be finite, vary with the inputs and have a gradient with respect to chosen_logps and \
rejected_logps.

Each accepted loss trains the same starting model on the same data and budget and is scored; higher \
{score_key} is better.

{table}{refused}Propose one new loss that you expect to score higher than all of these. Be creative and draw \
on the literature on classification and ranking losses. Give a line or two of reasoning, then the code in \
one ```python block."""


def build_prompt(
    table: Sequence[dict],
    refused: Sequence[dict] = (),
    *,
    score_key: str = "win_rate",
    beta_hint: str = "0.1 by default",
    max_rows: int = 20,
    max_refused: int = 5,
) -> str:
    """The proposer's prompt: the signature, the rules, the scored table best first (the code of each
    discovered loss included), and the latest refusals with their reasons."""
    lines = []
    for rank, row in enumerate(table[:max_rows], 1):
        origin = f"generation {row['generation']}" if row.get("generation") else "known loss"
        scores = ", ".join(f"{key}={_short(value)}" for key, value in row.items() if key not in _NOT_SCORES)
        lines.append(f"{rank}. {row.get('name', '?')} ({origin}): {scores}")
        if row.get("code"):
            lines.append(f"```python\n{row['code']}\n```")
    table_text = (
        "Losses scored so far, best first:\n" + "\n".join(lines) + "\n\n"
        if lines
        else "No loss is scored yet.\n\n"
    )
    refusals = [
        f"- generation {r['generation']}: {r['reason']} ({r['detail']})" for r in refused[-max_refused:]
    ]
    refused_text = "Recent proposals that were refused:\n" + "\n".join(refusals) + "\n\n" if refusals else ""
    return PROMPT.format(
        beta_hint=beta_hint,
        torch_functions=", ".join(sorted(TORCH_FUNCTIONS)),
        functional=", ".join(sorted(FUNCTIONAL_FUNCTIONS)),
        tensor=", ".join(sorted(TENSOR_ATTRIBUTES)),
        builtins=", ".join(SAFE_BUILTINS),
        max_range=MAX_RANGE,
        score_key=score_key,
        table=table_text,
        refused=refused_text,
    )


_NOT_SCORES = {"name", "generation", "code", "loss_function"}


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


# ---------------------------------------------------------------------------------------------------
# The search loop


class LossFailed(Exception):
    """Raise it from ``evaluate`` when training or scoring failed because of the loss itself (non-finite
    values in training, say): the proposal is recorded as refused (reason ``evaluate``) and the search goes
    on. Any other exception stops the search; a rerun then evaluates the same proposal again."""


@dataclass
class Discovery:
    """A finished (or resumed and finished) search."""

    table: list[dict]  # seed rows and accepted proposals, best first
    records: list[dict]  # one per generation, as in discovery.jsonl
    refusals: dict[str, int]  # refused proposals by reason
    log_path: Path
    summary_path: Path


def discover(
    n_generations: int,
    propose: Callable[[str], str],
    evaluate: Callable[[str], dict],
    log_path: str | Path,
    *,
    seed_table: Sequence[dict] = (),
    score_key: str = "win_rate",
    sandbox: LossSandbox | None = None,
    beta_hint: str = "0.1 by default",
    log: Callable[[str], None] = logger.info,
) -> Discovery:
    """Run the search until ``n_generations`` proposals are recorded in ``log_path`` (``discovery.jsonl``).

    Each generation: ``propose(prompt)`` returns the LLM's reply; its code block is checked statically
    (``check_source``), then unit-checked in ``sandbox``; a loss that passes is saved under
    ``<log folder>/losses/`` and ``evaluate("<file>.py:<function>")`` trains and scores it, returning a row
    (a dict, ranked by ``row[score_key]``, higher first). One JSON line per generation is appended and
    flushed when it is finished. A proposal that passed its checks is kept in ``discovery.pending.json``
    while it is evaluated, so an interruption loses no proposal: a rerun with the same ``log_path`` rebuilds
    the table from the log, evaluates the pending proposal, and asks only for the generations not done.
    ``seed_table`` holds rows of known losses (e.g. the loss sweep's ranking) shown to the proposer.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    pending_path = log_path.with_name("discovery.pending.json")
    summary_path = log_path.with_name("discovery_summary.json")
    records = read_log(log_path)
    if records:
        log(f"discovery: resuming after generation {len(records)} of {n_generations} ({log_path})")
    own_sandbox = sandbox is None
    sandbox = LossSandbox() if own_sandbox else sandbox
    if len(records) < n_generations:
        sandbox.start()  # it imports torch while the first proposal is written
    try:
        for generation in range(len(records) + 1, n_generations + 1):
            record = _pending(pending_path, generation)
            if record is None:
                refused = [{"generation": r["generation"], **r["refusal"]} for r in records if r["refusal"]]
                table = rank(seed_table, records, score_key)
                prompt = build_prompt(table, refused, score_key=score_key, beta_hint=beta_hint)
                record = _propose_and_check(generation, prompt, propose, sandbox, log_path.parent / "losses")
            if record["status"] == "checked":
                files.write_text(pending_path, json.dumps(record))
                _evaluate(record, evaluate)
            _append(log_path, record)
            pending_path.unlink(missing_ok=True)
            records.append(record)
            refusal, row = record["refusal"], record["row"]
            outcome = refusal["reason"] if refusal else f"{score_key}={_short(row.get(score_key))}"
            name = record["function"] or "?"
            log(f"discovery: generation {generation}/{n_generations} {name}: {record['status']} ({outcome})")
    finally:
        if own_sandbox:
            sandbox.close()
    table = rank(seed_table, records, score_key)
    refusals = dict(Counter(r["refusal"]["reason"] for r in records if r["refusal"]).most_common())
    accepted = sum(r["status"] == "accepted" for r in records)
    summary = {
        "generations": len(records),
        "accepted": accepted,
        "refusals": refusals,
        "score_key": score_key,
        "table": table,
    }
    files.write_text(summary_path, json.dumps(summary, indent=2) + "\n")
    log(f"discovery: {accepted} of {len(records)} proposals accepted; refused by reason: {refusals}")
    return Discovery(table, records, refusals, log_path, summary_path)


def _propose_and_check(
    generation: int, prompt: str, propose: Callable[[str], str], sandbox: LossSandbox, loss_folder: Path
) -> dict:
    """Ask for one proposal and check it: a record with status ``checked`` (ready to evaluate, its loss
    file written) or ``refused``."""
    start = time.perf_counter()
    reply = propose(prompt)
    seconds = {"propose": round(time.perf_counter() - start, 3)}
    code = extract_code(reply)
    record = {
        "generation": generation,
        "status": "refused",
        "function": None,
        "code": code,
        "reply": reply,
        "checks": {},
        "stats": {},
        "refusal": None,
        "loss_function": None,
        "row": None,
        "seconds": seconds,
    }
    start = time.perf_counter()
    try:
        function = record["function"] = check_source(code)
    except ProposalRefused as refusal:
        record.update(checks={"static": False}, refusal={"reason": refusal.reason, "detail": refusal.detail})
    else:
        verdict = sandbox.check(code, function)
        record.update(checks={"static": True, **verdict["checks"]}, stats=verdict["stats"])
        if verdict["passed"]:
            record.update(
                status="checked", loss_function=write_loss_file(loss_folder, generation, code, function)
            )
        else:
            record["refusal"] = {"reason": verdict["reason"], "detail": verdict["detail"]}
    seconds["check"] = round(time.perf_counter() - start, 3)
    return record


def _evaluate(record: dict, evaluate: Callable[[str], dict]) -> None:
    """Train and score a checked proposal: status ``accepted`` with its row, or ``refused`` (``evaluate``)."""
    start = time.perf_counter()
    try:
        row = evaluate(record["loss_function"])
    except LossFailed as err:
        record.update(status="refused", refusal={"reason": "evaluate", "detail": str(err)[:300]})
    else:
        if not isinstance(row, dict):
            raise TypeError(f"evaluate must return a dict (a table row), got {type(row).__name__}")
        record.update(status="accepted", row=files.to_jsonable(row))
    record["seconds"]["evaluate"] = round(time.perf_counter() - start, 3)


def _pending(path: Path, generation: int) -> dict | None:
    """The checked proposal of ``generation`` left by an interrupted evaluation, if any (a stale one goes)."""
    if not path.exists():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("generation") == generation and record.get("status") == "checked":
        return record
    path.unlink()
    return None


def _append(path: Path, record: dict) -> None:
    """One line in a single write on an O_APPEND descriptor, so a crash leaves whole lines (or one cut
    short at the end, which ``read_log`` drops)."""
    line = json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def read_log(path: str | Path) -> list[dict]:
    """The records of ``discovery.jsonl``, generation 1, 2, ... in order. A last line cut short by a crash
    is removed from the file (and logged); any other bad line raises ValueError naming it."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    records, offset = [], 0
    for number, line in enumerate(data.splitlines(keepends=True), 1):
        try:
            record = json.loads(line)
            generation = record["generation"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            if offset + len(line) == len(data) and not line.endswith(b"\n"):
                logger.warning("%s: line %d was cut short by a crash; dropped", path, number)
                os.truncate(path, offset)
                break
            raise ValueError(f"{path}: line {number} is not a discovery record") from None
        if generation != len(records) + 1:
            raise ValueError(f"{path}: line {number} is generation {generation}, expected {len(records) + 1}")
        records.append(record)
        offset += len(line)
    return records


def rank(seed_table: Sequence[dict], records: Sequence[dict], score_key: str) -> list[dict]:
    """Seed rows and accepted proposals as table rows, best ``score_key`` first (rows without one last)."""
    rows = [dict(row) for row in seed_table]
    for record in records:
        if record["status"] == "accepted":
            scores = {key: value for key, value in record["row"].items() if key not in _NOT_SCORES}
            own = {"name": record["function"], "generation": record["generation"]}
            rows.append({**own, **scores, "loss_function": record["loss_function"], "code": record["code"]})

    def key(row: dict) -> tuple[bool, float]:
        score = row.get(score_key)
        usable = isinstance(score, (int, float)) and not isinstance(score, bool) and score == score
        return (not usable, -score if usable else 0.0)

    return sorted(rows, key=key)
