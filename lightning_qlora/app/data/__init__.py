"""Data for the default job: the Jargon File or the user's JSONL, tokenized with the model's chat template."""

from lightning_qlora.app.data.datamodule import InstructionDataModule
from lightning_qlora.app.data.examples import Example
from lightning_qlora.app.data.jargon import load_jargon, parse_jargon
from lightning_qlora.app.data.jsonl import DataFormatError, load_jsonl

__all__ = ["DataFormatError", "Example", "InstructionDataModule", "load_jargon", "load_jsonl", "parse_jargon"]
