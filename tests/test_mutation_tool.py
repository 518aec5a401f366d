"""tools/mutation.py (`make mutation`, docs/testing.md): the mutants it makes and the report it keeps. The mutation
run itself takes long and is not part of the suite."""

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("mutation_tool", os.path.join(ROOT, "tools", "mutation.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_every_mutant_of_the_core_is_valid_python_that_differs_once(tool):
    import ast

    assert "src/optvq_hf/sinkhorn.py" in tool.TARGETS and "src/optvq_hf/quantization.py" in tool.TARGETS
    for target in ("src/optvq_hf/autoencoder.py", "src/optvq_hf/training/losses.py"):  # the small ones: fast
        with open(os.path.join(ROOT, target), "rb") as handle:
            source = handle.read()
        mutants = tool.generate(target)
        assert len(mutants) > 50, target
        assert len({m.key for m in mutants}) == len(mutants)  # stable, unique keys (the report and --rerun use them)
        for mutant in mutants[::7]:
            mutated = source[:mutant.start] + mutant.replacement.encode() + source[mutant.stop:]
            assert mutated != source and source[mutant.start:mutant.stop].decode() == mutant.original
            ast.parse(mutated)


def test_the_straight_through_estimator_slip_of_the_issue_is_a_mutant(tool):
    """`flat + (chosen - flat).detach()` -> `flat + (chosen) - (flat).detach()` lets the decoder's gradient reach the
    codebook; tests/test_quantizer.py kills it."""
    mutants = tool.generate("src/optvq_hf/quantization.py")
    moved = [m for m in mutants if m.operator == "detach moved inward" and m.original == "(chosen - flat).detach()"]
    assert [m.replacement for m in moved] == ["(chosen) - (flat).detach()"]
    assert moved[0].function == "CodebookQuantizer.quantize_rows"


def test_reports_of_separate_runs_add_up(tool, tmp_path):
    first, second = tool.generate("src/optvq_hf/autoencoder.py")[:2]
    first.status, first.killer = "survived", ""
    tool.write_report(str(tmp_path), [first], 1.0)
    previous = tool.load_report(str(tmp_path))
    assert previous[first.key]["status"] == "survived"
    first.status, first.killer = "killed", "tests/test_x.py::test_y"
    second.status = "survived"
    summary = tool.write_report(str(tmp_path), [first, second], 1.0, previous)
    merged = {m["key"]: m["status"] for m in json.loads((tmp_path / "mutants.json").read_text())}
    assert merged == {first.key: "killed", second.key: "survived"}
    assert "| `src/optvq_hf/autoencoder.py` | 2 | 1 | 1 | 0 | 0 | 50.0 % |" in summary


SOURCE = b'''SCALE = 3
DOUBLE = SCALE * 2


def scaled(x, offset=1):
    def inner(y):
        return y * SCALE
    return inner(x) + offset


class Box:
    size = 4

    def area(self):
        return self.size * self.size
'''


def _mutant(tool, old: bytes, new: str, function, occurrence=1):
    start = -1
    for _ in range(occurrence):
        start = SOURCE.index(old, start + 1)
    line = SOURCE[:start].count(b"\n") + 1
    return tool.Mutant("x.py", line, function, "test", old.decode(), new, start, start + len(old), line)


def test_mutants_are_applied_in_a_running_process_without_reimporting(tool, tmp_path):
    """The fork model: a child patches the imported module (functions' code, constants, defaults, class attributes)
    instead of importing the project again; mutants with the original's bytecode are equivalent without a run."""
    import importlib.util

    path = tmp_path / "mutation_target_module.py"
    path.write_bytes(SOURCE)
    filename = str(path)

    def fresh():
        spec = importlib.util.spec_from_file_location("mutation_target_module", filename)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    cases = [  # (mutant, plan kind, check on the patched module)
        (_mutant(tool, b"y * SCALE", "(y) / (SCALE)", "scaled.<locals>.inner"), "code",
         lambda m, f: f(6) == 3.0),  # nested function: its parent's code is replaced
        (_mutant(tool, b"self.size * self.size", "(self.size) + (self.size)", "Box.area"), "code",
         lambda m, f: m.Box().area() == 8),
        (_mutant(tool, b"3", "4", None), "statement", lambda m, f: m.SCALE == 4 and m.DOUBLE == 8 and f(1) == 5),
        (_mutant(tool, b"offset=1", "offset=2", None), "statement", lambda m, f: f(1) == 5),
        (_mutant(tool, b"4", "5", None), "statement", lambda m, f: m.Box().area() == 25),
        (_mutant(tool, b"SCALE * 2", "(SCALE) * (2)", None), "equivalent", None),
    ]
    for mutant, kind, check in cases:
        plan = tool.patch_plan(SOURCE, mutant, filename)
        assert plan[0] == kind, (mutant.replacement, plan)
        if check is None:
            continue
        module = fresh()
        scaled = module.scaled  # a reference taken before the patch (as `from module import scaled` in a test)
        assert scaled(1) == 4 and module.Box().area() == 16
        assert tool.apply_mutant(module, SOURCE, mutant, plan, tool.live_functions(module))
        assert check(module, scaled), mutant.replacement


def test_a_statement_mutant_selects_the_tests_of_the_lines_that_use_its_names(tool):
    lines = tool.statement_lines(SOURCE, _mutant(tool, b"3", "4", None))
    # SCALE is used by DOUBLE (line 2, at import only) and by inner (line 7)
    assert lines == {7}
    assert tool.statement_lines(SOURCE, _mutant(tool, b"offset=1", "offset=2", None)) == {6, 7, 8}


def test_a_class_attribute_read_through_getattr_selects_the_tests_of_that_line(tool):
    """`getattr(subclass, "_legacy_optvq_subclass", False)` reads VectorQuantizer's flag by its name in a string:
    the mutant `True -> False` must run the tests of that line, not count as executed by no test."""
    source = b'class Legacy:\n    flag = True\n\n\ndef is_legacy(cls):\n    return getattr(cls, "flag", False)\n'
    start = source.index(b"True")
    mutant = tool.Mutant("x.py", 2, None, "constant", "True", "False", start, start + 4, 2)
    assert tool.statement_lines(source, mutant) == {6}


def test_the_baseline_is_split_by_whole_test_files_balanced_by_their_time(tool):
    nodeids = ["a.py::1", "a.py::2", "b.py::1", "c.py::1", "c.py::2", "c.py::3", "d.py::1"]
    durations = {"a.py::1": 50.0, "a.py::2": 10.0, "b.py::1": 40.0, "c.py::1": 1.0, "c.py::2": 1.0, "c.py::3": 1.0}
    groups = tool._split_by_file(nodeids, 2, durations, slow={"d.py::1"})  # d: no earlier time, slow: 10 s
    assert groups == [["a.py::1", "a.py::2"], ["b.py::1", "c.py::1", "c.py::2", "c.py::3", "d.py::1"]]
    assert tool._split_by_file(nodeids, 1, {}, set()) == [nodeids]
    assert sorted(n for g in tool._split_by_file(nodeids, 8, {}, set()) for n in g) == sorted(nodeids)


def test_a_mutants_tests_start_with_the_killers_of_its_functions_latest_mutants(tool):
    driver = tool.Driver.__new__(tool.Driver)
    driver.recent_killers = tool.defaultdict(list)
    driver.priority = {"fast": 0, "medium": 1, "slow": 2, "killer": 3}.get
    mutant = tool.Mutant("x.py", 1, "f", "test", "a", "b", 0, 1, 1)
    assert driver._order(["slow", "killer", "fast", "medium"], mutant) == ["fast", "medium", "slow", "killer"]
    driver.recent_killers["f"] = ["killer", "gone"]  # "gone" does not execute this mutant's lines
    assert driver._order(["slow", "killer", "fast", "medium"], mutant) == ["killer", "fast", "medium", "slow"]
    driver.recent_killers["g"] = ["slow"]  # another function's killers change nothing
    assert driver._order(["slow", "killer", "fast", "medium"], mutant)[0] == "killer"


def test_a_test_whose_call_runs_past_its_limit_is_a_hang(tool, tmp_path):
    """A child marks the test whose call phase runs (fixtures' setup is not timed per test); the parent ends the
    mutant once that call has run past timeout_factor x its baseline time + test_timeout seconds."""
    import argparse
    import time

    driver = tool.Driver.__new__(tool.Driver)
    driver.args = argparse.Namespace(timeout_factor=4.0, test_timeout=20.0)
    marker = tmp_path / "mutant0.call"
    durations = {"t.py::quick": 0.5, "t.py::long": 30.0}
    now = time.time()
    assert driver._hung_test(str(marker), now - 100, durations) is None  # no marker yet
    for nodeid, since, hung in (("t.py::quick", 21.0, None), ("t.py::quick", 23.0, "t.py::quick"),
                                ("t.py::long", 139.0, None), ("t.py::long", 141.0, "t.py::long"), ("", 500.0, None)):
        marker.write_text(nodeid)
        os.utime(marker, (now - since, now - since))
        assert driver._hung_test(str(marker), now - 1000, durations) == hung, (nodeid, since)
    assert driver._hung_test(str(marker), now - 5, durations) is None  # started 5 s ago: nothing to check yet


def test_every_recorded_equivalent_names_a_mutant_of_todays_sources(tool):
    """tools/mutation_equivalent.json (shared by everyone who records verdicts): sorted keys, one entry per line, a
    reason for each, and no stale key (a source edit changes a mutant's key: its verdict must be made again)."""
    with open(tool.EQUIVALENT_FILE) as handle:
        text = handle.read()
    equivalent = json.loads(text)
    assert text == json.dumps(equivalent, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    keys = {m.key for target in tool.TARGETS for m in tool.generate(target)}
    assert sorted(set(equivalent) - keys) == []
    assert all(len(reason) > 20 for reason in equivalent.values())


POLICY_SOURCE = b'''def combine(counts):
    return counts.sum()


def reduce_over(values, group):
    total = combine(local(values))
    return _all_reduce(total, "sum", group)


def local(values):
    return values + 1


def assign(x):
    """Tensor ops only while torch.compile traces."""
    return x if _is_compiling() else local(x)
'''


def test_the_slow_tier_follows_collectives_and_compiled_paths_through_whole_functions(tool):
    """The default `--slow_tier collectives`: a fast-tier survivor runs the multi-process tests where its function
    names a collective or is used only by such functions (a helper whose value is all-reduced by its caller), and the
    torch.compile tests where its function has a compiled path; not for a line of a purely local function."""

    def mutant(line):
        start = sum(len(text) + 1 for text in POLICY_SOURCE.split(b"\n")[: line - 1])
        return tool.Mutant("x.py", line, "f", "test", "a", "b", start, start + 1, line)

    collective = [tool._touches(POLICY_SOURCE, mutant(line), tool.COLLECTIVE_WORDS) for line in (2, 6, 11, 16)]
    # combine: used only in reduce_over; local: in reduce_over and in assign (a local step, its value goes elsewhere)
    assert collective == [True, True, False, False]
    compiled = [tool._touches(POLICY_SOURCE, mutant(line), tool.COMPILE_WORDS) for line in (2, 6, 11, 16)]
    assert compiled == [False, False, False, True]
    # --slow_tier lines: the mutated line alone decides (line 7 names the all-reduce, line 6 does not)
    assert [tool._touches(POLICY_SOURCE, mutant(line), tool.COLLECTIVE_WORDS, False) for line in (2, 6, 7)] == [
        False, False, True]
    assert tool._is_compile_test("tests/test_sinkhorn.py::test_compiled_quantizer_gives_the_eager_tokens[True]")
    assert not tool._is_compile_test("tests/test_sinkhorn.py::test_the_dense_helpers_match_their_formulas")
    # the survivors that this policy let through before: the cross-rank moments, and the quantizer's compiled path
    keys = {"_combine_moments::constant::0 -> 1#1", "_cost_map::binary + -> -::pivot + first / max(local_count, 1)",
            "OptVQQuantizer.assign::condition negated::_is_compiling() -> not (_is_compiling())#1"}
    for target in ("src/optvq_hf/sinkhorn.py", "src/optvq_hf/quantization.py"):
        with open(os.path.join(ROOT, target), "rb") as handle:
            source = handle.read()
        for found in (m for m in tool.generate(target) if any(key in m.key for key in keys)):
            words = tool.COMPILE_WORDS if "assign" in found.key else tool.COLLECTIVE_WORDS
            assert not any(word.encode() in source.split(b"\n")[found.line - 1] for word in tool.COLLECTIVE_WORDS)
            assert tool._touches(source, found, words), found.key
