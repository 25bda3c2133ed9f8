"""Routing: from a request's adapter SPEC to a token-level plan the layers read.

A SPEC says which adapters each batch row uses: ``None`` (base only), a name, a mapping
``{name: weight}``, or a list of those with one entry per row. PEFT's ``adapter_names`` list, where
``"__base__"`` means no adapter, is the same thing spelled differently.

The plan is built once per model forward, from the batch size of the top-level input, and handed
to the patched layers through a ``ContextVar`` rather than through keyword arguments threaded
through model code. It is token-level: a layer that sees ``T`` flattened tokens for ``B`` rows maps
token ``t`` to row ``t // (T // B)``. That holds for ``(B, L, K)`` activations, for models that
flatten them to ``(B*L, K)`` (OPT), and for ``lm_head`` called on the last position only. A batch that
``generate`` expanded (``num_return_sequences``, ``num_beams``) repeats each row's SPEC in place,
the way ``generate`` repeats the rows themselves.

Lanes are laid out as a ``(D, M)`` grid: one row per distinct slot, padded to the longest. The grid
depends on the token count and on which slots a module holds, so it is built lazily and cached on
the plan; every layer of one forward shares it.
"""

from __future__ import annotations

import contextvars
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

BASE_NAME = "__base__"

# One row's adapters: ((name, weight), ...) sorted by name; () is the base model.
RowLanes = tuple[tuple[str, float], ...]


def _row_from_item(item, slots, where: str) -> RowLanes:
    if item is None or (isinstance(item, str) and item == BASE_NAME):
        return ()
    if isinstance(item, str):
        _check_name(item, slots, where)
        return ((item, 1.0),)
    if isinstance(item, Mapping):
        lanes: dict[str, float] = {}
        for name, weight in item.items():
            if not isinstance(name, str):
                raise TypeError(f"adapter names must be strings, got {name!r} in {where}")
            if name == BASE_NAME:
                raise ValueError(f"{BASE_NAME!r} cannot carry a weight (in {where})")
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real) and not (
                torch.is_tensor(weight) and weight.numel() == 1 and not weight.is_complex()
            ):
                raise TypeError(f"weight of adapter {name!r} must be a real number, got {weight!r}")
            weight = float(weight)
            if not math.isfinite(weight):
                raise ValueError(f"weight of adapter {name!r} must be finite, got {weight}")
            _check_name(name, slots, where)
            if weight != 0.0:
                lanes[name] = weight
        return tuple(sorted(lanes.items()))
    raise TypeError(
        f"{where}: expected None, an adapter name or a {{name: weight}} mapping, got {type(item).__name__}"
    )


def _check_name(name: str, known, where: str) -> None:
    if name not in known:
        listed = ", ".join(sorted(known)) or "none loaded"
        raise ValueError(f"unknown adapter {name!r} in {where} (loaded: {listed})")


@dataclass(frozen=True)
class Spec:
    """A validated SPEC: one row broadcast to the whole batch, or one row per batch row."""

    rows: tuple[RowLanes, ...]
    per_row: bool
    order: tuple = ()  # slotted: the slots in adapter-name order, so sums never depend on slot numbers

    def expand(self, batch_size: int) -> tuple[RowLanes, ...]:
        """Per-row lanes for a forward of ``batch_size`` rows (broadcast, or repeat for generate)."""
        if not self.per_row:
            return self.rows * batch_size
        n = len(self.rows)
        if batch_size == n:
            return self.rows
        if batch_size % n == 0:
            # generate() expands rows in place (repeat_interleave) for num_return_sequences and beams.
            k = batch_size // n
            return tuple(r for r in self.rows for _ in range(k))
        raise ValueError(
            f"the adapter SPEC list has {n} entries but the batch has {batch_size} rows; "
            "give one entry per row, or a single SPEC for all rows"
        )


    @property
    def names(self) -> frozenset[str]:
        return frozenset(name for row in self.rows for name, _ in row)

    def slotted(self, slots: Mapping[str, int]) -> Spec:
        """The same SPEC with names replaced by slots. Lanes stay in adapter-name order, and the
        plan groups slots in that order, so a weighted set sums the same way whichever slots its
        adapters were paged into."""
        order = tuple(slots[n] for n in sorted(self.names))
        return Spec(tuple(tuple((slots[n], w) for n, w in row) for row in self.rows), self.per_row, order)


def resolve_spec(spec, known) -> Spec:
    """Validate a SPEC against the loaded adapter names and normalise it."""
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        if len(spec) == 0:
            raise ValueError("an adapter SPEC list must have one entry per batch row, got an empty list")
        return Spec(tuple(_row_from_item(item, known, f"SPEC row {i}") for i, item in enumerate(spec)), True)
    return Spec((_row_from_item(spec, known, "SPEC"),), False)


def spec_from_adapter_names(adapter_names) -> list:
    """PEFT's ``adapter_names=[...]`` ("__base__" for no adapter) as a SPEC list."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise TypeError("adapter_names must be a list with one adapter name per batch row")
    return [None if n == BASE_NAME else n for n in adapter_names]


@dataclass(frozen=True)
class Grid:
    """The lanes of one forward for one set of slots, grouped by slot and padded to ``(D, M)``."""

    slots: tuple[int, ...]  # (D,) distinct slots, ascending
    token: torch.Tensor  # (D*M,) int64
    weight: torch.Tensor  # (D, M) fp32, request weight; 0 on padding lanes
    identity: bool  # token == arange(T): one slot, one lane per token, in order
    uniform: float | None = None  # the weight every lane shares, when they all do and none is padding
    inverse: torch.Tensor | None = None  # (T,) each token's lane: one token per row, each with one lane
    # with ``inverse``, when lane (d, m) is token offset + d*step_d + m*step_m: (offset, step_d, step_m);
    # rows grouped by adapter, or interleaved with a fixed period, then need no gather at all
    strides: tuple[int, int, int] | None = None


@dataclass
class RoutingPlan:
    """Per-row lanes of one forward, ``((slot, weight), ...)`` per row, expanded to tokens on demand."""

    rows: tuple[tuple[tuple[int, float], ...], ...]
    order: tuple[int, ...] = ()  # slots in the order lanes are grouped (default: ascending)
    _grids: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    @property
    def max_lanes(self) -> int:
        """The most adapters any row uses (the size of the largest weighted set)."""
        return max(len(row) for row in self.rows)

    def cached(self, key, build):
        """Anything derived from the plan once per forward and shared by the layers (lane layouts)."""
        try:
            return self._grids[key]
        except KeyError:
            value = self._grids[key] = build()
            return value

    def shared_lanes(self, per_row: int, num_slots: int, device: torch.device):
        """The Triton kernels' lanes of every row's adapters, for ``per_row`` tokens per row and slots
        ``[0, num_slots)``; cached. Not filtered by what a module holds (a slot a module does not hold
        has rank 0 there and adds nothing), so every layer of a forward with that token count shares
        them. Rows get a power of two of passes, so mixtures of other sizes mostly keep the shapes."""
        key = ("shared", per_row, num_slots, device)
        try:
            return self._grids[key]
        except KeyError:
            pass
        from .kernels.lanes import build_lanes

        batch = len(self.rows)
        passes = 1 << max(self.max_lanes - 1, 0).bit_length()
        slot = torch.full((batch, passes), -1, dtype=torch.int64)
        weight = torch.zeros(batch, passes, dtype=torch.float32)
        for row, lanes in enumerate(self.rows):
            for p, (s, w) in enumerate(lanes):
                slot[row, p], weight[row, p] = s, w
        shape = (batch, passes, per_row)
        token = torch.arange(batch * per_row).view(batch, 1, per_row).expand(shape)  # (B, P, L)
        lane_slot = slot.unsqueeze(-1).expand(shape).reshape(-1)
        lane_weight = weight.unsqueeze(-1).expand(shape).reshape(-1)
        lanes = build_lanes(_upload(token.reshape(-1), device), _upload(lane_slot, device), _upload(lane_weight, device),
                            num_slots, passes=passes, num_tokens=batch * per_row)
        self._grids[key] = lanes
        return lanes

    def grid(self, num_tokens: int, present: frozenset[int], device: torch.device) -> Grid | None:
        """The grid for a layer that sees ``num_tokens`` tokens and holds the slots ``present``.

        Returns None when no token of this forward uses any slot the layer holds.
        """
        key = (num_tokens, present, device)
        try:
            return self._grids[key]
        except KeyError:
            pass
        grid = self._build(num_tokens, present, device)
        self._grids[key] = grid
        return grid

    def _build(self, num_tokens: int, present: frozenset[int], device: torch.device) -> Grid | None:
        batch = len(self.rows)
        if num_tokens % batch:
            raise ValueError(
                f"cannot route: a patched layer saw {num_tokens} tokens for a batch of {batch} rows; "
                "each row must contribute the same number of tokens"
            )
        per_row = num_tokens // batch
        by_slot: dict[int, tuple[list[int], list[float]]] = {}
        for row, lanes in enumerate(self.rows):
            for slot, weight in lanes:
                if slot in present:
                    rows_w = by_slot.setdefault(slot, ([], []))
                    rows_w[0].append(row)
                    rows_w[1].append(weight)
        if not by_slot:
            return None
        slots = tuple(s for s in self.order if s in by_slot) if self.order else tuple(sorted(by_slot))
        width = max(len(by_slot[s][0]) for s in slots)
        row_idx = torch.zeros(len(slots), width, dtype=torch.int64)  # (D, W) rows, padded
        row_w = torch.zeros(len(slots), width, dtype=torch.float32)  # (D, W)
        for d, s in enumerate(slots):
            rows, weights = by_slot[s]
            row_idx[d, : len(rows)] = torch.tensor(rows, dtype=torch.int64)
            row_w[d, : len(rows)] = torch.tensor(weights, dtype=torch.float32)
        offs = torch.arange(per_row, dtype=torch.int64)
        token = (row_idx.unsqueeze(-1) * per_row + offs).reshape(-1)  # (D*W*L,)
        weight = row_w.unsqueeze(-1).expand(-1, -1, per_row).reshape(len(slots), width * per_row)  # (D, M)
        identity = len(slots) == 1 and width == batch and by_slot[slots[0]][0] == list(range(batch))
        uniform = None
        weights = {w for s in slots for w in by_slot[s][1]}
        if len(weights) == 1 and all(len(by_slot[s][0]) == width for s in slots):
            uniform = weights.pop()
        inverse = strides = None
        # one token per row (a decode step) whose lanes are a permutation of the tokens: a gather
        # back to token order and a dense add beat a scatter there; on long rows the scatter wins,
        # as it reads the branch output once instead of twice
        if not identity and per_row == 1 and token.numel() == num_tokens:
            ordered, lane = torch.sort(token)
            if torch.equal(ordered, torch.arange(num_tokens)):
                inverse = _upload(lane, device)
                strides = _strides(token.view(len(slots), width))
        return Grid(slots, _upload(token, device), _upload(weight.contiguous(), device), identity, uniform, inverse,
                    strides)


def _strides(token: torch.Tensor) -> tuple[int, int, int] | None:
    """``(offset, step_d, step_m)`` when ``token[d, m] == offset + d*step_d + m*step_m`` with
    non-negative steps (a strided view of the tokens), else None."""
    num_slots, width = token.shape
    offset = int(token[0, 0])
    step_d = int(token[1, 0]) - offset if num_slots > 1 else 0
    step_m = int(token[0, 1]) - offset if width > 1 else 0
    if step_d < 0 or step_m < 0:
        return None
    affine = offset + torch.arange(num_slots).view(-1, 1) * step_d + torch.arange(width) * step_m
    return (offset, step_d, step_m) if torch.equal(affine, token) else None


def _upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-built routing tensor on ``device``. To CUDA it goes through pinned memory without
    blocking, so building a plan never waits for the GPU."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


_MISSING = object()


class Router:
    """Per-wrapper routing state: the active SPEC (set by ``use``, already resolved to slots) and
    the plan of the running forward. Context variables keep both per thread."""

    def __init__(self) -> None:
        self._spec: contextvars.ContextVar = contextvars.ContextVar(f"lora_graph_spec_{id(self)}", default=None)
        self._plan: contextvars.ContextVar = contextvars.ContextVar(f"lora_graph_plan_{id(self)}", default=None)
        self._cache: dict = {}
        # The kernels' lanes of the running top-level forward, for the traced path of a compiled
        # model: ``(num_slots, ((num_tokens, lanes), ...))``, ``()`` for a forward without adapters,
        # None outside one. A plain attribute (a compiled graph cannot read a ContextVar), so
        # compiled forwards of one wrapper must not run in several threads at once.
        self.static = None

    def __deepcopy__(self, memo):
        raise TypeError(
            "a model wrapped by lora_graph cannot be deep-copied; copy it before wrap() or after unwrap()"
        )

    def set_spec(self, rows: Spec):
        return self._spec.set(rows)

    def reset_spec(self, token) -> None:
        self._spec.reset(token)

    def running_plan(self) -> RoutingPlan | None:
        return self._plan.get()

    def begin_forward(self, batch_size: int | None):
        """Called by the top-level forward pre-hook; returns a token for :meth:`end_forward`."""
        rows = self._spec.get()
        plan = None
        if rows is not None and batch_size is not None:
            plan = self.plan_for(rows, batch_size)
        return self._plan.set(plan)

    def end_forward(self, token) -> None:
        self._plan.reset(token)

    def plan_for(self, rows: Spec, batch_size: int) -> RoutingPlan | None:
        """The plan of a slotted SPEC for a batch of ``batch_size`` rows (cached)."""
        key = (rows, batch_size)
        plan = self._cache.get(key, _MISSING)
        if plan is _MISSING:
            expanded = rows.expand(batch_size)
            plan = RoutingPlan(expanded, rows.order) if any(expanded) else None
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = plan
        return plan

    def current(self, leading_dim: int | None = None) -> RoutingPlan | None:
        """The plan of the running forward, or one built from a layer's batch dimension when a
        submodule is called directly inside ``use()``."""
        plan = self._plan.get()
        if plan is not None:
            return plan
        rows = self._spec.get()
        if rows is None or leading_dim is None:
            return None
        return self.plan_for(rows, leading_dim)
