"""Every weight a conversion left in full precision, by kind and size: nothing stays in bf16 unsaid.

Embeddings and norms are expected to (the QLoRA recipe keeps them); a linear kept by ``skip_modules`` (the output
head), a head trained whole, a router are kept on purpose; matrices the recipe could not quantize (3-D MoE expert
weights, transformers' ``Conv1D``, anything else of two or more dimensions) are reported as *not quantized*, and their
share of the model's matrix weights is what ``QLoRAPlugin(strict=...)`` checks. Plain torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from lightning_qlora.modules import is_adapter_parameter, is_inside
from lightning_qlora.quant.experts import packed_expert_params
from lightning_qlora.quant.weight import is_packed, is_quantized_linear

# Kinds that are full precision by design, in the order the summary lists them.
EXPECTED = ("embeddings", "norms", "kept linears", "trained whole", "routers", "biases", "convolutions", "state-space")
# Kinds that are matrices the recipe did not quantize.
NOT_QUANTIZED = ("MoE experts (3-D)", "Conv1D", "other matrices")


@dataclass
class FullPrecisionGroup:
    """One kind of full-precision weight: how many values, and the tensors' names."""

    kind: str
    params: int = 0
    names: list[str] = field(default_factory=list)

    @property
    def not_quantized(self) -> bool:
        return self.kind in NOT_QUANTIZED


@dataclass
class FullPrecisionReport:
    """The full-precision weights of a converted model, and the quantized matrices' size for scale."""

    groups: list[FullPrecisionGroup]
    quantized_params: int

    @property
    def not_quantized_params(self) -> int:
        return sum(g.params for g in self.groups if g.not_quantized)

    @property
    def not_quantized_share(self) -> float:
        """The share of the model's matrix weights (those quantized plus those that could have been) left in full
        precision.
        """
        total = self.quantized_params + self.not_quantized_params
        return self.not_quantized_params / total if total else 0.0

    def as_text(self) -> str:
        parts = []
        for group in self.groups:
            example = f", e.g. {group.names[0]}" if group.not_quantized else ""
            flag = " NOT QUANTIZED" if group.not_quantized else ""
            parts.append(f"{group.kind} {_count(group.params)}{flag} ({len(group.names)} tensors{example})")
        return "full precision: " + "; ".join(parts) if parts else "full precision: nothing"


def full_precision_report(model: nn.Module, trained_whole: Sequence[str] = ()) -> FullPrecisionReport:
    """Classify every full-precision parameter of ``model`` (tied tensors once)."""
    groups = {kind: FullPrecisionGroup(kind) for kind in (*EXPECTED, *NOT_QUANTIZED)}
    seen: set[int] = set()
    quantized = 0
    for module_name, module in model.named_modules():
        if is_quantized_linear(module):
            quantized += module.in_features * module.out_features
        quantized += packed_expert_params(module)
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if id(param) in seen or is_adapter_parameter(name) or is_packed(param) or is_quantized_linear(module):
                if is_quantized_linear(module) and param_name == "bias" and id(param) not in seen:
                    seen.add(id(param))
                    _add(groups["biases"], name, param.numel())
                continue
            seen.add(id(param))
            _add(groups[_kind(module, module_name, name, param.dim(), trained_whole)], name, param.numel())
    return FullPrecisionReport([g for g in groups.values() if g.params], quantized)


def _kind(module: nn.Module, module_name: str, name: str, dims: int, trained_whole: Sequence[str]) -> str:
    cls = type(module).__name__
    if is_inside(name, trained_whole):
        return "trained whole"
    if isinstance(module, nn.Embedding):
        return "embeddings"
    if name.rpartition(".")[2] in ("A_log", "D", "dt_bias"):  # a state-space layer's dynamics, not a weight matrix
        return "state-space"
    if name.endswith("bias"):  # gpt-oss' expert biases are 2-D
        return "biases"
    if "Norm" in cls or dims == 1:
        return "norms" if "Norm" in cls else "biases"
    if isinstance(module, nn.Linear):
        return "kept linears"
    if isinstance(module, nn.modules.conv._ConvNd):  # depthwise convolutions of state-space layers: small, kept
        return "convolutions"
    if "Router" in cls or "Gate" in cls or module_name.endswith((".gate", ".router")):
        return "routers"
    if dims >= 3:
        return "MoE experts (3-D)"
    if cls == "Conv1D":
        return "Conv1D"
    return "other matrices"


def _add(group: FullPrecisionGroup, name: str, count: int) -> None:
    group.params += count
    group.names.append(name)


def _count(params: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if params >= size:
            return f"{params / size:.1f} {unit} params"
    return f"{params} params"
