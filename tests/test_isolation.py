"""A row's output depends only on its own SPEC, even when another adapter of the batch produces
non-finite values at run time.

The "bad" adapter's files hold finite values (3e38, below fp32's largest), so every load accepts
them; their products overflow to inf and NaN in the forward. Rows that do not name it must get
exactly what PEFT gives them, on both backends (triton in Triton's interpreter, see conftest.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import edit_adapter_tensors, peft_oracle, peft_rows, save_adapter, targets, tiny_model, token_ids

import lora_graph
from lora_graph.backends.torch import build_grid
from lora_graph.routing import RoutingPlan

TOL = 1e-4


@pytest.fixture(scope="module")
def good_bad(tmp_path_factory):
    model = tiny_model("llama")
    root = tmp_path_factory.mktemp("isolation")
    good = save_adapter(model, str(root / "good"), seed=3, target_modules=targets("llama"), r=4, lora_alpha=8)
    bad = save_adapter(model, str(root / "bad"), seed=4, target_modules=targets("llama"), r=4, lora_alpha=8)

    def overflow(tensors):  # finite in the file, inf/NaN once multiplied
        for key, t in tensors.items():
            tensors[key] = torch.where(t >= 0, 3e38, -3e38).to(t.dtype)

    edit_adapter_tensors(bad, overflow)
    return model, {"good": good, "bad": bad}


def _wrapped(model, paths, backend):
    lm = lora_graph.wrap(copy.deepcopy(model), backend=backend)
    for name, path in paths.items():
        lm.load_adapter(name, path)
    return lm


@pytest.mark.parametrize("backend", ["torch", "triton"])
@torch.no_grad()
def test_overflowing_adapter_does_not_reach_other_rows(good_bad, backend):
    model, paths = good_bad
    lm = _wrapped(model, paths, backend)
    ids = token_ids(4, 6)
    got = lm(input_ids=ids, adapters=["good", "bad", "good", None]).logits
    assert not torch.isfinite(got[1]).all()  # the bad adapter does overflow
    want = peft_rows(peft_oracle(model, {"good": paths["good"]}), ["good", "good", "good", "__base__"],
                     input_ids=ids)
    for row in (0, 2, 3):
        assert torch.isfinite(got[row]).all(), row
        assert (got[row] - want[row]).abs().max().item() <= TOL, row
    assert torch.equal(got[3], model(input_ids=ids).logits[3])  # the base row, bit for bit


@pytest.mark.parametrize("backend", ["torch", "triton"])
@torch.no_grad()
def test_base_row_generates_base_tokens_beside_an_overflowing_adapter(good_bad, backend):
    model, paths = good_bad
    lm = _wrapped(model, paths, backend)
    ids = token_ids(4, 5, seed=1)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    got = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapters=[None, "bad", "good", "good"],
                      **kwargs)
    base = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    assert torch.equal(got[0], base[0])
    alone = lm.generate(input_ids=ids[2:], attention_mask=torch.ones_like(ids[2:]), adapters="good", **kwargs)
    assert torch.equal(got[2:], alone)


def test_grid_padding_lanes_stay_on_their_slots_tokens():
    # slot 0 on rows 0 and 2, slot 1 on row 1 only: slot 1's row of the grid is padded
    plan = RoutingPlan(((((0, 1.0),)), ((1, 1.0),), ((0, 1.0),)), order=(0, 1))
    num_tokens = 6  # two per row
    grid = build_grid(plan, num_tokens, frozenset({0, 1}), torch.device("cpu"))
    token = grid.token.view(len(grid.slots), -1)
    uses = {0: {0, 1, 4, 5}, 1: {2, 3}}
    assert grid.weight.eq(0).any()  # there is padding
    for d, slot in enumerate(grid.slots):
        assert set(token[d].tolist()) <= uses[slot], (slot, token[d].tolist())
