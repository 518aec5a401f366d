"""Packaging promises of pyproject.toml and docs/installation.md, checked on the development install.

The built sdist and wheel, installed into a fresh virtualenv and used outside the repository, are checked by
`make package-check` (.ci/package_check.py), which .ci/run runs after the test suite.
"""

import importlib.metadata
import os
import pathlib
import re
import subprocess
import sys
import tomllib

from packaging.requirements import Requirement

import optvq_hf

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
SCRIPTS = PROJECT["scripts"]
# Upper bounds allowed in the user-facing requirements: {package: reason}. Add one only for a known
# incompatibility, with the same reason in a comment next to the requirement in pyproject.toml.
ALLOWED_UPPER_BOUNDS: dict[str, str] = {}


def _clean_env() -> dict:
    return {key: value for key, value in os.environ.items() if not key.startswith("PYTHONPATH")}


def test_version_has_one_source():
    assert "version" not in PROJECT and PROJECT["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "optvq_hf.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.dev\d+)?", optvq_hf.__version__)
    assert importlib.metadata.version("optvq-hf") == optvq_hf.__version__, (
        "the installed metadata is older than src/optvq_hf/__init__.py: run `make install` again"
    )


def test_changelog_has_a_section_for_this_version():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(optvq_hf.__version__)}\]", changelog, re.M), (
        f"CHANGELOG.md has no `## [{optvq_hf.__version__}]` section"
    )


def test_license_is_shipped():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "The optvq-hf authors" in text
    assert PROJECT["license"] == "MIT" and PROJECT["license-files"] == ["LICENSE"]
    files = importlib.metadata.distribution("optvq-hf").files
    assert any(str(path).endswith("licenses/LICENSE") for path in files)


def test_user_requirements_have_lower_bounds_only():
    groups = {"dependencies": PROJECT["dependencies"]}
    groups.update({extra: PROJECT["optional-dependencies"][extra] for extra in ("diffusers", "train", "eval")})
    for group, requirements in groups.items():
        for text in requirements:
            requirement = Requirement(text)
            capped = [spec for spec in requirement.specifier if spec.operator in ("<", "<=", "==", "===", "~=")]
            assert not capped or requirement.name in ALLOWED_UPPER_BOUNDS, (
                f"{group}: {text} caps the version; the development pin belongs in the Makefile and .ci/run"
            )
    (torch,) = [Requirement(r) for r in PROJECT["dependencies"] if Requirement(r).name == "torch"]
    assert {spec.operator for spec in torch.specifier} == {">="}


def test_bounds_in_the_docs_are_the_ones_of_pyproject():
    bounds = {}
    for text in PROJECT["dependencies"] + sum(PROJECT["optional-dependencies"].values(), []):
        requirement = Requirement(text)
        bounds.update({requirement.name: spec.version for spec in requirement.specifier if spec.operator == ">="})
    for page in ("README.md", "docs/installation.md", "CHANGELOG.md"):
        mentioned = re.findall(r"`([A-Za-z0-9_.\-]+)>=([0-9][0-9.]*)`", (ROOT / page).read_text())
        assert mentioned, page
        for name, version in mentioned:
            assert bounds.get(name) == version, f"{page} says {name}>={version}, pyproject.toml {bounds.get(name)}"


def test_every_source_folder_is_a_listed_package():
    src = ROOT / "src"
    folders = {".".join(path.parent.relative_to(src).parts) for path in src.rglob("*.py")}
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]) == folders | {"optvq_hf_examples"}
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"": "src", "optvq_hf_examples": "examples"}


def test_console_commands_resolve_to_the_example_scripts(monkeypatch):
    # importing run_train sets OMP_WAIT_POLICY (setdefault); monkeypatch restores the environment afterwards
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", ""))
    entry_points = {ep.name: ep for ep in importlib.metadata.distribution("optvq-hf").entry_points
                    if ep.group == "console_scripts"}
    assert set(entry_points) == set(SCRIPTS)
    for name, target in SCRIPTS.items():
        assert entry_points[name].value == target
        function = entry_points[name].load()
        assert callable(function)
        module = target.split(":")[0]
        if module.startswith("optvq_hf_examples."):
            # one copy of the code: the installed module is the file in examples/
            script = ROOT / "examples" / (module.split(".", 1)[1] + ".py")
            assert pathlib.Path(sys.modules[module].__file__).resolve() == script.resolve()


def test_installation_docs_list_every_command():
    text = (ROOT / "docs/installation.md").read_text()
    for name, target in SCRIPTS.items():
        module = target.split(":")[0]
        assert f"`{name}`" in text and f"python -m {module}" in text, name
        if module.startswith("optvq_hf_examples."):
            assert f"examples/{module.split('.', 1)[1]}.py" in text, name
    for script in (ROOT / "examples").glob("[!_]*.py"):
        assert f"optvq_hf_examples.{script.stem}" in text, f"examples/{script.name} missing from the module list"


def test_examples_package_imports_no_torch():
    """run_train.py sets OMP_WAIT_POLICY before importing torch; importing its package must not import torch first."""
    code = "import sys, optvq_hf_examples; assert 'torch' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, env=_clean_env())


def test_commands_run_outside_the_repository(tmp_path):
    bin_dir = pathlib.Path(sys.executable).parent
    for command in (
        [str(bin_dir / "optvq-train"), "--help"],
        [sys.executable, "-m", "optvq_hf_examples.run_eval", "--help"],
    ):
        result = subprocess.run(command, cwd=tmp_path, env=_clean_env(), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "usage:" in result.stdout and "--output_dir" in result.stdout
