"""An output anchor: the model's next-token distributions on text it wrote itself, taken before an edit, so that
core-value training can hold them (a KL term) without the user supplying any locality data."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..evaluation.metrics import module_mode


class OutputAnchor:
    """`count` texts of `length` tokens sampled from the model itself (seeded) from its beginning-of-text token (the
    end-of-text or pad token where it has none), and its log-probabilities on them (`(count, tokens − 1, vocab)`,
    stored in bfloat16).

    `kl(logits)` is the mean per-token KL(anchor ‖ now) of logits the model gives now on `input_ids`: zero for the
    model the anchor was taken from, and larger the more its outputs on unrelated text moved. `next_rows()` hands
    out `per_step` of the texts at a time, cycling through all of them, so that a training step can hold a part of
    the anchor at a fraction of the cost (`kl(logits, rows)`).

    With `prefixes` (e.g. the edit's prompts), text i starts from the first `PREFIX_TOKENS` tokens of prefix
    i mod len(prefixes) after the start token: text in the user's own register rather than from nothing.
    """

    PREFIX_TOKENS = 2

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, count: int, length: int,
                 seed: int, per_step: int | None = None, prefixes: Sequence[str] | None = None) -> None:
        self.per_step = min(per_step or count, count)
        self.cursor = 0  # the first text of the next step's rows
        start = next((t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
                      if t is not None), None)
        if start is None:
            raise ValueError("an output anchor samples text from the beginning-of-text token, and this tokenizer "
                             "has no BOS, EOS or pad token; set EditArguments.preserve_weight=0")
        device = next(model.parameters()).device
        with module_mode(model, training=False), torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            prompt = torch.full((count, 1), start, dtype=torch.long, device=device)
            if prefixes:
                prompt = torch.cat([prompt, self._prefix_ids(tokenizer, prefixes, count).to(device)], dim=1)
            texts = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                   top_k=0, max_new_tokens=length, min_new_tokens=length,
                                   pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                   else start)
            self.input_ids = texts[:, : prompt.shape[1] + length]  # (count, start [+ prefix] + length)
            logits = model(input_ids=self.input_ids).logits[:, :-1]
            self.log_probs = F.log_softmax(logits.float(), dim=-1).to(torch.bfloat16)

    @classmethod
    def _prefix_ids(cls, tokenizer: PreTrainedTokenizerBase, prefixes: Sequence[str], count: int) -> torch.Tensor:
        """(count, p): the first p ≤ PREFIX_TOKENS tokens of each prefix, cycling; p is the shortest's length."""
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prefixes]
        p = min(cls.PREFIX_TOKENS, *map(len, ids))
        if p == 0:
            raise ValueError("an output anchor from prompts needs every prompt to hold at least one token")
        return torch.tensor([ids[i % len(ids)][:p] for i in range(count)], dtype=torch.long)

    def next_rows(self) -> torch.Tensor:
        """The indices of the next `per_step` texts (wrapping around), for one training step."""
        count = self.input_ids.shape[0]
        rows = torch.arange(self.cursor, self.cursor + self.per_step) % count
        self.cursor = (self.cursor + self.per_step) % count
        return rows

    def kl(self, logits: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Mean per-token KL(anchor ‖ now) for `logits` (rows, length + 1, vocab) on `input_ids[rows]` (all texts
        when `rows` is None)."""
        now = F.log_softmax(logits[:, :-1].float(), dim=-1)
        anchor = (self.log_probs if rows is None else self.log_probs[rows.to(self.log_probs.device)]).float()
        return (anchor.exp() * (anchor - now)).sum(-1).mean()
