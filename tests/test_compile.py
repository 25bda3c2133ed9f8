"""torch.compile over a wrapped model: routing changes never recompile.

Torch backend: which adapters a request uses, their weights and mixtures, and which adapter sits in which slot are
Python data read by the patched layers' branch, which is excluded from compilation
(``torch.compiler.disable``). So once the compiled model has run, changing adapters, mixtures,
loading adapters into slots and evicting them compiles nothing new. The checks:
``torch._dynamo.config.error_on_recompile`` raises on any recompilation, a compile-counting backend
(``eager`` underneath) and dynamo's own ``unique_graphs`` counter stay where the first call left
them, and every compiled output equals the eager output of the same wrapper and a fresh wrapper's.

Triton backend: the patched layers are traced, and the graph holds one registered kernel op per
layer, taking the bank tables and the forward's lanes as inputs. Routing, weights and resident
adapters change only those inputs' values, so nothing recompiles once each kind of request has been
seen: forwards with and without adapters, and each power of two of adapters per row (the number of
expand passes is part of the graph).

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


def checker(both, pristine, saved, ids):
    """``check(spec, what)``: the compiled logits equal the same wrapper's eager ones bit for bit,
    and a fresh wrapper's (torch backend, every adapter loaded) within ATOL32."""
    fresh = lora_graph.wrap(copy.deepcopy(pristine))
    for name, path in saved.items():
        fresh.load_adapter(name, path)

    def check(spec, what):
        got, eager = both(spec)
        assert torch.equal(got, eager), f"{what}: compiled != eager"
        with torch.no_grad():
            want = fresh(input_ids=ids, adapters=spec).logits
        torch.testing.assert_close(got, want, atol=ATOL32, rtol=0, msg=lambda m: f"{what}: {m}")

    return check


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

    check = checker(both, pristine, saved, ids)

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


TRITON_SWITCHES = [
    ["b", "a", None], "a", [{"a": 0.5, "b": -1.0}, "a", "b"], ["b", "b", "b"], {"a": -1.0},
    [None, {"a": -0.25}, {"b": 3.0, "a": 1.0}], [{"b": 1.5}, None, None], {"a": 1.0, "b": 1.0},
]


def test_triton_layers_compile_into_the_graph_without_recompiling(pristine, saved):
    ids = token_ids(3, 5, seed=41)
    model = copy.deepcopy(pristine)
    lm = lora_graph.wrap(model, backend="triton", max_loaded=2, max_rank=16)
    lm.register_adapters(saved)
    lm.load_adapter("a")
    lm.load_adapter("b")
    torch._dynamo.reset()
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=backend)

    def both(spec):
        with lm.use(spec), torch.no_grad():
            return compiled(input_ids=ids).logits, model(input_ids=ids).logits

    for spec in ("a", {"a": 0.5, "b": 0.5}, None):  # one adapter per row, two, none: one graph each
        got, eager = both(spec)
        assert torch.equal(got, eager)
    frames = backend.frame_count
    patched = sum(isinstance(m, lora_graph.layers.LoraLinear) for m in model.modules())
    per_graph = [sum(n.target is torch.ops.lora_graph.lora_delta_.default for n in g.graph.nodes)
                 for g in backend.graphs]
    # every patched layer is in the graph as the kernel op: no graph break around the branch
    assert patched == len(TARGETS) * pristine.config.num_hidden_layers
    assert sorted(per_graph) == [0, patched, patched], per_graph

    check = checker(both, pristine, saved, ids)

    with torch._dynamo.config.patch(error_on_recompile=True):
        for i, spec in enumerate(TRITON_SWITCHES):
            check(spec, f"switch {i} {spec}")
        for cycle, names in enumerate([("c", "d"), ("e", "f"), ("h", "c")]):
            lm.load_adapter(names[0])  # evicts the least recently used
            check([names[0], {names[0]: 0.5, names[1]: -1.0}, names[1]], f"cycle {cycle} {names}")
        check(["a", "b", None], "a and b paged back in")
    assert backend.frame_count == frames, f"{backend.frame_count - frames} frames were compiled again"


def test_triton_embedding_and_linear_layers_compile_into_the_graph(tmp_path):
    """Gemma (embed_scale) with embedding and attention adapters: the embedding op is traced too.
    The embedding bank holds an r=4 and an r=2 adapter: the declared ``max_rank`` keeps it one
    slot-indexed storage, which traced layers read (without it each rank has its own, read by the
    eager branch: bank.py)."""
    pristine = tiny_model("gemma")
    paths = {
        "e": save_adapter(pristine, adapter_dir(tmp_path, "e"), target_modules=["embed_tokens", "q_proj", "v_proj"],
                          r=4, lora_alpha=8, seed=3),
        "f": save_adapter(pristine, adapter_dir(tmp_path, "f"), target_modules=["embed_tokens", "o_proj"], r=2,
                          lora_alpha=8, seed=4),
    }
    model = copy.deepcopy(pristine)
    lm = lora_graph.wrap(model, backend="triton", max_loaded=2, max_rank=4)
    for name, path in paths.items():
        lm.load_adapter(name, path)
    torch._dynamo.reset()
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=backend)
    ids = token_ids(2, 5, seed=42)
    fresh = lora_graph.wrap(copy.deepcopy(pristine))
    for name, path in paths.items():
        fresh.load_adapter(name, path)
    for i, spec in enumerate([["e", "f"], ["f", None], "e", [{"e": 0.5, "f": -2.0}, "f"]]):
        with lm.use(spec), torch.no_grad():
            got, eager = compiled(input_ids=ids).logits, model(input_ids=ids).logits
            want = fresh(input_ids=ids, adapters=spec).logits
        assert torch.equal(got, eager), spec
        torch.testing.assert_close(got, want, atol=ATOL32, rtol=0)
        if i == 0:
            ops = [n.target for g in backend.graphs for n in g.graph.nodes]
            assert ops.count(torch.ops.lora_graph.lora_embedding_delta.default) == 1
            assert ops.count(torch.ops.lora_graph.lora_delta_.default) == 3 * pristine.config.num_hidden_layers
    assert backend.frame_count == 2  # one adapter per row, then a weighted set of two


def test_triton_compiled_without_max_loaded_stays_correct(pristine, saved):
    """Without ``max_loaded`` the banks grow one by one: a layer whose bank is smaller than the
    forward's slot range takes the eager branch (a graph break), and results stay exact."""
    model = copy.deepcopy(pristine)
    lm = lora_graph.wrap(model, backend="triton")
    lm.load_adapter("a", saved["a"])  # every linear module: slot 0
    lm.load_adapter("c", saved["c"])  # the MLP only: slot 1, so the attention banks keep one slot
    torch._dynamo.reset()
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=backend)
    ids = token_ids(2, 4, seed=43)
    for spec in (["a", "c"], [{"a": 1.0, "c": -0.5}, None]):
        with lm.use(spec), torch.no_grad():
            assert torch.equal(compiled(input_ids=ids).logits, model(input_ids=ids).logits), spec
    ops = [n.target for g in backend.graphs for n in g.graph.nodes]
    assert torch.ops.lora_graph.lora_delta_.default in ops  # the MLP layers, whose banks are big enough, are traced


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_compiled_forwards_from_two_threads_at_once(pristine, saved, backend_name):
    """Two threads run the same compiled model at once, each inside its own ``use()`` with its own
    SPEC, over and over: every output is that SPEC's eager output (a fresh wrapper's), and nothing
    recompiles. The traced layers read their lanes per thread, so neither thread sees the other's.
    A hook after the wrapper's own makes each forward wait, once its routing is published, until
    the other thread's forward has published its own too: lanes shared between threads would then
    be read by the wrong forward.

    With the torch backend, whose branch runs outside the graph (a graph break per layer), dynamo
    itself sometimes recompiles the top-level frame once when two threads evaluate its guards at
    the same time ("runtime guards failed even though they passed during recompilation-reason
    analysis"): only its outputs are checked there. The triton backend's traced layers, whose lanes
    come per thread, are held to no recompilation."""
    import threading

    ids = token_ids(3, 5, seed=44)
    model = copy.deepcopy(pristine)
    lm = lora_graph.wrap(model, backend=backend_name, max_loaded=2, max_rank=16)
    lm.load_adapter("a", saved["a"])
    lm.load_adapter("b", saved["b"])
    fresh = lora_graph.wrap(copy.deepcopy(pristine))
    fresh.load_adapter("a", saved["a"])
    fresh.load_adapter("b", saved["b"])
    # per thread: SPECs of one kind each (one adapter per row; weighted sets of two)
    plans = {0: [["a", "b", None], [None, "a", "a"]], 1: [[{"a": 0.5, "b": -1.0}, "b", None], [{"b": 2.0, "a": 1.0}] * 3]}
    with torch.no_grad():
        want = {repr(s): fresh(input_ids=ids, adapters=s).logits for specs in plans.values() for s in specs}
    errors, start, published = [], threading.Barrier(2), threading.Barrier(2)

    @torch.compiler.disable
    def both_published(module, args, kwargs):
        if threading.current_thread() is not threading.main_thread():
            published.wait(timeout=60)

    hook = model.register_forward_pre_hook(both_published, with_kwargs=True)  # before compiling: no guard changes
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        for specs in plans.values():  # compile each kind once, in this thread
            for spec in specs:
                with lm.use(spec):
                    compiled(input_ids=ids)
    frames = counter.frame_count

    def run(specs):
        try:
            start.wait(timeout=60)
            for i in range(6):
                spec = specs[i % len(specs)]
                with lm.use(spec), torch.no_grad():
                    got = compiled(input_ids=ids).logits
                torch.testing.assert_close(got, want[repr(spec)], atol=ATOL32, rtol=0)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    with torch._dynamo.config.patch(error_on_recompile=backend_name == "triton"):
        threads = [threading.Thread(target=run, args=(specs,)) for specs in plans.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    hook.remove()
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    assert not errors, errors[0]
    if backend_name == "triton":
        assert counter.frame_count == frames, f"{counter.frame_count - frames} frames were compiled again"
