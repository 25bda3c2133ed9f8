"""Device memory shrinks back: slot buffers follow the adapters that are resident, not the largest
ever loaded, and a forward reading the old storage is never disturbed by the shrink.

Expected byte counts come from the model's module shapes alone: ``slots × rank × (K + N)`` per
patched module in the adapter dtype."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import adapter_dir, save_adapter, tiny_model, token_ids

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
