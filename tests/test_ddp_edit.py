"""Edits of a tiny model on 2 CPU processes (gloo). DDP: it completes, every rank ends with the same edit, and the
saved edit reproduces the edited logits when loaded in a single process. FSDP2: fine-tunes sharded by rows give
the DDP edit bit for bit, the core selected across the ranks from their shards of Δ."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from tiny_models import TOY_FACTS, tiny_llama, tiny_tokenizer

import dft_peft  # noqa: F401 - registers DFT with PEFT

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_edit_saves_an_edit_that_loads_in_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": HERE, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), os.path.join(HERE, "ddp_edit_worker.py"), str(tmp_path)]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    expected = torch.load(tmp_path / "expected.pt")
    assert expected["rounds"] == ["locate", "train_core"]
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        logits = loaded(torch.tensor([[2, 5, 7, 9, 3]])).logits
    # Same weights bit for bit; the tolerance covers matmul reduction order under other thread counts.
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-6)


def test_cli_edit_launched_on_two_ranks_is_saved_once(tmp_path):
    model_dir, out = tmp_path / "model", tmp_path / "edit"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(TOY_FACTS))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "dft_peft.cli", "edit", "--model", str(model_dir), "--data", str(facts),
               "--output-dir", str(out), "--metrics", str(tmp_path / "metrics.json"), "--max-rounds", "1",
               "--epochs", "2", "--batch-size", "2", "--learning-rate", "1e-2", "--top-t", "0.1"]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("Saved the edit to") == 1
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["edit_file"]["edited_parameters"] > 0
    loaded = PeftModel.from_pretrained(tiny_llama(), out)
    assert sum(d.nnz for d in loaded.base_model.get_core().values()) == metrics["edit_file"]["edited_parameters"]


@pytest.mark.parametrize("delta_source", ["full", "lora"])
def test_fsdp2_sharded_edit_equals_ddp_edit(tmp_path, delta_source):
    env = {**os.environ, "PYTHONPATH": HERE, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), os.path.join(HERE, "fsdp_edit_worker.py"), str(tmp_path), delta_source]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"cores_rank{r}.pt") for r in (0, 1)]
    for cores in ranks:
        assert cores["ddp_sharded_selections"] == 0
        # DFT_FT reads Δ off each rank's rows of W′; DFT_LoRA gathers the small factors and selects as usual.
        assert cores["fsdp2_sharded_selections"] == (1 if delta_source == "full" else 0)
        assert cores["fsdp2_fraction"] == cores["ddp_fraction"] > 0
        assert sum(i.numel() for i, _ in cores["fsdp2"].values()) > 0
        for name, (indices, values) in cores["ddp"].items():
            assert torch.equal(cores["fsdp2"][name][0], indices), name
            assert torch.equal(cores["fsdp2"][name][1], values), name
    for name, (indices, values) in ranks[0]["fsdp2"].items():
        assert torch.equal(ranks[1]["fsdp2"][name][0], indices) and torch.equal(ranks[1]["fsdp2"][name][1], values)
