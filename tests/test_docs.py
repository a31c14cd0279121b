"""The Python examples in docs/ and README.md run, so they never rot."""
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
BLOCKS = [(page.name, k, code) for page in PAGES
          for k, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))]


def test_docs_have_examples():
    assert any(name == "usage.md" for name, _, _ in BLOCKS)


@pytest.mark.parametrize("page,k,code", BLOCKS, ids=[f"{p}-{k}" for p, k, _ in BLOCKS])
def test_example_runs(page, k, code, tmp_path, monkeypatch):
    shutil.copytree(ROOT / "fixtures", tmp_path / "fixtures")
    monkeypatch.chdir(tmp_path)
    previous = [c for p, j, c in BLOCKS if p == page and j < k]  # blocks of a page build on each other
    exec(compile("\n".join(previous + [code]), f"{page}[{k}]", "exec"), {})
