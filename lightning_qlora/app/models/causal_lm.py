"""``CausalLMFineTune``: supervised fine-tuning of a transformers causal LM, with held-out perplexity."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torchmetrics.text import Perplexity
from typing_extensions import override

from lightning_qlora.app.data.tokenize import IGNORE_INDEX, conversation_prompt, prompt_text
from lightning_qlora.app.models.pretrained import causal_lm_for_fine_tuning
from lightning_qlora.kernels.chunked_loss import causal_lm_loss
from lightning_qlora.memory_plan import enable_checkpointing
from lightning_qlora.optim.adamw8bit import AdamW8bit
from lightning_qlora.optim.in_backward import OptimizerInBackward

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adamw8bit": AdamW8bit}


class CausalLMFineTune(LightningModule):
    """Fine-tunes a causal LM on prompt/response rows (prompt tokens carry label ``-100``).

    The model is loaded in ``configure_model`` so that the strategy decides where it is materialized; with
    ``QLoRAPlugin`` its linears are then quantized and adapted before the optimizer is built.

    Args:
        name_or_path: a directory or name ``AutoModelForCausalLM.from_pretrained`` can load offline.
        lr: peak learning rate of AdamW (adapters only).
        weight_decay: AdamW weight decay.
        optimizer: ``"adamw"`` (torch, fp32 moments) or ``"adamw8bit"`` (:class:`~lightning_qlora.AdamW8bit`:
            bitsandbytes' 8-bit moments, a quarter of the optimizer memory, also under ``qlora_fsdp``).
        warmup_steps: linear warm-up steps, then cosine decay to ``min_lr_ratio * lr`` at ``trainer.max_steps``.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        gradient_checkpointing: recompute activations in backward (less memory, about 30% slower).
        optimizer_in_backward: step AdamW inside backward, a bucket of adapter tensors at a time, so their gradients
            are never all alive (:class:`~lightning_qlora.optim.in_backward.OptimizerInBackward`: no fp32 gradient of
            every adapter at once, 3 GiB on a 65B model at r 64). Needs ``trainer.gradient_clip_val=None`` and no
            gradient accumulation.
        chunked_loss: take the training loss with the head and cross-entropy in chunks of tokens, so that the whole
            row's logits never exist (:mod:`lightning_qlora.kernels.chunked_loss`; the same loss and gradients; a
            4,096-token row at a 128k vocabulary saves about 4 GiB). Models it does not cover run as they are.

    Logged metrics: ``train/loss`` (per step), ``train/lr``, ``val/loss`` and ``val/perplexity`` (per validation run,
    on held-out rows, response tokens only).
    """

    def __init__(
        self,
        name_or_path: str,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 5,
        min_lr_ratio: float = 0.1,
        gradient_checkpointing: bool = False,
        optimizer_in_backward: bool = False,
        optimizer: str = "adamw",
        chunked_loss: bool = True,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r} is not one of {sorted(OPTIMIZERS)}.")
        self.save_hyperparameters()
        self.model: Any = None
        self.val_perplexity = Perplexity(ignore_index=IGNORE_INDEX)
        self.train_tokens = 0

    @property
    def _settings(self) -> Any:
        # The constructor's arguments (save_hyperparameters), read by attribute.
        return self.hparams

    @override
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = causal_lm_for_fine_tuning(self._settings.name_or_path)
        if self._settings.gradient_checkpointing:
            enable_checkpointing(self.model)

    @override
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, tokens: Any = None, **kwargs: Any
    ) -> Any:
        # ``tokens`` (a batch's count of real tokens) is bookkeeping, not a model input.
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @property
    def chunked_loss(self) -> bool:
        """Whether the training loss is taken in chunks for this model (what a memory plan counts on)."""
        from lightning_qlora.kernels.chunked_loss import why_not_chunked

        return bool(self._settings.get("chunked_loss", True)) and self.model is not None and why_not_chunked(
            self.model) is None

    @staticmethod
    def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """What the model reads from a batch: padded rows come with an ``attention_mask``; packed rows with
        ``position_ids`` restarting at each row (and no mask: transformers keeps attention inside each row).
        """
        return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}

    @staticmethod
    def real_tokens(batch: dict[str, torch.Tensor]) -> int:
        """Tokens of the batch that are not padding."""
        if "tokens" in batch:
            return int(batch["tokens"])
        return int(batch["attention_mask"].sum())

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self._settings.get("chunked_loss", True):
            loss = causal_lm_loss(self.model, batch["labels"], **self.model_inputs(batch))
        else:
            loss = self(**self.model_inputs(batch), labels=batch["labels"]).loss
        self.train_tokens += self.real_tokens(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].size(0))
        return loss

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(**self.model_inputs(batch)).logits
        # Position t predicts token t + 1.
        self.val_perplexity.update(logits[:, :-1].float(), batch["labels"][:, 1:])
        self.log("val/perplexity", self.val_perplexity, on_epoch=True, prog_bar=True)

    @override
    def on_validation_epoch_start(self) -> None:
        # A validate() call (inference mode) leaves the metric's state as inference tensors, which a validation inside
        # fit (no_grad only) may not update in place: start each validation from fresh state.
        self.val_perplexity.reset()

    @override
    def on_validation_epoch_end(self) -> None:
        perplexity = self.trainer.callback_metrics.get("val/perplexity")
        if perplexity is not None:
            self.log("val/loss", math.log(float(perplexity)))

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])

    @override
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(
                "No parameter requires grad: nothing would train. Use QLoRAPlugin with a LoRAConfig "
                "(lora=None only quantizes)."
            )
        settings = {"lr": self._settings.lr, "weight_decay": self._settings.weight_decay}
        optimizer_class = OPTIMIZERS[self._settings.get("optimizer", "adamw")]
        if self._settings.optimizer_in_backward:  # the adapters' gradients are never all alive at once
            optimizer: torch.optim.Optimizer = OptimizerInBackward(params, optimizer_class, **settings)
        else:
            optimizer = optimizer_class(params, **settings)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup, floor = self._settings.warmup_steps, self._settings.min_lr_ratio

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @torch.no_grad()
    def generate_answers(
        self, tokenizer: Any, prompts: list[Any], max_new_tokens: int = 48, system_prompt: str | None = None
    ) -> list[str]:
        """Greedy answers to ``prompts`` with the current weights (adapters included): each a question (with
        ``system_prompt`` before it) or a conversation's messages, answered as the next assistant turn.
        """
        if not prompts:
            return []
        if self.model is None:
            raise RuntimeError("generate_answers() needs the model: run trainer.validate() or trainer.fit() first.")
        was_training = self.model.training
        self.model.eval()
        device = next(p.device for p in self.model.parameters())
        answers = []
        # Compiled blocks would recompile for every new length of a generation (and replay CUDA graphs recorded for
        # training shapes): generation runs them eagerly.
        eager = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else nullcontext()
        with eager:
            try:
                for prompt in prompts:
                    if isinstance(prompt, str):
                        text = prompt_text(tokenizer, prompt, system_prompt)
                    else:
                        text = conversation_prompt(tokenizer, prompt)
                    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
                    out = self.model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                    )
                    answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
            finally:
                self.model.train(was_training)
        return answers
