"""The torch backend: lanes grouped by adapter, two batched GEMMs per layer. The CPU path.

    plan ──grid(T, present)──> Grid: the lanes of the slots a layer holds, one row per slot, padded to (D, M)
    bank state ──gather──> the used slots' factors, cut to their largest rank
    branch = (pre, post) bound to both; a decode step reuses it

Per layer the grid gives, whatever the number of distinct adapters D, one gather of ``x`` into
``(D, M, K)``, a ``bmm`` through A, a ``bmm`` through B and one scatter back: the op count does not
grow with D, and each token multiplies only by its own adapters' factors. Padding lanes carry weight
0 and point at a token of their own slot, so an adapter whose values overflow reaches only the rows
that use it. Where one slot has far more lanes than the others (a new prompt among decode tokens in
a continuous-batching step), its lanes are a block of their own (``split_slots``): two blocks, that
op count twice, instead of every slot padded to the prompt's length. Cost follows the padded rank (the largest among the used slots); kernels/ bounds each
slot's loop by its real rank instead.

The specification is kernels/reference.py (plain loops over the bank and the kernels' lanes); the
tests hold this path to it. What makes this path fast on a CPU, where every torch call between two
base GEMMs costs 10-20 µs inside a real forward:
- the branch is bound once per layer, bank state and input shape, and reused by the next forward
  with the same request and shape (a decode step), skipping the routing lookups;
- what needs only the input (gather, shrink, and with several adapters the expand) runs before the
  base layer; only the add into its output runs after it, in place;
- a grid whose lanes share one ``w·s`` passes it as the add's ``alpha``: no separate multiply;
- one adapter for every token, in order (``identity``), is two plain GEMMs;
- a decode step whose lanes are a permutation of the tokens gathers back instead of scattering,
  and one whose lanes are a strided view of the tokens (rows grouped by adapter, or interleaved
  with a fixed period) reads and writes through ``as_strided`` views with no gather at all.

**DoRA.** A DoRA slot's lane adds ``w · (s·g ⊙ (B(Ax) + b) + (g − 1) ⊙ (base − base_bias))``
(kernels/factors.py). Summed over a token's lanes, that is

    out = base_scale ⊙ base + base_shift + Σ w·s·(g ⊙ B)(Ax)
    base_scale = 1 + Σ w·(g − 1)      base_shift = (1 − base_scale) ⊙ base_bias

where both sums run over the token's weighted set. So ``g`` enters the grouped ops twice, and
neither costs a per-adapter op: it scales the rows of the gathered B once per bank state (the
bank's B is untouched), and ``base_scale``/``base_shift`` are one ``(G, N)`` table per run of
tokens (one matmul of the runs' weights with the slots' ``g − 1``, when a layer's branch is bound),
applied to the base output by one broadcast multiply over ``(G, L, N)``. LoRA slots have ``g = 1``;
a layer whose grid holds no DoRA slot does exactly what it did without DoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..routing import upload
from .base import Backend, Layout


def _f32(t: torch.Tensor) -> torch.Tensor:
    # a no-op .float() still costs a dispatcher call; this path is per layer
    return t if t.dtype == torch.float32 else t.float()


# -- the grid -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """The lanes of one forward for one set of slots, grouped by slot and padded to ``(D, M)``."""

    slots: tuple[int, ...]  # (D,) distinct slots, in lane-group order
    token: torch.Tensor  # (D*M,) int64, the token of each lane; padding lanes repeat a token of their slot
    weight: torch.Tensor  # (D, M) fp32, request weight; 0 on padding lanes
    identity: bool  # token == arange(T): one slot, one lane per token, in order
    uniform: float | None = None  # the weight every real lane shares, when none is padding or none is read
    inverse: torch.Tensor | None = None  # (T,) each token's lane: one token per run, each in one lane
    # with ``inverse``, when lane (d, m) is token offset + d*step_d + m*step_m: (offset, step_d, step_m);
    # rows grouped by adapter, or interleaved with a fixed period, then need no gather at all
    strides: tuple[int, int, int] | None = None
    # the runs of tokens (rows, or packed sequences), for DoRA's per-run scale of the base output
    run_weight: torch.Tensor | None = None  # (G, D) fp32, the weight of slot d in run g's set (0: not in it)
    run_length: int | None = None  # L when every run has L tokens, so (T, N) views as (G, L, N)
    run_index: torch.Tensor | None = None  # (T,) int64, each token's run, when run lengths differ
    counts: tuple[int, ...] = ()  # (D,) the real lanes of each slot (M is their largest)


def build_grid(plan, num_tokens: int, present: frozenset[int], device: torch.device) -> Grid | None:
    """The grid of ``plan`` for a layer that sees ``num_tokens`` tokens and holds the slots
    ``present``; None when no token of the forward uses any of them."""
    lengths = plan.run_lengths(num_tokens)
    used = {slot for run, lanes in enumerate(plan.sets) if lengths[run] for slot, _ in lanes if slot in present}
    if not used:
        return None
    slots = tuple(s for s in plan.order if s in used) if plan.order else tuple(sorted(used))
    group = {s: d for d, s in enumerate(slots)}
    # (run, group, weight) of every lane the layer computes, grouped by slot, runs in order
    lanes = sorted(((run, group[s], w) for run, ws in enumerate(plan.sets) if lengths[run] for s, w in ws if s in used),
                   key=lambda lane: lane[1])
    run = torch.tensor([lane[0] for lane in lanes])  # (n,)
    grp = torch.tensor([lane[1] for lane in lanes])  # (n,)
    lane_w = torch.tensor([lane[2] for lane in lanes], dtype=torch.float32)  # (n,)
    run_len = torch.tensor(lengths)  # (G,)
    count = run_len[run]  # (n,) tokens of each lane's run
    first = run_len.cumsum(0)[run] - count  # (n,) its first token
    total = int(count.sum())
    of = torch.repeat_interleave(torch.arange(len(lanes)), count)  # (total,) the lane of each flat entry
    tok = first[of] + torch.arange(total) - (count.cumsum(0) - count)[of]  # (total,)
    per_slot = torch.zeros(len(slots), dtype=torch.int64).index_add_(0, grp, count)  # (D,)
    width = int(per_slot.max())
    pos = torch.arange(total) - (per_slot.cumsum(0) - per_slot)[grp[of]]  # (total,) place in the slot's row
    # padding lanes repeat their slot's first token (weight 0): a lane's product with weight 0 is
    # still NaN when the adapter's is not finite, so it must only land on a token that uses it
    token = tok[per_slot.cumsum(0) - per_slot].unsqueeze(1).repeat(1, width)  # (D, M)
    weight = torch.zeros(len(slots), width, dtype=torch.float32)  # (D, M)
    token[grp[of], pos] = tok
    weight[grp[of], pos] = lane_w[of]
    token = token.view(-1)  # (D*M,)
    identity = len(slots) == 1 and width == num_tokens and torch.equal(token, torch.arange(num_tokens))
    inverse = strides = None
    # one token per run (a decode step), each token in exactly one lane: a gather back to token
    # order and a dense add beat a scatter there, and skip the padding lanes (slots with unequal
    # numbers of requests); on long rows the scatter wins, as it reads the branch output once
    # instead of twice
    if not identity and all(n == 1 for n in lengths) and total == num_tokens:
        ordered, lane = torch.sort(tok)
        if torch.equal(ordered, torch.arange(num_tokens)):
            inverse = (grp[of] * width + pos)[lane]  # (T,) each token's lane
    weights = set(lane_w.tolist())
    padded = not bool((per_slot == width).all())
    # padding lanes must be multiplied by their weight 0, unless nothing reads them
    uniform = weights.pop() if len(weights) == 1 and (not padded or inverse is not None) else None
    # lanes without padding, each on a token of its own, laid out as a strided view of the tokens
    # (rows grouped by adapter, interleaved with a fixed period, or one packed sequence's run)
    if not identity and token.numel() == total and torch.unique(token).numel() == total:
        strides = _strides(token.view(len(slots), width))
    run_weight = torch.zeros(len(lengths), len(slots)).index_put_((run, grp), lane_w, accumulate=True)  # (G, D)
    even = len(set(lengths)) == 1
    run_index = None if even else upload(torch.repeat_interleave(torch.arange(len(lengths)), run_len), device)
    return Grid(slots, upload(token, device), upload(weight, device), identity, uniform,
                None if inverse is None else upload(inverse, device), strides,
                upload(run_weight, device), lengths[0] if even else None, run_index, tuple(per_slot.tolist()))


# An extra block of lanes costs a gather, two bmms and a scatter per layer: about what this many
# padding lanes cost (each reads K and writes N values).
_BLOCK_LANES = 32


def split_slots(grid: Grid) -> tuple[frozenset[int], frozenset[int]] | None:
    """The slots with many lanes and the others, when computing them as two blocks holds far
    fewer padding lanes than ``grid``: a packed step where one request's prompt (many tokens of
    one adapter) meets other requests' single decode tokens pads every slot to the prompt's
    length. None when splitting does not pay for the extra block (at least ``_BLOCK_LANES``
    lanes saved, and a quarter of the padded grid)."""
    counts = grid.counts
    if len(counts) < 2:
        return None
    order = sorted(range(len(counts)), key=lambda d: -counts[d])  # slots by lanes, most first
    padded = len(counts) * max(counts)
    best, cut = padded, None
    for j in range(1, len(order)):  # the j slots with most lanes, then the rest
        cost = j * counts[order[0]] + len(order) * counts[order[j]] + _BLOCK_LANES  # see without_lanes
        if cost < best:
            best, cut = cost, j
    if cut is None or best > 0.75 * padded:
        return None
    return (frozenset(grid.slots[d] for d in order[:cut]), frozenset(grid.slots[d] for d in order[cut:]))


def without_lanes(grid: Grid, heavy: frozenset[int]) -> Grid:
    """``grid`` less the lanes of the ``heavy`` slots, cut to the others' widest row. The heavy
    slots keep their rows, as padding on a token of their own (weight 0), so the grid has the
    same slots in the same order as ``grid``: the factors gathered for it serve both."""
    num_slots, width = grid.weight.shape
    keep = [d for d, s in enumerate(grid.slots) if s not in heavy]
    narrow = max(grid.counts[d] for d in keep)
    token = grid.token.view(num_slots, width)[:, :narrow].clone()  # (D, M') each row's lanes come first
    weight = grid.weight[:, :narrow].clone()
    for d, s in enumerate(grid.slots):
        if s in heavy:
            token[d] = token[d, 0]  # its first lane is one of its own tokens
            weight[d] = 0.0
    counts = tuple(0 if s in heavy else c for s, c in zip(grid.slots, grid.counts))
    return Grid(grid.slots, token.view(-1), weight, False, run_weight=grid.run_weight, run_length=grid.run_length,
                run_index=grid.run_index, counts=counts)


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


# -- operands ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Operands:
    """A grid's factors and coefficients, gathered from one bank state."""

    a: torch.Tensor  # (D, r, K), r the largest rank among the slots
    b: torch.Tensor  # (D, N, r); with DoRA slots fp32 with each row scaled by its slot's g
    bias: torch.Tensor | None  # (D, N); scaled by g like b
    coef: torch.Tensor  # (D, M, 1) fp32, w · s of each lane (0 on padding)
    shared_coef: float | None  # the one w · s every lane read shares, when they all do (see Grid.uniform)
    base_scale: torch.Tensor | None = None  # (G, N) fp32, 1 + Σ w·(g − 1) per run; None: no DoRA slot
    base_shift: torch.Tensor | None = None  # (G, N) fp32, (1 − base_scale) ⊙ base_bias; None: no base bias
    at: torch.Tensor | None = None  # (D, K, r) fp32 Aᵀ view, when the factors are fp32 (else made when bound)
    bt: torch.Tensor | None = None  # (D, r, N) fp32 Bᵀ view, likewise


class Gather(NamedTuple):
    """One layer's factors of some slots, as :func:`gather` cuts and lays them out."""

    a: torch.Tensor  # (D, r, K)
    b: torch.Tensor  # (D, N, r)
    bias: torch.Tensor | None  # (D, N)
    scale: torch.Tensor  # (D,) fp32, each slot's s
    mag: torch.Tensor | None  # (D, N) fp32 DoRA g, or None
    scales: tuple[float, ...]  # ``scale`` as numbers, to key what depends on it
    at: torch.Tensor | None  # a.transpose(1, 2) when fp32: what the batched GEMMs read
    bt: torch.Tensor | None  # b.transpose(1, 2) when fp32


def gather(state, slots: tuple[int, ...], device: torch.device) -> Gather:
    """``(a, b, bias, scale, mag, ...)`` of ``slots`` from a bank state, cut to their largest rank (so
    the bits of a result never depend on which other adapters were loaded before, nor on which
    rank's storage each slot sits in). With a DoRA slot
    among them, ``mag`` is their ``g`` ``(D, N)`` (1 for LoRA slots) and B's rows (and the bias) come
    scaled by it, in fp32; otherwise ``mag`` is None."""
    factors = state.factors
    r = max(state.rank[s] for s in slots)
    rows = slots
    if factors is None:  # a bank of several rank classes: their rows, one per slot, in order
        factors, rows = state.rows_of(slots), range(len(slots))
    idx = torch.tensor(rows, dtype=torch.int64, device=device)
    # (D, r, K) and (D, N, r). B is laid out as Bᵀ (D, r, N), and with several slots A as Aᵀ
    # (D, K, r): the batched GEMMs then read row-major operands, which is faster on CPU. One slot
    # keeps PEFT's A layout, so its shrink is PEFT's own GEMM, bit for bit. Each is selected
    # straight into its layout, one pass (selecting, then transposing the copy, is several
    # times slower); ``contiguous`` copies again only where the storage's rank exceeds r.
    if len(slots) == 1:
        a = factors.a.index_select(0, idx)[:, :r].contiguous()
    else:
        a = factors.a.transpose(1, 2).index_select(0, idx)[:, :, :r].contiguous().transpose(1, 2)
    bt = factors.b.transpose(1, 2).index_select(0, idx)[:, :r]  # (D, r, N)
    mag = None
    if factors.mag is not None and state.dora.intersection(slots):
        mag = factors.mag.index_select(0, idx)  # (D, N) fp32
        bt = bt.float() * mag.unsqueeze(1)  # g ⊙ B(Ax) = (g ⊙ B)(Ax), formed once per bank state
    b = bt.contiguous().transpose(1, 2)  # (D, N, r)
    bias = None
    if factors.bias is not None and state.with_bias.intersection(slots):
        bias = factors.bias.index_select(0, idx)  # (D, N)
        bias = bias if mag is None else bias.float() * mag
    scales = tuple(state.scale[s] for s in slots)
    scale = torch.tensor(scales, dtype=torch.float32, device=device)
    # the transposed views are made once here rather than at every bind (a serving engine rebinds
    # every layer whenever its batch changes); fp32 only, so that no fp32 copy outlives a bind
    at = a.transpose(1, 2) if a.dtype == torch.float32 else None
    bt = b.transpose(1, 2) if b.dtype == torch.float32 else None
    return Gather(a, b, bias, scale, mag, scales, at, bt)


def operands(gathered: Gather, grid: Grid, base_bias: torch.Tensor | None = None,
             coef: torch.Tensor | None = None) -> Operands:
    """A grid's operands; ``base_bias`` is the base layer's own bias (read only with DoRA slots);
    ``coef``, when given, is ``grid.weight · scale`` already formed (by another layer whose slots
    have the same scales)."""
    a, b, bias, scale, mag = gathered[:5]
    if coef is None:
        coef = (grid.weight * scale.unsqueeze(-1)).unsqueeze(-1)  # (D, M, 1)
    shared = None
    if grid.uniform is not None and len(set(gathered.scales)) == 1:
        shared = grid.uniform * gathered.scales[0]
    base_scale = base_shift = None
    if mag is not None:
        base_scale = torch.mm(grid.run_weight, mag - 1).add_(1.0)  # (G, N): 1 + Σ w·(g − 1) per run
        if base_bias is not None:
            base_shift = (1.0 - base_scale) * base_bias.detach().float()  # (G, N)
    return Operands(a, b, bias, coef, shared, base_scale, base_shift, gathered.at, gathered.bt)


def rescale_base(out: torch.Tensor, ops: Operands, grid: Grid) -> torch.Tensor:
    """``out ← base_scale ⊙ out + base_shift``, run by run, in place: DoRA's share of the base
    output. ``out`` is ``(T, N)`` fp32."""
    scale, shift = ops.base_scale, ops.base_shift
    if grid.run_length is not None:  # (T, N) as (G, L, N): a broadcast, no gather
        view = out.view(scale.shape[0], grid.run_length, out.shape[-1])  # (G, L, N)
        scale = scale.unsqueeze(1)  # (G, 1, N)
        shift = None if shift is None else shift.unsqueeze(1)
    else:  # packed runs of different lengths: each token's row of the tables
        view = out
        scale = scale.index_select(0, grid.run_index)  # (T, N)
        shift = None if shift is None else shift.index_select(0, grid.run_index)
    if shift is None:
        view.mul_(scale)
    else:
        torch.addcmul(shift, view, scale, out=view)
    return out


# -- the grouped ops ----------------------------------------------------------------------------------


def grouped_delta(x: torch.Tensor, base: torch.Tensor, ops: Operands, grid: Grid, inplace: bool = False) -> torch.Tensor:
    """Add the LoRA branch of every lane of ``grid`` to ``base`` (``(T, N)``) and return it in
    ``base.dtype``; ``x`` is ``(T, K)``. With ``inplace`` an fp32 ``base`` is updated and returned
    rather than copied (other dtypes are accumulated in an fp32 copy anyway).

    Semantics::

        out = base.float()
        if ops.base_scale is not None:                            # DoRA slots in the grid
            for t in range(T):                                    # g = run of token t
                out[t] = ops.base_scale[g] * out[t] + (ops.base_shift[g] if ops.base_shift is not None else 0)
        for d in range(D):
            for m in range(M):
                t = grid.token[d * M + m]
                h = ops.a[d].float() @ x[t].float()               # (R,)
                y = ops.b[d].float() @ h                          # (N,)
                if ops.bias is not None:
                    y = y + ops.bias[d].float()
                out[t] += ops.coef[d, m] * y
        return out.to(base.dtype)

    Accumulation is fp32 and the result is rounded to the base dtype once, as PEFT does with its
    default fp32 adapter weights; the coefficient multiplies ``B(Ax) + b``, in PEFT's order.
    """
    a, b, bias, coef, shared = ops.a, ops.b, ops.bias, ops.coef, ops.shared_coef
    num_slots, _, k = a.shape
    n, rows = b.shape[1], coef.shape[1]
    out = base if inplace and base.dtype == torch.float32 else base.to(torch.float32, copy=True)
    if ops.base_scale is not None:
        rescale_base(out, ops, grid)
    if grid.identity and bias is None and shared is not None:
        # one slot, every token in order with one shared w·s: two plain GEMMs, the second one
        # accumulating straight into the output
        h = torch.mm(_f32(x), _f32(a[0]).t())  # (T, R)
        out = out.addmm_(h, _f32(b[0]).t(), alpha=shared)  # (T, N)
    else:
        xs = x if grid.identity else x.index_select(0, grid.token)  # (D*M, K)
        h = torch.bmm(_f32(xs).view(num_slots, rows, k), _f32(a).transpose(1, 2))  # (D, M, R)
        y = torch.bmm(h, _f32(b).transpose(1, 2))  # (D, M, N)
        if bias is not None:
            y.add_(_f32(bias).unsqueeze(1))
        if shared is None:
            y.mul_(coef)
        y = y.view(num_slots * rows, n)  # (D*M, N)
        c = 1.0 if shared is None else shared
        if grid.identity:
            out = out.add_(y, alpha=c)
        elif grid.inverse is not None:
            out = out.add_(y.index_select(0, grid.inverse), alpha=c)
        else:
            out = out.index_add_(0, grid.token, y, alpha=c)
    return out if out.dtype == base.dtype else out.to(base.dtype)


def grouped_embedding_delta(ids: torch.Tensor, base: torch.Tensor, ops: Operands, grid: Grid,
                            embed_scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """Embedding LoRA of every lane added to ``base``; A (``(D, R, V)``) is gathered at each
    lane's token id instead of multiplied, then scaled by the embedding's ``embed_scale`` (Gemma)
    as PEFT does.

    Semantics::

        out = base.float()
        if ops.base_scale is not None:                                # DoRA, as in grouped_delta
            out[t] = ops.base_scale[run of t] * out[t]  for every token t
        for d, m:
            t = grid.token[d * M + m]
            y = ops.b[d].float() @ ops.a[d, :, ids[t]].float()        # (N,)
            out[t] += ops.coef[d, m] * y * embed_scale
        return out.to(base.dtype)
    """
    a, b, coef = ops.a, ops.b, ops.coef
    num_slots, r, _ = a.shape
    n, rows = b.shape[1], coef.shape[1]
    lane_ids = ids.index_select(0, grid.token).view(num_slots, 1, rows).expand(num_slots, r, rows)
    h = torch.gather(a, 2, lane_ids).float().transpose(1, 2)  # (D, M, R)
    y = torch.bmm(h, _f32(b).transpose(1, 2))  # (D, M, N)
    y = (y * coef).view(num_slots * rows, n)  # (D*M, N)
    if embed_scale is not None:
        scale = embed_scale.float() if torch.is_tensor(embed_scale) else float(embed_scale)
        y = y * scale
    if ops.base_scale is None:
        return base.float().index_add(0, grid.token, y).to(base.dtype)
    out = rescale_base(base.to(torch.float32, copy=True), ops, grid)
    return out.index_add_(0, grid.token, y).to(base.dtype)


# -- binding a layer's branch ---------------------------------------------------------------------------

# The largest mixed-batch branch output (elements) computed before the base layer: a decode step's.
# A prefill's would be evicted by the base GEMM and read back from memory (measured slower).
_EARLY_ELEMENTS = 1 << 18


def _no_pre(x):
    return None


def bind(ops: Operands, grid: Grid, shape: torch.Size):
    """:func:`grouped_delta` for one grid and input shape with everything but the activations
    bound, as ``(pre, post)``. The fast forms below run :func:`grouped_delta`'s own ops in its own
    order, on ready operands, so they are bit for bit the same; any input they do not expect (a
    dtype, a non-contiguous output, autograd) takes :func:`grouped_delta` itself."""
    num_tokens, k = math.prod(shape[:-1]), shape[-1]

    def delta(x, base):
        inplace = not base.requires_grad
        out = grouped_delta(x.reshape(num_tokens, k), base.reshape(num_tokens, -1), ops, grid, inplace=inplace)
        return out.view(base.shape)

    def unsplit(_, x, base):
        return delta(x, base)

    if ops.bias is not None or (grid.identity and ops.shared_coef is None):
        return _no_pre, unsplit
    rescale = None if ops.base_scale is None else _rescaler(ops, grid, shape, num_tokens)
    if grid.identity:
        return _bind_identity(ops, num_tokens, k, delta, rescale)
    pre, post = _bind_grouped(ops, grid, shape, num_tokens, k, delta, rescale)
    if ops.coef.shape[0] * ops.coef.shape[1] * ops.b.shape[1] <= _EARLY_ELEMENTS:
        return pre, post

    def after(_, x, base):  # a branch output this large would be evicted by the base GEMM
        return post(pre(x), x, base)

    return _no_pre, after


def _rescaler(ops: Operands, grid: Grid, shape: torch.Size, num_tokens: int):
    """DoRA's :func:`rescale_base` for outputs shaped like ``shape[:-1] + (N,)``, in place. Where
    the runs are the output's first dimension (batch rows, or one token per run) the tables are
    broadcast against it as they are: one call per layer."""
    scale, shift = ops.base_scale, ops.base_shift
    runs, n = scale.shape
    lead = tuple(shape[:-1])
    if grid.run_length is None or not lead or lead[0] != runs:

        def rescale(out):
            rescale_base(out.view(num_tokens, n), ops, grid)

        return rescale
    view = (runs, *(1,) * (len(lead) - 1), n)  # (G, 1, ..., N): each run's tokens after dim 0
    scale = scale.view(view)
    if shift is None:
        return lambda out: out.mul_(scale)
    shift = shift.view(view)
    return lambda out: torch.addcmul(shift, out, scale, out=out)


def _transposed(ops: Operands) -> tuple[torch.Tensor, torch.Tensor]:
    """Aᵀ ``(D, K, r)`` and Bᵀ ``(D, r, N)`` in fp32, as the GEMMs read them."""
    at = ops.at if ops.at is not None else ops.a.float().transpose(1, 2)
    bt = ops.bt if ops.bt is not None else ops.b.float().transpose(1, 2)
    return at, bt


def _bind_identity(ops: Operands, num_tokens: int, k: int, delta, rescale):
    """One adapter for every token, with one weight: two GEMMs, the second into the output."""
    at, bt = (t[0] for t in _transposed(ops))  # (K, R), (R, N)
    shared = ops.shared_coef

    def shrink(x):
        return torch.mm(x.view(num_tokens, k), at) if x.dtype == torch.float32 else None

    def expand(h, x, base):
        if h is None or base.dtype != torch.float32 or not base.is_contiguous() or base.requires_grad:
            return delta(x, base)
        if rescale is not None:
            rescale(base)
        base.view(num_tokens, -1).addmm_(h, bt, alpha=shared)
        return base

    return shrink, expand


def _bind_grouped(ops: Operands, grid: Grid, shape: torch.Size, num_tokens: int, k: int, delta, rescale):
    """Several slots (or one slot on some tokens): gather, two ``bmm``s, and a scatter, a gather
    back (``inverse``) or a strided add (``strides``) into the output."""
    num_slots, rows = ops.coef.shape[0], ops.coef.shape[1]
    at, bt = _transposed(ops)  # (D, K, R), (D, R, N)
    coef, c = ops.coef, 1.0 if ops.shared_coef is None else ops.shared_coef
    scaled = ops.shared_coef is None
    flat = shape[0] == num_tokens  # a (T, K) input, or one token per row: gather and scatter on dim 0

    def ready(x, base):
        return base.dtype == torch.float32 and not base.requires_grad and (flat or base.is_contiguous())

    if grid.strides is not None:
        offset, step_d, step_m = grid.strides  # the lanes are a strided view of the tokens

        def grouped(x):
            if x.dtype != torch.float32 or not x.is_contiguous():
                return None
            xs = x.as_strided((num_slots, rows, k), (step_d * k, step_m * k, 1), x.storage_offset() + offset * k)
            y = torch.bmm(torch.bmm(xs, at), bt)  # (D, M, N)
            return y.mul_(coef) if scaled else y

        def scatter(y, x, base):
            if y is None or not ready(x, base) or not base.is_contiguous():
                return delta(x, base)
            if rescale is not None:
                rescale(base)
            n = base.shape[-1]
            out = base.as_strided((num_slots, rows, n), (step_d * n, step_m * n, 1), base.storage_offset() + offset * n)
            out.add_(y, alpha=c)
            return base

        return grouped, scatter
    token, inverse = grid.token, grid.inverse
    lanes = (num_slots * rows, *shape[1:-1]) if flat else (num_slots * rows,)

    def gathered(x):
        if x.dtype != torch.float32:
            return None
        xs = x.index_select(0, token) if flat else x.reshape(num_tokens, k).index_select(0, token)
        y = torch.bmm(torch.bmm(xs.view(num_slots, rows, k), at), bt)  # (D, M, N)
        if scaled:
            y.mul_(coef)
        y = y.view(*lanes, -1)
        return y if inverse is None else y.index_select(0, inverse)  # back in token order

    def scattered(y, x, base):
        if y is None or not ready(x, base) or (rescale is not None and not base.is_contiguous()):
            return delta(x, base)
        if rescale is not None:
            rescale(base)
        out = base if flat else base.view(num_tokens, -1)
        if inverse is None:
            out.index_add_(0, token, y, alpha=c)
        else:
            out.add_(y, alpha=c)
        return base

    return gathered, scattered


def _chain(bound: list):
    """One ``(pre, post)`` for several blocks of lanes, each adding its own lanes to the output."""
    pres, posts = [pre for pre, _ in bound], [post for _, post in bound]

    def pre(x):
        return [p(x) for p in pres]

    def post(ys, x, base):
        for y, p in zip(ys, posts):
            base = p(y, x, base)
        return base

    return pre, post


# -- the backend ----------------------------------------------------------------------------------------


class TorchLayout(Layout):
    """Grids by (token count, slots held, device), and their coefficient tables; each layer's
    factors come gathered from the backend, which keeps them across layouts (a serving engine's
    batch changes at every step, its adapters much less often)."""

    def __init__(self, plan, gathered: Gathered) -> None:
        super().__init__(plan)
        self._grids: dict = {}
        self._gathered = gathered

    def grid(self, num_tokens: int, present: frozenset[int], device: torch.device) -> Grid | None:
        key = (num_tokens, present, device)
        try:
            return self._grids[key]
        except KeyError:
            grid = self._grids[key] = build_grid(self.plan, num_tokens, present, device)
            return grid

    def operands(self, layer, state, grid: Grid) -> Operands:
        gathered = self._gathered.get(layer, state, grid.slots)
        # every layer whose slots have the same scales shares one coefficient table (the grids
        # live as long as the layout, so their ids do)
        key = ("coef", id(grid), gathered.scales)
        coef = self._grids.get(key)
        ops = operands(gathered, grid, getattr(layer.base_layer, "bias", None), coef)
        if coef is None:
            self._grids[key] = ops.coef
        return ops

    def blocks(self, grid: Grid, num_tokens: int, present: frozenset[int], device: torch.device) -> tuple[Grid, ...]:
        """``grid`` as one block of lanes, or as two with less padding (:func:`split_slots`): the
        slots with many lanes, and ``grid`` without their lanes (the same slots, so the same
        gathered factors as the steps around it)."""
        key = ("blocks", num_tokens, present, device)
        try:
            return self._grids[key]
        except KeyError:
            parts = split_slots(grid)
            blocks = (grid,) if parts is None else (build_grid(self.plan, num_tokens, parts[0], device),
                                                    without_lanes(grid, parts[0]))
            self._grids[key] = blocks
            return blocks

    def bind(self, layer, state, x: torch.Tensor):
        num_tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
        grid = self.grid(num_tokens, state.present, x.device)
        if grid is None:
            return None
        # DoRA scales the base output once per token: only a grid without DoRA slots is split
        blocks = (grid,) if state.dora.intersection(grid.slots) else self.blocks(grid, num_tokens, state.present, x.device)
        if len(blocks) == 1:
            return bind(self.operands(layer, state, grid), grid, x.shape)
        return _chain([bind(self.operands(layer, state, block), block, x.shape) for block in blocks])

    def embedding(self, layer, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        state = layer.bank.state
        if not state.present:
            return out
        num_tokens = ids.numel()
        grid = self.grid(num_tokens, state.present, out.device)
        if grid is None:
            return out
        y = grouped_embedding_delta(ids.reshape(num_tokens), out.reshape(num_tokens, -1),  # (T,), (T, N)
                                    self.operands(layer, state, grid), grid, getattr(layer.base_layer, "embed_scale", None))
        return y.view(out.shape)


class Gathered:
    """Each layer's gathered factors for its last few slot sets, while the bank state is the one
    they were gathered from. Derived data: forwards of several threads may fill it at once (each
    entry is written whole), and it is dropped whenever a bank changes.

    Single slots (one-adapter batches, a prompt's own block in a packed step) are kept apart
    from sets of several: a serving engine's steps alternate between its batch's set and its new
    prompts' adapters, and one adapter's factors are small."""

    PER_LAYER = 4  # sets of several slots
    SINGLE = 8  # single slots

    def __init__(self, gather=gather) -> None:
        self._gather = gather  # (state, slots, device) -> what a forward reads
        self._entries: dict = {}  # (layer, single) -> {slots: (state, gathered)}, oldest first

    def get(self, layer, state, slots: tuple[int, ...]):
        single = len(slots) == 1
        entries = self._entries.setdefault((layer, single), {})
        entry = entries.get(slots)
        if entry is None or entry[0] is not state:
            entry = (state, self._gather(state, slots, layer.bank.device))
            if len(entries) >= (self.SINGLE if single else self.PER_LAYER):
                entries.pop(next(iter(entries)), None)
            entries[slots] = entry
        return entry[1]

    def clear(self) -> None:
        self._entries = {}


class TorchBackend(Backend):
    name = "torch"

    def __init__(self) -> None:
        self.gathered = Gathered()

    def prepare(self, plan) -> TorchLayout:
        return TorchLayout(plan, self.gathered)

    def forget(self) -> None:
        self.gathered.clear()

    def traced_inputs(self, layout, num_tokens, bank_sizes, device, buffers):
        return None  # traced layers run the eager branch (routing is Python data)

    # Under torch.compile the branch stays outside the graph: new adapters, weights or mixtures
    # never trigger a recompilation.
    @torch.compiler.disable
    def traced_linear(self, layer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        layout = layer.router.current(x)
        bound = None if layout is None else layout.branch(layer, x)
        return out if bound is None else bound[1](bound[0](x), x, out)

    @torch.compiler.disable
    def traced_embedding(self, layer, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        layout = layer.router.current(ids, ids=True)
        return out if layout is None else layout.embedding(layer, ids, out)
