"""AdapterBank: the LoRA factors of every resident adapter for one patched module, stacked by slot.

    a    (S, R, K)   lora_A of each slot, zero past the slot's rank
    b    (S, N, R)   lora_B of each slot, zero past the slot's rank
    bias (S, N)      lora_B bias, allocated only once some adapter has one
    scale[S], rank[S]  per-slot runtime data: never folded into the factors; also kept as device
                     tables (``scale_t``, ``rank_t``, 0 for slots the module does not hold)

A slot is an adapter's row; slot ids are global to the wrapper, so one request resolves to the same
slot in every module. A module that an adapter does not target simply does not hold its slot.

Everything a forward reads is one immutable ``BankState``, swapped in by a single assignment, so
a forward racing a load in another thread sees either the old state or the new one, never half of
each. Writes go only to free slots (no running request routes to them), so writing a slot in place
is invisible to running forwards. ``stage`` builds whatever new storage a load needs without
touching the current state, and ``commit`` swaps it in; a load that fails half-way through the
modules leaves every bank as it was.

The storage and the tables are written in place while the bank does not grow, so their
addresses stay fixed: a compiled model takes them as graph inputs (``tables``), and CUDA graphs
read them in place.

``operands`` gathers the used slots for the torch path, cut to the largest rank among them (so the
bits of a result never depend on which other adapters were loaded before), and keeps the result
while the state and the set of slots are unchanged: decode steps with the same adapters copy
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import torch

from .adapters import ModuleLora


@dataclass(frozen=True)
class BankState:
    a: torch.Tensor  # (S, R, K)
    b: torch.Tensor  # (S, N, R)
    bias: torch.Tensor | None  # (S, N)
    # per-slot tables for the kernels, on the bank's device; 0 for slots this module does not hold
    scale_t: torch.Tensor  # (S,) fp32
    rank_t: torch.Tensor  # (S,) int32
    scale: dict = field(default_factory=dict)  # slot -> float
    rank: dict = field(default_factory=dict)  # slot -> int
    with_bias: frozenset = frozenset()

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
    a: torch.Tensor
    b: torch.Tensor
    bias: torch.Tensor | None
    scale_t: torch.Tensor
    rank_t: torch.Tensor


class AdapterBank:
    def __init__(self, in_features: int, out_features: int, device: torch.device, dtype: torch.dtype,
                 slots: int = 0, rank: int = 0, grow: bool = True, kernel_tables: bool = True) -> None:
        """``slots`` and ``rank`` preallocate the stacked buffers; with ``grow`` a load that needs
        more slots doubles them. ``kernel_tables=False`` (the torch backend, which reads the dicts)
        leaves ``scale_t``/``rank_t`` empty and saves writing them on every load."""
        self.kernel_tables = kernel_tables
        self.in_features = in_features
        self.out_features = out_features
        self.device = device
        self.dtype = dtype
        self.grow = grow
        a = self._zeros(slots, rank, in_features)
        b = self._zeros(slots, out_features, rank)
        table_slots = slots if kernel_tables else 0
        self._row_views: dict[int, tuple] = {}
        self._publish(BankState(a, b, None, self._zeros(table_slots, dtype=torch.float32),
                                self._zeros(table_slots, dtype=torch.int32)))

    def _zeros(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Bank storage. Its address is fixed until the bank grows, so on CUDA it is marked static
        for torch.compile: CUDA graphs read it in place instead of copying it at every replay."""
        t = torch.zeros(*shape, device=self.device, dtype=self.dtype if dtype is None else dtype)
        if t.is_cuda:
            torch._dynamo.mark_static_address(t)
        return t

    def _publish(self, state: BankState) -> None:
        self.state = state
        # the same tensors as one plain tuple, for the traced path of a compiled model
        self.tables = (state.a, state.b, state.bias, state.scale_t, state.rank_t)
        # what was gathered from, and bound to, the previous state is stale: drop it now, so that
        # an unload gives the memory back without waiting for the next forward
        self._gathered: tuple | None = None
        # the torch backend's branch bound by the layer's last forward:
        # (plan, state, input shape, device, (pre, post) | None); see LoraLinear
        self.bound: tuple | None = None

    # -- what forwards read ---------------------------------------------------------------
    @property
    def present(self) -> frozenset[int]:
        return self.state.present

    @property
    def a(self) -> torch.Tensor:
        return self.state.a

    @property
    def b(self) -> torch.Tensor:
        return self.state.b

    @property
    def nbytes(self) -> int:
        st = self.state
        n = st.a.numel() * st.a.element_size() + st.b.numel() * st.b.element_size()
        return n + (st.bias.numel() * st.bias.element_size() if st.bias is not None else 0)

    def operands(self, slots: tuple[int, ...], weight: torch.Tensor, state: BankState | None = None):
        """Factors of ``slots`` from ``state`` (default: the current one) and the per-lane coefficient ``w · s`` for a
        ``(D, M)`` weight grid: ``(a (D, r, K), b (D, N, r), bias (D, N) | None, coef (D, M, 1))``
        with ``r`` the largest rank among ``slots``."""
        state = self.state if state is None else state
        gathered = self._gathered
        if gathered is None or gathered[0] != slots or gathered[1] is not state:
            r = max(state.rank[s] for s in slots)
            idx = torch.tensor(slots, dtype=torch.int64, device=self.device)
            # (D, r, K) and (D, N, r). B is laid out as Bᵀ (D, r, N), and with several slots A as
            # Aᵀ (D, K, r): the batched GEMMs then read row-major operands, which is faster on
            # CPU. One slot keeps PEFT's A layout, so its shrink is PEFT's own GEMM, bit for bit.
            a = state.a.index_select(0, idx)[:, :r]
            a = a.contiguous() if len(slots) == 1 else a.transpose(1, 2).contiguous().transpose(1, 2)
            b = state.b.index_select(0, idx)[:, :, :r].transpose(1, 2).contiguous().transpose(1, 2)
            bias = None
            if state.bias is not None and state.with_bias.intersection(slots):
                bias = state.bias.index_select(0, idx)  # (D, N)
            scale = torch.tensor([state.scale[s] for s in slots], dtype=torch.float32, device=self.device)
            gathered = (slots, state, a, b, bias, scale, None)
            self._gathered = gathered
        slots_, state_, a, b, bias, scale, coef = gathered
        if coef is None or coef[0] is not weight:
            coef = (weight, (weight * scale.unsqueeze(-1)).unsqueeze(-1))  # (D, M, 1)
            self._gathered = (slots_, state_, a, b, bias, scale, coef)
        return a, b, bias, coef[1]

    # -- loads (serialised by the wrapper's lock) -----------------------------------------------
    def to(self, device: torch.device) -> None:
        """Follow the base module when the model is moved after adapters were loaded."""
        st = self.state
        self.device = device
        self._publish(replace(st, a=st.a.to(device), b=st.b.to(device),
                              bias=st.bias.to(device) if st.bias is not None else None,
                              scale_t=st.scale_t.to(device), rank_t=st.rank_t.to(device)))

    def stage(self, slot: int, lora: ModuleLora) -> _Staged:
        """Storage holding ``lora`` in ``slot``; the current state is not modified."""
        st = self.state
        have_slots, have_rank = st.a.shape[0], st.a.shape[1]
        slots = have_slots if slot < have_slots else max(slot + 1, 2 * have_slots if self.grow else 0)
        rank = max(have_rank, lora.rank)
        a, b, bias, scale_t, rank_t = st.a, st.b, st.bias, st.scale_t, st.rank_t
        if (slots, rank) != (have_slots, have_rank):
            a = self._zeros(slots, rank, self.in_features)
            a[:have_slots, :have_rank] = st.a
            b = self._zeros(slots, self.out_features, rank)
            b[:have_slots, :, :have_rank] = st.b
        if slots != have_slots and self.kernel_tables:
            scale_t = self._zeros(slots, dtype=torch.float32)
            scale_t[:have_slots] = st.scale_t
            rank_t = self._zeros(slots, dtype=torch.int32)
            rank_t[:have_slots] = st.rank_t
        if (bias is not None and bias.shape[0] < slots) or (bias is None and lora.bias is not None):
            new_bias = self._zeros(slots, self.out_features)
            if bias is not None:
                new_bias[: bias.shape[0]] = bias
            bias = new_bias
        return _Staged(slot, lora, a, b, bias, scale_t, rank_t)

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
        s, lora = staged.slot, staged.lora
        a, b, bias = staged.a, staged.b, staged.bias
        r = lora.rank
        a_s, b_s = self._rows(a)[s], self._rows(b)[s]  # (R, K), (N, R)
        if r == a.shape[1]:
            dst += (a_s, b_s)
        else:  # the padding past the rank must read as exact zeros
            dst += (a_s[:r], b_s[:, :r])
            a_s[r:].zero_()
            b_s[:, r:].zero_()
        src += (lora.a, lora.b)
        if bias is not None:
            if lora.bias is not None:
                dst.append(bias[s])
                src.append(lora.bias)
            else:
                bias[s].zero_()
        if self.kernel_tables:
            _set(staged.scale_t, s, lora.scale)
            _set(staged.rank_t, s, r)

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
        self._publish(BankState(staged.a, staged.b, staged.bias, staged.scale_t, staged.rank_t,
                                {**st.scale, s: lora.scale}, {**st.rank, s: lora.rank}, with_bias))

    def remove(self, slot: int) -> None:
        st = self.state
        if slot not in st.rank:
            return
        scale, rank = dict(st.scale), dict(st.rank)
        del scale[slot], rank[slot]
        if self.kernel_tables:  # no running forward routes to a slot being freed
            _set(st.scale_t, slot, 0.0)
            _set(st.rank_t, slot, 0)
        self._publish(BankState(st.a, st.b, st.bias, st.scale_t, st.rank_t, scale, rank, st.with_bias - {slot}))
