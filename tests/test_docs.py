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


def test_every_test_named_in_the_guarantees_exists():
    root = ROOT
    text = (root / "docs" / "guarantees.md").read_text()
    named = 0
    for row in text.splitlines():
        current = None
        for ref in re.findall(r"`(tests/[\w/]+\.py)?(?:::(\w+))?`", row):
            path, name = ref
            current = path or current
            assert current, row
            source = (root / current).read_text()
            if name:
                assert f"def {name}(" in source, f"{current}::{name} is named in docs/guarantees.md but does not exist"
                named += 1
    assert named >= 25
