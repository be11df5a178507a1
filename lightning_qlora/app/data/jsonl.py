"""The user's own instruction data: one JSON object per line with a prompt and a response (Alpaca's optional
``input``, the context an instruction refers to, joined to the prompt).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lightning_qlora.app.data.examples import Example
from lightning_qlora.errors import QLoRAError


class DataFormatError(QLoRAError, ValueError):
    """A data file is missing, empty, or has a malformed row; the message names the file and line."""


def load_jsonl(
    path: str | os.PathLike,
    prompt_key: str = "instruction",
    response_key: str = "response",
    input_key: str | None = "input",
) -> list[Example]:
    """Read ``{"instruction": ..., "response": ...}`` rows (keys configurable); blank lines are skipped.

    A row's non-empty ``input_key`` (Alpaca's ``input``: the text the instruction is about) is appended to its prompt
    after a blank line, as Alpaca's own template places it; ``input_key=None`` ignores it.

    Raises:
        DataFormatError: for a missing or empty file, invalid JSON, a row that is not an object, a missing,
            non-string or empty prompt/response, or a non-string input, naming ``file:line`` and what was expected.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataFormatError(
            f"data.path={str(path)!r} does not exist. Expected a JSONL file with one "
            f'{{"{prompt_key}": "...", "{response_key}": "..."}} object per line.'
        )
    examples: list[Example] = []
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
            for key in (prompt_key, response_key):
                value = row.get(key)
                if not isinstance(value, str) or not value.strip():
                    raise DataFormatError(
                        f"{where}: expected a non-empty string under {key!r}, got {value!r}. "
                        f"Rows need both {prompt_key!r} and {response_key!r} (keys found: {sorted(row)})."
                    )
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as err:
                    raise DataFormatError(
                        f"{where}: {key!r} holds a lone surrogate escape ({value[err.start]!r} at character "
                        f"{err.start}), which is not text. Fix the escape (e.g. \\ud83d\\ude00 pairs up) or drop it."
                    ) from None
            prompt = row[prompt_key].strip()
            context = row.get(input_key) if input_key else None
            if context is not None and not isinstance(context, str):
                raise DataFormatError(
                    f"{where}: {input_key!r} must be a string (the text the instruction is about) or absent, got "
                    f"{type(context).__name__}."
                )
            if context and context.strip():
                prompt = f"{prompt}\n\n{context.strip()}"
            examples.append(Example(prompt, row[response_key].strip(), where))
    if not examples:
        raise DataFormatError(f"{file}: the file has no rows. Expected one JSON object per line.")
    return examples
