"""AdapterBank: the LoRA factors of every resident adapter for one patched module, stacked by rank class.

    classes   one ``RankClass`` per rank: its kernels' Factors record, rows stacked
              a (C, r, K), b (C, N, r), bias (C, N) allocated only once some slot has one,
              scale (C,) and rank (C,) per-row tables (0 for rows holding no slot),
              mag (C, N) fp32 allocated only once some DoRA adapter is placed (1 in LoRA rows);
              ``rows`` maps slot -> row
    factors   the one storage indexed by slot, when the bank has one (a single class whose row
              is its slot, as every bank has today): what the kernels and compiled graphs read;
              None with several classes, whose forwards gather the used slots' rows instead
    scale, rank, with_bias, dora   the same per slot as host data, for the torch backend's gathers

A slot is an adapter's row; slot ids are global to the wrapper, so one request resolves to the same
slot in every module. A module that an adapter does not target simply does not hold its slot.
Scale and rank are runtime data: never folded into the factors.

**Rank classes.** Without a declared ``max_rank`` each rank has its own storage, sized to the
slots of that rank: 200 rank-1 adapters beside one rank-64 one take 200 rank-1 rows and one
rank-64 row, not 201 rank-64 rows. Exact ranks, rather than ranks rounded up to a few sizes, are
what keep the storage within ~1.1x of the adapters' bytes whatever the ranks (rounding up to powers
of two costs up to 2x). A bank of one class (the common case: every adapter of a module at one
rank) keeps the row of each slot at the slot itself, so ``factors`` is that storage and the forward
path is the one of a single stacked storage, op for op. Only a bank holding several ranks at once
(or whose slots are so sparse that rows indexed by slot would waste more than a tenth) packs its
rows and leaves ``factors`` None: the torch backend gathers the used slots from their classes (it
gathers and caches per slot set anyway), the triton backend runs its kernels on those rows with
the lanes renumbered (backends/triton.py). A declared ``max_rank`` makes one class of that rank,
padded, whose rows are the slots: with ``max_loaded`` too it is preallocated at fixed addresses.

Everything a forward reads is one immutable ``BankState``, swapped in by a single assignment, so
a forward racing a load in another thread sees either the old state or the new one, never half of
each. Writes go only to rows that no running request routes to (free ones, or the row of an
adapter being evicted or replaced), so writing a row in place is invisible to running forwards.
``stage`` builds whatever new storage a load needs without touching the current state, and
``commit`` swaps it in; a load that fails half-way through the modules leaves every bank as it
was. Every write, moving the bank with its module included, happens under the wrapper's lock;
forwards only read.

The storage and the tables are written in place while a class does not grow, so their
addresses stay fixed: a compiled model takes them as graph inputs (``factors``), and CUDA graphs
read them in place.

**Memory shrinks back.** Each class follows what its slots need: it grows by a tenth of its rows
at a time, and once more than a tenth (and a row) of it is unused (slots unloaded) a load or a
free copies what is present into storage of the needed size (``_refit``), published as a new state
like any other; a class left empty goes away. A bias or DoRA table no slot uses goes away the
same way. A bank whose slots and rank were both declared (``max_loaded`` and ``max_rank``) keeps
its preallocated storage at fixed addresses and only grows (a bias or DoRA table appears).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property

import torch

from .adapters import ModuleLora
from .kernels.factors import Factors


@dataclass(frozen=True)
class RankClass:
    """One storage of a bank: the slots of one rank (of at most ``rank``, padded, with a declared
    ``max_rank``), one row each."""

    rank: int  # the storage's rank dimension
    factors: Factors  # a (C, rank, K), b (C, N, rank), bias/mag (C, N), scale/rank (C,), by row
    rows: dict  # slot -> row; never changed once published
    identity: bool  # every slot's row is the slot itself: the kernels may index it by slot

    @property
    def capacity(self) -> int:
        return self.factors.a.shape[0]


@dataclass(frozen=True)
class BankState:
    factors: Factors | None  # the storage indexed by slot (one class, rows = slots), else None
    scale: dict = field(default_factory=dict)  # slot -> float
    rank: dict = field(default_factory=dict)  # slot -> int
    with_bias: frozenset = frozenset()
    dora: frozenset = frozenset()  # slots whose adapter is DoRA here (their ``mag`` row is g)
    classes: tuple[RankClass, ...] = ()

    @cached_property
    def present(self) -> frozenset[int]:  # read by every forward of every patched layer
        return frozenset(self.rank)

    def rows_of(self, slots: tuple[int, ...]) -> Factors:
        """The factors of ``slots``, one row each in their order, cut to their largest rank
        (zeros past each slot's own rank): read from the classes, for banks without ``factors``."""
        ref = self.classes[0].factors
        device, r, d = ref.a.device, max(self.rank[s] for s in slots), len(slots)
        k, n = ref.a.shape[2], ref.b.shape[1]
        a, b = ref.a.new_zeros(d, r, k), ref.b.new_zeros(d, n, r)
        bias = ref.a.new_zeros(d, n) if self.with_bias.intersection(slots) else None
        mag = torch.ones(d, n, device=device) if self.dora.intersection(slots) else None
        for c in self.classes:
            pos = [i for i, s in enumerate(slots) if s in c.rows]
            if not pos:
                continue
            rows = torch.tensor([c.rows[slots[i]] for i in pos], dtype=torch.int64, device=device)
            at = torch.tensor(pos, dtype=torch.int64, device=device)
            w = min(r, c.rank)  # a padded class is wider than its slots' ranks: zeros past them
            a[at, :w] = c.factors.a.index_select(0, rows)[:, :w]
            b[at, :, :w] = c.factors.b.index_select(0, rows)[:, :, :w]
            if bias is not None and c.factors.bias is not None:
                bias[at] = c.factors.bias.index_select(0, rows)
            if mag is not None and c.factors.mag is not None:
                mag[at] = c.factors.mag.index_select(0, rows)
        scale = torch.tensor([self.scale[s] for s in slots], dtype=torch.float32, device=device)
        rank = torch.tensor([self.rank[s] for s in slots], dtype=torch.int32, device=device)
        return Factors(a, b, bias, scale, rank, mag)


def _set(table: torch.Tensor, row: int, value) -> None:
    """One entry of a per-row table, written in place (through numpy on the host: a load writes
    hundreds of them)."""
    if table.device.type == "cpu":
        table.numpy()[row] = value
    else:
        table[row] = value


def _where(classes: tuple[RankClass, ...], slot: int) -> int | None:
    """The index of the class holding ``slot``."""
    return next((i for i, c in enumerate(classes) if slot in c.rows), None)


@dataclass
class _Staged:
    slot: int
    lora: ModuleLora
    classes: tuple[RankClass, ...]  # every class once the slot is placed (the target grown or new)
    target: int  # the class that holds the slot
    clear: tuple = ()  # (factors, row): the row the slot leaves in another class, to zero its tables


class AdapterBank:
    def __init__(self, in_features: int, out_features: int, device: torch.device, dtype: torch.dtype,
                 slots: int = 0, rank: int = 0, grow: bool = True, lock: threading.RLock | None = None,
                 keep: tuple[int, int] = (0, 0)) -> None:
        """``slots`` and ``rank`` preallocate the first class; with ``grow`` a load that needs more
        rows adds a tenth. ``keep``: the slots and rank the owner declared (max_loaded, max_rank);
        with a rank declared the bank is one class of that rank, padded; its storage never shrinks
        below them, and never at all when both are declared. ``lock`` is the owner's, held by
        every write."""
        self.in_features = in_features
        self.out_features = out_features
        self.device = device
        self.dtype = dtype
        self.grow = grow
        self.keep = keep
        self.fixed = all(keep)  # fixed addresses: what CUDA graphs and compiled graphs read in place
        self.padded = bool(keep[1])  # one class of the declared rank
        self.lock = lock if lock is not None else threading.RLock()
        self._row_views: dict[int, tuple] = {}
        first = RankClass(rank, self._storage(slots, rank, False, False), {}, True)
        self._publish(BankState(first.factors, classes=(first,)))

    def _zeros(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Bank storage. Its address is fixed until the bank grows, so on CUDA it is marked static
        for torch.compile: CUDA graphs read it in place instead of copying it at every replay."""
        t = torch.zeros(*shape, device=self.device, dtype=self.dtype if dtype is None else dtype)
        if t.is_cuda:
            torch._dynamo.mark_static_address(t)
        return t

    def _storage(self, rows: int, rank: int, with_bias: bool, with_mag: bool) -> Factors:
        mag = self._zeros(rows, self.out_features, dtype=torch.float32).fill_(1.0) if with_mag else None  # LoRA: g = 1
        return Factors(self._zeros(rows, rank, self.in_features), self._zeros(rows, self.out_features, rank),
                       self._zeros(rows, self.out_features) if with_bias else None,
                       self._zeros(rows, dtype=torch.float32), self._zeros(rows, dtype=torch.int32), mag)

    def _state(self, classes: tuple[RankClass, ...], scale: dict, rank: dict, with_bias: frozenset,
               dora: frozenset) -> BankState:
        direct = len(classes) == 1 and classes[0].identity
        return BankState(classes[0].factors if direct else None, scale, rank, with_bias, dora, classes)

    def _publish(self, state: BankState) -> None:
        self.state = state
        self.factors = state.factors  # a plain attribute, for the traced path of a compiled model

    # -- what forwards read ---------------------------------------------------------------
    @property
    def present(self) -> frozenset[int]:
        return self.state.present

    @property
    def nbytes(self) -> int:
        """The bytes of every class's stacked factors (the small per-row tables aside)."""
        return sum(self.class_nbytes().values())

    def class_nbytes(self) -> dict[int, int]:
        """rank -> the bytes of that class's stacked factors."""
        out = {}
        for c in self.state.classes:
            f = c.factors
            out[c.rank] = sum(t.numel() * t.element_size() for t in (f.a, f.b, f.bias, f.mag) if t is not None)
        return out

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
            classes = tuple(RankClass(c.rank, Factors(*(t.to(device) if t is not None else None for t in c.factors)),
                                      c.rows, c.identity) for c in st.classes)
            self._publish(self._state(classes, st.scale, st.rank, st.with_bias, st.dora))

    def stage(self, slot: int, lora: ModuleLora) -> _Staged:
        """Storage holding ``lora`` in ``slot`` (which may hold an adapter no forward reads: it is
        written over); the current state is not modified."""
        st = self.state
        classes = list(st.classes)
        old = _where(st.classes, slot)
        target = self._class_for(lora.rank)
        clear = ()
        if old is not None and old != target:  # the slot changes class: it leaves its old one
            c = classes[old]
            clear = ((c.factors, c.rows[slot]),)
            rows = {s: r for s, r in c.rows.items() if s != slot}
            classes[old] = RankClass(c.rank, c.factors, rows, c.identity)
            if not rows and target is None:  # left empty: remade at the new rank by _refit
                target = old
            elif not rows:  # left empty: it goes
                del classes[old]
                target -= old < target
        if target is None:
            target = len(classes)
            classes.append(RankClass(lora.rank, self._storage(0, lora.rank, False, False), {}, not classes))
        classes[target] = self._refit(classes[target], slot, lora, sole=len(classes) == 1)
        return _Staged(slot, lora, tuple(classes), target, clear)

    def _class_for(self, rank: int) -> int | None:
        """The class a slot of ``rank`` goes to: the bank's one class when it is padded or empty,
        else the class of that rank (None: a new one)."""
        classes = self.state.classes
        if self.padded or (len(classes) == 1 and not classes[0].rows):
            return 0
        return next((i for i, c in enumerate(classes) if c.rank == rank), None)

    def _layout(self, c: RankClass, rows: dict, slot: int | None, sole: bool) -> tuple[bool, int]:
        """Whether the rows of ``c`` (``rows``, plus ``slot``) are the slots, and how many rows that
        needs at least. Rows indexed by slot are what the kernels read in place, so they stay so
        while that wastes at most a tenth of them and a row (a packed class turns back only when it
        is the bank's only one), and always in a padded bank or within the declared slots."""
        count = len(rows) + (slot is not None)
        span = max(max(rows, default=-1), -1 if slot is None else slot) + 1
        declared = self.keep[0] if sole else 0
        if self.padded:
            return True, max(declared, 1, span)
        cheap = span <= count + count // 10 + (1 if c.identity else 0)
        if (c.identity or sole) and (cheap or span <= declared):
            return True, max(declared, 1, span)
        return False, count

    def _refit(self, c: RankClass, slot: int | None = None, lora: ModuleLora | None = None,
               sole: bool = False) -> RankClass:
        """Class ``c`` holding ``lora`` in ``slot`` too: the same storage when it fits, else a copy
        grown to what is needed (the rows by a tenth), or shrunk to it once more than a tenth of it
        (and a row) is unused, or relaid (see ``_layout``), or with the bias or DoRA table dropped
        when no row has one. A fixed bank only grows."""
        st, f, have = self.state, c.factors, c.capacity
        rows = {s: r for s, r in c.rows.items() if s != slot}
        ranks = [st.rank[s] for s in rows] + ([lora.rank] if lora is not None else [])
        rank = max([self.keep[1], *ranks]) if self.padded else (ranks[0] if ranks else c.rank)
        identity, need = self._layout(c, rows, slot, sole)
        moves = None
        if identity != c.identity or (not identity and have > need + need // 10 + 1):
            moves = [(s if identity else i, rows[s]) for i, s in enumerate(sorted(rows))]  # relaid, or packed
            rows = {s: new for s, (new, _) in zip(sorted(rows), moves)}
        if slot is not None:
            mine = c.rows.get(slot) if moves is None else None  # its own row, if it keeps one here
            free = sorted(set(range(max(have, need))) - set(rows.values()))
            rows[slot] = slot if identity else (mine if mine is not None else free[0] if free else len(rows))
            need = max(need, rows[slot] + 1)
        if need > have:
            size = max(need, have + (max(1, have // 10) if self.grow else 0))
        elif not self.fixed and (moves is not None or rank != c.rank or have > need + need // 10 + 1):
            size = need  # copied anyway: fit it
        else:
            size = have
        others = rows.keys() - {slot}
        with_bias = (lora is not None and lora.bias is not None) or bool(st.with_bias & others) \
            or (self.fixed and f.bias is not None)
        with_mag = (lora is not None and lora.mag is not None) or bool(st.dora & others) \
            or (self.fixed and f.mag is not None)
        if moves is None and (size, rank) == (have, c.rank) and with_bias == (f.bias is not None) \
                and with_mag == (f.mag is not None):
            return RankClass(rank, f, rows, identity)
        return RankClass(rank, self._copy(f, size, rank, with_bias, with_mag, moves), rows, identity)

    def _copy(self, f: Factors, size: int, rank: int, with_bias: bool, with_mag: bool,
              moves: list[tuple[int, int]] | None = None) -> Factors:
        """New storage of ``size`` rows x ``rank`` holding what ``f`` holds: in its first rows, or
        row ``old`` at row ``new`` for every ``(new, old)`` of ``moves``. What keeps its shape is
        kept, at its address (a fixed bank only adds a table)."""
        if moves is None:
            dst = src = slice(0, min(size, f.a.shape[0]))
        else:
            dst = torch.tensor([n for n, _ in moves], dtype=torch.int64, device=self.device)
            src = torch.tensor([o for _, o in moves], dtype=torch.int64, device=self.device)
        same = moves is None and size == f.a.shape[0]
        if same and rank == f.a.shape[1]:
            a, b = f.a, f.b
        else:
            a, b = self._zeros(size, rank, self.in_features), self._zeros(size, self.out_features, rank)
            r = min(rank, f.a.shape[1])
            a[dst, :r] = f.a[src, :r]
            b[dst, :, :r] = f.b[src, :, :r]

        def table(old: torch.Tensor | None, *shape: int, dtype=None, fill: float = 0.0) -> torch.Tensor:
            if same and old is not None:
                return old
            t = self._zeros(size, *shape, dtype=dtype)
            if fill:
                t.fill_(fill)
            if old is not None:
                t[dst] = old[src]
            return t

        bias = table(f.bias, self.out_features) if with_bias else None
        mag = table(f.mag, self.out_features, dtype=torch.float32, fill=1.0) if with_mag else None  # LoRA: g = 1
        return Factors(a, b, bias, table(f.scale, dtype=torch.float32), table(f.rank, dtype=torch.int32), mag)

    def commit(self, staged: _Staged) -> None:
        """Write the slot (free, so no forward reads it) and swap the new state in."""
        dst, src = [], []
        self.prepare(staged, dst, src)
        torch._foreach_copy_(dst, src)
        self.publish(staged)

    def prepare(self, staged: _Staged, dst: list, src: list) -> None:
        """Everything of a commit but the copies, which are appended to ``dst``/``src`` so that a
        load makes one ``_foreach_copy_`` for all its modules. The row is free: no forward reads
        what this writes, and the current state is unchanged."""
        s, lora = staged.slot, staged.lora
        c = staged.classes[staged.target]
        f, row, r = c.factors, c.rows[s], lora.rank
        for old, old_row in staged.clear:  # the row the slot left must add nothing
            _set(old.scale, old_row, 0.0)
            _set(old.rank, old_row, 0)
        a_s, b_s = self._rows(f.a)[row], self._rows(f.b)[row]  # (R, K), (N, R)
        if r == f.a.shape[1]:
            dst += (a_s, b_s)
        else:  # the padding past the rank must read as exact zeros
            dst += (a_s[:r], b_s[:, :r])
            a_s[r:].zero_()
            b_s[:, r:].zero_()
        src += (lora.a, lora.b)
        if f.bias is not None:
            if lora.bias is not None:
                dst.append(f.bias[row])
                src.append(lora.bias)
            else:
                f.bias[row].zero_()
        if f.mag is not None:
            if lora.mag is not None:
                dst.append(f.mag[row])
                src.append(lora.mag)
            else:
                f.mag[row].fill_(1.0)
        _set(f.scale, row, lora.scale)
        _set(f.rank, row, r)

    def _rows(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The per-row views of a storage tensor, made once per storage (a load writes one row of
        every bank)."""
        rows = self._row_views.get(id(t))
        if rows is None or rows[0] is not t:
            if len(self._row_views) >= 8:  # storage replaced by growth: drop the old views
                self._row_views.clear()
            rows = self._row_views[id(t)] = (t, t.unbind(0))
        return rows[1]

    def publish(self, staged: _Staged) -> None:
        """Swap in the state that holds ``staged`` (written) besides what the current one holds."""
        s, lora = staged.slot, staged.lora
        st = self.state
        with_bias = st.with_bias | {s} if lora.bias is not None else st.with_bias - {s}
        dora = st.dora | {s} if lora.mag is not None else st.dora - {s}
        self._publish(self._state(staged.classes, {**st.scale, s: lora.scale}, {**st.rank, s: lora.rank},
                                  with_bias, dora))

    def remove(self, slot: int) -> None:
        st = self.state
        i = _where(st.classes, slot)
        if slot not in st.rank or i is None:
            return
        scale, rank = dict(st.scale), dict(st.rank)
        del scale[slot], rank[slot]
        c = st.classes[i]
        _set(c.factors.scale, c.rows[slot], 0.0)  # no running forward routes to a slot being freed
        _set(c.factors.rank, c.rows[slot], 0)
        rows = {s: r for s, r in c.rows.items() if s != slot}
        classes = list(st.classes)
        if rows or len(classes) == 1:
            classes[i] = RankClass(c.rank, c.factors, rows, c.identity)
        else:  # an empty class goes; forwards still reading the old state keep its tensors
            del classes[i]
        self._publish(self._state(tuple(classes), scale, rank, st.with_bias - {slot}, st.dora - {slot}))

    def compact(self) -> bool:
        """Shrink each class to what its slots need, when more than a tenth of it is unused or a
        bias or DoRA table is (see ``_refit``). The new storage is a copy published as a new
        state: a forward still reading the old state keeps the old tensors alive, untouched. True
        when the storage changed."""
        st = self.state
        classes = tuple(self._refit(c, sole=len(st.classes) == 1) for c in st.classes)
        if all(n.factors is c.factors and n.rows == c.rows for n, c in zip(classes, st.classes)):
            return False
        self._publish(self._state(classes, st.scale, st.rank, st.with_bias, st.dora))
        return True
