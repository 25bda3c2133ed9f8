"""Where adapters live when they are not in a device slot: the registry (paths) and the host cache.

Three tiers, fastest first:
- device slots: the banks (bank.py), a bounded number of adapters, chosen by the wrapper;
- host cache: up to ``max_cpu`` adapters, least recently used dropped first, each held as ONE
  contiguous buffer (pinned when CUDA is present) so putting it on the device is one transfer;
- registry: a name and a path; nothing is read until a request needs the adapter.

Reading goes through mmap (adapters.py): each tensor is a view of the mapped file, validated in
place and copied once, straight into the coalesced buffer (or, on a CPU model, into its slot), in
the dtype the adapters are kept in.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import AdapterWeights
from .config import LoraSettings


def fingerprint(path) -> tuple:
    """What identifies an adapter directory's files: their resolved paths, sizes and times."""
    folder = Path(path).resolve()
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    return str(folder), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)


@dataclass(frozen=True)
class AdapterInfo:
    """A registered adapter. ``targets`` and ``nbytes`` are known once its weights were read."""

    name: str
    path: str
    rank: int
    alpha: float
    use_rslora: bool
    targets: tuple[str, ...] | None = None
    nbytes: int | None = None
    files: tuple = ()  # fingerprint() of the directory when it was registered or read

    @classmethod
    def of(cls, name: str, path, settings: LoraSettings, weights: AdapterWeights | None = None,
           dtype: torch.dtype | None = None) -> AdapterInfo:
        targets = nbytes = None
        if weights is not None:
            targets = tuple(sorted(weights.modules))
            nbytes = weights.numel * dtype.itemsize  # the bytes its slots hold, in the banks' dtype
        return cls(name, str(path), settings.r, settings.lora_alpha, settings.use_rslora, targets, nbytes,
                   fingerprint(path))

    def _repr_html_(self) -> str:
        from .notebook import adapter_html  # the HTML views live together, in notebook.py

        return adapter_html(self)


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
    total = weights.numel
    buffer = torch.empty(total, dtype=dtype, pin_memory=pin)
    offset = 0

    def take(t: torch.Tensor) -> torch.Tensor:
        nonlocal offset
        view = buffer[offset : offset + t.numel()].view(t.shape)
        view.copy_(t)
        offset += t.numel()
        return view

    modules = {name: m.map(take) for name, m in weights.modules.items()}
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

    def view(t: torch.Tensor) -> torch.Tensor:
        start = (t.data_ptr() - base) // size
        return flat[start : start + t.numel()].view(t.shape)

    modules = {n: m.map(view) for n, m in host.weights.modules.items()}
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
