"""Tiny random mixture-of-experts models built from transformers' own config classes (2 layers, CPU)."""

import torch

VOCAB = 96


def _config(arch: str):
    import transformers as tf

    common = {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 128}
    if arch == "mixtral":
        return tf.MixtralConfig(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, **common)
    if arch == "qwen2_moe":  # routed experts plus a shared expert behind a sigmoid gate
        return tf.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                 num_experts=4, num_experts_per_tok=2, **common)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                 **common)
    if arch == "gpt_oss":  # experts stored transposed, with biases, interleaved gate/up and a clamped SwiGLU
        return tf.GptOssConfig(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                               sliding_window=16, layer_types=["sliding_attention", "full_attention"], **common)
    if arch == "deepseek_v3":  # shared + routed experts, the first layer dense, multi-head latent attention
        common["num_key_value_heads"] = 4
        return tf.DeepseekV3Config(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4,
                                   num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                                   topk_group=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                                   qk_nope_head_dim=8, v_head_dim=16, **common)
    raise ValueError(arch)


MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v3")


def moe_model(arch: str, seed: int = 0):
    """A tiny causal LM of ``arch`` with random weights (biases and routers too), eager attention, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _config(arch)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # transformers zeroes some of these at init; random values test more
        for name, param in model.named_parameters():
            if name.endswith(("_bias", "router.weight", "gate.weight", "e_score_correction_bias")):
                param.normal_(0.0, 0.05)
    return model.eval()
