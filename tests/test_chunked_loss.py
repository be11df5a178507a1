"""The head and loss in chunks: the plain path's loss and gradients, without the whole sequence's logits."""

import pytest
import torch

from lightning_qlora import LoRAConfig, QLoRAPlugin, QuantConfig
from lightning_qlora.kernels.chunked_loss import causal_lm_loss, chunked_cross_entropy
from lightning_qlora.lora import iter_lora_layers


@pytest.mark.parametrize("softcap,scale,trains_head", [(None, 1.0, False), (30.0, 1.0, True), (None, 0.125, False)])
def test_chunks_equal_the_plain_loss_and_gradients_in_fp32(softcap, scale, trains_head):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator).requires_grad_(trains_head)
    labels = torch.randint(0, 50, (37,), generator=generator)
    labels[::5] = -100
    logits = hidden @ weight.t() * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    plain = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)
    plain.backward()
    expected = (hidden.grad.clone(), weight.grad.clone() if trains_head else None)
    hidden.grad = None
    weight.grad = None
    chunked = chunked_cross_entropy(hidden, weight, labels, softcap=softcap, scale=scale, chunk_tokens=8)
    (2 * chunked).backward()  # whatever scales the loss scales its gradients
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad, 2 * expected[0], rtol=1e-5, atol=1e-6)
    if trains_head:
        torch.testing.assert_close(weight.grad, 2 * expected[1], rtol=1e-5, atol=1e-6)


def _tiny(arch):
    import transformers

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    config = {"llama": transformers.LlamaConfig(**common),
              "gemma2": transformers.Gemma2Config(**common, head_dim=16, final_logit_softcapping=5.0,
                                                  attn_implementation="eager")}[arch]
    model_class = {"llama": transformers.LlamaForCausalLM, "gemma2": transformers.Gemma2ForCausalLM}[arch]
    torch.manual_seed(0)
    return model_class(config)


def _loss_and_grads(arch, compute, chunked):
    model = _tiny(arch)
    QLoRAPlugin(quant=QuantConfig(compute_dtype=compute), lora=LoRAConfig(r=4, dropout=0.0)).convert_module(model)
    torch.manual_seed(3)
    for _, layer in iter_lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    ids = torch.randint(1, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :6] = -100
    loss = causal_lm_loss(model, labels, input_ids=ids) if chunked else model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


def _worst(grads, reference):
    return max(float((grads[n] - g).abs().max()) / float(g.abs().max()) for n, g in reference.items())


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_a_qlora_model_gets_the_plain_loss_and_adapter_gradients(arch):
    # fp32 compute: float rounding only.
    plain, plain_grads = _loss_and_grads(arch, "fp32", chunked=False)
    chunked, chunked_grads = _loss_and_grads(arch, "fp32", chunked=True)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    assert _worst(chunked_grads, plain_grads) <= 1e-5
    # bf16 compute: never farther from the fp32 result than the plain path is (Gemma 2's plain path soft-caps its
    # logits in bf16; the chunked one in fp32).
    plain16, plain16_grads = _loss_and_grads(arch, "bf16", chunked=False)
    chunked16, chunked16_grads = _loss_and_grads(arch, "bf16", chunked=True)
    assert abs(float(chunked16 - plain)) <= abs(float(plain16 - plain)) + 2e-3
    assert _worst(chunked16_grads, plain_grads) <= 1.25 * _worst(plain16_grads, plain_grads) + 1e-3


def test_other_models_run_as_they_are_and_say_so(caplog):
    import logging

    import transformers

    config = transformers.GPTNeoXConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=64)
    model = transformers.GPTNeoXForCausalLM(config)
    ids = torch.randint(0, 96, (1, 10))
    with caplog.at_level(logging.INFO):
        loss = causal_lm_loss(model, ids, input_ids=ids)
    torch.testing.assert_close(loss, model(input_ids=ids, labels=ids).loss)
    assert any("model_type 'gpt_neox'" in r.getMessage() for r in caplog.records)
