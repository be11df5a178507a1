"""The memory plan: an estimate close to what a step keeps, the cheapest fitting choice, a clear refusal."""

import pytest
import torch
import transformers

from lightning_qlora import LoRAConfig, QLoRAPlugin, QuantConfig
from lightning_qlora.kernels.chunked_loss import causal_lm_loss
from lightning_qlora.kernels.offload import OffloadedCheckpoint
from lightning_qlora.memory_plan import GIB, MemoryBudgetError, ModelShape, estimate_bytes, peak_bytes, plan_memory
from tests.helpers import CausalLMModule, fast_trainer, token_loader


def _converted(hidden=128, intermediate=512, layers=2, dtype="bf16"):
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                                      max_position_embeddings=512, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    QLoRAPlugin(quant=QuantConfig(compute_dtype=dtype), lora=LoRAConfig(r=8, dropout=0.0)).convert_module(model)
    return model.train()


def _saved_bytes(model, tokens):
    """Bytes of the tensors autograd keeps for backward after one step's forward (parameters excluded; what the
    forward saved and freed again, e.g. inside the chunked loss, not counted)."""
    import weakref

    params = {p.data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        if tensor.data_ptr() not in params:
            saved[id(tensor), tensor.untyped_storage().data_ptr()] = (weakref.ref(tensor),
                                                                     tensor.untyped_storage().nbytes())
        return tensor

    ids = torch.randint(1, 256, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = causal_lm_loss(model, ids, input_ids=ids)
    alive = {key[1]: nbytes for key, (ref, nbytes) in saved.items() if ref() is not None}
    del loss
    return sum(alive.values())


@pytest.mark.parametrize(("hidden", "intermediate"), [(128, 512), (256, 512), (128, 1024)])
def test_the_estimate_of_kept_activations_is_within_15_percent_of_what_autograd_saves(hidden, intermediate):
    model = _converted(hidden, intermediate, layers=3)
    tokens = 256
    shape = ModelShape.of(model, torch.bfloat16)
    estimate = estimate_bytes(shape, tokens, checkpointing=False, mlp_tile_tokens=None, offloaded_blocks=0,
                              chunked_loss=True)
    measured = _saved_bytes(model, tokens)
    assert abs(estimate["kept activations"] - measured) / measured <= 0.15, (estimate, measured)


def test_with_checkpointing_the_step_keeps_the_blocks_inputs_and_one_gradient_for_the_loss():
    from lightning_qlora.memory_plan import enable_checkpointing

    hidden, tokens = 256, 256
    model = _converted(hidden, 512, layers=3)
    enable_checkpointing(model)
    shape = ModelShape.of(model, torch.bfloat16)
    estimate = estimate_bytes(shape, tokens, checkpointing=True, mlp_tile_tokens=None, offloaded_blocks=0,
                              chunked_loss=True)
    # Three blocks' inputs and the gradient of the last one's output, bf16: the final norm runs inside the loss
    # and keeps nothing of the whole sequence.
    assert _saved_bytes(model, tokens) == estimate["kept activations"] == 4 * 2 * hidden * tokens


def test_each_smaller_budget_asks_for_the_next_measure_then_a_clear_refusal():
    model = _converted(layers=4)
    tokens = 4096

    def plan(budget):
        return plan_memory(model, budget / GIB, tokens, chunked_loss=True)

    shape = ModelShape.of(model, torch.bfloat16)

    def need(**choice):
        return peak_bytes(estimate_bytes(shape, tokens, chunked_loss=True, **choice)) / 0.9 + 1

    roomy = plan(need(checkpointing=False, mlp_tile_tokens=None, offloaded_blocks=0))
    assert (roomy.checkpointing, roomy.mlp_tile_tokens, roomy.offloaded_blocks) == (False, None, 0)
    checkpointed = plan(need(checkpointing=True, mlp_tile_tokens=None, offloaded_blocks=0))
    assert (checkpointed.checkpointing, checkpointed.mlp_tile_tokens) == (True, None)
    tiled = plan_memory(model, need(checkpointing=True, mlp_tile_tokens=512, offloaded_blocks=0) / GIB, tokens,
                        chunked_loss=True, mlp_tile_tokens=512)
    assert (tiled.mlp_tile_tokens, tiled.offloaded_blocks) == (512, 0)
    two = plan_memory(model, need(checkpointing=True, mlp_tile_tokens=512, offloaded_blocks=2) / GIB, tokens,
                      chunked_loss=True, mlp_tile_tokens=512)
    assert two.offloaded_blocks == 2
    assert "2 of 4 blocks' inputs offloaded to host memory" in two.as_text()
    assert two.estimated_bytes <= 0.9 * two.budget_bytes

    too_small = need(checkpointing=True, mlp_tile_tokens=512, offloaded_blocks=4) * 0.8
    with pytest.raises(MemoryBudgetError, match=r"The largest batch that would fit is about ([\d,]+) tokens") as info:
        plan_memory(model, too_small / GIB, tokens, chunked_loss=True, mlp_tile_tokens=512)
    largest = int(info.value.args[0].split("about ")[-1].split(" tokens")[0].replace(",", ""))
    assert 0 < largest < tokens
    fits = plan_memory(model, too_small / GIB, largest, chunked_loss=True, mlp_tile_tokens=512)  # what it said fits
    assert fits.offloaded_blocks <= 4
    # Checkpointing already on is kept; where offloading is impossible (sharded) it is never chosen.
    assert plan_memory(model, 1e3, tokens, chunked_loss=True, checkpointing_on=True).checkpointing
    with pytest.raises(MemoryBudgetError, match="no offloading"):
        plan_memory(model, too_small / GIB, tokens, chunked_loss=True, offload_possible=False, tiling_possible=False)


def test_offloading_is_chosen_only_as_far_as_the_host_memory_goes():
    from lightning_qlora.memory_plan import available_host_bytes, offloaded_bytes

    model = _converted(layers=4)
    tokens = 4096
    shape = ModelShape.of(model, torch.bfloat16)
    choice = {"checkpointing": True, "mlp_tile_tokens": 512, "offloaded_blocks": 2}
    budget = (peak_bytes(estimate_bytes(shape, tokens, chunked_loss=True, **choice)) / 0.9 + 1) / GIB
    two_blocks = offloaded_bytes(shape, tokens, 2)
    assert two_blocks == 2 * 2 * 128 * tokens
    plan = plan_memory(model, budget, tokens, chunked_loss=True, mlp_tile_tokens=512, host_bytes=two_blocks)
    assert plan.offloaded_blocks == 2 and plan.host_bytes == two_blocks
    assert "host memory for the offloaded inputs" in plan.as_text() and plan.as_metrics()["memory_plan/host_gib"] > 0
    with pytest.raises(MemoryBudgetError, match=r"2 of 4 blocks' inputs offloaded, 0.0 GiB of page-locked host "
                                                r"memory, but 0.0 GiB is all the host can spare"):
        plan_memory(model, budget, tokens, chunked_loss=True, mlp_tile_tokens=512, host_bytes=two_blocks - 1)
    assert available_host_bytes() > 2**28  # read from the machine: this one has more than 256 MiB free


def test_the_whole_sequence_logits_count_when_the_loss_is_not_chunked():
    model = _converted()
    shape = ModelShape.of(model, torch.bfloat16)
    common = {"checkpointing": True, "mlp_tile_tokens": None, "offloaded_blocks": 0}
    tokens = 2**20  # (at 256 tokens of vocabulary the logits are small until the sequence is long)
    whole = estimate_bytes(shape, tokens, chunked_loss=False, **common)["loss"]
    chunked = estimate_bytes(shape, tokens, chunked_loss=True, **common)["loss"]
    assert whole == tokens * 256 * (2 + 8)  # bf16 logits, their fp32 copy and its gradient
    assert chunked < whole


def test_a_model_without_a_transformers_config_is_refused_with_the_fix():
    with pytest.raises(MemoryBudgetError, match="Leave memory_budget_gib unset"):
        plan_memory(torch.nn.Sequential(torch.nn.Linear(4, 4)), 1.0, 16)


def test_the_plugin_plans_before_the_first_step_and_trains_the_same_adapters(tiny_llama_config, caplog):
    # A budget this small on a 4-layer model forces offloading and tiles: the adapters after training equal those
    # of a run without the plan (the plan changes where activations live, never what is computed).
    tiny_llama_config.num_hidden_layers = 4

    def fit(budget):
        module = CausalLMModule(tiny_llama_config)
        plugin = QLoRAPlugin(quant=QuantConfig(compute_dtype="fp32"), lora=LoRAConfig(r=4, dropout=0.0),
                             memory_budget_gib=budget, max_batch_tokens=4 * 16)
        trainer = fast_trainer(plugins=[plugin], strategy="qlora", max_steps=3)
        trainer.fit(module, token_loader(batch_size=4))
        state = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        return plugin, module, state

    _, _, plain = fit(None)
    shape = ModelShape.of(_converted_like(tiny_llama_config), torch.float32)
    # Enough for the model and all but the activations kept by two blocks.
    need = peak_bytes(estimate_bytes(shape, 64, checkpointing=True, mlp_tile_tokens=8192, offloaded_blocks=2,
                                     chunked_loss=False)) / 0.9 + 1
    with caplog.at_level("INFO"):
        plugin, module, planned = fit(need / GIB)
    plan = plugin.memory_plan
    assert plan is not None
    assert plan.checkpointing
    assert plan.offloaded_blocks == 2
    assert caplog.text.count("Memory plan for") == 1  # planned and applied once, though converted twice
    assert "2 of 4 blocks' inputs offloaded" in caplog.text
    layers = module.model.model.layers
    assert [isinstance(b._gradient_checkpointing_func, OffloadedCheckpoint) for b in layers] == [True, True, False,
                                                                                                  False]
    assert planned.keys() == plain.keys()
    for name, value in planned.items():
        # (atol 1e-5: the lean norms' backward sums in another order, fp32 rounding that AdamW's step scales up;
        # measured 2.5e-6 at one element of 256.)
        torch.testing.assert_close(value, plain[name], rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_the_plugin_needs_to_know_the_batch_size_and_a_positive_budget(tiny_llama_config):
    with pytest.raises(ValueError, match="positive number of GiB"):
        QLoRAPlugin(memory_budget_gib=0)
    module = CausalLMModule(tiny_llama_config)
    trainer = fast_trainer(plugins=[QLoRAPlugin(memory_budget_gib=10)], strategy="qlora", max_steps=1)
    with pytest.raises(ValueError, match="max_batch_tokens=rows x tokens per row"):
        trainer.fit(module, token_loader(batch_size=4))


def _converted_like(config):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    QLoRAPlugin(quant=QuantConfig(compute_dtype="fp32"), lora=LoRAConfig(r=4, dropout=0.0)).convert_module(model)
    return model


def test_offloaded_blocks_turn_compile_off_and_say_so(tiny_llama_config, caplog):
    from lightning_qlora.kernels.offload import HostOffload, offload_block_inputs

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    offload_block_inputs(list(model.model.layers), HostOffload(torch.device("cpu")))
    with caplog.at_level("INFO"), pytest.warns(UserWarning, match="activation offloading .2 blocks. run eagerly"):
        QLoRAPlugin(quant=QuantConfig(compute_dtype="fp32"), compile=True).convert_module(model)
    assert "eager: activation offloading (2 blocks) run outside torch.compile" in caplog.text
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in model.model.layers)
    assert all(isinstance(b._gradient_checkpointing_func, OffloadedCheckpoint) for b in model.model.layers)


def test_the_plan_counts_packed_experts_and_the_chunk_they_unpack_into(monkeypatch):
    import lightning_qlora.quant.experts as quant_experts
    from moe_configs import moe_model

    model = moe_model("qwen3_moe")
    QLoRAPlugin(quant=QuantConfig(compute_dtype="fp32"), lora=LoRAConfig(r=4, dropout=0.0)).convert_module(model)
    experts = model.model.layers[0].mlp.experts
    _, rows, columns = quant_experts.expert_shape(experts, "gate_up_proj")
    values = rows * columns  # one expert's gate_up: 4 of them are this model's largest unpacked weight
    assert ModelShape.of(model, torch.float32).largest_linear == 4 * values  # 4 experts at once
    monkeypatch.setattr(quant_experts, "EXPERT_SCRATCH_BYTES", 2 * values * 4)  # two experts' fp32 values
    shape = ModelShape.of(model, torch.float32)
    assert shape.largest_linear == 2 * values
    states = sum(quant_experts.state_nbytes(e._parameters[n].quant_state) for _, e in quant_experts.iter_experts(model)
                 for n in quant_experts.expert_weight_names(e))
    packed = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    assert states > 0 and shape.model_bytes >= packed + states
