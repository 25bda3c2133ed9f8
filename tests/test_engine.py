"""The continuous-batching engine (lora_graph.serve.engine) on the shipped demo model.

The oracle is ``lm.generate`` on the same prompt alone with the same SPEC (greedy). Checked: a
batch over the four adapters, a weighted set and the base; a request that joins while others decode
gets its first token before they finish; adapters beyond ``max_loaded`` wait instead of failing; a
cancelled request frees its slots; seeds make sampling reproducible whatever the batch; and a
wrapped model's own ``generate_batch`` refuses rather than generating with the base.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lora_graph
from lora_graph import demo
from lora_graph.serve import Engine, QueueFull

SPECS = ["upper", "reverse", "shift", "double", None, {"upper": 1.0, "shift": 0.5}, {"reverse": 2.0, "double": -0.5}]
WORDS = ["weight", "python", "lora", "banana"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(demo.base_path())


def demo_lm(**wrap_kwargs):
    model = AutoModelForCausalLM.from_pretrained(demo.base_path(), dtype=torch.float32).eval()
    lm = lora_graph.wrap(model, **wrap_kwargs)
    lm.register_adapters(demo.adapter_paths())
    return lm


@pytest.fixture(scope="module")
def lm():
    lm = demo_lm()
    for name in demo.adapter_paths():
        lm.load_adapter(name)
    return lm


def ids(tokenizer, word: str) -> list[int]:
    return tokenizer(demo.prompt(word))["input_ids"]


def alone(lm, tokenizer, word: str, spec, max_new_tokens: int) -> list[int]:
    """lm.generate on the prompt alone, cut after the end token as the engine stops there."""
    prompt = torch.tensor([ids(tokenizer, word)])
    with torch.no_grad():
        out = lm.generate(input_ids=prompt, adapters=spec, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, prompt.shape[1]:].tolist()
    eos = lm.model.generation_config.eos_token_id
    return new[: new.index(eos) + 1] if eos in new else new


def test_generate_batch_equals_generate_alone(lm, tokenizer):
    pairs = [(w, s) for w in WORDS for s in SPECS]
    got = lm.generate_batch([ids(tokenizer, w) for w, _ in pairs], adapters=[s for _, s in pairs], max_new_tokens=14)
    for (word, spec), tokens in zip(pairs, got):
        assert tokens == alone(lm, tokenizer, word, spec, 14), (word, spec)
    upper = got[pairs.index(("weight", "upper"))]
    assert tokenizer.decode(upper).strip() == "WEIGHT"  # the adapter really ran


def test_a_request_joining_gets_its_first_token_before_the_others_finish(lm, tokenizer):
    with Engine(lm) as engine:
        long = [engine.submit(ids(tokenizer, "abcdefghij"), "double", max_new_tokens=40) for _ in range(3)]
        deadline = time.time() + 60
        while not all(r.tokens for r in long):  # they are decoding
            assert time.time() < deadline
            time.sleep(0.01)
        late = engine.submit(ids(tokenizer, "lora"), "upper", max_new_tokens=6)
        late.done.wait(60)
        assert late.first_token is not None
        assert not all(r.done.is_set() for r in long), "the late request waited for the others to finish"
        assert all(late.first_token < (r.done.wait(60) and time.perf_counter()) for r in long)
        assert engine.stats()["batch_size_peak"] >= 4
    assert late.result() == alone(lm, tokenizer, "lora", "upper", 6)


def test_adapters_beyond_max_loaded_wait_their_turn(tokenizer):
    lm = demo_lm(max_loaded=2)
    resident = []
    pairs = [(w, s) for w in WORDS[:2] for s in ["upper", "reverse", "shift", "double", {"shift": 1.0, "double": 1.0}]]
    with Engine(lm) as engine:
        watcher = threading.Thread(target=lambda: [resident.append(len(lm.resident)) or time.sleep(0.005)
                                                   for _ in range(400)], daemon=True)
        watcher.start()
        requests = [engine.submit(ids(tokenizer, w), s, max_new_tokens=10) for w, s in pairs]
        results = [r.result(120) for r in requests]
        watcher.join()
    assert max(resident) <= 2
    for (word, spec), tokens in zip(pairs, results):
        assert tokens == alone(lm, tokenizer, word, spec, 10), (word, spec)


def test_bad_requests_fail_alone(tokenizer):
    lm = demo_lm(max_loaded=2)
    with Engine(lm, max_queue=3) as engine:
        with pytest.raises(ValueError, match="'nope'"):
            engine.submit(ids(tokenizer, "lora"), "nope")
        too_many = engine.submit(ids(tokenizer, "lora"), {"upper": 1.0, "shift": 1.0, "double": 1.0})
        fine = engine.submit(ids(tokenizer, "lora"), "upper", max_new_tokens=6)
        with pytest.raises(ValueError, match="max_loaded=2"):
            too_many.result(60)
        assert too_many.finish_reason == "error"
        assert fine.result(60) == alone(lm, tokenizer, "lora", "upper", 6)
        lm.pin("upper")
        lm.pin("reverse")  # both slots pinned: requests for shift wait in the queue
        waiting = [engine.submit(ids(tokenizer, "lora"), "shift", max_new_tokens=4) for _ in range(3)]
        with pytest.raises(QueueFull, match="max_queue=3"):
            engine.submit(ids(tokenizer, "lora"), "shift")
        lm.unpin("reverse")
        assert [r.result(60) for r in waiting] == [alone(lm, tokenizer, "lora", "shift", 4)] * 3


def test_cancel_frees_the_request_and_its_slots(tokenizer):
    lm = demo_lm(max_loaded=1)
    with Engine(lm) as engine:
        long = engine.submit(ids(tokenizer, "abcdefghij"), "double", max_new_tokens=200)
        while not long.tokens:
            time.sleep(0.01)
        long.cancel()
        assert long.done.is_set() and long.finish_reason == "cancelled"
        other = engine.submit(ids(tokenizer, "lora"), "upper", max_new_tokens=6)  # needs double's slot
        assert other.result(60) == alone(lm, tokenizer, "lora", "upper", 6)
    assert lm.resident == ("upper",)


def test_seeded_sampling_does_not_depend_on_the_batch(lm, tokenizer):
    """A blend the demo never trained on is unsure of its letters, so sampling shows."""
    prompt, blend = ids(tokenizer, "python"), {"upper": 0.5, "shift": 0.5}
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=0.95)
    alone_ = lm.generate_batch([prompt], adapters=[blend], seed=7, **kwargs)[0]
    crowd = lm.generate_batch([prompt] + [ids(tokenizer, w) for w in WORDS], adapters=[blend, "upper", None,
                                                                                       "shift", "double"],
                              seed=7, **kwargs)[0]
    assert crowd == alone_
    others = {tuple(lm.generate_batch([prompt], adapters=[blend], seed=s, **kwargs)[0]) for s in range(8, 12)}
    greedy = alone(lm, tokenizer, "python", blend, 8)
    assert len(others | {tuple(greedy)}) > 2, "sampling gave one answer whatever the seed"


def test_a_wrapped_models_own_continuous_batching_refuses(lm, tokenizer):
    """transformers runs generate_batch in a thread of its own, which use() does not reach: it
    would answer with the base model. Through lora_graph it refuses instead, inside use() too."""
    with pytest.raises(RuntimeError, match="lm.generate_batch"):
        lm.model.generate_batch([ids(tokenizer, "weight")])
    with lm.use("upper"), pytest.raises(RuntimeError, match="lm.generate_batch"):
        lm.model.generate_batch([ids(tokenizer, "weight")])
    with pytest.raises(RuntimeError, match="lm.generate_batch"):
        lm.model.init_continuous_batching()


def test_run_computes_in_the_calling_thread_until_stopped(tokenizer):
    """``Engine.run`` runs the steps in its caller's thread (the fast way on CPU); a request
    submitted from another thread is answered, ``stop`` from there ends ``run``, and the threads
    that page adapters in and hand tokens out run their tensor ops without an OpenMP pool."""
    from lora_graph.serve.engine import Recorder

    seen: dict = {"steps": set()}

    class Watch(Recorder):
        def step(self, batch_size):
            seen["steps"].add(threading.current_thread().name)

        def adapter_load(self, seconds):  # the admission thread, after paging "reverse" in
            seen["admit"] = torch.get_num_threads()

        def finished(self, request):  # the dispatch thread
            seen["dispatch"] = torch.get_num_threads()

    lm = demo_lm()  # registered, not resident: the request pages its adapter in
    engine = Engine(lm, recorder=Watch()).start(steps=False)

    def client():
        try:
            seen["tokens"] = engine.submit(ids(tokenizer, "lora"), "reverse", max_new_tokens=8).result(60)
        finally:
            engine.stop()

    threading.Thread(target=client).start()
    runner = threading.Thread(target=engine.run, name="steps")
    runner.start()
    runner.join(60)
    assert not runner.is_alive(), "run() did not return after stop()"
    assert seen["tokens"] == alone(lm, tokenizer, "lora", "reverse", 8)
    assert seen["steps"] == {"steps"}
    if torch.get_num_threads() > 1 and _omp_found():
        assert seen["admit"] == seen["dispatch"] == 1
    with pytest.raises(RuntimeError, match="stopped"):
        engine.start()


def _omp_found() -> bool:
    from lora_graph.serve.omp import _runtime

    return _runtime() is not None


def test_single_threaded_ops_changes_only_the_calling_thread():
    from lora_graph.serve.omp import single_threaded_ops

    before, seen = torch.get_num_threads(), {}

    def helper():
        seen["took"] = single_threaded_ops()
        seen["threads"] = torch.get_num_threads()
        x = torch.randn(512, 512)
        seen["sum"] = float((x @ x).sum())  # still computes

    thread = threading.Thread(target=helper)
    thread.start()
    thread.join()
    if before > 1 and seen["took"]:
        assert seen["threads"] == 1
    assert torch.get_num_threads() == before
    assert seen["sum"] == seen["sum"]  # not NaN


def test_an_interrupted_run_leaves_the_model_as_it_was(tokenizer):
    """Ctrl-C in ``run`` (here a KeyboardInterrupt raised inside a step) ends it; ``stop`` then
    gives an eager model its attention implementation back, which continuous batching swaps."""
    from lora_graph.serve.engine import Recorder

    model = AutoModelForCausalLM.from_pretrained(demo.base_path(), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    lm = lora_graph.wrap(model)
    lm.load_adapter("upper", demo.adapter_paths()["upper"])

    class Interrupt(Recorder):
        def step(self, batch_size):
            raise KeyboardInterrupt

    engine = Engine(lm, recorder=Interrupt()).start(steps=False)
    assert model.config._attn_implementation == "paged|eager"  # what the batching manager needs
    request = engine.submit(ids(tokenizer, "lora"), "upper", max_new_tokens=4)
    with pytest.raises(KeyboardInterrupt):
        engine.run()
    engine.stop()
    assert request.finish_reason == "cancelled"
    assert model.config._attn_implementation == "eager"
    assert lm.generate_batch([ids(tokenizer, "lora")], adapters=["upper"], max_new_tokens=6)[0] == \
        alone(lm, tokenizer, "lora", "upper", 6)
