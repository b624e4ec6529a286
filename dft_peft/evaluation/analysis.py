"""Where an edit changed the model (the paper's §5.8): per module, per layer, and the MLP vs attention share of the
edited parameters, read from the edit file alone."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from peft.utils import CONFIG_NAME

from ..format.edit_file import WEIGHTS_NAME, read_edit_file

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

def module_kind(name: str) -> str:
    """`"mlp"`, `"attention"` or `"other"`: the innermost component of the module name that tells."""
    for part in reversed(name.lower().split(".")):
        if ATTENTION_NAME.search(part):
            return "attention"
        if MLP_NAME.search(part):
            return "mlp"
    return "other"


def inspect_edit(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The §5.8 analysis of a saved edit, no model needed: per module (kind, layer, edited entries, density, bytes),
    per layer (edited entries by kind) and per kind (modules, edited entries, their share and density), with the
    file's size and the edit's top_t and selection. Raises ValueError for a missing, corrupt or non-DFT edit."""
    directory = str(directory)
    modules = read_edit_file(directory)
    total = sum(m.count for m in modules)
    layers: dict[int | None, dict[str, int]] = {}
    for m in modules:
        layers.setdefault(m.layer, dict.fromkeys(KINDS, 0))[module_kind(m.name)] += m.count
    kinds = {}
    for kind in KINDS:
        of_kind = [m for m in modules if module_kind(m.name) == kind]
        count, numel = sum(m.count for m in of_kind), sum(m.numel for m in of_kind)
        kinds[kind] = {"modules": len(of_kind), "edited": count, "numel": numel,
                       "share": count / total if total else 0.0, "density": count / numel if numel else None}
    config_path = Path(directory) / CONFIG_NAME
    if not config_path.is_file():
        raise ValueError(f"{directory} holds no {CONFIG_NAME}: not a saved PEFT adapter")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
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
        "modules": [{"name": m.name, "kind": module_kind(m.name), "layer": m.layer, "edited": m.count,
                     "numel": m.numel, "density": m.density, "bytes": m.nbytes} for m in modules],
        "layers": [{"layer": layer, **counts, "total": sum(counts.values())} for layer, counts in layers.items()],
        "kinds": kinds,
    }


def plot_edit_analysis(summary: dict[str, Any], path: str | os.PathLike[str]) -> None:
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


