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
