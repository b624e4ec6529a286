"""ROME (Meng et al., 2022, "Locating and Editing Factual Associations in GPT"): a rank-one edit of one MLP.

For a request, the key k* is the down-projection's input at the subject's last token (averaged over context
prefixes), and the value v* = W k* + delta is the one whose insertion makes the target likely (`optimise_value`).
ROME's closed form (Eq. 2) inserts (k*, v*) while changing the outputs of other keys as little as possible under
their second moment C = E[k kᵀ]:

    W' = W + (v* - W k*) (C⁻¹ k*)ᵀ / ((C⁻¹ k*)ᵀ k*)

so that W' k* = v* exactly, and a key k with (C⁻¹ k*)ᵀ k = 0 keeps its output. A batch is applied one edit after
another, each on the model the previous one left (as the DFT paper ran ROME). Default layer: `rome_layer` (≈17% of
the depth, layer 5 of SmolLM2-135M's 30; see `editor.py`).
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from dft_peft import EditRequest

from .editor import LocateEditor, rome_layer
from .locate_edit import ValueSettings, down_proj, optimise_value, read_at_subject


class ROME(LocateEditor):
    """ROME on one down-projection (`layer`, default `rome_layer(model)`); see `LocateEditor` for the arguments."""

    name = "ROME"

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, layer: int | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, value: ValueSettings | None = None,
                 **options) -> None:
        self.layer = rome_layer(model) if layer is None else layer
        super().__init__(model, tokenizer, [self.layer], cache_dir, value, **options)
        # C⁻¹ in float64: the update divides by (C⁻¹ k*)ᵀ k*, so the inverse must be accurate.
        self.inverse = torch.linalg.inv(self.statistics.second_moment(self.layer).double())  # (d_ff, d_ff)

    def _edit(self, requests: list[EditRequest]) -> None:
        for request in requests:
            tick = time.perf_counter()
            result = optimise_value(self.model, self.tokenizer, self.layer, request, self.templates, self.value)
            keys, _ = read_at_subject(self.model, self.tokenizer, [request], self.templates, self.layer, self.layer)
            self.insert(keys[0], result.delta)
            self.log.append({"nll": result.nll, "steps": result.steps, "seconds": time.perf_counter() - tick})

    def insert(self, key: torch.Tensor, change: torch.Tensor) -> None:
        """Add the rank-one update that changes the output for `key` (d_ff,) by `change` (d_model,)."""
        direction = self.inverse @ key.double()  # (d_ff,): C⁻¹ k*
        update = torch.outer(change.double(), direction) / (direction @ key.double())  # (d_model, d_ff)
        with torch.no_grad():
            weight = down_proj(self.model, self.layer).weight
            weight.add_(update.to(weight.dtype))
