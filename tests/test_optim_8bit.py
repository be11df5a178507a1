"""AdamW8bit: bitsandbytes' 8-bit blockwise AdamW kernel, for plain and FSDP2-sharded parameters.

Its FSDP behaviour (shards stepped locally, moments gathered into the checkpoint, bit-exact resume) runs in
tests/test_fsdp.py on 2 gloo processes.
"""

import copy

import bitsandbytes as bnb
import pytest
import torch

from lightning_qlora.optim.adamw8bit import AdamW8bit, _dequantize, _quantize

SHAPES = [(64, 300), (5001,), (16, 8)]  # two 8-bit tensors (one with a partial last block), one small fp32 one


def _params(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in SHAPES]


def _grads(steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=generator) * (i + 1) for shape in SHAPES] for i in range(steps)]


def _train(params, optimizer, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_updates_equal_bitsandbytes_adamw8bit():
    ours, theirs = _params(), _params()
    grads = _grads(5)
    _train(ours, AdamW8bit(ours, lr=1e-2, weight_decay=0.1), grads)
    _train(theirs, bnb.optim.AdamW8bit(theirs, lr=1e-2, weight_decay=0.1), grads)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])  # the same 8-bit kernel
    torch.testing.assert_close(ours[2], theirs[2], rtol=0, atol=1e-6)  # fp32 moments: torch ops vs bnb's kernel


def test_close_to_torch_adamw_with_a_quarter_of_its_state():
    ours, reference, start = _params(), _params(), _params()
    grads = _grads(5)
    optimizer = AdamW8bit(ours, lr=1e-2, weight_decay=0.1)
    _train(ours, optimizer, grads)
    _train(reference, torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.1), grads)
    for p, r, s in zip(ours, reference, start):
        moved = (r - s).abs().max()
        assert (p - r).abs().max() < 0.1 * moved  # 8-bit moments: the updates agree to a few percent
    state = optimizer.state[ours[0]]
    state_bytes = sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    assert state_bytes < 2.1 * ours[0].numel()  # 2 bytes per value + absmax, vs AdamW's 8


def test_state_dict_is_torch_adamws_and_resume_is_bit_exact():
    grads = _grads(6)
    full = _params()
    _train(full, AdamW8bit(full, lr=1e-2, weight_decay=0.1), grads)

    first = _params()
    optimizer = AdamW8bit(first, lr=1e-2, weight_decay=0.1)
    _train(first, optimizer, grads[:3])
    saved = copy.deepcopy(optimizer.state_dict())
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in saved["state"].values())
    assert [s["exp_avg"].dtype for s in saved["state"].values()] == [torch.float32] * 3
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    again = AdamW8bit(resumed, lr=1e-2, weight_decay=0.1)
    again.load_state_dict(saved)
    _train(resumed, again, grads[3:])
    assert all(torch.equal(a, b) for a, b in zip(full, resumed))


def test_a_torch_adamw_checkpoint_loads_and_back():
    params = _params()
    adamw = torch.optim.AdamW(params, lr=1e-2)
    _train(params, adamw, _grads(2))
    eight = AdamW8bit(params, lr=1e-2)
    eight.load_state_dict(adamw.state_dict())
    restored = eight.state_dict()["state"]
    for index, state in adamw.state_dict()["state"].items():
        scale = state["exp_avg"].abs().max()
        assert (restored[index]["exp_avg"] - state["exp_avg"]).abs().max() < 0.02 * scale
    torch.optim.AdamW(params, lr=1e-2).load_state_dict(eight.state_dict())  # and the other way


def test_requantizing_dequantized_moments_gives_the_same_codes_and_absmax():
    params = _params()
    optimizer = AdamW8bit(params, lr=1e-2)
    _train(params, optimizer, _grads(4))
    signed, unsigned = optimizer._quantization_maps(torch.device("cpu"))
    for p in params[:2]:
        state = optimizer.state[p]
        for codes, absmax, code_map in ((state["state1"], state["absmax1"], signed),
                                        (state["state2"], state["absmax2"], unsigned)):
            again, again_absmax = _quantize(_dequantize(codes, absmax, code_map), code_map)
            assert torch.equal(again, codes) and torch.equal(again_absmax, absmax)


def test_refuses_invalid_settings():
    with pytest.raises(ValueError, match=r"lr=-1.*betas=\(1.0, 0.9\)"):
        AdamW8bit(_params(), lr=-1, betas=(1.0, 0.9))


def test_gathered_state_dict_is_keyed_by_name_and_loads_back_bit_exactly():
    # What qlora_fsdp checkpoints through (one moment at a time, whole tensors on the CPU); plain tensors here.
    module = torch.nn.ParameterDict({f"p{i}": p for i, p in enumerate(_params())})
    params = list(module.values())
    grads = _grads(5)
    optimizer = AdamW8bit(params, lr=1e-2, weight_decay=0.1)
    _train(params, optimizer, grads[:3])
    gathered = copy.deepcopy(optimizer.gathered_state_dict(module))
    assert sorted(gathered["state"]) == ["p0", "p1", "p2"] and gathered["param_groups"][0]["params"] == ["p0", "p1", "p2"]
    assert gathered["state"]["p0"]["exp_avg"].device.type == "cpu"
    torch.testing.assert_close(gathered["state"]["p0"]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    reference_optimizer = AdamW8bit(reference, lr=1e-2, weight_decay=0.1)
    reference_optimizer.load_state_dict(optimizer.state_dict())
    again = AdamW8bit(params, lr=1e-2, weight_decay=0.1)
    again.load_gathered_state_dict(module, gathered)
    _train(params, again, grads[3:])
    _train(reference, reference_optimizer, grads[3:])
    assert all(torch.equal(a, b) for a, b in zip(params, reference))
    with pytest.raises(KeyError, match="lacks.*'q0'"):
        again.load_gathered_state_dict(module, {**gathered, "state": {"q0": gathered["state"]["p0"]}})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_updates_equal_bitsandbytes_and_resume_is_exact():
    ours = [torch.nn.Parameter(p.detach().cuda()) for p in _params()]
    theirs = [torch.nn.Parameter(p.detach().cuda()) for p in _params()]
    grads = [[g.cuda() for g in step] for step in _grads(4)]
    optimizer = AdamW8bit(ours, lr=1e-2, weight_decay=0.1)
    _train(ours, optimizer, grads[:2])
    _train(theirs, bnb.optim.AdamW8bit(theirs, lr=1e-2, weight_decay=0.1), grads)
    again = AdamW8bit(ours, lr=1e-2, weight_decay=0.1)
    again.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # resume half way: re-quantized exactly
    _train(ours, again, grads[2:])
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
