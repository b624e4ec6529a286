"""The projections of one Llama decoder layer, for benchmarks that build realistic module shapes."""

from __future__ import annotations


def layer_shapes(hidden: int, kv_dim: int, intermediate: int) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection, keyed by its name under `model.layers.<i>.`."""
    return {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (kv_dim, hidden),
        "self_attn.v_proj": (kv_dim, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (intermediate, hidden),
        "mlp.up_proj": (intermediate, hidden),
        "mlp.down_proj": (hidden, intermediate),
    }


def model_shapes(layer: dict[str, tuple[int, int]], layers: int) -> dict[str, tuple[int, int]]:
    """Full module names → shapes for `layers` decoder layers of `layer`'s projections."""
    return {f"model.layers.{i}.{name}": shape for i in range(layers) for name, shape in layer.items()}


def projection_names(layer: dict[str, tuple[int, int]]) -> list[str]:
    """The projections' short names (`q_proj`, ...), e.g. for `target_modules`."""
    return sorted({name.rpartition(".")[2] for name in layer})
