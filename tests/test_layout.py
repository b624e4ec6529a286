"""The repository root behaves like any other folder: the package imports, and benchmark scripts run, from there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def test_ci_runs_the_readme_test_command():
    readme = Path(ROOT, "README.md").read_text(encoding="utf-8")
    blocks = readme.split("```bash\n")[1:]
    commands = [block.split("```")[0].strip() for block in blocks]
    test_command = next(c for c in commands if c.endswith("pytest -q"))
    demo_command = next(c for c in commands if c.endswith("dft-peft demo"))
    assert test_command in Path(ROOT, ".ci", "run").read_text(encoding="utf-8").splitlines()
    for command in (test_command, demo_command):  # each installs what it needs, the CPU build of torch first
        assert command.startswith("pip install torch==2.13.0 && pip install -e")
