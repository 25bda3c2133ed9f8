"""Triton LoRA kernels against the reference (kernels/reference.py), in Triton's interpreter on CPU tensors.

Both take the same operands: the whole bank (``Factors``) and the same lanes. Rule for every
comparison (flash-attention's): ``max|kernel − ref32| ≤ 2·max|torch_same_dtype − ref32| + atol``,
where ref32 is the reference on fp32 copies of the inputs and torch_same_dtype the same reference
on the inputs as given. The sweep is a representative cross-product of dtypes, ranks,
odd sizes, token counts, adapter popularity, weighted multi-lane tokens, negative weights and
LoRA bias; the slots past a slot's rank hold NaN on the kernel side, so a kernel that reads them fails.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU tensors

import subprocess
import sys
import textwrap

import pytest
import torch

from lora_graph.kernels import reference
from lora_graph.kernels.factors import Factors
from lora_graph.kernels.lanes import build_lanes
from lora_graph.kernels.shrink import is_interpreted
from lora_graph.kernels.triton_ops import lora_delta, lora_embedding_delta, lora_expand, lora_shrink

ATOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_run_interpreted():
    assert is_interpreted(), "lora_graph.kernels was imported before TRITON_INTERPRET=1 was set"


# ---------------------------------------------------------------------------------------------
# lanes


def make_lanes(num_tokens: int, num_slots: int, popularity: str, multi: int, gen: torch.Generator):
    """Per-lane arrays: one lane per token drawn by ``popularity``, plus weighted sets of up to
    ``multi`` lanes on every third token (distinct slots, weights of both signs)."""
    t = torch.arange(num_tokens)
    if popularity == "identical":
        slot = torch.full((num_tokens,), num_slots - 1)
    elif popularity == "distinct":
        slot = t % num_slots
    elif popularity == "uniform":
        slot = torch.randint(0, num_slots, (num_tokens,), generator=gen)
    elif popularity == "zipf":
        p = 1.0 / torch.arange(1, num_slots + 1, dtype=torch.float64) ** 1.2
        slot = torch.multinomial(p, num_tokens, replacement=True, generator=gen)
    elif popularity == "skewed":
        slot = torch.where(torch.rand(num_tokens, generator=gen) < 0.9, 0,
                           torch.randint(0, num_slots, (num_tokens,), generator=gen))
    else:
        raise ValueError(popularity)
    slot = torch.where(torch.rand(num_tokens, generator=gen) < 0.15, -1, slot)  # rows with no adapter
    weight = torch.ones(num_tokens)
    tokens, slots, weights = [t], [slot], [weight]
    if multi > 1:
        wset = t[::3]
        first = torch.randint(0, num_slots, (wset.numel(),), generator=gen)
        for j in range(multi):
            tokens.append(wset)
            slots.append((first + j) % num_slots)
            weights.append(torch.randn(wset.numel(), generator=gen))  # negative weights too
        # these tokens use the weighted set only
        slot[wset] = -1
    return torch.cat(tokens), torch.cat(slots), torch.cat(weights)


def test_lanes_layout_small():
    tok = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5])
    slot = torch.tensor([2, 0, 2, -1, 1, 2, 0, 2, 2])
    w = torch.tensor([1.0, 0.5, 0.5, 1, 1, 2, -1, 0, 1])
    lanes = build_lanes(tok, slot, w, num_slots=3, block_m=16)
    # pass 0: (1,s0) (3,s1) (0,s2) (5,s2); pass 1: (1,s2) (3,s2); pass 2: (3,s0); dropped: 2 (slot -1), 4 (weight 0)
    assert lanes.token[:7].tolist() == [1, 3, 0, 5, 1, 3, 3]
    assert lanes.weight[:7].tolist() == [0.5, 1.0, 1.0, 1.0, 0.5, 2.0, -1.0]
    assert lanes.chunk_slot.tolist() == [[0, 1, 2, -1], [2, -1, -1, -1], [0, -1, -1, -1]]
    assert lanes.chunk_start[:, 0].tolist() == [0, 4, 6]
    assert lanes.chunk_end[0, :3].tolist() == [1, 2, 4]


@pytest.mark.parametrize("popularity", ["identical", "distinct", "uniform", "zipf", "skewed"])
@pytest.mark.parametrize("num_tokens,multi", [(1, 1), (7, 3), (300, 2)])
def test_lanes_cover_each_lane_once(popularity, num_tokens, multi):
    gen = torch.Generator().manual_seed(num_tokens)
    tok, slot, w = make_lanes(num_tokens, 5, popularity, multi, gen)
    lanes = build_lanes(tok, slot, w, num_slots=5, num_tokens=num_tokens, block_m=16)
    seen = []
    for p in range(lanes.num_passes):
        tokens_in_pass = []
        for s, start, end in zip(*(t[p].tolist() for t in (lanes.chunk_slot, lanes.chunk_start, lanes.chunk_end))):
            if s < 0:
                continue
            assert 0 < end - start <= lanes.block_m
            for l in range(start, end):
                seen.append((lanes.token[l].item(), s, lanes.weight[l].item()))
                tokens_in_pass.append(lanes.token[l].item())
        assert len(tokens_in_pass) == len(set(tokens_in_pass)), "a token twice in one pass"
    keep = (slot >= 0) & (w != 0)
    expected = sorted(zip(tok[keep].tolist(), slot[keep].tolist(), w[keep].tolist()))
    assert sorted(seen) == expected
    assert lanes.num_passes == max(multi, 1)


def test_build_lanes_reads_no_device_value(monkeypatch):
    """With ``passes`` given, the builder never pulls a value to the host (no sync on GPU)."""
    gen = torch.Generator().manual_seed(0)
    tok, slot, w = make_lanes(64, 8, "zipf", 2, gen)

    def refuse(*args, **kwargs):
        raise AssertionError("build_lanes read a device value")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(torch, "bincount", refuse)
    monkeypatch.setattr(torch, "nonzero", refuse)
    monkeypatch.setattr(torch, "unique", refuse)
    lanes = build_lanes(tok, slot, w, num_slots=8, passes=2, num_tokens=64)
    monkeypatch.undo()
    assert lanes.chunk_slot.shape == (2, 4 + 8)


# ---------------------------------------------------------------------------------------------
# helpers: bank, reference through the (D, M) grid, tolerance rule


def make_bank(num_slots, r, k, n, ranks, dtype, bias: bool, gen):
    """A bank as AdapterBank keeps it (zeros past each slot's rank), and the same bank with NaN
    there for the kernels: they must never read past a slot's rank. ``(factors, factors_nan)``."""
    rank = torch.tensor([ranks[s % len(ranks)] for s in range(num_slots)], dtype=torch.int32)
    a = torch.randn(num_slots, r, k, generator=gen) / k**0.5
    b = torch.randn(num_slots, n, r, generator=gen) / r**0.5
    past = torch.arange(r)[None, :] >= rank[:, None]  # (S, R)
    a[past] = 0.0
    b.transpose(1, 2)[past] = 0.0
    a_nan, b_nan = a.clone(), b.clone()
    a_nan[past] = float("nan")
    b_nan.transpose(1, 2)[past] = float("nan")
    bias_t = torch.randn(num_slots, n, generator=gen) if bias else None
    scale = torch.rand(num_slots, generator=gen) * 2 + 0.25
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return (Factors(cast(a), cast(b), cast(bias_t), scale, rank),
            Factors(cast(a_nan), cast(b_nan), cast(bias_t), scale, rank))


def f32(factors: Factors) -> Factors:
    return factors._replace(a=factors.a.float(), b=factors.b.float(),
                            bias=None if factors.bias is None else factors.bias.float())


def reference_pair(x, base, factors, lanes):
    """(ref32, torch_same_dtype): the reference on fp32 copies (not rounded back) and on the inputs."""
    return (reference.lora_delta(x.float(), base.float(), f32(factors), lanes),
            reference.lora_delta(x, base, factors, lanes))


def assert_rule(out, ref32, same, atol):
    assert out.dtype == same.dtype and out.shape == same.shape
    assert torch.isfinite(out).all()
    err = (out.float() - ref32).abs().max().item()
    bound = 2 * (same.float() - ref32).abs().max().item() + atol
    assert err <= bound, f"max error {err:.3g} > bound {bound:.3g}"


# ---------------------------------------------------------------------------------------------
# lora_delta sweep

B16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
MIXED = (1, 4, 16, 64)
# (T, K, N, x/base dtype, adapter dtype, ranks, S, popularity, lanes per weighted set, lora bias)
CASES = [
    (1, 129, 1000, F32, F32, (16,), 4, "identical", 1, False),
    (1, 1000, 129, B16, B16, (4,), 3, "uniform", 3, True),
    (7, 129, 129, F16, F16, (4,), 8, "distinct", 1, False),
    (7, 1000, 129, F32, B16, MIXED, 4, "uniform", 3, True),
    (7, 129, 1000, B16, B16, (64,), 3, "skewed", 2, False),
    (64, 1000, 129, B16, B16, (64,), 5, "uniform", 1, False),
    (64, 129, 129, F16, B16, (1,), 6, "skewed", 1, True),
    (64, 129, 129, F16, F16, MIXED, 64, "distinct", 2, False),
    (64, 129, 1000, F32, F32, (16,), 4, "zipf", 2, True),
    (300, 129, 129, B16, F32, MIXED, 8, "zipf", 2, True),
    (300, 129, 129, F16, F16, (16,), 4, "uniform", 1, False),
    (300, 129, 129, F32, F32, (4,), 6, "skewed", 3, False),
    (300, 129, 129, B16, B16, (1,), 2, "identical", 1, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-K{}-N{}-{}-{}-r{}-S{}-{}-m{}{}".format(
    c[0], c[1], c[2], str(c[3])[6:], str(c[4])[6:], "mix" if len(c[5]) > 1 else c[5][0], c[6], c[7], c[8],
    "-bias" if c[9] else ""))
def test_lora_delta(case):
    t, k, n, dtype, adapter_dtype, ranks, num_slots, popularity, multi, bias = case
    gen = torch.Generator().manual_seed(CASES.index(case))
    r = max(ranks)
    factors, with_nan = make_bank(num_slots, r, k, n, ranks, adapter_dtype, bias, gen)
    x = torch.randn(t, k, generator=gen).to(dtype)
    base = torch.randn(t, n, generator=gen).to(dtype)
    tok, slot, w = make_lanes(t, num_slots, popularity, multi, gen)
    lanes = build_lanes(tok, slot, w, num_slots, passes=multi, num_tokens=t)

    out = lora_delta(x, base, with_nan, lanes)

    assert_rule(out, *reference_pair(x, base, factors, lanes), ATOL[dtype])
    untouched = torch.ones(t, dtype=torch.bool)
    untouched[tok[(slot >= 0) & (w != 0)]] = False
    assert torch.equal(out[untouched], base[untouched]), "a token with no adapter must get base exactly"


@pytest.mark.parametrize("split_k", [2, 5])
def test_lora_delta_split_k(split_k):
    gen = torch.Generator().manual_seed(split_k)
    factors, with_nan = make_bank(4, 16, 1000, 129, (4, 16), F16, True, gen)
    x = torch.randn(7, 1000, generator=gen).to(F16)
    base = torch.randn(7, 129, generator=gen).to(F16)
    tok, slot, w = make_lanes(7, 4, "uniform", 2, gen)
    lanes = build_lanes(tok, slot, w, 4, passes=2)
    out = lora_delta(x, base, with_nan._replace(rank=with_nan.rank.long()), lanes, split_k=split_k)  # int64 ranks too
    assert_rule(out, *reference_pair(x, base, factors, lanes), ATOL[F16])


def test_lora_delta_no_lanes_returns_base():
    gen = torch.Generator().manual_seed(0)
    factors, _ = make_bank(2, 4, 129, 129, (4,), B16, False, gen)
    x = torch.randn(5, 129).to(B16)
    base = torch.randn(5, 129).to(B16)
    lanes = build_lanes(torch.arange(5), torch.full((5,), -1), torch.ones(5), 2, passes=1)
    out = lora_delta(x, base, factors, lanes)
    assert torch.equal(out, base) and out.data_ptr() != base.data_ptr()


@pytest.mark.parametrize("dtype,multi", [(B16, 1), (B16, 3), (F32, 2)])
def test_inplace_matches_functional(dtype, multi):
    gen = torch.Generator().manual_seed(7)
    factors, _ = make_bank(4, 16, 129, 129, (16, 4), dtype, True, gen)
    x = torch.randn(64, 129, generator=gen).to(dtype)
    base = torch.randn(64, 129, generator=gen).to(dtype)
    tok, slot, w = make_lanes(64, 4, "uniform", multi, gen)
    lanes = build_lanes(tok, slot, w, 4, passes=multi)
    expected = lora_delta(x, base, factors, lanes)
    target = base.clone()
    out = lora_delta(x, target, factors, lanes, inplace=True)
    assert out is target and torch.equal(target, expected)
    h = lora_shrink(x, factors, lanes)
    target = base.clone()
    assert lora_expand(h, target, factors, lanes, inplace=True) is target
    assert torch.equal(target, expected)


def test_weighted_set_equals_sum_of_single_adapters():
    """A token's weighted set adds up exactly like the same lanes sent one adapter at a time."""
    gen = torch.Generator().manual_seed(3)
    factors, _ = make_bank(3, 16, 129, 129, (16, 4, 1), F32, True, gen)
    x = torch.randn(4, 129, generator=gen)
    base = torch.randn(4, 129, generator=gen)
    tok = torch.tensor([0, 0, 0, 2, 2])
    slot = torch.tensor([0, 1, 2, 1, 0])
    w = torch.tensor([0.7, -1.3, 2.0, 1.0, -0.5])
    out = lora_delta(x, base, factors, build_lanes(tok, slot, w, 3, passes=3))
    expected = base.clone()
    for i in range(5):
        one = build_lanes(tok[i:i + 1], slot[i:i + 1], w[i:i + 1], 3, passes=1)
        expected += lora_delta(x, torch.zeros_like(base), factors, one)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[[1, 3]], base[[1, 3]])


# ---------------------------------------------------------------------------------------------
# DoRA: the per-slot g in the expand's epilogue


def with_dora(factors: Factors, n: int, dora_slots, gen) -> Factors:
    """``factors`` with ``mag``: g in [0.5, 1.5) on ``dora_slots``, exactly 1 on the others (LoRA)."""
    mag = torch.ones(factors.num_slots, n)
    for s in dora_slots:
        mag[s] = 0.5 + torch.rand(n, generator=gen)
    return factors._replace(mag=mag)


# (T, K, N, x/base dtype, adapter dtype, ranks, S, popularity, lanes per weighted set, lora bias, base bias)
DORA_CASES = [
    (1, 129, 1000, F32, F32, (16,), 4, "identical", 1, False, True),
    (7, 129, 129, F32, F32, MIXED, 6, "uniform", 3, True, True),
    (7, 1000, 129, B16, B16, (4,), 3, "distinct", 1, False, False),
    (64, 129, 129, F16, F32, MIXED, 8, "zipf", 2, True, True),
    (64, 129, 1000, F32, B16, (16,), 4, "skewed", 2, False, False),
    (300, 129, 129, B16, B16, (8,), 5, "uniform", 1, True, True),
]


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("case", DORA_CASES, ids=lambda c: "T{}-N{}-{}-S{}-{}-m{}{}{}".format(
    c[0], c[2], str(c[3])[6:], c[6], c[7], c[8], "-bias" if c[9] else "", "-basebias" if c[10] else ""))
def test_dora_delta(case, inplace):
    """DoRA slots (every other slot) beside LoRA slots in one bank: each lane adds
    ``w·(s·g⊙(B(Ax) + b) + (g − 1)⊙(base − base_bias))``, with ``base`` the value passed in even when
    a token's weighted set runs in several passes and the sums go into ``base`` itself."""
    t, k, n, dtype, adapter_dtype, ranks, num_slots, popularity, multi, bias, has_base_bias = case
    gen = torch.Generator().manual_seed(100 + DORA_CASES.index(case))
    factors, with_nan = make_bank(num_slots, max(ranks), k, n, ranks, adapter_dtype, bias, gen)
    dora = range(0, num_slots, 2)
    factors = with_dora(factors, n, dora, gen)
    with_nan = with_nan._replace(mag=factors.mag)
    x = torch.randn(t, k, generator=gen).to(dtype)
    base = torch.randn(t, n, generator=gen).to(dtype)
    base_bias = torch.randn(n, generator=gen).to(dtype) if has_base_bias else None
    tok, slot, w = make_lanes(t, num_slots, popularity, multi, gen)
    lanes = build_lanes(tok, slot, w, num_slots, passes=multi, num_tokens=t)

    target = base.clone()
    out = lora_delta(x, target, with_nan, lanes, inplace=inplace, base_bias=base_bias)
    assert (out is target) == inplace

    f32_bias = None if base_bias is None else base_bias.float()
    ref32 = reference.lora_delta(x.float(), base.float(), f32(factors), lanes, f32_bias)
    same = reference.lora_delta(x, base, factors, lanes, base_bias)
    assert_rule(out, ref32, same, ATOL[dtype])
    untouched = torch.ones(t, dtype=torch.bool)
    untouched[tok[(slot >= 0) & (w != 0)]] = False
    assert torch.equal(out[untouched], base[untouched]), "a token with no adapter must get base exactly"
    as_lora = reference.lora_delta(x.float(), base.float(), f32(factors)._replace(mag=None), lanes)
    used = torch.isin(slot[(slot >= 0) & (w != 0)], torch.tensor(list(dora))).any()
    assert not used or (ref32 - as_lora).abs().max() > 0.1, "g must matter in this case"


def test_dora_slot_of_g_one_is_the_lora_lane():
    """A bank whose slots all have g = 1 gives the LoRA kernel's result bit for bit, whatever the
    base bias: the DoRA epilogue adds ``0 · base`` and multiplies by 1."""
    gen = torch.Generator().manual_seed(9)
    factors, _ = make_bank(4, 16, 129, 200, (16, 4), F32, True, gen)
    x, base = torch.randn(9, 129, generator=gen), torch.randn(9, 200, generator=gen)
    tok, slot, w = make_lanes(9, 4, "uniform", 2, gen)
    lanes = build_lanes(tok, slot, w, 4, passes=2)
    ones = factors._replace(mag=torch.ones(4, 200))
    assert torch.equal(lora_delta(x, base, ones, lanes, base_bias=torch.randn(200, generator=gen)),
                       lora_delta(x, base, factors, lanes))


@pytest.mark.parametrize("dtype", [F32, B16])
def test_dora_embedding_delta(dtype):
    gen = torch.Generator().manual_seed(12)
    t, vocab, n, num_slots = 40, 500, 129, 4
    factors, with_nan = make_bank(num_slots, 16, vocab, n, (16, 4), dtype, False, gen)
    factors = with_dora(factors._replace(a=factors.a * vocab**0.5), n, (1, 2), gen)
    with_nan = with_nan._replace(a=with_nan.a * vocab**0.5, mag=factors.mag)
    ids = torch.randint(0, vocab, (t,), generator=gen)
    base = torch.randn(t, n, generator=gen).to(dtype)
    tok, slot, w = make_lanes(t, num_slots, "uniform", 2, gen)
    lanes = build_lanes(tok, slot, w, num_slots, passes=2)
    out = lora_embedding_delta(ids, base, with_nan, lanes, embed_scale=3.0)
    ref32 = reference.lora_embedding_delta(ids, base.float(), f32(factors), lanes, 3.0)
    assert_rule(out, ref32, reference.lora_embedding_delta(ids, base, factors, lanes, 3.0), ATOL[dtype])


# ---------------------------------------------------------------------------------------------
# the two ops apart, embedding


@pytest.mark.parametrize("split_k", [1, 2])
def test_shrink_and_expand_match_their_references(split_k):
    """Each op against its own reference: the shrink's covered entries (summed over K-splits), and
    the expand fed the reference's shrink."""
    gen = torch.Generator().manual_seed(5)
    t, k, n, num_slots = 64, 129, 100, 4
    factors, with_nan = make_bank(num_slots, 64, k, n, (64, 1, 4, 16), B16, True, gen)
    x = torch.randn(t, k, generator=gen).to(B16)
    tok, slot, w = make_lanes(t, num_slots, "zipf", 2, gen)
    lanes = build_lanes(tok, slot, w, num_slots, passes=2)
    h = lora_shrink(x, with_nan, lanes, split_k=split_k)
    assert h.shape == (split_k, tok.numel(), 64)
    want = reference.lora_shrink(x, factors, lanes)[0]  # (L, R)
    covered = torch.zeros_like(want, dtype=torch.bool)
    for p in range(lanes.num_passes):
        for s_, start, end in zip(*(tt[p].tolist() for tt in (lanes.chunk_slot, lanes.chunk_start, lanes.chunk_end))):
            if s_ >= 0:
                covered[start:end, : int(factors.rank[s_])] = True
    torch.testing.assert_close(h.sum(0)[covered], want[covered], rtol=1e-5, atol=1e-5)
    base = torch.randn(t, n, generator=gen).to(B16)
    h_ref = reference.lora_shrink(x.float(), f32(factors), lanes)
    out = lora_expand(h_ref, base, with_nan, lanes)
    ref32 = reference.lora_expand(h_ref, base.float(), f32(factors), lanes)
    assert_rule(out, ref32, reference.lora_expand(h_ref, base, factors, lanes), ATOL[B16])


@pytest.mark.parametrize("dtype,embed_scale", [(F32, None), (B16, "tensor"), (F16, 1.5)])
def test_lora_embedding_delta(dtype, embed_scale):
    gen = torch.Generator().manual_seed(11)
    t, vocab, n, num_slots = 64, 1000, 129, 5
    factors, with_nan = make_bank(num_slots, 16, vocab, n, (16, 4, 1), dtype, False, gen)
    factors = factors._replace(a=factors.a * vocab**0.5)  # embedding A columns are O(1)
    with_nan = with_nan._replace(a=with_nan.a * vocab**0.5)
    ids = torch.randint(0, vocab, (t,), generator=gen)
    base = torch.randn(t, n, generator=gen).to(dtype)
    tok, slot, w = make_lanes(t, num_slots, "uniform", 2, gen)
    lanes = build_lanes(tok, slot, w, num_slots, passes=2)
    es = torch.tensor(8.0, dtype=dtype) if embed_scale == "tensor" else embed_scale
    out = lora_embedding_delta(ids, base, with_nan, lanes, embed_scale=es)

    ref32 = reference.lora_embedding_delta(ids, base.float(), f32(factors), lanes, es)
    same = reference.lora_embedding_delta(ids, base, factors, lanes, es)
    assert_rule(out, ref32, same, ATOL[dtype])


# ---------------------------------------------------------------------------------------------
# torch.library registration, argument checks, launching without a GPU


def test_ops_are_registered_and_compile_as_one_op():
    gen = torch.Generator().manual_seed(2)
    factors, _ = make_bank(3, 16, 129, 129, (16, 4), F32, True, gen)
    x = torch.randn(7, 129, generator=gen)
    base = torch.randn(7, 129, generator=gen)
    tok, slot, w = make_lanes(7, 3, "uniform", 1, gen)
    lanes = build_lanes(tok, slot, w, 3, passes=1)
    args = (x, base, *factors, *lanes[:5], lanes.block_m, 1)
    torch.library.opcheck(torch.ops.lora_graph.lora_delta.default, args,
                          test_utils=("test_schema", "test_faketensor"))

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(lambda x, base, *f: lora_delta(x, base, Factors(*f), lanes), backend=backend,
                             fullgraph=True)
    out = compiled(x, base, *factors)
    torch.testing.assert_close(out, lora_delta(x, base, factors, lanes))
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert targets == [torch.ops.lora_graph.lora_delta.default]

    def add_into(x, base, *f):
        out = base * 1.0
        return lora_delta(x, out, Factors(*f), lanes, inplace=True)

    compiled = torch.compile(add_into, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, base, *factors), out)


def test_compiled_op_replays_new_routing_written_into_the_same_buffers():
    """What CUDA-graph replay needs: the routing lives in fixed buffers that the compiled function
    takes as inputs; writing the next request's lanes into them in place (same shapes) changes the
    result to that request's, with no recompilation. Each replay equals the eager op on its lanes."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    gen = torch.Generator().manual_seed(3)
    num_slots = 4
    factors, _ = make_bank(num_slots, 16, 129, 96, (16, 4, 8, 1), F32, True, gen)
    x, base = torch.randn(12, 129, generator=gen), torch.randn(12, 96, generator=gen)

    def lanes_for(popularity, seed):
        tok, slot, w = make_lanes(12, num_slots, popularity, 1, torch.Generator().manual_seed(seed))
        return build_lanes(tok, slot, w, num_slots, passes=1, num_tokens=12)

    first = lanes_for("uniform", 0)
    static = [t.clone() for t in first[:5]]  # the fixed routing buffers

    def forward(x, base, *routing):
        return lora_delta(x, base * 1.0, factors, type(first)(*routing, first.block_m), inplace=True)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(forward, backend=counter, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i, popularity in enumerate(["uniform", "distinct", "zipf", "skewed", "identical", "uniform"]):
            lanes = lanes_for(popularity, i)
            assert [t.shape for t in lanes[:5]] == [t.shape for t in static]
            for buffer, value in zip(static, lanes[:5]):
                buffer.copy_(value)
            got = compiled(x, base, *static)
            torch.testing.assert_close(got, lora_delta(x, base, factors, lanes), rtol=0, atol=0)
    assert counter.frame_count == 1


def test_argument_checks():
    gen = torch.Generator().manual_seed(0)
    factors, _ = make_bank(2, 4, 129, 129, (4,), F32, False, gen)
    x, base = torch.randn(3, 129), torch.randn(3, 129)
    lanes = build_lanes(torch.arange(3), torch.zeros(3, dtype=torch.int64), torch.ones(3), 2, passes=1)
    with pytest.raises(ValueError, match="mag"):
        lora_delta(x, base, factors._replace(mag=torch.ones(2, 128)), lanes)
    with pytest.raises(ValueError, match="base_bias"):
        lora_delta(x, base, factors._replace(mag=torch.ones(2, 129)), lanes, base_bias=torch.ones(128))
    with pytest.raises(ValueError, match="rank"):
        lora_delta(x, base, factors._replace(rank=factors.rank.float()), lanes)
    with pytest.raises(ValueError, match=r"a must be \(S, R, 100\)"):
        lora_delta(x[:, :100], base, factors, lanes)
    with pytest.raises(ValueError, match="scale"):
        lora_delta(x, base, factors._replace(scale=factors.scale[:1]), lanes)
    with pytest.raises(ValueError, match="block_m"):
        build_lanes(torch.arange(3), torch.zeros(3), torch.ones(3), 2, block_m=8)


def _run_clean(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cpu_tensors_without_interpreter_raise_clearly():
    proc = _run_clean("""
        import torch
        from lora_graph.kernels.lanes import build_lanes
        from lora_graph.kernels.triton_ops import Factors, lora_delta
        lanes = build_lanes(torch.arange(2), torch.zeros(2, dtype=torch.int64), torch.ones(2), 1, passes=1)
        try:
            lora_delta(torch.randn(2, 16), torch.randn(2, 16),
                       Factors(torch.randn(1, 4, 16), torch.randn(1, 16, 4), None, torch.ones(1), torch.full((1,), 4)),
                       lanes)
        except RuntimeError as e:
            print("RAISED:", e)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "RAISED:" in proc.stdout and "need GPU tensors" in proc.stdout and "TRITON_INTERPRET=1" in proc.stdout


def test_kernels_compile_for_sm90():
    """The interpreter does not type-check like the compiler does: compile every kernel for an H100
    (sm_90) with Triton's bundled ptxas, for each dtype path, without a GPU."""
    proc = _run_clean("""
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from lora_graph.kernels import expand, shrink

        def compile(kernel, ptrs, consts):
            sig = {}
            for name in kernel.arg_names:
                sig[name] = "constexpr" if name in consts else "*" + ptrs[name] if name.endswith("_ptr") else "i32"
            triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))

        idx = dict(token_ptr="i32", chunk_slot_ptr="i32", chunk_start_ptr="i32", chunk_end_ptr="i32")
        for x, a, dot in [("bf16", "bf16", tl.bfloat16), ("fp16", "fp16", tl.float16), ("fp32", "bf16", tl.float32)]:
            ptrs = dict(idx, x_ptr=x, a_ptr=a, rank_ptr="i32", h_ptr="fp32")
            compile(shrink._shrink_kernel, ptrs, dict(R_BLOCKS=4, SPLIT_K=2, DOT_DTYPE=dot, BLOCK_M=16, BLOCK_R=16,
                                                     BLOCK_K=128, stride_xk=1, stride_ak=1, stride_hr=1))
        for out, b, split, bias, rank in [("bf16", "bf16", 1, True, "i32"), ("fp32", "fp16", 4, False, "i64")]:
            ptrs = dict(idx, h_ptr="fp32", b_ptr=b, bias_ptr=b, scale_ptr="fp32", rank_ptr=rank, out_ptr=out,
                        weight_ptr="fp32")
            compile(expand._expand_kernel, ptrs, dict(SPLIT_K=split, HAS_BIAS=bias, BLOCK_M=64, BLOCK_N=64,
                                                     BLOCK_R=16, stride_hr=1, stride_on=1))
            ptrs = dict(ptrs, mag_ptr="fp32", base_ptr=out, base_bias_ptr=out)
            compile(expand._dora_expand_kernel, ptrs, dict(SPLIT_K=split, HAS_BIAS=bias, HAS_BASE_BIAS=not bias,
                                                          BLOCK_M=64, BLOCK_N=64, BLOCK_R=16, stride_hr=1, stride_on=1))
        ptrs = dict(idx, ids_ptr="i64", a_ptr="bf16", rank_ptr="i32", h_ptr="fp32")
        compile(shrink._embedding_shrink_kernel, ptrs, dict(BLOCK_M=16, BLOCK_R=16, stride_av=1, stride_hr=1))
        print("COMPILED")
    """)
    assert "COMPILED" in proc.stdout, proc.stderr[-3000:]
