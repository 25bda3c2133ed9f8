"""AdapterBank: the LoRA factors of every resident adapter for one patched module, stacked by slot.

    factors   kernels' Factors record: a (S, R, K), b (S, N, R), bias (S, N) allocated only once some
              adapter has one, scale (S,) and rank (S,) per-slot tables (0 for slots not held here),
              mag (S, N) fp32 allocated only once some DoRA adapter is placed (1 in LoRA slots)
    scale, rank, with_bias, dora   the same per slot as host data, for the torch backend's gathers

A slot is an adapter's row; slot ids are global to the wrapper, so one request resolves to the same
slot in every module. A module that an adapter does not target simply does not hold its slot.
Scale and rank are runtime data: never folded into the factors.

Everything a forward reads is one immutable ``BankState``, swapped in by a single assignment, so
a forward racing a load in another thread sees either the old state or the new one, never half of
each. Writes go only to slots that no running request routes to (free ones, or the slot of an
adapter being evicted or replaced), so writing a slot in place is invisible to running forwards.
``stage`` builds whatever new storage a load needs without touching the current state, and
``commit`` swaps it in; a load that fails half-way through the
modules leaves every bank as it was. Every write, moving the bank with its module included, happens
under the wrapper's lock; forwards only read.

The storage and the tables are written in place while the bank does not grow, so their
addresses stay fixed: a compiled model takes them as graph inputs (``factors``), and CUDA graphs
read them in place.

**Memory shrinks back.** The storage follows what the present slots need: it grows to the largest
rank placed, and once more than half of it is unused (that rank unloaded, free slots at the end) a
load or a free copies what is present into storage of the needed size (``_fit``), published as a
new state like any other. A bias or DoRA table no slot uses goes away the same way. A bank whose
slots and rank were both declared (``max_loaded`` and ``max_rank``) keeps its preallocated
storage at fixed addresses and only grows (a bias or DoRA table appears).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property

import torch

from .adapters import ModuleLora
from .kernels.factors import Factors


@dataclass(frozen=True)
class BankState:
    factors: Factors  # the stacked factors and per-slot tables, on the bank's device
    scale: dict = field(default_factory=dict)  # slot -> float
    rank: dict = field(default_factory=dict)  # slot -> int
    with_bias: frozenset = frozenset()
    dora: frozenset = frozenset()  # slots whose adapter is DoRA here (their ``factors.mag`` row is g)

    @cached_property
    def present(self) -> frozenset[int]:  # read by every forward of every patched layer
        return frozenset(self.rank)


def _set(table: torch.Tensor, slot: int, value) -> None:
    """One entry of a per-slot table, written in place (through numpy on the host: a load writes
    hundreds of them)."""
    if table.device.type == "cpu":
        table.numpy()[slot] = value
    else:
        table[slot] = value


@dataclass
class _Staged:
    slot: int
    lora: ModuleLora
    factors: Factors  # the storage that will hold it: the current one, or a grown copy


class AdapterBank:
    def __init__(self, in_features: int, out_features: int, device: torch.device, dtype: torch.dtype,
                 slots: int = 0, rank: int = 0, grow: bool = True, lock: threading.RLock | None = None,
                 keep: tuple[int, int] = (0, 0)) -> None:
        """``slots`` and ``rank`` preallocate the stacked buffers; with ``grow`` a load that needs
        more slots adds a tenth. ``keep``: the slots and rank the owner declared (max_loaded,
        max_rank); the storage never shrinks below them, and never at all when both are declared.
        ``lock`` is the owner's, held by every write."""
        self.in_features = in_features
        self.out_features = out_features
        self.device = device
        self.dtype = dtype
        self.grow = grow
        self.keep = keep
        self.fixed = all(keep)  # fixed addresses: what CUDA graphs and compiled graphs read in place
        self.lock = lock if lock is not None else threading.RLock()
        self._row_views: dict[int, tuple] = {}
        self._publish(BankState(Factors(self._zeros(slots, rank, in_features), self._zeros(slots, out_features, rank),
                                        None, self._zeros(slots, dtype=torch.float32),
                                        self._zeros(slots, dtype=torch.int32))))

    def _zeros(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Bank storage. Its address is fixed until the bank grows, so on CUDA it is marked static
        for torch.compile: CUDA graphs read it in place instead of copying it at every replay."""
        t = torch.zeros(*shape, device=self.device, dtype=self.dtype if dtype is None else dtype)
        if t.is_cuda:
            torch._dynamo.mark_static_address(t)
        return t

    def _publish(self, state: BankState) -> None:
        self.state = state
        self.factors = state.factors  # a plain attribute, for the traced path of a compiled model

    # -- what forwards read ---------------------------------------------------------------
    @property
    def present(self) -> frozenset[int]:
        return self.state.present

    @property
    def nbytes(self) -> int:
        """The stacked factors' bytes (the small per-slot tables aside)."""
        f = self.state.factors
        return sum(t.numel() * t.element_size() for t in (f.a, f.b, f.bias, f.mag) if t is not None)

    def slot_nbytes(self, slot: int) -> int:
        """The bytes of the factors ``slot`` holds here, in the bank's dtype (0 if none)."""
        st = self.state
        r = st.rank.get(slot, 0)
        if not r:
            return 0
        numel = r * (self.in_features + self.out_features) + (self.out_features if slot in st.with_bias else 0)
        return numel * self.dtype.itemsize + (self.out_features * 4 if slot in st.dora else 0)  # g is fp32

    # -- writes (under the lock) ------------------------------------------------------------------
    @torch.inference_mode(False)
    def follow(self, device: torch.device) -> None:
        """Move the bank to ``device``, where its module now runs (a model moved after adapters
        were loaded)."""
        with self.lock:
            if self.device == device:
                return
            self.device = device
            st = self.state
            moved = Factors(*(t.to(device) if t is not None else None for t in st.factors))
            self._publish(BankState(moved, st.scale, st.rank, st.with_bias, st.dora))

    def stage(self, slot: int, lora: ModuleLora) -> _Staged:
        """Storage holding ``lora`` in ``slot`` (which may hold an adapter no forward reads: it is
        written over); the current state is not modified."""
        return _Staged(slot, lora, self._fit(slot, lora))

    def _fit(self, slot: int | None = None, lora: ModuleLora | None = None) -> Factors:
        """The storage for the present slots (``slot`` replaced by ``lora``): the current one when
        it fits, else a copy grown to what is needed (the slots by a tenth), or shrunk to it once more
        than half of it is unused (an unloaded large rank, free slots at the end), or with the bias
        or DoRA table dropped when no slot has one. A fixed bank only grows."""
        st = self.state
        f = st.factors
        have_slots, have_rank = f.a.shape[0], f.a.shape[1]
        others = {s: r for s, r in st.rank.items() if s != slot}
        need_slots = max(self.keep[0], 1, max(others, default=-1) + 1, -1 if slot is None else slot + 1)
        need_rank = max(self.keep[1], 1, max(others.values(), default=0), lora.rank if lora is not None else 0)
        grow_slots = need_slots > have_slots
        # a tenth more at a time: at most ~10% of the slots stand empty, for one copy per ~10% of growth
        step = max(1, have_slots // 10) if self.grow else 0
        slots = max(need_slots, have_slots + step) if grow_slots else have_slots
        rank = max(need_rank, have_rank)
        copied = (slots, rank) != (have_slots, have_rank)
        if not self.fixed and (copied or 2 * need_slots * need_rank <= have_slots * have_rank):
            slots, rank = (slots if grow_slots else need_slots), need_rank  # copied anyway: fit it
        with_bias = (lora is not None and lora.bias is not None) or bool(st.with_bias - {slot}) \
            or (self.fixed and f.bias is not None)
        with_mag = (lora is not None and lora.mag is not None) or bool(st.dora - {slot}) \
            or (self.fixed and f.mag is not None)
        if (slots, rank) == (have_slots, have_rank) and with_bias == (f.bias is not None) \
                and with_mag == (f.mag is not None):
            return f
        return self._copy(f, slots, rank, with_bias, with_mag)

    def _copy(self, f: Factors, slots: int, rank: int, with_bias: bool, with_mag: bool) -> Factors:
        """New storage of ``slots`` x ``rank`` holding what ``f`` holds in its first slots."""
        m, r = min(slots, f.a.shape[0]), min(rank, f.a.shape[1])
        a, b = f.a, f.b
        if (slots, rank) != tuple(f.a.shape[:2]):
            a = self._zeros(slots, rank, self.in_features)
            a[:m, :r] = f.a[:m, :r]
            b = self._zeros(slots, self.out_features, rank)
            b[:m, :, :r] = f.b[:m, :, :r]
        scale_t, rank_t = f.scale, f.rank
        if slots != f.a.shape[0]:
            scale_t = self._zeros(slots, dtype=torch.float32)
            scale_t[:m] = f.scale[:m]
            rank_t = self._zeros(slots, dtype=torch.int32)
            rank_t[:m] = f.rank[:m]
        bias = mag = None
        if with_bias:
            bias = f.bias if f.bias is not None and f.bias.shape[0] == slots else self._zeros(slots, self.out_features)
            if f.bias is not None and bias is not f.bias:
                bias[:m] = f.bias[:m]
        if with_mag:
            mag = f.mag if f.mag is not None and f.mag.shape[0] == slots else \
                self._zeros(slots, self.out_features, dtype=torch.float32).fill_(1.0)  # LoRA slots: g = 1
            if f.mag is not None and mag is not f.mag:
                mag[:m] = f.mag[:m]
        return Factors(a, b, bias, scale_t, rank_t, mag)

    def commit(self, staged: _Staged) -> None:
        """Write the slot (free, so no forward reads it) and swap the new state in."""
        dst, src = [], []
        self.prepare(staged, dst, src)
        torch._foreach_copy_(dst, src)
        self.publish(staged)

    def prepare(self, staged: _Staged, dst: list, src: list) -> None:
        """Everything of a commit but the copies, which are appended to ``dst``/``src`` so that a
        load makes one ``_foreach_copy_`` for all its modules. The slot is free: no forward reads
        what this writes, and the current state is unchanged."""
        s, lora, f = staged.slot, staged.lora, staged.factors
        r = lora.rank
        a_s, b_s = self._rows(f.a)[s], self._rows(f.b)[s]  # (R, K), (N, R)
        if r == f.a.shape[1]:
            dst += (a_s, b_s)
        else:  # the padding past the rank must read as exact zeros
            dst += (a_s[:r], b_s[:, :r])
            a_s[r:].zero_()
            b_s[:, r:].zero_()
        src += (lora.a, lora.b)
        if f.bias is not None:
            if lora.bias is not None:
                dst.append(f.bias[s])
                src.append(lora.bias)
            else:
                f.bias[s].zero_()
        if f.mag is not None:
            if lora.mag is not None:
                dst.append(f.mag[s])
                src.append(lora.mag)
            else:
                f.mag[s].fill_(1.0)
        _set(f.scale, s, lora.scale)
        _set(f.rank, s, r)

    def _rows(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The per-slot views of a storage tensor, made once per storage (a load writes one slot of
        every bank)."""
        rows = self._row_views.get(id(t))
        if rows is None or rows[0] is not t:
            if len(self._row_views) >= 4:  # storage replaced by growth: drop the old views
                self._row_views.clear()
            rows = self._row_views[id(t)] = (t, t.unbind(0))
        return rows[1]

    def publish(self, staged: _Staged) -> None:
        """Swap in the state that holds ``staged`` (written) besides what the current one holds."""
        s, lora = staged.slot, staged.lora
        st = self.state
        with_bias = st.with_bias | {s} if lora.bias is not None else st.with_bias - {s}
        dora = st.dora | {s} if lora.mag is not None else st.dora - {s}
        self._publish(BankState(staged.factors, {**st.scale, s: lora.scale}, {**st.rank, s: lora.rank}, with_bias,
                                dora))

    def remove(self, slot: int) -> None:
        st = self.state
        if slot not in st.rank:
            return
        scale, rank = dict(st.scale), dict(st.rank)
        del scale[slot], rank[slot]
        _set(st.factors.scale, slot, 0.0)  # no running forward routes to a slot being freed
        _set(st.factors.rank, slot, 0)
        self._publish(BankState(st.factors, scale, rank, st.with_bias - {slot}, st.dora - {slot}))

    def compact(self) -> bool:
        """Shrink the storage to what the present slots need, when more than half of it is unused
        or a bias or DoRA table is (see ``_fit``). The new storage is a copy published as a new
        state: a forward still reading the old state keeps the old tensors alive, untouched. True
        when the storage changed."""
        st = self.state
        fitted = self._fit()
        if fitted is st.factors:
            return False
        self._publish(BankState(fitted, st.scale, st.rank, st.with_bias, st.dora))
        return True
