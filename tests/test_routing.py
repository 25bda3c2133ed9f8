"""Routing: SPEC forms, broadcast and per-row SPECs, expansion, and the token-level lane grid.

Unit tests pin ``resolve_spec`` / ``RoutingPlan.from_rows`` / the torch backend's grid against
hand-written expectations; the grid is read back as a set of ``(token, slot) -> weight`` lanes, so
the checks hold whatever the padding layout. Model-level tests compare with PEFT: its ``adapter_names`` mixed
batch where PEFT supports it, and per-row PEFT forwards where it does not (OPT flattens tokens
before fc1/fc2, and ``num_return_sequences`` expands the batch).
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import numpy as np
import pytest
import torch

import lora_graph
from helpers import VOCAB, copy_adapter, edit_adapter_config, peft_oracle, save_adapter, targets, tiny_model
from lora_graph.backends.torch import build_grid
from lora_graph.routing import RoutingPlan, Spec, resolve_spec, spec_from_adapter_names

KNOWN = {"a": 0, "b": 1, "c": 2}
TOL = 1e-4


# -- resolve_spec ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, rows, broadcast",
    [
        (None, ((),), True),
        ("a", ((("a", 1.0),),), True),
        ("__base__", ((),), True),
        ({"b": 0.5, "a": 2}, ((("a", 2.0), ("b", 0.5)),), True),
        ({"a": -1.25}, ((("a", -1.25),),), True),
        ({"a": torch.tensor(0.5)}, ((("a", 0.5),),), True),
        ({}, ((),), True),
        ({"a": 0.0, "b": 1.0}, ((("b", 1.0),),), True),  # zero-weight lanes are dropped
        ({"a": 0}, ((),), True),
        (["a", None, "__base__", {"c": 3, "a": 0.0}], ((("a", 1.0),), (), (), (("c", 3.0),)), False),
        (("b",), ((("b", 1.0),),), False),
    ],
    ids=["none", "name", "base-name", "mapping", "negative", "tensor-weight", "empty-mapping", "zero-dropped",
         "all-zero", "list", "tuple"],
)
def test_resolve_spec_forms(spec, rows, broadcast):
    assert resolve_spec(spec, KNOWN) == Spec(rows, broadcast)


@pytest.mark.parametrize(
    "weight", [np.float32(0.5), np.float64(0.5), np.int64(2), Fraction(1, 2), torch.tensor(2)],
    ids=["np.float32", "np.float64", "np.int64", "Fraction", "int-tensor"],
)
def test_any_real_number_is_a_weight(weight):
    """DESIGN: a weight is any real number; numpy scalars (router softmax outputs) included."""
    assert resolve_spec({"a": weight, "b": 1.0}, KNOWN) == resolve_spec({"a": float(weight), "b": 1.0}, KNOWN)


def test_adapter_names_are_a_spec_list():
    assert spec_from_adapter_names(["a", "__base__", "b"]) == ["a", None, "b"]
    assert resolve_spec(spec_from_adapter_names(["__base__", "c"]), KNOWN) == Spec(((), (("c", 1.0),)), False)
    with pytest.raises(TypeError):
        spec_from_adapter_names("a")


def expand(spec: Spec, rows: int):
    return RoutingPlan.from_rows(spec, rows).sets


def test_broadcast_and_per_row_expansion():
    broadcast = resolve_spec({"a": 0.5}, KNOWN)
    assert expand(broadcast, 3) == ((("a", 0.5),),) * 3
    rows = resolve_spec(["a", None, "b"], KNOWN)
    assert expand(rows, 3) == ((("a", 1.0),), (), (("b", 1.0),))
    # inside generate(), which expands rows in place (beams, num_return_sequences), each row's SPEC
    # follows it; elsewhere a shorter list is refused, never stretched
    generated = dataclasses.replace(rows, expand=(2,))
    assert expand(generated, 6) == ((("a", 1.0),), (("a", 1.0),), (), (), (("b", 1.0),), (("b", 1.0),))
    with pytest.raises(ValueError, match=r"\b3\b.*\b6\b"):
        expand(rows, 6)
    with pytest.raises(ValueError, match=r"\b3\b.*\b9\b.*generate\(\) makes 2"):
        expand(generated, 9)
    single = resolve_spec(["c"], KNOWN)
    assert expand(single, 4) == ((("c", 1.0),),) * 4
    for batch in (2, 4, 5):
        with pytest.raises(ValueError, match=rf"\b3\b.*\b{batch}\b"):
            expand(rows, batch)
    assert RoutingPlan.from_rows(resolve_spec([None, "__base__"], KNOWN), 2) is None  # nothing to add


# -- the torch backend's grid ---------------------------------------------------------------------------

CPU = torch.device("cpu")


def grid_of(rows, num_tokens: int, present):
    return build_grid(RoutingPlan(rows), num_tokens, frozenset(present), CPU)


def lanes_of(grid, num_tokens: int) -> dict[tuple[int, int], float]:
    """``{(token, slot): weight}`` read back from a grid, padding (weight 0) left out; checks the layout."""
    d, m = grid.weight.shape
    assert grid.token.shape == (d * m,) and grid.token.dtype == torch.int64
    assert grid.weight.dtype == torch.float32
    assert list(grid.slots) == sorted(set(grid.slots)) and len(grid.slots) == d
    token = grid.token.view(d, m)
    lanes = {}
    for i, slot in enumerate(grid.slots):
        for j in range(m):
            t, w = int(token[i, j]), float(grid.weight[i, j])
            assert 0 <= t < num_tokens
            if w != 0.0:
                assert (t, slot) not in lanes, "a token has two lanes for one slot"
                lanes[(t, slot)] = w
    return lanes


def expected_lanes(rows, num_tokens: int, present) -> dict[tuple[int, int], float]:
    per_row = num_tokens // len(rows)
    return {
        (t, slot): w
        for t in range(num_tokens)
        for slot, w in rows[t // per_row]
        if slot in present and w != 0.0
    }


ROWS = (((0, 1.0),), (), ((0, 0.5), (1, -2.0)), ((2, 1.5),), ((1, 1.0),))


@pytest.mark.parametrize("per_row", [1, 3, 7])  # lm_head on the last position, (B, L, K), flattened (B*L, K)
@pytest.mark.parametrize("present", [frozenset({0, 1, 2}), frozenset({1}), frozenset({0, 2, 9})])
def test_grid_is_token_level(per_row, present):
    num_tokens = len(ROWS) * per_row
    grid = grid_of(ROWS, num_tokens, present)
    expected = expected_lanes(ROWS, num_tokens, present)
    assert lanes_of(grid, num_tokens) == expected
    assert set(grid.slots) == {slot for _, slot in expected}
    assert not grid.identity


def test_grid_identity_only_when_exact():
    rows = (((4, 2.0),),) * 3
    grid = grid_of(rows, 6, {4})
    assert grid.identity and torch.equal(grid.token, torch.arange(6))
    assert torch.equal(grid.weight, torch.full((1, 6), 2.0))
    not_identity = [
        (((4, 2.0),), (), ((4, 2.0),)),  # a row without the adapter
        (((4, 2.0),), ((4, 2.0), (5, 1.0)), ((4, 2.0),)),  # a row with two lanes
    ]
    for rows in not_identity:
        grid = grid_of(rows, 6, {4, 5})
        assert not grid.identity
        assert lanes_of(grid, 6) == expected_lanes(rows, 6, {4, 5})
    # the layer holds only slot 4: rows using slot 5 too still need a gather, rows without it none
    grid = grid_of(not_identity[1], 6, {4})
    assert grid.identity and torch.equal(grid.token, torch.arange(6))


def test_grid_none_when_no_token_uses_the_layer():
    assert grid_of(ROWS, 10, {7}) is None
    assert grid_of(((), ()), 4, {0}) is None


def test_grid_rejects_uneven_tokens():
    with pytest.raises(ValueError, match=r"\b7\b.*\b5\b"):
        grid_of(ROWS, 7, {0})


# -- model level, against PEFT -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """A llama model with adapters a (all targets) and b (attention only, rank 2, lora_bias)."""
    model = tiny_model("llama")
    root = tmp_path_factory.mktemp("routing")
    paths = {
        "a": save_adapter(model, str(root / "a"), seed=1, target_modules=targets("llama"), r=4, lora_alpha=8),
        "b": save_adapter(model, str(root / "b"), seed=2, target_modules=targets("llama", "attn"), r=2,
                          lora_alpha=4, lora_bias=True),
    }
    oracle = peft_oracle(model, paths)
    lm = lora_graph.wrap(model)
    for name, path in paths.items():
        lm.load_adapter(name, path)
    return lm, oracle, paths, root


def _ids(batch, length=6, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_adapter_names_match_peft_mixed_batch(two):
    lm, oracle, _, _ = two
    ids = _ids(4)
    names = ["a", "__base__", "b", "a"]
    expected = oracle(input_ids=ids, adapter_names=names).logits
    got_names = lm(input_ids=ids, adapter_names=names).logits
    got_spec = lm(input_ids=ids, adapters=["a", None, "b", "a"]).logits
    torch.testing.assert_close(got_names, expected, rtol=0, atol=TOL)
    assert torch.equal(got_names, got_spec)
    # the base row is the base model exactly
    assert torch.equal(got_spec[1], lm.model(input_ids=ids).logits[1])
    # every row differs from base where it has an adapter
    base = lm.model(input_ids=ids).logits
    assert all((got_spec[i] - base[i]).abs().max() > 100 * TOL for i in (0, 2, 3))


@torch.no_grad()
def test_broadcast_matches_peft(two):
    lm, oracle, _, _ = two
    ids = _ids(3)
    oracle.set_adapter("b")
    expected = oracle(input_ids=ids).logits
    torch.testing.assert_close(lm(input_ids=ids, adapters="b").logits, expected, rtol=0, atol=TOL)
    # a one-entry list is expanded to every row
    assert torch.equal(lm(input_ids=ids, adapters=["b"]).logits, lm(input_ids=ids, adapters="b").logits)


@torch.no_grad()
def test_a_spec_list_shorter_than_the_batch_is_refused(two):
    lm, _, _, _ = two
    ids = _ids(4, seed=3)
    with pytest.raises(ValueError, match=r"2 entries but the batch has 4 rows"):
        lm(input_ids=ids, adapters=["a", None])
    with lm.use(["a", None]), pytest.raises(ValueError, match=r"2 entries but the batch has 4 rows"):
        lm.model.generate(input_ids=ids[:2], max_new_tokens=2, num_return_sequences=2, do_sample=True,
                          pad_token_id=0)  # generate's expansion is known to lm.generate only
    with pytest.raises(ValueError, match=r"2 entries but the batch has 9 rows.*generate\(\) makes 3"):
        lm.generate(input_ids=ids[:3], adapters=["a", None], max_new_tokens=2, num_return_sequences=3,
                    do_sample=True, pad_token_id=0)
    # one entry for all rows is a broadcast, as a bare SPEC is
    assert torch.equal(lm(input_ids=ids, adapters=["a"]).logits, lm(input_ids=ids, adapters="a").logits)


@pytest.mark.parametrize("spec, error, words", [
    ({"a": 1e39}, ValueError, r"weight of adapter 'a'.*1e\+39"),
    ({"a": -3.5e38}, ValueError, r"weight of adapter 'a'"),
    (b"a", TypeError, r"bytes.*str"),
    ([b"a"], TypeError, r"row 0.*bytes.*str"),
])
def test_bad_specs_are_named(two, spec, error, words):
    lm, _, _, _ = two
    with pytest.raises(error, match=words):
        lm(input_ids=_ids(1), adapters=spec)


def test_unload_takes_one_name(two):
    lm, _, _, _ = two
    with pytest.raises(TypeError, match=r"one adapter name.*\['a'\].*delete_adapter"):
        lm.unload_adapter(["a"])
    assert "a" in lm.adapters


@torch.no_grad()
def test_weighted_set_is_the_exact_sum(two, tmp_path):
    """{"a": 0.5, "b": -1.5} equals PEFT with both adapters active, their alphas scaled by the weights."""
    lm, _, paths, _ = two
    scaled = {
        "a": edit_adapter_config(copy_adapter(paths["a"], str(tmp_path / "a")), lora_alpha=8 * 0.5),
        "b": edit_adapter_config(copy_adapter(paths["b"], str(tmp_path / "b")), lora_alpha=4 * -1.5),
    }
    oracle = peft_oracle(tiny_model("llama"), scaled)
    oracle.base_model.set_adapter(["a", "b"])
    ids = _ids(2, seed=4)
    expected = oracle(input_ids=ids).logits
    got = lm(input_ids=ids, adapters={"a": 0.5, "b": -1.5}).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)
    # per row: the same set in one row, the base in the other
    rows = lm(input_ids=ids, adapters=[{"b": -1.5, "a": 0.5}, None]).logits
    torch.testing.assert_close(rows[0], expected[0], rtol=0, atol=TOL)
    assert torch.equal(rows[1], lm.model(input_ids=ids).logits[1])


@torch.no_grad()
def test_zero_weight_lanes_are_dropped(two):
    lm, _, _, _ = two
    ids = _ids(2, seed=5)
    assert torch.equal(lm(input_ids=ids, adapters={"a": 0.0}).logits, lm.model(input_ids=ids).logits)
    assert torch.equal(lm(input_ids=ids, adapters={"a": 0.0, "b": 1.0}).logits, lm(input_ids=ids, adapters="b").logits)


@torch.no_grad()
def test_generate_with_beams_keeps_each_rows_adapter(two):
    lm, oracle, _, _ = two
    ids = _ids(2, length=5, seed=6)
    kwargs = dict(max_new_tokens=5, num_beams=2, do_sample=False, pad_token_id=0)
    expected = oracle.generate(input_ids=ids, adapter_names=["a", "__base__"], **kwargs)
    got = lm.generate(input_ids=ids, adapters=["a", None], **kwargs)
    assert torch.equal(got, expected)


@torch.no_grad()
def test_generate_num_return_sequences_expands_rows(two):
    """PEFT's adapter_names cannot do this (the batch grows); the oracle is one PEFT call per row."""
    lm, oracle, _, _ = two
    ids = _ids(2, length=5, seed=7)
    kwargs = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    got = lm.generate(input_ids=ids, adapters=[None, "b"], **kwargs)
    oracle.set_adapter("b")
    expected_b = oracle.generate(input_ids=ids[1:], **kwargs)
    with oracle.disable_adapter():
        expected_base = oracle.generate(input_ids=ids[:1], **kwargs)
    assert torch.equal(got[:2], expected_base)
    assert torch.equal(got[2:], expected_b)
    assert not torch.equal(expected_b, lm.generate(input_ids=ids[1:], **kwargs))  # the adapter changes tokens


@torch.no_grad()
def test_generate_expands_the_default_spec_too(two):
    lm, oracle, _, _ = two
    ids = _ids(2, length=5, seed=8)
    kwargs = dict(max_new_tokens=4, num_return_sequences=2, do_sample=True, pad_token_id=0)
    torch.manual_seed(0)
    want = lm.generate(input_ids=ids, adapters=["a", None], **kwargs)
    lm.set_adapter(["a", None])
    try:
        torch.manual_seed(0)
        assert torch.equal(lm.generate(input_ids=ids, **kwargs), want)
    finally:
        lm.set_adapter(None)


@torch.no_grad()
def test_flattened_layer_routes_by_token(tmp_path):
    """OPT flattens (B, L, D) to (B*L, D) before fc1/fc2; each token must keep its row's adapters."""
    model = tiny_model("opt")
    paths = {
        "a": save_adapter(model, str(tmp_path / "a"), seed=1, target_modules=targets("opt"), r=4),
        "b": save_adapter(model, str(tmp_path / "b"), seed=2, target_modules=targets("opt", "mlp"), r=2),
    }
    oracle = peft_oracle(model, paths)
    lm = lora_graph.wrap(model)
    for name, path in paths.items():
        lm.load_adapter(name, path)
    ids = _ids(3, length=5, seed=8)
    got = lm(input_ids=ids, adapters=["b", None, "a"]).logits
    base = lm.model(input_ids=ids).logits
    oracle.set_adapter("b")
    torch.testing.assert_close(got[0:1], oracle(input_ids=ids[0:1]).logits, rtol=0, atol=TOL)
    oracle.set_adapter("a")
    torch.testing.assert_close(got[2:3], oracle(input_ids=ids[2:3]).logits, rtol=0, atol=TOL)
    assert torch.equal(got[1], base[1])
    assert (got[0] - base[0]).abs().max() > 100 * TOL


@torch.no_grad()
def test_use_routes_plain_model_calls(two):
    lm, _, _, _ = two
    ids = _ids(2, seed=9)
    spec = [{"a": 2.0}, "b"]
    expected = lm(input_ids=ids, adapters=spec).logits
    with lm.use(spec) as same:
        assert same is lm
        inside = lm.model(input_ids=ids).logits
    assert torch.equal(inside, expected)
    assert torch.equal(lm.model(input_ids=ids).logits, lm(input_ids=ids).logits)  # nothing routed after the block
    with lm.use(adapter_names=["__base__", "b"]):
        assert torch.equal(lm.model(input_ids=ids).logits, lm(input_ids=ids, adapters=[None, "b"]).logits)
