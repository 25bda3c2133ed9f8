"""Requests in one thread while another changes the adapters.

The wrapper's threading model (wrapper.py): one lock serialises registration, loading, paging,
replacing and unloading; forwards take no lock. A request resolves its names to slots when it
starts and holds those slots until it ends, so a replace or unload in another thread never changes
what a running request computes. These tests run that for real, each thread bounded in count and
joined with a timeout:
- a generate loop on mixed batches beside 200 loads, replaces and unloads of other adapters: every
  generate equals its single-threaded result, and neither thread raises;
- a generate paused after its first forward while another thread replaces or unloads the very
  adapter it uses: it finishes with the old weights, new requests see the change at once, and the
  old slot is freed when the generate ends;
- a load committed by another thread at the one moment a forward is between reading a bank's A
  and its B (torch releases the GIL inside every op, so that moment exists): the forward and the
  ones after it still compute the adapter they hold.
"""

from __future__ import annotations

import copy
import random
import sys
import threading
import time

import pytest
import torch
from helpers import adapter_dir, save_adapter, targets, tiny_model, token_ids

import lora_graph

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:peft")  # PEFT's notes on lora_bias adapters

ATOL32 = 1e-5
JOIN_S = 90
GEN = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True,
           return_dict_in_generate=True)
TARGETS = targets("llama")


@pytest.fixture(scope="module")
def pristine():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def saved(pristine, tmp_path_factory):
    """g0..g2 for the generate thread; o0..o5 in two versions each for the other thread, with
    ranks up to 16 so that their loads grow the banks the generate thread reads."""
    root = tmp_path_factory.mktemp("threading")
    paths = {
        "g0": save_adapter(pristine, adapter_dir(root, "g0"), seed=51, r=4, target_modules=TARGETS),
        "g1": save_adapter(pristine, adapter_dir(root, "g1"), seed=52, r=2, target_modules=targets("llama", "attn"),
                           lora_bias=True),
        "g2": save_adapter(pristine, adapter_dir(root, "g2"), seed=53, r=8, lora_alpha=4,
                           target_modules=targets("llama", "mlp"), use_rslora=True),
    }
    rng = random.Random(5)
    for i in range(6):
        for version in (1, 2):
            name = f"o{i}v{version}"
            paths[name] = save_adapter(pristine, adapter_dir(root, name), seed=60 + 2 * i + version,
                                       r=rng.choice([1, 3, 12, 16]), target_modules=rng.sample(TARGETS, 3))
    return paths


def generate(lm, ids, spec):
    with torch.no_grad():
        out = lm.generate(input_ids=ids, adapters=spec, **GEN)
    return out.sequences, torch.stack(out.logits)


def fresh(pristine, paths: dict[str, str]):
    lm = lora_graph.wrap(copy.deepcopy(pristine))
    for name, path in paths.items():
        lm.load_adapter(name, path)
    return lm


class Worker(threading.Thread):
    """A thread that keeps its exception for the test to raise."""

    def __init__(self, target):
        super().__init__(daemon=True)
        self._target_fn = target
        self.error: BaseException | None = None

    def run(self):
        try:
            self._target_fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            self.error = exc


def join(*workers):
    for worker in workers:
        worker.join(JOIN_S)
        assert not worker.is_alive(), f"a thread did not finish within {JOIN_S}s"
    for worker in workers:
        if worker.error is not None:
            raise worker.error


@pytest.fixture
def fine_switching():
    """Switch threads every 50 µs instead of 5 ms, so the two threads interleave more finely."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(5e-5)
    yield
    sys.setswitchinterval(before)


SPECS = [
    ["g0", "g1", None, {"g0": 0.5, "g2": -1.0}],
    ["g2", "g2", "g1", None],
    [{"g1": 1.0, "g2": 0.5, "g0": -0.5}, None, "g0", "g2"],
    "g1",
]


def test_generate_loop_beside_200_loads_replaces_and_unloads(pristine, saved, fine_switching):
    ids = [token_ids(4, 5, seed=20 + k) for k in range(len(SPECS))]
    single = fresh(pristine, {n: saved[n] for n in ("g0", "g1", "g2")})
    expected = [generate(single, ids[k], spec) for k, spec in enumerate(SPECS)]
    assert len({tuple(seq.flatten().tolist()) for seq, _ in expected}) == len(SPECS)

    lm = lora_graph.wrap(copy.deepcopy(pristine), max_loaded=6)
    for name in ("g0", "g1", "g2"):
        lm.load_adapter(name, saved[name])
    stop = threading.Event()
    first_done = threading.Event()
    mismatches: list[str] = []
    done = {"generate": 0, "ops": 0}

    def generate_loop():
        k = 0
        while k < 200 and (not stop.is_set() or k < 8):
            seq, lg = generate(lm, ids[k % len(SPECS)], SPECS[k % len(SPECS)])
            want_seq, want_lg = expected[k % len(SPECS)]
            if not torch.equal(seq, want_seq):
                mismatches.append(f"generate {k}: tokens {seq.tolist()} != {want_seq.tolist()}")
            elif not torch.allclose(lg, want_lg, atol=ATOL32, rtol=0):
                mismatches.append(f"generate {k}: logits differ by {(lg - want_lg).abs().max().item():.3g}")
            k += 1
            done["generate"] = k
            first_done.set()

    loaded: dict[str, str] = {}  # other adapter -> the version it holds

    def churn():
        rng = random.Random(11)
        first_done.wait(JOIN_S)
        try:
            for _ in range(200):
                name = f"o{rng.randrange(6)}"
                if name not in loaded:
                    version = rng.choice(("v1", "v2"))
                    lm.load_adapter(name, saved[name + version])
                    loaded[name] = version
                elif rng.random() < 0.5:
                    version = "v2" if loaded[name] == "v1" else "v1"
                    lm.load_adapter(name, saved[name + version], replace=True)
                    loaded[name] = version
                else:
                    lm.unload_adapter(name)
                    del loaded[name]
                done["ops"] += 1
                if rng.random() < 0.3:
                    time.sleep(0.001)
        finally:
            stop.set()

    workers = [Worker(generate_loop), Worker(churn)]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    join(*workers)
    assert not mismatches, mismatches[:5]
    assert done["ops"] == 200 and done["generate"] >= 8, done
    assert time.monotonic() - started < JOIN_S

    # the adapters the churn left behind serve exactly what their files say
    assert {n for n in lm.adapters if n.startswith("o")} == set(loaded)
    others = sorted(loaded)[:3]
    if others:
        spec = others + [None] * (4 - len(others))
        paths = {n: saved[n + loaded[n]] for n in others}
        with torch.no_grad():
            torch.testing.assert_close(lm(input_ids=ids[0], adapters=spec).logits,
                                       fresh(pristine, paths)(input_ids=ids[0], adapters=spec).logits,
                                       atol=ATOL32, rtol=0)


@pytest.fixture(scope="module")
def old_new(pristine, tmp_path_factory):
    root = tmp_path_factory.mktemp("versions")
    return {
        "old": save_adapter(pristine, adapter_dir(root, "old"), seed=71, r=4, lora_alpha=16,
                            target_modules=targets("llama", "mlp"), b_std=0.5),
        "new": save_adapter(pristine, adapter_dir(root, "new"), seed=72, r=8, lora_alpha=16,
                            target_modules=TARGETS, b_std=0.5),
        "side": save_adapter(pristine, adapter_dir(root, "side"), seed=73, r=2, target_modules=["q_proj"]),
        "big": save_adapter(pristine, adapter_dir(root, "big"), seed=74, r=16, target_modules=["q_proj", "v_proj"]),
    }


@pytest.mark.parametrize("op", ["replace", "unload"])
def test_change_while_a_generate_runs_in_another_thread(pristine, old_new, op):
    """The worker's generate pauses after its first forward; meanwhile the main thread replaces or
    unloads x. The worker finishes with the old x (tokens and every step's logits), while a new
    request in the main thread already sees the change; once the worker is done, x's old slot is
    free and, after an unload, the MLP modules only x targeted are the original objects again."""
    ids = token_ids(3, 5, seed=30)
    spec = ["x", None, {"x": -1.0, "side": 0.5}]
    want_old = generate(fresh(pristine, {"x": old_new["old"], "side": old_new["side"]}), ids, spec)
    want_new = generate(fresh(pristine, {"x": old_new["new"], "side": old_new["side"]}), ids, spec)
    assert not torch.equal(want_old[0], want_new[0])  # the two versions generate different tokens

    model = copy.deepcopy(pristine)
    mlp = {n: m for n, m in model.named_modules() if n.endswith(tuple(targets("llama", "mlp")))}
    lm = lora_graph.wrap(model, max_loaded=3)
    lm.load_adapter("x", old_new["old"])
    lm.load_adapter("side", old_new["side"])
    paused, resume = threading.Event(), threading.Event()
    state = {"forwards": 0, "ident": None}

    def pause(*_):
        if threading.get_ident() == state["ident"]:
            state["forwards"] += 1
            if state["forwards"] == 2:  # the prefill ran; the first decode step is about to
                paused.set()
                assert resume.wait(JOIN_S), "never resumed"

    hook = model.register_forward_pre_hook(pause)
    result = {}

    def run():
        state["ident"] = threading.get_ident()
        result["out"] = generate(lm, ids, spec)

    worker = Worker(run)
    worker.start()
    try:
        assert paused.wait(JOIN_S), "the generate did not start"
        if op == "replace":
            lm.load_adapter("x", old_new["new"], replace=True)
            with torch.no_grad():
                now = lm(input_ids=ids, adapters=spec).logits[:, -1]
            torch.testing.assert_close(now, want_new[1][0], atol=ATOL32, rtol=0)
        else:
            lm.unload_adapter("x")
            assert "x" not in lm.adapters and "x" not in lm.resident
            with pytest.raises(ValueError, match="'x'"):
                lm(input_ids=ids, adapters=spec)
        assert worker.is_alive()  # the change did not wait for the running request
    finally:
        resume.set()
        join(worker)
        hook.remove()
    seq, lg = result["out"]
    assert state["forwards"] == GEN["max_new_tokens"]
    assert torch.equal(seq, want_old[0])
    torch.testing.assert_close(lg, want_old[1], atol=ATOL32, rtol=0)

    # x's old slot is free: with three slots, two more adapters fit beside what is resident
    resident = set(lm.resident)
    assert resident == ({"x", "side"} if op == "replace" else {"side"})
    lm.load_adapter("extra", old_new["side"])
    if op == "unload":
        assert all(model.get_submodule(n) is m for n, m in mlp.items()), "x's modules were not restored"
        lm.load_adapter("extra2", old_new["side"])
    assert set(lm.resident) == resident | ({"extra"} if op == "replace" else {"extra", "extra2"})
    if op == "replace":
        torch.testing.assert_close(generate(lm, ids, spec)[1], want_new[1], atol=ATOL32, rtol=0)


def test_load_committed_while_a_forward_reads_the_bank(pristine, old_new, monkeypatch):
    """A forward of ``side`` (r=2 on q_proj, beside an r=8 adapter) reads q_proj's bank; right
    after it has gathered A, another thread loads an r=16 adapter into the same bank, which adds
    a storage of that rank (each rank has its own). The scheduling
    point is made deterministic by a wrapper around ``Tensor.index_select`` that runs the other
    thread to completion there; without it the same interleaving happens when the GIL is handed
    over inside index_select. The running forward and the next ones must still give ``side``'s
    logits."""
    ids = token_ids(2, 4, seed=31)
    spec = ["side", None]
    with torch.no_grad():
        want = fresh(pristine, {"side": old_new["side"]})(input_ids=ids, adapters=spec).logits
    lm = lora_graph.wrap(copy.deepcopy(pristine))
    lm.load_adapter("side", old_new["side"])
    lm.load_adapter("x", old_new["new"])  # r=8, a second slot: the forward gathers its own slot
    bank = lm.model.get_submodule("model.layers.0.self_attn.q_proj").bank
    original = torch.Tensor.index_select
    interleaved = []

    def index_select(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if any(self is c.factors.a for c in bank.state.classes) and not interleaved:
            interleaved.append(True)
            loader = Worker(lambda: lm.load_adapter("big", old_new["big"]))
            loader.start()
            join(loader)
        return out

    monkeypatch.setattr(torch.Tensor, "index_select", index_select)
    results = []
    for _ in range(2):
        with torch.no_grad():
            results.append(lm(input_ids=ids, adapters=spec).logits)
    assert interleaved and "big" in lm.resident
    for i, got in enumerate(results):
        torch.testing.assert_close(got, want, atol=ATOL32, rtol=0, msg=lambda m: f"forward {i}: {m}")
