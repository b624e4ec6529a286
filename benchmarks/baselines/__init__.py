"""Knowledge-editing baselines for the benchmarks: ROME, MEMIT and AlphaEdit on LLaMA-like causal LMs.

They are no part of the dft-peft plugin: the benchmarks run them beside DFT. Each editor edits the model in place
(`apply(requests)`, one batch per call; `file_bytes()`), needs a subject per request, and estimates the second moment
of the MLP keys once per model (`KeyStatistics`, cached on disk).
"""

from __future__ import annotations

import os

from torch import nn
from transformers import PreTrainedTokenizerBase

from .alphaedit import AlphaEdit
from .editor import Editor, LocateEditor, memit_layers, rome_layer
from .key_statistics import KeyStatistics, counterfact_texts
from .locate_edit import ValueSettings
from .memit import MEMIT
from .rome import ROME

EDITORS: dict[str, type[LocateEditor]] = {"ROME": ROME, "MEMIT": MEMIT, "AlphaEdit": AlphaEdit}


def make_editor(name: str, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                cache_dir: str | os.PathLike[str] | None = None, **options) -> LocateEditor:
    """The editor `name` ("ROME", "MEMIT" or "AlphaEdit") on `model`, with the statistics cached in `cache_dir`;
    `options` go to its constructor (e.g. `layer=`, `layers=`, `value=ValueSettings(...)`)."""
    if name not in EDITORS:
        raise ValueError(f"unknown editor {name!r}; expected one of {list(EDITORS)}")
    return EDITORS[name](model, tokenizer, cache_dir=cache_dir, **options)


__all__ = [
    "EDITORS",
    "MEMIT",
    "ROME",
    "AlphaEdit",
    "Editor",
    "KeyStatistics",
    "LocateEditor",
    "ValueSettings",
    "counterfact_texts",
    "make_editor",
    "memit_layers",
    "rome_layer",
]
