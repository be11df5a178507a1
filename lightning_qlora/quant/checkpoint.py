"""A transformers checkpoint on disk, read one tensor at a time: ``model.safetensors`` or shards with their index.

Shards are memory-mapped and a tensor is a view of its bytes in the page cache, copied once, straight to where it is
wanted (the training device, or the recipe's reusable buffer there): reading a layer costs that layer's bytes and
no copy of them in the process's own memory. Every problem a damaged or mismatched checkpoint can have is found when it
is opened or when the tensor is asked for, and named with the file, the tensor and the fix: a missing shard, an index
naming a missing file, a truncated or corrupted shard, a missing tensor, a tensor of the wrong shape, an unsupported
dtype. Plain torch.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_qlora.errors import QLoRAError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors' dtype names -> torch dtypes (the ones weights come in; integer tensors are packed 4-bit bytes).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}
_HEADER_LIMIT = 100 * 2**20  # a larger header is not a safetensors file


class CheckpointError(QLoRAError, ValueError):
    """A checkpoint directory is incomplete, damaged, or does not fit the model (the message names file and tensor)."""


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives in the checkpoint and what it is."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0  # of the tensor's first byte in the file

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * torch.empty((), dtype=self.dtype).element_size()


class SafetensorsCheckpoint:
    """The tensors of a checkpoint directory, by name, read lazily.

    Args:
        directory: a directory holding ``model.safetensors``, or shards and ``model.safetensors.index.json``.

    Raises:
        CheckpointError: no safetensors weights, an unreadable index, an index naming a missing shard, a truncated or
            corrupted shard header, or a tensor of an unsupported dtype.

    Example:
        >>> checkpoint = SafetensorsCheckpoint("/models/llama-7b")  # doctest: +SKIP
        >>> checkpoint.load("model.embed_tokens.weight", torch.device("cpu"), torch.bfloat16)  # doctest: +SKIP
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for file in self._files():
            header, data_start = _read_header(file)
            self.metadata.update(header.pop("__metadata__", None) or {})
            for name, entry in header.items():
                dtype = DTYPES.get(entry.get("dtype", ""))
                if dtype is None:
                    raise CheckpointError(
                        f"{file}: tensor {name!r} has dtype {entry.get('dtype')!r}, which is not supported (supported: "
                        f"{', '.join(DTYPES)}). Convert the checkpoint to bf16 or fp32 safetensors."
                    )
                offset = data_start + entry["data_offsets"][0]
                self.tensors[name] = TensorInfo(file, dtype, tuple(entry["shape"]), offset)
        self._maps: dict[Path, mmap.mmap] = {}

    def _files(self) -> list[Path]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(
                    f"{index} is not a safetensors index (a JSON object with a 'weight_map'): {err}. Restore the file "
                    "from the original checkpoint."
                ) from None
            files = sorted({self.directory / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(
                    f"{index} names {len(missing)} shard(s) that are not in {self.directory}: {missing[:3]}. The "
                    "download or copy is incomplete: fetch the missing shards."
                )
            return files
        single = self.directory / SINGLE_FILE
        if single.is_file():
            return [single]
        found = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if found:
            raise CheckpointError(
                f"{self.directory} holds {found[:3]} but neither {SINGLE_FILE} nor {INDEX_FILE}: the index of the "
                "shards is missing. Restore it from the original checkpoint."
            )
        raise CheckpointError(
            f"{self.directory} holds no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}). Save the model with "
            "save_pretrained(..., safe_serialization=True), or point at the directory that has them."
        )

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        """What and where ``name`` is.

        Raises:
            CheckpointError: when the checkpoint has no such tensor.
        """
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(
                f"{self.directory} has no tensor {name!r} (it has {len(self.tensors)} tensors, e.g. "
                f"{sorted(self.tensors)[:3]}). The checkpoint is incomplete or belongs to another architecture."
            ) from None

    def load(
        self,
        name: str,
        device: torch.device,
        dtype: torch.dtype | None = None,
        shape: tuple[int, ...] | torch.Size | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Read ``name`` onto ``device`` (in ``dtype``, default: as stored); only this tensor's bytes are copied.

        Args:
            name: the tensor's name in the checkpoint.
            device: where the result goes.
            dtype: the result's dtype (default: the stored one).
            shape: the shape the model expects; a mismatch is refused.
            out: a buffer to copy into (the result is then ``out``): avoids a fresh allocation per layer.

        Raises:
            CheckpointError: a missing tensor, a shape mismatch, or a shard that cannot be read.
        """
        info = self.info(name)
        if shape is not None and tuple(shape) != info.shape:
            raise CheckpointError(
                f"{info.file}: tensor {name!r} has shape {list(info.shape)} but the model expects {list(shape)}. The "
                "checkpoint does not match the model's config.json (another size or architecture)."
            )
        view = self.view(name)
        if out is not None:
            out.copy_(view)
            return out
        if device.type == "cpu" and (dtype is None or dtype == view.dtype):
            return view.clone()  # its own memory, not a window onto the (read-only) file
        return view.to(device=device, dtype=dtype or view.dtype)

    def view(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as a view of its bytes in the memory-mapped file: no copy. Do not write to it."""
        info = self.info(name)
        numel = info.nbytes // info.dtype.itemsize
        if numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        flat = torch.frombuffer(self._map(info.file), dtype=info.dtype, count=numel, offset=info.offset)
        return flat.view(info.shape)

    def _map(self, file: Path) -> mmap.mmap:
        if file not in self._maps:
            with open(file, "rb") as handle:
                # Copy-on-write: a writable buffer for torch.frombuffer, whose pages stay the page cache's (shared,
                # file-backed) as long as nothing writes to them.
                self._maps[file] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[file]

    def close(self) -> None:
        """Drop the memory maps (they are opened again on the next read)."""
        self._maps.clear()


def _read_header(file: Path) -> tuple[dict[str, Any], int]:
    """The safetensors header of ``file`` and where its data starts, checked against the file's size (a truncated
    shard is refused here).
    """
    size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > _HEADER_LIMIT or 8 + length > size:
                raise ValueError(f"header length {length} does not fit a file of {size} bytes")
            header = json.loads(handle.read(length))
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{file} is not a readable safetensors file ({err}): truncated or corrupted. Fetch it again."
        ) from None
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise CheckpointError(
            f"{file} is truncated: its header describes {8 + length + end:,} bytes but the file has {size:,}. Fetch "
            "it again (an interrupted download or copy)."
        )
    return header, 8 + length
