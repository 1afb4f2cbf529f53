"""The OpenAI-compatible chat-completions judge: one request per pair and order, concurrent, with counted
retries."""

from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from align_kit.judges import (
    JudgeConfig,
    JudgeStats,
    PairItem,
    Verdict,
    judge_identity,
    parse_verdict,
    render_prompt,
)


class JudgeRequestError(RuntimeError):
    """A request that still failed after all retries; verdicts already cached are kept."""


class OpenAIJudge:
    """An OpenAI-compatible chat-completions judge.

    The client runs with ``max_retries=0``; this class retries timeouts, 429, 5xx and connection
    errors itself, waiting ``min(backoff_max, backoff_base * 2**attempt)`` scaled by a random factor
    in [0.5, 1] (or the server's Retry-After when longer), and counts every request and retry.
    """

    def __init__(self, config: JudgeConfig, template: str, client: Any = None):
        self.config, self.template = config, template
        self.name, self.batch_size = config.name, config.batch_size
        self.identity = judge_identity(config, template)
        self.stats = JudgeStats()
        self._lock = threading.Lock()
        if client is None:
            from openai import OpenAI

            key = "EMPTY"
            if config.api_key_env:
                key = os.environ.get(config.api_key_env, "")
                if not key:
                    raise ValueError(
                        f"judge {config.name}: set the environment variable {config.api_key_env}"
                    )
            client = OpenAI(base_url=config.base_url, api_key=key, max_retries=0, timeout=config.timeout)
        self.client = client

    def _count(self, **increments: int) -> None:
        with self._lock:
            for key, value in increments.items():
                setattr(self.stats, key, getattr(self.stats, key) + value)

    def messages(self, item: PairItem) -> list[dict[str, str]]:
        messages = (
            [{"role": "system", "content": self.config.system_prompt}] if self.config.system_prompt else []
        )
        messages.append({"role": "user", "content": render_prompt(self.template, item)})
        return messages

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        wait = min(self.config.backoff_max, self.config.backoff_base * 2**attempt) * random.uniform(0.5, 1.0)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.config.backoff_max))
        return wait

    def ask(self, item: PairItem) -> Verdict:
        """One pair, one order, retried as configured; raises JudgeRequestError when retries run out."""
        import openai

        for attempt in range(self.config.max_retries + 1):
            self._count(requests=1)
            retry_after = None
            try:
                response = self.client.chat.completions.create(
                    model=self.config.model,
                    messages=self.messages(item),
                    temperature=self.config.temperature,
                    max_tokens=self.config.max_new_tokens,
                )
            except openai.APITimeoutError as err:  # before APIConnectionError, its parent class
                self._count(timeouts=1)
                error: Exception = err
            except openai.RateLimitError as err:
                self._count(rate_limited=1)
                retry_after = _retry_after_seconds(err.response)
                error = err
            except openai.InternalServerError as err:
                self._count(server_errors=1)
                error = err
            except openai.APIConnectionError as err:
                self._count(connection_errors=1)
                error = err
            else:
                text = response.choices[0].message.content if response.choices else None
                verdict = parse_verdict(
                    text, self.config.labels, self.config.tie_label, self.config.parse_regex
                )
                if verdict is None:
                    self._count(parse_failures=1)
                return verdict
            if attempt == self.config.max_retries:
                raise JudgeRequestError(
                    f"judge {self.name}: gave up after {attempt + 1} attempts: {type(error).__name__}: {error}"
                ) from error
            self._count(retries=1)
            time.sleep(self._backoff(attempt, retry_after))
        raise AssertionError("unreachable")

    def judge_batch(self, items: list[PairItem]) -> list[Verdict]:
        self._count(calls=len(items))
        if not items:
            return []
        with ThreadPoolExecutor(max_workers=min(self.config.max_concurrency, len(items))) as pool:
            return list(pool.map(self.ask, items))


def _retry_after_seconds(response: Any) -> float | None:
    try:
        return float(response.headers.get("retry-after"))
    except (AttributeError, TypeError, ValueError):
        return None
