"""A DDP edit of a tiny model on 2 CPU processes (gloo): it completes, every rank ends with the same edit, and the
saved edit reproduces the edited logits when loaded in a single process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch
from peft import PeftModel
from tiny_models import tiny_llama

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
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        logits = loaded(torch.tensor([[2, 5, 7, 9, 3]])).logits
    # Same weights bit for bit; the tolerance covers matmul reduction order under other thread counts.
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-6)
