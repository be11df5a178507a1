"""Packing: best-fit decreasing, the packed batch, and packed == unpacked (per-row losses and adapter gradients) on
tiny models of the families where packing has broken elsewhere (sliding windows, head dim 256)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_qlora import LoRAConfig, QLoRAPlugin, QuantConfig
from lightning_qlora.app.data.chat import IGNORE_INDEX
from lightning_qlora.app.data.packing import PackedRows, best_fit_decreasing, collate_packed
from lightning_qlora.kernels.chunked_loss import causal_lm_loss
from lightning_qlora.lora import iter_lora_layers


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=80), st.integers(64, 200))
def test_best_fit_decreasing_places_every_row_once_within_the_budget(lengths, budget):
    bins = best_fit_decreasing(lengths, budget)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= budget for b in bins)
    # Any-fit packing never leaves two bins half empty: the later one's first row would have fit the earlier one.
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert sum(load <= budget / 2 for load in loads) <= 1, loads


def test_best_fit_decreasing_fills_budgets_tightly_and_refuses_a_row_that_cannot_fit():
    lengths = [700, 300, 500, 500, 200, 800, 100, 900]  # 4,000 tokens: four budgets of 1,000 exactly
    bins = best_fit_decreasing(lengths, 1000)
    assert len(bins) == 4 and all(sum(lengths[i] for i in b) == 1000 for b in bins)
    with pytest.raises(ValueError, match="row 1 has 1001 tokens, more than the budget of 1000"):
        best_fit_decreasing([10, 1001], 1000)


def test_the_packed_batch_restarts_positions_and_masks_each_rows_first_label():
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [IGNORE_INDEX, 9]}]
    packed = PackedRows(rows, budget=8)
    batch = collate_packed([packed[0]], budget=8, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, -100]]
    assert int(batch["tokens"]) == 5 and packed.rows_per_item == 2.0


def _configs():
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    return {
        "llama": (LlamaConfig(**common), "LlamaForCausalLM"),
        # Sliding windows shorter than the rows: the window and the row boundary must both hold.
        "mistral": (MistralConfig(**common, sliding_window=6), "MistralForCausalLM"),
        "qwen2": (Qwen2Config(**common, sliding_window=6, use_sliding_window=True, max_window_layers=1),
                  "Qwen2ForCausalLM"),
        "qwen3": (Qwen3Config(**common, head_dim=16), "Qwen3ForCausalLM"),
        "gemma2": (Gemma2Config(**common, head_dim=16, sliding_window=6, attn_implementation="eager"),
                   "Gemma2ForCausalLM"),
        "gemma3": (Gemma3TextConfig(**common, head_dim=256, sliding_window=6), "Gemma3ForCausalLM"),
        "phi3": (Phi3Config(**common), "Phi3ForCausalLM"),
    }


ROWS = [(11, 5), (7, 2), (14, 9), (4, 1)]  # (length, labelled tokens at the end), like prompt + answer


def _rows(generator):
    rows = []
    for length, answer in ROWS:
        ids = torch.randint(1, 96, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (length - answer) + ids[-answer:]})
    return rows


def _per_row_losses(logits, labels, bounds):
    """Summed next-token cross entropy of each row, from logits and labels of one sequence."""
    losses = []
    for start, end in bounds:
        row_logits, row_labels = logits[start : end - 1], labels[start + 1 : end]
        losses.append(torch.nn.functional.cross_entropy(row_logits.float(), row_labels, ignore_index=IGNORE_INDEX,
                                                        reduction="sum"))
    return torch.stack(losses)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"])
def test_packed_rows_give_the_unpacked_losses_and_adapter_gradients(arch):
    import transformers

    config, class_name = _configs()[arch]
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(config).train()
    # The real 4-bit path, computing in fp32 so that the comparison is about attention, not rounding.
    QLoRAPlugin(quant=QuantConfig(compute_dtype="fp32"), lora=LoRAConfig(r=4, dropout=0.0)).convert_module(model)
    for _, layer in iter_lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)  # non-zero B: gradients reach A and the inputs
    rows = _rows(torch.Generator().manual_seed(1))

    unpacked_losses = []
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        logits = model(input_ids=ids).logits[0]
        unpacked_losses.append(_per_row_losses(logits, torch.tensor(row["labels"]), [(0, len(row["input_ids"]))])[0])
    torch.stack(unpacked_losses).sum().backward()
    unpacked_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    budget = sum(len(r["input_ids"]) for r in rows) + 3  # room for a padding tail
    batch = collate_packed([rows], budget=budget, pad_token_id=0)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    bounds, start = [], 0
    for row in rows:
        bounds.append((start, start + len(row["input_ids"])))
        start += len(row["input_ids"])
    packed_losses = _per_row_losses(logits, batch["labels"][0], bounds)
    packed_losses.sum().backward()

    torch.testing.assert_close(packed_losses, torch.stack(unpacked_losses).detach(), rtol=1e-5, atol=1e-5)
    # Gradients agree to 1e-5 of each tensor's largest entry (fp32 sums taken in another order: 3e-6 to 1e-5 seen).
    for name, grad in unpacked_grads.items():
        got = dict(model.named_parameters())[name].grad
        assert float((got - grad).abs().max()) <= 1e-5 * float(grad.abs().max()) + 1e-7, name
    # The collated labels take the same loss as the per-row sums (HF's mean over labelled tokens).
    mean = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"]).loss
    labelled = sum(answer for _, answer in ROWS)
    torch.testing.assert_close(mean, packed_losses.sum().detach() / labelled, rtol=1e-5, atol=1e-6)
    # The head and loss in chunks (the app's training loss) on the same packed, assistant-only batch.
    chunked = causal_lm_loss(model, batch["labels"], input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    torch.testing.assert_close(chunked, mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_offloaded_blocks_and_mlp_tiles_keep_the_packed_loss_and_gradients(arch):
    import transformers

    from lightning_qlora.kernels.offload import HostOffload, offload_block_inputs
    from lightning_qlora.kernels.tiled_mlp import tile_block_mlps

    def step(long_context):
        config, class_name = _configs()[arch]
        torch.manual_seed(0)
        model = getattr(transformers, class_name)(config).train()
        QLoRAPlugin(quant=QuantConfig(compute_dtype="fp32"), lora=LoRAConfig(r=4, dropout=0.0)).convert_module(model)
        for _, layer in iter_lora_layers(model):
            torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
        if long_context:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable({"use_reentrant": False})
            layers = list(model.model.layers)
            offload_block_inputs(layers, HostOffload(torch.device("cpu")))
            assert len(tile_block_mlps(layers, 5)) == len(layers)
        rows = _rows(torch.Generator().manual_seed(1))
        batch = collate_packed([rows], budget=sum(len(r["input_ids"]) for r in rows) + 3, pad_token_id=0)
        loss = causal_lm_loss(model, batch["labels"], input_ids=batch["input_ids"],
                              position_ids=batch["position_ids"])
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain_loss, plain_grads = step(False)
    loss, grads = step(True)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    for name, grad in plain_grads.items():
        assert float((grads[name] - grad).abs().max()) <= 1e-5 * float(grad.abs().max()) + 1e-7, name
