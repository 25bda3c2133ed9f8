"""The specification (kernels/reference.py) against the per-lane sum it specifies.

The reference walks the kernels' lane layout (sorted, chunked, in passes); here the same lanes are
summed straight from the raw ``(token, slot, weight)`` arrays, one lane at a time, in fp64. So the
check covers the layout too: a lane dropped, doubled or given the wrong slot by ``build_lanes`` would
show. Slots past a bank's size, slot -1 and weight 0 add nothing; slots of rank 0 add nothing.
A DoRA slot's lane (``mag``) adds ``w·(s·g⊙(B(Ax) + b) + (g − 1)⊙(base − base_bias))``, ``base``
being the value passed in, whatever the token's other lanes added.
"""

from __future__ import annotations

import math

import pytest
import torch

from lora_graph.kernels import reference
from lora_graph.kernels.factors import Factors
from lora_graph.kernels.lanes import build_lanes

RANKS = [4, 0, 16, 1, 8]  # slot 1 is not held by this module


def bank(k: int, n: int, bias: bool, seed: int = 0) -> Factors:
    g = torch.Generator().manual_seed(seed)
    num_slots, r = len(RANKS), max(RANKS)
    rank = torch.tensor(RANKS, dtype=torch.int32)
    past = torch.arange(r)[None, :] >= rank[:, None]  # (S, R)
    a = torch.randn(num_slots, r, k, generator=g) / math.sqrt(k)
    b = torch.randn(num_slots, n, r, generator=g)
    a[past], b.transpose(1, 2)[past] = 0.0, 0.0
    scale = torch.rand(num_slots, generator=g) + 0.5
    return Factors(a, b, torch.randn(num_slots, n, generator=g) if bias else None, scale, rank)


def raw_lanes(num_tokens: int, seed: int):
    """One lane per token (some -1), a weighted set on every third token, weights of both signs, a
    zero weight and two slots past the bank."""
    g = torch.Generator().manual_seed(seed)
    tok = torch.arange(num_tokens)
    slot = torch.randint(-1, len(RANKS) + 2, (num_tokens,), generator=g)
    weight = torch.randn(num_tokens, generator=g)
    extra = tok[::3]
    tok = torch.cat([tok, extra, extra])
    slot = torch.cat([slot, torch.randint(0, len(RANKS), (2 * extra.numel(),), generator=g)])
    weight = torch.cat([weight, torch.randn(2 * extra.numel(), generator=g)])
    weight[1] = 0.0
    return tok, slot, weight


def per_lane(x, base, f: Factors, tok, slot, weight, base_bias=None) -> torch.Tensor:
    out = base.double().clone()
    for t, s, w in zip(tok.tolist(), slot.tolist(), weight.tolist()):
        if not 0 <= s < f.a.shape[0] or w == 0:
            continue
        r = int(f.rank[s])
        if r == 0:
            continue
        y = f.b[s, :, :r].double() @ (f.a[s, :r].double() @ x[t].double())
        if f.bias is not None:
            y = y + f.bias[s].double()
        if f.mag is None:
            out[t] += w * float(f.scale[s]) * y
        else:
            g = f.mag[s].double()
            nobias = base[t].double() - (0.0 if base_bias is None else base_bias.double())
            out[t] += w * (float(f.scale[s]) * g * y + (g - 1) * nobias)
    return out


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("num_tokens", [1, 9, 70])
def test_lora_delta_is_the_per_lane_sum(num_tokens, bias):
    f = bank(33, 20, bias)
    g = torch.Generator().manual_seed(num_tokens)
    x, base = torch.randn(num_tokens, 33, generator=g), torch.randn(num_tokens, 20, generator=g)
    tok, slot, weight = raw_lanes(num_tokens, seed=num_tokens)
    lanes = build_lanes(tok, slot, weight, len(RANKS), num_tokens=num_tokens)
    got = reference.lora_delta(x, base, f, lanes)
    torch.testing.assert_close(got.double(), per_lane(x, base, f, tok, slot, weight), rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 1e-2


def test_shrink_then_expand_is_the_delta_in_low_precision():
    f = bank(40, 24, bias=True)
    f = f._replace(a=f.a.bfloat16(), b=f.b.bfloat16(), bias=f.bias.bfloat16())
    x, base = torch.randn(12, 40).bfloat16(), torch.randn(12, 24).bfloat16()
    lanes = build_lanes(*raw_lanes(12, seed=3), len(RANKS), num_tokens=12)
    h = reference.lora_shrink(x, f, lanes)
    assert h.shape == (1, lanes.num_lanes, f.a.shape[1]) and h.dtype == torch.float32
    out = reference.lora_expand(h, base, f, lanes)
    assert out.dtype == torch.bfloat16 and torch.equal(out, reference.lora_delta(x, base, f, lanes))


def test_embedding_is_the_per_lane_sum():
    f = bank(50, 16, bias=False)
    f = f._replace(a=f.a * 7.0)
    ids = torch.randint(0, 50, (9,), generator=torch.Generator().manual_seed(1))
    base = torch.randn(9, 16)
    tok, slot, weight = raw_lanes(9, seed=4)
    lanes = build_lanes(tok, slot, weight, len(RANKS), num_tokens=9)
    got = reference.lora_embedding_delta(ids, base, f, lanes, embed_scale=2.0)
    onehot = torch.nn.functional.one_hot(ids, 50).double()  # (T, V): the embedding as a product
    want = per_lane(onehot, base, f._replace(a=f.a * 2.0), tok, slot, weight)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("base_bias", [False, True])
@pytest.mark.parametrize("num_tokens", [1, 9, 70])
def test_dora_delta_is_the_per_lane_sum(num_tokens, base_bias):
    """DoRA slots (0, 2, 3) beside a LoRA slot (4: g = 1), a lora_B bias on every slot, and a slot of
    rank 0."""
    g = torch.Generator().manual_seed(num_tokens)
    n = 20
    mag = torch.ones(len(RANKS), n)
    mag[[0, 2, 3]] = 0.5 + torch.rand(3, n, generator=g)
    mag[1] = 7.0  # rank 0: never read
    f = bank(33, n, bias=True)._replace(mag=mag)
    x, base = torch.randn(num_tokens, 33, generator=g), torch.randn(num_tokens, n, generator=g)
    bb = torch.randn(n, generator=g) if base_bias else None
    tok, slot, weight = raw_lanes(num_tokens, seed=num_tokens + 1)
    lanes = build_lanes(tok, slot, weight, len(RANKS), num_tokens=num_tokens)
    got = reference.lora_delta(x, base, f, lanes, bb)
    torch.testing.assert_close(got.double(), per_lane(x, base, f, tok, slot, weight, bb), rtol=1e-5, atol=1e-5)
    plain = reference.lora_delta(x, base, f._replace(mag=None), lanes)
    if torch.isin(slot[weight != 0], torch.tensor([0, 2, 3])).any():
        assert (got - plain).abs().max() > 1e-2  # g matters


def test_dora_embedding_scales_the_base_output():
    f = bank(50, 16, bias=False)
    mag = torch.ones(len(RANKS), 16)
    mag[2] = torch.linspace(0.5, 1.5, 16)
    f = f._replace(a=f.a * 7.0, mag=mag)
    ids = torch.randint(0, 50, (9,), generator=torch.Generator().manual_seed(2))
    base = torch.randn(9, 16)
    tok, slot, weight = raw_lanes(9, seed=5)
    lanes = build_lanes(tok, slot, weight, len(RANKS), num_tokens=9)
    got = reference.lora_embedding_delta(ids, base, f, lanes, embed_scale=2.0)
    onehot = torch.nn.functional.one_hot(ids, 50).double()  # (T, V): the embedding as a product
    want = per_lane(onehot, base, f._replace(a=f.a * 2.0), tok, slot, weight)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
