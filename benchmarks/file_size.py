"""Bytes per nonzero of DFT edit files at the core densities, against the entropy bound and other sparse layouts.

(a) Codec level: random supports over SmolLM2-135M's module shapes, Elias-Fano coded with `dft_peft.format.codec`
    (every code is decoded back and compared). Index bytes are compared with log2 C(numel, nnz), the fewest bits any
    lossless code can use for an arbitrary support. The other layouts' sizes are their raw tensor bytes.
(b) File level: `adapter_model.safetensors` written by `save_pretrained` of a DFT adapter on a randomly initialised
    Llama with SmolLM2-135M's layer shapes (no download), next to the same supports as int32 indices + fp32 values
    in a safetensors file and a PEFT SHiRA adapter on the same model.

    python benchmarks/file_size.py [--out benchmarks/results] [--layers 30] [--file-layers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time

import matplotlib
import torch
from llama_shapes import layer_shapes, model_shapes, projection_names
from peft import ShiraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import dft_peft
from dft_peft.format.codec import decode_indices, encode_indices, encoded_size_bytes, entropy_bound_bits

matplotlib.use("Agg")
import matplotlib.pyplot as plt

DENSITIES = (0.1, 0.05, 0.01, 0.001)
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 576, 1536, 9, 3  # SmolLM2-135M
KV_DIM = HIDDEN // HEADS * KV_HEADS
# (out, in) of each targeted module of one decoder layer, keyed by its name under `model.layers.<i>.`.
LAYER_SHAPES = layer_shapes(HIDDEN, KV_DIM, INTERMEDIATE)
TARGETS = projection_names(LAYER_SHAPES)
FP32, BF16 = 4, 2
INT32_FP32 = 4 + FP32  # Super-Tuning's layout, as the project describes it: one int32 flat index + one fp32 value
SHIRA = 2 * 4 + FP32  # PEFT's SHiRA: (row, col) as int32 (`torch.where(...)` cast `.to(torch.int)`) + fp32 weight


def module_shapes(layers: int) -> dict[str, tuple[int, int]]:
    return model_shapes(LAYER_SHAPES, layers)


def random_core(
    shapes: dict[str, tuple[int, int]], density: float, gen: torch.Generator
) -> dict[str, dft_peft.SparseDelta]:
    """A uniformly random support of exactly round(density * numel) elements per module, with N(0, 1) values."""
    core = {}
    for name, shape in shapes.items():
        numel = shape[0] * shape[1]
        indices = torch.randperm(numel, generator=gen)[: round(density * numel)].sort().values
        core[name] = dft_peft.SparseDelta(indices, torch.randn(indices.numel(), generator=gen), shape)
    return core


def codec_level(layers: int, seed: int) -> list[dict]:
    shapes = module_shapes(layers)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for density in DENSITIES:
        nnz = code_bytes = meta_bytes = 0
        bound_bits = encode_s = decode_s = 0.0
        for name, delta in random_core(shapes, density, gen).items():
            start = time.perf_counter()
            code, meta = encode_indices(delta.indices, delta.numel)
            encode_s += time.perf_counter() - start
            start = time.perf_counter()
            decoded = decode_indices(code, meta, delta.numel, name)
            decode_s += time.perf_counter() - start
            if not torch.equal(decoded, delta.indices) or code.numel() != encoded_size_bytes(delta.nnz, delta.numel):
                raise AssertionError(f"{name}: the codec is not lossless or its size prediction is off")
            nnz += delta.nnz
            code_bytes += code.nbytes
            meta_bytes += meta.nbytes
            bound_bits += entropy_bound_bits(delta.nnz, delta.numel)
        index = (code_bytes + meta_bytes) / nnz
        rows.append({
            "density": density,
            "modules": len(shapes),
            "nnz": nnz,
            "entropy_bound_index_B_per_nnz": bound_bits / 8 / nnz,
            "ef_code_B_per_nnz": code_bytes / nnz,
            "ef_code_to_bound": code_bytes * 8 / bound_bits,
            "ef_code_meta_B_per_nnz": index,
            "ef_fp32_B_per_nnz": index + FP32,
            "ef_bf16_B_per_nnz": index + BF16,
            "int32_fp32_B_per_nnz": INT32_FP32,
            "shira_B_per_nnz": SHIRA,
            "encode_s": encode_s,
            "decode_s": decode_s,
        })
    return rows


def tiny_llama(layers: int) -> LlamaForCausalLM:
    """SmolLM2-135M's layer shapes with `layers` decoder layers and a small vocabulary (it is not edited)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        num_hidden_layers=layers, vocab_size=256, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def safetensors_parts(path: str) -> dict[str, int]:
    """Bytes of the tensors of a safetensors file grouped by the last component of their key, plus the header."""
    parts: dict[str, int] = {}
    with safe_open(path, framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
            tensor = f.get_tensor(key)
            part = key.rpartition(".")[2]
            parts[part] = parts.get(part, 0) + tensor.nbytes
    parts["header"] = os.path.getsize(path) - sum(parts.values())
    return parts


def check_dft_file(path: str, core: dict[str, dft_peft.SparseDelta], value_dtype: torch.dtype) -> None:
    """The saved edit decodes back to exactly the supports and (rounded) values it was given."""
    with safe_open(path, framework="pt") as f:
        for name, delta in core.items():
            key = f"base_model.model.{name}"
            code, meta = f.get_tensor(f"{key}.dft_code"), f.get_tensor(f"{key}.dft_meta")
            indices = decode_indices(code, meta, delta.numel, name)
            values = f.get_tensor(f"{key}.dft_values")
            if not torch.equal(indices, delta.indices) or not torch.equal(values, delta.values.to(value_dtype)):
                raise AssertionError(f"{path}: {name} does not round-trip")


def dft_file(core: dict[str, dft_peft.SparseDelta], density: float, layers: int, value_dtype: str, workdir: str):
    model = get_peft_model(tiny_llama(layers), dft_peft.DFTConfig(
        top_t=density, target_modules=TARGETS, value_dtype=value_dtype
    ))
    model.add_core(core)
    out = os.path.join(workdir, f"dft-{density}-{value_dtype}")
    model.save_pretrained(out)
    path = os.path.join(out, "adapter_model.safetensors")
    check_dft_file(path, core, getattr(torch, value_dtype))
    return os.path.getsize(path), safetensors_parts(path)


def shira_file(density: float, layers: int, workdir: str) -> tuple[int, int]:
    """(file bytes, nnz) of PEFT's SHiRA with its random mask; its nnz per module is r * (in + out), so r is the
    integer (at least 1) bringing the overall density closest to `density`."""
    shapes = LAYER_SHAPES.values()
    r = max(1, round(density * sum(o * i for o, i in shapes) / sum(o + i for o, i in shapes)))
    model = get_peft_model(tiny_llama(layers), ShiraConfig(r=r, target_modules=TARGETS, random_seed=0))
    out = os.path.join(workdir, f"shira-{density}")
    model.save_pretrained(out)
    path = os.path.join(out, "adapter_model.safetensors")
    with safe_open(path, framework="pt") as f:
        nnz = sum(f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith("shira_weight"))  # noqa: SIM118
    return os.path.getsize(path), nnz


def file_level(layers: int, seed: int) -> list[dict]:
    shapes = module_shapes(layers)
    numel = sum(o * i for o, i in shapes.values())
    gen = torch.Generator().manual_seed(seed)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for density in DENSITIES:
            core = random_core(shapes, density, gen)
            nnz = sum(d.nnz for d in core.values())
            fp32_size, fp32_parts = dft_file(core, density, layers, "float32", workdir)
            bf16_size, _ = dft_file(core, density, layers, "bfloat16", workdir)
            int32_path = os.path.join(workdir, f"int32-{density}.safetensors")
            save_file({f"{name}.{part}": tensor for name, d in core.items()
                       for part, tensor in (("indices", d.indices.int()), ("values", d.values))}, int32_path)
            shira_size, shira_nnz = shira_file(density, layers, workdir)
            overhead = fp32_parts["header"] + fp32_parts["dft_meta"] + fp32_parts["dft_fingerprint"]
            rows.append({
                "density": density,
                "layers": layers,
                "modules": len(shapes),
                "nnz": nnz,
                "dft_fp32_file_bytes": fp32_size,
                "dft_fp32_B_per_nnz": fp32_size / nnz,
                "dft_bf16_file_bytes": bf16_size,
                "dft_bf16_B_per_nnz": bf16_size / nnz,
                "dft_code_B_per_nnz": fp32_parts["dft_code"] / nnz,
                "dft_overhead_B_per_nnz": overhead / nnz,
                "dft_fp32_parts_bytes": fp32_parts,
                "int32_fp32_file_bytes": os.path.getsize(int32_path),
                "int32_fp32_B_per_nnz": os.path.getsize(int32_path) / nnz,
                "shira_density": shira_nnz / numel,
                "shira_file_bytes": shira_size,
                "shira_B_per_nnz": shira_size / shira_nnz,
            })
    return rows


def pct(density: float) -> str:
    return f"{density * 100:g}%"


def markdown_tables(codec_rows: list[dict], file_rows: list[dict] | None) -> str:
    lines = [
        f"### (a) Codec level: {codec_rows[0]['modules']} modules with SmolLM2-135M's shapes, random supports "
        "(bytes per nonzero)",
        "",
        "| density | nnz | entropy bound (index) | EF index | EF / bound | EF index + meta + fp32 "
        "| EF index + meta + bf16 | int32 + fp32 (Super-Tuning) | 2×int32 + fp32 (SHiRA) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {pct(r['density'])} | {r['nnz']:,} | {r['entropy_bound_index_B_per_nnz']:.3f} "
        f"| {r['ef_code_B_per_nnz']:.3f} | {r['ef_code_to_bound']:.3f}× | {r['ef_fp32_B_per_nnz']:.3f} "
        f"| {r['ef_bf16_B_per_nnz']:.3f} | {r['int32_fp32_B_per_nnz']} | {r['shira_B_per_nnz']} |"
        for r in codec_rows
    ]
    if file_rows is None:
        return "\n".join(lines)
    lines += [
        "",
        f"### (b) File level: `adapter_model.safetensors`, {file_rows[0]['modules']} modules "
        f"({file_rows[0]['layers']} layers) of a random Llama with SmolLM2-135M's layer shapes (bytes per nonzero)",
        "",
        "| density | nnz | DFT fp32 values | DFT bf16 values | of which EF index "
        "| of which header + meta + fingerprint | int32 + fp32 safetensors | PEFT SHiRA (its density) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {pct(r['density'])} | {r['nnz']:,} | {r['dft_fp32_B_per_nnz']:.3f} | {r['dft_bf16_B_per_nnz']:.3f} "
        f"| {r['dft_code_B_per_nnz']:.3f} | {r['dft_overhead_B_per_nnz']:.3f} | {r['int32_fp32_B_per_nnz']:.3f} "
        f"| {r['shira_B_per_nnz']:.3f} ({pct(round(r['shira_density'], 5))}) |"
        for r in file_rows
    ]
    return "\n".join(lines)


def plot(codec_rows: list[dict], file_rows: list[dict] | None, path: str) -> None:
    panels = 1 if file_rows is None else 2
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5.5), squeeze=False)
    x = [100 * r["density"] for r in codec_rows]
    ax = axes[0][0]
    for key, label, style in [
        ("shira_B_per_nnz", "2×int32 + fp32 (SHiRA)", "k:"),
        ("int32_fp32_B_per_nnz", "int32 + fp32 (Super-Tuning)", "k--"),
        ("ef_fp32_B_per_nnz", "DFT: EF index + fp32", "C0o-"),
        ("ef_bf16_B_per_nnz", "DFT: EF index + bf16", "C1o-"),
        ("ef_code_B_per_nnz", "EF index only", "C2o-"),
        ("entropy_bound_index_B_per_nnz", "entropy bound H(p)/p (index only)", "C3s--"),
    ]:
        ax.plot(x, [r[key] for r in codec_rows], style, label=label)
    ax.set_title("(a) codec level, random supports")
    if file_rows is not None:
        ax = axes[0][1]
        for key, label, style in [
            ("shira_B_per_nnz", "PEFT SHiRA file", "ko:"),
            ("int32_fp32_B_per_nnz", "int32 + fp32 safetensors", "ks--"),
            ("dft_fp32_B_per_nnz", "DFT file, fp32 values", "C0o-"),
            ("dft_bf16_B_per_nnz", "DFT file, bf16 values", "C1o-"),
        ]:
            ax.plot(x, [r[key] for r in file_rows], style, label=label)
        ax.plot(x, [r["entropy_bound_index_B_per_nnz"] for r in codec_rows], "C3s--", label="entropy bound (index)")
        ax.set_title(f"(b) adapter_model.safetensors, {file_rows[0]['layers']} layers")
    for ax in axes[0]:
        ax.set_xscale("log")
        ax.set_xticks(x, [pct(r["density"]) for r in codec_rows])
        ax.set_xlabel("core density")
        ax.set_ylabel("bytes per nonzero")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="directory for file_size.{json,md,png}")
    parser.add_argument("--layers", type=int, default=30, help="decoder layers at codec level (SmolLM2-135M: 30)")
    parser.add_argument("--file-layers", type=int, default=2, help="decoder layers of the model saved at file level")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-file-level", action="store_true", help="codec level only")
    args = parser.parse_args()
    command = "python " + shlex.join(["benchmarks/file_size.py", *sys.argv[1:]])

    codec_rows = codec_level(args.layers, args.seed)
    file_rows = None if args.skip_file_level else file_level(args.file_layers, args.seed)
    tables = markdown_tables(codec_rows, file_rows)
    print(tables)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "file_size.json"), "w") as f:
        json.dump({"command": command, "torch": torch.__version__, "codec_level": codec_rows,
                   "file_level": file_rows}, f, indent=2)
    notes = (
        "EF = Elias-Fano (`dft_peft.format.codec`); meta = 32 bytes per module. Entropy bound = log2 C(numel, nnz) "
        "summed "
        "over modules. Super-Tuning's layout is taken as one int32 flat index + one fp32 value per nonzero; SHiRA's "
        "is PEFT's: (row, col) int32 pair + fp32 weight. At file level SHiRA's density is r·(in+out)/(in·out) for "
        "the integer r closest to the target, so it differs from the DFT density."
    )
    with open(os.path.join(args.out, "file_size.md"), "w") as f:
        f.write(f"# Edit file size\n\nProduced by `{command}` (torch {torch.__version__}).\n\n{tables}\n\n{notes}\n")
    plot(codec_rows, file_rows, os.path.join(args.out, "file_size.png"))


if __name__ == "__main__":
    main()
