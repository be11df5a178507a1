"""Conversations to training rows through the tokenizer's own chat template, with the loss on assistant turns.

Which tokens an assistant wrote is found from the template itself, for any template (with or without
``{% generation %}`` markers): the conversation is rendered up to each assistant turn with the generation prompt, and
up to the end of that turn; the characters between the two renderings are the turn (its content and the template's
end-of-turn marker, which the model must learn to emit). The whole conversation is then tokenized once, and a token is
trained on when its characters fall inside an assistant turn. A template that rewrites earlier turns when a later one
is added (so that the renderings are not prefixes of each other) is refused for that row, naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lightning_qlora.app.data.jsonl import DataFormatError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
TrainOn = Literal["assistant", "all"]


class RowError(DataFormatError):
    """One row cannot be used; ``reason`` is its kind (counted in the data report), the message names the row."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Conversation:
    """One training row: chat ``messages`` (``role`` and ``content``), optional ``tools``, where it came from."""

    messages: list[dict[str, Any]]
    source: str = ""
    tools: list[dict[str, Any]] | None = None

    @property
    def prompt_messages(self) -> list[dict[str, Any]]:
        """The messages before the last assistant turn: what a model is asked when it is tested on this row."""
        last = max((i for i, m in enumerate(self.messages) if m["role"] == "assistant"), default=len(self.messages))
        return self.messages[:last]

    @property
    def reference(self) -> str:
        """The last assistant turn's content."""
        answers = [m["content"] for m in self.messages if m["role"] == "assistant"]
        return str(answers[-1]) if answers else ""


def check_messages(messages: Any, source: str) -> list[dict[str, Any]]:
    """The row's messages, checked: a list of ``{"role", "content"}`` with known roles, non-empty content and at least
    one assistant turn.

    Raises:
        RowError: naming ``source`` and the message at fault (``reason``: ``format``, ``unknown role``, ``empty
            content`` or ``no assistant turn``).
    """
    if not isinstance(messages, list) or not messages:
        raise RowError(f"{source}: 'messages' must be a non-empty list of {{'role', 'content'}}, got {messages!r}.",
                       "format")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise RowError(f"{source}: message {i} must be an object with 'role' and 'content', got {message!r}.",
                           "format")
        role = message["role"]
        if role not in ROLES:
            raise RowError(f"{source}: message {i} has role {role!r}; the roles are {list(ROLES)}.", "unknown role")
        content = message.get("content")
        has_calls = bool(message.get("tool_calls"))
        if not has_calls and (not isinstance(content, str) or not content.strip()):
            raise RowError(f"{source}: message {i} ({role}) has empty content ({content!r}).", "empty content")
        checked.append({k: v for k, v in message.items() if v is not None})
    if not any(m["role"] == "assistant" for m in checked):
        raise RowError(f"{source}: no assistant turn: nothing to learn from this row.", "no assistant turn")
    return checked


@dataclass
class TokenizedRow:
    """Token ids and labels (``-100`` where no loss is taken); ``truncated`` when cut at the length budget."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


def render(
    tokenizer: Any, messages: Sequence[dict[str, Any]], tools: Any = None, generation_prompt: bool = False
) -> str:
    """The chat template's text for ``messages`` (no tokenization)."""
    kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": generation_prompt}
    if tools:
        kwargs["tools"] = tools
    return str(tokenizer.apply_chat_template(list(messages), **kwargs))


def assistant_spans(tokenizer: Any, conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    Raises:
        RowError: when the template fails on the row's roles, or rewrites earlier turns as later ones are added
            (reason ``template``).
    """
    messages, where = conversation.messages, conversation.source
    try:
        full = render(tokenizer, messages, conversation.tools)
    except Exception as err:  # jinja's TemplateError and whatever a template raises itself
        roles = [m["role"] for m in messages]
        raise RowError(f"{where}: the chat template cannot render roles {roles}: {err}", "template") from None
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            before = render(tokenizer, messages[:i], conversation.tools, generation_prompt=True) if i else ""
            through = render(tokenizer, messages[: i + 1], conversation.tools)
        except Exception as err:
            raise RowError(f"{where}: the chat template cannot render the turns before message {i}: {err}",
                           "template") from None
        # A template may end a rendering with whitespace it drops when more follows; compare without it.
        through = through.rstrip() if not full.startswith(through) else through
        if not (full.startswith(through) and through.startswith(before)):
            raise RowError(
                f"{where}: the chat template renders the conversation differently once later turns are added (turn "
                f"{i} is not a prefix of the whole), so its assistant tokens cannot be told apart. Use "
                "data.train_on=all, or a template that keeps earlier turns as they are.",
                "template",
            )
        # The turn's content and the end-of-turn marker the model must learn to emit; not the template's line break
        # after it, which generation never reaches.
        spans.append((len(before), len(through.rstrip())))
    return full, spans


def tokenize_conversation(
    tokenizer: Any, conversation: Conversation, max_length: int, train_on: TrainOn = "assistant"
) -> TokenizedRow:
    """Token ids and labels for one conversation; labels are the ids on assistant turns (everywhere with
    ``train_on="all"``), ``-100`` elsewhere. Rows longer than ``max_length`` are cut there.
    """
    if getattr(tokenizer, "chat_template", None):
        text, spans = assistant_spans(tokenizer, conversation)
    else:
        text, spans = _plain_render(conversation)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    if train_on == "all":
        labels = list(ids)
    else:
        labels = [
            tok if _overlaps(start, end, spans) else IGNORE_INDEX
            for tok, (start, end) in zip(ids, offsets, strict=True)
        ]
    truncated = len(ids) > max_length
    return TokenizedRow(ids[:max_length], labels[:max_length], truncated)


def tokenize_text(tokenizer: Any, text: str, max_length: int) -> TokenizedRow:
    """Plain text for continued pre-training: every token is trained on; BOS/EOS as the tokenizer adds them."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)  # a document ends: the model learns where
    return TokenizedRow(ids[:max_length], ids[:max_length], len(ids) > max_length)


def _overlaps(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    # Tokens of no characters (special tokens some tokenizers add) are never trained on.
    return end > start and any(start < span_end and end > span_start for span_start, span_end in spans)


_PLAIN_TURN = {"system": "{content}\n\n", "user": "### Instruction:\n{content}\n\n", "tool": "### Tool:\n{content}\n\n",
               "assistant": "### Response:\n{content}\n\n"}


def _plain_render(conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """A template for tokenizers without one (base models): Alpaca-style headers, the response after its header."""
    text, spans = "", []
    for message in conversation.messages:
        turn = _PLAIN_TURN[message["role"]].format(content=message.get("content") or "")
        if message["role"] == "assistant":
            header = "### Response:\n"
            spans.append((len(text) + len(header), len(text) + len(turn)))
        text += turn
    return text, spans
