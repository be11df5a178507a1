"""``ChatDataModule``: the Jargon File or the user's chat / instruction / text files, tokenized through the model's
chat template with the loss on assistant turns, packed into fixed token budgets.

Rows are read (:mod:`~lightning_qlora.app.data.sources`), split into training and held-out rows by a stable hash (the
split never changes between runs or seeds), tokenized (:mod:`~lightning_qlora.app.data.chat`) and packed
(:mod:`~lightning_qlora.app.data.packing`). Rows that cannot be used are skipped and counted by reason; rows longer
than ``max_length`` are cut (``overlong="truncate"``) or dropped (``"drop"``), counted. :meth:`describe` is the
report. With ``packing=False`` each batch is padded to its longest row instead (with an ``attention_mask``).
"""

from __future__ import annotations

import hashlib
import logging
from functools import partial
from typing import Any, Literal, cast

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_qlora.app.data.chat import (
    Conversation,
    RowError,
    TokenizedRow,
    TrainOn,
    tokenize_conversation,
    tokenize_text,
)
from lightning_qlora.app.data.jargon import load_jargon
from lightning_qlora.app.data.jsonl import DataFormatError
from lightning_qlora.app.data.packing import PackedRows, collate_packed
from lightning_qlora.app.data.sampler import ResumableDataLoader, ResumableRandomSampler
from lightning_qlora.app.data.sources import FORMATS, ColumnNames, LoadedRows, load_rows
from lightning_qlora.app.data.tokenize import DEFAULT_SYSTEM_PROMPT, collate

log = logging.getLogger(__name__)

# Above this share of rows cut at max_length, the data module warns (the default job's rows: 6.9% at 256 tokens).
TRUNCATION_WARNING = 0.10
# A row whose trainable tokens all fall beyond max_length teaches nothing: dropped, counted.
Source = Literal["jargon", "file", "jsonl"]


class ChatDataModule(LightningDataModule):
    """Supervised fine-tuning data with a fixed held-out split.

    Args:
        tokenizer_path: where ``AutoTokenizer.from_pretrained`` loads the tokenizer (its chat template too).
        source: ``"jargon"`` (the Jargon File, about 2,300 term -> definition pairs, as chat turns) or ``"file"``
            (``path``: .jsonl, .json, .parquet or .csv; ``"jsonl"`` is the same).
        path: the file for ``"file"``, or an explicit jargon.txt(.gz).
        format: ``"auto"`` (from the columns), ``"messages"`` (chat), ``"instruction"`` or ``"text"``.
        columns: column names (:class:`~lightning_qlora.app.data.sources.ColumnNames` fields: ``messages``,
            ``tools``, ``prompt``, ``response``, ``input``, ``text``).
        train_on: ``"assistant"`` (the loss on assistant turns only) or ``"all"`` (every token).
        packing: pack rows into budgets of ``max_tokens`` (one shape for every batch, no padding between rows).
        max_tokens: tokens per packed row (the budget); with ``packing=False``, unused.
        max_length: tokens per original row (longer ones are cut or dropped, see ``overlong``); ``None``: as
            ``max_tokens`` when packing.
        overlong: ``"truncate"`` (keep the beginning) or ``"drop"`` rows longer than ``max_length``.
        batch_size: packed rows (or, unpacked, original rows) per batch.
        val_size: held-out rows, chosen by a stable hash of each row's prompt.
        limit_train: keep only this many training rows (``None``: all); for quick runs.
        system_prompt: a system turn put first in the Jargon File's and instruction rows.
        seed: shuffling seed for the training loader.
        prompt_key, response_key, input_key: instruction columns (shorthands for ``columns``).
    """

    def __init__(
        self,
        tokenizer_path: str,
        source: Source = "jargon",
        path: str | None = None,
        format: str = "auto",
        columns: dict[str, Any] | None = None,
        train_on: TrainOn = "assistant",
        packing: bool = True,
        max_tokens: int = 2048,
        max_length: int | None = None,
        overlong: Literal["truncate", "drop"] = "truncate",
        batch_size: int = 1,
        val_size: int = 64,
        limit_train: int | None = None,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        seed: int = 0,
        num_workers: int = 0,
        prompt_key: str | None = None,
        response_key: str | None = None,
        input_key: str | None = "input",
    ) -> None:
        super().__init__()
        names = ColumnNames(**(dict(columns) if columns else {}))
        if prompt_key:
            names.prompt = prompt_key
        if response_key:
            names.response = response_key
        names.input = input_key if input_key != "input" else names.input
        max_length = max_length if max_length is not None else max_tokens
        problems = []
        if source not in ("jargon", "file", "jsonl"):
            problems.append(f"source={source!r} must be 'jargon' or 'file'")
        if source in ("file", "jsonl") and not path:
            problems.append(f"source={source!r} needs data.path=FILE (.jsonl, .json, .parquet or .csv)")
        if format not in FORMATS:
            problems.append(f"format={format!r} must be one of {list(FORMATS)}")
        if train_on not in ("assistant", "all"):
            problems.append(f"train_on={train_on!r} must be 'assistant' or 'all'")
        if overlong not in ("truncate", "drop"):
            problems.append(f"overlong={overlong!r} must be 'truncate' or 'drop'")
        if max_length < 16:
            problems.append(f"max_length={max_length} must be >= 16 tokens")
        if packing and max_tokens < max_length:
            problems.append(f"max_tokens={max_tokens} must be >= max_length={max_length} (a row must fit a budget)")
        if batch_size < 1:
            problems.append(f"batch_size={batch_size} must be >= 1")
        if problems:
            raise ValueError("ChatDataModule: " + "; ".join(problems) + ".")
        self.tokenizer_path = tokenizer_path
        self.source = "file" if source == "jsonl" else source
        self.path = path
        self.format = format
        self.columns = names
        self.train_on = train_on
        self.packing = packing
        self.max_tokens = max_tokens
        self.max_length = max_length
        self.overlong = overlong
        self.batch_size = batch_size
        self.val_size = val_size
        self.limit_train = limit_train
        self.system_prompt = system_prompt
        self.seed = seed
        self.num_workers = num_workers
        self.tokenizer: Any = None
        self.loaded: LoadedRows | None = None
        self.val_conversations: list[Conversation] = []
        self.train_rows: list[dict[str, list[int]]] = []
        self.val_rows: list[dict[str, list[int]]] = []
        self.counts: dict[str, int] = {}
        self.sampler: ResumableRandomSampler | None = None

    def load(self) -> LoadedRows:
        """The rows of the source, before tokenization."""
        if self.source == "jargon":
            loaded = LoadedRows("messages")
            system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            for example in load_jargon(self.path):
                messages = [*system, {"role": "user", "content": example.prompt},
                            {"role": "assistant", "content": example.response}]
                loaded.conversations.append(Conversation(messages, example.source))
            return loaded
        assert self.path is not None
        return load_rows(self.path, self.format, self.columns, self.system_prompt)

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_rows:
            return
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        self.loaded = loaded = self.load()
        keyed = [(c, _conversation_key(c)) for c in loaded.conversations] + [(t, _text_key(t[0])) for t in loaded.texts]
        if len(keyed) <= self.val_size:
            raise DataFormatError(
                f"The data has {len(keyed)} usable row(s), too few to hold out val_size={self.val_size} and still "
                "train. Add data or lower data.val_size."
            )
        by_key = sorted(keyed, key=lambda item: item[1])
        held = {key for _, key in by_key[: self.val_size]}
        train = [row for row, key in keyed if key not in held]
        val = [row for row, _ in by_key[: self.val_size]]
        if self.limit_train is not None:
            train = train[: self.limit_train]
        self.val_conversations = [row for row in val if isinstance(row, Conversation)]
        self.counts = {"truncated": 0, "dropped (too long)": 0, "no trainable token": 0}
        self.counts.update({f"skipped ({reason})": n for reason, n in loaded.skipped.items()})
        self.train_rows = self._tokenize(train)
        self.val_rows = self._tokenize(val)
        for name, kept in (("training", self.train_rows), ("held-out", self.val_rows)):
            if not kept:
                raise DataFormatError(
                    f"No {name} row is left with a token to learn from at max_length={self.max_length} "
                    f"({self.describe_counts()}). Raise data.max_length (or use overlong=truncate)."
                )
        rank_zero_info(self.describe())
        for reason, places in loaded.examples.items():
            rank_zero_warn(f"{loaded.skipped[reason]} row(s) skipped ({reason}), e.g. {places[0]}")
        share = self.truncated_share
        if share > TRUNCATION_WARNING:
            rank_zero_warn(
                f"{100 * share:.0f}% of the rows are longer than data.max_length={self.max_length} tokens and are "
                f"{'cut' if self.overlong == 'truncate' else 'dropped'}: raise data.max_length (and data.max_tokens)."
            )

    def _tokenize(self, rows: list[Any]) -> list[dict[str, list[int]]]:
        tokenized = []
        for row in rows:
            try:
                if isinstance(row, Conversation):
                    result = tokenize_conversation(self.tokenizer, row, self.max_length, self.train_on)
                else:
                    result = tokenize_text(self.tokenizer, row[0], self.max_length)
            except RowError as err:
                assert self.loaded is not None
                self.loaded.skip(err)
                self.counts[f"skipped ({err.reason})"] = self.counts.get(f"skipped ({err.reason})", 0) + 1
                continue
            if not self._keep(result):
                continue
            tokenized.append({"input_ids": result.input_ids, "labels": result.labels})
        return tokenized

    def _keep(self, row: TokenizedRow) -> bool:
        if row.truncated:
            if self.overlong == "drop":
                self.counts["dropped (too long)"] += 1
                return False
            self.counts["truncated"] += 1
        if all(label == -100 for label in row.labels[1:]):
            self.counts["no trainable token"] += 1  # e.g. the prompt alone fills max_length
            return False
        return True

    @property
    def truncated_share(self) -> float:
        """The share of rows (train and held-out) cut or dropped at ``max_length``."""
        over = self.counts.get("truncated", 0) + self.counts.get("dropped (too long)", 0)
        return over / max(1, len(self.train_rows) + len(self.val_rows) + self.counts.get("dropped (too long)", 0))

    @property
    def max_batch_tokens(self) -> int:
        """Tokens of the largest training batch (what ``QLoRAPlugin(memory_budget_gib=...)`` plans for): rows a
        batch times the budget a packed row fills, or the longest a row may be.
        """
        return self.batch_size * (self.max_tokens if self.packing else self.max_length)

    @property
    def static_batch_shapes(self) -> bool:
        """Every training batch has the same shape (packed): what lets CUDA graphs replay one recorded step."""
        return self.packing

    def describe(self) -> str:
        """One line: rows, how they were packed, and every row not used as it was, by reason."""
        source = self.path if self.source == "file" else "the Jargon File"
        fmt = self.loaded.format if self.loaded is not None else self.format
        counted = self.describe_counts()
        text = (
            f"Data ({source}, {fmt}, loss on {'assistant turns' if self.train_on == 'assistant' else 'every token'}): "
            f"{len(self.train_rows)} train / {len(self.val_rows)} held-out rows, max_length {self.max_length}: "
            f"{counted} ({100 * self.truncated_share:.1f}% too long)"
        )
        if self.packing and self.train_rows:
            packed = PackedRows(self.train_rows, self.max_tokens)
            text += (
                f"; packed into {len(packed)} x {self.max_tokens} tokens ({packed.rows_per_item:.1f} rows each, "
                f"{100 * packed.fill:.1f}% filled)"
            )
        return text

    def describe_counts(self) -> str:
        """The rows not used as they were, by reason (``"3 truncated, 1 skipped (no assistant turn)"``)."""
        return ", ".join(f"{n} {what}" for what, n in self.counts.items() if n) or "every row used whole"

    @property
    def val_examples(self) -> list[Conversation]:
        """Held-out conversations (the app answers the first few before and after training)."""
        return self.val_conversations

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def _dataset_and_collate(self, rows: list[dict[str, list[int]]]) -> tuple[Any, Any]:
        if self.packing:
            return PackedRows(rows, self.max_tokens), partial(
                collate_packed, budget=self.max_tokens, pad_token_id=self.pad_token_id
            )
        return cast(Dataset, rows), partial(collate, pad_token_id=self.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        dataset, collate_fn = self._dataset_and_collate(self.train_rows)
        self.sampler = ResumableRandomSampler(len(dataset), self.batch_size, seed=self.seed)
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self.sampler,
            progress=self._training_progress,
            collate_fn=collate_fn,
            num_workers=self.num_workers,
            # A packed step has one shape only if the last, short batch is dropped.
            drop_last=self.packing and len(dataset) >= self.batch_size,
            # Without its own generator a DataLoader draws a seed from the global RNG each time an iterator starts,
            # which shifts every later dropout mask of a resumed run.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _training_progress(self) -> tuple[int, int]:
        # Where training stands inside the epoch: a resumed run skips exactly the batches already trained on.
        trainer = self.trainer
        assert trainer is not None
        progress: Any = trainer.fit_loop.epoch_loop.batch_progress.current  # a _ProcessedTracker at run time
        return trainer.current_epoch, progress.processed

    def val_dataloader(self) -> DataLoader:
        dataset, collate_fn = self._dataset_and_collate(self.val_rows)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=collate_fn,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )


# The name the app and users knew it by; the same class.
InstructionDataModule = ChatDataModule


def _conversation_key(conversation: Conversation) -> str:
    # What the user asked, not the answer nor a shared system prompt: a split that stays fixed across edits of the
    # responses (and, for one-turn rows, the same as the hash of the prompt alone).
    asked = "\n".join(str(m["content"]) for m in conversation.prompt_messages if m["role"] == "user")
    return hashlib.sha1(asked.encode("utf-8")).hexdigest()


def _text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()
