"""What ROME, MEMIT and AlphaEdit share: finding the MLPs, the keys at the subject's last token, the target values.

The three methods treat the MLP down-projection of a decoder layer as a linear associative memory `v = W k`: its
input `k` (the gated activation, `act(gate(x)) * up(x)`) is the key, its output `v` the value written into the
residual stream. An edit makes the key of the subject's last token map to a value that makes the model say the new
target. This module finds the down-projections of any LLaMA-like causal LM (`model.model.layers[i].mlp.down_proj`),
reads keys and layer outputs at the subject's last token, averaged over a few context prefixes (ROME §3.1, MEMIT
§4.2), and optimises the residual-stream change `delta` at one layer that makes the target likely (ROME Eq. 4, MEMIT
Eq. 16): the target's negative log-likelihood over the contexts, plus a KL term that keeps the model's idea of the
subject ("{subject} is a") where it was, plus a weight decay on `delta`, with `delta` clamped to a multiple of the
norm of the hidden state it is added to. Adding `delta` to the down-projection's output at layer L is the same as
adding it to layer L's output, so ROME's value (`v* = W k* + delta`) and MEMIT's target (`z = h^L + delta`) come from
the same optimisation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from harness import EditRequest, padded
from harness import encode_text as encode
from torch import nn
from transformers import PreTrainedTokenizerBase

# ROME's prefixes start from these words; the model writes the rest (seeded), so keys and values generalise over
# the text in front of the prompt.
CONTEXT_STARTS = ("The", "Therefore", "Because", "I", "You")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a LLaMA-like causal LM (`model.model.layers`)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no `model.layers`: ROME/MEMIT/AlphaEdit need a LLaMA-like LM")
    return layers


def down_proj(model: nn.Module, layer: int) -> nn.Linear:
    """The MLP down-projection of decoder layer `layer`: its input is the key, its output the value."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} is out of range: the model has {len(layers)} layers")
    module = getattr(getattr(layers[layer], "mlp", None), "down_proj", None)
    if not isinstance(module, nn.Linear):
        raise ValueError(f"layer {layer} has no `mlp.down_proj` linear layer")
    return module


def check_subjects(requests: Sequence[EditRequest]) -> None:
    """Refuse requests without a subject: locate-then-edit methods write at the subject's last token."""
    for i, request in enumerate(requests):
        if request.subject is None:
            raise ValueError(f"request {i} ({request.prompt!r} -> {request.target_new!r}) has no subject; ROME, "
                             "MEMIT and AlphaEdit edit at the subject's last token and need one")


def context_templates(model: nn.Module, tokenizer: PreTrainedTokenizerBase, count: int, length: int,
                      seed: int) -> list[str]:
    """`"{}"` plus `count` model-written prefixes of `length` tokens, each ending in `". {}"` (ROME's templates)."""
    generator = torch.Generator().manual_seed(seed)
    templates = ["{}"]
    for i in range(count):
        ids = encode(tokenizer, CONTEXT_STARTS[i % len(CONTEXT_STARTS)])
        with torch.no_grad():
            for _ in range(length):
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]  # (vocab,)
                top = logits.topk(5)
                ids.append(int(top.indices[torch.multinomial(top.values.softmax(-1), 1, generator=generator)]))
        text = tokenizer.decode(ids, skip_special_tokens=True).replace("{", " ").replace("}", " ").strip()
        templates.append(f"{text}. {{}}")
    return templates


@dataclass(frozen=True)
class Batch:
    """Right-padded token ids with a mask, and per row the position of the subject's last token."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def build(cls, sequences: Sequence[list[int]], positions: Sequence[int], pad_id: int) -> Batch:
        input_ids, mask = padded(sequences, pad_id)
        return cls(input_ids, mask, torch.tensor(list(positions)))


def subject_sequence(tokenizer: PreTrainedTokenizerBase, prompt: str, subject: str,
                     continuation: str = "") -> tuple[list[int], int]:
    """The ids of `prompt + continuation` and the index of the last token of the subject's last occurrence in
    `prompt`.

    The index is the token count of the prompt up to the subject's end, less one (how ROME finds it); it is exact
    when that prefix tokenizes as a prefix of the whole text, which holds at a word boundary.
    """
    end = prompt.rindex(subject) + len(subject)
    return encode(tokenizer, prompt + continuation), len(encode(tokenizer, prompt[:end])) - 1


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used for padding (masked out, so any id will do)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def read_at_subject(model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest],
                    templates: Sequence[str], key_layer: int, output_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per request, the key of `key_layer` and the output of `output_layer` at the subject's last token, averaged
    over the templates applied to the prompt: shapes (n, d_ff) and (n, d_model)."""
    sequences, positions = [], []
    for request in requests:
        for template in templates:
            ids, position = subject_sequence(tokenizer, template.format(request.prompt), request.subject)
            sequences.append(ids)
            positions.append(position)
    batch = Batch.build(sequences, positions, pad_id(tokenizer))
    # The forward pass ends at whichever of the two is read last.
    key, out = Capture(stop=key_layer > output_layer), Capture(stop=output_layer >= key_layer)
    hooks = [down_proj(model, key_layer).register_forward_pre_hook(key),
             decoder_layers(model)[output_layer].register_forward_hook(out)]
    try:
        with torch.no_grad(), contextlib.suppress(StopForward):
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        for hook in hooks:
            hook.remove()
    rows = torch.arange(len(sequences))
    keys = key.value[rows, batch.positions].view(len(requests), len(templates), -1)  # (n, T, d_ff)
    outputs = out.value[rows, batch.positions].view(len(requests), len(templates), -1)  # (n, T, d_model)
    return keys.mean(1), outputs.mean(1)


@dataclass(frozen=True)
class ValueSettings:
    """The target-value optimisation (ROME Eq. 4 / MEMIT Eq. 16).

    Args:
        steps: Adam steps at most.
        lr: Adam's learning rate on `delta`.
        kl_factor: Weight of KL(p_before || p_after) on the next token after "{subject} is a".
        weight_decay: Weight of ||delta||² / ||h||², h the hidden state `delta` is added to.
        clamp_norm_factor: ||delta|| is kept at most this multiple of ||h||.
        stop_nll: Stop once the mean target negative log-likelihood is below this.
    """

    steps: int = 25
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    stop_nll: float = 0.05


@dataclass(frozen=True)
class ValueResult:
    """The optimised `delta` (d_model,), the target NLL it reaches and the Adam steps taken."""

    delta: torch.Tensor
    nll: float
    steps: int


class DeltaAtSubject:
    """A forward hook on a down-projection that adds `delta` to its output at each row's subject position."""

    def __init__(self, delta: torch.Tensor, positions: torch.Tensor) -> None:
        self.delta = delta
        self.positions = positions

    def __call__(self, _module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(output.shape[0])
        shift = torch.zeros_like(output)  # (B, S, d_model)
        shift[rows, self.positions] = self.delta.to(output.dtype)
        return output + shift


def optimise_value(model: nn.Module, tokenizer: PreTrainedTokenizerBase, layer: int, request: EditRequest,
                   templates: Sequence[str], settings: ValueSettings) -> ValueResult:
    """The change `delta` of layer `layer`'s output at the subject's last token that makes `request.target_new`
    follow the prompt (in every template) while the subject's "is a" distribution stays put.

    The target is scored as the metrics score it: the tokens of `prompt + " " + target_new` after the prompt's.
    Only `delta` is optimised; the model's weights are left untouched.
    """
    sequences, positions, spans = [], [], []
    for template in templates:
        prompt = template.format(request.prompt)
        ids, position = subject_sequence(tokenizer, prompt, request.subject, f" {request.target_new}")
        n_prompt = len(encode(tokenizer, prompt))
        if len(ids) <= n_prompt:
            raise ValueError(f"the target {request.target_new!r} adds no tokens after {prompt!r}")
        sequences.append(ids)
        positions.append(position)
        spans.append((n_prompt, len(ids)))
    kl_ids, kl_position = subject_sequence(tokenizer, f"{request.subject} is a", request.subject)
    sequences.append(kl_ids)
    positions.append(kl_position)
    batch = Batch.build(sequences, positions, pad_id(tokenizer))
    # Row r's target tokens ids[a:b] are predicted at positions a-1 .. b-2.
    rows = torch.cat([torch.full((b - a,), r) for r, (a, b) in enumerate(spans)])
    predict_at = torch.cat([torch.arange(a - 1, b - 1) for a, b in spans])
    targets = batch.input_ids[rows, predict_at + 1]

    # The logits are needed at the target positions and the KL prompt's last position only.
    read_rows = torch.cat([rows, torch.tensor([len(sequences) - 1])])
    read_at = torch.cat([predict_at, torch.tensor([len(kl_ids) - 1])])
    lengths = torch.tensor([b - a for a, b in spans], dtype=torch.float32)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    hidden = Capture()
    delta = torch.zeros(head.weight.shape[1], requires_grad=True)
    hooks = [decoder_layers(model)[layer].register_forward_hook(hidden),
             down_proj(model, layer).register_forward_hook(DeltaAtSubject(delta, batch.positions))]
    requires_grad = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        optimiser = torch.optim.Adam([delta], lr=settings.lr)
        nll_value, steps, kl_before, h_norm = float("inf"), 0, None, None
        while True:
            with torch.enable_grad():
                states = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
                logits = head(states[read_rows, read_at]).float()  # (target tokens + 1, vocab)
                log_probs = logits[:-1].log_softmax(-1).gather(1, targets[:, None])[:, 0]  # (target tokens,)
                # Mean NLL per template, then over templates (each counts once whatever its target's length).
                nll = (torch.zeros(len(spans)).index_add(0, rows, -log_probs) / lengths).mean()
                kl_log_probs = logits[-1].log_softmax(-1)  # (vocab,)
                if kl_before is None:
                    # First pass, delta = 0: the distribution to keep and the norm of h, layer `layer`'s output
                    # at the bare prompt's subject position.
                    kl_before = kl_log_probs.detach()
                    h_norm = hidden.value[0, batch.positions[0]].norm()
                nll_value = nll.item()
                if nll_value < settings.stop_nll or steps == settings.steps:
                    break
                kl = torch.nn.functional.kl_div(kl_log_probs, kl_before, log_target=True, reduction="sum")
                loss = nll + settings.kl_factor * kl + settings.weight_decay * delta.norm() ** 2 / h_norm**2
                optimiser.zero_grad()
                loss.backward()
            optimiser.step()
            steps += 1
            with torch.no_grad():
                limit = settings.clamp_norm_factor * h_norm
                if delta.norm() > limit:
                    delta.mul_(limit / delta.norm())
    finally:
        for hook in hooks:
            hook.remove()
        for p, flag in zip(model.parameters(), requires_grad):
            p.requires_grad_(flag)
    return ValueResult(delta.detach().clone(), nll_value, steps)


class StopForward(Exception):
    """Raised by a `Capture(stop=True)` hook to end a forward pass once the layers of interest have run."""


class Capture:
    """A hook that keeps what a module saw: registered as a forward pre-hook, its (first) input; as a forward
    hook, its output (the hidden states of a layer that returns a tuple). With `stop`, it then ends the forward pass
    by raising `StopForward`."""

    def __init__(self, stop: bool = False) -> None:
        self.stop = stop
        self.value: torch.Tensor | None = None

    def __call__(self, _module: nn.Module, args: tuple, output: torch.Tensor | tuple | None = None) -> None:
        value = args[0] if output is None else output
        self.value = (value[0] if isinstance(value, tuple) else value).detach()
        if self.stop:
            raise StopForward
