"""Protects the OpenAI-compatible judge against a real HTTP server on 127.0.0.1: requests follow the
chat-completions protocol, timeouts, 429 and 5xx are retried (and counted on both sides), junk answers
become counted parse failures rather than guesses, and requests really run concurrently."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from align_kit.judge_backends import load_judge
from align_kit.judge_cache import JudgmentCache
from align_kit.judge_openai import JudgeRequestError, OpenAIJudge
from align_kit.judges import PairItem, judge_both_orders


class WideBacklogServer(ThreadingHTTPServer):
    """socketserver listens with a backlog of 5: more simultaneous connects than that drop SYNs, and
    each dropped one costs its client a 1 s retransmit, which would be timed as judge latency."""

    request_queue_size = 128


TEMPLATE = "Q: {instruction}\nR1: {output_1}\nR2: {output_2}\n"
CLIENT_TIMEOUT = 0.3


class ChatServer:
    """Loopback chat-completions server. Markers in the request steer it:
    [slow] adds 0.15 s; [timeout-once] stalls past the client timeout on the first request;
    [429-once] and [500-twice] fail that many times first; [500-always] always fails; [junk] answers
    prose. Otherwise it answers '1' or '2' for the reply containing 'good', else 'tie'."""

    def __init__(self):
        self.seen: Counter = Counter()  # requests per marker-free instruction
        self.auth: set[str] = set()
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
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
        if "[timeout-once]" in question and n == 1:
            time.sleep(CLIENT_TIMEOUT * 3)
        if (
            ("[429-once]" in question and n == 1)
            or ("[500-twice]" in question and n <= 2)
            or "[500-always]" in question
        ):
            status = 429 if "[429" in question else 500
            return self.reply(request, status, {"error": {"message": "try again", "type": "server_error"}})
        if "[junk]" in question:
            answer = "I think Reply 1 is better."
        elif "good" in reply_1 and "good" not in reply_2:
            answer = "1"
        elif "good" in reply_2 and "good" not in reply_1:
            answer = "2"
        else:
            answer = "tie"
        message = {"role": "assistant", "content": answer}
        self.reply(
            request,
            200,
            {
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
            },
        )

    @staticmethod
    def reply(request: BaseHTTPRequestHandler, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        if status == 429:
            request.send_header("Retry-After", "0")
        request.end_headers()
        request.wfile.write(data)

    def requests_for(self, marker: str) -> int:
        return sum(count for (question, _), count in self.seen.items() if marker in question)


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    chat = ChatServer()
    chat.thread.start()
    yield chat
    chat.httpd.shutdown()
    chat.httpd.server_close()


def make_judge(server: ChatServer, tmp_path, **overrides) -> OpenAIJudge:
    (tmp_path / "prompt.txt").write_text(TEMPLATE)
    (tmp_path / "judge.yaml").write_text(
        "backend: openai\nmodel: judge-test\ntemplate: prompt.txt\napi_key_env: TEST_JUDGE_KEY\n"
        "labels: ['1', '2']\ntie_label: tie\nmax_new_tokens: 2\n"
    )
    settings = {"base_url": server.url, "timeout": CLIENT_TIMEOUT, "backoff_base": 0.01, "backoff_max": 0.05}
    settings.update(overrides)
    return load_judge(tmp_path, **settings)


def prompt(question: str) -> str:
    return f"\n\nHuman: {question}\n\nAssistant:"


def test_verdicts_in_both_orders_and_key_from_env(server, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test-123")
    judge = make_judge(server, tmp_path)
    rows = judge_both_orders(
        judge, [prompt("a"), prompt("b"), prompt("c")], ["good", "bad", "x"], ["bad", "good", "y"]
    )
    assert [r.outcome for r in rows] == ["win", "loss", "tie"]
    assert [r.first for r in rows] == ["A", "B", "tie"]  # the system shown first
    assert server.auth == {"Bearer sk-test-123"}
    assert {
        (b["model"], b["temperature"], b["max_tokens"], b["messages"][0]["role"]) for b in server.bodies
    } == {("judge-test", 0.0, 2, "user")}
    assert judge.stats.requests == 6 and judge.stats.retries == 0 and judge.stats.parse_failures == 0


def test_missing_key_fails_loudly(server, tmp_path, monkeypatch):
    monkeypatch.delenv("TEST_JUDGE_KEY", raising=False)
    with pytest.raises(ValueError, match="TEST_JUDGE_KEY"):
        make_judge(server, tmp_path)


def test_timeout_429_and_500_are_retried_and_counted(server, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "k")
    judge = make_judge(server, tmp_path)
    items = [
        PairItem(prompt("[timeout-once] q"), "good", "bad"),
        PairItem(prompt("[429-once] q"), "bad", "good"),
        PairItem(prompt("[500-twice] q"), "good", "bad"),
    ]
    assert judge.judge_batch(items) == ["A", "B", "A"]
    assert server.requests_for("[timeout-once]") == 2
    assert server.requests_for("[429-once]") == 2
    assert server.requests_for("[500-twice]") == 3
    stats = judge.stats
    assert (stats.timeouts, stats.rate_limited, stats.server_errors) == (1, 1, 2)
    assert stats.retries == 4 and stats.requests == 7 and stats.parse_failures == 0


def test_junk_answers_are_parse_failures_never_guesses(server, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "k")
    judge = make_judge(server, tmp_path)
    rows = judge_both_orders(judge, [prompt("[junk] q"), prompt("fine")], ["good", "good"], ["bad", "bad"])
    assert rows[0].outcome is None and rows[0].parse_failures == 2
    assert rows[1].outcome == "win" and rows[1].parse_failures == 0
    assert judge.stats.parse_failures == 2
    assert server.requests_for("[junk]") == 2  # a parse failure is not retried


def test_retries_run_out_with_an_error_and_the_cache_keeps_earlier_batches(server, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "k")
    judge = make_judge(server, tmp_path, max_retries=2, batch_size=2)
    cache = JudgmentCache(tmp_path / "verdicts.jsonl")
    prompts = [prompt("fine"), prompt("[500-always] q")]
    with pytest.raises(JudgeRequestError, match="3 attempts"):
        judge_both_orders(judge, prompts, ["good", "good"], ["bad", "bad"], cache)
    assert server.requests_for("[500-always]") == 6  # 3 attempts in each order, then it gives up
    assert len(JudgmentCache(tmp_path / "verdicts.jsonl")) == 2  # both orders of the first prompt


def test_requests_overlap_up_to_max_concurrency(server, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "k")
    # a long timeout: a client retry on a loaded machine would leave its first request in flight as a 9th
    judge = make_judge(server, tmp_path, max_concurrency=8, timeout=10.0)
    items = [PairItem(prompt(f"[slow] {k}"), "good", "bad") for k in range(16)]
    start = time.perf_counter()
    assert judge.judge_batch(items) == ["A"] * 16
    elapsed = time.perf_counter() - start
    assert judge.stats.retries == 0 and 4 <= server.max_in_flight <= 8
    assert elapsed < 16 * 0.15 / 2  # sequential would take 2.4 s
