"""Mutation testing of the core: `make mutation` (see docs/testing.md).

Generates mutants of the target files by small AST edits (one at a time: an operator, a comparison, a constant, a
call swapped, a statement dropped, ...), runs the fast tests that exercise the mutated function against each, and
reports which mutants no test notices. A mutant is *killed* when a test fails (or errors, or the mutant times out)
and *survives* when every test passes; survivors of the fast tier are run again against the slow tier (real
multi-process tests) where a target lists one.

How it runs: this process imports torch and the other heavy libraries once and never the project; each mutant runs
in a forked child that imports the project from a private copy of the tree (`mutation-work/w<i>/`) in which the
target file holds the mutant, and calls `pytest.main` on the selected tests (fastest first, stop at the first
failure). Which tests exercise which function comes from one traced baseline run per target (the unmutated tests
must pass). Threads are pinned to 1 per child; `--jobs` children run at a time.

    python tools/mutation.py                       # every target, 2 jobs; report in mutation-report/
    python tools/mutation.py --targets sinkhorn    # targets whose path contains "sinkhorn"
    python tools/mutation.py --list                # the mutants only

Known equivalent mutants (no test can kill them: they change nothing observable) are listed in
`tools/mutation_equivalent.json` with the reason; the score leaves them out.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import signal
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EQUIVALENT_FILE = os.path.join(ROOT, "tools", "mutation_equivalent.json")

# Fast tests run per mutant (the traced subset that calls the mutated function); slow tests only for the mutants
# that survive the fast ones.
FAST_ARGS = ["-m", "not slow", "-k", "not compile"]
TARGETS = {
    "src/optvq_hf/sinkhorn.py": dict(
        fast=["tests/test_sinkhorn.py", "tests/test_sinkhorn_engine.py", "tests/test_otvae.py",
              "tests/test_quantizer.py"],
        slow=["tests/test_sinkhorn_distributed.py"],
    ),
    "src/optvq_hf/quantization.py": dict(
        fast=["tests/test_quantizer.py", "tests/test_sinkhorn.py", "tests/test_sinkhorn_engine.py",
              "tests/test_otvae.py", "tests/test_core.py", "tests/test_modeling.py", "tests/test_training.py"],
        slow=["tests/test_sinkhorn_distributed.py"],
    ),
    "src/optvq_hf/autoencoder.py": dict(
        fast=["tests/test_modeling.py", "tests/test_core.py", "tests/test_diffusers.py",
              "tests/test_convert_original.py", "tests/test_processing.py"],
        slow=[],
    ),
    "src/optvq_hf/training/losses.py": dict(
        fast=["tests/test_training.py", "tests/test_metrics.py"],
        slow=[],
    ),
}
COPY = ["src", "tests", "examples", "docs", "README.md", "pyproject.toml"]
# Packages that the editable install maps to a folder other than src/ (pyproject's package-dir): a child imports them
# from its own copy through symlinks in `<workdir>/packages`, which comes before the install's finder on sys.path.
MAPPED_PACKAGES = {"optvq_hf_examples": "examples"}
# Heavy libraries imported once by this process (never the project), so that each forked child starts fast.
PRELOAD = ["numpy", "torch", "torch.distributed", "torch.nn.functional", "transformers", "transformers.modeling_utils",
           "transformers.configuration_utils", "transformers.image_processing_utils", "transformers.processing_utils",
           "huggingface_hub", "safetensors.torch", "PIL.Image", "datasets", "accelerate", "diffusers", "evaluate",
           "scipy", "skimage.metrics", "hypothesis", "pytest"]

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
                                   stop))

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
    collector.visit(ast.parse(source))
    mutants = []
    seen = defaultdict(int)
    for mutant in collector.mutants:
        mutated = source[: mutant.start] + mutant.replacement.encode() + source[mutant.stop:]
        try:
            ast.parse(mutated)
        except SyntaxError:
            continue
        base = f"{mutant.file}::{mutant.function or '<module>'}::{mutant.operator}::{' '.join(mutant.original.split())}"
        base += f" -> {' '.join(mutant.replacement.split())}"
        seen[base] += 1
        mutant.key = f"{base}#{seen[base]}"
        mutants.append(mutant)
    return mutants


# ------------------------------------------------------------------------------------------------------------------
# Running tests in forked children
# ------------------------------------------------------------------------------------------------------------------
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


class _Tracer:
    """pytest plugin of the baseline run: which functions of the target file each test calls, and its duration."""

    def __init__(self, filename: str):
        self.filename = filename
        self.current = None
        self.calls = defaultdict(set)
        self.durations = {}
        self.failed = []

    def profile(self, frame, event, arg):
        if event == "call" and self.current is not None and frame.f_code.co_filename == self.filename:
            self.calls[self.current].add(frame.f_code.co_qualname)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        import threading

        self.current = item.nodeid
        sys.setprofile(self.profile)
        threading.setprofile(self.profile)
        start = time.perf_counter()
        try:
            yield
        finally:
            sys.setprofile(None)
            threading.setprofile(None)
            self.durations[item.nodeid] = time.perf_counter() - start
            self.current = None

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.failed.append(report.nodeid)


def _child(workdir: str, args: list[str], log: str, plugin=None, result_file: str | None = None):
    """Body of a forked child: run pytest in `workdir` against its copy of the project; never returns."""
    code = 3
    try:
        os.setpgrp()  # its own process group, so that a timeout ends everything it started
        os.chdir(workdir)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sources = [os.path.join(workdir, "src"), os.path.join(workdir, "packages")]
        original = os.path.realpath(os.path.join(ROOT, "src"))
        sys.path[:] = sources + [p for p in sys.path if p and os.path.realpath(p) != original]
        os.environ["PYTHONPATH"] = os.pathsep.join(sources)  # subprocesses of multi-process tests import the mutant too
        sys.dont_write_bytecode = True
        import pytest

        code = int(pytest.main(args, plugins=[plugin] if plugin else []))
        if result_file and plugin is not None:
            with open(result_file, "w") as handle:
                json.dump({"calls": {k: sorted(v) for k, v in plugin.calls.items()}, "durations": plugin.durations,
                           "failed": plugin.failed, "exit": code}, handle)
    except BaseException:  # noqa: BLE001 - report anything as a failed run
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


PYTEST_ARGS = ["-q", "-p", "no:cacheprovider", "-p", "no:randomly", "-o", "addopts=", "--hypothesis-seed=0",
               "-W", "ignore", "--no-header", "-rfE"]


def baseline(target: str, workdir: str, log: str) -> dict:
    result_file = os.path.join(workdir, "baseline.json")
    filename = os.path.join(workdir, target)
    tests = TARGETS[target]["fast"]
    pid = os.fork()
    if pid == 0:
        _child(workdir, PYTEST_ARGS + FAST_ARGS + tests, log, _Tracer(filename), result_file)
    _, status = os.waitpid(pid, 0)
    if not os.path.exists(result_file):
        raise SystemExit(f"baseline of {target} did not run: see {log}")
    with open(result_file) as handle:
        result = json.load(handle)
    if result["exit"] != 0:
        raise SystemExit(f"baseline of {target} fails ({result['failed'][:5]}): fix the tests first; see {log}")
    return result


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


# ------------------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="", help="comma-separated substrings of target paths (default: all)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--report", default=os.path.join(ROOT, "mutation-report"))
    parser.add_argument("--workdir", default=os.path.join(ROOT, "mutation-work"))
    parser.add_argument("--timeout_factor", type=float, default=4.0, help="timeout: this times the tests' baseline time")
    parser.add_argument("--min_timeout", type=float, default=60.0)
    parser.add_argument("--no_slow", action="store_true", help="skip the slow tier")
    parser.add_argument("--max_test_seconds", type=float, default=3.0,
                        help="fast-tier tests that took longer in the baseline go to the slow tier")
    parser.add_argument("--time_limit", type=float, default=None,
                        help="minutes; then start no new mutant (the rest is reported as not run)")
    parser.add_argument("--sample", type=int, default=1, help="run every N-th mutant only (a quick estimate)")
    parser.add_argument("--rerun", action="store_true",
                        help="run only the mutants that survived (or were not judged) in the report's mutants.json")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--only", default="", help="run only mutants whose key contains this text")
    args = parser.parse_args(argv)

    targets = [t for t in TARGETS if not args.targets or any(s and s in t for s in args.targets.split(","))]
    equivalent = {}
    if os.path.exists(EQUIVALENT_FILE):
        with open(EQUIVALENT_FILE) as handle:
            equivalent = json.load(handle)
    mutants_by_target = {target: generate(target) for target in targets}
    if args.only:
        mutants_by_target = {t: [m for m in ms if args.only in m.key] for t, ms in mutants_by_target.items()}
    if args.sample > 1:
        mutants_by_target = {t: ms[::args.sample] for t, ms in mutants_by_target.items()}
    previous = load_report(args.report)
    if args.rerun:
        again = {key for key, m in previous.items() if m["status"] in ("survived", "no tests", "error")}
        mutants_by_target = {t: [m for m in ms if m.key in again] for t, ms in mutants_by_target.items()}
    if args.list:
        for target, mutants in mutants_by_target.items():
            for mutant in mutants:
                print(mutant.short())
            print(f"{target}: {len(mutants)} mutants")
        return 0

    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1",
                      TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    for module in PRELOAD:
        try:
            __import__(module)
        except ImportError:
            pass
    os.makedirs(args.report, exist_ok=True)
    workers = [os.path.join(args.workdir, f"w{i}") for i in range(args.jobs)]
    for folder in workers:
        prepare_workdir(folder)
    started = time.time()
    all_mutants = []
    for target in targets:
        mutants = mutants_by_target[target]
        log = os.path.join(args.report, "baseline.log")
        t0 = time.time()
        base = baseline(target, workers[0], log)
        durations = base["durations"]
        calls = base["calls"]
        tests_by_function = defaultdict(list)
        for test, functions in calls.items():
            for function in functions:
                tests_by_function[function].append(test)
        any_call = sorted({t for t, fs in calls.items() if fs}, key=lambda t: durations.get(t, 0))
        long_tests = sorted(t for t in any_call if durations.get(t, 0) > args.max_test_seconds)
        slow_tier = long_tests + TARGETS[target]["slow"]
        print(f"{target}: {len(mutants)} mutants; baseline {time.time() - t0:.0f} s, {len(durations)} tests, "
              f"{len(any_call)} call it, {len(long_tests)} of them in the slow tier", flush=True)
        with open(os.path.join(ROOT, target), "rb") as handle:
            pristine = handle.read()

        def selection(mutant):
            if mutant.function is None:
                tests = any_call
            else:
                # a nested function's code runs when it is called; its enclosing functions' tests cover it too
                tests = tests_by_function.get(mutant.function, [])
            return sorted(set(tests) - set(long_tests), key=lambda t: durations.get(t, 0))

        queue = [(mutant, "fast") for mutant in mutants if mutant.key not in equivalent]
        for mutant in mutants:
            if mutant.key in equivalent:
                mutant.status, mutant.verdict = "equivalent", equivalent[mutant.key]
        running = {}  # pid -> (worker index, mutant, tier, start, timeout, log)
        free = list(range(args.jobs))
        done = 0
        while queue or running:
            if args.time_limit is not None and time.time() - started > 60 * args.time_limit:
                for mutant, tier in queue:  # survivors of the fast tier stay survivors; the rest is not reported
                    if tier == "slow":
                        mutant.status, mutant.verdict = "survived", "fast tier only (time limit)"
                queue.clear()
            while queue and free:
                mutant, tier = queue.pop(0)
                tests = selection(mutant) if tier == "fast" else slow_tier
                if not tests:
                    mutant.status = "no tests"
                    continue
                index = free.pop()
                folder = workers[index]
                with open(os.path.join(folder, target), "wb") as handle:
                    handle.write(pristine[: mutant.start] + mutant.replacement.encode() + pristine[mutant.stop:])
                log = os.path.join(folder, "mutant.log")
                budget = sum(durations.get(t, 1.0) for t in tests) + (300.0 * (tier == "slow"))
                timeout = max(args.min_timeout, args.timeout_factor * budget)
                pid = os.fork()
                if pid == 0:
                    _child(folder, PYTEST_ARGS + ["-x"] + tests, log)
                running[pid] = (index, mutant, tier, time.time(), timeout, log, len(tests))
            time.sleep(0.05)
            for pid, (index, mutant, tier, start, timeout, log, count) in list(running.items()):
                finished, status = os.waitpid(pid, os.WNOHANG)
                timed_out = False
                if not finished and time.time() - start > timeout:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    os.waitpid(pid, 0)
                    timed_out, status = True, None
                elif not finished:
                    continue
                del running[pid]
                with open(os.path.join(workers[index], target), "wb") as handle:
                    handle.write(pristine)
                free.append(index)
                mutant.seconds += time.time() - start
                mutant.tests += count
                exit_code = None if timed_out or status is None else (
                    os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status))
                if timed_out:
                    mutant.status, mutant.killer = "killed", "timeout"
                elif exit_code == 0:
                    if tier == "fast" and slow_tier and not args.no_slow:
                        queue.append((mutant, "slow"))
                        continue
                    mutant.status = "survived"
                elif exit_code in (1, 2) or (exit_code is not None and exit_code < 0):
                    # 1: a test failed; 2: collection broke (the mutant fails at import); < 0: it crashed the child
                    mutant.status = "killed"
                    mutant.killer = _killer(log) or f"exit {exit_code}"
                    if tier == "slow":
                        mutant.killer += " (slow tier)"
                else:  # pytest's internal / usage errors, no tests collected, or this script's child failing
                    mutant.status, mutant.killer = "error", f"exit {exit_code}; see {log}"
                done += 1
                if mutant.status == "survived":
                    print(f"  SURVIVED {mutant.short()}", flush=True)
                if done % 10 == 0:
                    print(f"  {done}/{len(queue) + len(running) + done} done, {time.time() - started:.0f} s",
                          flush=True)
                    write_report(args.report, all_mutants + mutants, time.time() - started, previous)
        all_mutants.extend(mutants)
        write_report(args.report, all_mutants, time.time() - started, previous)
    shutil.rmtree(args.workdir, ignore_errors=True)
    summary = write_report(args.report, all_mutants, time.time() - started, previous)
    print(summary)
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
