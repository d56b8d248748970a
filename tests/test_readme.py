"""The README's Python examples run as written, and its relative links point at files that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)


def test_the_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index: int, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the examples write their files into the working directory
    threads = torch.get_num_threads()
    try:
        exec(compile(BLOCKS[index], f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})
    finally:
        torch.set_num_threads(threads)


def test_readme_links_resolve() -> None:
    for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", README):
        assert (ROOT / target).exists(), target
