"""backend="triton" through whole models, in Triton's interpreter, against PEFT and merged weights;
and how backends are chosen.

conftest.py sets TRITON_INTERPRET=1 before triton is imported, so the grouped kernels run on CPU
tensors. The oracles are the same as for the torch path: PEFT's per-row logits for mixed batches,
and a copy of the model with ``W + Σ w·s·B·A`` merged in for weighted sets.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lora_graph
from helpers import digest, make_adapters, merged_copy, peft_oracle, peft_rows, tiny_model, token_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request, tmp_path_factory):
    arch = request.param
    model = tiny_model(arch)
    paths = make_adapters(model, arch, tmp_path_factory.mktemp(arch))
    return arch, model, paths


def _wrapped(model, paths, backend):
    import copy

    lm = lora_graph.wrap(copy.deepcopy(model), backend=backend)
    for name, path in paths.items():
        lm.load_adapter(name, path)
    return lm


@torch.no_grad()
def test_triton_mixed_batch_matches_peft(setup):
    arch, model, paths = setup
    lm = _wrapped(model, paths, "triton")
    assert lm.backend == "triton"
    ids = token_ids(4, 6)
    names = ["a", "__base__", "c", "b"]
    got = lm(input_ids=ids, adapter_names=names).logits
    want = peft_rows(peft_oracle(model, paths), names, input_ids=ids)
    assert (got - want).abs().max().item() <= 1e-4
    # the base row is the base model, bit for bit
    assert torch.equal(got[1], model(input_ids=ids).logits[1])


@torch.no_grad()
def test_triton_weighted_set_matches_merged(setup):
    arch, model, paths = setup
    weights = {"a": 0.5, "b": -1.0, "c": 2.0}
    lm = _wrapped(model, paths, "triton")
    ids = token_ids(3, 5, seed=1)
    got = lm(input_ids=ids, adapters=[weights, None, "b"]).logits
    merged = merged_copy(model, paths, weights)
    assert (got[0] - merged(input_ids=ids).logits[0]).abs().max().item() <= 1e-4
    torch_lm = _wrapped(model, paths, "torch")
    assert (got - torch_lm(input_ids=ids, adapters=[weights, None, "b"]).logits).abs().max().item() <= 1e-5


@torch.no_grad()
def test_triton_generate_rows_match_alone(setup):
    arch, model, paths = setup
    before = digest(model)
    lm = _wrapped(model, paths, "triton")
    ids = token_ids(3, 4, seed=2)
    spec = ["a", {"b": 0.5, "c": -1.0}, None]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    together = lm.generate(input_ids=ids, adapters=spec, **kw)
    for i, row in enumerate(spec):
        alone = lm.generate(input_ids=ids[i : i + 1], adapters=row, **kw)
        assert torch.equal(together[i], alone[0])
    lm.unwrap()
    assert digest(model) == before


def test_auto_picks_torch_on_cpu():
    assert lora_graph.wrap(tiny_model("llama"), backend="auto").backend == "torch"


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="'cuda'"):
        lora_graph.wrap(tiny_model("llama"), backend="cuda")


def test_triton_without_interpreter_on_cpu_fails_clearly():
    code = textwrap.dedent(
        """
        import os, sys
        os.environ.pop("TRITON_INTERPRET", None)
        sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
        from helpers import tiny_model
        import lora_graph
        model = tiny_model("llama")
        assert lora_graph.wrap(model, backend="auto").backend == "torch"
        lora_graph.wrap(model.__class__(model.config), backend="triton")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-P", "-c", code, ROOT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "RuntimeError: backend='triton' needs a CUDA model" in proc.stderr
