"""Small LightningModules and data used by several test files."""

from __future__ import annotations

import os
import signal

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class RegressionModule(LightningModule):
    """A plain nn.Sequential regression model: the smallest complete LightningModule."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
        self.lr = lr
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x).float(), y.float())
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.mse_loss(self(x).float(), y.float()))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def regression_loader(n: int = 256, batch_size: int = 32) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 32, generator=generator)
    y = (x[:, :4].sum(dim=1, keepdim=True) * 0.5).sin()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class CausalLMModule(LightningModule):
    """Wraps a transformers causal LM (built from a config, random weights)."""

    def __init__(self, config, lr: float = 3e-3) -> None:
        super().__init__()
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        self.model = LlamaForCausalLM(config)
        self.lr = lr
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW((p for p in self.parameters() if p.requires_grad), lr=self.lr)


def token_loader(vocab: int = 128, n: int = 64, length: int = 16, batch_size: int = 8) -> DataLoader:
    # A learnable pattern: each sequence counts upward from a random start.
    generator = torch.Generator().manual_seed(2)
    starts = torch.randint(0, vocab, (n, 1), generator=generator)
    ids = (starts + torch.arange(length)) % vocab
    return DataLoader(TensorDataset(ids), batch_size=batch_size, shuffle=False)


class TokenIdsModule(CausalLMModule):
    """A CausalLMModule called with the token ids alone (what the strategy's calibration forward passes)."""

    def forward(self, ids):
        return self.model(input_ids=ids)


class TokenDataModule(LightningDataModule):
    """:func:`token_loader` as a datamodule: calibration at set-up reads the first training rows from it."""

    def train_dataloader(self):
        return token_loader(batch_size=8)


def fast_trainer(**overrides) -> Trainer:
    """A CPU Trainer without logging, checkpoints, progress bars or summaries; keyword arguments override."""
    settings = dict(
        accelerator="cpu",
        devices=1,
        max_steps=20,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    settings.update(overrides)
    return Trainer(**settings)


def llama(config, seed: int = 0):
    """A random-weight LlamaForCausalLM from ``config``, in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def assert_merge_round_trip(model, ids) -> None:
    """Merging adapters into a plain (unquantized) base keeps the logits; unmerging restores the base bit for bit."""
    from lightning_qlora.lora import iter_lora_layers, merge_lora, unmerge_lora

    before = {n: m.base_layer.weight.detach().clone() for n, m in iter_lora_layers(model)}
    with torch.no_grad():
        unmerged = model(ids).logits
        merge_lora(model)
        merged = model(ids).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=0)
    unmerge_lora(model)
    assert all(torch.equal(m.base_layer.weight, before[n]) for n, m in iter_lora_layers(model))


class SignalAt(Callback):
    """Sends this process ``signame`` (``TERM``, ``INT``) at the start of optimizer step ``step``: a scheduler's
    SIGTERM or a user's Ctrl-C at a known point (usable from the app: ``+callbacks.stop._target_=helpers.SignalAt``)."""

    def __init__(self, step: int, signame: str = "TERM") -> None:
        self.step = step
        self.signum = getattr(signal, f"SIG{signame}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
