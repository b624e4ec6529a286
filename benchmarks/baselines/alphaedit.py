"""AlphaEdit (Fang et al., ICLR 2025, "AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models").

MEMIT's update with the preserved knowledge taken out of the objective and enforced instead: the update is
projected onto the null space of the preserved keys K0, so that (W + Δ P) k0 = W k0 for every key k0 the statistics
saw. P = Û Ûᵀ, Û the eigenvectors of K0 K0ᵀ ∝ C_l = E[k kᵀ] whose eigenvalues are below `nullspace_threshold`,
an absolute threshold on the eigenvalues of the mean second moment C_l, as in the authors' code (2e-2). (A threshold
relative to the largest eigenvalue does not carry over: LLaMA-like models have a few massive activations, e.g. at the
first token, that make the largest eigenvalue of some layers 10³–10⁶ times that of others.) Per layer, as in MEMIT
(same targets, same split of the residual R over the range), with the keys of this call's requests K and those of
earlier calls K_p:

    Δ_l = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + α I)⁻¹                    (AlphaEdit Eq. 7, α `l2`)

and W_l += Δ_l. K_p K_pᵀ accumulates over `apply` calls, in the editor: sequential edits do not undo earlier ones.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .locate_edit import ValueSettings
from .memit import MEMIT


class AlphaEdit(MEMIT):
    """AlphaEdit on a contiguous range of down-projections; see `MEMIT` and `LocateEditor` for the other arguments.

    Args:
        nullspace_threshold: Eigenvectors of C_l with eigenvalues below this span the null space.
        l2: α, the ridge term of Eq. 7.
    """

    name = "AlphaEdit"

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, layers: Sequence[int] | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, value: ValueSettings | None = None,
                 nullspace_threshold: float = 2e-2, l2: float = 10.0, **options) -> None:
        super().__init__(model, tokenizer, layers, cache_dir, value, **options)
        self.l2 = l2
        self.projections: dict[int, torch.Tensor] = {}
        self.null_dimensions: dict[int, int] = {}
        for layer in self.layers:
            eigenvalues, eigenvectors = torch.linalg.eigh(self.statistics.second_moment(layer).double())
            kept = eigenvectors[:, eigenvalues < nullspace_threshold]  # (d_ff, null dim)
            self.projections[layer] = kept @ kept.T  # (d_ff, d_ff)
            self.null_dimensions[layer] = kept.shape[1]
        self.edited_moments = {layer: torch.zeros_like(p) for layer, p in self.projections.items()}

    def solve(self, layer: int, keys: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Δ = R Kᵀ P ((K_p K_pᵀ + K Kᵀ) P + α I)⁻¹ for keys K (d_ff, n), residuals R (d_model, n); then K_p += K."""
        projection = self.projections[layer]  # (d_ff, d_ff), symmetric
        moment = self.edited_moments[layer] + keys @ keys.T  # (d_ff, d_ff)
        # Δᵀ = (P M + α I)⁻¹ P K Rᵀ, the transpose of Eq. 7 (P and M symmetric).
        system = projection @ moment + self.l2 * torch.eye(len(projection), dtype=projection.dtype)
        update = torch.linalg.solve(system, projection @ keys @ residual.T).T
        self.edited_moments[layer] += keys @ keys.T
        return update

    def restore(self) -> None:
        """Put the original weights back and forget the edits, the earlier edits' keys included."""
        super().restore()
        for moment in self.edited_moments.values():
            moment.zero_()
