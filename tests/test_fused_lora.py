"""The fused LoRA linear (one autograd node) against the plain path, its reference: same outputs and gradients."""

import copy

import pytest
import torch
from torch import nn

from lightning_qlora import LoRAConfig, QuantConfig, inject_lora, mark_only_lora_as_trainable, quantize_model
from lightning_qlora.lora import LoRALinear


def _layer(quantized: bool, bias: bool, dropout: float) -> LoRALinear:
    torch.manual_seed(0)
    base = nn.Linear(128, 96, bias=bias)
    if quantized:
        holder = nn.Sequential(base)
        quantize_model(holder, QuantConfig(skip_modules=()))
        base = holder[0]
    else:
        base = base.to(torch.bfloat16).requires_grad_(False)
    layer = LoRALinear(base, r=8, lora_alpha=16, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.05)  # a trained-looking adapter: B = 0 would hide half the math
    return layer.train()


def _run(layer: LoRALinear, fused: bool, x: torch.Tensor, weights: torch.Tensor):
    layer.fused = fused
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(123)  # the same dropout mask on both paths
    y = layer(x)
    (y.float() * weights).sum().backward()
    return y.detach().float(), x.grad.float(), layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone(), y


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("quantized", [True, False], ids=["nf4", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_fused_matches_the_plain_path_in_outputs_and_gradients(quantized, bias, dropout):
    layer = _layer(quantized, bias, dropout)
    x = torch.randn(2, 7, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    weights = torch.randn(2, 7, 96, generator=torch.Generator().manual_seed(2))
    plain = _run(layer, False, x, weights)
    fused = _run(layer, True, x, weights)
    assert type(fused[-1].grad_fn).__name__ == "FusedLoRALinearBackward"  # really the fused node
    assert type(plain[-1].grad_fn).__name__ != "FusedLoRALinearBackward"
    assert fused[-1].dtype == plain[-1].dtype == torch.bfloat16 and fused[-1].shape == (2, 7, 96)
    for name, f, p in zip(["output", "grad x", "grad A", "grad B"], fused[:4], plain[:4]):
        # bf16 tolerance: both paths round each matmul to bf16, in a different order (measured <= 0.67%; another
        # dropout mask gives 52% on grad A).
        assert _rel(f, p) < 2e-2, (name, _rel(f, p))
    assert fused[2].dtype == fused[3].dtype == torch.float32  # gradients for the fp32 master weights


def test_fused_path_is_cuda_only_by_default_and_skips_mismatched_dtypes():
    layer = _layer(quantized=True, bias=False, dropout=0.0)
    assert LoRALinear.fused is None
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    assert not layer._use_fused(x)  # CPU: the plain path unless asked
    layer.fused = True
    assert layer._use_fused(x)
    with torch.no_grad():
        assert not layer._use_fused(x)  # inference (generate) keeps bitsandbytes' path
    assert not layer._use_fused(x.float())  # fp32 input to a bf16-compute layer: the plain path casts it
    layer.use_dora = True
    assert not layer._use_fused(x)


def test_training_a_llama_with_the_fused_path_follows_the_plain_path(tiny_llama):
    quantize_model(tiny_llama, QuantConfig())
    inject_lora(tiny_llama, LoRAConfig(r=4, alpha=8, dropout=0.05), skip_modules=("lm_head",))
    mark_only_lora_as_trainable(tiny_llama)
    for module in tiny_llama.modules():  # bf16 activations, as under QLoRAPlugin
        for name, param in module.named_parameters(recurse=False):
            if param.dtype == torch.float32 and not param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    tiny_llama.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tiny_llama.train()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))

    def train(fused: bool) -> list[float]:
        model = copy.deepcopy(tiny_llama)
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.fused = fused
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        torch.manual_seed(7)
        losses = []
        for _ in range(5):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    plain, fused = train(False), train(True)
    assert plain[-1] < plain[0] and fused[-1] < fused[0]
    for p, f in zip(plain, fused):
        assert abs(p - f) / p < 1e-2, (plain, fused)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_fused_is_the_cuda_default_and_matches_the_plain_path_there(dropout):
    torch.manual_seed(0)
    base = nn.Linear(128, 96, bias=True)
    holder = nn.Sequential(base)
    quantize_model(holder, QuantConfig(skip_modules=()), device="cuda")
    layer = LoRALinear(holder[0], r=8, lora_alpha=16, dropout=dropout).train()
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.05)
    x = torch.randn(2, 7, 128, device="cuda", dtype=torch.bfloat16)
    weights = torch.randn(2, 7, 96, device="cuda")
    layer.fused = None
    assert layer._use_fused(x)  # on by default on CUDA
    plain = _run(layer, False, x, weights)
    fused = _run(layer, True, x, weights)
    assert type(fused[-1].grad_fn).__name__ == "FusedLoRALinearBackward"
    for name, f, p in zip(["output", "grad x", "grad A", "grad B"], fused[:4], plain[:4]):
        assert _rel(f, p) < 2e-2, (name, _rel(f, p))
