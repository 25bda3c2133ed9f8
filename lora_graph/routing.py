"""Routing: from a request's adapter SPEC to one token-level plan per forward.

A SPEC says which adapters each part of a batch uses: ``None`` (base only), a name, a weighted set
``{name: weight}``, a list of those with one entry per batch row, or ``Packed(lengths, adapters)``
with one entry per run of consecutive tokens (a continuous-batching step packs many sequences into
one row). PEFT's ``adapter_names`` list, where ``"__base__"`` means no adapter, is a SPEC list
spelled differently.

    SPEC ──resolve_spec──> Spec (weighted sets by name) ──slotted──> Spec (by slot, when a request starts)
    Spec + the forward's input shape ──> RoutingPlan: one weighted set per run of tokens
    RoutingPlan ──backend.prepare──> layout (the backend's lane layout, built once, shared by every layer)

The plan is token-level. A row SPEC makes one run per batch row; a layer that sees ``T``
flattened tokens gives each row ``T / B`` of them, which holds for ``(B, L, K)`` activations, for
models that flatten them (OPT) and for ``lm_head`` on the last position. Inside ``lm.generate``, a
batch that it expanded (``num_return_sequences``, beams) repeats each row's SPEC in place, as
``generate`` repeats the rows; elsewhere a SPEC list has one entry per row, or one for all rows.
A ``Packed`` SPEC gives the runs explicitly; a layer sees either all its tokens or one token per
run (``lm_head`` on each sequence's last token).

Per-forward state travels one way: one ``ContextVar`` per wrapper holds a ``Scope``, the request in
force (set by ``use()``) and, inside a forward, that forward's layout; scopes nest through
``outer``. Compiled graphs cannot read a ContextVar, so for the traced path the top-level hook also
publishes what traced layers read on a ``threading.local``, which dynamo reads as a graph input,
per thread: compiled forwards may run in several threads at once.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import contextvars
import dataclasses
import itertools
import math
import numbers
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from .kernels.lanes import Lanes, build_lanes

BASE_NAME = "__base__"

# One row's (or one packed sequence's) adapters: ((name, weight), ...) sorted by name; () is the base.
WeightedSet = tuple[tuple[str, float], ...]
# The same resolved to slots, in adapter-name order.
SlotSet = tuple[tuple[int, float], ...]


@dataclass(frozen=True, init=False)
class Packed:
    """A SPEC for a packed batch: the forward's tokens, flattened, are consecutive runs of
    ``lengths``, and run ``i`` uses ``adapters[i]`` (None, a name or a ``{name: weight}`` set).

        lm(input_ids=ids_1xT, adapters=Packed(lengths=[5, 3, 7], adapters=["a", None, {"a": 0.5, "b": 1}]))

    ``logits_to_keep``: the indices of the tokens that reach ``lm_head``, when the forward is given
    the same ``logits_to_keep`` (a continuous-batching step keeps the last token of each sequence
    that gets a new one). Without it, ``lm_head`` may see all tokens or one per run.
    """

    lengths: tuple[int, ...]
    adapters: tuple
    logits_to_keep: tuple[int, ...] | None = None

    def __init__(self, lengths: Sequence[int], adapters: Sequence, logits_to_keep: Sequence[int] | None = None) -> None:
        if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence):
            raise TypeError(f"Packed lengths must be a list of token counts, got {type(lengths).__name__}")
        if isinstance(adapters, (str, bytes, Mapping)) or not isinstance(adapters, Sequence):
            raise TypeError("Packed adapters must be a list with one SPEC per run of tokens")
        for i, n in enumerate(lengths):
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
                raise ValueError(f"Packed lengths[{i}] must be a positive int, got {n!r}")
        if len(lengths) != len(adapters):
            raise ValueError(f"Packed has {len(lengths)} lengths but {len(adapters)} adapter entries; give one per run")
        if not lengths:
            raise ValueError("Packed needs at least one run of tokens")
        object.__setattr__(self, "lengths", tuple(int(n) for n in lengths))
        object.__setattr__(self, "adapters", tuple(adapters))
        if logits_to_keep is not None:
            keep = [int(i) for i in logits_to_keep]
            total = sum(self.lengths)
            if any(not 0 <= i < total for i in keep) or any(a >= b for a, b in zip(keep, keep[1:])):
                raise ValueError(f"Packed logits_to_keep must be increasing token indices below {total}, got {keep}")
            logits_to_keep = tuple(keep)
        object.__setattr__(self, "logits_to_keep", logits_to_keep)

    def kept_per_run(self) -> tuple[int, ...] | None:
        """How many of each run's tokens reach ``lm_head`` under ``logits_to_keep``."""
        return None if self.logits_to_keep is None else kept_per_run(self.lengths, self.logits_to_keep)


def kept_per_run(lengths, keep) -> tuple[int, ...]:
    """How many of the kept token positions ``keep`` fall in each run of ``lengths`` tokens."""
    ends = list(itertools.accumulate(lengths))
    counts = [0] * len(lengths)
    for i in keep:
        counts[bisect.bisect_right(ends, i)] += 1
    return tuple(counts)


_FP32_MAX = torch.finfo(torch.float32).max


def _weighted_set(item, known, where: str) -> WeightedSet:
    if item is None or (isinstance(item, str) and item == BASE_NAME):
        return ()
    if isinstance(item, str):
        _check_name(item, known, where)
        return ((item, 1.0),)
    if isinstance(item, Mapping):
        weights: dict[str, float] = {}
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
            if not math.isfinite(weight) or abs(weight) > _FP32_MAX:  # the lanes carry fp32 weights
                raise ValueError(f"weight of adapter {name!r} must be a finite fp32 number, got {weight}")
            _check_name(name, known, where)
            if weight != 0.0:
                weights[name] = weight
        return tuple(sorted(weights.items()))
    hint = " (decode it: adapter names are str)" if isinstance(item, (bytes, bytearray)) else ""
    raise TypeError(
        f"{where}: expected None, an adapter name or a {{name: weight}} mapping, got {type(item).__name__}{hint}"
    )


def _check_name(name: str, known, where: str) -> None:
    if name not in known:
        listed = ", ".join(sorted(known)) or "none"
        raise ValueError(f"unknown adapter {name!r} in {where} (registered: {listed})")


@dataclass(frozen=True)
class Spec:
    """A validated SPEC: weighted sets for the rows (``broadcast``: one set for every row) or, with
    ``lengths``, for the runs of a packed batch. ``slotted`` turns names into slots."""

    sets: tuple[WeightedSet, ...]
    broadcast: bool = False
    lengths: tuple[int, ...] | None = None
    order: tuple = ()  # slotted: the slots in adapter-name order, so sums never depend on slot numbers
    kept: tuple[int, ...] | None = None  # Packed: each run's tokens that reach lm_head
    expand: tuple[int, ...] = ()  # inside generate(): how many rows it makes of each input row

    @property
    def names(self) -> frozenset[str]:
        return frozenset(name for lanes in self.sets for name, _ in lanes)

    def slotted(self, slots: Mapping[str, int]) -> Spec:
        """The same SPEC with names replaced by slots. Lanes stay in adapter-name order, and the
        layouts group slots in that order, so a weighted set sums the same way whichever slots its
        adapters were paged into."""
        order = tuple(slots[n] for n in sorted(self.names))
        sets = tuple(tuple((slots[n], w) for n, w in lanes) for lanes in self.sets)
        return Spec(sets, self.broadcast, self.lengths, order, self.kept, self.expand)

    def plan(self, rows: int, num_tokens: int | None) -> RoutingPlan | None:
        """This request's plan for a forward of ``rows`` batch rows and ``num_tokens`` tokens."""
        if self.lengths is not None:
            return RoutingPlan.from_runs(self.lengths, self.sets, self.order, num_tokens, self.kept)
        return RoutingPlan.from_rows(self, rows)


def resolve_spec(spec, known) -> Spec:
    """Validate a SPEC against the registered adapter names and normalise it."""
    if isinstance(spec, Packed):
        sets = tuple(_weighted_set(item, known, f"Packed run {i}") for i, item in enumerate(spec.adapters))
        return Spec(sets, lengths=spec.lengths, kept=spec.kept_per_run())
    if isinstance(spec, (bytes, bytearray)):
        raise TypeError(f"an adapter SPEC cannot be {type(spec).__name__} ({spec!r}); adapter names are str")
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        if len(spec) == 0:
            raise ValueError("an adapter SPEC list must have one entry per batch row, got an empty list")
        return Spec(tuple(_weighted_set(item, known, f"SPEC row {i}") for i, item in enumerate(spec)))
    return Spec((_weighted_set(spec, known, "SPEC"),), broadcast=True)


def spec_from_adapter_names(adapter_names) -> list:
    """PEFT's ``adapter_names=[...]`` ("__base__" for no adapter) as a SPEC list."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise TypeError("adapter_names must be a list with one adapter name per batch row")
    return [None if n == BASE_NAME else n for n in adapter_names]


@dataclass(frozen=True, eq=False)
class RoutingPlan:
    """One forward's routing: a weighted set of slots per run of consecutive tokens
    (a batch row, or a sequence of a packed batch).

    ``lengths`` is the token count of each run in the forward's input (a packed batch), or None
    for batch rows, which share a layer's tokens equally whatever that layer's token count is.
    ``order`` lists the slots in the order lanes are grouped (adapter-name order).
    """

    sets: tuple[SlotSet, ...]
    lengths: tuple[int, ...] | None = None
    order: tuple[int, ...] = ()
    kept: tuple[int, ...] | None = None  # each run's tokens that reach lm_head (Packed logits_to_keep)

    @classmethod
    def from_rows(cls, spec: Spec, rows: int) -> RoutingPlan | None:
        """One run per batch row (broadcast, or repeated in place for ``generate``'s
        expansion); None when no row uses an adapter."""
        if spec.broadcast or len(spec.sets) == 1:
            sets = spec.sets * rows
        elif rows == len(spec.sets):
            sets = spec.sets
        elif rows in {len(spec.sets) * k for k in spec.expand}:
            # generate() expands rows in place (repeat_interleave) for num_return_sequences and beams.
            k = rows // len(spec.sets)
            sets = tuple(s for s in spec.sets for _ in range(k))
        else:
            within = f" (generate() makes {spec.expand[0]} of each input row)" if spec.expand else ""
            raise ValueError(
                f"the adapter SPEC list has {len(spec.sets)} entries but the batch has {rows} rows{within}; "
                "give one entry per row, or a single SPEC for all rows"
            )
        return cls(sets, None, spec.order) if any(sets) else None

    @classmethod
    def from_runs(cls, lengths: Sequence[int], sets: Sequence[SlotSet], order: tuple[int, ...] = (),
                  num_tokens: int | None = None, kept: tuple[int, ...] | None = None) -> RoutingPlan | None:
        """One run per entry of ``lengths`` tokens; ``num_tokens``, the forward's token count,
        must be their sum. None when no run uses an adapter."""
        lengths = tuple(lengths)
        if num_tokens is not None and sum(lengths) != num_tokens:
            raise ValueError(
                f"Packed lengths add up to {sum(lengths)} tokens but the forward's input has {num_tokens}; "
                "the lengths must cover the flattened input exactly"
            )
        sets = tuple(sets)
        return cls(sets, lengths, order, kept) if any(sets) else None

    @cached_property
    def max_lanes(self) -> int:
        """The most adapters any run uses (the size of the largest weighted set)."""
        return max(len(lanes) for lanes in self.sets)

    def run_lengths(self, num_tokens: int) -> tuple[int, ...]:
        """How many of a layer's ``num_tokens`` tokens each run holds."""
        runs = len(self.sets)
        if self.lengths is None:
            if num_tokens % runs:
                raise ValueError(
                    f"cannot route: a patched layer saw {num_tokens} tokens for a batch of {runs} rows; "
                    "each row must contribute the same number of tokens"
                )
            return (num_tokens // runs,) * runs
        if num_tokens == sum(self.lengths):
            return self.lengths
        if self.kept is not None and num_tokens == sum(self.kept):  # lm_head on the kept tokens
            return self.kept
        if num_tokens == runs:  # one token per sequence (lm_head on each one's last position)
            return (1,) * runs
        raise ValueError(
            f"cannot route: a patched layer saw {num_tokens} tokens, but the packed batch has "
            f"{sum(self.lengths)} tokens in {runs} runs"
        )

    def lanes(self, num_tokens: int, num_slots: int, device: torch.device,
              rows: tuple[int, ...] | None = None) -> Lanes:
        """Every (token, slot, weight) of the plan for a layer of ``num_tokens`` tokens, in the
        kernels' layout for a bank of ``num_slots`` slots (kernels/lanes.py): each token takes its
        run's weighted set, padded with slot -1 to a power of two of passes, so mixtures of
        other sizes mostly keep the layout's shapes. ``rows``: the slots of a gathered bank's rows,
        in order; each lane then names its slot's row (slots not among them are dropped)."""
        lengths = self.run_lengths(num_tokens)
        passes = 1 << max(self.max_lanes - 1, 0).bit_length()
        runs = len(self.sets)
        slot = torch.full((runs, passes), -1, dtype=torch.int64)  # (G, P)
        weight = torch.zeros(runs, passes, dtype=torch.float32)  # (G, P)
        at = None if rows is None else {s: i for i, s in enumerate(rows)}
        for run, lanes in enumerate(self.sets):
            for p, (s, w) in enumerate(lanes):
                slot[run, p], weight[run, p] = s if at is None else at.get(s, -1), w
        of = torch.repeat_interleave(torch.arange(runs), torch.tensor(lengths))  # (T,) each token's run
        token = torch.arange(num_tokens).unsqueeze(1).expand(num_tokens, passes)  # (T, P)
        return build_lanes(upload(token.reshape(-1), device), upload(slot[of].reshape(-1), device),
                           upload(weight[of].reshape(-1), device), num_slots, passes=passes, num_tokens=num_tokens)


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-built routing tensor on ``device``. To CUDA it goes through pinned memory without
    blocking, so building a layout never waits for the GPU."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class Scope:
    """What the ContextVar holds: the request in force and, inside a top-level forward, its layout
    (None: nothing to add) and what the traced path read before it."""

    request: Spec | None
    outer: Scope | None
    in_forward: bool = False
    layout: object = None
    traced_outer: object = None


class _Traced(threading.local):
    """Per thread: what traced layers read (the backend's ``traced_inputs``), and the buffers it
    keeps at fixed addresses."""

    inputs = None
    buffers = None


class Router:
    """Per-wrapper routing: the one ContextVar, the layouts of recent requests, and the traced
    path's per-thread inputs. ``backend`` prepares layouts; ``device`` is the model's."""

    def __init__(self, backend, device: torch.device) -> None:
        self.backend = backend
        self.device = device
        self._scope: contextvars.ContextVar = contextvars.ContextVar(f"lora_graph_{id(self)}", default=None)
        self._layouts: dict = {}  # (request, rows, tokens) -> layout | None; dropped when a bank changes
        self.traced = _Traced()
        self.bank_sizes: tuple[int, ...] = ()  # distinct slot counts of the banks, for traced inputs
        self.default: Spec | None = None  # the request of forwards outside any use() (set_adapter)
        self._blocks: collections.Counter = collections.Counter()  # thread -> open use() blocks with adapters
        self._blocks_lock = threading.Lock()
        self._warned = False

    def __deepcopy__(self, memo):
        raise TypeError(
            "a model wrapped by lora_graph cannot be deep-copied; copy it before wrap() or after unwrap()"
        )

    def __reduce_ex__(self, protocol):
        raise TypeError(
            "a model wrapped by lora_graph cannot be pickled; pickle or save it before wrap() or after unwrap() "
            "(its adapters are files: lm.adapters[name].path)"
        )

    # -- requests (use) ---------------------------------------------------------------------------
    def enter(self, request: Spec | None) -> Scope:
        scope = Scope(request, self._scope.get())
        self._scope.set(scope)
        if request is not None and request.names:
            with self._blocks_lock:
                self._blocks[threading.get_ident()] += 1
        return scope

    def leave(self, scope: Scope) -> None:
        self._scope.set(scope.outer)
        if scope.request is not None and scope.request.names:
            with self._blocks_lock:
                ident = threading.get_ident()
                self._blocks[ident] -= 1
                if self._blocks[ident] <= 0:
                    del self._blocks[ident]

    def _warn_unrouted(self) -> None:
        """A forward with no SPEC in this thread while a ``use()`` block with adapters is open in
        another: most likely a thread started inside the block, which a ContextVar does not reach."""
        if self._warned or not self._blocks or threading.get_ident() in self._blocks:
            return
        self._warned = True
        warnings.warn(
            "lora_graph: a forward ran with no adapters in one thread while a use() block with adapters is open in "
            "another; a thread started inside use() does not inherit its SPEC. Enter lm.use(...) in that thread, or "
            "start it with target=contextvars.copy_context().run, args=(fn, ...) to carry the block's SPEC",
            UserWarning, stacklevel=4,
        )

    def request(self) -> Spec | None:
        scope = self._scope.get()
        return None if scope is None else scope.request

    @contextlib.contextmanager
    def expanding(self, factors: tuple[int, ...]):
        """Inside the block (a ``generate`` call), a SPEC list with one entry per input row also
        routes a batch that generate expanded by one of ``factors``."""
        scope = self._scope.get()
        request = self.default if scope is None else scope.request  # a use() block's, or set_adapter's
        if request is None or request.broadcast or request.lengths is not None:
            yield
            return
        scope = self.enter(dataclasses.replace(request, expand=factors))
        try:
            yield
        finally:
            self.leave(scope)

    # -- forwards (the top-level hooks) -----------------------------------------------------------
    def begin_forward(self, rows: int | None, positions: int | None) -> None:
        """Push the forward's scope first (the post-hook pops it even if building the layout fails),
        then build or look up its layout and publish the traced path's inputs."""
        outer = self._scope.get()
        traced_outer = self.traced.inputs
        request = self.default if outer is None else outer.request
        if outer is None and request is None and self._blocks:
            self._warn_unrouted()
        known = rows is not None and (positions is not None or request is None or request.lengths is None)
        self._scope.set(Scope(request, outer, in_forward=known, traced_outer=traced_outer))
        if not known:  # no shape to plan from: layers fall back to their own leading dimension
            self.traced.inputs = None
            return
        num_tokens = rows * positions if positions is not None else None
        layout = None if request is None else self.layout(request, rows, num_tokens)
        self._scope.set(Scope(request, outer, True, layout, traced_outer))
        buffers = None
        if traced_outer is None:  # a nested forward must not overwrite its outer one's buffers
            buffers = self.traced.buffers
            if buffers is None:
                buffers = self.traced.buffers = {}
        self.traced.inputs = self.backend.traced_inputs(layout, num_tokens or rows, self.bank_sizes, self.device,
                                                        buffers)

    def end_forward(self) -> None:
        scope = self._scope.get()
        if scope is None:
            return
        self.traced.inputs = scope.traced_outer
        self._scope.set(scope.outer)

    def layout(self, request: Spec, rows: int, num_tokens: int | None):
        """The backend's layout of ``request`` for a forward of that shape, shared by forwards of
        the same request and shape (decode steps) until a bank changes; None: no adapter."""
        key = (request, rows, num_tokens if request.lengths is not None else None)
        try:
            return self._layouts[key]
        except KeyError:
            pass
        plan = request.plan(rows, num_tokens)
        layout = None if plan is None else self.backend.prepare(plan)
        if len(self._layouts) >= 64:
            self._layouts.clear()
        self._layouts[key] = layout
        return layout

    def current(self, x: torch.Tensor, ids: bool = False):
        """The layout a patched layer uses: its forward's, or, for a submodule called directly
        inside ``use()``, one planned from the layer's input when it is ``(B, L, K)`` activations
        (``(B, L)`` token ids with ``ids``)."""
        scope = self._scope.get()
        if scope is not None and (scope.in_forward or scope.request is None):
            return scope.layout
        request = self.default if scope is None else scope.request
        if request is None or x.dim() != (2 if ids else 3):
            return None
        num_tokens = x.numel() if ids else x.numel() // max(x.shape[-1], 1)
        return self.layout(request, x.shape[0], num_tokens)

    def invalidate(self, bank_sizes: tuple[int, ...]) -> None:
        """A bank changed (load, unload, growth, a move): forget the layouts, and what they
        gathered from the old banks, now."""
        self._layouts.clear()
        self.backend.forget()
        self.bank_sizes = bank_sizes
