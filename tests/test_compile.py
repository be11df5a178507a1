"""compile_blocks: what the compiled backward keeps, checked on the graphs inductor would get.

AOT autograd with inductor's own partitioner (min-cut rematerialization) and pass-through compilers: the forward and
backward graphs are split exactly as on the GPU, and run eagerly (no C++ build on CI).
"""

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import min_cut_rematerialization_partition

from lightning_qlora import LoRAConfig, QuantConfig, inject_lora, mark_only_lora_as_trainable, quantize_model
from lightning_qlora.kernels import compile_blocks
from lightning_qlora.lora import iter_lora_layers
from lightning_qlora.quantize import is_quantized_linear



def _run_as_traced(graph_module, example_inputs):
    return make_boxed_func(graph_module.forward)


MIN_CUT = aot_autograd(fw_compiler=_run_as_traced, bw_compiler=_run_as_traced,
                       partition_fn=min_cut_rematerialization_partition)


def _fused_qlora_llama(config):
    """A tiny bf16 Llama, NF4 + double quant, LoRA on every linear through the fused node (as on CUDA)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    quantize_model(model, QuantConfig(compute_dtype="bf16"))
    inject_lora(model, LoRAConfig(r=4, dropout=0.1, init_lora_weights="default"))
    mark_only_lora_as_trainable(model)
    for _, layer in iter_lora_layers(model):
        layer.fused = True
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)  # nonzero B: gradients reach A and the input too
    return model.train()


def _saved_for_backward(model, ids):
    """The shapes and dtypes of every tensor autograd saves during one forward, and the adapters' gradients."""
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return saved, grads


@pytest.mark.parametrize("recompute", [True, False])
def test_compiled_backward_saves_no_dequantized_weight(tiny_llama_config, recompute):
    torch._dynamo.reset()
    model = _fused_qlora_llama(tiny_llama_config)
    weight_shapes = {(m.out_features, m.in_features) for m in model.model.layers.modules() if is_quantized_linear(m)}
    compile_blocks(model, recompute_dequantize=recompute, backend=MIN_CUT)
    ids = torch.randint(0, tiny_llama_config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    saved, grads = _saved_for_backward(model, ids)
    saved_weights = [s for s in saved if s[0] in weight_shapes and s[1] == torch.bfloat16]
    if recompute:
        assert saved_weights == [], saved_weights
    else:  # the merged dequantize, as on the H200 (24.92 GiB for 7B): the check above can fail. Every linear of the
        # second block (the first block's q/k/v need no input gradient: the embeddings are frozen)
        assert len(saved_weights) >= 7, saved_weights

    torch._dynamo.reset()
    eager = _fused_qlora_llama(tiny_llama_config)
    torch.manual_seed(2)
    _, eager_grads = _saved_for_backward(eager, ids)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, eager_grads[name], rtol=2e-2, atol=2e-4, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_selective_policy_steps_aside_under_full_checkpointing(tiny_llama_config, checkpointing, monkeypatch):
    # With transformers' activation checkpointing the whole block is recomputed anyway: a selective checkpoint
    # nested inside would only add work.
    import lightning_qlora.kernels.compile as compile_module

    selective_calls = []
    original = compile_module.checkpoint

    def recording_checkpoint(*args, **kwargs):
        selective_calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(compile_module, "checkpoint", recording_checkpoint)
    torch._dynamo.reset()
    model = _fused_qlora_llama(tiny_llama_config)
    compile_blocks(model, backend=MIN_CUT)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, tiny_llama_config.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert bool(selective_calls) is not checkpointing
    with torch.no_grad():  # no backward, nothing to recompute: plain forward
        selective_calls.clear()
        model(input_ids=ids)
    assert not selective_calls
