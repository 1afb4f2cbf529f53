"""Checking a proposed preference loss before it trains: static rules, then unit checks in a worker.

A proposal is one Python function of ``(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
beta)`` (each a (B,) tensor of summed answer log-probabilities, beta a float) returning per-example losses
(B,) or ``(losses, chosen_rewards, rejected_rewards)``. ``check_source`` parses it with ``ast`` and checks
every node against a closed allow-list without running anything; ``LossSandbox`` then defines and calls it
with restricted builtins on seeded random inputs in a separate process that is killed past a time limit;
``write_loss_file`` saves a checked one where the DPO recipe loads it as ``path/to/file.py:function``.
Each refusal carries one reason code of ``REASONS``.
"""

from __future__ import annotations

import ast
import builtins
import json
import os
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------------
# The rules a proposal must follow

SIGNATURE = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "beta")
# Elementwise maths, reductions and constructors of new tensors shaped like the inputs; nothing that
# reads or writes files, loads pickles, calls back into Python or reaches the interpreter.
TORCH_FUNCTIONS = frozenset(
    "abs acos acosh add amax amin asin asinh atan atan2 atanh cat ceil clamp clamp_max clamp_min clip cos "
    "cosh cumsum div erf erfc exp exp2 expm1 float32 float64 floor full_like isfinite isnan lerp log log10 "
    "log1p log2 log_softmax logaddexp logical_and logical_not logical_or logit logsumexp max maximum mean "
    "min minimum mul nan_to_num neg ones_like pi pow prod reciprocal relu round rsqrt sigmoid sign sin sinc "
    "sinh softmax sqrt square stack std sub sum tanh tensor var where xlogy zeros_like".split()
)
FUNCTIONAL_FUNCTIONS = frozenset(
    "binary_cross_entropy_with_logits celu elu gelu hardsigmoid hardswish hardtanh huber_loss l1_loss "
    "leaky_relu log_softmax logsigmoid mish mse_loss relu relu6 selu sigmoid silu smooth_l1_loss softmax "
    "softmin softplus softsign tanh tanhshrink".split()
)
# Tensor methods and attributes (never in-place ones, callbacks, storage, devices or conversions out).
TENSOR_ATTRIBUTES = frozenset(
    "abs add amax amin atan ceil clamp clamp_max clamp_min clip cos cosh detach device div double dtype erf "
    "erfc exp exp2 expand_as expm1 flatten float floor isfinite item lerp log log10 log1p log2 log_softmax "
    "logit logsumexp max maximum mean min minimum mul nan_to_num ndim neg numel pow prod reciprocal relu "
    "reshape round rsqrt shape sigmoid sign sin sinh size softmax sqrt square squeeze std sub sum t tanh "
    "unsqueeze var view where".split()
)
SAFE_BUILTINS = ("abs", "bool", "float", "int", "len", "max", "min", "pow", "range", "round", "sum")
MAX_RANGE = 1000  # a `for` loop runs over range() of integer literals, at most this many steps
MAX_SOURCE_CHARS = 8000

REASONS = {
    "syntax": "does not parse as Python",
    "size": "too long or nested too deeply",
    "structure": "not exactly one top-level function definition",
    "signature": "arguments other than " + ", ".join(SIGNATURE) + " (or defaults, decorators, annotations)",
    "import": "an import",
    "dunder": "a double-underscore name or attribute",
    "attribute": "an attribute outside the allowed torch, F and tensor names",
    "call": "a call to anything but allowed torch/F functions, tensor methods and safe builtins",
    "name": "a name that is neither an argument, a local, nor an allowed builtin (or rebinds one)",
    "loop": "a while loop, a comprehension, or a for loop not over range() of small integer literals",
    "nested": "a nested function, lambda or class",
    "statement": "a statement or assignment target that is not allowed (with, try, raise, del, x[i] = ...)",
    "expression": "an expression that is not allowed (dict, set, f-string, walrus, yield, starred)",
    "timeout": "its unit check ran past the time limit (the worker was killed)",
    "crash": "the worker process died while checking it",
    "error": "it raised an exception when defined or called",
    "shape": "its output is not a (B,) float tensor or a tuple of three",
    "non_finite": "non-finite losses, rewards or gradients on random inputs",
    "constant": "the same loss for every input",
    "no_gradient": "no gradient with respect to the policy log-probabilities",
    "evaluate": "training or evaluating it failed (LossFailed from evaluate)",
}
_RESERVED = frozenset({"torch", "F", *SAFE_BUILTINS})


class ProposalRefused(Exception):
    """A proposal that breaks a rule; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _refuse(reason: str, node: ast.AST | None, message: str) -> ProposalRefused:
    line = getattr(node, "lineno", None)
    return ProposalRefused(reason, f"line {line}: {message}" if line else message)


def _is_dunder(name: str | None) -> bool:
    return bool(name) and "__" in name


def check_source(source: str) -> str:
    """The name of the one loss function that ``source`` defines; raises ProposalRefused otherwise.

    Nothing is executed: the source is parsed and every node is checked against the rules above.
    """
    if len(source) > MAX_SOURCE_CHARS:
        raise ProposalRefused("size", f"{len(source)} characters, at most {MAX_SOURCE_CHARS}")
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError) as err:  # ValueError: null bytes
        raise ProposalRefused("syntax", f"line {getattr(err, 'lineno', '?')}: {err}") from None
    except (RecursionError, MemoryError):
        raise ProposalRefused("size", "nested too deeply to parse") from None
    try:
        return _Checker().module(tree)
    except RecursionError:
        raise ProposalRefused("size", "nested too deeply to check") from None


class _Checker:
    """Walks one module's AST; the first rule broken raises ProposalRefused."""

    def module(self, tree: ast.Module) -> str:
        for node in ast.walk(tree):  # an import anywhere is the telling reason, even before the function
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                raise _refuse("import", node, "imports are not allowed; torch and F are already there")
        if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef):
            kinds = [type(node).__name__ for node in tree.body]
            raise ProposalRefused(
                "structure", f"expected one function definition and nothing else, got {kinds}"
            )
        function = tree.body[0]
        self.signature(function)
        stored = {
            node.id
            for node in ast.walk(function)
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)
        }
        self.names = set(SIGNATURE) | stored
        self.statements(function.body, loop_depth=0)
        return function.name

    def signature(self, function: ast.FunctionDef) -> None:
        if _is_dunder(function.name):
            raise _refuse("dunder", function, f"function name {function.name!r}")
        if function.name in _RESERVED:
            raise _refuse("name", function, f"function name {function.name!r} shadows an allowed name")
        args = function.args
        if function.decorator_list:
            raise _refuse("signature", function, "decorators are not allowed")
        if args.posonlyargs or args.vararg or args.kwonlyargs or args.kwarg or args.defaults:
            raise _refuse("signature", function, "only the five plain arguments, without defaults")
        names = tuple(arg.arg for arg in args.args)
        if names != SIGNATURE:
            raise _refuse("signature", function, f"arguments must be ({', '.join(SIGNATURE)}), got {names}")
        for annotation in [arg.annotation for arg in args.args] + [function.returns]:
            if annotation is not None and not _plain_annotation(annotation):
                raise _refuse("signature", annotation, f"annotation {ast.unparse(annotation)!r}")

    def statements(self, body: list[ast.stmt], loop_depth: int) -> None:
        for node in body:
            self.statement(node, loop_depth)

    def statement(self, node: ast.stmt, loop_depth: int) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            raise _refuse("nested", node, f"nested {type(node).__name__}")
        if isinstance(node, ast.Assign):
            for target in node.targets:
                self.target(target)
            self.expr(node.value)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            self.target(node.target)
            if isinstance(node, ast.AnnAssign) and not _plain_annotation(node.annotation):
                raise _refuse("signature", node, f"annotation {ast.unparse(node.annotation)!r}")
            if node.value is not None:
                self.expr(node.value)
        elif isinstance(node, (ast.Return, ast.Expr)):
            if node.value is not None:
                self.expr(node.value)
        elif isinstance(node, ast.If):
            self.expr(node.test)
            self.statements(node.body, loop_depth)
            self.statements(node.orelse, loop_depth)
        elif isinstance(node, ast.For):
            self.bounded_range(node.iter)
            self.target(node.target)
            self.statements(node.body, loop_depth + 1)
            self.statements(node.orelse, loop_depth)
        elif isinstance(node, (ast.While, ast.AsyncFor)):
            raise _refuse(
                "loop", node, f"{type(node).__name__} loops are not allowed; use for ... in range(n)"
            )
        elif isinstance(node, (ast.Break, ast.Continue)) and loop_depth == 0:
            raise _refuse("statement", node, "break/continue outside a loop")
        elif not isinstance(node, (ast.Pass, ast.Break, ast.Continue)):
            raise _refuse("statement", node, f"{type(node).__name__} statements are not allowed")

    def bounded_range(self, node: ast.expr) -> None:
        literals = []
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range":
            literals = [_int_literal(arg) for arg in node.args]
        if not literals or len(literals) > 3 or None in literals or node.keywords:
            raise _refuse("loop", node, "a for loop must run over range() of integer literals")
        try:
            steps = len(range(*literals))
        except (ValueError, OverflowError):  # a zero step; more steps than a C integer holds
            steps = MAX_RANGE + 1
        if steps > MAX_RANGE:
            raise _refuse("loop", node, f"range({', '.join(map(str, literals))}): at most {MAX_RANGE} steps")

    def target(self, node: ast.expr) -> None:
        if isinstance(node, ast.Name):
            if _is_dunder(node.id):
                raise _refuse("dunder", node, f"name {node.id!r}")
            if node.id in _RESERVED:
                raise _refuse("name", node, f"assigning to {node.id!r} is not allowed")
        elif isinstance(node, (ast.Tuple, ast.List)):
            for element in node.elts:
                self.target(element)
        else:
            raise _refuse("statement", node, f"assignment to {ast.unparse(node)!r}: only local names")

    def expr(self, node: ast.expr) -> None:
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bytes):
                raise _refuse("expression", node, "bytes literals are not allowed")
        elif isinstance(node, ast.Name):
            if _is_dunder(node.id):
                raise _refuse("dunder", node, f"name {node.id!r}")
            if node.id in ("torch", "F"):
                raise _refuse("name", node, f"{node.id} may only be used as {node.id}.<function>")
            if node.id not in self.names and node.id not in SAFE_BUILTINS:
                raise _refuse("name", node, f"unknown name {node.id!r}")
        elif isinstance(node, ast.Attribute):
            self.attribute(node, "attribute")
        elif isinstance(node, ast.Call):
            self.call(node)
        elif isinstance(node, (ast.Lambda,)):
            raise _refuse("nested", node, "lambdas are not allowed")
        elif isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            raise _refuse("loop", node, "comprehensions are not allowed; use for ... in range(n)")
        elif isinstance(node, (ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp, ast.Subscript)):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.expr):
                    self.expr(child)
        elif isinstance(node, (ast.Tuple, ast.List, ast.Slice)):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.Starred):
                    raise _refuse("expression", child, "starred expressions are not allowed")
                if isinstance(child, ast.expr):
                    self.expr(child)
        else:
            raise _refuse("expression", node, f"{type(node).__name__} expressions are not allowed")

    def attribute(self, node: ast.Attribute, reason: str) -> None:
        if _is_dunder(node.attr):
            raise _refuse("dunder", node, f"attribute {node.attr!r}")
        path = _dotted(node)
        if path and path[0] in ("torch", "F"):
            if path[0] == "torch":
                allowed = (len(path) == 2 and path[1] in TORCH_FUNCTIONS) or (
                    len(path) == 4 and path[1:3] == ["nn", "functional"] and path[3] in FUNCTIONAL_FUNCTIONS
                )
            else:
                allowed = len(path) == 2 and path[1] in FUNCTIONAL_FUNCTIONS
            if not allowed:
                raise _refuse(reason, node, f"{'.'.join(path)} is not an allowed function")
            return
        self.expr(node.value)  # inside out: open(path).read() is refused for open(), not for .read
        if node.attr not in TENSOR_ATTRIBUTES:
            raise _refuse(reason, node, f".{node.attr} is not an allowed tensor method or attribute")

    def call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name):
            if _is_dunder(func.id):
                raise _refuse("dunder", func, f"name {func.id!r}")
            if func.id not in SAFE_BUILTINS:
                raise _refuse("call", func, f"calling {func.id}() is not allowed")
        elif isinstance(func, ast.Attribute):
            self.attribute(func, "call")
        else:
            raise _refuse("call", func, f"calling {ast.unparse(func)!r} is not allowed")
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                raise _refuse("expression", arg, "*args are not allowed")
            self.expr(arg)
        for keyword in node.keywords:
            if keyword.arg is None:
                raise _refuse("expression", keyword.value, "**kwargs are not allowed")
            if _is_dunder(keyword.arg):
                raise _refuse("dunder", keyword.value, f"keyword {keyword.arg!r}")
            self.expr(keyword.value)


def _dotted(node: ast.expr) -> list[str] | None:
    """``torch.nn.functional.softplus`` -> its parts; None unless the chain ends in a plain name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def _int_literal(node: ast.expr) -> int | None:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = _int_literal(node.operand)
        return None if value is None else -value
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    return None


def _plain_annotation(node: ast.expr) -> bool:
    """``torch.Tensor``, ``float``, ``int``, ``tuple[...]`` of those, or None."""
    if isinstance(node, ast.Constant):
        return node.value is None
    if isinstance(node, ast.Name):
        return node.id in ("float", "int", "tuple")
    if isinstance(node, ast.Attribute):
        return _dotted(node) == ["torch", "Tensor"]
    if isinstance(node, ast.Subscript):
        parts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        return _plain_annotation(node.value) and all(_plain_annotation(part) for part in parts)
    return False


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
        code = f"from align_kit.loss_checks import _serve; _serve({int(self.memory_mb)})"
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
        'align_kit.loss_discovery."""\n\nimport torch\nimport torch.nn.functional as F\n\n\n'
    )
    write_atomically(path, header + source.strip("\n") + "\n")
    return f"{path}:{function}"


def write_atomically(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
