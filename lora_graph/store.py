"""Where adapters live when they are not in a device slot: the registry (paths) and the host cache.

Three tiers, fastest first:
- device slots: the banks (bank.py), a bounded number of adapters, chosen by the wrapper;
- host cache: up to ``max_cpu`` adapters, least recently used dropped first, each held as ONE
  contiguous buffer (pinned when CUDA is present) so putting it on the device is one transfer;
- registry: a name and a path; nothing is read until a request needs the adapter.

Reading (adapters.py, tensorfile.py) reads the file into host memory with ordinary reads (never a
memory map, which a file rewritten in place turns into SIGBUS); validated there, it is copied once,
straight into the coalesced buffer (or, on a CPU model, into its slot), in the dtype the adapters
are kept in. A DoRA adapter's per-module ``g`` vectors stay fp32 whatever
that dtype, in a second, small buffer that moves beside the first.
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
    use_dora: bool = False

    @classmethod
    def of(cls, name: str, path, settings: LoraSettings, weights: AdapterWeights | None = None,
           dtype: torch.dtype | None = None) -> AdapterInfo:
        targets = nbytes = None
        if weights is not None:
            targets = tuple(sorted(weights.modules))
            # the bytes its slots hold: factors in the banks' dtype, DoRA's g in fp32
            nbytes = weights.numel * dtype.itemsize + weights.mag_numel * 4
        return cls(name, str(path), settings.r, settings.lora_alpha, settings.use_rslora, targets, nbytes,
                   fingerprint(path), settings.use_dora)

    def _repr_html_(self) -> str:
        from .notebook import adapter_html  # the HTML views live together, in notebook.py

        return adapter_html(self)


@dataclass(frozen=True)
class HostAdapter:
    """An adapter held in one contiguous host buffer; its ModuleLora tensors are views of it (and
    a DoRA adapter's ``mag`` vectors views of ``mags``)."""

    weights: AdapterWeights
    buffer: torch.Tensor | None  # (numel,) in the adapters' dtype; None: the tensors as read from the file
    mags: torch.Tensor | None = None  # (mag_numel,) fp32, DoRA's g of every module; None for LoRA

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.buffer, self.mags) if t is not None)


def _taker(buffer: torch.Tensor):
    """``take(t)``: ``t`` copied into the next free part of ``buffer``, as a view of it."""
    offset = 0

    def take(t: torch.Tensor) -> torch.Tensor:
        nonlocal offset
        view = buffer[offset : offset + t.numel()].view(t.shape)
        view.copy_(t)
        offset += t.numel()
        return view

    return take


def coalesce(weights: AdapterWeights, dtype: torch.dtype, pin: bool) -> HostAdapter:
    """Copy every factor of ``weights`` into one buffer of ``dtype`` (pinned if asked), and DoRA's
    vectors into one fp32 buffer."""
    buffer = torch.empty(weights.numel, dtype=dtype, pin_memory=pin)
    mags = torch.empty(weights.mag_numel, dtype=torch.float32, pin_memory=pin) if weights.mag_numel else None
    take, take_mag = _taker(buffer), (_taker(mags) if mags is not None else None)
    modules = {name: m.map(take, take_mag) for name, m in weights.modules.items()}
    return HostAdapter(AdapterWeights(weights.path, weights.settings, modules), buffer, mags)


def to_device(host: HostAdapter, device: torch.device, stream=None) -> AdapterWeights:
    """The adapter's factors on ``device``, moved in one transfer (views of one device buffer), and
    DoRA's vectors in a second, small one."""
    if host.buffer is None or host.buffer.device == device:
        return host.weights
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            moved = [t.to(device, non_blocking=True) if t is not None else None for t in (host.buffer, host.mags)]
        torch.cuda.current_stream(device).wait_stream(stream)
        for t in moved:
            if t is not None:
                t.record_stream(torch.cuda.current_stream(device))
    else:
        moved = [t.to(device, non_blocking=t.is_pinned()) if t is not None else None for t in (host.buffer, host.mags)]
    view, view_mag = (_viewer(src, dst) if src is not None else None for src, dst in zip((host.buffer, host.mags), moved))
    modules = {n: m.map(view, view_mag) for n, m in host.weights.modules.items()}
    return AdapterWeights(host.weights.path, host.weights.settings, modules)


def _viewer(src: torch.Tensor, dst: torch.Tensor):
    """``view(t)``: for a view ``t`` of ``src``, the same elements of ``dst`` (its copy)."""
    base, size = src.data_ptr(), src.element_size()

    def view(t: torch.Tensor) -> torch.Tensor:
        start = (t.data_ptr() - base) // size
        return dst[start : start + t.numel()].view(t.shape)

    return view


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
