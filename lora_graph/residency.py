"""Residency: the host cache, the slot table and the banks, moved together.

    read (adapters.py) ──> HostAdapter (one coalesced, pinned buffer) ──host cache (store.py)
    page_in(names): room checked, then per missing adapter: slot table allocates (a free slot, or the
    policy's victim's) ──> PatchedModules.place writes the factors into that slot of every bank,
    and only then does the victim leave the slot table

The wrapper (wrapper.py) owns the registry and the lock and calls these with the lock held. All
missing weights are read, and room for them is checked, before anything is evicted: a path that
vanished or went corrupt, or a batch that cannot fit beside pinned and running adapters, fails the
request and costs no resident adapter. A failure half-way rolls back what it placed.
"""

from __future__ import annotations

import logging

import torch

from . import patch
from .routing import resolve_spec
from .slots import SlotsFull, SlotTable
from .sources import Source
from .store import HostAdapter, HostCache, coalesce

logger = logging.getLogger(__name__)


class Residency:
    def __init__(self, patched: patch.PatchedModules, slots: SlotTable, host: HostCache, dtype: torch.dtype,
                 max_rank: int | None) -> None:
        self.patched, self.slots, self.host = patched, slots, host
        self.dtype, self.max_rank = dtype, max_rank
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        # A model on the CPU: the slots already are host memory, so a load copies the tensors read
        # from the file straight into its slot, and the OS page cache is the host tier.
        self.coalesce = patch.execution_device(patched.model).type != "cpu"
        if not self.coalesce:
            host.capacity = 0

    def read(self, source: Source) -> HostAdapter:
        """Read and validate an adapter (sources.py) against the model, into host memory."""
        modules = self.patched.originals
        weights = source.read(self.patched.shapes, base_weight=lambda n: patch.plain_weight(modules.get(n)),
                              base_rows=lambda n: patch.weight_rows(modules[n]), dtype=self.dtype)
        if self.max_rank is not None:
            too_big = [(n, m.rank) for n, m in weights.modules.items() if m.rank > self.max_rank]
            if too_big:
                raise ValueError(f"{weights.path}: module {too_big[0][0]!r} has rank {too_big[0][1]} > max_rank={self.max_rank}")
        for module, lora in weights.modules.items():  # refused here, before anything is evicted
            for t in (lora.a, lora.b, lora.bias, lora.mag):
                if t is not None and t.layout != torch.strided:
                    raise ValueError(f"{weights.path}: module {module!r} holds a {t.layout} tensor; save dense tensors")
        if not self.coalesce:
            return HostAdapter(weights, None)
        return coalesce(weights, self.dtype, pin=self.stream is not None)

    def read_ahead(self, spec, infos: dict, sources: dict[str, Source]) -> dict[str, HostAdapter]:
        """The weights of the SPEC's registered adapters that are neither resident nor cached, read
        without the wrapper's lock, so that paging them in holds the lock only to place them (running
        requests keep stepping meanwhile). Best effort: what fails here is read again, and fails
        with its own error, under the lock."""
        try:
            names = resolve_spec(spec, infos).names
        except Exception:  # noqa: BLE001 - a bad SPEC, or the registry changing meanwhile: checked again under the lock
            return {}
        ahead = {}
        for name in names:
            info = infos.get(name)
            if info is None or name in self.slots or name in self.host:
                continue
            try:
                ahead[name] = self.read(sources[name])
            except Exception:  # noqa: BLE001 - see above
                continue
        return ahead

    def page_in(self, names, protect: set[str], fetch) -> None:
        """Make ``names`` resident; ``fetch(name)`` gives a missing one's HostAdapter."""
        missing = [n for n in names if n not in self.slots]
        if missing:
            hosts = {n: fetch(n) for n in missing}
            room = self.slots.room(protect)
            if room is not None and room < len(missing):
                raise SlotsFull(
                    f"cannot page in {missing}: the {self.slots.capacity} adapter slots are pinned or held by "
                    "running requests; unpin an adapter, wait for requests to finish, or wrap with a larger max_loaded"
                )
            placed = []
            try:
                for name in missing:
                    self.slots.assign(name, self.place(hosts[name], protect=protect | set(missing)))
                    placed.append(name)
            except BaseException:
                for name in placed:  # roll back: nothing half-resident
                    self.patched.free(self.slots.remove(name), restore=False)
                raise
        self.slots.touch(names)

    def prefetch(self, names, fetch) -> None:
        """Read ``names`` ahead of their requests and make them resident while slots allow, without
        evicting anything pinned or in use (the rest stays in the host cache)."""
        for name in names:
            if name in self.slots:
                continue
            room = self.slots.room()
            if room is None or room > 0:
                self.page_in([name], {name}, fetch)
            else:
                fetch(name)

    def place(self, host: HostAdapter, protect: set[str], avoid=()) -> int:
        """Put an adapter into a free slot, or over the policy's victim, and return the slot. The
        victim loses its slot only once the new factors are in: a write that fails before it
        starts (staging, a transfer) evicts nothing."""
        slot, victim = self.slots.allocate(protect, avoid)
        try:
            self.patched.place(host, slot, self.stream)
        except BaseException:
            if victim is not None and not self.patched.holds(slot):  # failed mid-commit: the slot was cleared
                self.slots.remove(victim)
            raise
        if victim is not None:
            self.slots.remove(victim)
            logger.debug("evicted adapter %r from slot %d", victim, slot)
        return slot

    def replace(self, name: str, host: HostAdapter) -> int:
        """The slot that now holds ``host`` for ``name``: its own slot, written over, when no
        running request reads it; otherwise another one, and the old slot is freed when its last
        request ends (they finish with the old weights)."""
        old = self.slots.get(name)
        if old is None or self.slots.held(old):
            slot = self.place(host, protect={name}, avoid={old} if old is not None else ())
            if old is not None:
                self.release(old, restore=False)
            return slot
        try:
            self.patched.place(host, old, self.stream)
        except BaseException:
            if not self.patched.holds(old):
                self.slots.remove(name)
            raise
        return old

    def drop(self, name: str) -> None:
        """``name``'s files changed: forget its resident copy (freed now, or when the requests
        holding it end) so that the next request pages the new files in. A pin stays."""
        slot = self.slots.get(name)
        if slot is None:
            return
        pinned = name in self.slots.pinned
        self.slots.remove(name)
        if pinned:
            self.slots.pinned.add(name)
        self.release(slot, restore=False)

    def release(self, slot: int, restore: bool) -> None:
        """Free ``slot`` now, or when the last request holding it ends."""
        if self.slots.release(slot, restore):
            self.patched.free(slot, restore)

    def unhold(self, held: dict[str, int]) -> None:
        """A request ended: free the slots it was the last to hold among those already let go."""
        for slot, restore in self.slots.unhold(held):
            self.patched.free(slot, restore)

    def memory(self) -> dict:
        return {
            "device": {
                "slot_buffers": self.patched.nbytes,
                "rank_classes": self.patched.class_nbytes(),  # rank -> bytes of that rank's storage
                "adapters": sum(self.patched.slot_nbytes(s) for s in self.slots.occupied()),
                "resident": len(self.slots.resident),
                "max_loaded": self.slots.capacity,
            },
            "host": {"cache": self.host.nbytes, "cached": len(self.host), "max_cpu": self.host.capacity,
                     "pinned_memory": self.stream is not None},
        }
