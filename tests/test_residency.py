"""Adapter residency: paging through bounded device slots, pin/unpin, replace, unload, bad paths,
``memory()`` and progress bars.

The oracle for every output is a freshly wrapped copy of the same pristine model with exactly the
adapters a request names loaded (``lora_graph.wrap(copy.deepcopy(pristine))``): it has never paged,
evicted or replaced anything. A wrapped model cannot be deep-copied, so the pristine copy is made
before any wrap. Byte counts are computed from the safetensors headers and the adapter dtype, never
from the wrapper.

Documented behaviour checked here:
- a request names at most ``max_loaded`` distinct adapters; more is a ValueError before any forward;
- a pinned adapter is never evicted, and at most ``max_loaded`` adapters can be pinned;
- ``load_adapter(name, path, replace=True)`` serves new requests with the new weights while a
  request already running keeps the old ones;
- a registered path that vanished or went corrupt fails only the request that pages it in;
- ``unload_adapter`` of an adapter that a running request holds removes the name at once, lets the
  request finish with it, and frees its slot when the request ends.
"""

from __future__ import annotations

import copy
import io
import os
import random
import shutil
import sys

import pytest
import torch
from helpers import adapter_dir, save_adapter, targets, tiny_model, tiny_model_with, token_ids
from safetensors import safe_open

import lora_graph

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:peft")  # PEFT's notes on lora_bias adapters

ATOL32 = 1e-5
TARGETS = targets("llama")
WEIGHTS = (-1.5, -0.5, 0.25, 1.0, 2.0)


# -- adapters and oracles -------------------------------------------------------------------------


def make_pool(model, root, count: int, seed: int = 0) -> dict[str, str]:
    """``count`` small adapters with mixed ranks, alphas and target sets; some rsLoRA, some with a
    lora_B bias, some with a rank_pattern."""
    rng = random.Random(seed)
    paths = {}
    for i in range(count):
        chosen = rng.sample(TARGETS, rng.randint(1, len(TARGETS)))
        kwargs = dict(r=rng.choice([1, 2, 4, 8]), lora_alpha=rng.choice([1, 4, 16]), target_modules=chosen)
        if i % 5 == 1:
            kwargs["use_rslora"] = True
        if i % 7 == 3:
            kwargs["lora_bias"] = True
        if i % 6 == 2 and len(chosen) > 1:
            kwargs["rank_pattern"] = {chosen[0]: 6}
        name = f"p{i:02d}"
        paths[name] = save_adapter(model, adapter_dir(root, name), seed=1000 + i, **kwargs)
    return paths


@pytest.fixture(scope="module")
def pristine():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def pool(pristine, tmp_path_factory):
    return make_pool(pristine, tmp_path_factory.mktemp("pool"), 50)


def logits(lm, ids, spec):
    with torch.no_grad():
        return lm(input_ids=ids, adapters=spec).logits


def oracle(pristine, paths: dict[str, str], ids, spec):
    """Logits of a fresh wrapper holding exactly ``paths``."""
    fresh = lora_graph.wrap(copy.deepcopy(pristine))
    for name, path in paths.items():
        fresh.load_adapter(name, path)
    return logits(fresh, ids, spec)


def spec_names(spec) -> set[str]:
    rows = spec if isinstance(spec, list) else [spec]
    out = set()
    for row in rows:
        if isinstance(row, str):
            out.add(row)
        elif isinstance(row, dict):
            out.update(row)
    return out


def random_batch(rng: random.Random, names: list[str], rows: int) -> list:
    """A SPEC list naming every one of ``names``, with base rows and weighted sets mixed in."""
    spec = []
    for i in range(rows):
        kind = rng.choice(["name", "name", "set", None]) if i >= len(names) else "name"
        if kind == "name":
            spec.append(names[i] if i < len(names) else rng.choice(names))
        elif kind == "set":
            chosen = rng.sample(names, rng.randint(1, len(names)))
            spec.append({n: rng.choice(WEIGHTS) for n in chosen})
        else:
            spec.append(None)
    if len(names) > 1:  # always at least one weighted set over two or more adapters
        spec[rng.randrange(rows)] = {n: rng.choice(WEIGHTS) for n in rng.sample(names, 2)}
        for i, name in enumerate(names):  # and keep every name present
            if name not in spec_names(spec):
                spec[i] = name
    return spec


def adapter_bytes(path: str, dtype: torch.dtype) -> int:
    """Bytes of an adapter's LoRA factors stored in ``dtype``, from the safetensors header alone."""
    total = 0
    with safe_open(os.path.join(path, "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            if ".lora_" in key:
                total += torch.Size(f.get_slice(key).get_shape()).numel()
    return total * torch.empty(0, dtype=dtype).element_size()


def adapter_modules(path: str) -> dict[str, bool]:
    """Module name -> whether the adapter has a lora_B bias there, from the safetensors keys."""
    out: dict[str, bool] = {}
    with safe_open(os.path.join(path, "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            stem, _, part = key.partition(".lora_")
            module = stem.removeprefix("base_model.model.")
            out[module] = out.get(module, False) or part == "B.bias"
    return out


class ForwardCounter:
    """Counts top-level forwards of a model and records the resident set each one saw."""

    def __init__(self, lm):
        self.lm = lm
        self.seen: list[tuple[str, ...]] = []
        self.handle = lm.model.register_forward_pre_hook(lambda *_: self.seen.append(lm.resident))

    def __len__(self) -> int:
        return len(self.seen)


def state(lm) -> dict:
    return {"resident": lm.resident, "pinned": lm.pinned, "memory": lm.memory(), "adapters": dict(lm.adapters)}


def residency(lm) -> dict:
    """The device tier only: a request that failed after reading its adapter may keep it in the host cache."""
    return {"resident": lm.resident, "pinned": lm.pinned, "device": lm.memory()["device"]}


# -- paging ---------------------------------------------------------------------------------------


def test_paging_fifty_adapters_through_four_slots_matches_fresh_wrappers(pristine, pool):
    """30 batches, each naming a random subset of at most 4 of 50 registered adapters (weighted sets
    included), through max_loaded=4: every batch equals a fresh wrapper holding exactly its
    adapters, and never more than 4 adapters are resident, during a forward or after it."""
    lm = lora_graph.wrap(copy.deepcopy(pristine), max_loaded=4)
    lm.register_adapters(pool)
    assert lm.resident == ()
    counter = ForwardCounter(lm)
    rng = random.Random(7)
    names_all = sorted(pool)
    paged_in = evictions = 0
    for step in range(30):
        names = rng.sample(names_all, rng.randint(1, 4))
        spec = random_batch(rng, names, rows=5)
        ids = token_ids(5, 7, seed=step)
        before = set(lm.resident)
        got = logits(lm, ids, spec)
        after = set(lm.resident)
        paged_in += len(set(names) - before)
        evictions += len(before - after)
        expected = oracle(pristine, {n: pool[n] for n in names}, ids, spec)
        torch.testing.assert_close(got, expected, atol=ATOL32, rtol=0, msg=lambda m: f"batch {step} {spec}: {m}")
        assert set(names) <= after, f"batch {step}: its adapters are not resident after it"
        assert len(after) <= 4 and lm.memory()["device"]["resident"] <= 4
        assert set(counter.seen[-1]) >= set(names) and len(counter.seen[-1]) <= 4
    assert all(len(seen) <= 4 for seen in counter.seen)
    assert len(counter) == 30
    assert paged_in > 30 and evictions > 20, (paged_in, evictions)  # the test really paged


ROUND_TRIP_SPECS = {
    "single": ["p03", "p10", None, "p03", "p27"],
    "weighted": [{"p03": 0.5, "p10": -1.0}, {"p10": 1.0, "p27": 2.0, "p03": 0.25}, None, "p27", "p03"],
}


@pytest.mark.parametrize("max_rank", [None, 8], ids=["grow", "max_rank8"])
@pytest.mark.parametrize("kind", list(ROUND_TRIP_SPECS))
def test_evicted_adapters_round_trip_bit_exactly(pristine, pool, kind, max_rank):
    """The same batch before its adapters are evicted and after they are paged back in gives the
    same bits, over two eviction cycles that put them back in other slots."""
    spec = ROUND_TRIP_SPECS[kind]
    names = sorted(spec_names(spec))
    ids = token_ids(5, 6, seed=3)
    lm = lora_graph.wrap(copy.deepcopy(pristine), max_loaded=4, max_rank=max_rank)
    lm.register_adapters(pool)
    first = logits(lm, ids, spec)
    torch.testing.assert_close(first, oracle(pristine, {n: pool[n] for n in names}, ids, spec), atol=ATOL32, rtol=0)
    others = [n for n in sorted(pool) if n not in names]
    for cycle, fillers in enumerate((others[0:8], others[20:27])):
        for i in range(0, len(fillers), 4):
            group = fillers[i : i + 4]
            logits(lm, ids, group + [None] * (5 - len(group)))
        assert not set(names) & set(lm.resident), f"cycle {cycle}: {names} not all evicted"
        again = logits(lm, ids, spec)
        assert torch.equal(again, first), (
            f"cycle {cycle}: max |diff| {(again - first).abs().max().item():.3g} after paging {names} back in"
        )


def test_batch_with_more_adapters_than_slots_fails_before_compute(pristine, pool):
    """Five distinct adapters with max_loaded=4, in rows or in one weighted set, through
    ``lm(...)``, ``lm.generate`` and ``use()``: a ValueError naming max_loaded, no forward run,
    residency and memory unchanged."""
    lm = lora_graph.wrap(copy.deepcopy(pristine), max_loaded=4)
    lm.register_adapters(pool)
    ids = token_ids(5, 6, seed=4)
    logits(lm, ids, ["p00", "p01", "p02", None, "p00"])
    before = state(lm)
    counter = ForwardCounter(lm)
    five = ["p05", "p06", "p07", "p08", "p09"]
    calls = {
        "rows": lambda: lm(input_ids=ids, adapters=five),
        "set": lambda: lm(input_ids=ids, adapters={n: 1.0 for n in five}),
        "mixed": lambda: lm(input_ids=ids, adapters=["p00", "p01", {"p02": 1.0, "p05": 2.0}, "p06", None]),
        "generate": lambda: lm.generate(input_ids=ids, adapters=five, max_new_tokens=2, do_sample=False,
                                        pad_token_id=0),
    }
    for what, call in calls.items():
        with pytest.raises(ValueError, match="max_loaded") as info:
            call()
        assert "5" in str(info.value), f"{what}: the message should say how many adapters: {info.value}"
        assert len(counter) == 0, f"{what}: a forward ran before the error"
        assert state(lm) == before, f"{what}: residency changed"
    with pytest.raises(ValueError, match="max_loaded"):
        with lm.use(five):
            pytest.fail("the block must not be entered")
    assert len(counter) == 0 and state(lm) == before
    # the wrapper still serves: exactly four at once is fine
    ok = ["p05", "p06", "p07", "p08", None]
    torch.testing.assert_close(logits(lm, ids, ok), oracle(pristine, {n: pool[n] for n in ok if n}, ids, ok),
                               atol=ATOL32, rtol=0)


# -- pin / unpin ----------------------------------------------------------------------------------


def test_pinned_adapters_are_never_evicted(pristine, pool):
    lm = lora_graph.wrap(copy.deepcopy(pristine), max_loaded=4)
    lm.register_adapters(pool)
    ids = token_ids(4, 6, seed=5)
    lm.pin("p00")
    lm.pin("p01")
    assert lm.pinned == {"p00", "p01"} and {"p00", "p01"} <= set(lm.resident)
    pinned_out = logits(lm, ids, ["p00", "p01", None, {"p00": 0.5, "p01": -1.0}])
    rng = random.Random(1)
    others = sorted(set(pool) - {"p00", "p01"})
    evicted = set()
    for step in range(12):  # the pinned ones are the least recently used all along
        names = rng.sample(others, 2)
        before = set(lm.resident)
        logits(lm, ids, [names[0], names[1], None, names[0]])
        evicted |= before - set(lm.resident)
        assert {"p00", "p01"} <= set(lm.resident), f"step {step}: a pinned adapter was evicted"
    assert len(evicted) >= 8 and not evicted & {"p00", "p01"}
    torch.testing.assert_close(logits(lm, ids, ["p00", "p01", None, {"p00": 0.5, "p01": -1.0}]), pinned_out,
                               atol=ATOL32, rtol=0)

    lm.unpin("p00")  # now the least recently used adapter that may go
    assert lm.pinned == {"p01"}
    logits(lm, ids, [others[0], others[1], others[2], None])
    assert "p00" not in lm.resident and "p01" in lm.resident
    with pytest.raises(ValueError, match="nope"):
        lm.pin("nope")


def test_pinning_more_than_max_loaded_fails_clearly(pristine, pool):
    lm = lora_graph.wrap(copy.deepcopy(pristine), max_loaded=4)
    lm.register_adapters(pool)
    ids = token_ids(4, 6, seed=6)
    four = ["p10", "p11", "p12", "p13"]
    for name in four:
        lm.pin(name)
    lm.pin("p10")  # pinning a pinned adapter again is not one more
    assert lm.pinned == set(four)
    before = state(lm)
    with pytest.raises(ValueError, match="pinned") as info:
        lm.pin("p14")
    assert "4" in str(info.value)
    assert state(lm) == before
    # a request for a fifth adapter cannot be served while all slots are pinned: a clear error
    counter = ForwardCounter(lm)
    with pytest.raises(RuntimeError, match="pinned"):
        logits(lm, ids, ["p14", None, None, None])
    assert len(counter) == 0 and residency(lm) == {"resident": before["resident"], "pinned": before["pinned"],
                                                  "device": before["memory"]["device"]}
    torch.testing.assert_close(logits(lm, ids, four), oracle(pristine, {n: pool[n] for n in four}, ids, four),
                               atol=ATOL32, rtol=0)
    lm.unpin("p12")
    logits(lm, ids, ["p14", None, None, None])
    assert set(lm.resident) == {"p10", "p11", "p13", "p14"}


def test_request_that_cannot_fit_beside_pinned_adapters_leaves_residency_unchanged(pristine, pool):
    """Two pinned of four slots and a batch of three other adapters: it cannot be served. The error
    comes before any forward and, as any failed operation, leaves the wrapper as it was: the two
    unpinned residents are not evicted for a request that fails anyway."""
    lm = lora_graph.wrap(copy.deepcopy(pristine), max_loaded=4)
    lm.register_adapters(pool)
    ids = token_ids(4, 6, seed=7)
    lm.pin("p20")
    lm.pin("p21")
    logits(lm, ids, ["p22", "p23", None, None])
    before = residency(lm)
    counter = ForwardCounter(lm)
    with pytest.raises(RuntimeError, match="pinned"):
        logits(lm, ids, ["p24", "p25", "p26", None])
    assert len(counter) == 0
    assert lm.resident == before["resident"], "residents were evicted by a request that failed"
    assert residency(lm) == before
    # and the two unpinned slots can still be used
    spec = ["p24", "p25", "p20", None]
    torch.testing.assert_close(logits(lm, ids, spec), oracle(pristine, {n: pool[n] for n in spec if n}, ids, spec),
                               atol=ATOL32, rtol=0)


# -- replace --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def old_new(pristine, tmp_path_factory):
    root = tmp_path_factory.mktemp("replace")
    old = save_adapter(pristine, adapter_dir(root, "old"), seed=31, r=4, lora_alpha=8, target_modules=TARGETS)
    new = save_adapter(pristine, adapter_dir(root, "new"), seed=32, r=2, lora_alpha=8,
                       target_modules=targets("llama", "attn"), lora_bias=True)
    other = save_adapter(pristine, adapter_dir(root, "other"), seed=33, r=3, target_modules=["q_proj", "up_proj"])
    return {"old": old, "new": new, "other": other}


def test_replace_serves_new_requests_while_a_running_block_keeps_the_old_weights(pristine, old_new):
    ids = token_ids(3, 6, seed=8)
    spec = ["x", None, {"x": -0.5}]
    want_old = oracle(pristine, {"x": old_new["old"]}, ids, spec)
    want_new = oracle(pristine, {"x": old_new["new"]}, ids, spec)
    assert (want_old - want_new).abs().max() > 1e-2  # the two versions are told apart

    lm = lora_graph.wrap(copy.deepcopy(pristine), max_loaded=2)
    lm.load_adapter("x", old_new["old"])
    lm.load_adapter("y", old_new["other"])
    with pytest.raises(ValueError, match="already"):
        lm.load_adapter("x", old_new["new"])  # replace=False keeps the old one
    with lm.use(spec):
        with torch.no_grad():
            inside = lm.model(input_ids=ids).logits
        torch.testing.assert_close(inside, want_old, atol=ATOL32, rtol=0)
        info = lm.load_adapter("x", old_new["new"], replace=True)
        assert info.path == old_new["new"] and lm.adapters["x"].path == old_new["new"]
        # a new request, even while the old block is open, sees the new weights
        torch.testing.assert_close(logits(lm, ids, spec), want_new, atol=ATOL32, rtol=0)
        # the running block still computes with the old weights, bit for bit
        with torch.no_grad():
            assert torch.equal(lm.model(input_ids=ids).logits, inside)
    torch.testing.assert_close(logits(lm, ids, spec), want_new, atol=ATOL32, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(input_ids=ids).logits, oracle(pristine, {}, ids, None), atol=0, rtol=0)
    # the old slot was freed when the block ended: with two slots, x and y fit side by side again
    assert lm.resident == ("x",)  # y was evicted to make room while the old x was held
    logits(lm, ids, ["y", "x", None])
    assert set(lm.resident) == {"x", "y"}
    torch.testing.assert_close(
        logits(lm, ids, ["y", "x", None]),
        oracle(pristine, {"x": old_new["new"], "y": old_new["other"]}, ids, ["y", "x", None]), atol=ATOL32, rtol=0)


# -- bad input ------------------------------------------------------------------------------------


def _corrupt(path: str, kind: str, root) -> None:
    weights = os.path.join(path, "adapter_model.safetensors")
    if kind == "dir_removed":
        shutil.rmtree(path)
    elif kind == "weights_removed":
        os.remove(weights)
    elif kind == "truncated":
        size = os.path.getsize(weights)
        with open(weights, "r+b") as f:
            f.truncate(size // 2)
    elif kind == "garbage":
        size = os.path.getsize(weights)
        with open(weights, "wb") as f:
            f.write(bytes(random.Random(0).randrange(256) for _ in range(size)))
    elif kind == "config_invalid":
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            f.write('{"peft_type": "LORA", ')
    elif kind == "other_model":  # a valid file for a model of another width
        wider = tiny_model_with("llama", hidden_size=64, head_dim=8)
        src = save_adapter(wider, adapter_dir(root, "wider"), seed=5, r=4, target_modules=TARGETS)
        shutil.copy(os.path.join(src, "adapter_model.safetensors"), weights)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("history", ["never_paged", "paged_then_evicted"])
@pytest.mark.parametrize("kind", ["dir_removed", "weights_removed", "truncated", "garbage", "config_invalid",
                                  "other_model"])
def test_vanished_or_corrupt_path_fails_only_its_request(pristine, pool, tmp_path, kind, history):
    """With both slots full, a request that needs the broken adapter fails with an error naming
    it, before any forward; nothing resident is evicted, and the other adapters give the same
    bits as before. ``paged_then_evicted`` has no host cache, so the file is read again."""
    bad = shutil.copytree(pool["p04"], os.path.join(tmp_path, "bad"))
    lm = lora_graph.wrap(copy.deepcopy(pristine), max_loaded=2, max_cpu=0 if history == "paged_then_evicted" else 8)
    lm.register_adapters({"g1": pool["p01"], "g2": pool["p02"], "bad": bad})
    ids = token_ids(4, 6, seed=9)
    if history == "paged_then_evicted":
        logits(lm, ids, ["bad", None, "bad", None])
    specs = {"g1": ["g1", None, "g1", "g1"], "g2": "g2", "both": ["g2", {"g1": 0.5, "g2": -1.0}, None, "g1"],
             "none": None}
    for spec in specs.values():  # page both in first: the snapshot is of the served state
        logits(lm, ids, spec)
    snapshot = {k: logits(lm, ids, s) for k, s in specs.items()}
    assert set(lm.resident) == {"g1", "g2"}
    before = state(lm)
    _corrupt(bad, kind, tmp_path)
    counter = ForwardCounter(lm)
    for spec in ("bad", ["g1", "bad", None, "g1"], {"bad": 1.0, "g2": 0.5}):
        with pytest.raises((OSError, ValueError)) as info:
            logits(lm, ids, spec)
        named = bad in str(info.value) or "'bad'" in str(info.value)
        assert named, f"the error does not name the adapter: {info.value}"
        assert len(counter) == 0, f"{spec}: a forward ran"
        assert state(lm) == before, f"{spec}: the wrapper changed"
    for key, spec in specs.items():
        assert torch.equal(logits(lm, ids, spec), snapshot[key]), key
    torch.testing.assert_close(snapshot["both"], oracle(pristine, {"g1": pool["p01"], "g2": pool["p02"]}, ids,
                                                        specs["both"]), atol=ATOL32, rtol=0)


# -- unload while in use --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split_targets(pristine, tmp_path_factory):
    """x on the MLP only; y and z on attention only."""
    root = tmp_path_factory.mktemp("split")
    return {
        "x": save_adapter(pristine, adapter_dir(root, "x"), seed=41, r=4, target_modules=targets("llama", "mlp")),
        "y": save_adapter(pristine, adapter_dir(root, "y"), seed=42, r=2, target_modules=targets("llama", "attn")),
        "z": save_adapter(pristine, adapter_dir(root, "z"), seed=43, r=3, target_modules=["q_proj", "v_proj"]),
    }


def test_unload_of_an_adapter_in_use_is_deferred(pristine, split_targets):
    """Unloading x inside a block that uses it: the name is gone at once (new requests naming it
    fail), the block finishes with x, bit for bit, and x's slot stays occupied (loading z then
    evicts y, since only one slot is free to take) until the block ends; after it the slot is
    free, the MLP modules only x targeted are the original objects again, and memory() counts
    only what is resident."""
    paths = split_targets
    ids = token_ids(2, 6, seed=10)
    spec = ["x", None]
    want = oracle(pristine, {"x": paths["x"]}, ids, spec)
    model = copy.deepcopy(pristine)
    originals = {n: m for n, m in model.named_modules() if n.endswith(tuple(targets("llama", "mlp")))}
    lm = lora_graph.wrap(model, max_loaded=2)
    lm.load_adapter("x", paths["x"])
    lm.load_adapter("y", paths["y"])
    with lm.use(spec):
        with torch.no_grad():
            inside = model(input_ids=ids).logits
        torch.testing.assert_close(inside, want, atol=ATOL32, rtol=0)
        lm.unload_adapter("x")
        assert "x" not in lm.adapters and "x" not in lm.resident
        with pytest.raises(ValueError, match="'x'"):
            lm(input_ids=ids, adapters="x")
        with pytest.raises(ValueError, match="'x'"):
            lm.unload_adapter("x")
        lm.load_adapter("z", paths["z"])  # one slot is still x's: z takes y's
        assert lm.resident == ("z",)
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, inside)
    assert all(model.get_submodule(n) is m for n, m in originals.items()), "x's modules were not restored"
    lm.load_adapter("y")  # still registered; x's slot is free now, so paging it in evicts nothing
    assert set(lm.resident) == {"y", "z"}
    assert lm.memory()["device"]["adapters"] == adapter_bytes(paths["y"], torch.float32) + adapter_bytes(
        paths["z"], torch.float32)
    want_zy = oracle(pristine, {"y": paths["y"], "z": paths["z"]}, ids, ["z", "y"])
    torch.testing.assert_close(logits(lm, ids, ["z", "y"]), want_zy, atol=ATOL32, rtol=0)
    lm.load_adapter("x", paths["x"])  # the name is free again
    torch.testing.assert_close(logits(lm, ids, spec), want, atol=ATOL32, rtol=0)


def test_memory_counts_the_slot_of_an_unloaded_adapter_until_its_request_ends(pristine, split_targets):
    """An unloaded adapter that a running request holds still occupies its device slot, so
    memory() counts its bytes until the request ends, and not after."""
    paths = split_targets
    ids = token_ids(2, 6, seed=11)
    x_bytes, y_bytes = adapter_bytes(paths["x"], torch.float32), adapter_bytes(paths["y"], torch.float32)
    lm = lora_graph.wrap(copy.deepcopy(pristine), max_loaded=2)
    lm.load_adapter("x", paths["x"])
    lm.load_adapter("y", paths["y"])
    assert lm.memory()["device"]["adapters"] == x_bytes + y_bytes
    with lm.use(["x", "y"]):
        lm.unload_adapter("x")
        with torch.no_grad():
            lm.model(input_ids=ids)
        assert lm.memory()["device"]["adapters"] == x_bytes + y_bytes, "a held slot's bytes are not counted"
    assert lm.memory()["device"]["adapters"] == y_bytes


# -- memory ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_memory_reports_slot_buffers_resident_bytes_and_host_cache(pristine, pool, dtype):
    """Device slot buffers: max_loaded slots of max_rank for every patched module, computed from
    the module shapes. Resident adapter bytes: within 1.1x of the resident adapters' factor bytes
    from their safetensors headers in the adapter dtype. Host cache: the last max_cpu adapters read."""
    max_loaded, max_cpu, max_rank = 3, 2, 8
    lm = lora_graph.wrap(copy.deepcopy(pristine), max_loaded=max_loaded, max_cpu=max_cpu, max_rank=max_rank,
                         adapter_dtype=dtype)
    lm.register_adapters(pool)
    ids = token_ids(3, 5, seed=12)
    size = torch.empty(0, dtype=dtype).element_size()
    shapes = {n: (m.in_features, m.out_features) for n, m in pristine.named_modules() if isinstance(m, torch.nn.Linear)}
    empty = lm.memory()
    assert empty["device"]["slot_buffers"] == 0 and empty["device"]["adapters"] == 0
    assert empty["host"]["cache"] == 0 and empty["registered"] == 50

    read_order: list[str] = []
    patched: dict[str, bool] = {}
    batches = [["p00", "p01", None], ["p02", "p00", "p03"], ["p05", None, "p06"], ["p07", "p05", "p07"]]
    for batch in batches:
        for name in dict.fromkeys(n for n in batch if n):
            if name not in lm.resident:
                read_order.append(name)
                for module, bias in adapter_modules(pool[name]).items():
                    patched[module] = patched.get(module, False) or bias
        logits(lm, ids, batch)
        mem = lm.memory()
        resident = lm.resident
        from_files = sum(adapter_bytes(pool[n], dtype) for n in resident)
        assert from_files <= mem["device"]["adapters"] <= 1.1 * from_files, (mem, from_files)
        assert mem["device"]["resident"] == len(resident) <= max_loaded
        slot_buffers = sum(max_loaded * (max_rank * (shapes[m][0] + shapes[m][1]) + (shapes[m][1] if bias else 0))
                           for m, bias in patched.items()) * size
        assert mem["device"]["slot_buffers"] == slot_buffers
        assert mem["host"]["cached"] == 0 and mem["host"]["cache"] == 0 and mem["host"]["max_cpu"] == 0
    assert len(read_order) == 7  # p00 stayed resident; p01..p03 and p05..p07 were read, the rest never


def test_host_cache_keeps_the_last_max_cpu_coalesced_adapters(pool, pristine):
    """The host tier used when the model is on an accelerator: each adapter in ONE buffer whose
    views are the factors, least recently used dropped first."""
    from lora_graph import patch
    from lora_graph.adapters import read_adapter
    from lora_graph.store import HostCache, coalesce, to_device

    shapes = {n: patch.shape_of(m) for n, m in patch.patchable_modules(pristine).items()}
    cache = HostCache(2)
    for name in ("p00", "p01", "p02"):
        weights = read_adapter(pool[name], shapes)
        host = coalesce(weights, torch.bfloat16, pin=False)
        ptr, end = host.buffer.data_ptr(), host.buffer.data_ptr() + host.nbytes
        for module, lora in host.weights.modules.items():
            assert ptr <= lora.a.data_ptr() < end and ptr <= lora.b.data_ptr() < end
            assert torch.equal(lora.a, weights.modules[module].a.to(torch.bfloat16))
            assert torch.equal(lora.b, weights.modules[module].b.to(torch.bfloat16))
        assert host.nbytes == adapter_bytes(pool[name], torch.bfloat16)
        assert to_device(host, torch.device("cpu")) is host.weights  # already there: no copy
        cache.put(name, host)
    assert "p00" not in cache and "p01" in cache and "p02" in cache and len(cache) == 2
    cache.get("p01")
    cache.put("p03", coalesce(read_adapter(pool["p03"], shapes), torch.float32, pin=False))
    assert "p02" not in cache and "p01" in cache and "p03" in cache


# -- progress -------------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("progress", [True, False])
@pytest.mark.parametrize("tty", [True, False], ids=["tty", "pipe"])
def test_progress_bars_only_on_a_terminal(pristine, pool, monkeypatch, progress, tty):
    some = {n: pool[n] for n in ["p00", "p01", "p02"]}
    err = _Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    lm = lora_graph.wrap(copy.deepcopy(pristine), progress=progress)
    lm.register_adapters(some)
    registered = err.getvalue()
    lm2 = lora_graph.wrap(copy.deepcopy(pristine), progress=progress)
    lm2.load_adapters(some)
    loaded = err.getvalue()[len(registered):]
    assert set(lm.adapters) == set(lm2.resident) == set(some)
    if progress and tty:
        assert "registering adapters" in registered and "3/3" in registered, registered
        assert "loading adapters" in loaded and "3/3" in loaded, loaded
    else:
        assert registered == "" and loaded == "", (registered, loaded)
