"""MLPs run over the sequence in tiles: the whole-sequence output and gradients, one tile's buffers at a time."""

import pytest
import torch
import transformers

from lightning_qlora import LoRAConfig, QLoRAPlugin, QuantConfig
from lightning_qlora.kernels.tiled_mlp import tile_block_mlps, tile_mlp
from lightning_qlora.lora import iter_lora_layers


def _model(dropout=0.0):
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    QLoRAPlugin(quant=QuantConfig(compute_dtype="fp32"), lora=LoRAConfig(r=4, dropout=dropout)).convert_module(model)
    torch.manual_seed(3)
    for _, layer in iter_lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    return model.train()


def _loss_and_grads(model, ids):
    torch.manual_seed(5)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("tile", [7, 40, 1000])  # uneven tiles, one tile a row, one tile for all
def test_tiles_give_the_whole_sequence_loss_and_gradients(tile):
    ids = torch.randint(1, 96, (2, 40), generator=torch.Generator().manual_seed(1))
    plain_loss, plain_grads = _loss_and_grads(_model(), ids)
    model = _model()
    assert len(tile_block_mlps(list(model.model.layers), tile)) == 2
    loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_backward_recomputes_the_forwards_dropout_masks():
    # With dropout a tile draws its own mask: the backward must redraw exactly those. Reference: the same tiles run
    # one after another with plain autograd, from the same seed.
    model = _model(dropout=0.3)
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 30, 64, generator=torch.Generator().manual_seed(2))
    grad_out = torch.randn(1, 30, 64, generator=torch.Generator().manual_seed(3))
    params = [p for p in mlp.parameters() if p.requires_grad]

    torch.manual_seed(9)
    x_ref = x.clone().requires_grad_()
    reference = torch.cat([mlp(x_ref[:, i : i + 8]) for i in range(0, 30, 8)], dim=1)
    expected = torch.autograd.grad(reference, [x_ref, *params], grad_out)

    tile_mlp(mlp, 8)
    torch.manual_seed(9)
    x_tiled = x.clone().requires_grad_()
    out = mlp(x_tiled)
    found = torch.autograd.grad(out, [x_tiled, *params], grad_out)
    torch.testing.assert_close(out, reference)
    for got, want in zip(found, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_each_adapter_receives_one_gradient_and_eval_tiles_without_a_graph():
    model = _model()
    tile_block_mlps(list(model.model.layers), 5)
    counts = {}
    for name, param in model.named_parameters():
        if param.requires_grad and ".mlp." in name:
            counts[name] = 0
            param.register_post_accumulate_grad_hook(lambda p, n=name: counts.__setitem__(n, counts[n] + 1))
    ids = torch.randint(1, 96, (1, 23), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    assert counts
    assert set(counts.values()) == {1}
    with torch.no_grad():
        tiled = model(input_ids=ids).logits
    plain = _model()
    with torch.no_grad():
        torch.testing.assert_close(tiled, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_mixtures_of_experts_are_left_whole_and_said(caplog):
    config = transformers.Qwen3MoeConfig(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                         num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = transformers.Qwen3MoeForCausalLM(config)
    with caplog.at_level("INFO"):
        assert tile_block_mlps(list(model.model.layers), 8) == []
    assert "Qwen3MoeSparseMoeBlock left whole" in caplog.text
    with pytest.raises(ValueError, match="at least 1"):
        tile_mlp(model.model.layers[0].mlp, 0)
