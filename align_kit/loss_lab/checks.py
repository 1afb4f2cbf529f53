"""Checking a proposed preference loss before anything runs it: the static rules (unit checks in a worker
process follow in ``loss_sandbox``).

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
