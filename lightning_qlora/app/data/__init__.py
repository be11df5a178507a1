"""Data for the app: the Jargon File or the user's chat, instruction or text files, tokenized through the model's
chat template (loss on assistant turns) and packed into fixed token budgets.
"""

from lightning_qlora.app.data.chat import Conversation
from lightning_qlora.app.data.datamodule import ChatDataModule, InstructionDataModule
from lightning_qlora.app.data.examples import Example
from lightning_qlora.app.data.jargon import load_jargon, parse_jargon
from lightning_qlora.app.data.jsonl import DataFormatError, load_jsonl
from lightning_qlora.app.data.sources import load_rows

__all__ = [
    "ChatDataModule",
    "Conversation",
    "DataFormatError",
    "Example",
    "InstructionDataModule",
    "load_jargon",
    "load_jsonl",
    "load_rows",
    "parse_jargon",
]
