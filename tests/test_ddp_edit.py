"""A DDP edit of a tiny model on 2 CPU processes (gloo): it completes, every rank ends with the same edit, and the
saved edit reproduces the edited logits when loaded in a single process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

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
