"""An output anchor: the model's next-token distributions on text it wrote itself, taken before an edit, so that
core-value training can hold them (a KL term) without the user supplying any locality data."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..evaluation.metrics import module_mode


class OutputAnchor:
    """`count` texts of `length` tokens sampled from the model itself (seeded) from its beginning-of-text token (the
    end-of-text or pad token where it has none), and
    its log-probabilities on them (`(count, length, vocab)`, stored in bfloat16).

    `kl(logits)` is the mean per-token KL(anchor ‖ now) of logits the model gives now on `input_ids`: zero for the
    model the anchor was taken from, and larger the more its outputs on unrelated text moved. `next_rows()` hands
    out `per_step` of the texts at a time, cycling through all of them, so that a training step can hold a part of
    the anchor at a fraction of the cost (`kl(logits, rows)`).
    """

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, count: int, length: int,
                 seed: int, per_step: int | None = None) -> None:
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
            texts = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                   top_k=0, max_new_tokens=length, min_new_tokens=length,
                                   pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                   else start)
            self.input_ids = texts[:, : length + 1]  # (count, length + 1): the start token and the sample
            logits = model(input_ids=self.input_ids).logits[:, :-1]
            self.log_probs = F.log_softmax(logits.float(), dim=-1).to(torch.bfloat16)

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
