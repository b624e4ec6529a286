"""Shared fixtures. Model builders live in `tiny_models.py` (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run through Triton's interpreter; it must be on before they are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DATA_DIR = os.environ.get("DFT_PEFT_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


@pytest.fixture
def input_ids():
    return torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(1))
