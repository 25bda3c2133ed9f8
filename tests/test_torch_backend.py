"""The torch backend's grouped ops (lora_graph/backends/torch.py) against the reference and plain loops.

The operands come from the real plumbing: factors placed in an ``AdapterBank`` (mixed ranks,
zero-padded past each slot's rank), lanes grouped by ``build_grid`` from a ``RoutingPlan`` and
factors gathered from the bank state. Three checks:

* ``semantics_loop`` runs the ``Semantics:`` block of the docstring on the op's own operands, in
  fp64 without the final rounding, against the same per-token loop in fp64;
* ``ref32`` works per token from the request rows and the original, unpadded factors (rounded to
  the bank's dtype, where the bank rounds them): it knows nothing of the grid, so it also checks the
  plan and the bank;
* the specification, kernels/reference.py, on the whole bank and the plan's lanes (the operands the
  Triton kernels take): the grouped path must agree with it.

Tolerance, one rule for every case: fp32 within 1e-5; fp16/bf16
``|op − ref32| ≤ 2·|torch_same_dtype − ref32| + atol``, where ``torch_same_dtype`` is the same math
in plain torch in the low dtype. Rows with no adapter must come back as ``base`` exactly.

Popularity sweeps after Punica: distinct, uniform, zipf, identical, skewed, with no-adapter rows,
and multi-lane weighted rows with negative weights.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from lora_graph.adapters import ModuleLora
from lora_graph.backends import torch as torch_backend
from lora_graph.backends.torch import build_grid, gather, grouped_delta, grouped_embedding_delta, operands
from lora_graph.bank import AdapterBank
from lora_graph.kernels import reference
from lora_graph.routing import RoutingPlan

CPU = torch.device("cpu")
RANKS = [1, 4, 16, 8, 3, 16, 2, 5]  # slot -> rank; the padded rank is 16
SCALES = [2.0, 0.5, 1.25, 4.0, 1 / 3, 0.75, 8.0, 1.5]
WITH_BIAS = {1, 3, 6}
ROWS_PER_BATCH = 8
ATOL = {torch.float16: 1e-5, torch.bfloat16: 1e-5}


# -- requests ------------------------------------------------------------------------------------


def popularity(kind: str, num_rows: int, num_slots: int, seed: int = 0):
    """Per-row lanes ``((slot, weight), ...)`` for an adapter popularity pattern."""
    g = torch.Generator().manual_seed(seed)
    if kind == "distinct":
        return tuple(((i % num_slots, 1.0),) for i in range(num_rows))
    if kind == "identical":
        return tuple(((3, 0.75),) for _ in range(num_rows))  # slot 3 has a bias when the case has biases
    if kind == "uniform":
        slots = torch.randint(0, num_slots, (num_rows,), generator=g)
    elif kind == "zipf":
        p = torch.tensor([1.0 / (k + 1) ** 1.2 for k in range(num_slots)])
        slots = torch.multinomial(p, num_rows, replacement=True, generator=g)
    elif kind == "skewed":
        others = torch.randint(1, num_slots, (num_rows,), generator=g)
        slots = torch.where(torch.rand(num_rows, generator=g) < 0.8, 0, others)
    elif kind == "no-adapter-rows":
        slots = torch.randint(0, num_slots, (num_rows,), generator=g)
        return tuple(() if i % 3 == 1 else ((int(slots[i]), 1.0),) for i in range(num_rows))
    elif kind == "multi-lane":
        rows = []
        for i in range(num_rows):
            n = i % 4  # 0 to 3 lanes; the 0-lane rows are the base
            chosen = torch.randperm(num_slots, generator=g)[:n].tolist()
            weights = ((torch.rand(n, generator=g) * 4 - 2)).tolist()  # in [-2, 2)
            rows.append(tuple(sorted((s, round(w, 3) or 0.5) for s, w in zip(chosen, weights))))
        lanes = [w for row in rows for _, w in row]
        assert min(lanes) < 0 < max(lanes) and max(len(row) for row in rows) == 3
        return tuple(rows)
    else:
        raise ValueError(kind)
    return tuple(((int(s), 1.0),) for s in slots)


POPULARITY = ["distinct", "uniform", "zipf", "identical", "skewed", "no-adapter-rows", "multi-lane"]


# -- operands through the real bank --------------------------------------------------------------------


def make_loras(k: int, n: int, bias: bool, seed: int = 0) -> list[ModuleLora]:
    g = torch.Generator().manual_seed(seed)
    loras = []
    for slot, (r, s) in enumerate(zip(RANKS, SCALES)):
        a = torch.randn(r, k, generator=g) / math.sqrt(k)  # (r, K)
        b = torch.randn(n, r, generator=g) / math.sqrt(r)  # (N, r)
        c = torch.randn(n, generator=g) * 0.5 if bias and slot in WITH_BIAS else None
        loras.append(ModuleLora(a, b, c, r, s))
    return loras


def make_bank(loras: list[ModuleLora], k: int, n: int, dtype: torch.dtype, padded: bool = True) -> AdapterBank:
    """``padded``: one storage of the largest rank, indexed by slot (a declared ``max_rank``), which
    kernels/reference.py reads whole; else one storage per rank (bank.py)."""
    bank = AdapterBank(k, n, CPU, dtype, keep=(0, max(RANKS) if padded else 0))
    for slot, lora in enumerate(loras):
        bank.commit(bank.stage(slot, lora))
    return bank


def grid_ops(bank: AdapterBank, rows, num_tokens: int):
    """The grid of ``rows`` for this bank and its operands, per-lane coefficients."""
    grid = build_grid(RoutingPlan(rows), num_tokens, bank.present, CPU)
    assert grid is not None
    ops = operands(gather(bank.state, grid.slots, CPU), grid)
    return grid, torch_backend.Operands(ops.a, ops.b, ops.bias, ops.coef, None)


def run_op(bank: AdapterBank, rows, x: torch.Tensor, base: torch.Tensor):
    grid, ops = grid_ops(bank, rows, x.shape[0])
    out = grouped_delta(x, base, ops, grid)
    return out, (ops.a, ops.b, ops.bias, grid.token, ops.coef)


def spec_op(bank: AdapterBank, rows, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """kernels/reference.py on the whole bank and the plan's lanes."""
    lanes = RoutingPlan(rows).lanes(x.shape[0], bank.factors.num_slots, CPU)
    return reference.lora_delta(x, base, bank.factors, lanes)


# -- the loops -------------------------------------------------------------------------------------


def semantics_loop(x, base, a, b, bias, token, coef) -> torch.Tensor:
    """The ``Semantics:`` block of ``lora_delta``, in fp64 (the final cast left out), so that how
    the operands are laid out cannot change its rounding."""
    out = base.double().clone()
    coef = coef.reshape(coef.shape[0], coef.shape[1])  # (D, M); the op also takes (D, M, 1)
    num_slots, rows = coef.shape
    for d in range(num_slots):
        for m in range(rows):
            t = int(token[d * rows + m])
            h = a[d].double() @ x[t].double()  # (R,)
            y = b[d].double() @ h  # (N,)
            if bias is not None:
                y = y + bias[d].double()
            out[t] += coef[d, m] * y
    return out


def per_token(rows, loras, x, base, dtype: torch.dtype, store: torch.dtype) -> torch.Tensor:
    """Each token's lanes from its row, with the unpadded factors stored in ``store`` and the math
    done in ``dtype``: fp32 gives ``ref32``, a low dtype gives ``torch_same_dtype``."""
    out = base.to(dtype).clone()
    per_row = x.shape[0] // len(rows)
    for t in range(x.shape[0]):
        for slot, w in rows[t // per_row]:
            lora = loras[slot]
            a, b = lora.a.to(store).to(dtype), lora.b.to(store).to(dtype)
            y = b @ (a @ x[t].to(dtype))  # (N,)
            if lora.bias is not None:
                y = y + lora.bias.to(store).to(dtype)
            out[t] = out[t] + torch.tensor(w * lora.scale, dtype=dtype) * y
    return out


def check(out, ref32, lowp, base, rows):
    assert out.dtype == base.dtype and out.shape == base.shape
    if base.dtype == torch.float32:
        torch.testing.assert_close(out, ref32, rtol=1e-5, atol=1e-5)
    else:
        err = (out.float() - ref32).abs()
        bound = 2 * (lowp.float() - ref32).abs() + ATOL[base.dtype]
        worst = (err - bound).max()
        assert worst <= 0, f"max |op - ref32| beyond the bound by {worst.item():.3g}"
    per_row = base.shape[0] // len(rows)
    for i, row in enumerate(rows):
        if not row:  # a row with no adapter is the base output, bit for bit
            assert torch.equal(out[i * per_row:(i + 1) * per_row], base[i * per_row:(i + 1) * per_row])


# -- lora_delta -------------------------------------------------------------------------------------

DTYPES = [
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),  # bf16 activations, fp32 adapter storage (the default)
]


# every popularity x shape x dtype without bias; with bias on the odd shape
DELTA_CASES = [
    (kind, shape, dt, False) for kind in POPULARITY for shape in [(32, 48), (129, 1000), (1000, 129)] for dt in DTYPES
] + [(kind, (129, 1000), dt, True) for kind in POPULARITY for dt in DTYPES]
DTYPE_IDS = {DTYPES[0]: "fp32", DTYPES[1]: "fp16", DTYPES[2]: "bf16", DTYPES[3]: "bf16-fp32bank"}


@pytest.mark.parametrize(
    "kind, shape, dtypes, bias", DELTA_CASES,
    ids=[f"{c[0]}-{c[1][0]}x{c[1][1]}-{DTYPE_IDS[c[2]]}{'-bias' if c[3] else ''}" for c in DELTA_CASES],
)
def test_lora_delta(kind, shape, dtypes, bias):
    (k, n), (dtype, store) = shape, dtypes
    loras = make_loras(k, n, bias)
    bank = make_bank(loras, k, n, store)
    rows = popularity(kind, ROWS_PER_BATCH, len(loras))
    g = torch.Generator().manual_seed(1)
    tokens = ROWS_PER_BATCH * 3
    x = torch.randn(tokens, k, generator=g).to(dtype)  # (T, K)
    base = torch.randn(tokens, n, generator=g).to(dtype)  # (T, N)

    out, operands = run_op(bank, rows, x, base)
    ref32 = per_token(rows, loras, x, base, torch.float32, store)
    # the plan and the bank give operands whose semantics are the per-token lanes
    torch.testing.assert_close(semantics_loop(x, base, *operands), per_token(rows, loras, x, base, torch.float64, store),
                               rtol=1e-6, atol=1e-6)
    lowp = None if dtype == torch.float32 else per_token(rows, loras, x, base, dtype, store)
    check(out, ref32, lowp, base, rows)
    assert (out.float() - base.float()).abs().max() > 1e-2  # the branch is really there
    check(spec_op(bank, rows, x, base), ref32, lowp, base, rows)  # the specification agrees
    if dtype == torch.float32:
        torch.testing.assert_close(out, spec_op(bank, rows, x, base), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_delta_one_token_per_row(dtype):
    """lm_head on the last position only: T == batch rows."""
    loras = make_loras(64, 96, bias=True)
    bank = make_bank(loras, 64, 96, dtype)
    rows = popularity("multi-lane", ROWS_PER_BATCH, len(loras), seed=3)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(ROWS_PER_BATCH, 64, generator=g).to(dtype)
    base = torch.randn(ROWS_PER_BATCH, 96, generator=g).to(dtype)
    out, _ = run_op(bank, rows, x, base)
    ref32 = per_token(rows, loras, x, base, torch.float32, dtype)
    lowp = None if dtype == torch.float32 else per_token(rows, loras, x, base, dtype, dtype)
    check(out, ref32, lowp, base, rows)


def test_bank_zero_pads_past_rank_and_reuses_slots():
    k, n = 40, 24
    loras = make_loras(k, n, bias=True)
    bank = make_bank(loras, k, n, torch.float32)
    f = bank.factors
    assert tuple(f.a.shape) == (len(RANKS), max(RANKS), k) and tuple(f.b.shape) == (len(RANKS), n, max(RANKS))
    for slot, lora in enumerate(loras):
        r = lora.rank
        assert torch.equal(f.a[slot, :r], lora.a) and torch.equal(f.b[slot, :, :r], lora.b)
        assert not f.a[slot, r:].any() and not f.b[slot, :, r:].any()
        assert int(f.rank[slot]) == r and float(f.scale[slot]) == pytest.approx(lora.scale)
    # slot 2 (rank 16) is freed and reused by a rank-2 adapter without bias: nothing stale may remain
    bank.remove(2)
    g = torch.Generator().manual_seed(5)
    small = ModuleLora(torch.randn(2, k, generator=g), torch.randn(n, 2, generator=g), None, 2, 3.0)
    bank.commit(bank.stage(2, small))
    loras[2] = small
    assert not bank.factors.a[2, 2:].any() and not bank.factors.b[2, :, 2:].any()
    rows = (((2, 1.0), (3, -0.5)), ((2, 2.0),), ((1, 1.0),), ())
    x = torch.randn(8, k, generator=g)
    base = torch.randn(8, n, generator=g)
    out, _ = run_op(bank, rows, x, base)
    check(out, per_token(rows, loras, x, base, torch.float32, torch.float32), None, base, rows)


@pytest.mark.parametrize("kind", ["distinct", "uniform", "no-adapter-rows", "multi-lane"])
def test_scatter_by_inverse_matches_index_add(kind):
    """Where each row is one token with exactly one lane (a decode step), the grid carries each
    token's lane and the op scatters by a gather and a dense add, whether or not the grid holds
    padding lanes (slots with unequal numbers of rows); elsewhere (base rows, several lanes,
    longer rows) it has none. The sums agree with the scatter-add to fp32
    rounding, with a shared ``w · s`` or per-lane ones."""
    k, n = 48, 40
    loras = make_loras(k, n, bias=False)
    bank = make_bank(loras, k, n, torch.float32)
    rows = popularity(kind, len(loras) * 2, len(loras))
    assert build_grid(RoutingPlan(rows), len(rows) * 2, bank.present, CPU).inverse is None  # two tokens per row
    g = torch.Generator().manual_seed(3)
    x, base = torch.randn(len(rows), k, generator=g), torch.randn(len(rows), n, generator=g)
    grid, ops = grid_ops(bank, rows, x.shape[0])
    assert (grid.inverse is not None) == (kind in ("distinct", "uniform"))
    assert kind != "uniform" or len(grid.token) > x.shape[0]  # padding lanes: the inverse skips them
    if grid.inverse is None:
        return
    assert torch.equal(grid.token[grid.inverse], torch.arange(x.shape[0]))
    scatter = dataclasses.replace(grid, inverse=None)
    for shared in (None, 1.5):  # with a shared w·s, coef is not read
        with_shared = dataclasses.replace(ops, shared_coef=shared)
        by_inverse = grouped_delta(x, base, with_shared, grid)
        # the scatter reads every lane, padding too: it gets per-lane coefficients, 0 on padding
        per_lane = with_shared if shared is None else dataclasses.replace(
            ops, shared_coef=None, coef=torch.where(grid.weight.unsqueeze(-1) != 0, shared, 0.0))
        torch.testing.assert_close(by_inverse, grouped_delta(x, base, per_lane, scatter), rtol=1e-6, atol=1e-6)
        assert (by_inverse - base).abs().max() > 1e-2


def test_grid_strides_only_for_strided_views_of_the_tokens():
    """A grid records ``(offset, step_d, step_m)`` exactly when lane (d, m) is token
    ``offset + d*step_d + m*step_m``, with no padding lane and no token in two lanes: rows grouped
    by adapter or interleaved with a period, one token per row or several."""
    def strides(rows, per_row=1):
        return build_grid(RoutingPlan(rows), len(rows) * per_row, frozenset({0, 1, 2}), CPU).strides

    one, two, three = ((0, 1.0),), ((1, 1.0),), ((2, 1.0),)
    assert strides((one, one, two, two, three, three)) == (0, 2, 1)  # grouped by adapter
    assert strides((one, two, three, one, two, three)) == (0, 1, 3)  # interleaved
    assert strides((two, two, one, one)) is None  # the slots' blocks run backwards
    assert strides((one, two, two, one)) is None  # a permutation, not a strided view
    assert strides((one, one, two, two), per_row=2) == (0, 4, 1)  # prompts grouped by adapter
    assert strides((one, two, one, two), per_row=2) is None  # each slot's tokens are two blocks
    assert strides((one, one, two)) is None  # unequal groups: padding lanes
    both = ((0, 1.0), (1, 0.5))
    assert strides((both, both)) is None  # every token in two lanes (an affine view with step_d 0)


def test_split_slots_only_where_padding_dominates():
    """A prompt of one adapter among single decode tokens of others splits into two blocks of
    lanes, the prompt's slot alone; a decode step with uneven groups does not (the extra block
    costs more than the padding it saves)."""
    prompt = RoutingPlan.from_runs([40] + [1] * 14, [((0, 1.0),)] + [(((i % 7) + 1, 1.0),) for i in range(14)],
                                   num_tokens=54)
    grid = build_grid(prompt, 54, frozenset(range(8)), CPU)
    assert grid.counts == (40,) + (2,) * 7 and grid.weight.shape == (8, 40)
    assert torch_backend.split_slots(grid) == (frozenset({0}), frozenset(range(1, 8)))
    block = build_grid(prompt, 54, frozenset({0}), CPU)
    assert block.strides == (0, 0, 1)  # the prompt's own tokens, read in place
    rest = torch_backend.without_lanes(grid, frozenset({0}))
    assert rest.slots == grid.slots and rest.weight.shape == (8, 2)  # the same gathered factors serve it
    token = rest.token.view(8, 2)
    assert torch.equal(token[0], torch.zeros(2, dtype=torch.int64)) and not rest.weight[0].any()  # padding on a prompt token
    assert torch.equal(token[1:], grid.token.view(8, 40)[1:, :2]) and torch.equal(rest.weight[1:], grid.weight[1:, :2])
    decode = RoutingPlan(tuple(((i % 5, 1.0),) for i in range(16)))  # counts 4, 3, 3, 3, 3
    assert torch_backend.split_slots(build_grid(decode, 16, frozenset(range(8)), CPU)) is None


@pytest.mark.parametrize("per_row_shape", [False, True], ids=["TK", "1TK"])
def test_split_blocks_add_what_one_grid_adds(per_row_shape):
    """The two blocks' bound branches, chained as a layer binds them, give each token its own
    lanes: the reference per token within 1e-5, and tokens of no adapter exactly the base."""
    k, n = 48, 40
    loras = make_loras(k, n, bias=False)
    bank = make_bank(loras, k, n, torch.float32)
    sets = [((0, 0.5),)] + [((((i % 7) + 1, 1.0),) if i % 5 else ()) for i in range(14)]  # 3 base tokens
    plan = RoutingPlan.from_runs([40] + [1] * 14, sets, num_tokens=54)
    g = torch.Generator().manual_seed(3)
    x, base = torch.randn(54, k, generator=g), torch.randn(54, n, generator=g)
    shape = (1, 54, k) if per_row_shape else (54, k)
    whole = build_grid(plan, 54, bank.present, CPU)
    parts = torch_backend.split_slots(whole)
    assert parts is not None
    bound = []
    for block in (build_grid(plan, 54, parts[0], CPU), torch_backend.without_lanes(whole, parts[0])):
        bound.append(torch_backend.bind(operands(gather(bank.state, block.slots, CPU), block), block,
                                        torch.Size(shape)))
    pre, post = torch_backend._chain(bound)
    got = post(pre(x.view(shape)), x.view(shape), base.clone().view(*shape[:-1], n)).view(54, n)
    spec = reference.lora_delta(x, base, bank.factors, plan.lanes(54, bank.factors.num_slots, CPU))
    torch.testing.assert_close(got, spec, rtol=1e-5, atol=1e-5)
    plain = [40 + i for i in range(14) if i % 5 == 0]  # the decode tokens of no adapter
    assert torch.equal(got[plain], base[plain])
    assert (got - base).abs().max() > 1e-2


@pytest.mark.parametrize("early", [True, False], ids=["before-base", "after-base"])
@pytest.mark.parametrize("per_row", [1, 3], ids=["decode", "prompt"])
@pytest.mark.parametrize("kind", ["identity-shared-weight", "identity", "distinct", "uniform", "multi-lane", "bias"])
def test_bound_branch_is_the_op(kind, per_row, early, monkeypatch):
    """The branch a patched layer binds for decode steps (``bind``), on ``(B, L, K)``
    activations, is the op bit for bit, whether its input-only part runs before the base layer (a
    small output) or everything runs after it (a large one); both are right per token."""
    monkeypatch.setattr(torch_backend, "_EARLY_ELEMENTS", 1 << 30 if early else 0)
    k, n, batch = 48, 40, ROWS_PER_BATCH
    loras = make_loras(k, n, bias=kind == "bias")
    bank = make_bank(loras, k, n, torch.float32)
    if kind.startswith("identity"):
        rows = tuple(((2, 0.5 if kind == "identity-shared-weight" else 0.25 * (i + 1)),) for i in range(batch))
    else:
        # distinct: 4 adapters on 8 rows, so each token's lane is not its own index
        rows = popularity("distinct" if kind == "bias" else kind, batch, 4 if kind in ("distinct", "bias") else len(loras))
    g = torch.Generator().manual_seed(11)
    x, base = torch.randn(batch, per_row, k, generator=g), torch.randn(batch, per_row, n, generator=g)
    grid = build_grid(RoutingPlan(rows), batch * per_row, bank.present, CPU)
    state = bank.state
    assert (grid.inverse is not None) == (kind in ("distinct", "uniform", "bias") and per_row == 1)
    assert grid.inverse is None or not torch.equal(grid.inverse, grid.token)
    ops = operands(gather(state, grid.slots, CPU), grid)
    pre, post = torch_backend.bind(ops, grid, x.shape)
    got = post(pre(x), x, base.clone())
    want = grouped_delta(x.view(-1, k), base.view(-1, n).clone(), ops, grid, inplace=True)
    assert torch.equal(got, want.view(base.shape))
    check(got.view(-1, n), per_token(rows, loras, x.view(-1, k), base.view(-1, n), torch.float32, torch.float32),
          None, base.view(-1, n), rows)


@pytest.mark.parametrize("kind", ["identity-shared-weight", "identity", "distinct"])
def test_lora_delta_inplace(kind):
    """``inplace=True`` updates an fp32 ``base`` and returns it, with the same values as the copying
    call, which leaves ``base`` alone; a low-precision ``base`` is never written."""
    k, n = 48, 40
    loras = make_loras(k, n, bias=False)
    bank = make_bank(loras, k, n, torch.float32)
    rows = popularity("distinct", 4, len(loras)) if kind == "distinct" else ((((2, 0.5),),) * 4)
    g = torch.Generator().manual_seed(7)
    x, base = torch.randn(8, k, generator=g), torch.randn(8, n, generator=g)
    grid, ops = grid_ops(bank, rows, 8)
    assert grid.identity == (kind != "distinct")
    shared = 0.5 * SCALES[2] if kind == "identity-shared-weight" else None
    ops = dataclasses.replace(ops, shared_coef=shared)
    kept = base.clone()
    copied = grouped_delta(x, base, ops, grid)
    assert torch.equal(base, kept) and copied.data_ptr() != base.data_ptr()
    updated = grouped_delta(x, base, ops, grid, inplace=True)
    assert updated is base
    torch.testing.assert_close(updated, copied, rtol=0, atol=0)
    check(copied, per_token(rows, loras, x, kept, torch.float32, torch.float32), None, kept, rows)
    low = kept.bfloat16()
    low_kept = low.clone()
    assert grouped_delta(x, low, ops, grid, inplace=True).dtype == torch.bfloat16
    assert torch.equal(low, low_kept)


class _CountOps(TorchFunctionMode):
    """Counts the torch calls made inside the block."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def test_op_count_does_not_grow_with_distinct_adapters():
    k, n = 32, 16
    bank = make_bank(make_loras(k, n, bias=True), k, n, torch.float32)
    x, base = torch.randn(16, k), torch.randn(16, n)
    counts = []
    for distinct in (2, 4, 8):
        rows = tuple(((i % distinct, 1.0),) for i in range(8))
        grid, ops = grid_ops(bank, rows, 16)
        with _CountOps() as mode:
            grouped_delta(x, base, ops, grid)
        counts.append(mode.count)
    assert len(set(counts)) == 1, counts


# -- lora_embedding_delta ------------------------------------------------------------------------------


def emb_per_token(rows, loras, ids, base, dtype, store, embed_scale) -> torch.Tensor:
    out = base.to(dtype).clone()
    per_row = ids.shape[0] // len(rows)
    for t in range(ids.shape[0]):
        for slot, w in rows[t // per_row]:
            lora = loras[slot]
            a, b = lora.a.to(store).to(dtype), lora.b.to(store).to(dtype)
            y = b @ a[:, int(ids[t])]  # (N,)
            y = torch.tensor(w * lora.scale, dtype=dtype) * y
            if embed_scale is not None:
                y = y * (embed_scale.to(dtype) if torch.is_tensor(embed_scale) else embed_scale)
            out[t] = out[t] + y
    return out


def emb_semantics_loop(ids, base, a, b, token, coef, embed_scale) -> torch.Tensor:
    """The ``Semantics:`` block of ``lora_embedding_delta``, in fp32 (the final cast left out)."""
    out = base.float().clone()
    scale = 1.0 if embed_scale is None else (embed_scale.float() if torch.is_tensor(embed_scale) else embed_scale)
    coef = coef.reshape(coef.shape[0], coef.shape[1])  # (D, M); the op also takes (D, M, 1)
    num_slots, rows = coef.shape
    for d in range(num_slots):
        for m in range(rows):
            t = int(token[d * rows + m])
            y = b[d].float() @ a[d, :, int(ids[t])].float()  # (N,)
            out[t] += coef[d, m] * y * scale
    return out


EMBED_SCALES = {"none": None, "float": math.sqrt(32.0), "tensor": torch.tensor(math.sqrt(32.0))}


EMB_KINDS = ["distinct", "zipf", "identical", "no-adapter-rows", "multi-lane"]
EMB_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# every popularity x shape x dtype without embed_scale; embed_scale (float, tensor) on the small shape
EMB_CASES = [
    (kind, shape, dt, "none") for kind in EMB_KINDS for shape in [(96, 32), (1000, 129)] for dt in EMB_DTYPES
] + [(kind, (96, 32), dt, es) for kind in EMB_KINDS for dt in EMB_DTYPES for es in ("float", "tensor")]


@pytest.mark.parametrize(
    "kind, shape, dtype_name, embed_scale", EMB_CASES,
    ids=[f"{c[0]}-{c[1][0]}x{c[1][1]}-{c[2]}-scale_{c[3]}" for c in EMB_CASES],
)
def test_lora_embedding_delta(kind, shape, dtype_name, embed_scale):
    (vocab, dim), dtype = shape, EMB_DTYPES[dtype_name]
    scale = EMBED_SCALES[embed_scale]
    g = torch.Generator().manual_seed(4)
    loras = []
    for r, s in zip(RANKS, SCALES):
        a = torch.randn(r, vocab, generator=g)  # (r, V)
        b = torch.randn(dim, r, generator=g) / math.sqrt(r)  # (N, r)
        loras.append(ModuleLora(a, b, None, r, s))
    bank = make_bank(loras, vocab, dim, dtype)
    rows = popularity(kind, ROWS_PER_BATCH, len(loras), seed=6)
    tokens = ROWS_PER_BATCH * 3
    ids = torch.randint(0, vocab, (tokens,), generator=g)
    base = torch.randn(tokens, dim, generator=g).to(dtype)

    grid, ops = grid_ops(bank, rows, tokens)
    out = grouped_embedding_delta(ids, base, ops, grid, scale)

    ref32 = emb_per_token(rows, loras, ids, base, torch.float32, dtype, scale)
    semantics = emb_semantics_loop(ids, base, ops.a, ops.b, grid.token, ops.coef, scale)
    torch.testing.assert_close(semantics, ref32, rtol=1e-5, atol=1e-5)
    lowp = None if dtype == torch.float32 else emb_per_token(rows, loras, ids, base, dtype, dtype, scale)
    check(out, ref32, lowp, base, rows)
    assert (out.float() - base.float()).abs().max() > 1e-2
    lanes = RoutingPlan(rows).lanes(tokens, bank.factors.num_slots, CPU)
    check(reference.lora_embedding_delta(ids, base, bank.factors, lanes, scale), ref32, lowp, base, rows)


# -- DoRA -----------------------------------------------------------------------------------------------

DORA_SLOTS = {0, 2, 5}  # the others are LoRA slots (g = 1), some with a lora_B bias


def make_dora_loras(k: int, n: int, bias: bool, seed: int = 0) -> list[ModuleLora]:
    """make_loras with DoRA's g in [0.5, 1.5) on DORA_SLOTS."""
    g = torch.Generator().manual_seed(seed + 100)
    return [dataclasses.replace(lora, mag=0.5 + torch.rand(n, generator=g)) if slot in DORA_SLOTS else lora
            for slot, lora in enumerate(make_loras(k, n, bias, seed))]


def dora_ops(bank: AdapterBank, plan: RoutingPlan, num_tokens: int, base_bias):
    grid = build_grid(plan, num_tokens, bank.present, CPU)
    return grid, operands(gather(bank.state, grid.slots, CPU), grid, base_bias)


DORA_KINDS = ["distinct", "identical", "zipf", "no-adapter-rows", "multi-lane"]


@pytest.mark.parametrize("base_bias", [False, True], ids=["", "base-bias"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=[DTYPE_IDS[d] for d in DTYPES])
@pytest.mark.parametrize("kind", DORA_KINDS)
def test_dora_delta_matches_the_reference(kind, dtypes, base_bias):
    """The grouped ops with DoRA slots (g folded into the gathered B, the base output scaled per
    run) against kernels/reference.py on the whole bank and the plan's lanes."""
    (dtype, store), (k, n) = dtypes, (129, 100)
    bank = make_bank(make_dora_loras(k, n, bias=True), k, n, store)
    assert bank.state.dora == DORA_SLOTS and bank.factors.mag is not None
    rows = popularity(kind, ROWS_PER_BATCH, len(RANKS), seed=2)
    g = torch.Generator().manual_seed(8)
    tokens = ROWS_PER_BATCH * 3
    x, base = torch.randn(tokens, k, generator=g).to(dtype), torch.randn(tokens, n, generator=g).to(dtype)
    bb = torch.randn(n, generator=g).to(dtype) if base_bias else None
    plan = RoutingPlan(rows)
    grid, ops = dora_ops(bank, plan, tokens, bb)
    out = grouped_delta(x, base, ops, grid)
    lanes = plan.lanes(tokens, bank.factors.num_slots, CPU)
    f32 = bank.factors._replace(a=bank.factors.a.float(), b=bank.factors.b.float(), bias=bank.factors.bias.float())
    ref32 = reference.lora_delta(x.float(), base.float(), f32, lanes, None if bb is None else bb.float())
    lowp = None if dtype == torch.float32 else reference.lora_delta(x, base, bank.factors, lanes, bb)
    check(out, ref32, lowp, base, rows)
    plain = reference.lora_delta(x.float(), base.float(), f32._replace(mag=None), lanes)
    if any(s in DORA_SLOTS for row in rows for s, _ in row):
        assert (ref32 - plain).abs().max() > 1e-2  # g matters


def test_dora_packed_runs_of_different_lengths():
    """Packed runs of unequal lengths take each token's row of the per-run tables by index."""
    k, n = 48, 40
    bank = make_bank(make_dora_loras(k, n, bias=False), k, n, torch.float32)
    sets = (((0, 1.0),), (), ((2, 0.5), (3, -1.0)), ((5, 2.0),), ((0, -0.5), (5, 1.0)))
    plan = RoutingPlan.from_runs([3, 2, 4, 1, 5], sets, num_tokens=15)
    g = torch.Generator().manual_seed(4)
    x, base, bb = torch.randn(15, k, generator=g), torch.randn(15, n, generator=g), torch.randn(n, generator=g)
    grid, ops = dora_ops(bank, plan, 15, bb)
    assert grid.run_length is None and grid.run_index is not None
    want = reference.lora_delta(x, base, bank.factors, plan.lanes(15, bank.factors.num_slots, CPU), bb)
    torch.testing.assert_close(grouped_delta(x, base, ops, grid), want, rtol=1e-5, atol=1e-5)
    pre, post = torch_backend.bind(ops, grid, x.shape)
    torch.testing.assert_close(post(pre(x), x, base.clone()), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(want[3:5], base[3:5])


@pytest.mark.parametrize("flat", [False, True], ids=["BLK", "TK"])
@pytest.mark.parametrize("early", [True, False], ids=["before-base", "after-base"])
@pytest.mark.parametrize("per_row", [1, 3], ids=["decode", "prompt"])
@pytest.mark.parametrize("kind", ["identity-shared-weight", "strided", "distinct", "uniform", "multi-lane", "bias"])
def test_dora_bound_branch_is_the_op(kind, per_row, early, flat, monkeypatch):
    """The bound fast forms with DoRA slots are :func:`grouped_delta` bit for bit, and right per
    lane (the reference), on ``(B, L, K)`` activations (the per-run tables broadcast against the
    output) and flattened ``(T, K)`` ones (viewed per run), with and without a base bias."""
    monkeypatch.setattr(torch_backend, "_EARLY_ELEMENTS", 1 << 30 if early else 0)
    k, n, batch = 48, 40, ROWS_PER_BATCH
    bank = make_bank(make_dora_loras(k, n, bias=kind == "bias"), k, n, torch.float32)
    if kind == "identity-shared-weight":
        rows = (((2, 0.5),),) * batch
    elif kind == "strided":  # DoRA slot 0 and LoRA slot 1 interleaved: a strided view on one-token rows
        rows = tuple(((i % 2, 1.0),) for i in range(batch))
    else:
        rows = popularity("distinct" if kind == "bias" else kind, batch, 4 if kind in ("distinct", "bias") else 8)
    g = torch.Generator().manual_seed(12)
    x, base = torch.randn(batch, per_row, k, generator=g), torch.randn(batch, per_row, n, generator=g)
    if flat:
        x, base = x.view(-1, k), base.view(-1, n)  # (T, K), (T, N)
    bb = torch.randn(n, generator=g) if kind in ("bias", "uniform") else None
    grid, ops = dora_ops(bank, RoutingPlan(rows), batch * per_row, bb)
    assert ops.base_scale is not None
    if kind == "strided" and per_row == 1:
        assert grid.strides is not None
    pre, post = torch_backend.bind(ops, grid, x.shape)
    got = post(pre(x), x, base.clone())
    want = grouped_delta(x.view(-1, k), base.view(-1, n).clone(), ops, grid, inplace=True)
    assert torch.equal(got, want.view(base.shape))
    lanes = RoutingPlan(rows).lanes(batch * per_row, bank.factors.num_slots, CPU)
    spec = reference.lora_delta(x.view(-1, k), base.view(-1, n), bank.factors, lanes, bb)
    torch.testing.assert_close(got.view(-1, n), spec, rtol=1e-5, atol=1e-5)


def test_dora_op_count_does_not_grow_with_distinct_adapters():
    k, n = 32, 16
    bank = make_bank(make_dora_loras(k, n, bias=True), k, n, torch.float32)
    x, base, bb = torch.randn(16, k), torch.randn(16, n), torch.randn(n)
    counts = []
    for distinct in (2, 4, 8):
        grid, ops = dora_ops(bank, RoutingPlan(tuple(((i % distinct, 1.0),) for i in range(8))), 16, bb)
        assert ops.base_scale is not None
        with _CountOps() as mode:
            grouped_delta(x, base, ops, grid)
        counts.append(mode.count)
    assert len(set(counts)) == 1, counts


def test_bank_resets_g_when_a_lora_adapter_reuses_a_dora_slot():
    k, n = 40, 24
    loras = make_dora_loras(k, n, bias=False)
    bank = make_bank(loras, k, n, torch.float32)
    assert torch.equal(bank.factors.mag[0], loras[0].mag) and torch.equal(bank.factors.mag[1], torch.ones(n))
    assert bank.slot_nbytes(0) == loras[0].rank * (k + n) * 4 + n * 4  # g is fp32 beside the factors
    bank.remove(0)
    assert 0 not in bank.state.dora
    plain = dataclasses.replace(loras[0], mag=None)
    bank.commit(bank.stage(0, plain))
    assert torch.equal(bank.factors.mag[0], torch.ones(n)) and 0 not in bank.state.dora
    g = torch.Generator().manual_seed(1)
    x, base = torch.randn(4, k, generator=g), torch.randn(4, n, generator=g)
    rows = (((0, 1.0),), ((2, 1.0),))
    grid, ops = dora_ops(bank, RoutingPlan(rows), 4, None)
    lanes = RoutingPlan(rows).lanes(4, bank.factors.num_slots, CPU)
    torch.testing.assert_close(grouped_delta(x, base, ops, grid), reference.lora_delta(x, base, bank.factors, lanes))
    loras[0] = plain
    torch.testing.assert_close(grouped_delta(x, base, ops, grid)[:2],
                               per_token(rows[:1], loras, x[:2], base[:2], torch.float32, torch.float32))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_rank_classes_gather_what_one_padded_storage_gathers(dora):
    """A bank with one storage per rank (no slot-indexed ``factors``) gathers, for any set of
    slots, bit for bit what one storage padded to the largest rank gathers; and after slots of
    some ranks leave (classes dropped or packed), it still does."""
    k, n = 40, 24
    loras = make_dora_loras(k, n, bias=True) if dora else make_loras(k, n, bias=True)
    padded, classed = make_bank(loras, k, n, torch.float32), make_bank(loras, k, n, torch.float32, padded=False)
    assert classed.factors is None and sorted(c.rank for c in classed.state.classes) == sorted(set(RANKS))
    assert classed.nbytes == sum(classed.slot_nbytes(s) for s in range(len(RANKS)))  # exact ranks: no padding
    assert padded.nbytes > 2 * classed.nbytes

    def same(slot_sets):
        for slots in slot_sets:
            want, got = gather(padded.state, slots, CPU), gather(classed.state, slots, CPU)
            assert want.scales == got.scales, slots
            for field in ("a", "b", "bias", "scale", "mag", "at", "bt"):
                w, g = getattr(want, field), getattr(got, field)
                assert (w is None) == (g is None), slots
                if w is not None:
                    assert w.shape == g.shape and torch.equal(w, g), slots

    same([(0,), (2,), (1, 3, 6), (7, 2, 0), tuple(range(len(RANKS)))])
    for slot in (2, 5, 4):  # both rank-16 slots (a class goes) and the rank-3 one
        padded.remove(slot)
        classed.remove(slot)
        padded.compact()
        classed.compact()
    assert 16 not in {c.rank for c in classed.state.classes}
    same([(0,), (1, 3, 6), (7, 0), (0, 1, 3, 6, 7)])
