"""README.md stays true: every ```python block of its library section runs, in order, in one
namespace (as a reader would paste them), and the public names it uses exist."""
from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_library_examples():
    assert len(python_blocks()) >= 3


def test_readme_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {}
    for index, block in enumerate(python_blocks()):
        try:
            exec(compile(block, f"README.md python block {index}", "exec"), namespace)
        except Exception as error:          # name the block in the failure
            raise AssertionError(f"README python block {index} failed: {error!r}\n{block}") from error
