"""Protects the loss-discovery loop end to end against a scripted LLM on a loopback OpenAI-compatible server:
good proposals are saved, loaded the way the DPO recipe loads them, scored and ranked; bad ones (an import,
file access, a dunder trick, an endless loop refused statically and one killed by the time limit, a wrong
shape, a constant loss, no gradient, a syntax error) are refused with a counted reason; discovery.jsonl
records every proposal; and an interrupted search resumes without asking the LLM again for finished or
pending generations."""

from __future__ import annotations

import importlib.util
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from align_kit.loss_lab.discovery import (
    LossFailed,
    OpenAIProposer,
    ProposerConfig,
    build_prompt,
    discover,
    extract_code,
    read_log,
)
from align_kit.loss_lab.sandbox import LossSandbox

HEAD = "def {name}(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):\n"
LOGITS = "    logits = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)\n"


def loss(name: str, *lines: str) -> str:
    return HEAD.format(name=name) + LOGITS + "".join(f"    {line}\n" for line in lines)


def reply(code: str, thought: str = "A variant worth trying.") -> str:
    return f"{thought}\n\n```python\n{code}```\n"


DPO = loss("dpo_sigmoid", "return -F.logsigmoid(beta * logits)")
IPO = loss("ipo_square", "return (logits - 1 / (2 * beta)) ** 2")
HINGE = loss("hinge_margin", "return torch.relu(1 - beta * logits)")
ENDLESS = loss(  # statically bounded (10**9 steps), far past the time limit
    "slow_sum",
    "for i in range(1000):",
    "    for j in range(1000):",
    "        for k in range(1000):",
    "            logits = logits + 0",
    "return -F.logsigmoid(beta * logits)",
)
# (reply, the refusal reason or None when accepted), in the order the scripted LLM answers
SCRIPT = [
    (reply(DPO, "DPO's logistic loss, written out."), None),
    (reply("import os\n" + DPO), "import"),
    (
        reply(loss("reader", "text = open('/etc/passwd').read()", "return -F.logsigmoid(beta * logits)")),
        "call",
    ),
    (reply(loss("escape", "x = ().__class__.__bases__[0].__subclasses__()", "return logits")), "dunder"),
    (reply(loss("forever", "while True:", "    logits = logits + 1", "return logits")), "loop"),
    (reply(ENDLESS), "timeout"),
    (reply(loss("batch_mean", "return -F.logsigmoid(beta * logits).mean()")), "shape"),
    (reply(loss("flat", "return torch.ones_like(logits) * 0.69")), "constant"),
    (reply(loss("detached", "return -F.logsigmoid(beta * logits.detach())")), "no_gradient"),
    (reply(loss("broken", "return -F.logsigmoid(beta * logits")), "syntax"),
    (reply(IPO), None),
    (reply(HINGE, "A margin loss."), None),
]
CLIENT_TIMEOUT = 30.0


class ScriptedChatServer:
    """Loopback chat-completions server that answers request k with the k-th canned reply (then 400s),
    after failing the first ``fail_first`` requests with a 500 that asks for a 1 ms retry."""

    def __init__(self, replies: list[str], fail_first: int = 0):
        self.replies, self.fail_first = replies, fail_first
        self.bodies: list[dict] = []
        self.auth: set[str] = set()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                assert self.path == "/v1/chat/completions"
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.bodies.append(body)
                    server.auth.add(self.headers.get("Authorization", ""))
                    index = len(server.bodies) - 1 - server.fail_first
                if index < 0:
                    return self.send(500, {"error": {"message": "busy", "type": "server_error"}})
                if index >= len(server.replies):
                    return self.send(
                        400, {"error": {"message": "script exhausted", "type": "invalid_request"}}
                    )
                message = {"role": "assistant", "content": server.replies[index]}
                choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
                completion = {"id": "c", "object": "chat.completion", "created": int(time.time())}
                self.send(200, {**completion, "model": body["model"], "choices": [choice]})

            def send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("retry-after-ms", "1")
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def prompts(self) -> list[str]:
        return [body["messages"][-1]["content"] for body in self.bodies]


@pytest.fixture
def serve(monkeypatch):
    """Start a scripted server for the test's replies; every one started is stopped afterwards."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("TEST_PROPOSER_KEY", "sk-proposer")
    servers = []

    def start(replies: list[str], fail_first: int = 0) -> tuple[ScriptedChatServer, OpenAIProposer]:
        server = ScriptedChatServer(replies, fail_first)
        server.thread.start()
        servers.append(server)
        config = ProposerConfig(
            model="proposer-test",
            base_url=server.url,
            api_key_env="TEST_PROPOSER_KEY",
            timeout=CLIENT_TIMEOUT,
            max_retries=2,
            temperature=0.7,
            max_new_tokens=512,
            system_prompt="You write loss functions.",
        )
        return server, OpenAIProposer(config)

    yield start
    for server in servers:
        server.httpd.shutdown()
        server.httpd.server_close()


@pytest.fixture(scope="module")
def sandbox():
    with LossSandbox(timeout=1.5) as box:
        box.start()
        yield box


# Fixed inputs of the fake evaluation: margins (chosen minus rejected log-ratio) of 4 and 2, beta 0.5.
CHOSEN, REJECTED, REFERENCE, BETA = [-10.0, -20.0], [-14.0, -22.0], [-12.0, -19.0], 0.5
MARGINS = [4.0, 2.0]


class FakeEvaluate:
    """Loads the loss file as the DPO recipe would (``path.py:function``) and scores it on fixed inputs:
    win_rate = exp(-mean loss). Raises on the generations listed in ``fail_on`` (an interruption)."""

    def __init__(self, fail_on: tuple[int, ...] = ()):
        self.fail_on, self.calls = fail_on, []

    def __call__(self, loss_function: str) -> dict:
        self.calls.append(loss_function)
        path, name = loss_function.rsplit(":", 1)
        generation = int(path.rsplit("gen_", 1)[1][:3])
        if generation in self.fail_on:
            raise RuntimeError(f"out of disk while training generation {generation}")
        spec = importlib.util.spec_from_file_location(f"loss_gen_{generation}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        reference = torch.tensor(REFERENCE)
        losses = getattr(module, name)(
            torch.tensor(CHOSEN), torch.tensor(REJECTED), reference, reference, BETA
        )
        mean_loss = float(losses.mean())
        return {"win_rate": math.exp(-mean_loss), "mean_loss": mean_loss, "kl": float("nan")}


def expected_mean_loss(name: str) -> float:
    """The analytic mean loss of the three good proposals on the fixed inputs."""
    per_pair = {
        "dpo_sigmoid": lambda m: math.log1p(math.exp(-BETA * m)),
        "ipo_square": lambda m: (m - 1 / (2 * BETA)) ** 2,
        "hinge_margin": lambda m: max(0.0, 1 - BETA * m),
    }[name]
    return sum(per_pair(m) for m in MARGINS) / len(MARGINS)


@pytest.mark.slow  # two worker start-ups (torch imports) and one 1.5 s time limit
def test_a_scripted_search_accepts_scores_and_ranks_good_losses_and_refuses_bad_ones(
    serve, sandbox, tmp_path
):
    server, proposer = serve([text for text, _ in SCRIPT])
    evaluate = FakeEvaluate()
    log_path = tmp_path / "discovery" / "discovery.jsonl"
    seed = [{"name": "sigmoid (TRL)", "win_rate": 0.5}, {"name": "kto (TRL)", "win_rate": None}]
    starts = sandbox.starts
    result = discover(len(SCRIPT), proposer, evaluate, log_path, seed_table=seed, sandbox=sandbox)
    assert sandbox.starts == starts + 1  # a fresh worker after the one killed at the time limit

    # every proposal asked for once, with the judge-style settings and key
    assert len(server.bodies) == len(SCRIPT) and server.auth == {"Bearer sk-proposer"}
    body = server.bodies[0]
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("proposer-test", 0.7, 512)
    assert body["messages"][0] == {"role": "system", "content": "You write loss functions."}

    # the log: one line per proposal, the right refusal reason each, checks up to the one that failed
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert records == result.records
    assert [r["generation"] for r in records] == list(range(1, len(SCRIPT) + 1))
    assert [r["refusal"] and r["refusal"]["reason"] for r in records] == [reason for _, reason in SCRIPT]
    assert [r["status"] for r in records] == [
        "accepted" if reason is None else "refused" for _, reason in SCRIPT
    ]
    assert records[0]["code"] == DPO.rstrip("\n") and records[0]["reply"] == SCRIPT[0][0]
    assert records[0]["checks"] == {
        "static": True, "runs": True, "shape": True, "finite": True, "varies": True, "gradient": True
    }  # fmt: skip
    assert records[1]["checks"] == {"static": False} and "line 1" in records[1]["refusal"]["detail"]
    assert records[2]["refusal"]["detail"] == "line 3: calling open() is not allowed"
    assert records[5]["checks"] == {"static": True, "runs": False}  # killed by the time limit
    assert records[6]["checks"] == {"static": True, "runs": True, "shape": False}
    assert records[8]["checks"]["gradient"] is False
    assert all(set(r["seconds"]) >= {"propose", "check"} for r in records)
    assert [("evaluate" in r["seconds"]) for r in records] == [reason is None for _, reason in SCRIPT]

    # the accepted losses: saved, loaded as the recipe loads them, scored with their analytic values
    accepted = [r for r in records if r["status"] == "accepted"]
    assert [r["function"] for r in accepted] == ["dpo_sigmoid", "ipo_square", "hinge_margin"]
    assert evaluate.calls == [r["loss_function"] for r in accepted]
    for record in accepted:
        assert record["loss_function"].endswith(
            f"losses/gen_{record['generation']:03d}.py:{record['function']}"
        )
        assert record["row"]["mean_loss"] == pytest.approx(expected_mean_loss(record["function"]), rel=1e-6)
        assert record["row"]["kl"] is None  # NaN is written as null: every line is standard JSON
    assert sorted(p.name for p in (log_path.parent / "losses").iterdir()) == [
        "gen_001.py",
        "gen_011.py",
        "gen_012.py",
    ]

    # the table: seed rows and accepted losses, best first (mean losses: hinge 0, DPO 0.22, IPO 5)
    assert [row["name"] for row in result.table] == [
        "hinge_margin", "dpo_sigmoid", "sigmoid (TRL)", "ipo_square", "kto (TRL)"
    ]  # fmt: skip
    assert result.table[0]["win_rate"] == 1.0 and result.table[1]["win_rate"] == pytest.approx(
        0.8024, abs=1e-4
    )
    counts = {"import": 1, "call": 1, "dunder": 1, "loop": 1, "timeout": 1, "shape": 1, "constant": 1}
    counts |= {"no_gradient": 1, "syntax": 1}
    assert result.refusals == counts
    summary = json.loads(result.summary_path.read_text())
    assert summary["refusals"] == counts and summary["generations"] == 12 and summary["accepted"] == 3
    assert [row["name"] for row in summary["table"]] == [row["name"] for row in result.table]

    # what the LLM saw: the rules and signature, the scored table best first with code, recent refusals
    prompts = server.prompts()
    assert (
        "def my_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)" in prompts[0]
    )
    assert (
        "No loss is scored yet" not in prompts[0]
        and "1. sigmoid (TRL) (known loss): win_rate=0.5" in prompts[0]
    )
    assert "1. dpo_sigmoid (generation 1): win_rate=0.8" in prompts[1] and DPO.rstrip("\n") in prompts[1]
    assert prompts[1].index("dpo_sigmoid") < prompts[1].index("sigmoid (TRL)")
    assert "- generation 2: import (line 1: imports are not allowed" in prompts[2]
    assert "generation 6: timeout" in prompts[11] and "generation 2: import" not in prompts[11]  # the last 5


def test_an_interrupted_search_resumes_without_asking_again(serve, sandbox, tmp_path):
    replies = [
        reply(DPO),
        reply("import os\n" + DPO),
        reply(IPO),
        reply(HINGE),
        reply(DPO.replace("dpo_", "again_")),
    ]
    server, proposer = serve(replies)
    log_path = tmp_path / "discovery.jsonl"
    crashing = FakeEvaluate(fail_on=(3,))
    with pytest.raises(RuntimeError, match="generation 3"):
        discover(5, proposer, crashing, log_path, sandbox=sandbox)
    assert len(server.bodies) == 3 and len(read_log(log_path)) == 2  # generation 3 is pending, not logged
    pending = json.loads((tmp_path / "discovery.pending.json").read_text())
    assert (pending["generation"], pending["function"], pending["status"]) == (3, "ipo_square", "checked")
    first_two = log_path.read_text()

    evaluate = FakeEvaluate()
    result = discover(5, proposer, evaluate, log_path, sandbox=sandbox)
    assert len(server.bodies) == 5  # generations 1-3 were not asked again: only 4 and 5
    assert log_path.read_text().startswith(first_two)  # finished generations untouched
    assert [r["generation"] for r in result.records] == [1, 2, 3, 4, 5]
    assert [c.rsplit(":", 1)[1] for c in evaluate.calls] == ["ipo_square", "hinge_margin", "again_sigmoid"]
    assert [row["name"] for row in result.table] == [
        "hinge_margin",
        "dpo_sigmoid",
        "again_sigmoid",
        "ipo_square",
    ]
    assert result.refusals == {"import": 1} and not (tmp_path / "discovery.pending.json").exists()
    # the prompt for generation 4 holds the table rebuilt from the log
    assert (
        "dpo_sigmoid (generation 1)" in server.prompts()[3]
        and "ipo_square (generation 3)" in server.prompts()[3]
    )

    # a finished search asks nothing and evaluates nothing
    again = FakeEvaluate()
    assert discover(5, proposer, again, log_path, sandbox=sandbox).table == result.table
    assert len(server.bodies) == 5 and again.calls == []


def test_a_line_cut_short_by_a_crash_is_dropped_and_its_generation_redone(sandbox, tmp_path):
    asked = []

    def propose(prompt: str) -> str:  # a plain callable stands in for the LLM
        asked.append(prompt)
        return reply(DPO) if len(asked) % 2 else "Sorry, I cannot write code today."

    log_path = tmp_path / "discovery.jsonl"
    discover(2, propose, FakeEvaluate(), log_path, sandbox=sandbox)
    with open(log_path, "a") as handle:
        handle.write('{"generation": 3, "status": "acc')  # the crash hit mid-write
    result = discover(3, propose, FakeEvaluate(), log_path, sandbox=sandbox)
    assert len(asked) == 3 and [r["generation"] for r in result.records] == [1, 2, 3]
    assert [json.loads(line)["generation"] for line in log_path.read_text().splitlines()] == [1, 2, 3]
    assert result.records[1]["refusal"]["reason"] == "syntax"  # prose without a code block

    log_path.write_text(log_path.read_text().replace('"generation": 2', '"generation": 5'))
    with pytest.raises(ValueError, match="line 2 is generation 5, expected 2"):
        read_log(log_path)


def test_a_loss_that_fails_in_training_is_refused_and_the_search_goes_on(sandbox, tmp_path):
    replies = iter([reply(DPO), reply(HINGE)])

    def evaluate(loss_function: str) -> dict:
        if loss_function.endswith(":dpo_sigmoid"):
            raise LossFailed("non-finite loss at step 3")
        return {"win_rate": 0.6}

    result = discover(
        2, lambda prompt: next(replies), evaluate, tmp_path / "discovery.jsonl", sandbox=sandbox
    )
    assert [r["status"] for r in result.records] == ["refused", "accepted"]
    assert result.records[0]["refusal"] == {"reason": "evaluate", "detail": "non-finite loss at step 3"}
    assert result.refusals == {"evaluate": 1} and [row["name"] for row in result.table] == ["hinge_margin"]


def test_the_proposer_retries_a_server_error_and_reads_the_key_from_the_environment(serve, monkeypatch):
    server, proposer = serve(["```python\nx = 1\n```"], fail_first=1)
    assert proposer("Write a loss.") == "```python\nx = 1\n```"
    assert len(server.bodies) == 2 and server.prompts() == ["Write a loss.", "Write a loss."]
    monkeypatch.delenv("TEST_PROPOSER_KEY")
    with pytest.raises(ValueError, match="TEST_PROPOSER_KEY"):
        OpenAIProposer(ProposerConfig(model="m", base_url=server.url, api_key_env="TEST_PROPOSER_KEY"))


def test_the_proposer_takes_an_openai_judges_endpoint_settings(tmp_path):
    from align_kit.judges.config import JudgeConfig

    judge = JudgeConfig(
        backend="openai", model="served", template=str(tmp_path / "t.txt"), base_url="http://h:1/v1",
        api_key_env="KEY", timeout=7.0, max_retries=1, temperature=0.0, max_new_tokens=8, system_prompt="S",
    )  # fmt: skip
    config = ProposerConfig.from_judge(judge, temperature=0.8, max_new_tokens=1024)
    assert config == ProposerConfig(
        model="served", base_url="http://h:1/v1", api_key_env="KEY", timeout=7.0, max_retries=1,
        temperature=0.8, max_new_tokens=1024, system_prompt="S",
    )  # fmt: skip


def test_code_extraction_and_prompt_rules():
    assert extract_code("Idea.\n```python\ndef f():\n    return 1\n```\nMore.") == "def f():\n    return 1"
    assert (
        extract_code("```\nprint(1)\n```\n```py\ndef g(): pass\n```") == "def g(): pass"
    )  # the one with def
    assert (
        extract_code("```python\ndef cut(x):\n    return") == "def cut(x):\n    return"
    )  # cut by max_tokens
    assert extract_code("def bare(): pass\n") == "def bare(): pass"
    prompt = build_prompt([], score_key="oracle")
    assert "No loss is scored yet" in prompt and "higher oracle is better" in prompt
    assert "F.{binary_cross_entropy_with_logits, celu," in prompt and "range() of integer literals" in prompt
