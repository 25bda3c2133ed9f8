"""Model-level logits against PEFT, on every tiny architecture of helpers.ARCHS.

The oracle is PEFT over a copy of the same base: ``adapter_names=[...]`` for mixed batches, or a
per-row run with ``set_adapter`` / ``disable_adapter()`` (OPT flattens tokens before fc1/fc2, where
PEFT's own mixed batch raises). Weighted sets have no PEFT forward, so their oracle is a copy of the
model with ``W + Σ w·s·B·A`` merged in, computed here from the saved files.

Each arch gets three adapters with different ranks and target sets (helpers.make_adapters), and
every comparison first checks that the adapter moves the logits far more than the tolerance.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import ARCHS, LayoutProbe, merged_copy, peft_oracle, peft_rows, tiny_model, token_ids

import lora_graph

ATOL32 = 1e-4
ARCH_NAMES = list(ARCHS)
WEIGHTS = {"a": 0.5, "b": -1.0, "c": 2.0}

# Batches given as PEFT's adapter_names; each also runs as the equivalent lora_graph SPEC list.
MIXED = {
    "spec_a_none_b": ["a", "__base__", "b"],
    "repeats_unsorted": ["b", "a", "__base__", "b", "c", "a"],
    "one_adapter_everywhere": ["c", "c", "c"],
    "no_adapter": ["__base__", "__base__"],
}


def as_spec(names):
    return [None if n == "__base__" else n for n in names]


def oracle(peft_model, arch, names, input_ids):
    """PEFT's per-row logits: its mixed-batch path, except on OPT."""
    with torch.no_grad():
        if arch == "opt":
            return peft_rows(peft_model, names, input_ids=input_ids)
        return peft_model(input_ids=input_ids, adapter_names=list(names)).logits


def assert_moves(reference, base, names, margin):
    """Every adapter row of the oracle differs from the base by more than ``margin`` (a multiple
    of the tolerance), so a wrapper that dropped the branch could not pass."""
    for i, name in enumerate(names):
        if name != "__base__":
            assert (reference[i] - base[i]).abs().max() > margin, f"adapter {name!r} barely changes row {i}"


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_single_adapter_matches_peft(arch, name, adapter_dirs):
    dirs = adapter_dirs(arch)
    model = tiny_model(arch)
    ids = token_ids(3, 7)
    peft_model = peft_oracle(model, dirs)
    peft_model.set_adapter(name)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        base = model(input_ids=ids).logits
    assert_moves(expected, base, [name] * 3, 100 * ATOL32)

    lm = lora_graph.wrap(model)
    for n, path in dirs.items():
        lm.load_adapter(n, path)
    with torch.no_grad():
        broadcast = lm(input_ids=ids, adapters=name).logits
        per_row = lm(input_ids=ids, adapters=[name] * 3).logits
        weighted = lm(input_ids=ids, adapters={name: 1.0}).logits
    torch.testing.assert_close(broadcast, expected, atol=ATOL32, rtol=0)
    torch.testing.assert_close(per_row, expected, atol=ATOL32, rtol=0)
    torch.testing.assert_close(weighted, expected, atol=ATOL32, rtol=0)


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("batch", list(MIXED), ids=list(MIXED))
def test_mixed_batch_matches_peft(arch, batch, adapter_dirs):
    names = MIXED[batch]
    dirs = adapter_dirs(arch)
    model = tiny_model(arch)
    ids = token_ids(len(names), 7, seed=1)
    peft_model = peft_oracle(model, dirs)
    expected = oracle(peft_model, arch, names, ids)
    with torch.no_grad():
        base = model(input_ids=ids).logits
    assert_moves(expected, base, names, 100 * ATOL32)

    lm = lora_graph.wrap(model)
    for n, path in dirs.items():
        lm.load_adapter(n, path)
    with torch.no_grad():
        by_spec = lm(input_ids=ids, adapters=as_spec(names)).logits
        by_names = lm(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(by_spec, expected, atol=ATOL32, rtol=0)
    torch.testing.assert_close(by_names, expected, atol=ATOL32, rtol=0)
    for i, name in enumerate(names):
        if name == "__base__":  # a row without adapter is the base model's own output, bit for bit
            assert torch.equal(by_spec[i], base[i]), f"row {i} without adapter differs from the base"


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_one_adapter_per_row_matches_peft(arch, adapter_dirs):
    """Every row with one adapter and every adapter on as many rows: each token has exactly one
    lane. On one-token rows (a decode step's shape) the branch goes back to token order by a gather
    instead of a scatter, or, where the lanes are a strided view of the tokens, needs neither.
    Checked on prompts and on one-token rows, twice each (the second forward
    runs the bound branch), with adapters of different scales (per-lane coefficients) and with one
    adapter under two names (one shared ``w · s``)."""
    dirs = adapter_dirs(arch)
    model = tiny_model(arch)
    peft_model = peft_oracle(model, dirs)
    lm = lora_graph.wrap(model)
    for n, path in dirs.items():
        lm.load_adapter(n, path)
    lm.load_adapter("a2", dirs["a"])
    q_proj = next(m for name, m in lm.model.named_modules() if name.endswith(("q_proj", "c_attn")))
    probe = LayoutProbe(lm, q_proj)
    # b, a, a, b: the lanes are a permutation of the tokens; a, b, a, b: a strided view of them
    for names, shared in ((["b", "a", "a", "b"], ["a", "a2", "a2", "a"]), (["a", "b", "a", "b"], ["a", "a2", "a", "a2"])):
        for length in (7, 1):
            ids = token_ids(len(names), length, seed=2)
            expected = oracle(peft_model, arch, names, ids)
            with torch.no_grad():
                peft_model.set_adapter("a")
                only_a = peft_model(input_ids=ids).logits
                base = model(input_ids=ids).logits
                for spec, want in ((names, expected), (shared, only_a)):
                    assert_moves(want, base, spec, 100 * ATOL32)
                    for _ in range(2):
                        got = lm(input_ids=ids, adapters=spec).logits
                        torch.testing.assert_close(got, want, atol=ATOL32, rtol=0, msg=lambda m: f"{spec}: {m}")
                    grid = probe.last.grid(len(names) * length, q_proj.bank.state.present, torch.device("cpu"))
                    assert (grid.inverse is not None) == (length == 1)
                    assert (grid.strides is not None) == (length == 1 and names[0] == "a")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_per_row_oracle_agrees_with_peft_mixed_batch(arch, adapter_dirs):
    """The per-row oracle used for OPT gives PEFT's mixed-batch logits where both exist."""
    names = MIXED["repeats_unsorted"]
    peft_model = peft_oracle(tiny_model(arch), adapter_dirs(arch))
    ids = token_ids(len(names), 7, seed=1)
    with torch.no_grad():
        mixed = peft_model(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(peft_rows(peft_model, names, input_ids=ids), mixed, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_weighted_set_equals_merged_weights(arch, adapter_dirs):
    dirs = adapter_dirs(arch)
    model = tiny_model(arch)
    merged = merged_copy(model, dirs, WEIGHTS)
    ids = token_ids(4, 7, seed=2)
    with torch.no_grad():
        base = model(input_ids=ids).logits
        expected = merged(input_ids=ids).logits
    assert (expected - base).abs().max() > 100 * ATOL32

    peft_model = peft_oracle(model, dirs)
    names = ["__base__", "a", "__base__", "c"]
    expected_named = oracle(peft_model, arch, names, ids)

    lm = lora_graph.wrap(model)
    for n, path in dirs.items():
        lm.load_adapter(n, path)
    with torch.no_grad():
        everywhere = lm(input_ids=ids, adapters=WEIGHTS).logits
        mixed = lm(input_ids=ids, adapters=[WEIGHTS, "a", None, dict(WEIGHTS)]).logits
    torch.testing.assert_close(everywhere, expected, atol=ATOL32, rtol=0)
    torch.testing.assert_close(mixed[0], expected[0], atol=ATOL32, rtol=0)
    torch.testing.assert_close(mixed[3], expected[3], atol=ATOL32, rtol=0)
    torch.testing.assert_close(mixed[1], expected_named[1], atol=ATOL32, rtol=0)
    assert torch.equal(mixed[2], base[2]), "the None row differs from the unwrapped model"

    unwrapped = lm.unwrap()
    with torch.no_grad():
        after = unwrapped(input_ids=ids).logits
    assert torch.equal(after, base)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_weights_scale_the_branch_linearly(arch, adapter_dirs):
    """{"b": w} for w in (-1, 0.5, 2) equals the merged model with that weight (negative included)."""
    dirs = adapter_dirs(arch)
    model = tiny_model(arch)
    ids = token_ids(3, 5, seed=3)
    weights = [-1.0, 0.5, 2.0]
    expected = []
    for w in weights:
        with torch.no_grad():
            expected.append(merged_copy(model, dirs, {"b": w})(input_ids=ids[:1]).logits[0])
    lm = lora_graph.wrap(model)
    lm.load_adapter("b", dirs["b"])
    with torch.no_grad():
        got = lm(input_ids=ids[:1].expand(3, -1), adapters=[{"b": w} for w in weights]).logits
    for i in range(3):
        torch.testing.assert_close(got[i], expected[i], atol=ATOL32, rtol=0)


def bf16_ulp(x: torch.Tensor) -> float:
    """One bf16 unit in the last place at the magnitude of ``x`` (8 significant bits)."""
    return 2.0 ** (math.floor(math.log2(x.abs().max().item())) - 7)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_bf16_base_matches_peft(arch, adapter_dirs):
    """bf16 base, fp32 adapters (PEFT's default upcasts them too).

    Tolerance, per row and in bf16 ulps of that row's logit scale: every patched layer rounds its
    output to bf16, and the rounding differences grow through the layers.
    - PEFT's single-adapter path adds the fp32 branch to the bf16 base output and rounds once, as
      lora_graph does: within 8 ulps of it (in practice they agree to the bit).
    - PEFT's mixed batch rounds the branch to bf16 before adding it (two roundings), which drifts
      by up to ~15 ulps on these models. Against it, the flash-attention rule: no further from an
      fp32 run of the same bf16 weights than twice PEFT's own error, plus one ulp.
    """
    dirs = adapter_dirs(arch)
    model = tiny_model(arch, dtype=torch.bfloat16)
    names = ["a", "__base__", "b", "c"]
    ids = token_ids(len(names), 7, seed=4)
    peft16 = peft_oracle(model, dirs)
    peft32 = peft_oracle(copy.deepcopy(model).float(), dirs)  # the same bf16 values, run in fp32
    ref32 = peft_rows(peft32, names, input_ids=ids)
    expected = {"per_row": peft_rows(peft16, names, input_ids=ids)}
    if arch != "opt":
        expected["mixed"] = oracle(peft16, arch, names, ids)
    assert ref32.dtype == torch.float32 and expected["per_row"].dtype == torch.bfloat16

    base32 = peft_rows(peft32, ["__base__"] * len(names), input_ids=ids)

    lm = lora_graph.wrap(model)
    for n, path in dirs.items():
        lm.load_adapter(n, path)
    with torch.no_grad():
        got = lm(input_ids=ids, adapters=as_spec(names)).logits
    assert got.dtype == torch.bfloat16
    for i, name in enumerate(names):
        ulp = bf16_ulp(ref32[i])  # per row: rows with an lm_head adapter have a larger logit scale
        if name != "__base__":
            assert (ref32[i] - base32[i]).abs().max() > 10 * 8 * ulp, f"adapter {name!r} barely changes row {i}"
        torch.testing.assert_close(got[i].float(), expected["per_row"][i].float(), atol=8 * ulp, rtol=0,
                                   msg=lambda m: f"row {i} ({name}) vs PEFT per row: {m}")
        for how, peft_logits in expected.items():
            ours = (got[i].float() - ref32[i]).abs().max().item()
            theirs = (peft_logits[i].float() - ref32[i]).abs().max().item()
            assert ours <= 2 * theirs + ulp, (
                f"row {i} ({name}): error vs fp32 {ours:.3g} > 2 x PEFT {how}'s {theirs:.3g} + 1 ulp"
            )


@pytest.mark.parametrize(
    "spec", [["a", "a", "a"], [{"a": 0.5}] * 3, ["a", None, "b"], [{"a": 1.0, "c": -2.0}, "b", None]],
    ids=["one-adapter", "one-weighted", "mixed", "weighted-set"],
)
def test_repeated_forwards_reuse_the_bound_branch(spec, adapter_dirs):
    """A forward with the plan, bank state and shapes of the previous one (a decode step) calls
    the branch bound then, skipping the routing lookups: the result is bit-identical, and a load
    (a new bank state) or another SPEC (another plan) rebinds it."""
    dirs = adapter_dirs("llama")
    model = tiny_model("llama")
    lm = lora_graph.wrap(copy.deepcopy(model))
    for name in ("a", "b", "c"):
        lm.load_adapter(name, dirs[name])
    ids = token_ids(3, 5)
    layer = lm.model.model.layers[0].self_attn.q_proj
    probe = LayoutProbe(lm, layer)
    with torch.no_grad():
        first = lm(input_ids=ids, adapters=spec).logits
        bound = probe.bound()
        assert bound is not None and bound[3] is not None
        again = lm(input_ids=ids, adapters=spec).logits
        assert probe.bound() is bound  # the second forward took the bound branch
        assert torch.equal(first, again)
        fresh = lora_graph.wrap(copy.deepcopy(model))
        for name in ("a", "b", "c"):
            fresh.load_adapter(name, dirs[name])
        assert torch.equal(first, fresh(input_ids=ids, adapters=spec).logits)
        lm.load_adapter("a", dirs["c"], replace=True)  # new weights under the same name
        replaced = lm(input_ids=ids, adapters=spec).logits
        assert probe.bound() is not bound
        rows = [i for i, row in enumerate(spec) if row == "a" or (isinstance(row, dict) and "a" in row)]
        assert rows and all(not torch.equal(replaced[i], first[i]) for i in rows)
        other = lm(input_ids=ids, adapters=None).logits
        assert torch.equal(other, model(input_ids=ids).logits)
