"""Checkpointed blocks whose inputs wait in host memory: the same loss and gradients, the device copy freed."""

import functools
import weakref

import pytest
import torch
import transformers

from lightning_qlora import LoRAConfig, QLoRAPlugin, QuantConfig
from lightning_qlora.kernels.offload import HostOffload, OffloadedCheckpoint, offload_block_inputs
from lightning_qlora.lora import iter_lora_layers


def _model(dropout=0.1, layers=3, device="cpu"):
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device)
    # (Eager on CUDA too: a compiled block would run its own checkpoint; offload_block_inputs refuses one.)
    plugin = QLoRAPlugin(quant=QuantConfig(compute_dtype="fp32"), lora=LoRAConfig(r=4, dropout=dropout),
                         compile=False)
    plugin.convert_module(model)
    torch.manual_seed(3)
    for _, layer in iter_lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    return model.train()


def _checkpoint(model):
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def _step(model, ids):
    torch.manual_seed(5)  # the same dropout draws in every variant
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _ids(device="cpu"):
    return torch.randint(1, 96, (2, 40), generator=torch.Generator().manual_seed(1)).to(device)


@pytest.mark.parametrize("offloaded", [1, 3])
def test_offloaded_blocks_give_the_plain_loss_and_gradients_with_dropout(offloaded):
    plain_loss, plain_grads = _step(_model(), _ids())
    model = _model()
    _checkpoint(model)
    offload = HostOffload(torch.device("cpu"))
    offload_block_inputs(list(model.model.layers)[:offloaded], offload)
    loss, grads = _step(model, _ids())
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():  # the recompute drew the forward's dropout masks: equal, not close
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-6, atol=1e-7, msg=name)
    assert offload.bytes_offloaded == offloaded * 2 * 40 * 64 * 4  # one fp32 block input each
    assert (offload.prefetched, offload.fetched_late) == (offloaded - 1, 1)  # each fetch brought the next one along


def test_the_device_copy_of_an_offloaded_input_is_freed_in_forward():
    def kept_after_forward(offload):
        model = _model(dropout=0.0)
        _checkpoint(model)
        if offload:
            offload_block_inputs(list(model.model.layers), HostOffload(torch.device("cpu")))
        refs = []
        hook = model.model.layers[0].register_forward_hook(lambda m, args, out: refs.append(weakref.ref(out)))
        loss = model(input_ids=_ids(), labels=_ids()).loss
        hook.remove()
        alive = refs[0]() is not None  # block 0's output is block 1's input
        loss.backward()
        return alive

    assert kept_after_forward(offload=False)  # torch's checkpoint keeps it for block 1's recompute
    assert not kept_after_forward(offload=True)  # offloaded: only the host copy waits for backward


def test_each_adapter_receives_one_gradient_per_step():
    model = _model(dropout=0.0)
    _checkpoint(model)
    offload_block_inputs(list(model.model.layers), HostOffload(torch.device("cpu")))
    counts = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            counts[name] = 0
            param.register_post_accumulate_grad_hook(lambda p, n=name: counts.__setitem__(n, counts[n] + 1))
    model(input_ids=_ids(), labels=_ids()).loss.backward()
    assert counts
    assert set(counts.values()) == {1}


def test_a_keyword_tensor_that_needs_grad_is_checkpointed_on_the_device_and_said(caplog):
    block = torch.nn.Linear(4, 4)
    checkpoint = OffloadedCheckpoint(block, HostOffload(torch.device("cpu")))
    scale = torch.ones(4, requires_grad=True)
    x = torch.randn(3, 4, requires_grad=True)
    with caplog.at_level("WARNING"):
        out = checkpoint(functools.partial(lambda h, scale: block(h) * scale, scale=scale), x)
    out.sum().backward()
    assert scale.grad is not None
    assert x.grad is not None
    assert checkpoint.fallbacks == 1
    assert "checkpointed on the device instead" in caplog.text


def test_offloading_a_block_that_is_not_checkpointed_is_refused():
    model = _model()
    with pytest.raises(ValueError, match="not activation-checkpointed: enable checkpointing first"):
        offload_block_inputs(list(model.model.layers), HostOffload(torch.device("cpu")))
    with pytest.raises(ValueError, match="not a transformers checkpointing layer"):
        offload_block_inputs([torch.nn.Linear(2, 2)], HostOffload(torch.device("cpu")))


@pytest.mark.gpu
def test_on_cuda_the_inputs_go_to_pinned_memory_and_the_gradients_match():
    device = torch.device("cuda")
    plain_loss, plain_grads = _step(_model(device=device), _ids(device))
    model = _model(device=device)
    _checkpoint(model)
    offload = HostOffload(device)
    offload_block_inputs(list(model.model.layers), offload)
    loss, grads = _step(model, _ids(device))
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert offload.prefetched == 2
    assert offload.fetched_late == 1


@pytest.mark.gpu
def test_on_cuda_offloading_lowers_the_peak_by_the_kept_inputs():
    device = torch.device("cuda")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192)
    ids = torch.randint(1, 256, (1, 8192), device=device)

    def peak(offload):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).to(device)
        QLoRAPlugin(lora=LoRAConfig(r=8, dropout=0.0), compile=False).convert_module(model)  # bf16 compute
        _checkpoint(model)
        if offload:
            offload_block_inputs(list(model.model.layers), HostOffload(device))
        model.train()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        model(input_ids=ids, labels=ids).loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    kept_inputs = 8 * 8192 * 512 * 2  # bf16 block inputs
    saved = peak(False) - peak(True)
    assert saved >= 0.5 * kept_inputs, (saved, kept_inputs)


def test_a_compiled_block_is_refused_with_the_fix():
    model = _model(layers=1)
    _checkpoint(model)
    block = model.model.layers[0]
    block.compile()
    with pytest.raises(ValueError, match=r"is compiled .*QLoRAPlugin\(compile=False\)"):
        offload_block_inputs([block], HostOffload(torch.device("cpu")))
