"""The OpenAI-compatible chat-completions judge: one request per pair and order, concurrent.

The openai client does the retrying (timeouts, connection errors, 408/409/429/5xx; backoff from 0.5 s
doubling to 8 s, or the server's Retry-After). Under it, ``_GuardedTransport`` sees every HTTP attempt
and

- counts requests, retries, timeouts, 429s, 5xx and connection errors into the judge's ``JudgeStats``;
- stops at once, with the server's own message, on failures that no retry can fix: a 4xx other than
  408/409/429 (the client does not retry those) and a 5xx whose message says the prompt is longer than
  the model's context or the model has no chat template; a refused connection stops after
  ``REFUSED_ATTEMPTS`` attempts with "nothing listening at URL";
- holds the requests in flight to what the server takes (``_InFlightLimit``): from 1, doubled while
  requests succeed, halved after a timeout or 429, then raised by one per round of successes;
- checks the budget (``max_requests``, ``max_cost``) before each attempt.

``judge_stream`` hands back each reply as it arrives, so a caller caches it at once; when a request
fails for good, no new request starts, the ones in flight finish and are handed back, then the error
is raised. ``judge_batch`` (the ``Judge`` protocol) returns the replies as a list.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import httpx2
import openai

from align_kit.judges.config import JudgeConfig, judge_identity
from align_kit.judges.protocol import (
    JudgeStats,
    PairItem,
    Reply,
    parse_verdict,
    render_prompt,
    verdict_from_margin,
)

REFUSED_ATTEMPTS = 3  # a refused connection is tried this often (about 1.5 s of backoff), then the run stops
# What OpenAI, vLLM, llama.cpp and transformers' own errors say; transformers serve 5.23 itself answers a
# too-long prompt or a missing chat template with a bare "Internal Server Error" (retried, then explained).
PERMANENT_MESSAGE = re.compile(
    r"context.length|maximum context|context window|available context|chat.template", re.IGNORECASE
)
BARE_500_HINT = (
    "the server gave no reason; transformers serve answers this way for a prompt longer than the model's "
    "context, a model without a chat template, or a model it cannot load; its log names the cause"
)


class JudgeRequestError(RuntimeError):
    """A request that failed for good (permanent error, retries spent, nothing listening); the verdicts
    handed back before it are kept."""


class JudgeBudgetExceeded(JudgeRequestError):
    """The judge's ``max_requests`` or ``max_cost`` was reached; every verdict paid for was handed back."""


class _Stop(openai.OpenAIError):
    """Raised under the openai client, which passes its own error type up without retrying."""

    def __init__(self, error: JudgeRequestError | None):  # None: the run is stopping for another reason
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True)
class JudgeReply(Reply):
    """A ``Reply`` (verdict, raw text, rationale in mode: reason) with what only this backend knows."""

    margin: float | None = None  # verdict_from: logprobs, logprob(label A) - logprob(label B)
    prompt_tokens: int = 0
    completion_tokens: int = 0


class OpenAIJudge:
    """An OpenAI-compatible chat-completions judge (see the module docstring).

    ``replies`` keeps the reply (raw text, rationale, margin, tokens) of every pair this judge answered,
    keyed by its ``PairItem``.
    """

    def __init__(self, config: JudgeConfig, template: str):
        self.config, self.template = config, template
        self.name, self.batch_size = config.name, config.batch_size
        self.identity = judge_identity(config, template)
        self.url = config.base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        self.stats = JudgeStats()
        self.replies: dict[PairItem, JudgeReply] = {}
        self.in_flight = _InFlightLimit(config.max_concurrency)
        self._lock = threading.Lock()
        self.halt = threading.Event()
        self.client: openai.OpenAI | None = None  # made on first use: a rerun from the cache needs no key

    def connect(self) -> openai.OpenAI:
        """The openai client over the guarded transport, made once (in the caller's thread)."""
        if self.client is not None:
            return self.client
        config = self.config
        key = "EMPTY"
        if config.api_key_env:
            key = os.environ.get(config.api_key_env, "")
            if not key:
                raise ValueError(f"judge {config.name}: set the environment variable {config.api_key_env}")
        # httpx reads proxies from the environment only when it builds its own transport, so the inner one
        # is given the environment's proxy for this URL
        inner = httpx2.HTTPTransport(
            proxy=_environment_proxy(self.url),
            limits=httpx2.Limits(max_connections=None, max_keepalive_connections=config.max_concurrency),
        )
        self.client = openai.OpenAI(
            base_url=self.url,
            api_key=key,
            max_retries=config.max_retries,
            timeout=config.timeout,
            http_client=openai.DefaultHttpxClient(transport=_GuardedTransport(self, inner)),
        )
        return self.client

    def count(self, **increments: float) -> None:
        with self._lock:
            for key, value in increments.items():
                setattr(self.stats, key, getattr(self.stats, key) + value)

    def where(self) -> str:
        return f"judge {self.name} at {self.url}"

    def messages(self, item: PairItem) -> list[dict[str, str]]:
        messages = (
            [{"role": "system", "content": self.config.system_prompt}] if self.config.system_prompt else []
        )
        messages.append({"role": "user", "content": render_prompt(self.template, item)})
        return messages

    # -- one request --------------------------------------------------------------------------------

    def start_request(self, is_retry: bool) -> None:
        """Count one HTTP attempt, or refuse it: the run is stopping, or the budget is spent."""
        if self.halt.is_set():
            raise _Stop(None)
        config = self.config
        with self._lock:
            if config.max_requests is not None and self.stats.requests >= config.max_requests:
                raise self.stop(f"{self.where()}: max_requests={config.max_requests} reached", budget=True)
            if config.max_cost is not None and self.stats.cost >= config.max_cost:
                spent = f"spent {self.stats.cost:.6g}"
                raise self.stop(f"{self.where()}: max_cost={config.max_cost} reached ({spent})", budget=True)
            self.stats.requests += 1
            self.stats.retries += is_retry

    def stop(self, message: str, budget: bool = False) -> _Stop:
        """Halt the run (no new request starts) and wrap its error for raising under the openai client."""
        self.halt.set()
        return _Stop((JudgeBudgetExceeded if budget else JudgeRequestError)(message))

    def ask(self, item: PairItem) -> JudgeReply:
        """One pair in one order; raises JudgeRequestError when it fails for good."""
        config = self.config
        request: dict[str, Any] = {
            "model": config.model,
            "messages": self.messages(item),
            "temperature": config.temperature,
            config.max_tokens_field: config.max_new_tokens,
        }
        if config.verdict_from == "logprobs":
            request.update(logprobs=True, top_logprobs=config.top_logprobs)
        try:
            response = self.connect().chat.completions.create(**request)
        except _Stop as stop:
            raise stop.error or _Halted() from None
        except openai.APITimeoutError as err:  # before APIConnectionError, its parent class
            raise JudgeRequestError(
                f"{self.where()}: no answer within {config.timeout} s in any of {config.max_retries + 1} attempts"
            ) from err
        except openai.APIConnectionError as err:
            raise JudgeRequestError(
                f"{self.where()}: connection failed {config.max_retries + 1} times: {_cause(err)}"
            ) from err
        except openai.APIStatusError as err:
            retried = err.status_code in (408, 409, 429) or err.status_code >= 500
            attempts = f" after {config.max_retries + 1} attempts" if retried else ""
            raise JudgeRequestError(
                f"{self.where()}: HTTP {err.status_code}{attempts}: {_reason(err)}"
            ) from err
        return self.reply(response)

    def reply(self, response: Any) -> JudgeReply:
        """Verdict, text and tokens of one response; counts tokens, cost and parse failures."""
        config = self.config
        choice = response.choices[0] if response.choices else None
        text = choice.message.content if choice is not None else None
        usage = getattr(response, "usage", None)
        prompt_tokens = getattr(usage, "prompt_tokens", None) or 0
        completion_tokens = getattr(usage, "completion_tokens", None) or 0
        if usage is None and config.max_cost is not None:
            raise JudgeRequestError(f"{self.where()}: the response has no usage, so max_cost cannot be kept")
        cost = 0.0
        if config.input_price_per_million is not None and config.output_price_per_million is not None:
            cost = (
                prompt_tokens * config.input_price_per_million
                + completion_tokens * config.output_price_per_million
            )
            cost /= 1e6
        self.count(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cost=cost)
        tokens = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        margin = label_margin(choice, config.labels) if config.verdict_from == "logprobs" else None
        if margin is not None:
            return JudgeReply(verdict_from_margin(margin, config.tie_margin), text, margin=margin, **tokens)
        if config.verdict_from == "logprobs":
            self.count(logprob_fallbacks=1)
        regex = config.parse_regex if config.parser == "regex" else None
        verdict = parse_verdict(text, config.labels, config.tie_label, regex)
        if verdict is None:
            self.count(parse_failures=1)
        rationale = rationale_of(text, regex) if config.mode == "reason" else None
        return JudgeReply(verdict, text, rationale, **tokens)

    # -- many requests ------------------------------------------------------------------------------

    def judge_stream(self, items: list[PairItem]) -> Iterator[tuple[int, JudgeReply]]:
        """``(index in items, reply)`` for each pair, in the order the answers arrive.

        After the first failure no new request starts; the requests in flight finish and are handed
        back, then that failure is raised (a JudgeBudgetExceeded when the budget stopped the run).
        """
        self.count(calls=len(items))
        if not items:
            return
        self.connect()
        self.halt.clear()
        error: JudgeRequestError | None = None
        skipped = 0
        pool = ThreadPoolExecutor(max_workers=min(self.config.max_concurrency, len(items)))
        futures = {pool.submit(self._ask_unless_halted, item): index for index, item in enumerate(items)}
        try:
            for future in as_completed(futures):
                try:
                    reply = future.result()
                except _Halted:
                    skipped += 1
                    continue
                except JudgeRequestError as err:
                    error = error or err
                    continue
                self.replies[items[futures[future]]] = reply
                yield futures[future], reply
        finally:
            self.halt.set()  # also when the caller stops early: nothing new starts
            pool.shutdown(wait=True, cancel_futures=True)
        if error is not None:
            raise error
        if skipped:  # halted by a response that the client then retried after all (x-should-retry)
            raise JudgeRequestError(f"{self.where()}: {skipped} of {len(items)} pairs not asked")

    def judge_batch(self, items: list[PairItem]) -> list[JudgeReply]:
        """One reply per item; raises as ``judge_stream`` does, after all replies it got are in ``replies``."""
        replies: dict[int, JudgeReply] = dict(self.judge_stream(items))
        return [replies[index] for index in range(len(items))]

    def _ask_unless_halted(self, item: PairItem) -> JudgeReply:
        if self.halt.is_set():
            raise _Halted()
        try:
            return self.ask(item)
        except JudgeRequestError:
            self.halt.set()  # here, not in judge_stream, so no worker starts another request meanwhile
            raise


class _Halted(Exception):
    """A request not sent (or not retried) because the run is stopping."""


class _InFlightLimit:
    """At most ``limit`` requests in flight, found as TCP finds its window: ``limit`` starts at 1 and
    doubles after each ``limit`` successes in a row up to ``threshold``, then grows by one per ``limit``
    successes, never above ``maximum``; a timeout or 429 halves it and sets ``threshold`` there. Starting
    small keeps a slow server from collecting a backlog of requests its clients already gave up on."""

    def __init__(self, maximum: int):
        self.maximum = self.threshold = self.lowest = maximum  # lowest: the smallest limit after a cut
        self.limit, self.active, self.successes = 1, 0, 0
        self._condition = threading.Condition()

    def __enter__(self) -> None:
        with self._condition:
            self._condition.wait_for(lambda: self.active < self.limit)
            self.active += 1

    def __exit__(self, *exc: object) -> None:
        with self._condition:
            self.active -= 1
            self._condition.notify_all()

    def lower(self) -> None:
        with self._condition:
            self.limit = self.threshold = max(1, self.limit // 2)
            self.lowest = min(self.lowest, self.limit)
            self.successes = 0

    def succeeded(self) -> None:
        with self._condition:
            self.successes += 1
            if self.successes >= self.limit and self.limit < self.maximum:
                grown = 2 * self.limit if self.limit < self.threshold else self.limit + 1
                self.limit, self.successes = min(grown, self.maximum), 0
                self._condition.notify_all()


class _GuardedTransport(httpx2.BaseTransport):
    """Every HTTP attempt of the judge's client passes here (see the module docstring)."""

    def __init__(self, judge: OpenAIJudge, inner: httpx2.BaseTransport):
        self.judge, self.inner = judge, inner

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        judge = self.judge
        attempt = int(request.headers.get("x-stainless-retry-count", "0"))
        with judge.in_flight:  # a free slot, then the halt and budget checks, the request and its verdict
            judge.start_request(is_retry=attempt > 0)
            try:
                response = self.inner.handle_request(request)
            except httpx2.TimeoutException:
                judge.count(timeouts=1)
                self._lower()
                raise
            except httpx2.TransportError as err:
                judge.count(connection_errors=1)
                if _refused(err) and attempt + 1 >= REFUSED_ATTEMPTS:
                    raise judge.stop(
                        f"judge {judge.name}: nothing listening at {judge.url} (connection refused "
                        f"{attempt + 1} times; is the server running?)"
                    ) from err
                raise
            status = response.status_code
            if status == 429:
                judge.count(rate_limited=1)
                self._lower()
            elif status >= 500:
                judge.count(server_errors=1)
                response.read()
                message = server_message(_body(response))
                if PERMANENT_MESSAGE.search(message):
                    raise judge.stop(f"{judge.where()}: HTTP {status}: {message}")
            elif status >= 400 and status not in (408, 409):
                judge.halt.set()  # the client raises it without a retry; no other request may start first
            else:
                judge.in_flight.succeeded()
            return response

    def _lower(self) -> None:
        self.judge.in_flight.lower()
        self.judge.stats.lowest_concurrency = self.judge.in_flight.lowest

    def close(self) -> None:
        self.inner.close()


# ---------------------------------------------------------------------------------------------------
# Reading answers and errors


def label_margin(choice: Any, labels: list[str]) -> float | None:
    """log P(label A) - log P(label B) at the first answer token, from its top_logprobs (tokens that
    spell the same label, such as '1' and ' 1', are summed); None when either label is not listed."""
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not content:
        return None
    by_label: dict[str, list[float]] = {label.strip(): [] for label in labels}
    for candidate in content[0].top_logprobs or []:
        if candidate.token.strip() in by_label:
            by_label[candidate.token.strip()].append(candidate.logprob)
    first, second = (by_label[label.strip()] for label in labels)
    if not first or not second:
        return None
    return _logsumexp(first) - _logsumexp(second)


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def rationale_of(text: str | None, regex: str | None) -> str | None:
    """mode: reason: the regex's group 'rationale', else the text before the verdict; None without a match."""
    if text is None or regex is None:
        return None
    match = re.fullmatch(regex, text.strip(), flags=re.DOTALL)
    if match is None:
        return None
    if "rationale" in match.re.groupindex:
        return (match.group("rationale") or "").strip()
    group = "verdict" if "verdict" in match.re.groupindex else 1
    return match.string[: match.start(group)].strip()


def server_message(body: Any) -> str:
    """The server's own explanation from an error body: OpenAI's error.message, FastAPI's detail, or text."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            for key in ("message", "detail", "msg"):
                if inner.get(key):
                    return inner[key] if isinstance(inner[key], str) else json.dumps(inner[key])
            return json.dumps(body)
        return str(inner)
    return str(body or "").strip()


def _body(response: httpx2.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def _reason(err: openai.APIStatusError) -> str:
    message = server_message(err.body) or "(no message)"
    return f"{message} ({BARE_500_HINT})" if message == "Internal Server Error" else message


def _cause(err: BaseException) -> str:
    """The innermost reason in an exception's chain, e.g. 'Server disconnected without sending a response.'"""
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {err}"


def _refused(err: BaseException) -> bool:
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _environment_proxy(url: str) -> str | None:
    """The proxy that ``HTTP(S)_PROXY``/``ALL_PROXY`` name for ``url``, unless ``NO_PROXY`` exempts it."""
    parsed = httpx2.URL(url)
    if urllib.request.proxy_bypass(parsed.host):
        return None
    proxies = urllib.request.getproxies()
    return proxies.get(parsed.scheme) or proxies.get("all")
