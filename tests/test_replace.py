"""Replacing an adapter's files, and loading or registering many at once: the next request sees the
new files, running ones keep the old, a replace reuses the adapter's own slot when no request
reads it, and a call that fails changes nothing (registry, residency, outputs)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from helpers import adapter_dir, edit_adapter_tensors, save_adapter, targets, tiny_model, token_ids

import lora_graph

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:peft")

ATOL32 = 1e-5
TARGETS = targets("llama")


@pytest.fixture(scope="module")
def pristine():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def files(pristine, tmp_path_factory):
    root = tmp_path_factory.mktemp("replace")
    return {
        # old targets the MLP, new does not: a slot reused in place must be cleared there
        "old": save_adapter(pristine, adapter_dir(root, "old"), seed=31, r=4, lora_alpha=8, target_modules=TARGETS),
        "new": save_adapter(pristine, adapter_dir(root, "new"), seed=32, r=2, lora_alpha=8,
                            target_modules=targets("llama", "attn"), lora_bias=True),
        "other": save_adapter(pristine, adapter_dir(root, "other"), seed=33, r=3, target_modules=["q_proj", "up_proj"]),
        "third": save_adapter(pristine, adapter_dir(root, "third"), seed=34, r=2, target_modules=["v_proj"]),
    }


def logits(lm, ids, spec):
    with torch.no_grad():
        return lm(input_ids=ids, adapters=spec).logits


def oracle(pristine, paths, ids, spec):
    fresh = lora_graph.wrap(copy.deepcopy(pristine))
    for name, path in paths.items():
        fresh.load_adapter(name, path)
    return logits(fresh, ids, spec)


def state(lm) -> dict:
    return {"resident": lm.resident, "pinned": lm.pinned, "device": lm.memory()["device"],
            "adapters": {n: i.path for n, i in lm.adapters.items()}}


IDS = token_ids(3, 6, seed=8)
SPEC = ["x", None, {"x": -0.5}]


def test_register_replace_of_a_resident_adapter_serves_the_new_files(pristine, files):
    want_old = oracle(pristine, {"x": files["old"]}, IDS, SPEC)
    want_new = oracle(pristine, {"x": files["new"]}, IDS, SPEC)
    assert (want_old - want_new).abs().max() > 1e-2
    lm = lora_graph.wrap(copy.deepcopy(pristine))
    lm.load_adapter("x", files["old"])
    with lm.use(SPEC):
        with torch.no_grad():
            inside = lm.model(input_ids=IDS).logits
        lm.register_adapter("x", files["new"], replace=True)
        assert lm.adapters["x"].path == files["new"]
        torch.testing.assert_close(logits(lm, IDS, SPEC), want_new, atol=ATOL32, rtol=0)
        with torch.no_grad():  # the running block keeps the old weights
            assert torch.equal(lm.model(input_ids=IDS).logits, inside)
    torch.testing.assert_close(logits(lm, IDS, SPEC), want_new, atol=ATOL32, rtol=0)
    # once the block ended, only the new copy is resident
    assert lm.memory()["device"]["adapters"] == oracle_bytes(pristine, files["new"])


def oracle_bytes(pristine, path) -> int:
    fresh = lora_graph.wrap(copy.deepcopy(pristine))
    fresh.load_adapter("x", path)
    return fresh.memory()["device"]["adapters"]


def test_register_replace_keeps_a_pin(pristine, files):
    lm = lora_graph.wrap(copy.deepcopy(pristine), max_loaded=2)
    lm.load_adapter("x", files["old"])
    lm.pin("x")
    lm.register_adapter("x", files["new"], replace=True)
    assert lm.pinned == {"x"}
    torch.testing.assert_close(logits(lm, IDS, SPEC), oracle(pristine, {"x": files["new"]}, IDS, SPEC),
                               atol=ATOL32, rtol=0)
    lm.load_adapter("y", files["other"])
    lm.load_adapter("z", files["third"])  # evicts y, never the pinned x
    assert set(lm.resident) == {"x", "z"}


@pytest.mark.parametrize("setup", ["one_slot", "other_slot_pinned"])
def test_replace_reuses_its_own_slot_when_no_request_holds_it(pristine, files, setup):
    lm = lora_graph.wrap(copy.deepcopy(pristine), max_loaded=1 if setup == "one_slot" else 2)
    lm.load_adapter("x", files["old"])
    if setup == "other_slot_pinned":
        lm.load_adapter("y", files["other"])
        lm.pin("y")
    logits(lm, IDS, SPEC)
    lm.load_adapter("x", files["new"], replace=True)
    assert lm.adapters["x"].path == files["new"]
    torch.testing.assert_close(logits(lm, IDS, SPEC), oracle(pristine, {"x": files["new"]}, IDS, SPEC),
                               atol=ATOL32, rtol=0)
    if setup == "other_slot_pinned":
        assert set(lm.resident) == {"x", "y"} and lm.pinned == {"y"}
        spec = ["y", "x", None]
        torch.testing.assert_close(logits(lm, IDS, spec),
                                   oracle(pristine, {"x": files["new"], "y": files["other"]}, IDS, spec),
                                   atol=ATOL32, rtol=0)


def test_replace_of_a_held_adapter_without_another_slot_fails_and_changes_nothing(pristine, files):
    lm = lora_graph.wrap(copy.deepcopy(pristine), max_loaded=1)
    lm.load_adapter("x", files["old"])
    with lm.use("x"):
        before = state(lm)
        with pytest.raises(lora_graph.slots.SlotsFull, match="slots"):
            lm.load_adapter("x", files["new"], replace=True)
        assert state(lm) == before
    torch.testing.assert_close(logits(lm, IDS, SPEC), oracle(pristine, {"x": files["old"]}, IDS, SPEC),
                               atol=ATOL32, rtol=0)


# -- many at once ----------------------------------------------------------------------------------


def _broken(files, tmp_path) -> str:
    """A valid config whose weights do not fit the model: fails when read."""
    import shutil

    path = shutil.copytree(files["other"], os.path.join(tmp_path, "broken"))

    def widen(tensors):
        return {k: torch.cat([v, v], dim=-1) for k, v in tensors.items()}

    return edit_adapter_tensors(path, widen)


def test_register_adapters_is_all_or_nothing(pristine, files, tmp_path):
    lm = lora_graph.wrap(copy.deepcopy(pristine))
    lm.register_adapter("z", files["third"])
    before = state(lm)
    with pytest.raises(FileNotFoundError, match="missing"):
        lm.register_adapters({"a": files["old"], "b": os.path.join(tmp_path, "missing")})
    assert state(lm) == before
    with pytest.raises(ValueError, match="'z'.*already"):
        lm.register_adapters({"a": files["old"], "z": files["new"]})
    assert state(lm) == before
    lm.register_adapters({"a": files["old"], "b": files["new"]})
    assert set(lm.adapters) == {"a", "b", "z"}


@pytest.mark.parametrize("method", ["register_adapters", "load_adapters"])
def test_bulk_calls_name_a_list_given_for_the_mapping(pristine, files, method):
    """A list of names (or of paths) is not silently half-used: the error names the call and what it takes."""
    lm = lora_graph.wrap(copy.deepcopy(pristine))
    lm.register_adapter("x", files["old"])
    before = state(lm)
    with pytest.raises(TypeError, match=rf"{method} takes a \{{name: path\}} mapping, got list"):
        getattr(lm, method)(["x"])
    assert state(lm) == before


@pytest.mark.parametrize("fault", ["broken_weights", "name_taken"])
def test_load_adapters_is_all_or_nothing(pristine, files, tmp_path, fault):
    lm = lora_graph.wrap(copy.deepcopy(pristine), max_loaded=2)
    lm.load_adapter("x", files["old"])
    lm.load_adapter("y", files["other"])
    snapshot = logits(lm, IDS, ["x", "y", None])
    before = state(lm)
    paths = {"a": files["new"], "b": files["third"]}
    if fault == "broken_weights":
        paths["c"] = _broken(files, tmp_path)
    else:
        paths["y"] = files["new"]  # registered from other files
    with pytest.raises(ValueError):
        lm.load_adapters(paths)
    assert state(lm) == before
    assert torch.equal(logits(lm, IDS, ["x", "y", None]), snapshot)


def test_load_adapters_rolls_back_a_failure_while_placing(pristine, files, monkeypatch):
    lm = lora_graph.wrap(copy.deepcopy(pristine), max_loaded=3)
    lm.load_adapter("x", files["old"])
    before = state(lm)
    place, calls = lm._patched.place, []

    def flaky(host, slot, stream=None):  # the second placement fails, as out of memory would
        calls.append(slot)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return place(host, slot, stream)

    monkeypatch.setattr(lm._patched, "place", flaky)
    with pytest.raises(RuntimeError, match="out of memory"):
        lm.load_adapters({"a": files["new"], "b": files["third"]})
    assert state(lm) == before
    monkeypatch.undo()
    torch.testing.assert_close(logits(lm, IDS, SPEC), oracle(pristine, {"x": files["old"]}, IDS, SPEC),
                               atol=ATOL32, rtol=0)


def test_a_load_that_fails_late_evicts_nothing(pristine, files, tmp_path):
    """Sparse tensors in a pickled .bin pass the reader's shape checks; they must be refused before
    a victim is chosen, not when the slot is written."""
    import shutil

    from safetensors.torch import load_file

    path = shutil.copytree(files["third"], os.path.join(tmp_path, "sparse"))
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    os.remove(os.path.join(path, "adapter_model.safetensors"))
    torch.save({k: v.to_sparse() for k, v in tensors.items()}, os.path.join(path, "adapter_model.bin"))
    lm = lora_graph.wrap(copy.deepcopy(pristine), max_loaded=2)
    lm.load_adapter("x", files["old"])
    lm.load_adapter("y", files["other"])
    before = state(lm)
    with pytest.raises((ValueError, TypeError, RuntimeError), match="sparse|dense|strided"):
        lm.load_adapter("z", path, allow_pickle=True)
    assert state(lm) == before
    with pytest.raises((ValueError, TypeError, RuntimeError), match="sparse|dense|strided"):
        lm.load_adapters({"z": path}, allow_pickle=True)
    assert state(lm) == before
