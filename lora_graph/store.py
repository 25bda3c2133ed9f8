"""Where adapters live when they are not in a device slot: the registry (paths) and the host cache.

Three tiers, fastest first:
- device slots: the banks (bank.py), a bounded number of adapters, chosen by the wrapper;
- host cache: up to ``max_cpu`` adapters, least recently used dropped first, each held as ONE
  contiguous buffer (pinned when CUDA is present) so putting it on the device is one transfer;
- registry: a name and a path; nothing is read until a request needs the adapter.

Reading goes through mmap: the safetensors header is parsed here and each tensor is a view of the
mapped file, validated in place (adapters.py) and copied once, straight into the coalesced buffer,
in the dtype the adapters are kept in.
"""

from __future__ import annotations

import json
import mmap
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import AdapterWeights, ModuleLora

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def mmap_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file as zero-copy views of its memory map (read-only)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise ValueError("file too short")
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        header_len = int.from_bytes(mapped[:8], "little")
        if header_len <= 0 or 8 + header_len > size:
            raise ValueError("bad header length")
        header = json.loads(bytes(mapped[8 : 8 + header_len]))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
        header.pop("__metadata__", None)
        data = torch.frombuffer(mapped, dtype=torch.uint8, offset=8 + header_len) if size > 8 + header_len else None
        tensors = {}
        for name, info in header.items():
            dtype = _DTYPES.get(info.get("dtype"))
            shape, (start, end) = info["shape"], info["data_offsets"]
            if dtype is None:
                raise ValueError(f"unsupported dtype {info.get('dtype')!r} for {name!r}")
            numel = 1
            for d in shape:
                numel *= int(d)
            itemsize = dtype.itemsize
            if not 0 <= start <= end or end - start != numel * itemsize or data is None or end > data.numel():
                raise ValueError(f"data offsets of {name!r} do not match its shape or the file size")
            tensors[name] = data[start:end].view(dtype).view(*shape) if numel else torch.empty(shape, dtype=dtype)
        return tensors
    except (ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ValueError(f"{path}: cannot read the adapter weights ({exc})") from None


@dataclass(frozen=True)
class HostAdapter:
    """An adapter held in one contiguous host buffer; its ModuleLora tensors are views of it."""

    weights: AdapterWeights
    buffer: torch.Tensor | None  # (numel,) in the adapters' dtype; None: views of the mapped file

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size() if self.buffer is not None else 0


def coalesce(weights: AdapterWeights, dtype: torch.dtype, pin: bool) -> HostAdapter:
    """Copy every factor of ``weights`` into one buffer of ``dtype`` (pinned if asked)."""
    parts = []
    for lora in weights.modules.values():
        parts += [lora.a, lora.b] + ([lora.bias] if lora.bias is not None else [])
    total = sum(t.numel() for t in parts)
    buffer = torch.empty(total, dtype=dtype, pin_memory=pin)
    offset = 0

    def take(t: torch.Tensor) -> torch.Tensor:
        nonlocal offset
        view = buffer[offset : offset + t.numel()].view(t.shape)
        view.copy_(t)
        offset += t.numel()
        return view

    modules = {
        name: ModuleLora(take(m.a), take(m.b), take(m.bias) if m.bias is not None else None, m.rank, m.scale)
        for name, m in weights.modules.items()
    }
    return HostAdapter(AdapterWeights(weights.path, weights.settings, modules), buffer)


def to_device(host: HostAdapter, device: torch.device, stream=None) -> AdapterWeights:
    """The adapter's factors on ``device``, moved in one transfer (views of one device buffer)."""
    if host.buffer is None or host.buffer.device == device:
        return host.weights
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            flat = host.buffer.to(device, non_blocking=True)
        torch.cuda.current_stream(device).wait_stream(stream)
        flat.record_stream(torch.cuda.current_stream(device))
    else:
        flat = host.buffer.to(device, non_blocking=host.buffer.is_pinned())
    base = host.buffer.data_ptr()
    size = host.buffer.element_size()

    def view(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        start = (t.data_ptr() - base) // size
        return flat[start : start + t.numel()].view(t.shape)

    modules = {n: ModuleLora(view(m.a), view(m.b), view(m.bias), m.rank, m.scale) for n, m in host.weights.modules.items()}
    return AdapterWeights(host.weights.path, host.weights.settings, modules)


class HostCache:
    """LRU of coalesced adapters, by name, bounded by a count."""

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, HostAdapter] = OrderedDict()

    def get(self, name: str) -> HostAdapter | None:
        item = self._items.get(name)
        if item is not None:
            self._items.move_to_end(name)
        return item

    def put(self, name: str, item: HostAdapter) -> None:
        if self.capacity == 0:
            return
        self._items[name] = item
        self._items.move_to_end(name)
        while self.capacity is not None and len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def drop(self, name: str) -> None:
        self._items.pop(name, None)

    @property
    def nbytes(self) -> int:
        return sum(item.nbytes for item in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
