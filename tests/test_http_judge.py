"""Protects the OpenAI-compatible judge against a loopback HTTP server on 127.0.0.1: requests follow the
chat-completions protocol; the openai client's retries of timeouts, 429 and 5xx are counted; permanent
errors (4xx, a context-length 500) and a closed port stop the run at once with the judge, the URL and
the server's own message; verdicts are handed back (and cached) as they arrive even when their batch
fails; a one-request-at-a-time server gets a complete run with fewer requests in flight; budgets stop
a run after handing back what was paid for; logprob verdicts, reason mode, max_completion_tokens, token
and cost counts, raw answer texts; the cache key ignores where the server listens."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from servers import free_port

from align_kit.judges.backends import load_judge
from align_kit.judges.cache import JudgmentCache, cache_key
from align_kit.judges.config import JudgeConfig
from align_kit.judges.openai_client import (
    REFUSED_ATTEMPTS,
    JudgeBudgetExceeded,
    JudgeRequestError,
    OpenAIJudge,
)
from align_kit.judges.protocol import PairItem, judge_both_orders


class WideBacklogServer(ThreadingHTTPServer):
    """socketserver listens with a backlog of 5: more simultaneous connects than that drop SYNs, and
    each dropped one costs its client a 1 s retransmit, which would be timed as judge latency."""

    request_queue_size = 128


TEMPLATE = "Q: {instruction}\nR1: {output_1}\nR2: {output_2}\n"
CLIENT_TIMEOUT = 0.3
CONTEXT_MESSAGE = "This model's maximum context length is 256 tokens. However, you requested 400 tokens."
USAGE = {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}


class ChatServer:
    """Loopback chat-completions server. Markers in the question steer it:
    [slow] adds 0.15 s; [timeout-once] stalls past the client timeout on the first request,
    [timeout-always] on every one;
    [429-once], [500-twice], [429-always], [500-always] fail that often first (5xx and 429 carry
    retry-after-ms: 10); [late] adds 0.3 s before answering; [status:NNN] always answers NNN with an
    OpenAI-style error (422: FastAPI's detail list); [500-context] a 500 saying the context is too
    long; [500-bare] a plain-text 'Internal Server Error'; [junk] answers prose; [reason] a rationale
    then 'Verdict: N'; [close] and [one-label] shape the logprobs. Otherwise it answers '1' or '2' for
    the reply containing 'good', else 'tie'. ``one_at_a_time`` serves one request at a time, each
    taking ``latency`` seconds (as transformers serve does, also for clients that gave up)."""

    def __init__(self, one_at_a_time: bool = False, latency: float = 0.0):
        self.seen: Counter = Counter()  # requests per (question, reply 1)
        self.auth: set[str] = set()
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.serial = threading.Lock() if one_at_a_time else None
        self.latency = latency
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.auth.add(self.headers.get("Authorization", ""))
                    server.bodies.append(body)
                try:
                    if server.serial is not None:
                        with server.serial:
                            time.sleep(server.latency)
                            server.handle(self, body)
                    else:
                        server.handle(self, body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = WideBacklogServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def handle(self, request: BaseHTTPRequestHandler, body: dict) -> None:
        assert request.path == "/v1/chat/completions"
        content = body["messages"][-1]["content"]
        question, reply_1, reply_2 = re.fullmatch(
            r"Q: (.*)\nR1: (.*)\nR2: (.*)\n?", content, re.DOTALL
        ).groups()
        with self.lock:
            self.seen[(question, reply_1)] += 1
            n = self.seen[(question, reply_1)]
        if "[slow]" in question:
            time.sleep(0.15)
        if "[late]" in question:
            time.sleep(0.3)
        if ("[timeout-once]" in question and n == 1) or "[timeout-always]" in question:
            time.sleep(CLIENT_TIMEOUT * 3)
        status = re.search(r"\[status:(\d{3})\]", question)
        if status:
            code = int(status.group(1))
            if code == 422:
                detail = [{"loc": ["body", "messages"], "msg": "fake 422 reason", "type": "missing"}]
                return self.reply(request, code, {"detail": detail})
            return self.reply(request, code, {"error": {"message": f"fake {code} reason", "type": "invalid"}})
        if "[500-context]" in question:
            return self.reply(request, 500, {"error": {"message": CONTEXT_MESSAGE, "type": "server_error"}})
        if "[500-bare]" in question:
            return self.reply(request, 500, "Internal Server Error")
        if (
            ("[429-once]" in question and n == 1)
            or ("[500-twice]" in question and n <= 2)
            or "[500-always]" in question
            or "[429-always]" in question
        ):
            code = 429 if "[429" in question else 500
            return self.reply(request, code, {"error": {"message": "try again", "type": "server_error"}})
        if "[junk]" in question:
            answer = "I think Reply 1 is better."
        elif "good" in reply_1 and "good" not in reply_2:
            answer = "1"
        elif "good" in reply_2 and "good" not in reply_1:
            answer = "2"
        else:
            answer = "tie"
        if "[reason]" in question:
            answer = f"Reply {answer} is the good one.\nVerdict: {answer}"
        message = {"role": "assistant", "content": answer}
        choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
        if body.get("logprobs"):
            top = {"1": -0.1, "2": -2.4} if answer == "1" else {"1": -2.4, "2": -0.1}
            if "[close]" in question:
                top = {"1": -0.7, "2": -0.8}
            if "[one-label]" in question:
                top = {"1": -0.1, "x": -3.0}
            first = [{"token": t, "logprob": lp, "bytes": None} for t, lp in top.items()]
            token = {"token": answer[:1], "logprob": max(top.values()), "bytes": None, "top_logprobs": first}
            choice["logprobs"] = {"content": [token]}
        self.reply(
            request,
            200,
            {
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [choice],
                "usage": USAGE,
            },
        )

    @staticmethod
    def reply(request: BaseHTTPRequestHandler, status: int, payload: dict | str) -> None:
        data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        request.send_response(status)
        request.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
        request.send_header("Content-Length", str(len(data)))
        if status == 429 or status >= 500:
            request.send_header("retry-after-ms", "10")  # honoured by the openai client: fast tests
        request.end_headers()
        request.wfile.write(data)

    def requests_for(self, marker: str) -> int:
        return sum(count for (question, _), count in self.seen.items() if marker in question)


def start_server(monkeypatch, **kwargs) -> ChatServer:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    chat = ChatServer(**kwargs)
    chat.thread.start()
    return chat


@pytest.fixture
def server(monkeypatch):
    chat = start_server(monkeypatch)
    yield chat
    chat.httpd.shutdown()
    chat.httpd.server_close()


def make_judge(url: str, tmp_path, **overrides) -> OpenAIJudge:
    (tmp_path / "prompt.txt").write_text(TEMPLATE)
    (tmp_path / "judge.yaml").write_text(
        "backend: openai\nmodel: judge-test\ntemplate: prompt.txt\napi_key_env: null\n"
        "labels: ['1', '2']\ntie_label: tie\nmax_new_tokens: 2\n"
    )
    return load_judge(tmp_path, **{"base_url": url, "timeout": CLIENT_TIMEOUT, **overrides})


def verdicts(replies) -> list:
    return [reply.verdict for reply in replies]


def prompt(question: str) -> str:
    return f"\n\nHuman: {question}\n\nAssistant:"


def test_verdicts_in_both_orders_key_from_env_texts_and_tokens(server, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test-123")
    judge = make_judge(
        server.url,
        tmp_path,
        api_key_env="TEST_JUDGE_KEY",
        input_price_per_million=2.0,
        output_price_per_million=10.0,
    )
    rows = judge_both_orders(
        judge, [prompt("a"), prompt("b"), prompt("c")], ["good", "bad", "x"], ["bad", "good", "y"]
    )
    assert [r.outcome for r in rows] == ["win", "loss", "tie"]
    assert [r.first for r in rows] == ["A", "B", "tie"]  # the system shown first
    assert server.auth == {"Bearer sk-test-123"}
    assert {
        (b["model"], b["temperature"], b["max_tokens"], b["messages"][0]["role"]) for b in server.bodies
    } == {("judge-test", 0.0, 2, "user")}
    assert all("max_completion_tokens" not in b and "logprobs" not in b for b in server.bodies)
    stats = judge.stats
    assert stats.requests == 6 and stats.retries == 0 and stats.parse_failures == 0
    assert (stats.prompt_tokens, stats.completion_tokens) == (60, 6)
    assert stats.cost == pytest.approx(6 * (10 * 2.0 + 1 * 10.0) / 1e6)
    reply = judge.replies[PairItem(prompt("c"), "y", "x")]
    assert (reply.text, reply.verdict, reply.prompt_tokens) == ("tie", "tie", 10)


def test_a_missing_key_fails_loudly_at_the_first_request(server, tmp_path, monkeypatch):
    monkeypatch.delenv("TEST_JUDGE_KEY", raising=False)
    judge = make_judge(server.url, tmp_path, api_key_env="TEST_JUDGE_KEY")  # a cached rerun needs no key
    with pytest.raises(ValueError, match="TEST_JUDGE_KEY"):
        judge.judge_batch([PairItem(prompt("q"), "good", "bad")])
    assert server.bodies == []


def test_timeout_429_and_500_are_retried_by_the_client_and_counted(server, tmp_path):
    judge = make_judge(server.url, tmp_path)
    items = [
        PairItem(prompt("[timeout-once] q"), "good", "bad"),
        PairItem(prompt("[429-once] q"), "bad", "good"),
        PairItem(prompt("[500-twice] q"), "good", "bad"),
    ]
    assert verdicts(judge.judge_batch(items)) == ["A", "B", "A"]
    assert server.requests_for("[timeout-once]") == 2
    assert server.requests_for("[429-once]") == 2
    assert server.requests_for("[500-twice]") == 3
    stats = judge.stats
    assert (stats.timeouts, stats.rate_limited, stats.server_errors) == (1, 1, 2)
    assert stats.retries == 4 and stats.requests == 7 and stats.parse_failures == 0
    assert stats.lowest_concurrency < 8  # halved by the timeout and by the 429


def test_junk_answers_are_parse_failures_never_guesses_and_their_text_is_kept(server, tmp_path):
    judge = make_judge(server.url, tmp_path)
    rows = judge_both_orders(judge, [prompt("[junk] q"), prompt("fine")], ["good", "good"], ["bad", "bad"])
    assert rows[0].outcome is None and rows[0].parse_failures == 2
    assert rows[1].outcome == "win" and rows[1].parse_failures == 0
    assert judge.stats.parse_failures == 2
    assert server.requests_for("[junk]") == 2  # a parse failure is not retried
    assert judge.replies[PairItem(prompt("[junk] q"), "bad", "good")].text == "I think Reply 1 is better."


@pytest.mark.parametrize(
    "marker, status, message",
    [
        ("[status:400]", 400, "fake 400 reason"),
        ("[status:401]", 401, "fake 401 reason"),
        ("[status:403]", 403, "fake 403 reason"),
        ("[status:404]", 404, "fake 404 reason"),
        ("[status:422]", 422, "fake 422 reason"),
        ("[500-context]", 500, CONTEXT_MESSAGE),
    ],
)
def test_permanent_errors_stop_at_once_naming_judge_url_and_reason(server, tmp_path, marker, status, message):
    judge = make_judge(server.url, tmp_path, max_concurrency=1, max_retries=5)
    items = [PairItem(prompt(f"{marker} q"), "good", "bad")] + [
        PairItem(prompt(f"fine {k}"), "good", "bad") for k in range(5)
    ]
    with pytest.raises(JudgeRequestError) as caught:
        judge.judge_batch(items)
    text = str(caught.value)
    assert text.startswith(f"judge {tmp_path.name} at {server.url}: HTTP {status}: ")
    assert message in text
    assert server.requests_for(marker) == 1 and judge.stats.retries == 0  # not retried
    assert sum(server.seen.values()) == 1  # and nothing after it was asked


def test_a_bare_500_is_retried_then_explained(server, tmp_path):
    judge = make_judge(server.url, tmp_path, max_retries=1)
    with pytest.raises(
        JudgeRequestError,
        match=r"HTTP 500 after 2 attempts: Internal Server Error \(the server gave no reason",
    ):
        judge.judge_batch([PairItem(prompt("[500-bare] q"), "good", "bad")])
    assert server.requests_for("[500-bare]") == 2 and judge.stats.server_errors == 2


def test_timeouts_that_outlast_the_retries_say_so(server, tmp_path):
    judge = make_judge(server.url, tmp_path, max_retries=1)
    with pytest.raises(JudgeRequestError, match=r"no answer within 0.3 s in any of 2 attempts"):
        judge.judge_batch([PairItem(prompt("[timeout-always] q"), "good", "bad")])
    assert judge.stats.timeouts == judge.stats.requests == 2 and judge.stats.retries == 1


def test_nothing_listening_stops_after_a_few_quick_attempts(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    url = f"http://127.0.0.1:{free_port()}/v1"
    judge = make_judge(url, tmp_path, max_retries=8)
    with pytest.raises(JudgeRequestError) as caught:
        judge.judge_batch([PairItem(prompt("q"), "good", "bad")])
    assert f"nothing listening at {url}" in str(caught.value)
    stats = judge.stats
    assert stats.connection_errors == stats.requests == REFUSED_ATTEMPTS  # not max_retries + 1
    assert stats.retries == REFUSED_ATTEMPTS - 1


def test_every_verdict_is_cached_on_arrival_although_its_batch_fails(server, tmp_path):
    judge = make_judge(server.url, tmp_path, max_retries=1, max_concurrency=16, timeout=5.0)
    cache = JudgmentCache(tmp_path / "verdicts.jsonl")
    # the failing prompt answers late (0.3 s per attempt), when the others have long arrived
    prompts = [prompt(f"fine {k}") for k in range(5)] + [prompt("[late] [500-always] q")]
    with pytest.raises(JudgeRequestError, match="HTTP 500 after 2 attempts: try again"):
        judge_both_orders(judge, prompts, ["good"] * 6, ["bad"] * 6, cache)  # one batch of 12
    assert judge.stats.server_errors == server.requests_for("[500-always]") >= 2
    assert len(JudgmentCache(cache.path)) == len(judge.replies) == 10  # both orders of the five others

    again = make_judge(server.url, tmp_path)
    rows = judge_both_orders(again, prompts[:5], ["good"] * 5, ["bad"] * 5, JudgmentCache(cache.path))
    assert [r.outcome for r in rows] == ["win"] * 5 and again.stats.calls == 0


def test_a_one_at_a_time_server_gets_a_complete_run_with_fewer_requests_in_flight(tmp_path, monkeypatch):
    # each request takes 0.05 s, so more than 6 in flight pass the 0.3 s timeout; with 16 in flight and 2
    # retries this run fails (the server still works off the requests its client gave up on)
    slow = start_server(monkeypatch, one_at_a_time=True, latency=0.05)
    try:
        judge = make_judge(slow.url, tmp_path, max_concurrency=16, max_retries=2)
        items = [PairItem(prompt(f"q {k}"), "good", "bad") for k in range(32)]
        assert verdicts(judge.judge_batch(items)) == ["A"] * 32
    finally:
        slow.httpd.shutdown()
        slow.httpd.server_close()
    stats = judge.stats
    assert stats.timeouts >= 1 and stats.lowest_concurrency < 16
    assert stats.requests == 32 + stats.retries == len(slow.bodies)


def test_max_requests_stops_the_run_after_handing_back_what_it_paid_for(server, tmp_path):
    judge = make_judge(server.url, tmp_path, max_concurrency=1, max_requests=3)
    cache = JudgmentCache(tmp_path / "verdicts.jsonl")
    prompts = [prompt(f"q {k}") for k in range(3)]
    with pytest.raises(JudgeBudgetExceeded, match="max_requests=3 reached"):
        judge_both_orders(judge, prompts, ["good"] * 3, ["bad"] * 3, cache)
    assert len(server.bodies) == 3 and len(JudgmentCache(cache.path)) == 3

    again = make_judge(server.url, tmp_path)
    rows = judge_both_orders(again, prompts, ["good"] * 3, ["bad"] * 3, JudgmentCache(cache.path))
    assert [r.outcome for r in rows] == ["win"] * 3 and again.stats.requests == 3


def test_max_cost_is_checked_before_each_request(server, tmp_path):
    # each request costs 10 * 2 + 1 * 10 = 30 millionths; after 3 the spend of 90 passes 70
    prices = {"input_price_per_million": 2.0, "output_price_per_million": 10.0}
    judge = make_judge(server.url, tmp_path, max_concurrency=1, max_cost=70e-6, **prices)
    arrived = []
    with pytest.raises(JudgeBudgetExceeded, match="max_cost=7e-05 reached"):
        for index, reply in judge.judge_stream([PairItem(prompt(f"q {k}"), "good", "bad") for k in range(5)]):
            arrived.append((index, reply.verdict))
    assert sorted(arrived) == [(0, "A"), (1, "A"), (2, "A")] and len(server.bodies) == 3
    assert judge.stats.cost == pytest.approx(90e-6)


def test_logprob_verdicts_compare_the_labels_and_fall_back_to_text(server, tmp_path):
    judge = make_judge(server.url, tmp_path, verdict_from="logprobs", tie_margin=0.5, top_logprobs=5)
    items = [
        PairItem(prompt("a"), "good", "bad"),
        PairItem(prompt("b"), "bad", "good"),
        PairItem(prompt("[close] c"), "good", "bad"),  # text says 1, but the labels are 0.1 apart
        PairItem(prompt("[one-label] d"), "good", "bad"),  # '2' is not listed: the text decides
    ]
    assert verdicts(judge.judge_batch(items)) == ["A", "B", "tie", "A"]
    assert {(b["logprobs"], b["top_logprobs"]) for b in server.bodies} == {(True, 5)}
    assert judge.replies[items[0]].margin == pytest.approx(2.3)
    assert judge.replies[items[3]].margin is None and judge.stats.logprob_fallbacks == 1


def test_reason_mode_keeps_the_rationale_and_max_completion_tokens(server, tmp_path):
    judge = make_judge(
        server.url,
        tmp_path,
        mode="reason",
        parser="regex",
        parse_regex=r"(?P<rationale>.*)Verdict: (?P<verdict>1|2|tie)",
        max_tokens_field="max_completion_tokens",
        max_new_tokens=64,
    )
    cache = JudgmentCache(tmp_path / "verdicts.jsonl")
    (result,) = judge_both_orders(judge, [prompt("[reason] q")], ["bad"], ["good"], cache)
    assert (result.first, result.swapped, result.outcome) == ("B", "A", "loss")
    reply = result.first_reply
    assert (
        reply.rationale == "Reply 2 is the good one." and reply.text == "Reply 2 is the good one.\nVerdict: 2"
    )
    reread = JudgmentCache(cache.path)  # the rationale and the raw text are cached with the verdict
    key = cache_key(judge.identity, prompt("[reason] q"), "good", "bad")  # the swapped order
    assert (reread.get(key), reread.rationale(key)) == ("A", "Reply 1 is the good one.")
    assert reread.text(key) == "Reply 1 is the good one.\nVerdict: 1"
    assert {b["max_completion_tokens"] for b in server.bodies} == {64}
    assert all("max_tokens" not in b for b in server.bodies)


def test_the_cache_key_ignores_where_the_server_listens(server, tmp_path):
    cache = JudgmentCache(tmp_path / "verdicts.jsonl")
    first = make_judge(server.url, tmp_path)
    judge_both_orders(first, [prompt("q")], ["good"], ["bad"], cache)
    moved = make_judge(server.url.replace("127.0.0.1", "localhost"), tmp_path, max_concurrency=2)
    assert moved.identity == first.identity
    rows = judge_both_orders(moved, [prompt("q")], ["good"], ["bad"], JudgmentCache(cache.path))
    assert rows[0].outcome == "win" and moved.stats.calls == 0
    assert make_judge(server.url, tmp_path, cache_tag="new-weights").identity != first.identity
    assert make_judge(server.url, tmp_path, verdict_from="logprobs").identity != first.identity


def test_requests_overlap_up_to_max_concurrency(server, tmp_path):
    # a long timeout: a client retry on a loaded machine would leave its first request in flight as a 9th
    judge = make_judge(server.url, tmp_path, max_concurrency=8, timeout=10.0)
    items = [PairItem(prompt(f"[slow] {k}"), "good", "bad") for k in range(16)]
    assert verdicts(judge.judge_batch(items)) == ["A"] * 16
    assert judge.stats.retries == 0 and 4 <= server.max_in_flight <= 8


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"max_tokens_field": "max_new_tokens"}, "max_tokens_field must be one of"),
        ({"verdict_from": "logits"}, "verdict_from must be one of"),
        (
            {"verdict_from": "logprobs", "backend": "hf_logits"},
            "verdict_from: logprobs needs backend: openai",
        ),
        ({"mode": "reason"}, "mode: reason needs backend: openai and parser: regex"),
        ({"max_cost": 1.0, "input_price_per_million": 1.0}, "max_cost must be > 0 and needs"),
        ({"max_requests": 0}, "max_requests must be >= 1"),
        ({"input_price_per_million": -1.0}, "prices per million tokens must be >= 0"),
    ],
)
def test_judge_options_are_checked_when_read(settings, message):
    values = {"backend": "openai", "model": "m", "template": "t.txt", **settings}
    with pytest.raises(ValueError, match=re.escape(message)):
        JudgeConfig(**values)
