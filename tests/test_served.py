"""Protects served systems (a system given as MODEL@BASE_URL) against a loopback chat-completions server on
127.0.0.1: prompts go out as chat messages with the evaluation's decoding, answers are cached as they
arrive and a rerun asks nothing; a bad body is retried and counted in the system's traffic log, which
adds up across runs; a server that dies keeps the answers that arrived and the rerun asks only the rest;
a refused key is one line with exit 2. The real `transformers serve` case is in test_real_server.py."""

from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from align_kit.console import EXIT_MISTAKE, exit_status
from align_kit.data.prompts import format_prompt
from align_kit.evaluation.answers import System, resolve_systems
from align_kit.evaluation.served import ServedSystemFailed, served_answers, served_endpoint
from align_kit.evaluation.settings import EvalArgs
from align_kit.judges.openai_client import EndpointRefused


class EchoServer:
    """Answers 'echo: <last user message>'. ``bad_first`` sends an HTML page to the first request of each
    question; ``status`` answers every request with that HTTP status; ``fail_after`` answers that many
    requests, then 503 to every other one."""

    def __init__(self):
        self.seen: Counter = Counter()
        self.bodies: list[dict] = []
        self.bad_first, self.status, self.fail_after = False, None, None
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                question = body["messages"][-1]["content"]
                with server.lock:
                    server.bodies.append(body)
                    server.seen[question] += 1
                    n, total = server.seen[question], len(server.bodies)
                if server.status or (server.fail_after is not None and total > server.fail_after):
                    code = server.status or 503
                    return self.send(code, "application/json", {"error": {"message": f"fake {code}"}})
                if server.bad_first and n == 1:
                    return self.send(200, "text/html", "<html><body>proxy error</body></html>")
                message = {"role": "assistant", "content": f"echo: {question}"}
                usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
                choice = {"index": 0, "message": message, "finish_reason": "stop"}
                completion = {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"]}
                self.send(200, "application/json", {**completion, "choices": [choice], "usage": usage})

            def send(self, status, content_type, payload):
                data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("retry-after-ms", "1")
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    echo = EchoServer()
    yield echo
    echo.httpd.shutdown()
    echo.httpd.server_close()


PROMPTS = [format_prompt(f"question {k}") for k in range(5)]


def settings(**overrides) -> EvalArgs:
    values = {"max_new_tokens": 7, "seed": 3, "served_max_retries": 2, **overrides}
    return EvalArgs(systems=["s=x"], base="s", **values)


def traffic(tmp_path) -> list[dict]:
    lines = (tmp_path / "served" / "mine" / "traffic.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_a_served_spec_is_a_system_of_its_own_kind():
    args = settings(served_max_concurrency=3, served_api_key_env="KEY")
    endpoint = served_endpoint("org/model-7b@http://host:8000/v1/", args)
    assert (endpoint.model, endpoint.base_url, endpoint.max_concurrency, endpoint.api_key_env) == (
        "org/model-7b",
        "http://host:8000/v1",
        3,
        "KEY",
    )
    assert served_endpoint("runs/demo/sft") is None and served_endpoint("answers.jsonl") is None
    args = EvalArgs(systems=["mine=/abs/model@http://127.0.0.1:9/v1"], base="mine")
    assert resolve_systems(args, []) == [System("mine", "/abs/model@http://127.0.0.1:9/v1", "served")]


def test_answers_are_cached_on_arrival_and_a_rerun_asks_nothing(server, tmp_path):
    spec = f"echo-model@{server.url}"
    answers, asked = served_answers("mine", spec, PROMPTS + PROMPTS[:1], settings(), tmp_path)
    assert asked == 5 and answers == [f"echo: question {k}" for k in [0, 1, 2, 3, 4, 0]]
    body = next(b for b in server.bodies if b["messages"][-1]["content"] == "question 0")
    assert body["model"] == "echo-model" and body["messages"] == [{"role": "user", "content": "question 0"}]
    assert (body["max_tokens"], body["temperature"], body["seed"]) == (7, 0.0, 3)
    again, asked = served_answers("mine", spec, PROMPTS, settings(), tmp_path)
    assert asked == 0 and again == answers[:5] and len(server.bodies) == 5  # no request
    sampled, asked = served_answers("mine", spec, PROMPTS[:2], settings(do_sample=True), tmp_path)
    assert asked == 2 and server.bodies[-1]["temperature"] == 1.0  # other decoding, other answers
    assert [run["requests"] for run in traffic(tmp_path)] == [5, 2]


def test_bad_bodies_are_retried_and_counted_across_runs(server, tmp_path):
    server.bad_first = True
    answers, _ = served_answers("mine", f"m@{server.url}", PROMPTS[:3], settings(), tmp_path)
    assert answers == [f"echo: question {k}" for k in range(3)]  # the HTML page never became an answer
    first = traffic(tmp_path)[0]
    assert (first["bad_bodies"], first["retries"], first["requests"]) == (3, 3, 6)
    assert first["first_bad_body"].startswith("<html><body>proxy error")
    served_answers("mine", f"m@{server.url}", PROMPTS, settings(), tmp_path)
    assert [run["bad_bodies"] for run in traffic(tmp_path)] == [3, 2]


def test_a_failing_server_keeps_what_arrived_and_the_rerun_asks_the_rest(server, tmp_path):
    server.fail_after = 2
    args = settings(served_max_concurrency=1, served_max_retries=0)
    with pytest.raises(ServedSystemFailed, match=r"system mine at .*HTTP 503.* 2 of 5 answers arrived"):
        served_answers("mine", f"m@{server.url}", PROMPTS, args, tmp_path)
    server.fail_after = None
    answers, asked = served_answers("mine", f"m@{server.url}", PROMPTS, args, tmp_path)
    assert asked == 3 and answers == [f"echo: question {k}" for k in range(5)]


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_is_one_line_with_exit_2(server, tmp_path, monkeypatch, capsys, status):
    server.status = status
    monkeypatch.setenv("SERVED_KEY", "sk-wrong")
    args = settings(served_api_key_env="SERVED_KEY")
    with pytest.raises(EndpointRefused):
        served_answers("mine", f"m@{server.url}", PROMPTS, args, tmp_path)
    assert (
        exit_status(lambda: served_answers("mine", f"m@{server.url}", PROMPTS, args, tmp_path))
        == EXIT_MISTAKE
    )
    line = capsys.readouterr().err.strip()
    assert line.count("\n") == 0 and f"HTTP {status}: fake {status} (check the key in $SERVED_KEY)" in line
    assert "sk-wrong" not in line and server.seen["question 0"] + server.seen["question 1"] <= 4  # no retry


def test_a_judge_refusing_the_key_stops_the_evaluation_in_one_line(server, tmp_path, capsys):
    from align_kit.configs import DataArgs
    from align_kit.evaluation.answers import held_out
    from align_kit.evaluation.pipeline import evaluate_systems
    from align_kit.judges.backends import load_judge

    server.status = 401
    sizes = {"embedded_train_size": 20, "embedded_test_size": 12}
    held = held_out(EvalArgs(n_prompts=4), DataArgs(**sizes))
    rows = [{"prompt": p, "answer": a} for p, a in zip(held.prompts, held.chosen, strict=True)]
    (tmp_path / "copy.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "judge").mkdir()
    (tmp_path / "judge" / "prompt.txt").write_text("{instruction}\n1: {output_1}\n2: {output_2}\n")
    (tmp_path / "judge" / "judge.yaml").write_text(
        f"backend: openai\nmodel: m\ntemplate: prompt.txt\napi_key_env: null\nbase_url: {server.url}\n"
    )
    judge = load_judge(tmp_path / "judge")
    settings = {**sizes, "n_prompts": 4, "n_honeypots": 0, "n_human": 0, "progress": False}

    def main():
        evaluate_systems(
            {"copy": str(tmp_path / "copy.jsonl")}, "copy", [judge], tmp_path / "out", **settings
        )

    assert exit_status(main) == EXIT_MISTAKE
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("align-kit: judge judge at ") and "HTTP 401: fake 401 (no key was sent" in line
    assert len(server.bodies) == 1  # the first request, no retry, nothing after it
