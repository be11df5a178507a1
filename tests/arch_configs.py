"""Tiny random models of the architectures people fine-tune, from transformers' own config classes (2 layers, CPU).

``ARCHS`` maps a name to ``(model class name, config factory, kind)``; kind ``causal``, ``seq2seq`` or ``seq_cls``.
"""

import torch
from moe_configs import MOE_ARCHS
from moe_configs import _config as _moe_config

VOCAB = 96
_BASE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}


def _dense(config_class: str, **extra):
    def make():
        import transformers

        return getattr(transformers, config_class)(**{**_BASE, **extra})
    return make


def _plain(config_class: str, **kwargs):
    def make():
        import transformers

        return getattr(transformers, config_class)(**kwargs)
    return make


def _moe(arch: str):
    return lambda: _moe_config(arch)


ARCHS = {
    "llama": ("LlamaForCausalLM", _dense("LlamaConfig"), "causal"),
    "mistral": ("MistralForCausalLM", _dense("MistralConfig", sliding_window=16), "causal"),
    "qwen2": ("Qwen2ForCausalLM", _dense("Qwen2Config"), "causal"),
    "qwen3": ("Qwen3ForCausalLM", _dense("Qwen3Config", head_dim=16), "causal"),
    "gemma": ("GemmaForCausalLM", _dense("GemmaConfig", head_dim=16), "causal"),
    "gemma2": ("Gemma2ForCausalLM", _dense("Gemma2Config", head_dim=16, sliding_window=16), "causal"),
    "gemma3": ("Gemma3ForCausalLM", _dense("Gemma3TextConfig", head_dim=16, sliding_window=16), "causal"),
    "phi3": ("Phi3ForCausalLM", _dense("Phi3Config", pad_token_id=0), "causal"),
    "olmo2": ("Olmo2ForCausalLM", _dense("Olmo2Config"), "causal"),
    "opt": ("OPTForCausalLM", _plain("OPTConfig", vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                     num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=128),
            "causal"),
    "falcon": ("FalconForCausalLM", _plain("FalconConfig", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2),
               "causal"),
    "gpt_neox": ("GPTNeoXForCausalLM", _plain("GPTNeoXConfig", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                              num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128),
                 "causal"),
    "gpt2": ("GPT2LMHeadModel", _plain("GPT2Config", vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128),
             "causal"),
    "t5": ("T5ForConditionalGeneration", _plain("T5Config", vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128,
                                                num_layers=2, num_heads=4, decoder_start_token_id=0), "seq2seq"),
    "bert": ("BertForSequenceClassification",
             _plain("BertConfig", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, num_labels=3), "seq_cls"),
    "qwen3_5": ("Qwen3_5ForCausalLM", _plain("Qwen3_5TextConfig", **{**_BASE, "head_dim": 16, "num_hidden_layers": 4,
                                                                     "layer_types": ["linear_attention",
                                                                                     "full_attention"] * 2,
                                                                     "linear_num_value_heads": 4,
                                                                     "linear_num_key_heads": 2,
                                                                     "linear_key_head_dim": 16,
                                                                     "linear_value_head_dim": 16}), "causal"),
    "mamba": ("MambaForCausalLM", _plain("MambaConfig", vocab_size=VOCAB, hidden_size=64, state_size=8,
                                         num_hidden_layers=2, expand=2, conv_kernel=4), "causal"),
    "jamba": ("JambaForCausalLM", _plain("JambaConfig", **{**_BASE, "num_experts": 4, "num_experts_per_tok": 2,
                                                           "attn_layer_period": 2, "attn_layer_offset": 1,
                                                           "expert_layer_period": 2, "expert_layer_offset": 1,
                                                           "mamba_d_state": 8, "mamba_expand": 2,
                                                           "use_mamba_kernels": False}), "causal"),
    **{arch: ("AutoModelForCausalLM", _moe(arch), "causal") for arch in MOE_ARCHS},
}


def build(arch: str, seed: int = 0):
    """A random-weight model of ``arch`` (eager attention), in eval mode."""
    import transformers

    class_name, make_config, _ = ARCHS[arch]
    torch.manual_seed(seed)
    config = make_config()
    config._attn_implementation = "eager"
    if class_name == "AutoModelForCausalLM":
        model = transformers.AutoModelForCausalLM.from_config(config)
    else:
        model = getattr(transformers, class_name)(config)
    return model.eval()
