"""Scoring an edited model against the unedited one: teacher-forced, by generated answers, and a capability probe.

Per request (values in percent, one per request so that intervals can resample requests):

- `reliability`, `generality`, `locality`: EasyEdit's teacher-forced token accuracy (`dft_peft.evaluate`), locality
  against the unedited model's argmax tokens (`locality_reference`, taken once).
- `gen_reliability`, `gen_generality`: 100 when the model's greedy answer to the prompt / rephrase *matches* the new
  target, else 0. An answer is generated for at most (target tokens + `ANSWER_SLACK`) new tokens and cut as
  `generate_old_answers` cuts (first line break or sentence end). Both texts are normalised (Unicode NFKC, lower
  case, every run of characters other than letters and digits becomes one space); the answer matches when its words
  begin with all of the target's words: "Paris, France" matches "Paris"; "Parisian" does not.
- `gen_locality`: 100 when the greedy answer to the locality prompt equals (after normalisation) the unedited model's
  answer to it, generated once with the same token budget, else 0.

Per probe text (`capability`): the mean over the text's predicted tokens of KL(unedited ‖ edited) in nats, and
`nll_change`: the mean change of the tokens' negative log-likelihood (edited − unedited), whose mean over texts m
gives the perplexity change 100·(exp(m) − 1) %. The unedited model's log-probabilities are computed once (stored in
float16) and reused.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from harness import EditRequest, evaluate, locality_reference, module_mode, padded
from torch import nn
from transformers import PreTrainedTokenizerBase

ANSWER_SLACK = 2
GEN_BATCH_SIZE = 32
EVAL_BATCH_SIZE = 16
CUT = re.compile(r"\n|(?<=\w)[.;!?](?:\s|$)")  # generate_old_answers' cut: first line break or sentence end
NON_WORD = re.compile(r"[^\w]+|_+")
RATE_METRICS = ("reliability", "generality", "locality", "gen_reliability", "gen_generality", "gen_locality")
PROBE_METRICS = ("capability", "nll_change")


def cut_answer(text: str) -> str:
    """A generated continuation cut as `generate_old_answers` cuts it: at the first line break or sentence end."""
    return CUT.split(text.strip(), maxsplit=1)[0].strip()


def words(text: str) -> list[str]:
    """`text` normalised to words: NFKC, lower case, split at every run of characters other than letters/digits."""
    return NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).split()


def matches(answer: str, target: str) -> bool:
    """Whether the answer's normalised words begin with all of the target's (see the module docstring)."""
    wanted = words(target)
    return bool(wanted) and words(answer)[: len(wanted)] == wanted


def unchanged(answer: str, reference: str) -> bool:
    """Whether two answers are equal after normalisation."""
    return words(answer) == words(reference)


def answer_budget(tokenizer: PreTrainedTokenizerBase, target: str) -> int:
    """New tokens generated for an answer that should be `target`: its token count plus `ANSWER_SLACK`."""
    return len(tokenizer(" " + target, add_special_tokens=False)["input_ids"]) + ANSWER_SLACK


def greedy_answers(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                   budgets: Sequence[int], batch_size: int = GEN_BATCH_SIZE) -> list[str]:
    """Each prompt's greedy continuation of at most its budget of new tokens, cut by `cut_answer`.

    Prompts are tokenized as `generate_old_answers` tokenizes them and generated in left-padded batches (with the
    attention mask), in order of length; each row is truncated to its own budget before decoding, so an answer does
    not depend on the batch it fell in (up to float rounding).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    answers = [""] * len(prompts)
    with module_mode(model, training=False), torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            input_ids, attention_mask = padded([encoded[i] for i in batch], pad, left=True)
            width = input_ids.shape[1]
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 max_new_tokens=max(budgets[i] for i in batch), do_sample=False, pad_token_id=pad)
            for row, i in enumerate(batch):
                new = out[row, width : width + budgets[i]]
                answers[i] = cut_answer(tokenizer.decode(new, skip_special_tokens=True))
    return answers


class CapabilityProbe:
    """KL(unedited ‖ edited) and the NLL change on fixed neutral texts (see the module docstring)."""

    def __init__(self, unedited: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                 batch_size: int = EVAL_BATCH_SIZE) -> None:
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.ids = [tokenizer(t)["input_ids"] for t in texts]
        self.reference = [lp.half() for lp in self.log_probs(unedited)]
        self.reference_nll = [self.nll(lp, ids) for lp, ids in zip(self.reference, self.ids)]

    def log_probs(self, model: nn.Module) -> Iterator[torch.Tensor]:
        """Per text in order, the model's log-probabilities at each position that predicts a next token of it
        (one batch of texts in memory at a time)."""
        pad = self.tokenizer.pad_token_id or 0
        device = next(model.parameters()).device
        with module_mode(model, training=False), torch.no_grad():
            for start in range(0, len(self.ids), self.batch_size):
                rows = self.ids[start : start + self.batch_size]
                input_ids, attention_mask = padded(rows, pad)
                output = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
                logits = output.logits.float().cpu()
                for r, ids in enumerate(rows):
                    yield F.log_softmax(logits[r, : len(ids) - 1], dim=-1)

    @staticmethod
    def nll(log_probs: torch.Tensor, ids: list[int]) -> float:
        """Mean negative log-likelihood of the text's tokens after the first."""
        return float(-log_probs.float().gather(1, torch.tensor(ids[1:])[:, None]).mean())

    def __call__(self, model: nn.Module) -> dict[str, list[float]]:
        kl, nll_change = [], []
        for lp, ref, ids, ref_nll in zip(self.log_probs(model), self.reference, self.ids, self.reference_nll):
            ref = ref.float()
            kl.append(float((ref.exp() * (ref - lp)).sum(-1).mean()))
            nll_change.append(self.nll(lp, ids) - ref_nll)
        return {"capability": kl, "nll_change": nll_change}


class Scorer:
    """Scores models edited from `unedited` on fixed requests and probe texts; the unedited model's locality tokens,
    locality answers and probe log-probabilities are computed once, here."""

    def __init__(self, unedited: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest],
                 texts: Sequence[str]) -> None:
        if any(r.rephrase is None or r.locality_prompt is None for r in requests):
            raise ValueError("the benchmark scores requests with a rephrase and a locality probe only")
        self.tokenizer = tokenizer
        self.requests = list(requests)
        self.reference = locality_reference(unedited, tokenizer, self.requests, EVAL_BATCH_SIZE)
        self.target_budgets = [answer_budget(tokenizer, r.target_new) for r in self.requests]
        self.locality_budgets = [answer_budget(tokenizer, r.locality_answer) for r in self.requests]
        self.locality_answers = greedy_answers(unedited, tokenizer, [r.locality_prompt for r in self.requests],
                                               self.locality_budgets)
        self.probe = CapabilityProbe(unedited, tokenizer, texts)

    def __call__(self, model: nn.Module, retained: Sequence[int] | None = None,
                 local: Sequence[int] | None = None) -> dict[str, list[float]]:
        """Per-unit values of every metric: reliability and generality (both scorings) on the requests at indices
        `retained`, locality (both scorings) on those at `local` (both default: all), the probe on its texts."""
        retained = range(len(self.requests)) if retained is None else retained
        local = range(len(self.requests)) if local is None else local
        union = sorted(set(retained) | set(local))
        position = {i: k for k, i in enumerate(union)}
        reference = dataclasses.replace(self.reference, pairs=tuple(self.reference.pairs[i] for i in union),
                                        predictions=tuple(self.reference.predictions[i] for i in union))
        metrics = evaluate(model, self.tokenizer, [self.requests[i] for i in union], reference=reference,
                           batch_size=EVAL_BATCH_SIZE).per_request
        scores = {name: [100.0 * metrics[position[i]][name] for i in retained] for name in ("reliability",
                                                                                         "generality")}
        scores["locality"] = [100.0 * metrics[position[i]]["locality"] for i in local]
        done = [self.requests[i] for i in retained]
        budgets = [self.target_budgets[i] for i in retained]
        answers = greedy_answers(model, self.tokenizer, [r.prompt for r in done] + [r.rephrase for r in done],
                                 budgets * 2)
        hits = [100.0 * matches(a, r.target_new) for a, r in zip(answers, done * 2)]
        scores["gen_reliability"], scores["gen_generality"] = hits[: len(done)], hits[len(done) :]
        answers = greedy_answers(model, self.tokenizer, [self.requests[i].locality_prompt for i in local],
                                 [self.locality_budgets[i] for i in local])
        scores["gen_locality"] = [100.0 * unchanged(a, self.locality_answers[i]) for a, i in zip(answers, local)]
        return {**scores, **self.probe(model)}
