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
each. Writes go only to free slots (no running request routes to them), so writing a slot in place
is invisible to running forwards. ``stage`` builds whatever new storage a load needs without
touching the current state, and ``commit`` swaps it in; a load that fails half-way through the
modules leaves every bank as it was. Every write, moving the bank with its module included, happens
under the wrapper's lock; forwards only read.

The storage and the tables are written in place while the bank does not grow, so their
addresses stay fixed: a compiled model takes them as graph inputs (``factors``), and CUDA graphs
read them in place.
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
                 slots: int = 0, rank: int = 0, grow: bool = True, lock: threading.RLock | None = None) -> None:
        """``slots`` and ``rank`` preallocate the stacked buffers; with ``grow`` a load that needs
        more slots doubles them. ``lock`` is the owner's, held by every write."""
        self.in_features = in_features
        self.out_features = out_features
        self.device = device
        self.dtype = dtype
        self.grow = grow
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
        """Storage holding ``lora`` in ``slot``; the current state is not modified."""
        f = self.state.factors
        a, b, bias, scale_t, rank_t, mag = f
        have_slots, have_rank = a.shape[0], a.shape[1]
        slots = have_slots if slot < have_slots else max(slot + 1, 2 * have_slots if self.grow else 0)
        rank = max(have_rank, lora.rank)
        if (slots, rank) != (have_slots, have_rank):
            a = self._zeros(slots, rank, self.in_features)
            a[:have_slots, :have_rank] = f.a
            b = self._zeros(slots, self.out_features, rank)
            b[:have_slots, :, :have_rank] = f.b
        if slots != have_slots:
            scale_t = self._zeros(slots, dtype=torch.float32)
            scale_t[:have_slots] = f.scale
            rank_t = self._zeros(slots, dtype=torch.int32)
            rank_t[:have_slots] = f.rank
        if (bias is not None and bias.shape[0] < slots) or (bias is None and lora.bias is not None):
            new_bias = self._zeros(slots, self.out_features)
            if bias is not None:
                new_bias[: bias.shape[0]] = bias
            bias = new_bias
        if (mag is not None and mag.shape[0] < slots) or (mag is None and lora.mag is not None):
            new_mag = self._zeros(slots, self.out_features, dtype=torch.float32).fill_(1.0)  # LoRA slots: g = 1
            if mag is not None:
                new_mag[: mag.shape[0]] = mag
            mag = new_mag
        return _Staged(slot, lora, Factors(a, b, bias, scale_t, rank_t, mag))

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
