"""Every ```python block of docs/diffusers.md runs as written."""

import pathlib
import re

import pytest

pytest.importorskip("diffusers")

PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "diffusers.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
BLOCKS = BLOCK.findall(PAGE.read_text())


def test_page_has_snippets():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_snippet_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"docs/diffusers.md#{index}", "exec"), {"__name__": "__docs__"})
