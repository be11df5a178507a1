"""lightning_qlora's side of the H200 benchmark: the same Llama shapes, tokens and optimizer as the anchors.

    python benchmarks/bench_qlora.py --shape 7b --seq 2048 --rank 16 --ckpt 1 [--quant nf4|none] [--steps 8]
        [--optim adamw|paged_adamw_8bit] [--optim-in-backward 1] [--compile 1 [--compile-mode reduce-overhead]]

Builds the model on the meta device, quantizes it layer by layer on the GPU with lightning_qlora.quantize_model (a
7B or 65B model never exists in bf16), injects LoRA on all linear layers (r, alpha=2r, dropout 0.05, as the PEFT
anchor), trains with fused AdamW on the adapters, and prints one JSON line in the anchors' format.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "65b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=64),
}


def build(shape: str, quant_type: str, rank: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_qlora import LoRAConfig, QuantConfig, inject_lora, mark_only_lora_as_trainable, quantize_model

    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **SHAPES[shape])
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    quant = QuantConfig(quant_type=quant_type, compute_dtype="bf16")
    quantize_model(model, quant, device=device)  # layer by layer: each linear materialized and quantized on the GPU
    for name, module in model.named_modules():
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if any(t.is_meta for t in tensors):
            module.to_empty(device=device, recurse=False)
            for p in module.parameters(recurse=False):
                torch.nn.init.ones_(p) if "norm" in type(module).__name__.lower() else torch.nn.init.normal_(p, 0, 0.02)
            for p in module.parameters(recurse=False):
                p.data = p.data.to(torch.bfloat16)
    rotary = type(model.model.rotary_emb)
    try:  # rotary inverse frequencies are computed at construction: rebuild them off the meta device
        model.model.rotary_emb = rotary(config=cfg, device=device)
    except TypeError:  # newer transformers take no device argument
        model.model.rotary_emb = rotary(config=cfg).to(device)
    inject_lora(model, LoRAConfig(r=rank, alpha=2 * rank, dropout=0.05), skip_modules=quant.skip_modules)
    mark_only_lora_as_trainable(model)
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "none"])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--bs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--ckpt", type=int, default=1)
    ap.add_argument("--optim", default="adamw", choices=["adamw", "paged_adamw_8bit", "adamw8bit"],
                    help="adamw8bit: lightning_qlora.AdamW8bit (8-bit states in device memory, counted in the peak; "
                         "the paged states of paged_adamw_8bit live in CUDA managed memory, outside it)")
    ap.add_argument("--optim-in-backward", type=int, default=0,
                    help="step each adapter tensor inside backward and free its gradient (OptimizerInBackward)")
    ap.add_argument("--dequantize-fp32", type=int, default=0,
                    help="A/B of the fix: dequantize the 4-bit weights to fp32 and cast (the behaviour before it)")
    ap.add_argument("--fused", type=int, default=-1, help="LoRALinear.fused: 1 on, 0 the plain path, -1 auto (CUDA)")
    ap.add_argument("--compile", type=int, default=0, help="torch.compile each decoder layer")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode (e.g. reduce-overhead: CUDA graphs); default: torch's default")
    ap.add_argument("--recompute-dequantize", type=int, default=1,
                    help="compiled, no checkpointing: 0 lets the backward keep bf16 weights (the behaviour before)")
    ap.add_argument("--device", default="cuda", help="cpu only to smoke-test this script")
    ap.add_argument("--memory-report", type=int, default=0, help="print allocated/reserved GiB around the first steps")
    a = ap.parse_args()
    torch.manual_seed(0)
    device = a.device
    cuda = device.startswith("cuda")
    t0 = time.time()
    from lightning_qlora.lora import LoRALinear

    LoRALinear.fused = None if a.fused < 0 else bool(a.fused)
    model = build(a.shape, a.quant, a.rank, device)
    if a.dequantize_fp32:
        from lightning_qlora.quant import is_quantized_linear, quant_state_of

        for layer in model.modules():
            if is_quantized_linear(layer):
                quant_state_of(layer).dtype = torch.float32
    if a.compile:  # what QLoRAPlugin(compile=True) does after conversion
        from lightning_qlora.kernels import compile_blocks

        compile_blocks(model, recompute_dequantize=bool(a.recompute_dequantize),
                       **({"mode": a.compile_mode} if a.compile_mode else {}))
    if a.ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    setup_s = time.time() - t0
    if a.optim == "paged_adamw_8bit":  # the QLoRA paper's optimizer: 8-bit states, paged to the CPU under pressure
        import bitsandbytes as bnb

        optimizer_class, settings = bnb.optim.PagedAdamW8bit, dict(lr=1e-4)
    elif a.optim == "adamw8bit":
        from lightning_qlora import AdamW8bit

        optimizer_class, settings = AdamW8bit, dict(lr=1e-4, weight_decay=0.0)
    else:
        optimizer_class, settings = torch.optim.AdamW, dict(lr=1e-4, fused=cuda)
    if a.optim_in_backward:
        from lightning_qlora.optim.in_backward import OptimizerInBackward

        opt = OptimizerInBackward(params, optimizer_class, **settings)  # steps happen inside loss.backward()
    else:
        opt = optimizer_class(params, **settings)
    model.train()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    static = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step():
        ids = torch.randint(0, 32000, (a.bs, a.seq), device=device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def memory(label: str) -> None:
        if a.memory_report and cuda:
            stats = torch.cuda.memory_stats()
            print(f"[memory] {label}: allocated {torch.cuda.memory_allocated() / 2**30:.2f} GiB, reserved "
                  f"{torch.cuda.memory_reserved() / 2**30:.2f} GiB, peak reserved "
                  f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB, segments {stats.get('segment.all.current')}, "
                  f"alloc retries {stats.get('num_alloc_retries')}", flush=True)

    memory("after build")
    for i in range(2):
        step()
        memory(f"after step {i + 1}")
    sync()
    t = time.time()
    for _ in range(a.steps):
        loss = step()
    sync()
    dt = (time.time() - t) / a.steps
    # What the device itself has in use (allocator segments, CUDA context, resident managed pages such as a paged
    # optimizer's states, which the allocator's peak does not count), after the timed steps.
    device_used = (lambda free_total: free_total[1] - free_total[0])(torch.cuda.mem_get_info()) if cuda else None
    from torch._dynamo.utils import counters  # what compile did: graphs, recompiles, CUDA-graph skips

    compiled = dict(graphs=counters["stats"].get("unique_graphs", 0),
                    cudagraph_skips=counters["inductor"].get("cudagraph_skips", 0)) if a.compile else None
    print(json.dumps(dict(
        system="lightning_qlora" if a.quant != "none" else "lightning_qlora-bf16-lora", quant=a.quant, shape=a.shape,
        seq=a.seq, bs=a.bs, rank=a.rank, ckpt=a.ckpt, optim=a.optim, optim_in_backward=a.optim_in_backward, dequantize_fp32=a.dequantize_fp32, fused=a.fused, compile=a.compile,
        compile_mode=a.compile_mode, recompute_dequantize=a.recompute_dequantize, compiled=compiled, trainable=trainable, setup_s=round(setup_s, 1),
        static_gib=round(static / 2**30, 2), peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        device_used_gib=round(device_used / 2**30, 2) if cuda else None, step_s=round(dt, 4),
        tok_s=round(a.bs * a.seq / dt), loss=float(loss))), flush=True)


if __name__ == "__main__":
    main()
