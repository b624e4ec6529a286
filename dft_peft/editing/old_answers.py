"""The model's own answers to the edit prompts: the old knowledge DFT locates, so that users supply only new facts."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..evaluation.metrics import module_mode

# Well-known facts, one per line, that put the model in the mode of answering with a short fact (`shots=True`).
EXAMPLE_FACTS = (
    ("The capital of France is", "Paris"),
    ("What is the largest planet of the solar system?", "Jupiter"),
    ("The author of Hamlet is", "William Shakespeare"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
)


def generate_old_answers(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int = 16,
    shots: bool = False,
) -> list[str]:
    """The model's own greedy answers: the old knowledge DFT locates (§4.1), so users supply only the new facts.

    The model continues each prompt as it is read in training and evaluation (`prompt + " " + answer`); a chat
    model that only ends its turn there is asked again through its chat template. The answer is cut at the first
    line break or sentence end. With `shots`, each prompt follows the `EXAMPLE_FACTS` lines, so that the answer
    comes as a short fact, in the form of the new answers, rather than as prose.
    """
    preamble = "".join(f"{p} {a}\n" for p, a in EXAMPLE_FACTS) if shots else ""
    with module_mode(model, training=False), torch.no_grad():
        answers = []
        for prompt in prompts:
            answer = _greedy(model, tokenizer, tokenizer(preamble + prompt, return_tensors="pt"), max_new_tokens)
            if not answer and getattr(tokenizer, "chat_template", None):
                chat = tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
                    return_dict=True,
                )
                answer = _greedy(model, tokenizer, chat, max_new_tokens)
            answers.append(answer)
    return answers


def _greedy(model: nn.Module, tokenizer: PreTrainedTokenizerBase, inputs: Mapping[str, torch.Tensor],
            max_new_tokens: int) -> str:
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return re.split(r"\n|(?<=\w)[.;!?](?:\s|$)", text.strip(), maxsplit=1)[0].strip()

