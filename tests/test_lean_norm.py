"""Lean RMSNorm: the module's own values and gradients, without keeping an fp32 copy of its input."""

import weakref

import pytest
import torch
import transformers

from lightning_qlora.kernels.lean_norm import LEAN_ATTR, is_llama_rms_norm, use_lean_norms
from lightning_qlora.memory_plan import ModelShape, estimate_bytes


def _norm(cls_name, hidden=64, trains=False, dtype=torch.float32):
    module = getattr(transformers, cls_name) if hasattr(transformers, cls_name) else None
    if module is None:
        import importlib

        family = cls_name.removesuffix("RMSNorm").lower()
        module = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), cls_name)
    norm = module(hidden, eps=1e-5)
    torch.nn.init.normal_(norm.weight, mean=1.0, std=0.1, generator=torch.Generator().manual_seed(1))
    return norm.to(dtype).requires_grad_(trains)


def _value_and_grads(norm, x, grad):
    x = x.detach().clone().requires_grad_()
    out = norm(x)
    out.backward(grad)
    return out.detach(), x.grad, None if norm.weight.grad is None else norm.weight.grad.clone()


@pytest.mark.parametrize("cls_name", ["LlamaRMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_lean_norm_gives_the_modules_values_and_gradients(cls_name, dtype, tol):
    generator = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(2, 9, 64, generator=generator)).to(dtype)
    grad = torch.randn(2, 9, 64, generator=generator).to(dtype)
    plain = _norm(cls_name, trains=True, dtype=dtype)
    lean = _norm(cls_name, trains=True, dtype=dtype)
    assert is_llama_rms_norm(lean) and use_lean_norms([torch.nn.Sequential(lean)]) == 1 and getattr(lean, LEAN_ATTR)
    for got, expected in zip(_value_and_grads(lean, x, grad), _value_and_grads(plain, x, grad), strict=True):
        torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)


def test_lean_norm_keeps_its_input_and_one_factor_per_token_only():
    x = torch.randn(1, 32, 64, dtype=torch.bfloat16, requires_grad=True)
    lean = _norm("LlamaRMSNorm", dtype=torch.bfloat16)
    use_lean_norms([torch.nn.Sequential(lean)])
    kept = []

    def pack(tensor):
        kept.append((weakref.ref(tensor), tensor.untyped_storage().nbytes(), tensor.data_ptr()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = lean(x)
    alive = {ptr: nbytes for ref, nbytes, ptr in kept if ref() is not None and ptr != lean.weight.data_ptr()}
    assert sum(alive.values()) == x.numel() * 2 + 32 * 4  # the bf16 input (alive anyway) and fp32 1/rms per token
    assert out.requires_grad


def test_other_norms_are_left_as_they_are_and_said(caplog):
    config = transformers.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    block = transformers.Gemma2ForCausalLM(config).model.layers[0]
    with caplog.at_level("INFO"):
        assert use_lean_norms([block]) == 0
    assert "Gemma2RMSNorm left as they are" in caplog.text


def test_a_tiled_llama_block_with_lean_norms_keeps_what_the_estimate_says():
    from lightning_qlora import LoRAConfig, QLoRAPlugin, QuantConfig
    from lightning_qlora.kernels.tiled_mlp import tile_block_mlps

    hidden, tokens = 128, 256
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    QLoRAPlugin(quant=QuantConfig(compute_dtype="bf16"), lora=LoRAConfig(r=4, dropout=0.0)).convert_module(model)
    shape = ModelShape.of(model, torch.bfloat16)
    assert shape.lean_norms
    blocks = list(model.model.layers)
    tile_block_mlps(blocks, 64)
    assert use_lean_norms(blocks) == 4
    params = {p.data_ptr() for p in model.parameters()}
    kept = {}

    def pack(tensor):
        if tensor.data_ptr() not in params:
            kept[tensor.untyped_storage().data_ptr()] = (weakref.ref(tensor), tensor.untyped_storage().nbytes())
        return tensor

    x = torch.randn(1, tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
    position = torch.arange(tokens)[None]
    embeddings = model.model.rotary_emb(x, position)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = blocks[0](x, position_embeddings=embeddings, position_ids=position)
    measured = sum(nbytes for ref, nbytes in kept.values() if ref() is not None)
    per_block = estimate_bytes(shape, tokens, checkpointing=False, mlp_tile_tokens=64, offloaded_blocks=0,
                               chunked_loss=True)["kept activations"] - 2 * hidden * tokens  # (the loss's part)
    # (One MLP tile's buffers are counted in the estimate's block: they exist only while that tile is recomputed.)
    predicted = per_block / 2 - 2 * 4 * 512 * 64
    assert abs(predicted - measured) / measured <= 0.1, (predicted, measured)
    # Without the lean norms the block keeps both norms' fp32 inputs besides: 8 bytes a hidden unit a token more.
    assert ModelShape.of(model, torch.bfloat16).lean_norms
    assert out is not None
