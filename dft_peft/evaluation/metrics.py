"""Edit metrics as EasyEdit computes them: teacher-forced token accuracy for Reliability, Generality and Locality.

For a (prompt, target) pair the model reads `prompt + " " + target` once; a target token counts as right when the
argmax of the logits one position earlier is that token. Reliability scores (prompt, target_new), Generality
(rephrase, target_new), and Locality (locality_prompt, locality_answer) against the pre-edit model's own argmax
tokens rather than the answer: it measures what the edit changed, not what the model knew.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..checks import check_value
from .requests import EditRequest, as_requests

METRICS = ("reliability", "generality", "locality")


class TokenAccuracy(NamedTuple):
    """Per item: the fraction of target tokens the model predicts, and its argmax token ids at the target positions."""

    accuracies: list[float]
    predictions: list[list[int]]


@dataclass(frozen=True)
class LocalityReference:
    """The pre-edit model's argmax tokens on each request's locality pair (None for a request without one).

    Made by `locality_reference` before an in-place edit. `pairs` holds the (prompt, answer) pairs it was computed
    on, so that `evaluate` can refuse a reference made for other requests.
    """

    pairs: tuple[tuple[str, str] | None, ...]
    predictions: tuple[tuple[int, ...] | None, ...]


@dataclass
class EditMetrics:
    """Edit quality as fractions in [0, 1].

    Each metric is the mean over the requests that have its probe (None when none has): Generality needs a
    `rephrase`, Locality a `locality_prompt`. `per_request[i]` holds request i's three values (None where absent).
    """

    reliability: float
    generality: float | None
    locality: float | None
    per_request: list[dict[str, float | None]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def as_percent(self) -> dict[str, float | None]:
        """The three means in percent, as papers report them."""
        return {name: None if (value := getattr(self, name)) is None else 100.0 * value for name in METRICS}


@contextmanager
def module_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Training or eval mode for the duration, then each submodule's own previous mode.

    `model.train(was_training)` would not restore it: it sets one flag on every submodule, so a submodule a trainer
    keeps in eval mode (a frozen part, a reference copy) would come back in training mode.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def padded(sequences: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token id lists padded to one width, on the right (or the left, for generation,
    where every row must end at the last column)."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(sequences):
        columns = slice(width - len(ids), width) if left else slice(0, len(ids))
        input_ids[row, columns] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, columns] = 1
    return input_ids, attention_mask


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """`text`'s ids as the model reads them: with any special tokens the tokenizer puts in front (a BOS), without
    those it appends (an EOS is no part of an answer; scored, it would count predicting end-of-text after it)."""
    ids = tokenizer(text)["input_ids"]
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    for start in range(len(ids) - len(plain) + 1):
        if ids[start : start + len(plain)] == plain:
            return ids[: start + len(plain)]
    return ids


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], targets: Sequence[str]
) -> list[tuple[list[int], int]]:
    """Per pair, the ids of `prompt + " " + target` and the number of them that belong to the prompt.

    The prompt is tokenized alone; its token count marks where the target starts in the full text. That is how
    EasyEdit counts, and it is exact when the prompt's tokens are a prefix of the full text's. A tokenizer may merge
    across the joining space instead (e.g. one that keeps a trailing space or punctuation with the next word); then
    the boundary is off by the merged tokens, and a warning says for how many pairs the count was used that way.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"Got {len(prompts)} prompts but {len(targets)} targets")
    encoded, misaligned = [], 0
    for prompt, target in zip(prompts, targets):
        if not prompt.strip() or not target.strip():
            raise ValueError(f"Empty prompt or target in the pair ({prompt!r}, {target!r})")
        prompt_ids = encode_text(tokenizer, prompt)
        ids = encode_text(tokenizer, f"{prompt} {target}")
        if not prompt_ids:
            raise ValueError(f"The prompt {prompt!r} tokenizes to nothing: no position predicts the target's start")
        if len(ids) <= len(prompt_ids):
            raise ValueError(f"The target {target!r} of the prompt {prompt!r} tokenizes to no tokens after the prompt")
        misaligned += ids[: len(prompt_ids)] != prompt_ids
        encoded.append((ids, len(prompt_ids)))
    if misaligned:
        warnings.warn(
            f"For {misaligned} of {len(encoded)} pairs the prompt's tokens are not a prefix of the tokens of "
            "prompt + ' ' + target; their target is taken to start after the prompt's token count, as in EasyEdit",
            stacklevel=3,
        )
    return encoded


def check_lengths(model: nn.Module, encoded: list[tuple[list[int], int]], prompts: Sequence[str]) -> None:
    """Refuse pairs longer than the model's positions (`config.max_position_embeddings`), naming the prompt: a
    model would fail on them with an index error deep in its embedding."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    for (ids, _), prompt in zip(encoded, prompts):
        if len(ids) > limit:
            raise ValueError(f"the prompt {prompt[:60]!r}… with its answer is {len(ids)} tokens long, more than the "
                             f"model's {limit} positions")


def _argmax_at_targets(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, encoded: list[tuple[list[int], int]], batch_size: int
) -> list[list[int]]:
    """The model's argmax token at each target position of each encoded pair, in batches.

    Batches are always padded on the right, whatever `tokenizer.padding_side`: a causal LM then sees each sequence
    at the same positions as unpadded, so no position ids need passing (left padding would shift absolute position
    embeddings unless they were), and its causal mask already hides the padding that follows the real tokens (the
    attention mask goes along for models that use it otherwise). Pairs are batched in order of length so that
    batches waste little padding.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out: any id will do
    device = next(model.parameters(), torch.empty(0)).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    predictions: list[list[int]] = [[] for _ in encoded]
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        input_ids, attention_mask = padded([encoded[i][0] for i in batch], pad_id)
        output = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
        logits = output if isinstance(output, torch.Tensor) else output.logits
        argmax = logits.argmax(dim=-1).cpu()
        for row, i in enumerate(batch):
            ids, n_prompt = encoded[i]
            # Position p predicts token p + 1: the target tokens ids[n_prompt:] are predicted at n_prompt - 1 onward.
            predictions[i] = argmax[row, n_prompt - 1 : len(ids) - 1].tolist()
    return predictions


def target_token_accuracy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 16,
) -> TokenAccuracy:
    """Teacher-forced token accuracy of `model` on each (prompt, target) pair, with its argmax tokens.

    Runs in eval mode and restores each submodule's mode afterwards, so the edit loop can call it between training
    steps. It uses `torch.no_grad()` rather than `torch.inference_mode()` for the same reason: a buffer a module
    rebuilds lazily in the forward pass (e.g. a dynamic RoPE's `inv_freq`) would otherwise become an inference
    tensor that a later backward pass cannot use.
    """
    check_value("target_token_accuracy", "batch_size", batch_size, "positive_int")
    encoded = encode_pairs(tokenizer, prompts, targets)
    if not encoded:
        return TokenAccuracy([], [])
    check_lengths(model, encoded, prompts)
    with module_mode(model, training=False), torch.no_grad():
        predictions = _argmax_at_targets(model, tokenizer, encoded, batch_size)
    accuracies = [
        sum(p == t for p, t in zip(pred, ids[n_prompt:])) / len(pred)
        for pred, (ids, n_prompt) in zip(predictions, encoded)
    ]
    return TokenAccuracy(accuracies, predictions)


def _locality_pairs(requests: Sequence[EditRequest]) -> tuple[tuple[str, str] | None, ...]:
    return tuple(None if r.locality_prompt is None else (r.locality_prompt, r.locality_answer) for r in requests)


def _scatter(values: Iterable[Any], present: Sequence[bool]) -> list[Any]:
    """`values` (one per present item) spread over all items, None where an item is absent."""
    it = iter(values)
    return [next(it) if p else None for p in present]


def locality_reference(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest | Mapping[str, Any]],
    batch_size: int = 16,
) -> LocalityReference:
    """The pre-edit argmax tokens Locality compares against: call it on the model before editing it in place."""
    pairs = _locality_pairs(as_requests(requests, "locality_reference"))
    present = [pair for pair in pairs if pair is not None]
    result = target_token_accuracy(model, tokenizer, [p for p, _ in present], [a for _, a in present], batch_size)
    predictions = _scatter((tuple(p) for p in result.predictions), [pair is not None for pair in pairs])
    return LocalityReference(pairs, tuple(predictions))


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest | Mapping[str, Any]],
    reference_model: nn.Module | None = None,
    *,
    reference: LocalityReference | None = None,
    batch_size: int = 16,
) -> EditMetrics:
    """Reliability, Generality and Locality of the edited `model` on `requests`.

    Locality needs the pre-edit model's predictions, taken from the first of: `reference` (from
    `locality_reference` on the model before an in-place edit), `reference_model` (the pre-edit model), or `model`
    itself with its adapter disabled when it is a `PeftModel`. Without any of these, requests with a locality probe
    are an error.
    """
    requests = as_requests(requests, "evaluate")
    if reference is not None and reference_model is not None:
        raise ValueError("Pass either reference_model or reference, not both")
    pairs = _locality_pairs(requests)
    if reference is not None and reference.pairs != pairs:
        raise ValueError("reference was computed on other requests: its locality prompts and answers differ")
    if reference is None and any(pairs):
        if reference_model is not None:
            reference = locality_reference(reference_model, tokenizer, requests, batch_size)
        elif isinstance(model, PeftModel):
            with model.disable_adapter():
                reference = locality_reference(model, tokenizer, requests, batch_size)
        else:
            raise ValueError(
                "Locality compares against the pre-edit model: pass reference_model, or reference="
                "locality_reference(model, tokenizer, requests) computed before editing, or evaluate a PeftModel "
                "(its adapter is then disabled to get the pre-edit predictions)"
            )

    reliability = target_token_accuracy(
        model, tokenizer, [r.prompt for r in requests], [r.target_new for r in requests], batch_size
    ).accuracies
    has_rephrase = [r.rephrase is not None for r in requests]
    with_rephrase = [r for r in requests if r.rephrase is not None]
    generality = _scatter(
        target_token_accuracy(
            model, tokenizer, [r.rephrase for r in with_rephrase], [r.target_new for r in with_rephrase], batch_size
        ).accuracies,
        has_rephrase,
    )
    locality: list[float | None] = [None] * len(requests)
    if reference is not None and any(pairs):
        present = [pair for pair in pairs if pair is not None]
        after = target_token_accuracy(
            model, tokenizer, [p for p, _ in present], [a for _, a in present], batch_size
        ).predictions
        before = [tuple(p) for p in reference.predictions if p is not None]
        scores = []
        for now, then in zip(after, before):
            if len(now) != len(then):
                raise ValueError("reference has another number of locality tokens: made with another tokenizer?")
            scores.append(sum(a == b for a, b in zip(now, then)) / len(now))
        locality = _scatter(scores, [pair is not None for pair in pairs])

    def mean(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return sum(present) / len(present) if present else None

    per_request = [
        {"reliability": r, "generality": g, "locality": loc} for r, g, loc in zip(reliability, generality, locality)
    ]
    return EditMetrics(
        reliability=sum(reliability) / len(reliability),
        generality=mean(generality),
        locality=mean(locality),
        per_request=per_request,
    )
