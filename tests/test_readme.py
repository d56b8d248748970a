"""The README's Python examples run as written, its relative links and the repository paths it names point at files
that exist, and the model counts it claims are the ones the tests check."""

from __future__ import annotations

import ast
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


def test_every_repository_path_the_readme_names_exists() -> None:
    """`amas/...`, `tests/...`, `tools/...`, `configs/...`, `benchmarks/...` in backticks or as link targets."""
    top = r"(?:amas|tests|tools|configs|benchmarks)/"
    named = set(re.findall(rf"`({top}[^`\s]*)`", README)) | set(re.findall(rf"\]\(({top}[^)#\s]*)", README))
    assert len(named) > 20, named  # the pattern finds the module map and the recipes
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, missing


def test_no_file_cites_a_document_the_repository_does_not_hold() -> None:
    texts = {p: p.read_text() for d in ("amas", "benchmarks", "configs", "tools", "tests")
             for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".md", ".yaml") and p != Path(__file__)}
    texts[ROOT / "README.md"] = README
    cited = {(str(p.relative_to(ROOT)), doc) for p, text in texts.items()
             for doc in re.findall(r"\b([A-Z][A-Z_]+\.md)\b", text) if doc != "NAME.md"}  # NAME: a placeholder
    missing = sorted((where, doc) for where, doc in cited
                     if not any((ROOT / d / doc).exists() for d in ("", "benchmarks", "configs")))
    assert not missing, missing


def _list_length(test_file: str, name: str) -> int:
    tree = ast.parse((ROOT / test_file).read_text())
    value = next(n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == name)
    return len(value.elts)


def test_the_model_counts_the_readme_claims_are_the_tests() -> None:
    flat = " ".join(README.split())
    tv = _list_length("tests/models/test_torchvision_sweep.py", "MODELS")
    assert f"{ {14: 'fourteen'}.get(tv, tv)} torchvision classifiers" in flat, tv
    timm = _list_length("tests/models/test_timm.py", "SWEEP")
    assert f"{timm} families cut exactly in `tests/models/test_timm.py`" in flat, timm
