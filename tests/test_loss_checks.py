"""Protects the checks a proposed loss must pass before it trains: the static rules refuse imports, file
access, dunder tricks, unbounded loops and everything outside the allow-list with the right counted reason
and never run the code; the worker process defines the loss with restricted builtins, measures real values
on seeded inputs, refuses bad shapes, non-finite, constant and gradient-free losses, and is killed (then
replaced) when a check hangs or dies, without harming the caller."""

from __future__ import annotations

import importlib.util
import math
import threading

import pytest
import torch
import torch.nn.functional as F

from align_kit.loss_lab.checks import (
    FUNCTIONAL_FUNCTIONS,
    REASONS,
    TENSOR_ATTRIBUTES,
    TORCH_FUNCTIONS,
    ProposalRefused,
    check_source,
)
from align_kit.loss_lab.sandbox import LossSandbox, _unit_check, write_loss_file

HEAD = "def loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):\n"
LOGITS = "    logits = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)\n"


def returning(expression: str) -> str:
    """A loss function that computes LOGITS and returns ``expression``."""
    return HEAD + LOGITS + f"    return {expression}\n"


DPO = returning("-F.logsigmoid(beta * logits)")


def body(*lines: str) -> str:
    """A loss function whose body is LOGITS, then ``lines``, then DPO's return."""
    return (
        HEAD
        + LOGITS
        + "".join(f"    {line}\n" for line in lines)
        + "    return -F.logsigmoid(beta * logits)\n"
    )


REFUSED = [
    ("syntax", HEAD + "    return (chosen_logps\n"),
    ("syntax", DPO.replace("def loss", "def loss loss")),
    ("size", HEAD + "    return chosen_logps" + " + chosen_logps" * 1200 + "\n"),
    ("size", HEAD + "    return " + "-" * 1500 + "chosen_logps\n"),  # short, but nested 1500 deep
    ("structure", DPO + "x = 1\n"),
    ("structure", DPO + DPO.replace("def loss", "def other")),
    ("structure", "x = 1\n"),
    ("structure", "async " + DPO),
    ("signature", DPO.replace("beta)", "beta, extra)")),
    ("signature", DPO.replace("beta)", "beta=0.1)")),
    ("signature", DPO.replace("chosen_logps, rejected_logps,", "rejected_logps, chosen_logps,", 1)),
    ("signature", DPO.replace("beta)", "*, beta)")),
    ("signature", "@torch.no_grad\n" + DPO),
    ("signature", DPO.replace("beta)", "beta: open('/etc/passwd'))")),
    ("import", "import os\n" + DPO),
    ("import", body("import os")),
    ("import", body("from torch import load")),
    ("call", body("open('/etc/passwd').read()")),
    ("call", body("eval('1')")),
    ("call", body("exec('x = 1')")),
    ("call", body("getattr(chosen_logps, 'grad_fn')")),
    ("call", body("compile('1', 'x', 'eval')")),
    ("call", body("globals()")),
    ("call", body("print(logits)")),
    ("call", body("torch.load('weights.pt')")),
    ("call", body("torch.save(logits, 'x.pt')")),
    ("call", body("logits.numpy()")),
    ("call", body("logits.register_hook(abs)")),
    ("call", body("loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)")),
    ("call", body("(abs if beta else max)(logits)")),
    ("dunder", body("x = ().__class__.__bases__[0].__subclasses__()")),
    ("dunder", body("x = chosen_logps.__class__")),
    ("dunder", body("x = F.softplus.__globals__")),
    ("dunder", body("x = __builtins__")),
    ("dunder", body("__import__('os')")),
    ("dunder", body("__x = 1")),
    ("dunder", HEAD.replace("def loss", "def __init__") + "    return chosen_logps\n"),
    ("attribute", body("x = torch._C")),
    ("attribute", body("x = torch.ops")),
    ("attribute", body("x = chosen_logps.grad_fn.next_functions")),
    ("attribute", body("x = torch.nn.functional.torch")),
    ("attribute", body("x = F.torch")),
    ("name", body("x = torch")),
    ("name", body("torch = chosen_logps")),
    ("name", body("F = None")),
    ("name", body("abs = 1")),
    ("name", body("x = os")),
    ("name", body("x = open")),
    ("name", DPO.replace("def loss", "def torch")),
    ("loop", body("while True:", "    pass")),
    ("loop", body("for x in chosen_logps:", "    pass")),
    ("loop", body("for i in range(1001):", "    pass")),
    ("loop", body("for i in range(len(logits)):", "    pass")),
    ("loop", body("for i in range(0, 10, 0):", "    pass")),
    ("loop", body(f"for i in range({10**30}):", "    pass")),
    ("loop", body("x = [v for v in range(3)]")),
    ("loop", body("x = sum(v for v in range(3))")),
    ("nested", body("def helper(x):", "    return x")),
    ("nested", body("helper = lambda x: x")),
    ("nested", body("class A:", "    pass")),
    ("statement", body("try:", "    x = 1", "except Exception:", "    pass")),
    ("statement", body("with torch.no_grad():", "    pass")),
    ("statement", body("raise ValueError('no')")),
    ("statement", body("del logits")),
    ("statement", body("assert beta > 0")),
    ("statement", body("logits[0] = 0.0")),
    ("statement", body("chosen_logps.data = logits")),
    ("statement", body("global x")),
    ("statement", body("break")),
    ("expression", body("x = {'a': 1}")),
    ("expression", body("x = f'{beta}'")),
    ("expression", body("x = (y := 1)")),
    ("expression", body("x = torch.stack([*logits])")),
    ("expression", body("x = torch.clamp(logits, **{'min': 0})")),
    ("expression", body("x = b'bytes'")),
]


@pytest.mark.parametrize(("reason", "source"), REFUSED, ids=[f"{r}-{i}" for i, (r, _) in enumerate(REFUSED)])
def test_static_refusals_have_their_reason(reason, source):
    assert reason in REASONS
    with pytest.raises(ProposalRefused) as refused:
        check_source(source)
    assert refused.value.reason == reason, refused.value.detail


ACCEPTED = {
    "dpo": DPO,
    "ipo": returning("(logits - 1 / (2 * beta)) ** 2"),
    "hinge": returning("torch.relu(1 - beta * logits)"),
    "full_path": DPO.replace("F.logsigmoid", "torch.nn.functional.logsigmoid"),
    "annotated": DPO.replace("beta)", "beta: float) -> torch.Tensor").replace(
        "chosen_logps,", "chosen_logps: torch.Tensor,", 1
    ),
    "rewards": HEAD
    + LOGITS
    + "    chosen_rewards = beta * (chosen_logps - ref_chosen_logps).detach()\n"
    + "    rejected_rewards = beta * (rejected_logps - ref_rejected_logps).detach()\n"
    + "    return -F.logsigmoid(beta * logits), chosen_rewards, rejected_rewards\n",
    "everything_else": HEAD
    + '    """A docstring, a loop, a conditional, methods, builtins and keyword arguments."""\n'
    + "    tau: float = 0.05\n"
    + "    total = 0.0 * chosen_logps\n"
    + "    for k in range(3):\n"
    + "        if k == 1:\n"
    + "            continue\n"
    + "        total += torch.clamp(chosen_logps - rejected_logps, min=-abs(k), max=max(k, 1))\n"
    + "    scale = float(tau) if beta > 0 and not beta < -1 else 1.0\n"
    + "    shifted = total[:] - total.mean() + torch.stack([chosen_logps, rejected_logps]).sum(0).exp() * 0\n"
    + "    return F.softplus(-scale * shifted).view(-1)\n",
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_allowed_losses_pass_the_static_check(name):
    assert check_source(ACCEPTED[name]) == "loss"


def test_allow_lists_name_real_functions_and_nothing_that_reaches_python():
    tensor = torch.zeros(2)
    assert all(hasattr(torch, name) for name in TORCH_FUNCTIONS)
    assert all(hasattr(F, name) for name in FUNCTIONAL_FUNCTIONS)
    assert all(hasattr(tensor, name) for name in TENSOR_ATTRIBUTES)
    risky = {"load", "save", "from_file", "apply_", "map_", "register_hook", "backward", "grad", "data", "to"}
    risky |= {
        "numpy",
        "tolist",
        "storage",
        "untyped_storage",
        "set_",
        "format",
        "ops",
        "hub",
        "jit",
        "compile",
    }
    for names in (TORCH_FUNCTIONS, FUNCTIONAL_FUNCTIONS, TENSOR_ATTRIBUTES):
        assert not names & risky
        assert not [n for n in names if n.startswith("_") or n.endswith("_")]  # private or in-place


@pytest.fixture(scope="module")
def sandbox():
    with pytest.MonkeyPatch.context() as patch, LossSandbox(timeout=2.0) as box:
        patch.setenv("OPENAI_API_KEY", "sk-secret")  # a key the worker must not inherit
        box.start()
        yield box


def test_a_passing_loss_is_measured_on_seeded_inputs_in_the_worker(sandbox):
    # chosen_logps - chosen_logps.detach() is 0 with gradient 1: the loss is exactly beta in each case
    # (0.1, then 0.5), and its gradient is beta on chosen_logps and 0 on rejected_logps.
    source = HEAD + "    return beta * (chosen_logps - chosen_logps.detach() + 1)\n"
    verdict = sandbox.check(source, "loss")
    assert verdict["passed"] and verdict["reason"] is None
    assert verdict["checks"] == {
        "runs": True,
        "shape": True,
        "finite": True,
        "varies": True,
        "gradient": True,
    }
    assert verdict["stats"]["mean_loss"] == pytest.approx([0.1, 0.5])
    assert verdict["stats"]["mean_abs_gradient"] == pytest.approx((0.1 / 2 + 0.5 / 2) / 2)
    # the worker computes what the same check computes here
    dpo = sandbox.check(DPO, "loss")
    assert dpo["passed"] and dpo == _unit_check(DPO, "loss", sandbox.seed, sandbox.batch_size)
    assert 0 < dpo["stats"]["mean_loss"][0] < 1 < dpo["stats"]["mean_loss"][1]


FAILING = [
    ("shape", returning("-F.logsigmoid(beta * logits)[None]")),
    ("shape", returning("-F.logsigmoid(beta * logits).mean()")),
    ("shape", returning("0.5")),
    ("shape", returning("logits, logits")),
    ("shape", returning("logits, logits, logits[:2]")),
    ("constant", returning("torch.ones_like(logits)")),
    ("constant", returning("logits * 0 + 0.69")),
    ("no_gradient", returning("-F.logsigmoid(beta * logits.detach())")),
    ("no_gradient", returning("-F.logsigmoid(beta * logits.round())")),
    ("non_finite", returning("torch.exp(-10 * beta * logits)")),
    ("non_finite", returning("logits / (logits > 1e9)")),
    ("non_finite", returning("torch.sqrt((logits * 0).abs()) + logits")),  # finite values, NaN gradient
    ("error", returning("logits.view(3, 7)")),
    ("error", returning("torch.cat([logits, logits.sum()])")),
    # 16**8 elements (17 GB) from allowed operations: refused by the worker's memory limit, not the host
    ("error", body(*["logits = (logits[:, None] * logits[None, :]).flatten()"] * 3)),
]


@pytest.mark.parametrize(("reason", "source"), FAILING, ids=[f"{r}-{i}" for i, (r, _) in enumerate(FAILING)])
def test_unit_checks_refuse_with_their_reason(sandbox, reason, source):
    assert check_source(source) == "loss"  # statically fine: only running it shows the fault
    verdict = sandbox.check(source, "loss")
    assert not verdict["passed"] and verdict["reason"] == reason, verdict["detail"]
    assert list(verdict["checks"].values())[-1] is False  # the failed check is the last one recorded


def test_the_worker_has_only_the_safe_builtins(sandbox):
    # sandbox.check trusts check_source to have run; its restricted builtins are a second line anyway
    for call, error in [
        ("open('/etc/passwd')", "NameError"),
        ("print(1)", "NameError"),
        ("getattr(beta, 'real')", "NameError"),
        ("__import__('os')", "ImportError"),  # only torch modules already loaded, which torch's C code needs
    ]:
        verdict = sandbox.check(body(f"x = {call}"), "loss")
        assert verdict["reason"] == "error" and error in verdict["detail"], verdict


def test_the_worker_sees_no_api_keys_and_no_gpu(sandbox):
    assert sandbox.check(DPO, "loss")["passed"]  # the worker has exec'd: /proc shows its own environment
    with open(f"/proc/{sandbox._process.pid}/environ", "rb") as handle:
        environment = dict(item.split(b"=", 1) for item in handle.read().split(b"\0") if item)
    assert b"OPENAI_API_KEY" not in environment and environment[b"CUDA_VISIBLE_DEVICES"] == b""
    assert b"PATH" in environment


@pytest.mark.slow
def test_a_worker_that_dies_mid_check_is_a_crash_and_is_replaced_at_once(sandbox):
    # (a check that hangs is killed and replaced the same way: see test_loss_discovery.py)
    sandbox.check(DPO, "loss")  # a live worker
    starts, worker = sandbox.starts, sandbox._process
    endless = body(
        "for i in range(1000):",
        "    for j in range(1000):",
        "        for k in range(1000):",
        "            x = i",
    )
    killer = threading.Timer(0.3, worker.kill)
    killer.start()
    verdict = sandbox.check(endless, "loss")
    killer.join()
    assert verdict["reason"] == "crash" and "-9" in verdict["detail"] and verdict["checks"] == {"runs": False}
    assert sandbox.starts == starts + 1 and sandbox._process is not worker and sandbox._process.poll() is None


def test_a_checked_loss_file_loads_as_the_recipe_loads_it_and_decodes_as_checked(tmp_path):
    # A coding declaration on line 1 or 2 of a file decides how Python decodes it: as UTF-7 the comment
    # below would end at "+AAo-" (a newline) and smuggle in a return the checker never saw. The file's
    # header pushes the proposal below line 2, where the declaration is just a comment.
    smuggled = "    # +AAo-    return chosen_logps * 0\n"
    source = (
        "# -*- coding: utf-7 -*-\n" + HEAD + LOGITS + smuggled + "    return -F.logsigmoid(beta * logits)\n"
    )
    assert "\n    return chosen_logps * 0" in source.encode().decode("utf-7")
    assert check_source(source) == "loss"
    spec = write_loss_file(tmp_path / "losses", 7, source, "loss")
    path, function = spec.rsplit(":", 1)
    assert path == str((tmp_path / "losses" / "gen_007.py").resolve()) and function == "loss"
    assert source in open(path, encoding="utf-8").read()
    module_spec = importlib.util.spec_from_file_location("gen_007", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    chosen, rejected = torch.tensor([-10.0, -20.0]), torch.tensor([-14.0, -18.0])
    reference = torch.tensor([-12.0, -19.0])
    losses = getattr(module, function)(chosen, rejected, reference, reference, 0.5)
    expected = [math.log1p(math.exp(-0.5 * 4)), math.log1p(math.exp(-0.5 * -2))]  # margins 4 and -2
    assert losses.tolist() == pytest.approx(expected)
