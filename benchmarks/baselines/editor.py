"""The editor interface the benchmarks call, and the state every locate-then-edit editor keeps.

An editor edits `model` in place: `apply(requests)` is one batch of edits, repeated calls edit the already-edited
model (sequential editing), and `file_bytes()` is the size of what the edits so far would ship — the float32 dense
delta of every edited down-projection, as a safetensors file.

Default layers follow the published configurations, scaled to the model's depth: ROME edits one early MLP (layer 5
of 28 in GPT-J, ROME §3; layer 5 of 32 in EasyEdit's LLaMA configuration: ≈17% of the depth), MEMIT and AlphaEdit a
contiguous early range (layers 4–8 of 32 for LLaMA-3-8B in AlphaEdit and EasyEdit, 3–8 of 28 for GPT-J in MEMIT:
≈12.5%–25% of the depth). Those are where causal tracing of the MLP at the subject's last token peaks in the models
the papers traced. On SmolLM2-135M our own trace (`causal_trace.py`) is too weak to override the rule: its noise
barely corrupts the prediction and its effects are flat apart from the first layers (numbers in
benchmarks/results/baselines/sanity.md), while the rule's layers reach the sanity check's bar.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Protocol

import torch
from safetensors.torch import save
from torch import nn
from transformers import PreTrainedTokenizerBase

from dft_peft import EditRequest

from .key_statistics import KeyStatistics
from .locate_edit import ValueSettings, check_subjects, context_templates, decoder_layers, down_proj

ROME_DEPTH = 0.17
MEMIT_DEPTHS = (0.125, 0.25)


class Editor(Protocol):
    """What the benchmark harness calls."""

    name: str
    model: nn.Module

    def apply(self, requests: list[EditRequest]) -> None: ...

    def file_bytes(self) -> int: ...


def rome_layer(model: nn.Module) -> int:
    """ROME's default layer: the one at ≈17% of the depth (5 of 28 in GPT-J, 5 of 32 in LLaMA)."""
    return round(ROME_DEPTH * len(decoder_layers(model)))


def memit_layers(model: nn.Module) -> list[int]:
    """MEMIT's and AlphaEdit's default range: the layers from ≈12.5% to ≈25% of the depth (4–8 of 32)."""
    depth = len(decoder_layers(model))
    return list(range(round(MEMIT_DEPTHS[0] * depth), round(MEMIT_DEPTHS[1] * depth) + 1))


class LocateEditor:
    """The state ROME, MEMIT and AlphaEdit share: the model, its edited layers' original weights, the key
    statistics of those layers, the context templates and a log of each edit.

    Args:
        model, tokenizer: The model to edit in place (unedited when the editor is made: the statistics describe it).
        layers: The decoder layers whose down-projection is edited.
        cache_dir: Where the key statistics are cached (default `~/.cache/dft_peft/baselines/`).
        value: The target-value optimisation's settings.
        templates, template_length: How many model-written context prefixes the keys and values are averaged over
            (besides the bare prompt), and their length in tokens. ROME used ten; two keep one edit of a 135M model
            under half a minute on a CPU.
        seed: Seeds the context prefixes.
        statistics_texts: The text of the key statistics (default: CounterFact positions 6000–8999).
    """

    name = "locate-edit"

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, layers: Sequence[int],
                 cache_dir: str | os.PathLike[str] | None = None, value: ValueSettings | None = None,
                 templates: int = 2, template_length: int = 5, seed: int = 0,
                 statistics_texts: Sequence[str] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.layers = sorted(layers)
        self.value = value if value is not None else ValueSettings()
        self.originals = {layer: down_proj(model, layer).weight.detach().clone() for layer in self.layers}
        self.statistics = KeyStatistics(model, tokenizer, self.layers, statistics_texts, cache_dir)
        self.templates = context_templates(model, tokenizer, templates, template_length, seed)
        self.log: list[dict] = []

    def apply(self, requests: list[EditRequest]) -> None:
        """Edit the model in place so that each request's prompt leads to its `target_new`."""
        check_subjects(requests)
        tick = time.perf_counter()
        self._edit(requests)
        self.log.append({"requests": len(requests), "seconds": time.perf_counter() - tick})

    def _edit(self, requests: list[EditRequest]) -> None:
        raise NotImplementedError

    def deltas(self) -> dict[str, torch.Tensor]:
        """The float32 dense change of each edited down-projection's weight, by parameter name."""
        names = {module: name for name, module in self.model.named_modules()}
        return {f"{names[down_proj(self.model, layer)]}.weight":
                (down_proj(self.model, layer).weight.detach().float() - original.float()).contiguous()
                for layer, original in self.originals.items()}

    def file_bytes(self) -> int:
        """Bytes of the safetensors file holding `deltas()`."""
        return len(save(self.deltas()))

    def restore(self) -> None:
        """Put the original weights back and forget the edits (a fresh editor on the unedited model)."""
        with torch.no_grad():
            for layer, original in self.originals.items():
                down_proj(self.model, layer).weight.copy_(original)
        self.log.clear()
