"""Training rows from the user's local files (JSONL, JSON, Parquet, CSV) through Hugging Face ``datasets``.

Three row formats, told apart by their columns (or named with ``data.format``):

- ``messages``: chat rows, ``{"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": ...}, ...]}``,
  multi-turn, with an optional ``tools`` column (ShareGPT's ``conversations`` with ``from``/``value`` is read too);
- ``instruction``: ``{"instruction": ..., "response": ...}`` (keys configurable; Alpaca's ``input`` and ``output``
  are understood), one user and one assistant turn;
- ``text``: ``{"text": ...}`` for continued pre-training, every token trained on.

Nothing is fetched: ``datasets`` reads the file with its packaged builders. A file it cannot parse is scanned line
by line (JSONL) to name the line at fault.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lightning_qlora.app.data.chat import Conversation, RowError, check_messages
from lightning_qlora.app.data.jsonl import DataFormatError

RowFormat = Literal["auto", "messages", "instruction", "text"]
FORMATS = ("auto", "messages", "instruction", "text")
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# ShareGPT's speaker names, as the roles of the chat format.
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                   "tool": "tool", "function_call": "assistant", "observation": "tool"}


@dataclass
class ColumnNames:
    """The columns each format reads (the defaults are the common names)."""

    messages: str = "messages"
    tools: str = "tools"
    prompt: str = "instruction"
    response: str = "response"
    input: str | None = "input"
    text: str = "text"


@dataclass
class LoadedRows:
    """What a file gave: the usable rows, and the rows skipped, by reason, with the first few places."""

    format: str
    conversations: list[Conversation] = field(default_factory=list)
    texts: list[tuple[str, str]] = field(default_factory=list)  # (text, source)
    skipped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, error: RowError) -> None:
        self.skipped[error.reason] += 1
        self.examples.setdefault(error.reason, [])
        if len(self.examples[error.reason]) < 3:
            self.examples[error.reason].append(str(error))

    def __len__(self) -> int:
        return len(self.conversations) + len(self.texts)


def read_table(path: str | os.PathLike) -> Any:
    """The file as a ``datasets.Dataset`` (its ``train`` split).

    Raises:
        DataFormatError: for a missing file, an unknown extension, or a file ``datasets`` cannot parse (with the line
            at fault for JSONL).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataFormatError(
            f"data.path={str(path)!r} does not exist. Expected a .jsonl, .json, .parquet or .csv file."
        )
    builder = _BUILDERS.get(file.suffix.lower())
    if builder is None:
        raise DataFormatError(
            f"{file}: unknown file type {file.suffix!r}. Use .jsonl (one JSON object per line), .json, .parquet or "
            ".csv."
        )
    if file.suffix.lower() == ".jsonl":
        _check_jsonl_lines(file)  # file:line for the faults datasets would report without a line
    import datasets

    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(builder, data_files=str(file), split="train")
    except Exception as err:  # datasets wraps parser errors in its own types
        raise DataFormatError(f"{file}: cannot be read as {builder} ({type(err).__name__}: {err}).") from None
    if len(table) == 0:
        raise DataFormatError(f"{file}: the file has no rows.")
    return table


def detect_format(columns: list[str], names: ColumnNames, wanted: str = "auto") -> str:
    """The row format of a table with ``columns``.

    Raises:
        DataFormatError: naming the missing column(s) and the columns found.
    """
    if wanted not in FORMATS:
        raise DataFormatError(f"data.format={wanted!r} must be one of {list(FORMATS)}.")
    has = set(columns)
    needs = {
        "messages": [names.messages],
        "instruction": [names.prompt, names.response],
        "text": [names.text],
    }
    if wanted != "auto":
        missing = [c for c in needs[wanted] if c not in has and not _alias_present(c, has)]
        if missing:
            raise DataFormatError(
                f"data.format={wanted} needs column(s) {missing}; the file has {sorted(has)}. Name the columns with "
                "data.columns (e.g. data.columns.prompt=question)."
            )
        return wanted
    if names.messages in has or "conversations" in has:
        return "messages"
    if (names.prompt in has or "prompt" in has) and (names.response in has or "output" in has or "completion" in has):
        return "instruction"
    if names.text in has:
        return "text"
    raise DataFormatError(
        f"Cannot tell the row format from the columns {sorted(has)}: expected {names.messages!r} (chat), "
        f"{names.prompt!r} + {names.response!r} (instruction) or {names.text!r} (plain text). Set data.format and "
        "data.columns."
    )


def load_rows(
    path: str | os.PathLike, row_format: str = "auto", names: ColumnNames | None = None,
    system_prompt: str | None = None,
) -> LoadedRows:
    """Read ``path`` and turn each row into a :class:`Conversation` (or a text); rows that cannot be used are
    skipped and counted by reason (``no assistant turn``, ``empty content``, ``unknown role``, ``format``).

    Args:
        path: a local .jsonl, .json, .parquet or .csv file.
        row_format: ``auto`` (from the columns), ``messages``, ``instruction`` or ``text``.
        names: column names.
        system_prompt: a system turn put first in instruction rows (chat rows keep their own).

    Raises:
        DataFormatError: for an unreadable file, unknown columns, or when no row is usable.
    """
    names = names or ColumnNames()
    table = read_table(path)
    fmt = detect_format(list(table.column_names), names, row_format)
    loaded = LoadedRows(fmt)
    file = Path(path).expanduser()
    for index, row in enumerate(table):
        where = f"{file}:row {index + 1}"
        try:
            if fmt == "text":
                text = row.get(names.text)
                if not isinstance(text, str) or not text.strip():
                    raise RowError(f"{where}: {names.text!r} is empty ({text!r}).", "empty content")
                loaded.texts.append((text, where))
            elif fmt == "messages":
                loaded.conversations.append(_chat_row(row, names, where))
            else:
                loaded.conversations.append(_instruction_row(row, names, where, system_prompt))
        except RowError as err:
            loaded.skip(err)
    if not len(loaded):
        reasons = "; ".join(f"{n} {reason}: {loaded.examples[reason][0]}" for reason, n in loaded.skipped.items())
        raise DataFormatError(f"{file}: no usable row ({reasons}).")
    return loaded


def _chat_row(row: dict[str, Any], names: ColumnNames, where: str) -> Conversation:
    messages = row.get(names.messages)
    if messages is None and "conversations" in row:  # ShareGPT
        messages = [_from_sharegpt(turn, where) for turn in row["conversations"] or []]
    tools = row.get(names.tools)
    if isinstance(tools, str):  # tools stored as a JSON string (CSV, some Parquet exports)
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as err:
            raise RowError(f"{where}: {names.tools!r} is not JSON ({err.msg}).", "format") from None
    if tools is not None and not isinstance(tools, list):
        raise RowError(f"{where}: {names.tools!r} must be a list of tool definitions, got {type(tools).__name__}.",
                       "format")
    return Conversation(check_messages(messages, where), where, tools or None)


def _from_sharegpt(turn: Any, where: str) -> dict[str, Any]:
    if not isinstance(turn, dict) or "from" not in turn:
        raise RowError(f"{where}: a ShareGPT turn needs 'from' and 'value', got {turn!r}.", "format")
    role = _SHAREGPT_ROLES.get(str(turn["from"]).lower(), str(turn["from"]))
    return {"role": role, "content": turn.get("value")}


def _instruction_row(row: dict[str, Any], names: ColumnNames, where: str, system_prompt: str | None) -> Conversation:
    prompt = _first_present(row, names.prompt, "prompt")
    response = _first_present(row, names.response, "output", "completion")
    for key, value in ((names.prompt, prompt), (names.response, response)):
        if not isinstance(value, str) or not value.strip():
            raise RowError(f"{where}: expected a non-empty string under {key!r}, got {value!r}.", "empty content")
    context = row.get(names.input) if names.input else None
    if context is not None and not isinstance(context, str):
        raise RowError(f"{where}: {names.input!r} must be a string or absent, got {type(context).__name__}.", "format")
    text = prompt.strip() + (f"\n\n{context.strip()}" if context and context.strip() else "")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages += [{"role": "user", "content": text}, {"role": "assistant", "content": response.strip()}]
    return Conversation(messages, where)


def _first_present(row: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if row.get(key) is not None:
            return row[key]
    return None


def _alias_present(column: str, has: set[str]) -> bool:
    aliases = {"instruction": {"prompt"}, "response": {"output", "completion"}, "messages": {"conversations"}}
    return bool(aliases.get(column, set()) & has)


def _check_jsonl_lines(file: Path) -> None:
    """Refuse a JSONL file with a line that is not UTF-8, not JSON or not an object, naming ``file:line``."""
    with file.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{file}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(
                    f"{where}: not UTF-8 text (byte {err.start} of the line: {raw[err.start:err.start + 1]!r}). Save "
                    "the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{where}: invalid JSON ({err.msg} at column {err.colno}).") from None
            if not isinstance(row, dict):
                raise DataFormatError(f"{where}: expected a JSON object, got {type(row).__name__}.")
            _check_text(row, where)


def _check_text(value: Any, where: str, key: str = "") -> None:
    """Refuse a lone surrogate escape (half of a UTF-16 pair alone): valid JSON, but not text; Arrow cannot store it."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_text(v, where, str(k))
    elif isinstance(value, list):
        for v in value:
            _check_text(v, where, key)
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise DataFormatError(
                f"{where}: {key!r} holds a lone surrogate escape ({value[err.start]!r} at character {err.start}), "
                "which is not text. Fix the escape (e.g. \\ud83d\\ude00 pairs up) or drop it."
            ) from None
