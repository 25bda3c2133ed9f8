"""Where users already are: PEFT's and transformers' names on the wrapper, threads, pipelines,
pickle, notebook habits and the CLI's errors. Each check fails on a wrapper that answers the way a
plain transformers model with PEFT's integration, or a naive wrapper, would.

The oracle for routing is ``lm(...)`` with an explicit SPEC on the same inputs (itself held to PEFT
elsewhere); the demo model and its adapters are the fixtures.
"""

from __future__ import annotations

import contextvars
import logging
import pickle
import re
import subprocess
import sys
import threading
import warnings

import pytest
import torch
from transformers import AutoTokenizer, TextIteratorStreamer, pipeline

import lora_graph
from helpers import demo_lm
from lora_graph import demo


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(demo.base_path())


@pytest.fixture()
def lm():
    return demo_lm()


def ids(tokenizer, word="weight"):
    return tokenizer([demo.prompt(word)], return_tensors="pt")["input_ids"]


def logits(lm_or_model, input_ids, **kwargs):
    with torch.no_grad():
        return lm_or_model(input_ids=input_ids, **kwargs).logits


# -- PEFT's names --------------------------------------------------------------------------------------


def test_set_adapter_is_the_default_spec(lm, tokenizer):
    x = ids(tokenizer)
    base, upper = logits(lm.model, x), logits(lm, x, adapters="upper")
    assert lm.active_adapters() == []
    lm.set_adapter("upper")
    assert lm.active_adapters() == ["upper"]
    assert torch.equal(logits(lm, x), upper)  # a call without adapters
    assert torch.equal(logits(lm.model, x), upper)  # a plain forward outside use()
    assert torch.equal(logits(lm, x, adapters=None), base)  # an explicit SPEC wins
    with lm.use(None):
        assert torch.equal(logits(lm.model, x), base)
    with lm.disable_adapter():
        assert torch.equal(logits(lm.model, x), base)
    assert torch.equal(logits(lm.model, x), upper)
    lm.disable_adapters()
    assert torch.equal(logits(lm.model, x), base)
    lm.enable_adapters()
    assert torch.equal(logits(lm.model, x), upper)
    lm.set_adapter({"upper": 1.0, "shift": 0.5})
    assert lm.active_adapters() == ["shift", "upper"]
    assert torch.equal(logits(lm, x), logits(lm, x, adapters={"upper": 1.0, "shift": 0.5}))
    lm.set_adapter(None)
    assert torch.equal(logits(lm, x), base) and lm.active_adapters() == []


def test_the_default_holds_its_slots_and_goes_with_its_adapter(tokenizer):
    lm = demo_lm(max_loaded=1)
    lm.set_adapter("shift")
    with pytest.raises(RuntimeError, match="pinned or held"):
        lm.load_adapter("upper")  # the only slot is the default's
    lm.delete_adapter("shift")  # PEFT's name for unload_adapter; the default goes with it
    assert lm.active_adapters() == [] and "shift" not in lm.adapters
    lm.load_adapter("upper")
    assert lm.resident == ("upper",)
    with pytest.raises(ValueError, match="'nope'"):
        lm.set_adapter("nope")
    lm.delete_adapter(["upper", "reverse"])
    assert set(lm.adapters) == {"double"}


@pytest.mark.parametrize("method, args, instead", [
    ("load_adapter", ("some/peft/dir",), "lm.load_adapter(name, path)"),
    ("add_adapter", (None,), "lm.load_adapter"),
    ("set_adapter", ("upper",), "lm.set_adapter"),
    ("active_adapters", (), "lm.active_adapters()"),
    ("disable_adapters", (), "lm.disable_adapters()"),
    ("enable_adapters", (), "lm.enable_adapters()"),
    ("delete_adapter", ("upper",), "lm.delete_adapter"),
    ("get_adapter_state_dict", (), "lm.adapters[name].path"),
    ("generate_batch", ([[1, 2]],), "lm.generate_batch"),
])
def test_transformers_peft_methods_on_the_model_refuse_and_name_the_equivalent(lm, method, args, instead):
    with pytest.raises(RuntimeError, match=re.escape(f"{method}() does not apply") + ".*" + re.escape(instead)):
        getattr(lm.model, method)(*args)
    lm.unwrap()
    assert "does not apply" not in repr(getattr(lm.model, method))  # the model's own method is back


# -- threads -----------------------------------------------------------------------------------------


def test_a_thread_started_in_use_warns_and_copy_context_carries_the_spec(lm, tokenizer):
    """HF's streaming recipe starts generate in a thread inside ``use()``: a ContextVar does not
    reach it. The first such forward warns; starting the thread in a copy of the context routes it."""
    x = ids(tokenizer)
    with torch.no_grad():
        want = lm.generate(input_ids=x, adapters="upper", max_new_tokens=8, do_sample=False)
        base = lm.model.generate(input_ids=x, max_new_tokens=8, do_sample=False)

    def stream(carry: bool):
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
        kwargs = dict(input_ids=x, max_new_tokens=8, do_sample=False, streamer=streamer)
        with warnings.catch_warnings(record=True) as caught, lm.use("upper"):
            warnings.simplefilter("always")
            if carry:  # the recipe the warning gives: the block's context, copied here, runs the thread
                thread = threading.Thread(target=contextvars.copy_context().run, args=(lm.model.generate,),
                                          kwargs=kwargs)
            else:  # HF's recipe
                thread = threading.Thread(target=lm.model.generate, kwargs=kwargs)
            thread.start()
            text = "".join(streamer)
            thread.join(60)
        return text, [w for w in caught if "does not inherit" in str(w.message)]

    text, warned = stream(carry=False)
    assert text.strip() == tokenizer.decode(base[0, x.shape[1]:], skip_special_tokens=True).strip()
    assert len(warned) == 1
    text, warned = stream(carry=True)
    assert text.strip() == tokenizer.decode(want[0, x.shape[1]:], skip_special_tokens=True).strip() == "WEIGHT"
    assert not warned


def test_requests_racing_unload_get_the_unknown_adapter_error(tokenizer):
    """A request checks its adapter's name under the wrapper's lock: racing unload_adapter, it runs
    or gets "unknown adapter", never a bare KeyError."""
    lm = demo_lm()
    x = ids(tokenizer)
    stop, failures, served = threading.Event(), [], [0]

    def requests():
        while not stop.is_set():
            try:
                logits(lm, x, adapters="reverse")
                served[0] += 1
            except ValueError as exc:
                if "unknown adapter 'reverse'" not in str(exc):
                    failures.append(exc)
            except Exception as exc:  # noqa: BLE001 - what the test is about
                failures.append(exc)

    thread = threading.Thread(target=requests)
    thread.start()
    for _ in range(40):
        lm.unload_adapter("reverse")
        lm.register_adapter("reverse", demo.adapter_paths()["reverse"])
    stop.set()
    thread.join(60)
    assert not failures, failures[:3]
    assert served[0] > 0


def test_a_first_request_in_inference_mode_leaves_the_banks_writable(tokenizer):
    lm = demo_lm(max_loaded=2)
    with torch.inference_mode():
        lm(input_ids=ids(tokenizer), adapters="upper")  # creates the banks
    lm.load_adapter("reverse")
    lm.load_adapter("shift")  # evicts and writes a slot outside inference mode
    assert torch.equal(logits(lm, ids(tokenizer), adapters="shift"),
                       logits(lora_graph.wrap(demo_lm().model), ids(tokenizer), adapters="shift"))


# -- ecosystem -----------------------------------------------------------------------------------------


def test_pipelines_take_the_wrapper_without_complaint(lm, tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        generator = pipeline("text-generation", model=lm, tokenizer=tokenizer)
    assert not [r for r in caplog.records if "not supported" in r.getMessage()]
    with lm.use("reverse"):
        out = generator(demo.prompt("weight"), max_new_tokens=8, do_sample=False)
    assert out[0]["generated_text"].startswith("weight=thgiew")
    assert type(lm) is lora_graph.LoraGraph and isinstance(lm, lora_graph.LoraGraph)


def test_pickle_and_deepcopy_say_what_to_do(lm):
    for target in (lm.model, lm):
        with pytest.raises(TypeError, match="cannot be pickled.*before wrap\\(\\) or after unwrap\\(\\)"):
            pickle.dumps(target)
    model = lm.unwrap()
    assert pickle.loads(pickle.dumps(model)).config.vocab_size == model.config.vocab_size


def test_rerunning_notebook_cells(lm, tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger="lora_graph"):
        again = lora_graph.wrap(lm.model)
    assert again is lm and any("already wrapped" in r.getMessage() for r in caplog.records)
    path = demo.adapter_paths()["upper"]
    first = lm.load_adapter("upper", path)
    assert lm.load_adapter("upper", path) == first  # the same files: nothing to do
    with pytest.raises(ValueError, match="already registered"):
        lm.load_adapter("upper", demo.adapter_paths()["reverse"])  # other files still need replace=True


def test_the_cli_prints_one_line_for_a_library_error():
    proc = subprocess.run([sys.executable, "-m", "lora_graph.cli", "demo", "--backend", "triton"], text=True,
                          capture_output=True, timeout=300, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lora-graph")]
    assert proc.returncode == 2
    assert len(lines) == 1 and "needs a CUDA model" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
