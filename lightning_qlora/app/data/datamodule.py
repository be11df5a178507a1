"""``InstructionDataModule``: Jargon File or JSONL instruction data, tokenized with the model's chat template."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Literal, cast

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_qlora.app.data.examples import Example, split_held_out
from lightning_qlora.app.data.jargon import load_jargon
from lightning_qlora.app.data.jsonl import DataFormatError, load_jsonl
from lightning_qlora.app.data.sampler import ResumableDataLoader, ResumableRandomSampler
from lightning_qlora.app.data.tokenize import DEFAULT_SYSTEM_PROMPT, TokenizedSplit, collate, tokenize_examples

log = logging.getLogger(__name__)

# Above this share of rows cut at max_length, the data module warns (the default job's rows: 6.9% at 256 tokens).
TRUNCATION_WARNING = 0.10


class InstructionDataModule(LightningDataModule):
    """Prompt/response data for supervised fine-tuning, with a fixed held-out split.

    Args:
        tokenizer_path: directory or name the tokenizer is loaded from (``AutoTokenizer.from_pretrained``).
        source: ``"jargon"`` (the Jargon File, about 2,300 term -> definition pairs) or ``"jsonl"``.
        path: the JSONL file (required for ``"jsonl"``), or an explicit jargon.txt(.gz).
        prompt_key, response_key: JSONL field names.
        input_key: JSONL field of Alpaca's optional context, joined to the prompt after a blank line (``None``:
            ignored).
        max_length: tokens per row; longer rows are truncated, rows whose prompt does not fit are dropped.
        batch_size: rows per batch (padded to the longest row in the batch).
        val_size: held-out rows; chosen by a stable hash of the prompt, so the split never changes between runs.
        limit_train: keep only this many training rows (``None``: all); for quick runs.
        system_prompt: system message for chat templates.
        seed: shuffling seed for the training loader.
    """

    def __init__(
        self,
        tokenizer_path: str,
        source: Literal["jargon", "jsonl"] = "jargon",
        path: str | None = None,
        prompt_key: str = "instruction",
        response_key: str = "response",
        input_key: str | None = "input",
        max_length: int = 256,
        batch_size: int = 8,
        val_size: int = 64,
        limit_train: int | None = None,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        problems = []
        if source not in ("jargon", "jsonl"):
            problems.append(f"source={source!r} must be 'jargon' or 'jsonl'")
        if source == "jsonl" and not path:
            problems.append("source='jsonl' needs data.path=FILE (one JSON object per line)")
        if max_length < 16:
            problems.append(f"max_length={max_length} must be >= 16 tokens")
        if batch_size < 1:
            problems.append(f"batch_size={batch_size} must be >= 1")
        if problems:
            raise ValueError("InstructionDataModule: " + "; ".join(problems) + ".")
        self.tokenizer_path = tokenizer_path
        self.source = source
        self.path = path
        self.prompt_key, self.response_key, self.input_key = prompt_key, response_key, input_key
        self.max_length = max_length
        self.batch_size = batch_size
        self.val_size = val_size
        self.limit_train = limit_train
        self.system_prompt = system_prompt
        self.seed = seed
        self.num_workers = num_workers
        self.tokenizer: Any = None
        self.train_examples: list[Example] = []
        self.val_examples: list[Example] = []
        self.train_split: TokenizedSplit | None = None
        self.val_split: TokenizedSplit | None = None
        self.sampler: ResumableRandomSampler | None = None

    def load_examples(self) -> list[Example]:
        if self.source == "jsonl":
            assert self.path is not None
            return load_jsonl(self.path, self.prompt_key, self.response_key, self.input_key)
        return load_jargon(self.path)

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_split is not None:
            return
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        examples = self.load_examples()
        train, held_out = split_held_out(examples, self.val_size)
        if self.limit_train is not None:
            train = train[: self.limit_train]
        self.train_examples, self.val_examples = train, held_out
        self.train_split = tokenize_examples(self.tokenizer, train, self.max_length, self.system_prompt)
        self.val_split = tokenize_examples(self.tokenizer, held_out, self.max_length, self.system_prompt)
        if not self.train_split.rows or not self.val_split.rows:
            raise DataFormatError(
                f"No row fits max_length={self.max_length} tokens (every prompt is longer). Raise data.max_length."
            )
        rank_zero_info(self.describe())
        share = self.truncated_share
        if share > TRUNCATION_WARNING:
            rank_zero_warn(
                f"{100 * share:.0f}% of the rows are longer than data.max_length={self.max_length} tokens and are cut: "
                "the model learns their beginnings only. Raise data.max_length (step time grows with it)."
            )

    @property
    def truncated_share(self) -> float:
        """The share of rows (train and held-out) cut at ``max_length``."""
        assert self.train_split is not None
        assert self.val_split is not None
        rows = len(self.train_split.rows) + len(self.val_split.rows)
        return (self.train_split.truncated + self.val_split.truncated) / max(1, rows)

    def describe(self) -> str:
        assert self.train_split is not None
        assert self.val_split is not None
        dropped = self.train_split.dropped + self.val_split.dropped
        truncated = self.train_split.truncated + self.val_split.truncated
        return (
            f"Data ({self.source}): {len(self.train_split.rows)} train / {len(self.val_split.rows)} held-out rows, "
            f"max_length {self.max_length}: {truncated} truncated ({100 * self.truncated_share:.1f}%), {dropped} "
            "dropped (prompt longer than max_length)"
        )

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def train_dataloader(self) -> DataLoader:
        assert self.train_split is not None
        self.sampler = ResumableRandomSampler(len(self.train_split.rows), self.batch_size, seed=self.seed)
        return ResumableDataLoader(
            cast(Dataset, self.train_split.rows),
            batch_size=self.batch_size,
            sampler=self.sampler,
            progress=self._training_progress,
            collate_fn=partial(collate, pad_token_id=self.pad_token_id),
            num_workers=self.num_workers,
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
        assert self.val_split is not None
        return DataLoader(
            cast(Dataset, self.val_split.rows),
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=partial(collate, pad_token_id=self.pad_token_id),
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )

