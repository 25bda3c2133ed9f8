"""Device memory follows the adapters' bytes: each rank has its own storage (bank.py), so slot
buffers stay within ~1.1x of the resident adapters' factor bytes whatever mix of ranks is resident;
they shrink back as adapters go, and a forward reading the old storage is never disturbed by that.
Banks of several ranks give PEFT's outputs on both backends.

Expected byte counts come from the model's module shapes alone: ``slots × rank × (K + N)`` per
patched module in the adapter dtype."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import adapter_dir, peft_oracle, peft_rows, save_adapter, save_dora, tiny_model, token_ids

import lora_graph

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:peft")

MODULES = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def pristine():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def paths(pristine, tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    return {
        "small": save_adapter(pristine, adapter_dir(root, "small"), seed=1, r=4, target_modules=MODULES),
        "big": save_adapter(pristine, adapter_dir(root, "big"), seed=2, r=128, target_modules=MODULES,
                            lora_bias=True),
        "mid": save_adapter(pristine, adapter_dir(root, "mid"), seed=3, r=8, target_modules=MODULES),
    }


def expected(pristine, slots: int, rank: int) -> int:
    """Slot buffers of ``slots`` slots of ``rank`` on every module of MODULES, fp32, no bias."""
    total = 0
    for name, module in pristine.named_modules():
        if name.rsplit(".", 1)[-1] in MODULES:
            total += slots * rank * (module.in_features + module.out_features)
    return total * 4


def logits(lm, ids, spec):
    with torch.no_grad():
        return lm(input_ids=ids, adapters=spec).logits


def test_unloading_a_large_rank_shrinks_the_buffers_back(pristine, paths):
    lm = lora_graph.wrap(copy.deepcopy(pristine))
    lm.load_adapter("small", paths["small"])
    alone = lm.memory()["device"]
    assert alone["slot_buffers"] == expected(pristine, 1, 4) == alone["adapters"]
    ids = token_ids(2, 5)
    before = logits(lm, ids, "small")
    lm.load_adapter("big", paths["big"])
    assert lm.memory()["device"]["slot_buffers"] > 30 * alone["slot_buffers"]
    lm.unload_adapter("big")
    assert lm.memory()["device"] == alone
    assert torch.equal(logits(lm, ids, "small"), before)


def test_an_evicted_large_rank_gives_its_room_back(pristine, paths):
    lm = lora_graph.wrap(copy.deepcopy(pristine), max_loaded=1)
    lm.load_adapter("big", paths["big"])
    lm.load_adapter("small", paths["small"])  # written over big's slot
    assert lm.resident == ("small",)
    assert lm.memory()["device"]["slot_buffers"] == expected(pristine, 1, 4)


def test_free_slots_are_given_back(pristine, paths):
    """Each rank has its own storage (one r=4 row, seven r=8 rows), which shrinks as its slots go."""
    lm = lora_graph.wrap(copy.deepcopy(pristine))
    for name in ("small", "mid"):
        lm.load_adapter(name, paths[name])
    for i in range(6):
        lm.load_adapter(f"m{i}", paths["mid"])
    device = lm.memory()["device"]
    assert device["rank_classes"][4] == expected(pristine, 1, 4)
    assert expected(pristine, 7, 8) <= device["rank_classes"][8] <= 1.1 * expected(pristine, 7, 8)
    assert device["slot_buffers"] == sum(device["rank_classes"].values())
    for i in range(6):
        lm.unload_adapter(f"m{i}")
    assert lm.memory()["device"]["slot_buffers"] == expected(pristine, 1, 4) + expected(pristine, 1, 8)


def test_a_running_request_keeps_reading_the_storage_it_started_with(pristine, paths):
    """The big adapter is unloaded while a block uses it: its slot is freed, and the bank shrunk,
    only when the block ends; outputs inside and after are those of fresh wrappers."""
    ids = token_ids(2, 5, seed=3)
    spec = ["small", {"big": 0.5, "small": 1.0}]
    fresh = lora_graph.wrap(copy.deepcopy(pristine))
    for name in ("small", "big"):
        fresh.load_adapter(name, paths[name])
    want = logits(fresh, ids, spec)
    lm = lora_graph.wrap(copy.deepcopy(pristine))
    lm.load_adapter("small", paths["small"])
    lm.load_adapter("big", paths["big"])
    with lm.use(spec):
        with torch.no_grad():
            first = lm.model(input_ids=ids).logits
        lm.unload_adapter("big")
        assert lm.memory()["device"]["slot_buffers"] > 30 * expected(pristine, 1, 4)
        with torch.no_grad():
            assert torch.equal(lm.model(input_ids=ids).logits, first)
    assert torch.equal(first, want)
    assert lm.memory()["device"]["slot_buffers"] == expected(pristine, 1, 4)
    assert torch.equal(logits(lm, ids, "small"), logits(fresh, ids, "small"))


def test_declared_slots_and_rank_stay_at_fixed_addresses(pristine, paths):
    lm = lora_graph.wrap(copy.deepcopy(pristine), max_loaded=2, max_rank=128)
    lm.load_adapter("small", paths["small"])
    bank = next(iter(lm._patched.banks.values()))
    a, b = bank.factors.a.data_ptr(), bank.factors.b.data_ptr()
    declared = expected(pristine, 2, 128)
    lm.load_adapter("big", paths["big"])
    lm.unload_adapter("big")
    lm.load_adapter("mid", paths["mid"])
    assert (bank.factors.a.data_ptr(), bank.factors.b.data_ptr()) == (a, b)
    out_features = sum(m.out_features for n, m in pristine.named_modules() if n.rsplit(".", 1)[-1] in MODULES)
    assert lm.memory()["device"]["slot_buffers"] == declared + 2 * out_features * 4  # and big's bias table


# -- rank classes ---------------------------------------------------------------------------------------

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def ranked(pristine, tmp_path_factory):
    """Adapters of five ranks on the attention modules: r=1 (two of them), r=16, r=64, an r=4 one
    with a lora_B bias and an r=8 DoRA one (q and v only)."""
    root = tmp_path_factory.mktemp("ranked")
    return {
        "r1": save_adapter(pristine, adapter_dir(root, "r1"), seed=11, r=1, lora_alpha=2, target_modules=ATTN),
        "r1b": save_adapter(pristine, adapter_dir(root, "r1b"), seed=12, r=1, lora_alpha=4, target_modules=ATTN),
        "r16": save_adapter(pristine, adapter_dir(root, "r16"), seed=16, r=16, lora_alpha=8, target_modules=ATTN),
        "r64": save_adapter(pristine, adapter_dir(root, "r64"), seed=13, r=64, lora_alpha=64, target_modules=ATTN),
        "b4": save_adapter(pristine, adapter_dir(root, "b4"), seed=14, r=4, target_modules=ATTN, lora_bias=True),
        "d8": save_dora(pristine, adapter_dir(root, "d8"), seed=15, r=8, target_modules=["q_proj", "v_proj"]),
    }


def peft_mixed(pristine, paths: dict, names: list, blend: dict, blend_row: int, ids) -> torch.Tensor:
    """PEFT's logits: row i from ``names[i]`` alone (``__base__``: no adapter), and row
    ``blend_row`` from the weighted set ``blend`` as PEFT's ``cat`` combination."""
    peft = peft_oracle(pristine, paths)
    want = peft_rows(peft, names, input_ids=ids)
    peft.add_weighted_adapter(list(blend), list(blend.values()), "blend", combination_type="cat")
    peft.set_adapter("blend")
    with torch.no_grad():
        want[blend_row] = peft(input_ids=ids).logits[blend_row]
    return want


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_batch_across_rank_classes_is_peft(pristine, ranked, backend):
    """One batch whose rows use adapters of different ranks (r=1, r=64, a weighted set of both, the
    base, a bias adapter, a DoRA one), each rank in its own storage, equals PEFT row by row; and
    again once the r=64 adapter is unloaded (its storage gone)."""
    tol = 1e-5 if backend == "torch" else 1e-4
    lm = lora_graph.wrap(copy.deepcopy(pristine), backend=backend)
    for name, path in ranked.items():
        lm.load_adapter(name, path)
    q = lm.model.get_submodule("model.layers.0.self_attn.q_proj").bank
    assert q.factors is None and sorted(c.rank for c in q.state.classes) == [1, 4, 8, 16, 64]
    tables = {c.rank: (c.factors.bias is not None, c.factors.mag is not None) for c in q.state.classes}
    assert tables == {1: (False, False), 4: (True, False), 8: (False, True), 16: (False, False), 64: (False, False)}
    ids = token_ids(7, 5, seed=21)
    names = ["r1", "r64", "r1", "__base__", "b4", "d8", "r1b"]
    blend = {"r1": 0.5, "r64": -1.0}
    want = peft_mixed(pristine, ranked, names, blend, 2, ids)
    spec = [None if n == "__base__" else n for n in names]
    spec[2] = blend
    with torch.no_grad():
        got = lm(input_ids=ids, adapters=spec).logits
        base = pristine(input_ids=ids).logits
    moved = (want - base).abs().amax(dim=(1, 2))
    assert all(moved[i] > 100 * tol for i in range(len(names)) if i != 3), moved  # every adapter row moves
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    assert torch.equal(got[3], base[3])

    lm.unload_adapter("r64")
    assert 64 not in lm.memory()["device"]["rank_classes"]
    names[1], blend = "r16", {"r1": 0.5, "r1b": 2.0, "r16": -1.5}
    want = peft_mixed(pristine, {n: p for n, p in ranked.items() if n != "r64"}, names, blend, 2, ids)
    spec = [None if n == "__base__" else n for n in names]
    spec[2] = blend
    with torch.no_grad():
        got = lm(input_ids=ids, adapters=spec).logits
    torch.testing.assert_close(got, want, atol=tol, rtol=0)


def expected_attn(pristine, slots: int, rank: int) -> int:
    """Bytes of ``slots`` adapters of ``rank`` on every module of ATTN, fp32, no bias."""
    return 4 * slots * rank * sum(m.in_features + m.out_features for n, m in pristine.named_modules()
                                  if n.rsplit(".", 1)[-1] in ATTN)


def test_many_rank_one_adapters_beside_a_rank_64_one_stay_within_a_tenth(pristine, ranked):
    """200 r=1 adapters and one r=64 adapter on four modules of every layer: the slot buffers stay
    within 1.1x of the adapters' bytes (one storage padded to r=64 would be ~50x), and go back to
    the r=1 storage alone once the r=64 adapter is unloaded."""
    lm = lora_graph.wrap(copy.deepcopy(pristine))
    lm.load_adapters({f"u{i:03d}": ranked["r1"] for i in range(200)})
    small = lm.memory()["device"]
    assert small["adapters"] == expected_attn(pristine, 200, 1)
    assert small["slot_buffers"] <= 1.1 * small["adapters"]
    lm.load_adapter("r64", ranked["r64"])
    both = lm.memory()["device"]
    assert both["adapters"] == expected_attn(pristine, 200, 1) + expected_attn(pristine, 1, 64)
    assert both["adapters"] <= both["slot_buffers"] <= 1.1 * both["adapters"], both
    assert both["rank_classes"] == {1: small["slot_buffers"], 64: expected_attn(pristine, 1, 64)}
    lm.unload_adapter("r64")
    assert lm.memory()["device"] == small


def test_a_compiled_model_over_several_rank_classes_stays_exact(pristine, ranked):
    """Triton under torch.compile: a bank of several ranks has no slot-indexed storage for the
    traced kernel op, so its layers take the eager branch; the logits are the eager ones."""
    model = copy.deepcopy(pristine)
    lm = lora_graph.wrap(model, backend="triton")
    for name in ("r1", "r64", "b4"):
        lm.load_adapter(name, ranked[name])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    ids = token_ids(3, 4, seed=22)
    for spec in (["r1", "r64", None], [{"r1": 1.0, "b4": -0.5}, "b4", "r64"]):
        with lm.use(spec), torch.no_grad():
            assert torch.equal(compiled(input_ids=ids).logits, model(input_ids=ids).logits), spec


def test_a_load_failing_mid_write_leaves_every_rank_storage_as_it_was(pristine, ranked, monkeypatch):
    """A load whose copy into the banks fails (after its new rank's storage was made) leaves every
    bank's classes, rows and tensors as they were, and the outputs too."""
    lm = lora_graph.wrap(copy.deepcopy(pristine))
    for name in ("r1", "r64", "b4"):
        lm.load_adapter(name, ranked[name])
    ids = token_ids(3, 4, seed=23)
    spec = ["r1", "r64", {"r1": 1.0, "b4": 2.0}]
    before = logits(lm, ids, spec)
    banks = lm._patched.banks

    def layout():
        return {n: [(c.rank, dict(c.rows), c.identity, [None if t is None else (t.data_ptr(), t.shape) for t in c.factors])
                    for c in b.state.classes] for n, b in banks.items()}

    was, memory = layout(), lm.memory()

    def broken(dst, src):
        raise RuntimeError("copy failed")

    monkeypatch.setattr(torch, "_foreach_copy_", broken)
    with pytest.raises(RuntimeError, match="copy failed"):
        lm.load_adapter("r16", ranked["r16"])
    monkeypatch.undo()
    assert "r16" not in lm.resident and layout() == was and lm.memory() == memory
    assert torch.equal(logits(lm, ids, spec), before)
