"""The repository root behaves like any other folder: the package imports, and benchmark scripts run, from there."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def test_import_from_the_repository_root():
    # transformers imports the unrelated top-level `kernels` package, which the root's kernels/ folder shadows there
    done = run("-c", "import dft_peft, kernels, transformers.integrations.hub_kernels; print(kernels.__file__)")
    assert done.returncode == 0, done.stderr[-2000:]
    assert os.path.join(ROOT, "kernels") not in done.stdout


def test_benchmark_script_runs_from_the_repository_root():
    done = run("benchmarks/file_size.py", "--help")
    assert done.returncode == 0, done.stderr[-2000:]
