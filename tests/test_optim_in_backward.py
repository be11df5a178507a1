"""OptimizerInBackward: the same updates as the wrapped optimizer, taken inside backward, gradients freed at once."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import CausalLMModule, RegressionModule, fast_trainer, regression_loader, token_loader
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_qlora import (
    LoRAConfig,
    QLoRAPlugin,
    QuantConfig,
    inject_lora,
    mark_only_lora_as_trainable,
    quantize_model,
)
from lightning_qlora.lightning.callbacks import NoAdapterGradientError, TrainingGuard
from lightning_qlora.lora import lora_state_dict
from lightning_qlora.optim.in_backward import OptimizerInBackward


def _qlora_llama(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    quantize_model(model, QuantConfig(compute_dtype="fp32"))
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    mark_only_lora_as_trainable(model)
    torch.manual_seed(1)
    for name, p in model.named_parameters():  # non-zero B so every adapter tensor gets a gradient from step one
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    return model


def _train(model, optimizer, scheduler, steps: int = 5):
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    grads_alive_after_backward = []
    for _ in range(steps):
        def closure():
            optimizer.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            grads_alive_after_backward.append(sum(p.grad is not None for p in model.parameters()))
            return loss

        optimizer.step(closure)
        scheduler.step()
    return grads_alive_after_backward


@pytest.mark.parametrize("bucket_mb", [0, 0.01, 64], ids=["per-tensor", "small-buckets", "one-bucket"])
def test_same_updates_as_the_wrapped_optimizer_with_a_scheduler(tiny_llama, bucket_mb):
    reference, fused = _qlora_llama(tiny_llama), _qlora_llama(tiny_llama)
    before = {k: v.clone() for k, v in lora_state_dict(reference).items()}
    settings = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99))
    plain = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], **settings)
    in_backward = OptimizerInBackward(fused.parameters(), torch.optim.AdamW, bucket_mb=bucket_mb, **settings)

    def halve_each_step(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)

    alive_plain = _train(reference, plain, halve_each_step(plain))
    alive_fused = _train(fused, in_backward, halve_each_step(in_backward))

    assert alive_plain[-1] == len(plain.param_groups[0]["params"]) > 0  # a normal step keeps every gradient
    assert alive_fused == [0] * 5  # here none survives the backward pass
    after_plain, after_fused = lora_state_dict(reference), lora_state_dict(fused)
    assert any(not torch.equal(before[k], after_plain[k]) for k in before)
    for key in after_plain:
        torch.testing.assert_close(after_fused[key], after_plain[key], rtol=0, atol=1e-6, msg=key)
    assert in_backward.inner[0].param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**4)
    tensors = len(plain.param_groups[0]["params"])
    assert len(in_backward.buckets) == {0: tensors, 64: 1}.get(bucket_mb, len(in_backward.buckets))
    assert 1 < len(in_backward.buckets) < tensors or bucket_mb in (0, 64)


def test_a_bucket_with_an_unused_parameter_steps_at_the_end():
    used, unused = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    optimizer = OptimizerInBackward([*used.parameters(), *unused.parameters()], torch.optim.SGD, lr=0.1)
    before = used.weight.detach().clone()
    optimizer.step(lambda: used(torch.ones(1, 4)).sum().backward())
    assert not torch.equal(used.weight, before) and used.weight.grad is None


def test_state_dict_round_trip_and_mismatch(tiny_llama):
    model = _qlora_llama(tiny_llama)
    optimizer = OptimizerInBackward(model.parameters(), torch.optim.AdamW, lr=1e-2)
    _train(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), steps=2)
    state = optimizer.state_dict()
    restored = OptimizerInBackward(_qlora_llama(tiny_llama).parameters(), torch.optim.AdamW, lr=1e-2)
    assert len(restored.inner) == 1  # 28 small tensors fit one 64 MB bucket
    restored.load_state_dict(copy.deepcopy(state))
    assert int(restored.inner[0].state_dict()["state"][3]["step"]) == 2
    other = OptimizerInBackward(_qlora_llama(tiny_llama).parameters(), torch.optim.AdamW, bucket_mb=0, lr=1e-2)
    with pytest.raises(ValueError, match="saved for another model, optimizer or bucket_mb"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        OptimizerInBackward([torch.zeros(2)], torch.optim.AdamW)


class _InBackwardModule(CausalLMModule):
    def configure_optimizers(self):
        return OptimizerInBackward(self.parameters(), torch.optim.AdamW, bucket_mb=0.01, lr=self.lr)


def _fit(tmp_path, module_class, config, max_steps, ckpt_path=None, callbacks=(), **overrides):
    module = module_class(config)
    plugin = QLoRAPlugin(quant=QuantConfig(compute_dtype="fp32"), lora=LoRAConfig(r=4, dropout=0.0))
    trainer = fast_trainer(
        plugins=[plugin], strategy="qlora", max_steps=max_steps, default_root_dir=tmp_path,
        callbacks=list(callbacks), **overrides,
    )
    trainer.fit(module, token_loader(), ckpt_path=ckpt_path)
    return module


def _whole_and_resumed(tmp_path, module_class, config):
    whole = _fit(tmp_path / "whole", module_class, config, 12)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True)
    _fit(tmp_path / "first", module_class, config, 8, callbacks=[saver], enable_checkpointing=True)
    resumed = _fit(tmp_path / "second", module_class, config, 12, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=8.ckpt"))
    return whole, resumed


def test_lightning_fit_and_resume_equal_the_plain_optimizer(tmp_path, tiny_llama_config):
    """Through Lightning (closure, checkpoint, optimizer-state restore) the step-in-backward run and the plain AdamW
    run give the same losses and adapters, uninterrupted and resumed from a checkpoint."""
    whole, resumed = _whole_and_resumed(tmp_path / "in_backward", _InBackwardModule, tiny_llama_config)
    plain_whole, plain_resumed = _whole_and_resumed(tmp_path / "plain", CausalLMModule, tiny_llama_config)
    assert whole.losses[0] > whole.losses[-1]
    torch.testing.assert_close(whole.losses, plain_whole.losses, rtol=0, atol=1e-6)
    # A resumed run whose optimizer state were lost would take different steps from the plain resumed run.
    torch.testing.assert_close(resumed.losses, plain_resumed.losses, rtol=0, atol=1e-6)
    for key, value in lora_state_dict(plain_resumed).items():
        torch.testing.assert_close(lora_state_dict(resumed)[key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"gradient_clip_val": 1.0}, "gradient_clip_val=1.0"), ({"accumulate_grad_batches": 2}, "accumulate_grad_batches=2")],
)
def test_lightning_refuses_what_needs_every_gradient(tmp_path, tiny_llama_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        _fit(tmp_path, _InBackwardModule, tiny_llama_config, 2, **overrides)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("optimizer", ["fused_adamw", "paged_adamw_8bit"])
def test_cuda_optimizers_in_backward_match_their_plain_step(tiny_llama, optimizer):
    import bitsandbytes as bnb

    optimizer_class, settings = {
        "fused_adamw": (torch.optim.AdamW, dict(lr=1e-2, fused=True)),
        "paged_adamw_8bit": (bnb.optim.PagedAdamW8bit, dict(lr=1e-2, min_8bit_size=0)),
    }[optimizer]
    reference, fused = _qlora_llama(tiny_llama).cuda(), _qlora_llama(tiny_llama).cuda()
    plain = optimizer_class([p for p in reference.parameters() if p.requires_grad], **settings)
    in_backward = OptimizerInBackward(fused.parameters(), optimizer_class, bucket_mb=0.01, **settings)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0)).cuda()
    for model, opt in ((reference, plain), (fused, in_backward)):
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in fused.parameters())
    for key, value in lora_state_dict(reference).items():
        torch.testing.assert_close(lora_state_dict(fused)[key], value, rtol=0, atol=1e-5, msg=key)


class _InBackwardRegression(RegressionModule):
    def __init__(self, poison_batch: int | None = None, zero_gradients: bool = False) -> None:
        super().__init__()
        self.poison_batch, self.zero_gradients = poison_batch, zero_gradients

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if batch_idx == self.poison_batch:
            loss = loss * float("nan")
        return loss * 0.0 if self.zero_gradients else loss

    def configure_optimizers(self):
        return OptimizerInBackward(self.parameters(), torch.optim.AdamW, lr=self.lr)


def _guarded_fit(module, guard, max_steps=6):
    trainer = fast_trainer(plugins=[QLoRAPlugin(lora=LoRAConfig(r=4))], callbacks=[guard], max_steps=max_steps)
    trainer.fit(module, regression_loader())


def _adapters_finite(module):
    return all(torch.isfinite(p).all() for n, p in module.named_parameters() if "lora_" in n)


def test_training_guard_sees_the_gradients_of_steps_taken_in_backward():
    module = _InBackwardRegression()
    _guarded_fit(module, TrainingGuard())  # real gradients: the check passes although .grad is gone
    assert len(module.losses) == 6
    assert all(p.abs().sum() > 0 for n, p in module.named_parameters() if n.endswith("lora_B.weight"))  # updated
    with pytest.raises(NoAdapterGradientError, match="Only 0 of 3 LoRA adapters received a gradient at step 0"):
        _guarded_fit(_InBackwardRegression(zero_gradients=True), TrainingGuard())


def test_a_skipped_nan_batch_updates_nothing_in_backward():
    module = _InBackwardRegression(poison_batch=2)
    guard = TrainingGuard(on_nan="skip")
    with pytest.warns(UserWarning, match="Skipping a batch: the loss is nan"):
        _guarded_fit(module, guard)
    assert guard.skipped == [(2, 2)]
    assert _adapters_finite(module)  # the NaN gradients were dropped, not applied inside backward
