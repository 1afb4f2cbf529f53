"""The OpenAI-compatible chat-completions client (``OpenAIClient``) and its transport.

One client serves every endpoint align-kit talks to: a judge (``judges.backends.OpenAIJudge``), a served
system under evaluation (``align_kit.evaluation.served``) and the loss proposer (``align_kit.loss_lab.discovery``), so
all get the same metering, budget, proxy and retry handling.

The openai client does the retrying (timeouts, connection errors, 408/409/429/5xx; backoff from 0.5 s
doubling to 8 s, or the server's Retry-After). Under it, ``_GuardedTransport`` sees every HTTP attempt
and

- counts requests, retries, timeouts, 429s, 5xx and connection errors into the client's ``JudgeStats``;
- turns a 2xx reply that is not a chat completion (malformed JSON, an HTML page, no ``choices``) into a
  server fault: counted as a bad body with its first bytes, retried like a 5xx, never handed on as an
  answer (so never cached as a verdict or a parse failure);
- stops at once, with the server's own message, on failures that no retry can fix: a 4xx other than
  408/409/429 (the client does not retry those; a 401/403 is ``EndpointRefused``, a user's mistake) and
  a 5xx whose message says the prompt is longer than the model's context or the model has no chat
  template; a refused connection stops after ``REFUSED_ATTEMPTS`` attempts with "nothing listening at URL";
- holds the requests in flight to what the server takes (``_InFlightLimit``): from 1, doubled while
  requests succeed, halved after a timeout or 429, then raised by one per round of successes;
- checks the budget (``max_requests``, ``max_cost``) before each attempt.

``OpenAIClient.stream`` hands back each answer as it arrives, so a caller caches it at once; when a
request fails for good, no new request starts, the ones in flight finish and are handed back, then the
error is raised.
"""

from __future__ import annotations

import json
import os
import re
import threading
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, TypeVar

import httpx2
import openai

from align_kit.configs import ConfigError
from align_kit.judges.protocol import (
    JudgeStats,
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
BAD_BODY_STATUS = 502  # a 2xx reply that is no chat completion is handed to the openai client as this
BAD_BODY_HEADER = "x-align-kit-bad-body"
BAD_BODY_BYTES = 80  # how much of a bad body the traffic table and the error line show
Item = TypeVar("Item")
Answer = TypeVar("Answer")


class JudgeRequestError(RuntimeError):
    """A request that failed for good (permanent error, retries spent, nothing listening); the answers
    handed back before it are kept."""


class JudgeBudgetExceeded(JudgeRequestError):
    """The ``max_requests`` or ``max_cost`` budget was reached; every answer paid for was handed back."""


class EndpointRefused(JudgeRequestError, ConfigError):
    """A 401 or 403: the key (or its permissions) is wrong; the user's to fix, printed as one line."""


class _Stop(openai.OpenAIError):
    """Raised under the openai client, which passes its own error type up without retrying."""

    def __init__(self, error: JudgeRequestError | None):  # None: the run is stopping for another reason
        super().__init__(str(error))
        self.error = error


class OpenAIClient:
    """One OpenAI-compatible chat-completions endpoint, metered (see the module docstring).

    ``settings`` holds the endpoint fields of ``JudgeConfig``: ``model``, ``base_url``, ``api_key_env``,
    ``timeout``, ``max_retries`` and, where it has them, ``max_concurrency`` (default 1), ``max_requests``,
    ``max_cost`` and the two prices per million tokens. ``role`` names the client in every message
    ("judge", "system", "proposer").
    """

    def __init__(self, name: str, settings: Any, role: str = "judge"):
        self.name, self.settings, self.role = name, settings, role
        self.url = settings.base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        self.max_concurrency = getattr(settings, "max_concurrency", 1)
        self.stats = JudgeStats()
        self.in_flight = _InFlightLimit(self.max_concurrency)
        self._lock = threading.Lock()
        self.halt = threading.Event()
        self.client: openai.OpenAI | None = None  # made on first use: a rerun from the cache needs no key

    def connect(self) -> openai.OpenAI:
        """The openai client over the guarded transport, made once (in the caller's thread)."""
        if self.client is not None:
            return self.client
        settings = self.settings
        key = "EMPTY"
        if settings.api_key_env:
            key = os.environ.get(settings.api_key_env, "")
            if not key:
                raise ValueError(
                    f"{self.role} {self.name}: set the environment variable {settings.api_key_env}"
                )
        # httpx reads proxies from the environment only when it builds its own transport, so the inner one
        # is given the environment's proxy for this URL
        inner = httpx2.HTTPTransport(
            proxy=_environment_proxy(self.url),
            limits=httpx2.Limits(max_connections=None, max_keepalive_connections=self.max_concurrency),
        )
        self.client = openai.OpenAI(
            base_url=self.url,
            api_key=key,
            max_retries=settings.max_retries,
            timeout=settings.timeout,
            http_client=openai.DefaultHttpxClient(transport=_GuardedTransport(self, inner)),
        )
        return self.client

    def count(self, **increments: float) -> None:
        with self._lock:
            for key, value in increments.items():
                setattr(self.stats, key, getattr(self.stats, key) + value)

    def where(self) -> str:
        return f"{self.role} {self.name} at {self.url}"

    # -- one request --------------------------------------------------------------------------------

    def start_request(self, is_retry: bool) -> None:
        """Count one HTTP attempt, or refuse it: the run is stopping, or the budget is spent."""
        if self.halt.is_set():
            raise _Stop(None)
        max_requests = getattr(self.settings, "max_requests", None)
        max_cost = getattr(self.settings, "max_cost", None)
        with self._lock:
            if max_requests is not None and self.stats.requests >= max_requests:
                raise self.stop(f"{self.where()}: max_requests={max_requests} reached", budget=True)
            if max_cost is not None and self.stats.cost >= max_cost:
                spent = f"spent {self.stats.cost:.6g}"
                raise self.stop(f"{self.where()}: max_cost={max_cost} reached ({spent})", budget=True)
            self.stats.requests += 1
            self.stats.retries += is_retry

    def stop(self, message: str, budget: bool = False) -> _Stop:
        """Halt the run (no new request starts) and wrap its error for raising under the openai client."""
        self.halt.set()
        return _Stop((JudgeBudgetExceeded if budget else JudgeRequestError)(message))

    def complete(self, messages: list[dict[str, str]], **request: Any) -> Any:
        """One chat completion (``request`` adds fields such as temperature or max_tokens), its tokens
        and cost counted; raises JudgeRequestError when it fails for good."""
        attempts = self.settings.max_retries + 1
        try:
            response = self.connect().chat.completions.create(
                model=self.settings.model, messages=messages, **request
            )
        except _Stop as stop:
            raise stop.error or _Halted() from None
        except openai.APITimeoutError as err:  # before APIConnectionError, its parent class
            raise JudgeRequestError(
                f"{self.where()}: no answer within {self.settings.timeout} s in any of {attempts} attempts"
            ) from err
        except openai.APIConnectionError as err:
            raise JudgeRequestError(
                f"{self.where()}: connection failed {attempts} times: {_cause(err)}"
            ) from err
        except openai.APIStatusError as err:
            if err.response.headers.get(BAD_BODY_HEADER):
                raise JudgeRequestError(
                    f"{self.where()}: no chat completion in {attempts} attempts: {server_message(err.body)}"
                ) from err
            if err.status_code in (401, 403):
                key = self.settings.api_key_env
                hint = f"check the key in ${key}" if key else "no key was sent: api_key_env is null"
                raise EndpointRefused(
                    f"{self.where()}: HTTP {err.status_code}: {_reason(err)} ({hint})"
                ) from None
            retried = err.status_code in (408, 409, 429) or err.status_code >= 500
            after = f" after {attempts} attempts" if retried else ""
            raise JudgeRequestError(f"{self.where()}: HTTP {err.status_code}{after}: {_reason(err)}") from err
        self.meter(response)
        return response

    def meter(self, response: Any) -> None:
        """Count one response's tokens and cost (from the prices per million tokens)."""
        settings = self.settings
        usage = getattr(response, "usage", None)
        prompt_tokens = getattr(usage, "prompt_tokens", None) or 0
        completion_tokens = getattr(usage, "completion_tokens", None) or 0
        if usage is None and getattr(settings, "max_cost", None) is not None:
            raise JudgeRequestError(f"{self.where()}: the response has no usage, so max_cost cannot be kept")
        prices = (
            getattr(settings, "input_price_per_million", None),
            getattr(settings, "output_price_per_million", None),
        )
        cost = 0.0
        if None not in prices:
            cost = (prompt_tokens * prices[0] + completion_tokens * prices[1]) / 1e6
        self.count(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cost=cost)

    # -- many requests ------------------------------------------------------------------------------

    def stream(self, items: list[Item], ask: Callable[[Item], Answer]) -> Iterator[tuple[int, Answer]]:
        """``(index in items, ask(item))`` for each item, ``max_concurrency`` at a time, in the order the
        answers arrive.

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
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(items)))
        futures = {pool.submit(self._ask_unless_halted, ask, item): index for index, item in enumerate(items)}
        try:
            for future in as_completed(futures):
                try:
                    answer = future.result()
                except _Halted:
                    skipped += 1
                    continue
                except JudgeRequestError as err:
                    error = error or err
                    continue
                yield futures[future], answer
        finally:
            self.halt.set()  # also when the caller stops early: nothing new starts
            pool.shutdown(wait=True, cancel_futures=True)
        if error is not None:
            raise error
        if skipped:  # halted by a response that the client then retried after all (x-should-retry)
            raise JudgeRequestError(f"{self.where()}: {skipped} of {len(items)} requests not sent")

    def _ask_unless_halted(self, ask: Callable[[Item], Answer], item: Item) -> Answer:
        if self.halt.is_set():
            raise _Halted()
        try:
            return ask(item)
        except JudgeRequestError:
            self.halt.set()  # here, not in stream, so no worker starts another request meanwhile
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
    """Every HTTP attempt of the client passes here (see the module docstring)."""

    def __init__(self, client: OpenAIClient, inner: httpx2.BaseTransport):
        self.client, self.inner = client, inner

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        client = self.client
        attempt = int(request.headers.get("x-stainless-retry-count", "0"))
        with client.in_flight:  # a free slot, then the halt and budget checks, the request and its answer
            client.start_request(is_retry=attempt > 0)
            try:
                response = self.inner.handle_request(request)
            except httpx2.TimeoutException:
                client.count(timeouts=1)
                self._lower()
                raise
            except httpx2.TransportError as err:
                client.count(connection_errors=1)
                if _refused(err) and attempt + 1 >= REFUSED_ATTEMPTS:
                    raise client.stop(
                        f"{client.role} {client.name}: nothing listening at {client.url} (connection refused "
                        f"{attempt + 1} times; is the server running?)"
                    ) from err
                raise
            status = response.status_code
            if status == 429:
                client.count(rate_limited=1)
                self._lower()
            elif status >= 500:
                client.count(server_errors=1)
                response.read()
                message = server_message(_body(response))
                if PERMANENT_MESSAGE.search(message):
                    raise client.stop(f"{client.where()}: HTTP {status}: {message}")
            elif status >= 400 and status not in (408, 409):
                client.halt.set()  # the client raises it without a retry; no other request may start first
            elif 200 <= status < 300 and request.url.path.endswith("/chat/completions"):
                response.read()
                fault = not_a_completion(response.content)
                if fault is not None:
                    return self._bad_body(request, response, fault)
                client.in_flight.succeeded()
            else:
                client.in_flight.succeeded()
            return response

    def _bad_body(self, request: httpx2.Request, response: httpx2.Response, fault: str) -> httpx2.Response:
        """A 2xx reply that is no chat completion, counted with its first bytes and handed to the openai
        client as a 5xx so that it retries (and in the end raises) as it does for a server error."""
        first = response.content[:BAD_BODY_BYTES].decode("utf-8", errors="replace")
        with self.client._lock:
            self.client.stats.bad_bodies += 1
            self.client.stats.first_bad_body = self.client.stats.first_bad_body or first
        message = f"HTTP {response.status_code} with {fault}, first bytes {first!r}"
        return httpx2.Response(
            BAD_BODY_STATUS,
            json={"error": {"message": message}},
            headers={BAD_BODY_HEADER: "1"},
            request=request,
        )

    def _lower(self) -> None:
        self.client.in_flight.lower()
        self.client.stats.lowest_concurrency = self.client.in_flight.lowest

    def close(self) -> None:
        self.inner.close()


# ---------------------------------------------------------------------------------------------------
# Reading answers and errors


def not_a_completion(content: bytes) -> str | None:
    """What is wrong with a 2xx body that should be a chat completion, or None when it is one."""
    try:
        body = json.loads(content)
    except ValueError:
        return "a body that is not JSON"
    if not isinstance(body, dict):
        return f"a JSON {type(body).__name__}, not an object"
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        return "no choices"
    if not isinstance(choices[0], dict) or not isinstance(choices[0].get("message"), dict):
        return "a choice without a message"
    return None


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
