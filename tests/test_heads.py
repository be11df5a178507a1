"""Task heads trained whole (PEFT's ``modules_to_save``): kept out of 4-bit, trained in fp32, saved in the adapter
the way PEFT saves them, loaded back by PEFT and by us; sequence classification end to end through the Trainer."""

import json

import pytest
import torch
from helpers import fast_trainer
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_qlora import LoRAConfig, QLoRAPlugin, QuantConfig, convert_model, load_adapter, save_adapter
from lightning_qlora.config import ConfigError
from lightning_qlora.lora import iter_lora_layers, trainable_state_dict
from lightning_qlora.quant import is_quantized_linear

FP32_NONE = QuantConfig(quant_type="none", compute_dtype="fp32")
VOCAB, LABELS = 96, 3


def _bert(seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, num_labels=LABELS,
    )
    return BertForSequenceClassification(config).eval()


def _llama(seed=0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_labels=LABELS, pad_token_id=0,
    )
    return LlamaForSequenceClassification(config).eval()


def _roberta(seed=0):
    # Its head is a module holding two linears (classifier.dense, classifier.out_proj): both must stay whole.
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=80, num_labels=LABELS, pad_token_id=0,
    )
    return RobertaForSequenceClassification(config).eval()


MODELS = {"bert": (_bert, "classifier"), "llama": (_llama, "score"), "roberta": (_roberta, "classifier")}


def _head_weight(model, head_name):
    head = model.get_submodule(head_name)
    return head.weight if isinstance(head, nn.Linear) else head.out_proj.weight


def _rows(n=96, length=12):
    # The label is a function of the first token: learnable by a head over the sequence's representation.
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(1, VOCAB, (n, length), generator=generator)  # no pad id (0): every token is real
    return ids, ids[:, 0] % LABELS


class Classifier(LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        loss = self.model(input_ids=ids, labels=labels).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW((p for p in self.parameters() if p.requires_grad), lr=3e-3)


def _perturb(model, seed=1):
    """Give the adapters and the head non-zero, non-initial weights, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in iter_lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.05)
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_" not in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_sequence_classification_fine_tune_trains_the_head_in_full_precision(tmp_path, arch):
    build, head_name = MODELS[arch]
    module = Classifier(build())
    head_before = _head_weight(module.model, head_name).detach().clone()
    plugin = QLoRAPlugin(lora=LoRAConfig(r=4, alpha=8, dropout=0.0))
    ids, labels = _rows()
    trainer = fast_trainer(plugins=[plugin], strategy="qlora", max_steps=30)
    trainer.fit(module, DataLoader(TensorDataset(ids, labels), batch_size=16, shuffle=True))

    head = module.model.get_submodule(head_name)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in head.parameters())
    assert all(type(m) is nn.Linear for m in head.modules() if isinstance(m, nn.Linear))  # not 4-bit, no adapter
    assert not torch.equal(_head_weight(module.model, head_name).detach(), head_before)
    body = [layer for _, layer in iter_lora_layers(module.model)]
    assert body and all(is_quantized_linear(layer.base_layer) for layer in body)
    assert sum(module.losses[-5:]) < sum(module.losses[:5])
    # The resumable .ckpt (trainable weights only) carries the head with the adapters.
    assert any(key.startswith(f"model.{head_name}.") for key in trainable_state_dict(module))

    save_adapter(module, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == [head_name] and config["task_type"] == "SEQ_CLS"
    # Loaded onto the same 4-bit base with a freshly initialised head (what from_pretrained gives a new task head).
    fresh = build()
    nn.init.normal_(_head_weight(fresh, head_name), std=0.5)
    QLoRAPlugin(lora=LoRAConfig(r=4, alpha=8, dropout=0.0)).convert_module(fresh)
    load_adapter(fresh, tmp_path / "adapter")
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids[:8]).logits, module.model(input_ids=ids[:8]).logits)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_our_head_and_adapter_load_in_peft_with_the_same_logits(tmp_path, arch):
    from peft import PeftModel

    build, head_name = MODELS[arch]
    model = build()
    QLoRAPlugin(quant=FP32_NONE, lora=LoRAConfig(r=4, alpha=8, dropout=0.0)).convert_module(model)
    _perturb(model)
    save_adapter(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(build(), tmp_path / "adapter").eval()
    ids, _ = _rows(n=4)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)
    # PEFT trains its own copy of the head: the one it holds must be ours, not the base's.
    wrapped = peft_model.base_model.model.get_submodule(head_name)
    torch.testing.assert_close(
        _head_weight(wrapped.modules_to_save["default"], ""), _head_weight(model, head_name)
    )


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_a_peft_sequence_classification_adapter_loads_into_ours(tmp_path, arch):
    from peft import LoraConfig, TaskType, get_peft_model

    build, _ = MODELS[arch]
    peft_model = get_peft_model(build(), LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules="all-linear"))
    ids, labels = _rows(n=8)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(3):
        peft_model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft")

    ours = build()
    load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_no_modules_to_save_quantizes_and_adapts_the_head_like_any_linear():
    model = _bert()
    summary = convert_model(model, QuantConfig(), LoRAConfig(r=4, modules_to_save=()))
    assert summary.trained_whole == []
    assert is_quantized_linear(model.classifier.base_layer)
    assert not any(p.requires_grad for n, p in model.classifier.named_parameters() if "lora_" not in n)


def test_a_user_head_named_in_modules_to_save_trains_and_the_summary_says_so():
    model = nn.Sequential()
    model.add_module("body", nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64)))
    model.add_module("my_head", nn.Linear(64, 2))
    summary = convert_model(model, QuantConfig(), LoRAConfig(r=4, modules_to_save=["my_head"]))
    assert summary.trained_whole == ["my_head"]
    assert "my_head: trained, saved with the adapter" in summary.as_text()
    assert model.my_head.weight.dtype == torch.float32 and model.my_head.weight.requires_grad
    assert all(is_quantized_linear(layer.base_layer) for _, layer in iter_lora_layers(model))


@pytest.mark.parametrize("value", [5, [""], ["classifier", 3]])
def test_bad_modules_to_save_is_refused_with_the_fix(value):
    with pytest.raises(ConfigError, match=r"modules_to_save=.* must be a list of module names"):
        LoRAConfig(modules_to_save=value)
