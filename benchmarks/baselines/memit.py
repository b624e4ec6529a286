"""MEMIT (Meng et al., 2023, "Mass-Editing Memory in a Transformer"): a batch of edits spread over a layer range.

For each request i, the target z_i = h_i^L + delta_i is the residual stream at the subject's last token after the
last edited layer L that makes the target likely (`optimise_value`, MEMIT Eq. 16). The layers l of the range are
then updated in order; at each, with K the current keys (d_ff × n, one column per request, averaged over context
prefixes) and R the remaining residual z - h^L split evenly over the layers still to edit (Eq. 20), the update is

    Δ_l = R Kᵀ (λ C_l + K Kᵀ)⁻¹                                   (Eq. 14, C_l = E[k kᵀ], λ `covariance_weight`)

the least-squares write of the new (K, R) that keeps the outputs of the preserved keys, whose second moment is
λ C_l. Default layers: `memit_layers` (≈12.5–25% of the depth, layers 4–8 of SmolLM2-135M's 30; see `editor.py`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from dft_peft import EditRequest

from .editor import LocateEditor, memit_layers
from .locate_edit import ValueSettings, down_proj, optimise_value, read_at_subject

GPTJ_COVARIANCE_WEIGHT = 15000.0
GPTJ_WIDTH = 16384


class MEMIT(LocateEditor):
    """MEMIT on the down-projections of a contiguous range of layers; see `LocateEditor` for the other arguments.

    Args:
        layers: The contiguous range (default `memit_layers(model)`).
        covariance_weight: λ, the weight of the preserved keys' second moment against the new keys'. Default:
            GPT-J's 15000 scaled by d_ff / 16384 (GPT-J's MLP width), since kᵀ C⁻¹ k, the new key's weight against
            λ, grows with the width: 1406 for SmolLM2-135M's 1536.
    """

    name = "MEMIT"

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, layers: Sequence[int] | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, value: ValueSettings | None = None,
                 covariance_weight: float | None = None, **options) -> None:
        layers = memit_layers(model) if layers is None else sorted(layers)
        if layers != list(range(layers[0], layers[-1] + 1)):
            raise ValueError(f"{self.name} edits a contiguous range of layers, got {layers}")
        super().__init__(model, tokenizer, layers, cache_dir, value, **options)
        width = down_proj(model, layers[0]).in_features
        default = GPTJ_COVARIANCE_WEIGHT * width / GPTJ_WIDTH
        self.covariance_weight = default if covariance_weight is None else covariance_weight

    def _edit(self, requests: list[EditRequest]) -> None:
        last = self.layers[-1]
        deltas = []
        for request in requests:
            result = optimise_value(self.model, self.tokenizer, last, request, self.templates, self.value)
            deltas.append(result.delta)
            self.log.append({"nll": result.nll, "steps": result.steps})
        _, h_last = read_at_subject(self.model, self.tokenizer, requests, self.templates, last, last)
        targets = h_last + torch.stack(deltas)  # (n, d_model): z_i
        for i, layer in enumerate(self.layers):
            keys, current = read_at_subject(self.model, self.tokenizer, requests, self.templates, layer, last)
            residual = (targets - current) / (len(self.layers) - i)  # (n, d_model): this layer's share
            update = self.solve(layer, keys.T.double(), residual.T.double())  # (d_model, d_ff)
            with torch.no_grad():
                weight = down_proj(self.model, layer).weight
                weight.add_(update.to(weight.dtype))

    def solve(self, layer: int, keys: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Δ = R Kᵀ (λ C + K Kᵀ)⁻¹ for keys K (d_ff, n) and residuals R (d_model, n): (d_model, d_ff)."""
        moment = self.covariance_weight * self.statistics.second_moment(layer).double()  # (d_ff, d_ff)
        return torch.linalg.solve(moment + keys @ keys.T, keys @ residual.T).T
