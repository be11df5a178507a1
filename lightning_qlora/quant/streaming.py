"""A model built on the meta device whose tensors are read from its checkpoint as the recipe reaches them.

:class:`StreamedWeights` answers two questions for the conversion recipe: "the full-precision weight of this linear,
on this device" (read into the recipe's reusable buffer, quantized at once, then overwritten by the next one) and
"materialize this block's other tensors" (norms, embeddings, an untied head: read in the compute dtype). So no more
than one layer's full-precision weight exists at a time, on the device or on the host. Tied parameters (an
``lm_head`` sharing the embedding) stay one parameter. Plain torch.
"""

from __future__ import annotations

import json
from collections import defaultdict

import torch
from torch import nn

from lightning_qlora.modules import FAN_IN_FAN_OUT
from lightning_qlora.quant.checkpoint import CheckpointError, SafetensorsCheckpoint
from lightning_qlora.quant.prefetch import WeightPrefetcher

# Set on a model whose parameters are on the meta device and whose weights are in a checkpoint on disk.
CHECKPOINT_ATTR = "_lightning_qlora_checkpoint"
# The safetensors header key under which a quantized checkpoint we save records its facts (base fingerprint, ...).
METADATA_KEY = "lightning_qlora"


def checkpoint_of(model: nn.Module) -> SafetensorsCheckpoint | None:
    """The checkpoint a model built by :func:`lightning_qlora.stream_pretrained` reads its weights from, if any."""
    return getattr(model, CHECKPOINT_ATTR, None)


class StreamedWeights:
    """Reads ``model``'s tensors from ``checkpoint`` by the names the model gives them.

    Args:
        model: the model (its parameters still on the meta device), names relative to it.
        checkpoint: where its weights are.

    Attributes:
        bytes_read: bytes copied out of the checkpoint so far.
    """

    def __init__(self, model: nn.Module, checkpoint: SafetensorsCheckpoint) -> None:
        self.checkpoint = checkpoint
        self.bytes_read = 0
        self._prefix = getattr(model, "base_model_prefix", "") or ""
        # Every name of each parameter object (a tied head and its embedding are one parameter with two names).
        names: dict[int, list[str]] = defaultdict(list)
        for name, param in model.named_parameters(remove_duplicate=False):
            names[id(param)].append(name)
        self._aliases = {name: group for group in names.values() for name in group}
        self._loaded: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id(meta) -> (meta, loaded)
        self._by_weight: dict[str, list[str]] | None = None
        self._prefetcher: WeightPrefetcher | None = None

    def key(self, name: str) -> str:
        """The checkpoint's name for the model's tensor ``name`` (itself, a tied alias, or with/without the base
        model's prefix).

        Raises:
            CheckpointError: when the checkpoint holds none of them.
        """
        candidates = []
        for alias in self._aliases.get(name, [name]):
            candidates.append(alias)
            if self._prefix and alias.startswith(self._prefix + "."):
                candidates.append(alias[len(self._prefix) + 1 :])
            elif self._prefix:
                candidates.append(f"{self._prefix}.{alias}")
        for candidate in candidates:
            if candidate in self.checkpoint:
                return candidate
        raise CheckpointError(
            f"{self.checkpoint.directory} has no tensor for the model's {name!r} (looked for {candidates}). The "
            "checkpoint is incomplete, or config.json describes another architecture than the weights."
        )

    def linear_weight(self, name: str, linear: nn.Linear, out: torch.Tensor) -> torch.Tensor:
        """The weight of the linear ``name`` read into ``out`` (a buffer of the linear's shape on the target device,
        in the checkpoint's dtype).
        """
        key = self.key(f"{name}.weight")
        info = self.checkpoint.info(key)
        self.bytes_read += info.nbytes
        if getattr(linear, FAN_IN_FAN_OUT, False):  # a Conv1D's weight, stored [in, out]
            stored = self.checkpoint.load(key, out.device, shape=tuple(linear.weight.shape)[::-1])
            return out.copy_(stored.t())
        if self._prefetcher is not None and info.shape == tuple(linear.weight.shape):
            if self._prefetcher.expects(key):
                return self._prefetcher.copy_into(key, out)
            self._prefetcher.stop()  # read out of the planned order: back to plain reads from here on
            self._prefetcher = None
        self.checkpoint.load(key, out.device, shape=tuple(linear.weight.shape), out=out)
        return out

    def prefetch(self, names: list[str], device: torch.device) -> None:
        """Read the weights of the linears ``names`` (in the order :meth:`linear_weight` will ask for them) ahead, on
        a thread, into pinned memory: on CUDA the disk and the copies then overlap the quantization.
        """
        if device.type != "cuda" or not names:
            return
        keys = [self.key(f"{name}.weight") for name in names]
        infos = [self.checkpoint.info(key) for key in keys]
        if len({info.dtype for info in infos}) != 1:
            return  # (mixed dtypes: plain reads)
        numel = max(info.nbytes // info.dtype.itemsize for info in infos)
        self._prefetcher = WeightPrefetcher(keys, self.checkpoint.view, numel, infos[0].dtype)

    def close(self) -> None:
        """Stop prefetching and let go of the checkpoint's memory maps."""
        if self._prefetcher is not None:
            self._prefetcher.stop()
            self._prefetcher = None
        self.checkpoint.close()

    def is_prequantized(self, name: str) -> bool:
        """Whether the checkpoint stores the linear ``name`` 4-bit already (its quant-state tensors are there)."""
        prefix = self.key(f"{name}.weight") + "."
        return any(n.startswith(prefix + "quant_state.bitsandbytes__") for n in self._state_names(prefix))

    def tensor(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The model's tensor ``name`` read onto ``device`` (floating ones in ``dtype``)."""
        key = self.key(name)
        info = self.checkpoint.info(key)
        self.bytes_read += info.nbytes
        return self.checkpoint.load(key, device, dtype if info.dtype.is_floating_point else info.dtype)

    def prequantized(self, name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """For a linear ``name`` stored 4-bit in the checkpoint (transformers' bitsandbytes format): its packed bytes
        and quant-state tensors (keys without the ``<name>.weight.`` prefix); ``None`` for a full-precision one.
        """
        if not self.is_prequantized(name):
            return None
        key = self.key(f"{name}.weight")
        prefix = key + "."
        state = {n[len(prefix):]: self.checkpoint.load(n, torch.device("cpu")) for n in self._state_names(prefix)}
        packed = self.checkpoint.load(key, torch.device("cpu"))
        self.bytes_read += self.checkpoint.info(key).nbytes + sum(t.numel() * t.element_size() for t in state.values())
        return packed, state

    def _state_names(self, prefix: str) -> list[str]:
        if self._by_weight is None:  # "<linear>.weight." -> its quant-state tensor names, built once
            grouped: dict[str, list[str]] = defaultdict(list)
            for tensor_name in self.checkpoint.tensors:
                head, dot, _ = tensor_name.partition(".weight.")
                if dot:
                    grouped[head + dot].append(tensor_name)
            self._by_weight = dict(grouped)
        return self._by_weight.get(prefix, [])

    @property
    def recorded_fingerprint(self) -> str | None:
        """The base weights' hash a checkpoint saved by :func:`lightning_qlora.save_quantized` records (the
        full-precision weights are not there to sample).
        """
        facts = json.loads(self.checkpoint.metadata.get(METADATA_KEY, "{}"))
        return facts.get("weights_sha256")

    def stored_dtype(self, name: str) -> torch.dtype:
        """The dtype the checkpoint stores the model's tensor ``name`` in."""
        return self.checkpoint.info(self.key(name)).dtype

    def materialize(
        self, prefix: str, piece: nn.Module, device: torch.device, dtype: torch.dtype, recurse: bool = True
    ) -> None:
        """Read every parameter of ``piece`` (named ``prefix`` in the model) still on the meta device, floating ones
        in ``dtype``, onto ``device`` (``recurse=False``: only its own, not its submodules'). A tied parameter already
        read is reused, so ties survive.
        """
        modules = piece.named_modules() if recurse else [("", piece)]
        for module_name, module in modules:
            for param_name, param in list(module._parameters.items()):
                if param is None or not param.is_meta:
                    continue
                if id(param) not in self._loaded:
                    full_name = ".".join(part for part in (prefix, module_name, param_name) if part)
                    key = self.key(full_name)
                    info = self.checkpoint.info(key)
                    target = dtype if info.dtype.is_floating_point else info.dtype
                    if param_name == "weight" and getattr(module, FAN_IN_FAN_OUT, False):  # stored [in, out]
                        stored = self.checkpoint.load(key, device, target, shape=tuple(param.shape)[::-1])
                        value = stored.t().contiguous()
                    else:
                        value = self.checkpoint.load(key, device, target, shape=tuple(param.shape))
                    self.bytes_read += info.nbytes
                    self._loaded[id(param)] = (param, nn.Parameter(value, requires_grad=param.requires_grad))
                module._parameters[param_name] = self._loaded[id(param)][1]
