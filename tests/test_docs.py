"""Every ```python block of the foundation's docs pages (and the README) runs as written."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/installation.md", "docs/model.md", "docs/quantizer.md", "docs/original_checkpoints.md",
         "docs/sinkhorn.md", "docs/architecture.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks():
    for page in PAGES:
        text = (ROOT / page).read_text()
        for index, match in enumerate(BLOCK.finditer(text)):
            yield pytest.param(match.group(1), id=f"{page}#{index}")


@pytest.mark.parametrize("code", list(_blocks()))
def test_snippet_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<docs>", "exec"), {"__name__": "__docs__"})
