"""The editors the benchmarks compare, behind one protocol; repeated `apply` calls edit the same model in sequence.

Methods: "Full-FT" (AdamW on every targeted linear layer, loss on the answer tokens), "FT-c" (Full-FT kept within
±eps of the unedited weights, Zhu et al. 2020), "FT-M" (EasyEdit's fine-tune with the loss on the target tokens,
of one MLP down-projection: layer 20, at the relative depth of EasyEdit's layer 21 of LLaMA-2-7B's 32; see
`FT_M_LAYER`), "LoRA" (peft LoRA on the targeted layers), "DFT_FT" / "DFT_LoRA" (`dft_peft.edit`
with delta_source "full" / "lora"), "DFT_FT+old" (DFT_FT given the data's old answers, see `DATA_OLD_ANSWERS`),
and "ROME", "MEMIT", "AlphaEdit" from `benchmarks/baselines` when that package is present. The targeted layers are
every linear layer but the output head. Hyper-parameters (`HYPERPARAMS`) were chosen on the tuning split, except
FT-M's, which follow EasyEdit's.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Protocol

import torch
from harness import (
    DFTConfig,
    EditArguments,
    EditReport,
    EditRequest,
    EpochBatches,
    ModelLoss,
    edit,
    module_mode,
    train,
)
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

BATCH_SIZE = 8
# FT-M: EasyEdit's FT hparams for LLaMA-2-7B (hparams/FT/llama-7b.yaml: layers [21], num_steps 25, batch_size 1,
# lr 5e-4, Adam; "target_new" objective = FT-M). Layer 21 of 32 sits at depth 21/31 ≈ 0.68; the same depth of
# SmolLM2-135M's 30 layers is 0.68 · 29 ≈ 19.6, so layer 20. EasyEdit's num_steps are passes over the requests in
# batches of batch_size, i.e. epochs here; the 25 epochs are kept. Its batch size of 1 (made for single edits) would
# cost 25·N steps, 0.27 s each here (136 s for 20 edits): batches of 8, as the other fine-tunes. The learning rate is
# the smallest of 5e-4, 1e-3 and 2e-3 whose reliability reaches Full-FT's − 1 on 40 zsRE tuning-split edits
# (Full-FT 93.2; FT-M 85.2, 99.5, 100.0): at 5e-4 one MLP down-projection of this model does not take a batch's
# edits in 25 epochs.
FT_M_LAYER = 20
HYPERPARAMS: dict[str, dict] = {
    "original": {"lr": 1e-4, "epochs": 3},
    "Full-FT": {"lr": 1e-4, "epochs": 5},
    "FT-c": {"lr": 1e-4, "epochs": 5, "eps": 3e-4},
    "FT-M": {"lr": 1e-3, "epochs": 25, "batch_size": BATCH_SIZE, "layer": FT_M_LAYER},
    "LoRA": {"lr": 3e-3, "epochs": 5, "r": 8, "alpha": 16},
    "DFT_FT": {"top_t": 0.05, "lam": 1.0, "strategy": "locate_once", "epochs": 2, "old_epochs": 2,
               "learning_rate": 1e-4, "core_epochs": 1, "core_learning_rate": 1e-3, "max_rounds": 8},
    "DFT_LoRA": {"top_t": 0.05, "lam": 1.0, "strategy": "locate_once", "epochs": 2, "old_epochs": 2,
                 "learning_rate": 1e-3, "core_epochs": 1, "core_learning_rate": 2e-3, "max_rounds": 8},
}
HYPERPARAMS["DFT_FT+old"] = HYPERPARAMS["DFT_FT"]
# methods given the data's old answers (the true objects) under the base protocol too, where the others edit
# without them: DFT_FT+old is DFT_FT with Δold fine-tuned on them instead of on the model's own continuations
DATA_OLD_ANSWERS = frozenset({"DFT_FT+old"})
QUICK_OVERRIDES = ["DFT_FT.max_rounds=2", "DFT_LoRA.max_rounds=2"]  # --quick: a smoke test, minutes in CI
OWN_METHODS = ("Full-FT", "FT-c", "FT-M", "LoRA", "DFT_FT", "DFT_LoRA", "DFT_FT+old")
BASELINE_METHODS = ("ROME", "MEMIT", "AlphaEdit")


def override(item: str) -> None:
    """Apply a `METHOD.key=value` override (value read as JSON, else as a string) to `HYPERPARAMS`."""
    target, _, raw = item.partition("=")
    method, _, key = target.partition(".")
    if method not in HYPERPARAMS or not key or not raw:
        raise ValueError(f"{item!r}: expected METHOD.key=value with METHOD in {list(HYPERPARAMS)}")
    try:
        HYPERPARAMS[method][key] = json.loads(raw)
    except json.JSONDecodeError:
        HYPERPARAMS[method][key] = raw


class Editor(Protocol):
    """An editing method bound to one model: `apply` edits it with one batch of requests; repeated calls edit the
    already-edited model further (sequential editing). `model` is what is scored after each call."""

    name: str
    model: nn.Module

    def apply(self, requests: list[EditRequest]) -> None: ...

    def file_bytes(self) -> int:
        """Bytes the edits so far would ship."""
        ...


def targeted_names(model: nn.Module) -> list[str]:
    """Every linear layer but the output head: the modules the fine-tunes, LoRA and DFT edit."""
    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


def down_projection(model: nn.Module, layer: int) -> str:
    """The name of decoder layer `layer`'s MLP down-projection."""
    names = [n for n, _ in model.named_modules() if n.endswith(f"layers.{layer}.mlp.down_proj")]
    if len(names) != 1:
        raise ValueError(f"expected one module named '*layers.{layer}.mlp.down_proj', found {names}")
    return names[0]


class LInfProjection:
    """A step hook that keeps each parameter within ±eps of its value when the hook was made (FT-c)."""

    def __init__(self, params: list[nn.Parameter], eps: float) -> None:
        self.params = params
        self.start = [p.detach().clone() for p in params]
        self.eps = eps

    def __call__(self) -> None:
        with torch.no_grad():
            for p, p0 in zip(self.params, self.start):
                p.copy_(torch.minimum(torch.maximum(p, p0 - self.eps), p0 + self.eps))


def fine_tune(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], answers: list[str],
              params: list[nn.Parameter], lr: float, epochs: int, batch_size: int, generator: torch.Generator,
              step_hook: LInfProjection | None = None) -> None:
    """Train `params` of `model` in place (AdamW, loss on the answer tokens of `prompt + " " + answer`); every
    other parameter is frozen, and all are left frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    batches = EpochBatches(tokenizer, prompts, answers, batch_size, generator)
    with module_mode(model, training=True):
        train(ModelLoss(model), batches, epochs, lr, "adamw", step_hook=step_hook)
    for p in params:
        p.requires_grad_(False)


def saved_bytes(peft_model: nn.Module) -> int:
    """Size of the adapter file `save_pretrained` writes."""
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp, save_embedding_layers=False)
        return os.path.getsize(f"{tmp}/adapter_model.safetensors")


class FineTuneEditor:
    """Full-FT, FT-c and FT-M: AdamW on the weights of `modules`, in place; each `apply` trains on its batch with a
    fresh optimiser. With `eps`, the weights stay within ±eps of the unedited ones (FT-c) over all calls."""

    def __init__(self, name: str, model: nn.Module, tokenizer: PreTrainedTokenizerBase, modules: list[str],
                 lr: float, epochs: int, batch_size: int, seed: int, eps: float | None = None) -> None:
        self.name, self.model, self.tokenizer = name, model, tokenizer
        named = dict(model.named_modules())
        self.params = [named[n].weight for n in modules]
        self.lr, self.epochs, self.batch_size = lr, epochs, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.projection = LInfProjection(self.params, eps) if eps is not None else None

    def apply(self, requests: list[EditRequest]) -> None:
        fine_tune(self.model, self.tokenizer, [r.prompt for r in requests], [r.target_new for r in requests],
                  self.params, self.lr, self.epochs, self.batch_size, self.generator, self.projection)

    def file_bytes(self) -> int:
        """The dense float32 delta of the trained weights (tensor bytes; a safetensors header adds a few KB)."""
        return sum(4 * p.numel() for p in self.params)


class LoRAEditor:
    """peft LoRA on the targeted layers; each `apply` keeps training the same adapter with a fresh optimiser."""

    def __init__(self, name: str, model: nn.Module, tokenizer: PreTrainedTokenizerBase, lr: float, epochs: int,
                 r: int, alpha: float, seed: int) -> None:
        torch.manual_seed(seed)  # LoRA's A matrices are drawn from the global generator
        self.name, self.tokenizer, self.lr, self.epochs = name, tokenizer, lr, epochs
        self.model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targeted_names(model)))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.generator = torch.Generator().manual_seed(seed)

    def apply(self, requests: list[EditRequest]) -> None:
        fine_tune(self.model, self.tokenizer, [r.prompt for r in requests], [r.target_new for r in requests],
                  self.params, self.lr, self.epochs, BATCH_SIZE, self.generator)

    def file_bytes(self) -> int:
        return saved_bytes(self.model)


class DFTEditor:
    """`dft_peft.edit` (DFT_FT: delta_source "full", DFT_LoRA: "lora"); later `apply` calls extend the same adapter
    of the same PeftModel. Requests without an old answer get the model's own (`edit` generates it)."""

    def __init__(self, name: str, model: nn.Module, tokenizer: PreTrainedTokenizerBase, delta_source: str,
                 hp: dict, seed: int) -> None:
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.config = DFTConfig(top_t=hp["top_t"], lam=hp["lam"], target_modules=targeted_names(model))
        fields = {f.name for f in dataclasses.fields(EditArguments)}
        self.args = EditArguments(delta_source=delta_source, batch_size=BATCH_SIZE, seed=seed,
                                  **{k: v for k, v in hp.items() if k in fields})
        self.reports: list[EditReport] = []

    def apply(self, requests: list[EditRequest]) -> None:
        self.model, report = edit(self.model, self.tokenizer, requests, self.config, self.args, progress=False)
        self.reports.append(report)

    def file_bytes(self) -> int:
        return saved_bytes(self.model)


def baselines_available() -> bool:
    """Whether `benchmarks/baselines` (ROME, MEMIT, AlphaEdit) can be imported; an error inside it is raised."""
    try:
        import baselines  # noqa: F401
    except ModuleNotFoundError as err:
        if err.name != "baselines":
            raise
        return False
    return True


def available_methods() -> tuple[str, ...]:
    """Every method that can run here: the fine-tunes, LoRA and DFT, and the baselines once importable."""
    return OWN_METHODS + (BASELINE_METHODS if baselines_available() else ())


def make_editor(name: str, model: nn.Module, tokenizer: PreTrainedTokenizerBase, cache_dir: Path,
                seed: int) -> Editor:
    """The editor `name` of `model` (edited in place: pass a copy to keep the original)."""
    hp = HYPERPARAMS.get(name, {})
    if name in ("Full-FT", "FT-c"):
        return FineTuneEditor(name, model, tokenizer, targeted_names(model), hp["lr"], hp["epochs"], BATCH_SIZE,
                              seed, eps=hp.get("eps"))
    if name == "FT-M":
        return FineTuneEditor(name, model, tokenizer, [down_projection(model, hp["layer"])], hp["lr"],
                              hp["epochs"], hp["batch_size"], seed)
    if name == "LoRA":
        return LoRAEditor(name, model, tokenizer, hp["lr"], hp["epochs"], hp["r"], hp["alpha"], seed)
    if name in ("DFT_FT", "DFT_LoRA", "DFT_FT+old"):
        return DFTEditor(name, model, tokenizer, "lora" if name == "DFT_LoRA" else "full", hp, seed)
    if name in BASELINE_METHODS:
        if not baselines_available():
            raise ValueError(f"{name} comes from benchmarks/baselines, which is not present in this checkout")
        from baselines import make_editor as make_baseline

        return make_baseline(name, model, tokenizer, cache_dir)
    raise ValueError(f"unknown method {name!r}; expected one of {OWN_METHODS + BASELINE_METHODS}")


def original_model(base: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: list[EditRequest],
                   cache_dir: Path, key: dict) -> nn.Module:
    """The paper's "original model" (§5.3): `base` fine-tuned like Full-FT for 3 epochs on the requests' old
    answers; cached under `cache_dir` by a hash of `key` (everything it depends on) and the requests."""
    digest = hashlib.sha256(json.dumps({**key, "hp": HYPERPARAMS["original"],
                                        "requests": [dataclasses.asdict(r) for r in requests]},
                                       sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"original-{digest}.safetensors"
    model = copy.deepcopy(base)
    named = dict(model.named_modules())
    names = targeted_names(model)
    if path.exists():
        weights = load_file(path)
        with torch.no_grad():
            for n in names:
                named[n].weight.copy_(weights[n])
        return model
    if any(r.target_old is None for r in requests):
        raise ValueError("the paper protocol fine-tunes on the data's old answers; some requests have none")
    hp = HYPERPARAMS["original"]
    fine_tune(model, tokenizer, [r.prompt for r in requests], [r.target_old for r in requests],
              [named[n].weight for n in names], hp["lr"], hp["epochs"], BATCH_SIZE, torch.Generator().manual_seed(0))
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_file({n: named[n].weight.detach().contiguous() for n in names}, path)
    return model
