"""Mutation testing of the core: `make mutation` (see docs/testing.md).

Generates mutants of the target files by small AST edits (one at a time: an operator, a comparison, a constant, a
call swapped, a statement dropped, ...), runs the fast tests that exercise the mutated function against each, and
reports which mutants no test notices. A mutant is *killed* when a test fails (or errors, or the mutant times out)
and *survives* when every test passes; survivors of the fast tier are run again against the slow tier (real
multi-process tests) where a target lists one.

How it runs: one pytest session (in this process) imports the project from a private copy of the tree
(`mutation-work/tree/`) and collects the tests once. A baseline run (in a forked child; cached while the sources and
tests do not change) records which lines of the targets each test executes, also in the subprocesses of the
multi-process tests (a `sitecustomize` in the copy), and how long each test takes. Each mutant then runs in a forked
child of the session that applies it to the imported module in place (the mutated functions' `__code__` replaced;
module constants, defaults and class attributes re-executed) and runs, in the same process, the tests that execute
the mutated lines: fast ones first, ordered by their past kills per second, stopping at the first failure. Survivors
run the slow tier (tests over `--max_test_seconds`, `slow`-marked tests, torch.compile tests, tests whose
subprocesses import the target). Every job also writes its mutant into its own copy of src/ (`mutation-work/job<i>/src`), which a
`sitecustomize` puts first on the path of the child's subprocesses (multi-process tests). Mutants whose bytecode
equals the original's are equivalent without a run; a mutant that cannot be applied in place runs in a fresh
interpreter.
Threads are pinned to 1 per child; `--jobs` children run at a time.

    python tools/mutation.py                       # every target, 2 jobs; report in mutation-report/
    python tools/mutation.py --targets sinkhorn    # targets whose path contains "sinkhorn"
    python tools/mutation.py --list                # the mutants only

Known equivalent mutants (no test can kill them: they change nothing observable) are listed in
`tools/mutation_equivalent.json` with the reason; the score leaves them out.
"""

from __future__ import annotations

import argparse
import ast
import bisect
import copy
import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from collections import defaultdict
from dataclasses import asdict, dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EQUIVALENT_FILE = os.path.join(ROOT, "tools", "mutation_equivalent.json")

TARGETS = {
    "src/optvq_hf/sinkhorn.py": dict(
        fast=["tests/test_sinkhorn.py", "tests/test_sinkhorn_engine.py", "tests/test_sinkhorn_extremes.py",
              "tests/test_sinkhorn_cost_map.py", "tests/test_otvae.py", "tests/test_quantizer.py",
              "tests/test_quantizer_edges.py", "tests/test_reliability.py"],
        slow=["tests/test_sinkhorn_distributed.py", "tests/test_quantizer_compile.py"],
    ),
    "src/optvq_hf/quantization.py": dict(
        fast=["tests/test_quantizer.py", "tests/test_quantizer_edges.py", "tests/test_quantization_loss.py",
              "tests/test_sinkhorn.py", "tests/test_sinkhorn_engine.py", "tests/test_sinkhorn_extremes.py",
              "tests/test_otvae.py", "tests/test_core.py", "tests/test_modeling.py", "tests/test_training.py",
              "tests/test_reliability.py"],
        slow=["tests/test_sinkhorn_distributed.py", "tests/test_quantizer_compile.py"],
    ),
    "src/optvq_hf/autoencoder.py": dict(
        fast=["tests/test_modeling.py", "tests/test_core.py", "tests/test_diffusers.py",
              "tests/test_convert_original.py", "tests/test_processing.py", "tests/test_autoencoder_edges.py"],
        slow=[],
    ),
    "src/optvq_hf/training/losses.py": dict(
        fast=["tests/test_training.py", "tests/test_training_losses.py", "tests/test_metrics.py"],
        slow=[],
    ),
}
COPY = ["src", "tests", "examples", "docs", "README.md", "pyproject.toml"]
# Packages that the editable install maps to a folder other than src/ (pyproject's package-dir): a child imports them
# from its own copy through symlinks in `<workdir>/packages`, which comes before the install's finder on sys.path.
MAPPED_PACKAGES = {"optvq_hf_examples": "examples"}
# ------------------------------------------------------------------------------------------------------------------
# Mutants
# ------------------------------------------------------------------------------------------------------------------
BINARY_SWAPS = {ast.Add: [ast.Sub], ast.Sub: [ast.Add], ast.Mult: [ast.Div], ast.Div: [ast.Mult],
                ast.FloorDiv: [ast.Div], ast.Mod: [ast.FloorDiv], ast.Pow: [ast.Mult], ast.BitAnd: [ast.BitOr],
                ast.BitOr: [ast.BitAnd], ast.LShift: [ast.RShift], ast.RShift: [ast.LShift]}
COMPARE_SWAPS = {ast.Lt: [ast.LtE, ast.GtE], ast.LtE: [ast.Lt, ast.Gt], ast.Gt: [ast.GtE, ast.LtE],
                 ast.GtE: [ast.Gt, ast.Lt], ast.Eq: [ast.NotEq], ast.NotEq: [ast.Eq], ast.Is: [ast.IsNot],
                 ast.IsNot: [ast.Is], ast.In: [ast.NotIn], ast.NotIn: [ast.In]}
CALL_SWAPS = {"argmax": "argmin", "argmin": "argmax", "amax": "amin", "amin": "amax", "max": "min", "min": "max",
              "maximum": "minimum", "minimum": "maximum", "sum": "mean", "mean": "sum", "clamp_min": "clamp_max",
              "clamp_min_": "clamp_max_", "logaddexp": "maximum", "logsumexp": "amax", "exp": "exp2", "exp_": "exp2_",
              "log": "log2", "sqrt": "square", "sqrt_": "square_", "relu": "leaky_relu", "softplus": "relu",
              "abs": "neg", "norm": "sum", "sub_": "add_", "add_": "sub_", "mul_": "div_", "div_": "mul_"}
# Calls whose removal keeps the value but drops a conversion or a guard: `x.detach()` -> `x`.
CALL_DROPS = {"detach", "float", "double", "clone", "contiguous", "clamp_min", "clamp_min_", "t"}
ENUM_STRINGS = [("all", "dim", "none"), ("sinkhorn", "nearest"), ("active", "passive"), ("sum", "max", "min"),
                ("image", "sequence"), ("hinge", "vanilla"), ("world", "local")]


@dataclass
class Mutant:
    file: str
    line: int
    function: str | None  # qualified name of the enclosing function (None: module or class level)
    operator: str
    original: str
    replacement: str
    start: int  # byte offsets of the replaced segment
    stop: int
    end_line: int = 0  # last line of the replaced segment
    key: str = ""  # stable across unrelated edits: file, function, operator, texts, occurrence
    status: str = "pending"
    killer: str = ""
    seconds: float = 0.0
    tests: int = 0
    verdict: str = ""

    def short(self) -> str:
        original = " ".join(self.original.split())
        replacement = " ".join(self.replacement.split())
        return f"{self.file}:{self.line} ({self.function or 'module'}) {self.operator}: `{original}` -> `{replacement}`"


def _op_text(op) -> str:
    return ast.unparse(ast.BinOp(ast.Name("a"), op, ast.Name("b")))[2:-2]


class _Collector(ast.NodeVisitor):
    def __init__(self, source: bytes, path: str):
        self.source = source
        self.path = path
        self.lines = source.split(b"\n")
        self.offsets = [0]
        for line in self.lines:
            self.offsets.append(self.offsets[-1] + len(line) + 1)
        self.scope: list[str] = []
        self.function_depth = 0
        self.mutants: list[Mutant] = []

    # ---- helpers -------------------------------------------------------------------------------------------
    def span(self, node):
        start = self.offsets[node.lineno - 1] + node.col_offset
        stop = self.offsets[node.end_lineno - 1] + node.end_col_offset
        return start, stop

    def text(self, node) -> str:
        start, stop = self.span(node)
        return self.source[start:stop].decode()

    def qualname(self):
        return ".".join(self.scope) if self.function_depth else None

    def add(self, node, operator, replacement, target=None):
        target = target or node
        start, stop = self.span(target)
        original = self.source[start:stop].decode()
        if original == replacement:
            return
        self.mutants.append(Mutant(self.path, target.lineno, self.qualname(), operator, original, replacement, start,
                                   stop, target.end_lineno))

    # ---- scopes and what is never mutated ------------------------------------------------------------------
    def visit_FunctionDef(self, node):
        # decorators and annotations run at import or are documentation: not mutated
        nested = ["<locals>"] if self.function_depth else []  # as in a code object's co_qualname
        self.scope += nested + [node.name]
        self.function_depth += 1
        self.visit(node.args)
        for statement in self._body(node.body):
            self.visit(statement)
        self.function_depth -= 1
        del self.scope[len(self.scope) - 1 - len(nested):]

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_arguments(self, node):
        for default in node.defaults + [d for d in node.kw_defaults if d is not None]:
            self.visit(default)

    def visit_ClassDef(self, node):
        self.scope.append(node.name)
        depth = self.function_depth
        for statement in self._body(node.body):
            self.visit(statement)
        self.function_depth = depth
        self.scope.pop()

    def _body(self, body):
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(
            body[0].value.value, str
        ):
            body = body[1:]  # docstring
        return body

    def visit_Module(self, node):
        for statement in self._body(node.body):
            self.visit(statement)

    def visit_Import(self, node):
        pass

    visit_ImportFrom = visit_Import

    def visit_Raise(self, node):
        pass  # the error paths' messages; their conditions are mutated where they are tested

    def visit_Assert(self, node):
        pass

    def visit_JoinedStr(self, node):
        pass

    def visit_AnnAssign(self, node):
        if node.value is not None:
            self.visit(node.value)

    def visit_Assign(self, node):
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return
        self.generic_visit(node)

    # ---- operators -----------------------------------------------------------------------------------------
    def visit_BinOp(self, node):
        for new in BINARY_SWAPS.get(type(node.op), []):
            self.add(node, f"binary {_op_text(node.op)} -> {_op_text(new())}",
                     f"({self.text(node.left)}) {_op_text(new())} ({self.text(node.right)})")
        self.generic_visit(node)

    def visit_AugAssign(self, node):
        for new in BINARY_SWAPS.get(type(node.op), []):
            self.add(node, f"augmented {_op_text(node.op)}= -> {_op_text(new())}=",
                     f"{self.text(node.target)} {_op_text(new())}= {self.text(node.value)}")
        self.add(node, "statement removed", "pass")
        self.generic_visit(node)

    def visit_UnaryOp(self, node):
        if isinstance(node.op, (ast.USub, ast.Not, ast.Invert)):
            self.add(node, f"unary {type(node.op).__name__} removed", f"({self.text(node.operand)})")
        self.generic_visit(node)

    def visit_Compare(self, node):
        if len(node.ops) == 1:
            for new in COMPARE_SWAPS.get(type(node.ops[0]), []):
                symbol = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=",
                          ast.Is: "is", ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in"}
                self.add(node, f"compare {symbol[type(node.ops[0])]} -> {symbol[new]}",
                         f"({self.text(node.left)}) {symbol[new]} ({self.text(node.comparators[0])})")
        self.generic_visit(node)

    def visit_BoolOp(self, node):
        new = " or " if isinstance(node.op, ast.And) else " and "
        self.add(node, f"boolean {type(node.op).__name__.lower()} -> {new.strip()}",
                 new.join(f"({self.text(value)})" for value in node.values))
        self.generic_visit(node)

    def _negate_test(self, node):
        if not isinstance(node.test, (ast.Compare, ast.UnaryOp)):
            self.add(node.test, "condition negated", f"not ({self.text(node.test)})")

    def visit_If(self, node):
        self._negate_test(node)
        self.generic_visit(node)

    def visit_IfExp(self, node):
        self._negate_test(node)
        self.generic_visit(node)

    def visit_While(self, node):
        self._negate_test(node)
        self.generic_visit(node)

    def visit_Constant(self, node):
        value = node.value
        if isinstance(value, bool):
            self.add(node, "constant", repr(not value))
        elif isinstance(value, int):
            self.add(node, "constant", repr(value + 1))
        elif isinstance(value, float):
            self.add(node, "constant", "0.0" if value != 0 else "1.0")
        elif isinstance(value, str):
            for group in ENUM_STRINGS:
                if value in group:
                    other = group[(group.index(value) + 1) % len(group)]
                    self.add(node, "enum string", repr(other))

    def visit_Expr(self, node):
        if isinstance(node.value, ast.Call):
            self.add(node, "statement removed", "pass")
        self.generic_visit(node)

    def visit_Call(self, node):
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        if name == "warn" or (isinstance(node.func, ast.Attribute) and node.func.attr in ("warn", "info", "warning")):
            return
        if name in CALL_SWAPS:
            swapped = CALL_SWAPS[name]
            head = self.text(node.func)
            self.add(node.func, f"call {name} -> {swapped}", head[: len(head) - len(name)] + swapped)
        if isinstance(node.func, ast.Attribute) and name in CALL_DROPS:
            self.add(node, f"call .{name}() dropped", f"({self.text(node.func.value)})")
        if isinstance(node.func, ast.Attribute) and name == "detach" and isinstance(node.func.value, ast.BinOp):
            # `(a - b).detach()` -> `a - b.detach()`: the straight-through estimator's classic slip
            inner = node.func.value
            self.add(node, "detach moved inward",
                     f"({self.text(inner.left)}) {_op_text(inner.op)} ({self.text(inner.right)}).detach()")
        self.generic_visit(node)


def generate(path: str) -> list[Mutant]:
    with open(os.path.join(ROOT, path), "rb") as handle:
        source = handle.read()
    collector = _Collector(source, path)
    tree = ast.parse(source)
    collector.visit(tree)
    # a mutant is valid Python if its top-level statement (from the start of its first line) still parses: parsing
    # that statement instead of the whole file for each mutant (top-level statements parse on their own)
    spans = []
    for node in tree.body:
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        spans.append((collector.offsets[first - 1], collector.offsets[node.end_lineno - 1] + node.end_col_offset))
    starts = [start for start, _ in spans]
    mutants = []
    seen = defaultdict(int)
    for mutant in collector.mutants:
        start, stop = spans[bisect.bisect_right(starts, mutant.start) - 1]
        statement = source[start: mutant.start] + mutant.replacement.encode() + source[mutant.stop: stop]
        try:
            ast.parse(statement)
        except SyntaxError:
            continue
        base = f"{mutant.file}::{mutant.function or '<module>'}::{mutant.operator}::{' '.join(mutant.original.split())}"
        base += f" -> {' '.join(mutant.replacement.split())}"
        seen[base] += 1
        mutant.key = f"{base}#{seen[base]}"
        mutants.append(mutant)
    return mutants


# ------------------------------------------------------------------------------------------------------------------
# Applying a mutant inside a running process
# ------------------------------------------------------------------------------------------------------------------
def _code_key(code, shallow=False):
    """What a code object computes, without its positions (line numbers, columns): equal keys, equal behaviour."""
    consts = []
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            consts.append(("code", const.co_qualname) if shallow else _code_key(const))
        else:
            consts.append((type(const).__name__, repr(const)))
    return (code.co_qualname, code.co_code, tuple(consts), code.co_names, code.co_varnames, code.co_freevars,
            code.co_cellvars, code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags,
            code.co_exceptiontable)


def _code_units(module_code):
    """``{(qualname, occurrence): code}`` of the functions and methods a module defines (not nested ones, which live
    in their parent's constants), and ``{(qualname, occurrence): code}`` of its other code (module, class bodies)."""
    units, others, seen = {}, {}, defaultdict(int)

    def walk(code):
        name = code.co_qualname
        key = (name, seen[name])
        seen[name] += 1
        if code.co_flags & inspect.CO_OPTIMIZED:  # a function
            if "<locals>" not in name:
                units[key] = code
            return  # nested code is part of this function's key
        others[key] = code
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                walk(const)

    walk(module_code)
    return units, others


@functools.lru_cache(maxsize=8)
def _pristine_units(pristine: bytes, filename: str):
    """`_code_units` of the unmutated file, compiled once (every mutant's plan compares against it)."""
    return _code_units(compile(pristine, filename, "exec", dont_inherit=True))


def mutated_source(pristine: bytes, mutant: Mutant) -> bytes:
    return pristine[: mutant.start] + mutant.replacement.encode() + pristine[mutant.stop:]


def patch_plan(pristine: bytes, mutant: Mutant, filename: str) -> tuple[str, list]:
    """How a mutant is applied in a process that imported the pristine module: ``("equivalent", [])`` (the same
    bytecode), ``("code", changed function keys)`` (their ``__code__`` replaced), ``("statement", [])`` (a module or
    class level statement re-executed) or ``("fallback", [])`` (a fresh interpreter with the file on disk)."""
    old_units, old_others = _pristine_units(pristine, filename)
    new_units, new_others = _code_units(compile(mutated_source(pristine, mutant), filename, "exec", dont_inherit=True))
    if set(old_units) != set(new_units) or set(old_others) != set(new_others):
        return "fallback", []
    changed = [key for key in new_units if _code_key(new_units[key]) != _code_key(old_units[key])]
    outer = [key for key in new_others if _code_key(new_others[key], True) != _code_key(old_others[key], True)]
    if not changed and not outer:
        return "equivalent", []
    if changed and not outer:
        return "code", changed
    if outer and not changed:
        return "statement", []
    return "fallback", []


def live_functions(module) -> dict:
    """``{(qualname, occurrence): [function objects]}`` of the functions of `module`'s file alive in this process."""
    import gc

    filename = module.__file__
    found = defaultdict(list)
    for obj in gc.get_objects():
        if isinstance(obj, types.FunctionType) and obj.__code__.co_filename == filename:
            found[obj.__code__.co_qualname, obj.__code__.co_firstlineno].append(obj)
    by_key, seen = {}, defaultdict(int)
    for (name, line), functions in sorted(found.items(), key=lambda item: item[0][1]):
        if "<locals>" in name:
            continue
        by_key[(name, seen[name])] = functions
        seen[name] += 1
    return by_key


def apply_mutant(module, pristine: bytes, mutant: Mutant, plan: tuple[str, list], live: dict) -> bool:
    """Make the imported `module` behave as the mutant (in a forked child); False if this cannot be done here."""
    kind, changed = plan
    filename = module.__file__
    source = mutated_source(pristine, mutant)
    if kind == "code":
        new_units, _ = _code_units(compile(source, filename, "exec", dont_inherit=True))
        for key in changed:
            key = tuple(key)
            if not live.get(key):
                return False
            for function in live[key]:
                function.__code__ = new_units[key]
        return True
    if kind != "statement":
        return False
    tree = ast.parse(source)
    line = mutant.line
    column = mutant.start - (len(b"\n".join(pristine.split(b"\n")[: line - 1])) + (1 if line > 1 else 0))

    def contains(node):
        start, end = (node.lineno, node.col_offset), (node.end_lineno, node.end_col_offset)
        return start <= (line, column) < end

    namespace = dict(vars(module))
    for statement in tree.body:
        if not contains(statement):
            continue
        owner = module
        if isinstance(statement, ast.ClassDef):
            owner = getattr(module, statement.name)
            namespace.update(vars(owner))
            inner = [s for s in statement.body if contains(s)]
            if not inner:
                return False
            statement = inner[0]
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):  # a default value
            return _set_defaults(module, statement, None if owner is module else owner, namespace, live, filename)
        if not isinstance(statement, (ast.Assign, ast.AnnAssign)):
            return False
        targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
        names = {t.id for t in targets if isinstance(t, ast.Name)}
        if len(names) != len(targets):
            return False
        exec(compile(ast.Module([statement], []), filename, "exec"), namespace)
        if owner is not module:
            for name in names:
                setattr(owner, name, namespace[name])
            return True
        # module constants computed from the changed ones follow them, and so do defaults that read them
        for later in tree.body[tree.body.index(statement) + 1:]:
            if isinstance(later, ast.Assign) and all(isinstance(t, ast.Name) for t in later.targets) and any(
                isinstance(n, ast.Name) and n.id in names for n in ast.walk(later.value)
            ):
                exec(compile(ast.Module([later], []), filename, "exec"), namespace)
                names |= {t.id for t in later.targets}
        for name in names:
            setattr(module, name, namespace[name])
        for cls, function in _defaults_using(tree, names):
            if not _set_defaults(module, function, cls, namespace, live, filename):
                return False
        return True
    return False


def _set_defaults(module, function, owner, namespace, live, filename) -> bool:
    """Evaluate the default values of the `function` node (of class `owner`, or None) and give them to the live
    function objects."""
    namespace = dict(namespace)
    if owner is not None:
        owner = getattr(module, owner.name) if isinstance(owner, ast.ClassDef) else owner
        namespace.update(vars(owner))
    bare = copy.copy(function)
    bare.decorator_list, bare.body = [], [ast.Pass()]
    exec(compile(ast.fix_missing_locations(ast.Module([bare], [])), filename, "exec"), namespace)
    fresh = namespace[function.name]
    qualname = function.name if owner is None else f"{owner.__name__}.{function.name}"
    targets = [f for key, fs in live.items() if key[0] == qualname for f in fs]
    for target in targets:
        target.__defaults__, target.__kwdefaults__ = fresh.__defaults__, fresh.__kwdefaults__
    return bool(targets)


# ------------------------------------------------------------------------------------------------------------------
# Which tests cover which lines
# ------------------------------------------------------------------------------------------------------------------
class _LineTracer:
    """Lines of the target files executed (sys.settrace, every thread) while it is on."""

    def __init__(self, filenames):
        self.filenames = set(filenames)
        self.lines = set()

    def _local(self, frame, event, arg):
        if event == "line":
            self.lines.add((frame.f_code.co_filename, frame.f_lineno))
        return self._local

    def _global(self, frame, event, arg):
        if frame.f_code.co_filename in self.filenames:
            self.lines.add((frame.f_code.co_filename, frame.f_lineno))
            return self._local
        return None

    def start(self):
        self.lines = set()
        threading.settrace(self._global)
        sys.settrace(self._global)

    def stop(self):
        sys.settrace(None)
        threading.settrace(None)
        return self.lines


# Subprocesses of the baseline (multi-process tests) trace themselves: the tree's src/ is on their PYTHONPATH.
SITECUSTOMIZE = '''"""Written by tools/mutation.py into its copies of src/: a mutant's subprocesses import it from the copy that
holds it (MUTATION_SRC), and the baseline's subprocesses record their line coverage (MUTATION_TRACE_DIR)."""
import os

if os.environ.get("MUTATION_SRC"):
    import sys

    sys.path.insert(0, os.environ["MUTATION_SRC"])

if os.environ.get("MUTATION_TRACE_DIR"):
    import atexit
    import json
    import sys
    import threading

    _files = set(os.environ["MUTATION_TRACE_FILES"].split(os.pathsep))
    _lines = set()

    def _local(frame, event, arg):
        if event == "line":
            _lines.add((frame.f_code.co_filename, frame.f_lineno))
        return _local

    def _global(frame, event, arg):
        if frame.f_code.co_filename in _files:
            _lines.add((frame.f_code.co_filename, frame.f_lineno))
            return _local
        return None

    def _dump():
        if _lines:
            name = "%s-%d.json" % (os.environ.get("MUTATION_TRACE_TEST", "x"), os.getpid())
            with open(os.path.join(os.environ["MUTATION_TRACE_DIR"], name), "w") as handle:
                json.dump(sorted(_lines), handle)

    sys.settrace(_global)
    threading.settrace(_global)
    atexit.register(_dump)
'''


def prepare_workdir(folder: str):
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".hypothesis")
    for name in COPY:
        source = os.path.join(ROOT, name)
        if os.path.isdir(source):
            shutil.copytree(source, os.path.join(folder, name), ignore=ignore)
        elif os.path.exists(source):
            shutil.copy2(source, os.path.join(folder, name))
    os.makedirs(os.path.join(folder, "packages"))
    for package, path in MAPPED_PACKAGES.items():
        os.symlink(os.path.join(folder, path), os.path.join(folder, "packages", package))
    with open(os.path.join(folder, "src", "sitecustomize.py"), "w") as handle:
        handle.write(SITECUSTOMIZE)


def tree_digest(targets) -> str:
    """What a baseline depends on: the tree's sources and tests, and the collected test files."""
    digest = hashlib.sha256(json.dumps([sorted(targets), PYTEST_ARGS]).encode())
    for top in ("src", "tests", "examples"):
        for folder, dirs, files in sorted(os.walk(os.path.join(ROOT, top))):
            dirs.sort()
            for name in sorted(files):
                if name.endswith((".py", ".json", ".md", ".toml")):
                    path = os.path.join(folder, name)
                    digest.update(os.path.relpath(path, ROOT).encode())
                    with open(path, "rb") as handle:
                        digest.update(handle.read())
    return digest.hexdigest()


PYTEST_ARGS = ["-q", "-p", "no:cacheprovider", "-p", "no:randomly", "-o", "addopts=", "--hypothesis-seed=0",
               "-W", "ignore", "--no-header", "-rfE", "--capture=sys"]


def _defaults_using(tree, names):
    """The functions (with their class, or None) whose default values read one of `names`."""
    found = []
    for statement in tree.body:
        members = [(None, statement)]
        if isinstance(statement, ast.ClassDef):
            members = [(statement, s) for s in statement.body]
        for owner, node in members:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                defaults = node.args.defaults + [d for d in node.args.kw_defaults if d is not None]
                if any(isinstance(n, ast.Name) and n.id in names for d in defaults for n in ast.walk(d)):
                    found.append((owner, node))
    return found


def _assigned_names(tree, statement) -> set[str]:
    """The names a module or class level assignment binds, and the module constants computed from them."""
    targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
    names = {t.id for t in targets if isinstance(t, ast.Name)}
    for later in tree.body:
        if isinstance(later, ast.Assign) and later.lineno > statement.lineno and any(
            isinstance(n, ast.Name) and n.id in names for n in ast.walk(later.value)
        ):
            names |= {t.id for t in later.targets if isinstance(t, ast.Name)}
    return names


def statement_lines(source: bytes, mutant: Mutant) -> set[int] | None:
    """For a module or class level mutant: the lines whose execution it can change (the uses of the names the
    statement assigns, the bodies of the functions whose defaults read them, or the body of the function whose
    default it changes); None: any line. Lines that run at import time only are left out."""
    tree = ast.parse(source)
    for statement in tree.body:
        if not (statement.lineno <= mutant.line <= statement.end_lineno):
            continue
        if isinstance(statement, ast.ClassDef):
            inner = [s for s in statement.body if s.lineno <= mutant.line <= s.end_lineno]
            if not inner:
                return None
            statement = inner[0]
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return set(range(statement.body[0].lineno, statement.end_lineno + 1))
        if not isinstance(statement, (ast.Assign, ast.AnnAssign)):
            return None
        names = _assigned_names(tree, statement)
        lines = set()
        for _, function in _defaults_using(tree, names):
            lines |= set(range(function.body[0].lineno, function.end_lineno + 1))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Name) and node.id in names) or (
                isinstance(node, ast.Attribute) and node.attr in names
            ) or (isinstance(node, ast.Constant) and node.value in names):  # also getattr(x, "name", ...)
                lines.add(node.lineno)
        import_time = set()
        for top in tree.body:
            bodies = top.body if isinstance(top, ast.ClassDef) else [top]
            for node in bodies:
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    import_time |= set(range(node.lineno, node.end_lineno + 1))
        return lines - import_time
    return None


# ------------------------------------------------------------------------------------------------------------------
# The run: one pytest session collects every test once; each mutant runs in a forked child of it
# ------------------------------------------------------------------------------------------------------------------
class Driver:
    """pytest plugin that replaces the test loop by the mutation loop (see the module docstring)."""

    def __init__(self, args, targets, mutants_by_target, tree, previous):
        self.args, self.targets, self.mutants_by_target = args, targets, mutants_by_target
        self.tree, self.previous = tree, previous
        self.items = {}
        self.failed = []  # nodeids failed in this process (a child's run)
        self.call_marker = None  # in a child: a file holding the nodeid whose call phase runs now ("" between calls)
        self.recent_killers = defaultdict(list)  # function -> the tests that killed its latest mutants, latest first

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.failed.append(report.nodeid)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item):
        # the parent times each test's call phase on its own (a hang is found in seconds, not after the whole budget);
        # fixtures' setup (a module fixture that launches processes) is not timed per test
        if self.call_marker:
            _write_marker(self.call_marker, item.nodeid)
        yield
        if self.call_marker:
            _write_marker(self.call_marker, "")

    # ---- running tests in a child -------------------------------------------------------------------------------
    def _run_items(self, nodeids, before=None, after=None):
        self.failed = []
        items = [self.items[n] for n in nodeids]
        for index, item in enumerate(items):
            if before:
                before(index, item)
            item.ihook.pytest_runtest_protocol(item=item, nextitem=items[index + 1] if index + 1 < len(items) else None)
            if after:
                after(index, item)
            if self.failed:
                return self.failed[0]
        return None

    def _fork(self, body, log):
        pid = os.fork()
        if pid:
            return pid
        code = 3
        try:
            os.setpgrp()  # its own process group, so that a timeout ends everything it started
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = body()
        except BaseException:  # noqa: BLE001 - report anything as a failed run
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    # ---- the baseline -------------------------------------------------------------------------------------------
    def baseline(self, session):
        files = [os.path.join(self.tree, t) for t in self.targets]
        digest = tree_digest(self.targets)
        cache = os.path.join(self.args.report, "baseline.json")
        if os.path.exists(cache):
            with open(cache) as handle:
                cached = json.load(handle)
            if cached.get("digest") == digest and set(cached["items"]) == set(self.items):
                print("baseline: cached (the tree did not change)", flush=True)
                return cached
        trace_dir = os.path.join(self.args.workdir, "trace")
        shutil.rmtree(trace_dir, ignore_errors=True)
        os.makedirs(trace_dir)
        nodeids = list(self.items)
        index_of = {n: i for i, n in enumerate(nodeids)}

        def body(group, result_file):
            def run():
                tracer = _LineTracer(files)
                lines, durations = {}, {}
                os.environ.update(MUTATION_TRACE_DIR=trace_dir, MUTATION_TRACE_FILES=os.pathsep.join(files))
                self.failed = []
                items = [self.items[n] for n in group]
                for position, item in enumerate(items):
                    os.environ["MUTATION_TRACE_TEST"] = str(index_of[item.nodeid])
                    started = time.perf_counter()
                    tracer.start()
                    item.ihook.pytest_runtest_protocol(
                        item=item, nextitem=items[position + 1] if position + 1 < len(items) else None)
                    covered = tracer.stop()
                    durations[item.nodeid] = time.perf_counter() - started
                    lines[item.nodeid] = {f: sorted(l for g, l in covered if g == f) for f in files}
                with open(result_file, "w") as handle:
                    json.dump({"lines": lines, "durations": durations, "failed": list(self.failed)}, handle)
                return 0

            return run

        # `--jobs` children, each a share of the test files (whole files: module fixtures run once), balanced by the
        # tests' earlier baseline times where the report folder has them
        t0 = time.time()
        groups = _split_by_file(nodeids, self.args.jobs, _earlier_durations(cache),
                                {n for n, item in self.items.items() if item.get_closest_marker("slow")})
        children = []
        for number, group in enumerate(groups):
            result_file = os.path.join(self.args.workdir, f"baseline-result{number}.json")
            log = os.path.join(self.args.report, "baseline.log" if number == 0 else f"baseline{number}.log")
            children.append((self._fork(body(group, result_file), log), result_file, log))
        result = {"lines": {}, "durations": {}, "failed": []}
        for pid, result_file, log in children:
            os.waitpid(pid, 0)
            if not os.path.exists(result_file):
                raise SystemExit(f"the baseline did not run: see {log}")
            with open(result_file) as handle:
                part = json.load(handle)
            result["failed"] += part["failed"]
            result["lines"].update(part["lines"])
            result["durations"].update(part["durations"])
        if result["failed"]:
            raise SystemExit(f"the baseline fails ({result['failed'][:5]}): fix the tests first; see "
                             f"{self.args.report}/baseline*.log")
        subprocess_lines = defaultdict(lambda: defaultdict(set))
        for name in os.listdir(trace_dir):
            index = int(name.split("-")[0])
            with open(os.path.join(trace_dir, name)) as handle:
                for filename, line in json.load(handle):
                    subprocess_lines[nodeids[index]][filename].add(line)
        # a module-scoped fixture launches the processes once, for the first test that uses it: every test of that
        # file that uses the same fixture checks a part of their results (a test that starts its own processes keeps
        # its own lines)
        for nodeid in list(subprocess_lines):
            shared = _module_fixtures(self.items[nodeid])
            for other in nodeids:
                if other.split("::")[0] == nodeid.split("::")[0] and other != nodeid and (
                    shared & _module_fixtures(self.items[other])
                ):
                    for filename, lines in subprocess_lines[nodeid].items():
                        subprocess_lines[other][filename] |= lines
        result["subprocess_lines"] = {n: {f: sorted(l) for f, l in fs.items()} for n, fs in subprocess_lines.items()}
        result["digest"], result["items"], result["seconds"] = digest, nodeids, time.time() - t0
        with open(cache, "w") as handle:
            json.dump(result, handle)
        print(f"baseline: {len(nodeids)} tests in {result['seconds']:.0f} s", flush=True)
        return result

    # ---- the mutation loop --------------------------------------------------------------------------------------
    def pytest_runtestloop(self, session):
        self.items = {item.nodeid: item for item in session.items}
        base = self.baseline(session)
        durations = base["durations"]
        slow_marked = {n for n, item in self.items.items() if item.get_closest_marker("slow")}
        stats_file = os.path.join(self.args.report, "test_stats.json")
        stats = {}
        if os.path.exists(stats_file):
            with open(stats_file) as handle:
                stats = json.load(handle)

        def priority(nodeid):  # expected kills per second, from earlier runs and this one so far
            kills, runs = stats.get(nodeid, (0, 0))
            return -((kills + 1.0) / (runs + 2.0)) / max(durations.get(nodeid, 1.0), 0.02)

        self.priority = priority

        started = time.time()
        all_mutants = []
        for target in self.targets:
            filename = os.path.join(self.tree, target)
            module = next(m for m in list(sys.modules.values())
                          if getattr(m, "__file__", None) and os.path.realpath(m.__file__) == os.path.realpath(filename))
            with open(filename, "rb") as handle:
                pristine = handle.read()
            live = live_functions(module)
            in_process = defaultdict(set)  # line -> tests that execute it in this process
            in_subprocess = defaultdict(set)
            for nodeid, files in base["lines"].items():
                for line in files.get(filename, []):
                    in_process[line].add(nodeid)
            for nodeid, files in base["subprocess_lines"].items():
                for line in files.get(filename, []):
                    in_subprocess[line].add(nodeid)
            needs_disk = {n for n, files in base["subprocess_lines"].items() if any(files.values())}

            def is_slow(nodeid):
                return (nodeid in needs_disk or nodeid in slow_marked or _is_compile_test(nodeid)
                        or durations.get(nodeid, 0) > self.args.max_test_seconds)

            mutants = self.mutants_by_target[target]
            plans, queue = {}, []
            for mutant in mutants:
                if mutant.key in self.args.equivalent:
                    mutant.status, mutant.verdict = "equivalent", self.args.equivalent[mutant.key]
                    continue
                plans[mutant.key] = plan = patch_plan(pristine, mutant, filename)
                if plan[0] == "equivalent":
                    mutant.status, mutant.verdict = "equivalent", "the same bytecode as the original"
                    continue
                lines = set(range(mutant.line, mutant.end_line + 1))
                if mutant.function is None or plan[0] == "statement":  # module / class level, or a default value
                    lines = statement_lines(pristine, mutant)
                    if lines is None:
                        lines = set(in_process) | set(in_subprocess)
                covering = set().union(*(in_process.get(l, set()) | in_subprocess.get(l, set()) for l in lines)) \
                    if lines else set()
                fast = sorted((n for n in covering if not is_slow(n)), key=priority)
                slow = sorted((n for n in covering if is_slow(n)), key=priority)
                if not covering:
                    mutant.status = "no tests"
                    continue
                if not fast and self.args.no_slow:
                    continue  # only slow tests reach it: not judged in this run
                if fast and self.args.slow_tier != "all":
                    # the fast tests execute the line: the multi-process tests run where its function can feed a
                    # collective, the torch.compile tests where it has a compiled path (see _touches); "lines": only
                    # where the mutated line itself names one (quicker, and blind to values that flow into one)
                    whole = self.args.slow_tier == "collectives"
                    collective = _touches(pristine, mutant, COLLECTIVE_WORDS, whole)
                    compiled = _touches(pristine, mutant, COMPILE_WORDS, whole)
                    slow = [n for n in slow if (collective or n not in needs_disk)
                            and (compiled or not _is_compile_test(n))]
                queue.append([mutant, "fast" if fast else "slow", fast, slow])
            counts = defaultdict(int)
            for mutant in mutants:
                counts[mutant.status] += 1
            print(f"{target}: {len(mutants)} mutants, {len(queue)} to run ({counts['equivalent']} equivalent, "
                  f"{counts['no tests']} on lines no test executes)", flush=True)
            self._loop(queue, target, module, pristine, plans, live, durations, stats, started, all_mutants + mutants)
            all_mutants.extend(mutants)
            with open(stats_file, "w") as handle:
                json.dump(stats, handle)
            write_report(self.args.report, all_mutants, time.time() - started, self.previous)
        self.summary = write_report(self.args.report, all_mutants, time.time() - started, self.previous)
        return True

    def _loop(self, queue, target, module, pristine, plans, live, durations, stats, started, reported):
        args = self.args
        # a copy of src/ per job: the subprocesses of a slow-tier or fallback child import the mutant from it (the
        # tree's sitecustomize puts MUTATION_SRC first on their sys.path)
        disk_files = []
        for index in range(args.jobs):
            job_src = os.path.join(args.workdir, f"job{index}", "src")
            if not os.path.isdir(job_src):
                shutil.copytree(os.path.join(self.tree, "src"), job_src)
            disk_files.append(os.path.join(job_src, os.path.relpath(target, "src")))
        running = {}  # pid -> (mutant, tier, tests, start, timeout, log, result file, on disk)
        free = list(range(args.jobs))
        done = 0
        try:
            self._schedule(queue, running, free, target, module, pristine, plans, live, durations, stats, started,
                           reported, disk_files, done)
        finally:
            for pid in running:  # interrupted: end the children and everything they started
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _schedule(self, queue, running, free, target, module, pristine, plans, live, durations, stats, started,
                  reported, disk_files, done):
        args = self.args
        while queue or running:
            if args.time_limit is not None and time.time() - started > 60 * args.time_limit:
                for mutant, tier, _, _ in queue:
                    if tier == "slow" and mutant.status == "pending" and mutant.tests:
                        mutant.status, mutant.verdict = "survived", "fast tier only (time limit)"
                queue.clear()
            while queue and free:
                mutant, tier, fast, slow = job = queue.pop(0)
                tests = self._order(fast if tier == "fast" else slow, mutant)
                on_disk = self._on_disk(job, plans)
                index = free.pop()
                log = os.path.join(args.workdir, f"mutant{index}.log")
                result_file = os.path.join(args.workdir, f"mutant{index}.json")
                marker = os.path.join(args.workdir, f"mutant{index}.call")
                for stale in (result_file, marker):
                    if os.path.exists(stale):
                        os.remove(stale)
                with open(disk_files[index], "wb") as handle:
                    handle.write(mutated_source(pristine, mutant))
                budget = sum(durations.get(t, 1.0) for t in tests)
                timeout = max(args.min_timeout, args.timeout_factor * budget + 30.0 * on_disk)
                body = self._child_body(mutant, tests, module, pristine, plans[mutant.key], live, result_file,
                                        disk_files[index][: -len(os.path.relpath(target, "src")) - 1], marker)
                pid = self._fork(body, log)
                running[pid] = (index, job, tests, time.time(), timeout, log, result_file, on_disk, marker)
            time.sleep(0.02)
            for pid, (index, job, tests, start, timeout, log, result_file, on_disk, marker) in list(running.items()):
                mutant, tier, fast, slow = job
                finished, status = os.waitpid(pid, os.WNOHANG)
                timed_out = False
                hung = None if finished else self._hung_test(marker, start, durations)
                if hung or (not finished and time.time() - start > timeout):
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    os.waitpid(pid, 0)
                    timed_out, status = True, None
                elif not finished:
                    continue
                del running[pid]
                free.append(index)
                with open(disk_files[index], "wb") as handle:
                    handle.write(pristine)
                mutant.seconds += time.time() - start
                ran = []
                if os.path.exists(result_file):
                    with open(result_file) as handle:
                        ran = json.load(handle).get("ran", [])
                mutant.tests += len(ran)
                for nodeid in ran:
                    kills, runs = stats.get(nodeid, (0, 0))
                    stats[nodeid] = (kills, runs + 1)
                exit_code = None if timed_out or status is None else (
                    os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status))
                if timed_out:
                    mutant.status, mutant.killer = "killed", f"timeout ({hung})" if hung else "timeout"
                elif exit_code == 0:
                    if tier == "fast" and slow and not args.no_slow:
                        queue.append([mutant, "slow", fast, slow])
                        continue
                    mutant.status = "survived"
                elif exit_code in (1, 2) or (exit_code is not None and exit_code < 0):
                    mutant.status = "killed"
                    mutant.killer = (ran[-1] if exit_code == 1 and ran else _killer(log)) or f"exit {exit_code}"
                    if exit_code == 1 and ran:
                        kills, runs = stats[ran[-1]]
                        stats[ran[-1]] = (kills + 1, runs)
                        killers = self.recent_killers[mutant.function]
                        if ran[-1] in killers:
                            killers.remove(ran[-1])
                        killers.insert(0, ran[-1])
                        del killers[3:]
                    if tier == "slow":
                        mutant.killer += " (slow tier)"
                else:
                    mutant.status, mutant.killer = "error", f"exit {exit_code}; see {log}"
                    shutil.copy(log, os.path.join(args.report, f"error-{mutant.line}.log"))
                done += 1
                if mutant.status == "survived":
                    print(f"  SURVIVED {mutant.short()}", flush=True)
                if done % 25 == 0:
                    print(f"  {done} done, {len(queue) + len(running)} to go, {time.time() - started:.0f} s",
                          flush=True)
                    write_report(args.report, reported, time.time() - started, self.previous)

    def _order(self, tests, mutant):
        """The order a mutant's tests run in (it stops at the first failure; every test runs if none fails): the
        tests that killed the latest mutants of the same function first, then by expected kills per second (from
        earlier runs and this one so far)."""
        recent = [n for n in self.recent_killers[mutant.function] if n in tests]
        return recent + sorted((n for n in tests if n not in recent), key=self.priority)

    def _hung_test(self, marker, start, durations):
        """The test whose call phase has run past `--timeout_factor` times its baseline time plus `--test_timeout`
        seconds, or None. Only children that run their tests in this session mark them (not fresh interpreters)."""
        args = self.args
        if time.time() - start < args.test_timeout:
            return None
        try:
            since = time.time() - os.stat(marker).st_mtime
            if since < args.test_timeout:
                return None
            with open(marker) as handle:
                nodeid = handle.read()
        except OSError:
            return None
        if nodeid and since > args.timeout_factor * durations.get(nodeid, 1.0) + args.test_timeout:
            return nodeid
        return None

    def _on_disk(self, job, plans):
        mutant, tier, _, _ = job
        return tier == "slow" or plans[mutant.key][0] == "fallback"

    def _child_body(self, mutant, tests, module, pristine, plan, live, result_file, job_src, marker=None):
        def body():
            ran = []
            self.call_marker = marker
            os.environ["MUTATION_SRC"] = job_src  # subprocesses import the mutant (see SITECUSTOMIZE)

            def record(index, item):
                ran.append(item.nodeid)
                with open(result_file, "w") as handle:
                    json.dump({"ran": ran}, handle)

            try:
                applied = plan[0] != "fallback" and apply_mutant(module, pristine, mutant, plan, live)
            except Exception:  # noqa: BLE001 - the mutated module fails at import: every test would fail
                import traceback

                traceback.print_exc()
                with open(result_file, "w") as handle:
                    json.dump({"ran": []}, handle)
                return 2
            if not applied:
                # a fresh interpreter imports the mutant from this job's copy of src/
                env = dict(os.environ, PYTHONPATH=os.pathsep.join([job_src, os.path.join(self.tree, "packages")]))
                with open(result_file, "w") as handle:
                    json.dump({"ran": list(tests)}, handle)
                command = [sys.executable, "-m", "pytest", "-x"] + PYTEST_ARGS + list(tests)
                return subprocess.run(command, cwd=self.tree, env=env).returncode
            killer = self._run_items(tests, before=record)
            return 1 if killer else 0

        return body


COLLECTIVE_WORDS = ("group", "_all_reduce", "_reduce_scaled", "reduce_columns", "untrusted(", "sync")
COMPILE_WORDS = ("compil",)  # _is_compiling(), torch.compiler.disable, "traceable by `torch.compile`"


def _is_compile_test(nodeid: str) -> bool:
    """A torch.compile test (its node id says "compile"): seconds each, so only the slow tier runs it."""
    return "compile" in nodeid


def _module_fixtures(item) -> set[str]:
    """The module-, package- or session-scoped fixtures a test uses (one launch of processes shared by its file)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return set()
    return {name for name, defs in info.name2fixturedefs.items() if defs and defs[-1].scope != "function"
            and defs[-1].scope != "class"}


def _touches(source: bytes, mutant: Mutant, words, whole_function: bool = True) -> bool:
    """Whether a mutant can change what reaches a collective (`COLLECTIVE_WORDS`) or a compiled path
    (`COMPILE_WORDS`): its lines name one of `words`, or (`whole_function`) it lies in a function that does (see
    `_reaching_spans`)."""
    lines = source.split(b"\n")[mutant.line - 1: mutant.end_line]
    if any(word.encode() in line for line in lines for word in words):
        return True
    return whole_function and any(start <= mutant.line <= stop for start, stop in _reaching_spans(source, tuple(words)))


@functools.lru_cache(maxsize=16)
def _reaching_spans(source: bytes, words: tuple) -> tuple:
    """Line spans of the functions (module level, or methods of module-level classes, nested functions included)
    whose text names one of `words`, and, repeatedly, of those used only inside such functions: what they compute
    flows into such a function (`_combine_moments`'s moments into `_cost_map`'s all-reduces)."""
    tree = ast.parse(source)
    lines = source.split(b"\n")
    functions = {}  # name -> [(start, stop)] (a method name may repeat across classes)
    for node in tree.body:
        members = node.body if isinstance(node, ast.ClassDef) else [node]
        for member in members:
            if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([member.lineno] + [d.lineno for d in member.decorator_list])
                functions.setdefault(member.name, []).append((start, member.end_lineno))
    spans = {span for group in functions.values() for span in group
             if any(word.encode() in line for line in lines[span[0] - 1: span[1]] for word in words)}
    uses = defaultdict(list)  # name -> lines that read it (calls, or passed on as a value)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            uses[node.id].append(node.lineno)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            uses[node.attr].append(node.lineno)
    changed = True
    while changed:
        changed = False
        for name, group in functions.items():
            if all(span in spans for span in group) or not uses[name]:
                continue
            if all(any(start <= line <= stop for start, stop in spans) for line in uses[name]):
                spans |= set(group)
                changed = True
    return tuple(sorted(spans))


def _earlier_durations(cache: str) -> dict:
    """Test durations of an earlier baseline in the report folder (also of another tree), or {}."""
    try:
        with open(cache) as handle:
            return json.load(handle).get("durations", {})
    except (OSError, ValueError):
        return {}


def _split_by_file(nodeids, parts: int, durations: dict, slow: set) -> list[list[str]]:
    """`nodeids` in `parts` groups of whole test files (in their collected order), the longest file first to the
    least loaded group; a test weighs its earlier duration, else 10 s if marked slow and 0.5 s if not."""
    by_file = defaultdict(list)
    for nodeid in nodeids:
        by_file[nodeid.split("::")[0]].append(nodeid)
    weight = {f: sum(durations.get(n, 10.0 if n in slow else 0.5) for n in ns) for f, ns in by_file.items()}
    groups = [[] for _ in range(max(1, parts))]
    loads = [0.0] * len(groups)
    for name in sorted(by_file, key=lambda f: -weight[f]):
        lightest = loads.index(min(loads))
        groups[lightest].append(name)
        loads[lightest] += weight[name]
    order = {n: i for i, n in enumerate(nodeids)}
    return [sorted((n for f in group for n in by_file[f]), key=order.get) for group in groups if group]


def _write_marker(path: str, text: str):
    with open(path, "w") as handle:
        handle.write(text)


def _killer(log: str) -> str:
    try:
        with open(log, errors="replace") as handle:
            text = handle.read()
    except OSError:
        return ""
    match = re.search(r"^(FAILED|ERROR) (\S+)", text, re.M)
    if match:
        return match.group(2)
    if "Timeout" in text:
        return "timeout"
    return "error (see log)" if text else ""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="", help="comma-separated substrings of target paths (default: all)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--report", default=os.path.join(ROOT, "mutation-report"))
    parser.add_argument("--workdir", default=os.path.join(ROOT, "mutation-work"))
    parser.add_argument("--timeout_factor", type=float, default=4.0, help="timeout: this times the tests' baseline time")
    parser.add_argument("--min_timeout", type=float, default=30.0)
    parser.add_argument("--test_timeout", type=float, default=20.0,
                        help="a test whose call runs past --timeout_factor times its baseline time plus this many "
                             "seconds counts as a hang (the mutant is killed)")
    parser.add_argument("--no_slow", action="store_true", help="skip the slow tier")
    parser.add_argument("--max_test_seconds", type=float, default=3.0,
                        help="tests that took longer in the baseline go to the slow tier")
    parser.add_argument("--time_limit", type=float, default=None,
                        help="minutes; then start no new mutant (the rest is reported as not run)")
    parser.add_argument("--sample", type=int, default=1, help="run every N-th mutant only (a quick estimate)")
    parser.add_argument("--slow_tier", choices=["all", "collectives", "lines"], default="collectives",
                        help="which slow tests a fast-tier survivor runs: all, or (default) the multi-process ones "
                             "only where its function can feed a collective (it or the line names a process group or "
                             "an all-reduce, or it is used only inside such functions) and the torch.compile ones only "
                             "where its function has a compiled path; lines: only where the mutated line itself names "
                             "one (session 4's rule: quicker, blind to values that flow into a collective); the long "
                             "single-process tests always")
    parser.add_argument("--resume", action="store_true",
                        help="skip the mutants that the report's mutants.json already judged (an interrupted run)")
    parser.add_argument("--rerun", action="store_true",
                        help="run only the mutants that survived (or were not judged) in the report's mutants.json")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--refresh", action="store_true",
                        help="rewrite the report's summary without running: survivors now recorded in "
                             "tools/mutation_equivalent.json become equivalent (with their reason)")
    parser.add_argument("--only", default="", help="run only mutants whose key contains this text")
    args = parser.parse_args(argv)

    targets = [t for t in TARGETS if not args.targets or any(s and s in t for s in args.targets.split(","))]
    args.equivalent = {}
    if os.path.exists(EQUIVALENT_FILE):
        with open(EQUIVALENT_FILE) as handle:
            args.equivalent = json.load(handle)
    mutants_by_target = {target: generate(target) for target in targets}
    if args.only:
        mutants_by_target = {t: [m for m in ms if args.only in m.key] for t, ms in mutants_by_target.items()}
    if args.sample > 1:
        mutants_by_target = {t: ms[::args.sample] for t, ms in mutants_by_target.items()}
    previous = load_report(args.report)
    if args.resume:
        judged = {key for key, m in previous.items() if m["status"] in ("killed", "survived", "no tests", "equivalent")}
        mutants_by_target = {t: [m for m in ms if m.key not in judged] for t, ms in mutants_by_target.items()}
    if args.rerun:
        again = {key for key, m in previous.items() if m["status"] in ("survived", "no tests", "error")}
        mutants_by_target = {t: [m for m in ms if m.key in again] for t, ms in mutants_by_target.items()}
    if args.refresh:
        mutants = [Mutant(**m) for m in previous.values()]
        for mutant in mutants:
            if mutant.status in ("survived", "no tests") and mutant.key in args.equivalent:
                mutant.status, mutant.verdict = "equivalent", args.equivalent[mutant.key]
        print(write_report(args.report, mutants, 0.0))
        return 0
    if args.list:
        for target, mutants in mutants_by_target.items():
            for mutant in mutants:
                print(mutant.short())
            print(f"{target}: {len(mutants)} mutants")
        return 0

    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1",
                      TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    sys.dont_write_bytecode = True
    os.makedirs(args.report, exist_ok=True)
    args.report, args.workdir = os.path.abspath(args.report), os.path.abspath(args.workdir)
    tree = os.path.join(args.workdir, "tree")
    prepare_workdir(tree)
    # This process imports the project (from the tree) and collects the tests once; children inherit both.
    sources = [os.path.join(tree, "src"), os.path.join(tree, "packages")]
    sys.path[:0] = sources
    os.environ["PYTHONPATH"] = os.pathsep.join(sources)
    import torch

    torch.set_num_threads(1)
    import importlib
    import pkgutil

    package = importlib.import_module("optvq_hf")
    for info in pkgutil.walk_packages(package.__path__, "optvq_hf."):
        try:
            importlib.import_module(info.name)
        except Exception:  # noqa: BLE001 - optional extras
            pass
    for target in targets:
        importlib.import_module(target[len("src/"):-len(".py")].replace("/", "."))
    tests = sorted({t for target in targets for t in TARGETS[target]["fast"] + TARGETS[target]["slow"]})
    driver = Driver(args, targets, mutants_by_target, tree, previous)
    os.chdir(tree)
    code = pytest.main(PYTEST_ARGS + tests, plugins=[driver])
    os.chdir(ROOT)
    if not hasattr(driver, "summary"):
        print(f"pytest ended before the mutation loop (exit {int(code)})")
        return 1
    shutil.rmtree(args.workdir, ignore_errors=True)
    print(driver.summary)
    return 0


def load_report(folder: str) -> dict:
    """The mutants of an earlier run in `folder` (its mutants.json), by key."""
    path = os.path.join(folder, "mutants.json")
    if not os.path.exists(path):
        return {}
    with open(path) as handle:
        return {m["key"]: m for m in json.load(handle)}


def write_report(folder: str, mutants: list[Mutant], seconds: float, previous: dict | None = None) -> str:
    """mutants.json and summary.md in `folder`: this run's mutants, over the earlier run's (`previous`) with the same
    key, so that runs of single targets or of the survivors only add up to one report."""
    merged = dict(previous or {})
    merged.update({m.key: asdict(m) for m in mutants if m.status != "pending"})
    with open(os.path.join(folder, "mutants.json"), "w") as handle:
        json.dump(list(merged.values()), handle, indent=1)
    mutants = [Mutant(**m) for m in merged.values()]
    lines = [f"Mutation run: {len(mutants)} mutants (this run: {seconds / 60:.1f} min)", "",
             "| file | mutants | killed | survived | equivalent | no tests | score |", "|---|---|---|---|---|---|---|"]
    by_file = defaultdict(list)
    for mutant in mutants:
        by_file[mutant.file].append(mutant)
    for path, group in by_file.items():
        count = {s: sum(m.status == s for m in group) for s in ("killed", "survived", "equivalent", "no tests")}
        judged = count["killed"] + count["survived"] + count["no tests"]
        score = 100.0 * count["killed"] / judged if judged else 100.0
        lines.append(f"| `{path}` | {len(group)} | {count['killed']} | {count['survived']} | {count['equivalent']} "
                     f"| {count['no tests']} | {score:.1f} % |")
    lines += ["", "Survivors (no test fails):", ""]
    lines += [f"- {m.short()}  \n  key: `{m.key}`" for m in mutants if m.status in ("survived", "no tests")]
    lines += ["", "Every mutant that no test kills, with its verdict (for docs/testing.md):", "",
              "| file:line | function | mutant | verdict |", "|---|---|---|---|"]
    for m in sorted(mutants, key=lambda m: (m.file, m.line, m.key)):
        if m.status in ("survived", "no tests", "equivalent"):
            verdict = {"survived": "open", "no tests": "open: no test executes the line"}.get(m.status, "")
            if m.status == "equivalent":
                verdict = f"equivalent: {m.verdict}"
            original = " ".join(m.original.split()).replace("|", "\\|")
            replacement = " ".join(m.replacement.split()).replace("|", "\\|")
            lines.append(f"| {os.path.basename(m.file)}:{m.line} | `{m.function or 'module'}` | {m.operator}: "
                         f"`{original[:70]}` -> `{replacement[:70]}` | {verdict} |")
    errors = [m for m in mutants if m.status == "error"]
    if errors:
        lines += ["", "Not judged (the run failed for another reason; `--rerun` runs them again):", ""]
        lines += [f"- {m.short()}: {m.killer}" for m in errors]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(folder, "summary.md"), "w") as handle:
        handle.write(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
