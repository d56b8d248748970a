"""The README's runnable Python example runs as written."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_example_runs(tmp_path) -> None:
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "prune_in_python.py")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "macs_reduction" in r.stdout and (tmp_path / "runs" / "python_api" / "pruned.pt2").is_file()
