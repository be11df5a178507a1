"""``AdamW8bit``: bitsandbytes' blockwise 8-bit AdamW that also steps FSDP2-sharded parameters.

bitsandbytes' own 8-bit optimizers allocate their state with ``zeros_like(param)`` and hand the parameter to their
kernel, which fails on FSDP2's sharded parameters (``DTensor``). This optimizer runs the same kernel
(``optimizer_update_8bit_blockwise``, 256-value blocks, the dynamic quantization maps) on each rank's *local shard*:
Adam is element-wise, so a shard's update needs nothing from the other ranks. Each parameter costs two bytes of
state per value instead of AdamW's eight (65B at r 64: 0.8 B adapter values, 1.5 GiB of state instead of 6).

Its ``state_dict`` is torch AdamW's (``step``, ``exp_avg``, ``exp_avg_sq`` in fp32, laid out like the parameter,
so ``DTensor`` for a sharded one): FSDP's full-state checkpoint utilities gather it like any optimizer's, and a
checkpoint loads into either optimizer. Loading re-quantizes the moments to exactly the 8-bit codes and scales they
came from, so a resumed run is bit-identical to an uninterrupted one (``tests/test_optim_8bit.py``,
``tests/test_fsdp.py``). ``qlora_fsdp`` checkpoints go through :meth:`AdamW8bit.gathered_state_dict` and
:meth:`AdamW8bit.load_gathered_state_dict`, one moment at a time (the generic full-state path would hold every rank's
fp32 moments on the device at once).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_qlora._imports import import_bitsandbytes
from lightning_qlora.sharding import distribute_like, from_local_like, full_tensor
from lightning_qlora.sharding import local_tensor as _local

BLOCKSIZE = 256  # values per absmax in bitsandbytes' blockwise optimizer kernels


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with 8-bit blockwise moments (bitsandbytes' kernel), for plain and FSDP2-sharded parameters.

    Args:
        params: the parameters (or parameter groups) to optimize, plain tensors or ``DTensor`` shards.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay).
        min_8bit_size: tensors with fewer values keep fp32 moments, as in bitsandbytes. The whole tensor's size
            decides, not the shard's, so a parameter gets the same kind of state on any number of ranks.

    Example:
        >>> params = [torch.nn.Parameter(torch.zeros(64, 128))]
        >>> optimizer = AdamW8bit(params, lr=1e-3)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        min_8bit_size: int = 4096,
    ) -> None:
        problems = []
        if not lr >= 0.0:
            problems.append(f"lr={lr} must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            problems.append(f"betas={betas} must be in [0, 1)")
        if not eps >= 0.0:
            problems.append(f"eps={eps} must be >= 0")
        if not weight_decay >= 0.0:
            problems.append(f"weight_decay={weight_decay} must be >= 0")
        if problems:
            raise ValueError("AdamW8bit: " + "; ".join(problems) + ".")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.min_8bit_size = min_8bit_size
        self._maps: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _quantization_maps(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Bitsandbytes' dynamic maps: signed for the first moment, unsigned for the second."""
        if device not in self._maps:
            functional = import_bitsandbytes().functional
            self._maps[device] = (
                functional.create_dynamic_map(signed=True).to(device),
                functional.create_dynamic_map(signed=False).to(device),
            )
        return self._maps[device]

    def _is_8bit(self, param: Tensor) -> bool:
        return param.numel() >= self.min_8bit_size

    def _init_state(self, param: Tensor, state: dict[str, Any]) -> None:
        local = _local(param)
        state["step"] = torch.tensor(0.0)
        if self._is_8bit(param):
            blocks = -(-local.numel() // BLOCKSIZE)
            state["state1"] = torch.zeros_like(local, dtype=torch.uint8)
            state["state2"] = torch.zeros_like(local, dtype=torch.uint8)
            state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=local.device)
            state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=local.device)
        else:
            state["exp_avg"] = torch.zeros_like(local, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(local, dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    self._init_state(param, state)
                state["step"] += 1
                local, grad = _local(param), _local(param.grad)
                if local.numel() == 0:  # an empty shard (a tensor with fewer rows than ranks)
                    continue
                if not local.is_contiguous():
                    raise RuntimeError("AdamW8bit needs contiguous parameters (FSDP2 shards and nn.Parameters are).")
                step = int(state["step"].item())
                if "state1" in state:
                    signed, unsigned = self._quantization_maps(local.device)
                    import_bitsandbytes().functional.optimizer_update_8bit_blockwise(
                        "adam", grad.contiguous(), local, state["state1"], state["state2"], beta1, beta2, 0.0, 0.0,
                        group["eps"], step, group["lr"], signed, unsigned, state["absmax1"], state["absmax2"],
                        weight_decay=group["weight_decay"],
                    )
                else:
                    _adamw_fp32(local, grad, state, group, step)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """Torch AdamW's format: ``step``, and ``exp_avg``/``exp_avg_sq`` in fp32 laid out like each parameter."""
        saved = super().state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        saved["state"] = {index: self._portable(params[index], state) for index, state in saved["state"].items()}
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load AdamW8bit's or torch AdamW's state, one parameter at a time (the fp32 moments of one tensor are on the
        device at once, then re-quantized to 8 bits for large tensors).
        """
        saved_states = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})  # hyperparameters and the checks on the groups
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in saved_states.items():
            param = params[int(index)]
            self.state[param] = self._from_portable(param, saved)

    def gathered_state_dict(self, module: nn.Module) -> dict[str, Any]:
        """The whole state keyed by parameter name (``module.named_parameters()``), each moment gathered and moved to
        the CPU one tensor at a time: the full-state format of FSDP checkpoints, without dequantizing every moment
        on the device at once. With sharded parameters every rank must call it (the moments are all-gathered).
        """
        names = {id(p): name for name, p in module.named_parameters()}
        states: dict[str, Any] = {}
        groups = []
        for group in self.param_groups:
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": [names[id(p)] for p in group["params"]]})
            for param in group["params"]:
                if self.state.get(param):
                    portable = self._portable(param, self.state[param])
                    states[names[id(param)]] = {
                        key: full_tensor(value).cpu() if key != "step" else value for key, value in portable.items()
                    }
        return {"state": states, "param_groups": groups}

    def load_gathered_state_dict(self, module: nn.Module, state_dict: dict[str, Any]) -> None:
        """Load a whole state keyed by parameter name (:meth:`gathered_state_dict`, or any full optimizer state of an
        AdamW), taking each rank's shard of one tensor at a time.
        """
        params = dict(module.named_parameters())
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError(
                f"The saved optimizer state has {len(state_dict['param_groups'])} parameter group(s), this optimizer "
                f"{len(self.param_groups)}: was it saved for the same model and configure_optimizers()?"
            )
        for group, saved in zip(self.param_groups, state_dict["param_groups"], strict=False):
            group.update({k: v for k, v in saved.items() if k != "params"})
        unknown = sorted(set(state_dict["state"]) - set(params))
        if unknown:
            raise KeyError(f"The saved optimizer state names parameters this model lacks: {unknown[:5]}.")
        for name, saved in state_dict["state"].items():
            param = params[name]
            shards = {key: distribute_like(param, saved[key].to(_local(param).device, torch.float32))
                      for key in ("exp_avg", "exp_avg_sq")}
            self.state[param] = self._from_portable(param, {"step": saved["step"], **shards})

    def _from_portable(self, param: Tensor, saved: dict[str, Any]) -> dict[str, Any]:
        """This optimizer's state of ``param`` from torch AdamW's entries (whole, local or ``DTensor``)."""
        local = _local(param)
        state: dict[str, Any] = {"step": torch.as_tensor(saved["step"], dtype=torch.float32).cpu().clone()}
        exp_avg = _local(saved["exp_avg"]).to(local.device, torch.float32)
        exp_avg_sq = _local(saved["exp_avg_sq"]).to(local.device, torch.float32)
        if self._is_8bit(param):
            signed, unsigned = self._quantization_maps(local.device)
            state["state1"], state["absmax1"] = _quantize(exp_avg, signed)
            state["state2"], state["absmax2"] = _quantize(exp_avg_sq, unsigned)
        else:
            state["exp_avg"], state["exp_avg_sq"] = exp_avg.clone(), exp_avg_sq.clone()
        return state

    def _portable(self, param: Tensor, state: dict[str, Any]) -> dict[str, Any]:
        if "state1" not in state:
            out = dict(state)
            out["exp_avg"] = from_local_like(param, state["exp_avg"])
            out["exp_avg_sq"] = from_local_like(param, state["exp_avg_sq"])
            return out
        signed, unsigned = self._quantization_maps(state["state1"].device)
        return {
            "step": state["step"],
            "exp_avg": from_local_like(param, _dequantize(state["state1"], state["absmax1"], signed)),
            "exp_avg_sq": from_local_like(param, _dequantize(state["state2"], state["absmax2"], unsigned)),
        }


def _dequantize(codes: Tensor, absmax: Tensor, code_map: Tensor) -> Tensor:
    """The fp32 values of 8-bit blockwise ``codes``: ``code_map[code] * absmax[block]``, as the kernel reads them."""
    flat = code_map[codes.reshape(-1).long()]
    scale = absmax.repeat_interleave(BLOCKSIZE)[: flat.numel()]
    return (flat * scale).reshape(codes.shape)


def _quantize(values: Tensor, code_map: Tensor) -> tuple[Tensor, Tensor]:
    """Blockwise 8-bit codes of ``values`` and each block's absmax: the inverse of :func:`_dequantize`.

    For values that :func:`_dequantize` produced, the codes and absmax come back bit for bit: each block's absmax is
    recovered from its extreme values and the map's extremes (the kernel's largest negative code is -0.993, not -1),
    then each value takes the nearest code.
    """
    flat = values.reshape(-1).float()
    blocks = -(-flat.numel() // BLOCKSIZE)
    padded = torch.zeros(blocks * BLOCKSIZE, dtype=torch.float32, device=flat.device)
    padded[: flat.numel()] = flat
    grid = padded.view(blocks, BLOCKSIZE)
    top, bottom = code_map[-1], code_map[0]
    absmax = grid.amax(dim=1).clamp_min(0) / top
    if bottom < 0:
        absmax = torch.maximum(absmax, grid.amin(dim=1).clamp_max(0) / bottom)
    midpoints = (code_map[1:] + code_map[:-1]) / 2

    def encode(scale: Tensor) -> Tensor:
        return torch.bucketize(grid / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None], midpoints)

    codes = encode(absmax)
    # Division can land an ulp or two off the kernel's absmax: where a neighbour reproduces the block exactly, take it.
    exact = (code_map[codes] * absmax[:, None] == grid).all(dim=1)
    for _ in range(2):
        for direction in (float("inf"), 0.0):
            if bool(exact.all()):
                break
            candidate = torch.nextafter(absmax, torch.full_like(absmax, direction))
            candidate_codes = encode(candidate)
            fits = ~exact & (code_map[candidate_codes] * candidate[:, None] == grid).all(dim=1)
            absmax = torch.where(fits, candidate, absmax)
            codes = torch.where(fits[:, None], candidate_codes, codes)
            exact |= fits
    return codes.reshape(-1)[: flat.numel()].to(torch.uint8).reshape(values.shape), absmax


def _adamw_fp32(param: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any], step: int) -> None:
    beta1, beta2 = group["betas"]
    grad = grad.float()
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (state["exp_avg_sq"].sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])
    param.mul_(1 - group["lr"] * group["weight_decay"])
    param.addcdiv_(state["exp_avg"].to(param.dtype), denom.to(param.dtype), value=-group["lr"] / (1 - beta1**step))
