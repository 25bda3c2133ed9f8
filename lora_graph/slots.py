"""The slot table: which adapter is resident in which device slot, and who may lose it.

    name ──> slot          one mapping, least recently used first (an OrderedDict)
    holds[slot]            running requests reading the slot: it is never evicted nor rewritten
    pinned                 names never evicted until unpinned
    deferred[slot]         slots whose adapter was unloaded or replaced while held: freed when the
                           last holder ends (with whether emptied modules get their originals back)

This is bookkeeping only: no tensors. The wrapper asks it for a slot (``allocate``), writes the
factors through the banks, and records the result (``assign``); an evicted or freed slot comes back
to the wrapper to clear in the banks. Which resident adapter to evict is a small replaceable
policy object, as in SGLang's eviction_policy.py: ``victim(candidates)`` picks one of the
adapters that may go, given least recently used first.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence


class LeastRecentlyUsed:
    """The default eviction policy: the least recently used adapter that may go."""

    def victim(self, candidates: Sequence[str]) -> str | None:
        return candidates[0] if candidates else None


class SlotsFull(RuntimeError):
    """Every slot is pinned or held by a running request."""


class SlotTable:
    def __init__(self, capacity: int | None, policy=None) -> None:
        """``capacity``: the number of slots (``max_loaded``), or None for no bound."""
        self.capacity = capacity
        self.policy = policy if policy is not None else LeastRecentlyUsed()
        self._slots: OrderedDict[str, int] = OrderedDict()  # resident, least recently used first
        self._holds: Counter = Counter()
        self.pinned: set[str] = set()
        self._deferred: dict[int, bool] = {}

    # -- reading --------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._slots

    def __getitem__(self, name: str) -> int:
        return self._slots[name]

    def get(self, name: str) -> int | None:
        return self._slots.get(name)

    @property
    def resident(self) -> tuple[str, ...]:
        return tuple(self._slots)

    def occupied(self) -> set[int]:
        """Slots holding an adapter, resident or deferred."""
        return set(self._slots.values()) | set(self._deferred)

    def evictable(self, protect: Iterable[str] = ()) -> list[str]:
        """Resident adapters that may lose their slot, least recently used first."""
        protect = set(protect)
        return [n for n, slot in self._slots.items()
                if n not in protect and n not in self.pinned and self._holds[slot] == 0]

    def room(self, protect: Iterable[str] = ()) -> int | None:
        """How many adapters could be made resident now (None: no bound)."""
        if self.capacity is None:
            return None
        return self.capacity - len(self.occupied()) + len(self.evictable(protect))

    # -- changing -------------------------------------------------------------------------------
    def touch(self, names: Iterable[str]) -> None:
        for name in names:
            if name in self._slots:
                self._slots.move_to_end(name)

    def allocate(self, protect: Iterable[str] = (), avoid: Iterable[int] = ()) -> tuple[int, str | None]:
        """A free slot, or the slot of the policy's victim when none is free: ``(slot, victim or
        None)``. The victim stays resident until the caller has written the slot and calls
        :meth:`remove`, so a write that fails costs no resident adapter."""
        occupied = self.occupied() | set(avoid)
        if self.capacity is None:
            return min(set(range(len(occupied) + 1)) - occupied), None
        free = set(range(self.capacity)) - occupied
        if free:
            return min(free), None
        victim = self.policy.victim(self.evictable(protect))
        if victim is None:
            raise SlotsFull(
                f"all {self.capacity} adapter slots are pinned or held by running requests; "
                "unpin an adapter, wait for requests to finish, or wrap with a larger max_loaded"
            )
        return self._slots[victim], victim

    def held(self, slot: int) -> bool:
        """Whether a running request reads ``slot``."""
        return self._holds[slot] > 0

    def assign(self, name: str, slot: int) -> None:
        """``name`` is now resident in ``slot``, most recently used."""
        self._slots[name] = slot
        self._slots.move_to_end(name)

    def remove(self, name: str) -> int | None:
        """``name`` is no longer resident; its slot, to free with :meth:`release`."""
        self.pinned.discard(name)
        return self._slots.pop(name, None)

    def release(self, slot: int, restore: bool) -> bool:
        """An adapter left ``slot``: True when it can be freed now, False when running requests
        still hold it (it is then freed by the :meth:`unhold` that ends the last of them)."""
        if self._holds[slot] > 0:
            self._deferred[slot] = restore
            return False
        self._holds.pop(slot, None)
        return True

    def hold(self, names: Iterable[str]) -> dict[str, int]:
        """A request starts: its adapters' slots are held (and touched) until :meth:`unhold`."""
        held = {n: self._slots[n] for n in names}
        for name, slot in held.items():
            self._holds[slot] += 1
            self._slots.move_to_end(name)
        return held

    def unhold(self, held: dict[str, int]) -> list[tuple[int, bool]]:
        """A request ended: the deferred slots it was the last to hold, ``(slot, restore)``, to free now."""
        freed = []
        for slot in held.values():
            self._holds[slot] -= 1
            if self._holds[slot] <= 0:
                del self._holds[slot]
                if slot in self._deferred:
                    freed.append((slot, self._deferred.pop(slot)))
        return freed

    def clear(self) -> None:
        self._slots.clear()
        self.pinned.clear()
