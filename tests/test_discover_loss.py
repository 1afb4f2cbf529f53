"""Protects recipes/discover_loss.py end to end: a scripted LLM on a loopback OpenAI-compatible server proposes
losses; the known losses of the sweep are trained first and shown in the prompt; a good proposal is trained
and scored as a sweep member (a real DPO run of the tiny model), bad ones are refused with their reason, all
are logged in discovery.jsonl, and a rerun asks the LLM only for the generations not yet done."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import load_recipe
from test_loss_discovery import DPO, HINGE, ScriptedChatServer, loss, reply
from test_loss_sweep import SWEEP

from align_kit.loss_lab.discovery import read_log

pytestmark = pytest.mark.slow  # a checking worker starts (imports torch) and three tiny models train

SCRIPT = [
    reply(DPO, "DPO's logistic loss."),
    reply("import os\n" + DPO),
    reply(loss("batch_mean", "return -F.logsigmoid(beta * logits).mean()")),
    reply(HINGE, "A margin loss."),
]


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-scripted")  # read by the openai_pairwise judge's api_key_env
    scripted = ScriptedChatServer(SCRIPT)
    scripted.thread.start()
    yield scripted
    scripted.httpd.shutdown()
    scripted.httpd.server_close()


def test_discovery_recipe_proposes_checks_trains_scores_and_resumes(server, tmp_path, micro_model_dir):
    config = tmp_path / "discover.yaml"
    settings = {**SWEEP, "losses": ["sigmoid"], "model_name_or_path": str(micro_model_dir), "generations": 3}
    config.write_text(
        f"# accelerate launch recipes/discover_loss.py --config {config}\n" + yaml.safe_dump(settings)
    )
    out = tmp_path / "out"
    argv = ["--config", str(config), "--output_dir", str(out), "--proposer_base_url", server.url]
    argv += ["--proposer_model", "scripted", "--check_timeout", "20"]

    result = load_recipe("discover_loss").main(argv)
    records = read_log(out / "discovery" / "discovery.jsonl")
    assert [r["status"] for r in records] == ["accepted", "refused", "refused"]
    assert [r["refusal"]["reason"] for r in records[1:]] == ["import", "shape"]
    assert result["refusals"] == {"import": 1, "shape": 1}
    row = records[0]["row"]
    assert row["ci_low"] <= row["win_rate"] <= row["ci_high"] and 0.0 <= row["reward_accuracy"] <= 1.0
    assert (out / row["member"] / "run_complete.json").exists()
    member = yaml.safe_load((out / row["member"] / "member.yaml").read_text())
    assert member["loss_function"] == records[0]["loss_function"] and member["beta"] == 0.1
    assert len(server.bodies) == 3 and server.bodies[0]["model"] == "scripted"
    assert "sigmoid at beta 0.1" in server.prompts()[0]  # the sweep's member, shown as a known loss
    assert "dpo_sigmoid" in server.prompts()[1]  # the accepted proposal joined the table

    again = load_recipe("discover_loss").main([*argv, "--generations", "4"])
    records = read_log(out / "discovery" / "discovery.jsonl")
    assert len(server.bodies) == 4  # generations 1-3 were not asked again
    assert [r["status"] for r in records] == ["accepted", "refused", "refused", "accepted"]
    names = [row.get("name") for row in again["table"]]
    assert {"dpo_sigmoid", "hinge_margin", "sigmoid at beta 0.1"} <= set(names)
    summary = json.loads((out / "discovery" / "discovery_summary.json").read_text())
    assert summary["generations"] == 4 and summary["accepted"] == 2
