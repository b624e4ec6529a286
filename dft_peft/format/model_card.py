"""Model card of an edit file: PEFT writes the generic card; this adds what a DFT edit is and how big it is."""

from __future__ import annotations

import os

from huggingface_hub import ModelCard, ModelCardData
from safetensors import safe_open

from .checkpoint import is_regular_file
from .edit_file import WEIGHTS_NAME

TAGS = ("dft", "knowledge-editing")
SECTION = "## DFT edit"


def edited_parameter_count(directory: str) -> int | None:
    """Number of edited weight entries in a saved edit (read from the safetensors header only)."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if not is_regular_file(path):
        return None
    total = 0
    with safe_open(path, framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
            if key.endswith(".dft_values"):
                total += f.get_slice(key).get_shape()[0]
    return total


def update_model_card(directory: str, base_model: str | None, top_t: float, selection: str) -> None:
    """Add the DFT tags, the base model and the edit's size to `directory/README.md` (created if missing)."""
    count = edited_parameter_count(directory)
    if count is None:
        return
    path = os.path.join(directory, "README.md")
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    card.data["tags"] = sorted(set(card.data.get("tags") or []) | set(TAGS))
    if base_model:
        card.data["base_model"] = base_model
    size = os.path.getsize(os.path.join(directory, WEIGHTS_NAME))
    section = (
        f"{SECTION}\n\nA knowledge edit made with Delicate Fine-Tuning (dft-peft): {count:,} edited parameters "
        f"(core: top_t={top_t}, selection={selection!r}), stored sparsely in {size:,} bytes.\n\n"
        "```python\nimport dft_peft\nfrom peft import PeftModel\n"
        "model = PeftModel.from_pretrained(base_model, path).merge_and_unload()\n```\n"
    )
    text = card.text
    if SECTION in text:
        text = text[: text.index(SECTION)].rstrip() + "\n\n"
    card.text = text + section
    card.save(path)
