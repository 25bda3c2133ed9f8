"""torch.compile over a wrapped model: routing stays outside the graph.

Which adapters a request uses, their weights and mixtures, and which adapter sits in which slot are
Python data read by the patched layers' branch, which is excluded from compilation
(``torch.compiler.disable``). So once the compiled model has run, changing adapters, mixtures,
loading adapters into slots and evicting them compiles nothing new. The checks:
``torch._dynamo.config.error_on_recompile`` raises on any recompilation, a compile-counting backend
(``eager`` underneath) and dynamo's own ``unique_graphs`` counter stay where the first call left
them, and every compiled output equals the eager output of the same wrapper and a fresh wrapper's.

Not covered: loading an adapter that targets a module no adapter targeted before the first call
swaps that module for a patched one, which changes the model's structure and so legitimately
recompiles. The adapters here target modules the first ones already cover.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from helpers import adapter_dir, save_adapter, targets, tiny_model, token_ids
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import lora_graph

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:peft")

ATOL32 = 1e-5
TARGETS = targets("llama")


@pytest.fixture(scope="module")
def pristine():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def saved(pristine, tmp_path_factory):
    """a, b resident before the first call (a covers every linear module); c..h are paged in later,
    with other ranks (up to 16, so the banks grow) and target subsets."""
    root = tmp_path_factory.mktemp("compile")
    specs = {
        "a": dict(r=4, target_modules=TARGETS),
        "b": dict(r=2, target_modules=targets("llama", "attn"), lora_bias=True),
        "c": dict(r=8, target_modules=targets("llama", "mlp"), use_rslora=True),
        "d": dict(r=16, target_modules=["q_proj", "down_proj"]),
        "e": dict(r=1, target_modules=["v_proj"]),
        "f": dict(r=12, target_modules=TARGETS, rank_pattern={"o_proj": 3}),
        "g": dict(r=3, target_modules=["k_proj", "up_proj"], lora_bias=True),
        "h": dict(r=6, target_modules=["gate_proj"]),
    }
    return {n: save_adapter(pristine, adapter_dir(root, n), seed=80 + i, **kw)
            for i, (n, kw) in enumerate(specs.items())}


SWITCHES = [
    "a", "b", None, ["a", "b", None], [{"a": 0.5, "b": -1.0}, "a", "b"], {"a": 2.0},
    ["b", "b", "b"], [None, {"a": -0.25}, {"b": 3.0, "a": 1.0}], "a", [{"b": 1.5}, None, None],
    {"a": 1.0, "b": 1.0}, ["a", "a", "b"], [None, "a", {"a": 0.5, "b": 0.5}], "b", ["b", None, "a"],
    {"b": -2.0}, [{"a": 0.125}, {"b": 0.125}, {"a": 1.0, "b": -1.0}], "a", [None, None, "b"], {"a": -1.0},
]


def test_adapter_changes_and_paging_do_not_recompile(pristine, saved):
    ids = token_ids(3, 6, seed=40)
    model = copy.deepcopy(pristine)
    lm = lora_graph.wrap(model, max_loaded=2)
    lm.register_adapters(saved)
    lm.load_adapter("a")
    lm.load_adapter("b")
    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=backend)

    def both(spec):
        """(compiled, eager) logits of the same wrapper under ``spec``."""
        with lm.use(spec), torch.no_grad():
            return compiled(input_ids=ids).logits, model(input_ids=ids).logits

    first, eager = both(["a", {"a": 0.5, "b": 1.0}, None])
    assert torch.equal(first, eager)
    frames, graphs = backend.frame_count, counters["stats"]["unique_graphs"]
    assert frames >= 1 and graphs >= 1

    fresh = lora_graph.wrap(copy.deepcopy(pristine))
    for name, path in saved.items():
        fresh.load_adapter(name, path)

    def check(spec, what):
        got, eager = both(spec)
        assert torch.equal(got, eager), f"{what}: compiled != eager"
        with torch.no_grad():
            want = fresh(input_ids=ids, adapters=spec).logits
        torch.testing.assert_close(got, want, atol=ATOL32, rtol=0, msg=lambda m: f"{what}: {m}")

    with torch._dynamo.config.patch(error_on_recompile=True):
        for i, spec in enumerate(SWITCHES):
            check(spec, f"switch {i} {spec}")
        for cycle, names in enumerate([("c", "d"), ("e", "f"), ("g", "h"), ("c", "f"), ("d", "e")]):
            before = set(lm.resident)
            lm.load_adapter(names[0])  # evicts the least recently used
            check([names[0], {names[0]: 0.5, names[1]: -1.0}, names[1]], f"cycle {cycle} {names}")
            assert len(lm.resident) <= 2 and before - set(lm.resident), f"cycle {cycle}: nothing was evicted"
        check(["a", "b", None], "a and b paged back in")
        with torch.no_grad():  # no SPEC at all: the base model
            assert torch.equal(compiled(input_ids=ids).logits, pristine(input_ids=ids).logits)
    assert torch._dynamo.config.error_on_recompile is False
    assert backend.frame_count == frames, f"{backend.frame_count - frames} frames were compiled again"
    assert counters["stats"]["unique_graphs"] == graphs
