"""Unit checks of a proposed preference loss in a separate worker process: ``LossSandbox`` defines the
proposal (already passed by ``loss_checks.check_source``) with restricted builtins and calls it on seeded
random inputs, killed past a time limit; ``write_loss_file`` saves a checked one where the DPO recipe loads
it as ``path/to/file.py:function``."""

from __future__ import annotations

import builtins
import json
import os
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

from align_kit import files
from align_kit.loss_lab.checks import SAFE_BUILTINS

# ---------------------------------------------------------------------------------------------------
# Unit checks, in a separate process with a time limit

# (spread of the policy's log-probabilities around the reference's in nats, beta): near the
# reference, where DPO-like losses are smooth, and far from it, where exp() and division overflow.
CHECK_CASES = ((1.0, 0.1), (20.0, 0.5))
_WARM_UP = (
    "def dpo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):\n"
    "    logits = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)\n"
    "    return -F.logsigmoid(beta * logits)\n"
)


def _verdict(reason: str | None, detail: str, checks: dict[str, bool], stats: dict | None = None) -> dict:
    return {
        "passed": reason is None,
        "reason": reason,
        "detail": detail[:300],
        "checks": checks,
        "stats": stats or {},
    }


def _unit_check(source: str, function: str, seed: int, batch_size: int) -> dict[str, Any]:
    """Define the proposal with restricted builtins and call it on seeded random (B,) inputs: output
    shape, finite values, not constant, a gradient with respect to the policy log-probabilities."""
    import torch
    import torch.nn.functional as F

    checks: dict[str, bool] = {}
    restricted = {name: getattr(builtins, name) for name in SAFE_BUILTINS}
    restricted["__import__"] = _import_loaded  # unreachable by name from a proposal: dunder is refused
    namespace = {"__builtins__": restricted, "torch": torch, "F": F}
    try:
        exec(compile(source, "<proposal>", "exec"), namespace)
        loss_fn = namespace[function]
    except Exception as err:
        checks["runs"] = False
        return _verdict("error", f"defining it raised {type(err).__name__}: {err}", checks)
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for spread, beta in CHECK_CASES:
        reference = -(10 + 90 * torch.rand(2, batch_size, generator=generator))  # summed log-probs
        policy = (reference + spread * torch.randn(2, batch_size, generator=generator)).requires_grad_()
        try:
            output = loss_fn(policy[0], policy[1], reference[0], reference[1], beta)
        except Exception as err:
            checks["runs"] = False
            return _verdict("error", f"calling it raised {type(err).__name__}: {err}", checks)
        checks["runs"] = True
        parts = output if isinstance(output, tuple) else (output,)
        shapes = [tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__ for p in parts]
        if len(parts) not in (1, 3) or not all(
            isinstance(p, torch.Tensor) and p.is_floating_point() and p.shape == (batch_size,) for p in parts
        ):
            checks["shape"] = False
            expected = f"a float tensor of shape ({batch_size},) or a tuple of three"
            return _verdict("shape", f"returned {shapes}, expected {expected}", checks)
        checks["shape"] = True
        if not all(bool(torch.isfinite(p).all()) for p in parts):
            checks["finite"] = False
            return _verdict("non_finite", f"non-finite output at spread {spread} nats, beta {beta}", checks)
        checks["finite"] = True
        cases.append((policy, parts[0]))
    values = torch.cat([losses.detach() for _, losses in cases])
    if float(values.max() - values.min()) <= 1e-6 * max(1.0, float(values.abs().mean())):
        checks["varies"] = False
        return _verdict("constant", f"every loss is {float(values[0]):.6g}", checks)
    checks["varies"] = True
    gradient = 0.0
    for policy, losses in cases:
        if not losses.requires_grad:
            continue
        try:
            (grad,) = torch.autograd.grad(losses.sum(), policy, allow_unused=True)
        except Exception as err:
            checks["gradient"] = False
            return _verdict("error", f"its backward pass raised {type(err).__name__}: {err}", checks)
        if grad is not None:
            if not bool(torch.isfinite(grad).all()):
                checks["gradient"] = False
                return _verdict("non_finite", "non-finite gradient", checks)
            gradient += float(grad.abs().mean())
    if gradient == 0.0:
        checks["gradient"] = False
        return _verdict(
            "no_gradient", "zero gradient with respect to chosen_logps and rejected_logps", checks
        )
    checks["gradient"] = True
    stats = {
        "mean_loss": [float(losses.detach().mean()) for _, losses in cases],
        "mean_abs_gradient": gradient / len(cases),
    }
    return _verdict(None, "", checks, stats)


def _import_loaded(
    name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0
) -> Any:
    """Some of torch's C code imports torch lazily, through the builtins of the calling frame (the
    proposal's): it gets torch modules that are already loaded, and nothing else."""
    if level == 0 and name.partition(".")[0] == "torch" and name in sys.modules:
        return sys.modules[name] if fromlist else sys.modules["torch"]
    raise ImportError(f"importing {name!r} is not allowed here")


def _limit_memory(memory_mb: int) -> None:
    """Cap the worker's address space at what it maps now (torch, CUDA libraries included) plus
    ``memory_mb``: a huge allocation then fails in the worker instead of swapping the host. Linux only."""
    try:
        import resource

        with open("/proc/self/statm") as statm:
            mapped = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = mapped + memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, OSError, ValueError):  # not Linux, or a lower hard limit already
        pass


def _serve(memory_mb: int) -> None:
    """The worker (``python -c``): one JSON request per line on stdin, one JSON verdict per line on its
    own copy of stdout, until stdin closes. Anything else that writes to stdout lands on stderr."""
    import warnings

    channel = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    _unit_check(_WARM_UP, "dpo", 0, 4)  # torch's lazy start-up is paid before the first timed check
    _limit_memory(memory_mb)
    channel.write('{"ready": true}\n')
    channel.flush()
    for line in sys.stdin:
        channel.write(json.dumps(_unit_check(**json.loads(line))) + "\n")
        channel.flush()


# What the worker inherits: enough to find Python, its packages and libraries; no API keys or tokens.
_WORKER_ENV = ("PATH", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CONDA_PREFIX", "LD_LIBRARY_PATH", "HOME")
_WORKER_ENV += ("LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "SYSTEMROOT")


def _worker_environment() -> dict[str, str]:
    env = {key: os.environ[key] for key in _WORKER_ENV if key in os.environ}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the checks run on CPU; a proposal never touches the GPUs
    return env


class LossSandbox:
    """Unit-checks proposals in one worker process (a fresh interpreter: nothing of the caller is shared).

    A check that gets no answer within ``timeout`` seconds kills the worker (reason ``timeout``); one whose
    worker dies is a ``crash``; either way a fresh worker starts at once. The worker defines proposals with
    restricted builtins, sees no GPU and only the environment variables Python needs (no API keys), and
    may map ``memory_mb`` beyond what torch maps. Reuse one sandbox for many checks: starting a worker
    (importing torch) costs seconds, a check milliseconds. POSIX only (select() on a pipe).
    """

    def __init__(
        self,
        timeout: float = 10.0,
        *,
        start_timeout: float = 120.0,
        memory_mb: int = 2048,
        seed: int = 0,
        batch_size: int = 16,
    ):
        self.timeout, self.start_timeout, self.memory_mb = timeout, start_timeout, memory_mb
        self.seed, self.batch_size = seed, batch_size
        self.starts = 0  # workers started so far (one, plus one after each timeout or crash)
        self._process: subprocess.Popen | None = None
        self._ready = False

    def __enter__(self) -> LossSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start a worker without waiting for it (it imports torch meanwhile); ``check`` waits for it."""
        if self._process is not None and self._process.poll() is None:
            return
        self.close()
        code = f"from align_kit.loss_lab.sandbox import _serve; _serve({int(self.memory_mb)})"
        self._process = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_worker_environment(),
        )
        self._ready = False
        self.starts += 1

    def _answer(self, timeout: float) -> dict | str:
        """The worker's next line, or "timeout" when none comes in time, or "crash" when it died."""
        ready, _, _ = select.select([self._process.stdout], [], [], timeout)
        if not ready:
            return "timeout"
        line = self._process.stdout.readline()
        return json.loads(line) if line else "crash"

    def check(self, source: str, function: str) -> dict[str, Any]:
        """The verdict on a statically checked proposal: ``passed``, ``reason``, ``detail``, ``checks``
        (each check that ran: passed or not) and ``stats``."""
        self.start()
        if not self._ready:
            if not isinstance(self._answer(self.start_timeout), dict):
                self.close()
                raise RuntimeError(f"the loss-check worker did not start within {self.start_timeout:g} s")
            self._ready = True
        request = {"source": source, "function": function, "seed": self.seed, "batch_size": self.batch_size}
        try:
            self._process.stdin.write(json.dumps(request) + "\n")
            self._process.stdin.flush()
            answer = self._answer(self.timeout)
        except OSError:  # a broken pipe: the worker died before the request
            answer = "crash"
        if isinstance(answer, dict):
            return answer
        if answer == "timeout":
            verdict = _verdict(
                "timeout", f"no answer within {self.timeout:g} s; the worker was killed", {"runs": False}
            )
        else:
            verdict = _verdict(
                "crash", f"the worker died (exit code {self._process.wait()})", {"runs": False}
            )
        self.close()
        self.start()  # the replacement imports torch while the caller does something else
        return verdict

    def close(self) -> None:
        """Stop the worker (it holds nothing worth a graceful exit)."""
        if self._process is None:
            return
        process, self._process = self._process, None
        process.kill()
        process.wait()
        for pipe in (process.stdin, process.stdout):
            try:
                pipe.close()
            except OSError:  # a broken pipe with unflushed bytes
                pass


def write_loss_file(folder: str | Path, generation: int, source: str, function: str) -> str:
    """Save a checked proposal as ``folder/gen_<generation>.py``; returns the ``path:function`` that the
    DPO recipe's ``loss_function`` setting loads."""
    path = Path(folder).resolve() / f"gen_{generation:03d}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    # The header also pushes the proposal below line 2, where a coding declaration no longer applies, so
    # the file decodes to exactly the text that was checked.
    header = (
        f'"""Loss proposed in generation {generation} of a loss discovery run; it passed the checks of '
        'align_kit.loss_lab.discovery."""\n\nimport torch\nimport torch.nn.functional as F\n\n\n'
    )
    files.write_text(path, header + source.strip("\n") + "\n")
    return f"{path}:{function}"
