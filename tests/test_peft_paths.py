"""Which PEFT computation lora_graph reproduces, path by path.

- A weighted set ``{a: w_a, b: w_b}`` is PEFT's ``add_weighted_adapter(combination_type="cat")``
  (the factors concatenated, rank r_a + r_b), negative weights, different ranks and rsLoRA included.
- In bf16, a batch of one adapter (and base rows) equals PEFT's one-adapter-per-forward path
  (``set_adapter``) bit for bit: both add the fp32 branch to the bf16 base output and round once.
  PEFT's ``adapter_names`` mixed path rounds the branch to bf16 before adding it, so it is a few
  bf16 ulps away from both.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import ARCHS, adapter_dir, peft_oracle, peft_rows, save_adapter, targets, tiny_model, token_ids

import lora_graph

WEIGHTS = {"a": 0.7, "b": -1.3}


def two_adapters(model, arch, root) -> dict[str, str]:
    """r=4 on every linear target, and r=8 rsLoRA on attention only."""
    return {
        "a": save_adapter(model, adapter_dir(root, "a"), seed=11, r=4, lora_alpha=8, target_modules=targets(arch)),
        "b": save_adapter(model, adapter_dir(root, "b"), seed=12, r=8, lora_alpha=16, use_rslora=True,
                          target_modules=targets(arch, "attn")),
    }


def wrapped(model, adapters: dict[str, str]):
    lm = lora_graph.wrap(copy.deepcopy(model), progress=False)
    for name, path in adapters.items():
        lm.load_adapter(name, path)
    return lm


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_a_weighted_set_is_peft_cat_combination(arch, tmp_path):
    model = tiny_model(arch)
    adapters = two_adapters(model, arch, tmp_path)
    peft = peft_oracle(model, adapters)
    peft.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), "blend", combination_type="cat")
    peft.set_adapter("blend")
    ids = token_ids(3, 9, seed=2)
    lm = wrapped(model, adapters)
    with torch.no_grad():
        want = peft(input_ids=ids).logits
        got = lm(input_ids=ids, adapters=WEIGHTS).logits
        base = lm(input_ids=ids).logits
    assert (want - base).abs().max() > 0.1  # the blend moves the logits well past the tolerance
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_bf16_rows_are_peft_set_adapter_bit_for_bit(arch, tmp_path):
    """One adapter (with base rows beside it) per batch: PEFT's set_adapter path to the bit. With
    several adapters in one batch the grouped GEMMs sum in another order than PEFT's one GEMM per
    adapter, which can move a logit by one bf16 ulp; PEFT's own mixed path rounds twice."""
    adapters = two_adapters(tiny_model(arch), arch, tmp_path)
    model = tiny_model(arch, dtype=torch.bfloat16)
    peft = peft_oracle(model, adapters)
    lm = wrapped(model, adapters)
    for names in (["b", "__base__", "b"], ["a", "a", "__base__"], ["a", "b", "__base__", "a"]):
        ids = token_ids(len(names), 9, seed=3)
        per_adapter = peft_rows(peft, names, input_ids=ids)
        with torch.no_grad():
            got = lm(input_ids=ids, adapters=[None if n == "__base__" else n for n in names]).logits
        assert got.dtype == torch.bfloat16
        if len(set(names) - {"__base__"}) == 1:
            assert torch.equal(got, per_adapter), names
        else:
            for i in range(len(names)):
                ulp = 2.0 ** (math.floor(math.log2(per_adapter[i].float().abs().max().item())) - 7)
                torch.testing.assert_close(got[i].float(), per_adapter[i].float(), atol=ulp, rtol=0)
