"""The README's Python snippets run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_snippets():
  assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_runs(index, monkeypatch):
  # Snippets use paths relative to the repository root.
  monkeypatch.chdir(README.parent)
  exec(compile(BLOCKS[index], f"README.md snippet {index}", "exec"), {})
