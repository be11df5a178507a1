"""Turn prompt/response pairs into causal-LM training rows with the prompt masked out of the loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lightning_qlora.app.data.examples import Example

IGNORE_INDEX = -100
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant who explains hacker jargon precisely."
_PLAIN_PROMPT = "### Instruction:\n{prompt}\n\n### Response:\n"


@dataclass
class TokenizedSplit:
    """Rows ready for the collator, plus what happened to the rows that did not fit."""

    rows: list[dict[str, list[int]]]
    truncated: int = 0
    dropped: int = 0


def prompt_text(tokenizer: Any, prompt: str, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> str:
    """The text the model sees before its answer: the chat template with the generation prompt, if it has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt}
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _PLAIN_PROMPT.format(prompt=prompt)


def conversation_prompt(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    """The text before the next assistant turn of ``messages``: the chat template with the generation prompt (a
    plain Alpaca-style rendering for tokenizers without a template).
    """
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    turns = [m["content"] for m in messages if m["role"] == "user"]
    return _PLAIN_PROMPT.format(prompt=turns[-1] if turns else "")


def tokenize_examples(
    tokenizer: Any, examples: list[Example], max_length: int, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
) -> TokenizedSplit:
    """Tokenize each example as ``prompt + response + end-of-turn``, with labels ``-100`` on the prompt.

    Rows longer than ``max_length`` are truncated (the end of the response is cut, and counted in ``truncated``);
    rows whose prompt alone leaves fewer than 8 response tokens are dropped (counted in ``dropped``).
    """
    split = TokenizedSplit(rows=[])
    end_of_turn = _end_of_turn(tokenizer)
    for example in examples:
        prompt = prompt_text(tokenizer, example.prompt, system_prompt)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"] + end_of_turn
        if len(prompt_ids) + 8 > max_length:
            split.dropped += 1
            continue
        ids = prompt_ids + response_ids
        if len(ids) > max_length:
            ids = ids[:max_length]
            split.truncated += 1
        labels = [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids) :]
        split.rows.append({"input_ids": ids, "labels": labels})
    return split


def collate(rows: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest row; padding is masked in ``attention_mask`` and ``labels``."""
    length = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _end_of_turn(tokenizer: Any) -> list[int]:
    # The chat template closes an assistant turn with the EOS token (e.g. <|im_end|>) and a newline; the model must
    # learn to emit EOS, or generation never stops.
    eos = tokenizer.eos_token_id
    return [eos] if eos is not None else []
