"""The OpenAI-compatible server (lora_graph.serve.app), run for real: uvicorn on 127.0.0.1 and a free
port in a thread of the test process, talked to with the official ``openai`` client (and httpx where
the client cannot say it: a dropped connection, raw headers).

The oracle is ``lm.generate`` on the same prompt alone with the same SPEC (greedy), through the
same tokenizer. Every loop is bounded in count and time.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import socket
import threading
import time

import httpx2 as httpx
import openai
import pytest
import torch
import uvicorn
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import DEMO_ID as MODEL_ID
from helpers import adapter_dir, demo_lm, save_adapter, serving
from lora_graph import demo


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(demo.base_path())


@pytest.fixture(scope="module")
def lm():
    return demo_lm()


@pytest.fixture(scope="module")
def server(lm, tokenizer):
    with serving(lm, tokenizer) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def expected(lm, tokenizer, prompt: str, spec, max_tokens: int) -> tuple[str, str]:
    """(text, finish_reason) of lm.generate on the prompt alone."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = lm.generate(input_ids=ids, adapters=spec, max_new_tokens=max_tokens, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    eos = lm.model.generation_config.eos_token_id
    if eos in new:
        return tokenizer.decode(new[: new.index(eos)], skip_special_tokens=True), "stop"
    return tokenizer.decode(new, skip_special_tokens=True), "length"


# -- generation ------------------------------------------------------------------------------------


def test_models_lists_the_base_and_every_adapter(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {MODEL_ID, "upper", "reverse", "shift", "double"}
    assert all(models[n].model_extra["parent"] == MODEL_ID for n in ("upper", "reverse", "shift", "double"))


@pytest.mark.parametrize("model, body, spec", [
    ("upper", {}, "upper"),
    ("reverse", {}, "reverse"),
    (MODEL_ID, {}, None),
    (MODEL_ID, {"adapters": {"upper": 1.0, "shift": 0.5}}, {"upper": 1.0, "shift": 0.5}),
    ("double", {"adapters": {"reverse": 1.0}}, "reverse"),  # adapters wins over model
])
def test_completion_equals_generate(client, lm, tokenizer, model, body, spec):
    got = client.completions.create(model=model, prompt="weight=", max_tokens=12, temperature=0, extra_body=body)
    text, reason = expected(lm, tokenizer, "weight=", spec, 12)
    assert (got.choices[0].text, got.choices[0].finish_reason) == (text, reason)
    assert got.usage.prompt_tokens == 7 and got.usage.completion_tokens >= len(text)


def test_chat_streaming_and_not(client, lm, tokenizer):
    messages = [{"role": "user", "content": "python="}]
    text, _ = expected(lm, tokenizer, "python=", "shift", 12)
    got = client.chat.completions.create(model="shift", messages=messages, max_tokens=12, temperature=0)
    assert got.choices[0].message.content == text and got.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="shift", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "stop" and len(chunks) > 3


def test_streamed_completion_and_stop_strings(client, lm, tokenizer):
    text, _ = expected(lm, tokenizer, "banana=", "double", 16)
    chunks = list(client.completions.create(model="double", prompt="banana=", max_tokens=16, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text and len(chunks) > 3
    cut = text.index("nn")
    for stream in (False, True):
        got = client.completions.create(model="double", prompt="banana=", max_tokens=16, temperature=0, stop=["nn"],
                                        stream=stream)
        if stream:
            got = list(got)
            assert "".join(c.choices[0].text for c in got) == text[:cut]
            assert got[-1].choices[0].finish_reason == "stop"
        else:
            assert got.choices[0].text == text[:cut] and got.choices[0].finish_reason == "stop"


def test_n_and_seeded_sampling(client):
    body = dict(model=MODEL_ID, prompt="python=", max_tokens=8, temperature=1.0, n=3, seed=11,
                extra_body={"adapters": {"upper": 0.5, "shift": 0.5}})
    first = client.completions.create(**body)
    again = client.completions.create(**body)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seed + index per choice
    assert len({c.text for c in first.choices}) > 1


def test_32_concurrent_requests_share_forward_passes(server, client, lm, tokenizer):
    specs = [("upper", None), ("reverse", None), ("shift", None), ("double", None), (MODEL_ID, None),
             (MODEL_ID, {"upper": 1.0, "shift": 0.5}), (MODEL_ID, {"reverse": 1.0, "double": -0.25}),
             ("shift", {"shift": 2.0})]
    words = ["weight", "python", "lora", "banana"]
    jobs = [(f"{w}=", m, a) for w in words for m, a in specs]
    assert len(jobs) == 32

    def ask(job):
        prompt, model, adapters = job
        return client.completions.create(model=model, prompt=prompt, max_tokens=14, temperature=0,
                                         extra_body={"adapters": adapters} if adapters else None)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, jobs, timeout=240))
    for (prompt, model, adapters), answer in zip(jobs, answers):
        spec = adapters if adapters is not None else (None if model == MODEL_ID else model)
        assert answer.choices[0].text == expected(lm, tokenizer, prompt, spec, 14)[0], (prompt, model, adapters)
    metrics = httpx.get(server[0] + "/metrics", timeout=10).text
    peak = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("lora_graph_batch_size_peak")))
    assert peak > 1, "the requests did not share forward passes"
    assert 'lora_graph_requests_total{adapter="shift+upper"}' in metrics
    assert "lora_graph_time_to_first_token_seconds_count" in metrics


def test_a_joining_request_gets_its_first_token_before_the_others_finish(server, client):
    first_token, done = {}, {}

    def stream(name, prompt, max_tokens):
        chunks = client.completions.create(model="double", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True)
        for chunk in chunks:
            if chunk.choices[0].text and name not in first_token:
                first_token[name] = time.perf_counter()
        done[name] = time.perf_counter()

    long = [threading.Thread(target=stream, args=(f"long{i}", "abcdefghij=", 40)) for i in range(3)]
    for t in long:
        t.start()
    deadline = time.time() + 60
    while len(first_token) < 3:
        assert time.time() < deadline
        time.sleep(0.01)
    stream("late", "lora=", 4)
    for t in long:
        t.join(120)
    assert first_token["late"] < min(done[f"long{i}"] for i in range(3))


# -- errors ------------------------------------------------------------------------------------------


def test_unknown_model_or_adapter_is_a_404_naming_it(client):
    with pytest.raises(openai.NotFoundError, match="`nope`"):
        client.completions.create(model="nope", prompt="a=", max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="`ghost`"):
        client.completions.create(model=MODEL_ID, prompt="a=", max_tokens=2, extra_body={"adapters": {"ghost": 1.0}})
    with pytest.raises(openai.NotFoundError, match="`nope`"):
        client.completions.create(model="nope", prompt="a=", max_tokens=2, stream=True)


@pytest.mark.parametrize("body, field", [
    ({"model": "upper"}, "prompt"),
    ({"model": "upper", "prompt": "a=", "max_tokens": 0}, "max_tokens"),
    ({"model": "upper", "prompt": "a=", "temperature": 3}, "temperature"),
    ({"model": "upper", "prompt": "a=", "top_p": 0}, "top_p"),
    ({"model": "upper", "prompt": "a=", "n": 0}, "n"),
    ({"model": "upper", "prompt": 5}, "prompt"),
    ({"model": "upper", "prompt": "a=", "adapters": {"upper": "x"}}, "adapters.upper"),
    ({"model": "upper", "prompt": ["a=", "b="]}, "prompt"),
    ({"model": "upper", "prompt": "a" * 80}, "prompt"),
])
def test_malformed_bodies_are_400s_naming_the_field(server, body, field):
    response = httpx.post(server[0] + "/v1/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"], error


def test_chat_without_a_template_is_a_400(lm, tokenizer):
    bare = AutoTokenizer.from_pretrained(demo.base_path())
    bare.chat_template = None
    with serving(lm, bare) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="chat template"):
            client.chat.completions.create(model="upper", messages=[{"role": "user", "content": "a="}])


def test_api_key(lm, tokenizer):
    with serving(lm, tokenizer, api_key="sesame") as (url, _):
        good = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        assert good.completions.create(model="upper", prompt="lora=", max_tokens=6, temperature=0).choices[0].text
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
        assert httpx.get(url + "/health", timeout=10).status_code == 200


def test_a_full_queue_is_a_503_with_retry_after(tokenizer):
    """With the only slot pinned to another adapter, requests for `upper` wait in the queue: the
    third one finds it full. Once the slot is free, the queued ones are served."""
    lm = demo_lm(max_loaded=1)
    lm.pin("double")
    with serving(lm, tokenizer, max_queue=2) as (url, app):
        engine = app.state.server.engine
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(client.completions.create, model="upper", prompt="a=", max_tokens=2, temperature=0)
                       for _ in range(2)]
            deadline = time.time() + 30
            while engine.stats()["queue_length"] < 2:
                assert time.time() < deadline, "the requests were not queued"
                time.sleep(0.02)
            response = httpx.post(url + "/v1/completions", json={"model": "upper", "prompt": "b=", "max_tokens": 2},
                                  timeout=30)
            assert response.status_code == 503 and response.headers["retry-after"] == "1", response.text
            assert response.json()["error"]["code"] == "queue_full"
            lm.unpin("double")
            want = expected(lm, tokenizer, "a=", "upper", 2)[0]
            assert [w.result(60).choices[0].text for w in waiting] == [want, want]


def cancelled(url: str) -> float:
    metrics = httpx.get(url + "/metrics", timeout=10).text
    prefix = 'lora_graph_requests_finished_total{reason="cancelled"}'
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(prefix))


def test_a_client_that_disconnects_frees_its_place(server):
    url, app = server
    engine = app.state.server.engine
    before = cancelled(url)
    with httpx.stream("POST", url + "/v1/completions", timeout=30,
                      json={"model": "double", "prompt": "abcdefghij=", "max_tokens": 50, "temperature": 0,
                            "stream": True}) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        assert json.loads(first[5:])["choices"][0]["text"]
    deadline = time.time() + 10
    while engine.stats()["running"] or engine.stats()["queue_length"]:
        assert time.time() < deadline, "the disconnected request kept its place"
        time.sleep(0.02)
    assert cancelled(url) == before + 1, "the request ran to its end"


# -- runtime loading -----------------------------------------------------------------------------------


def test_runtime_loading_stays_inside_the_adapter_roots(tokenizer, tmp_path):
    roots = tmp_path / "adapters"
    model = AutoModelForCausalLM.from_pretrained(demo.base_path(), dtype=torch.float32).eval()
    extra = save_adapter(model, adapter_dir(roots, "extra"), seed=4, target_modules=["q_proj", "v_proj"], r=2)
    outside = save_adapter(model, adapter_dir(tmp_path, "outside"), seed=5, target_modules=["q_proj"], r=2)
    lm = demo_lm()
    with serving(demo_lm(), tokenizer) as (url, _):  # off by default
        response = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": extra}, timeout=30)
        assert response.status_code == 403 and "--allow-runtime-loading" in response.json()["error"]["message"]
    with serving(lm, tokenizer, allow_runtime_loading=True, adapter_roots=[roots]) as (url, _):
        post = lambda route, body: httpx.post(url + route, json=body, timeout=60)  # noqa: E731
        assert post("/v1/load_lora_adapter", {"lora_name": "out", "lora_path": outside}).status_code == 403
        sneaky = str(roots / ".." / "outside")
        assert post("/v1/load_lora_adapter", {"lora_name": "out", "lora_path": sneaky}).status_code == 403
        assert post("/v1/load_lora_adapter", {"lora_name": "upper", "lora_path": extra}).status_code == 400
        (roots / "broken").mkdir()
        (roots / "broken" / "adapter_config.json").write_text("{not json")
        assert post("/v1/load_lora_adapter", {"lora_name": "b", "lora_path": str(roots / "broken")}).status_code == 400
        assert "b" not in lm.adapters
        assert post("/v1/load_lora_adapter", {"lora_name": "extra", "lora_path": extra}).status_code == 200
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert "extra" in {m.id for m in client.models.list().data}
        got = client.completions.create(model="extra", prompt="weight=", max_tokens=8, temperature=0).choices[0].text
        assert got == expected(lm, tokenizer, "weight=", "extra", 8)[0]
        assert post("/v1/unload_lora_adapter", {"lora_name": "extra"}).status_code == 200
        assert post("/v1/unload_lora_adapter", {"lora_name": "extra"}).status_code == 404
        with pytest.raises(openai.NotFoundError, match="`extra`"):
            client.completions.create(model="extra", prompt="weight=", max_tokens=2)


def test_the_serve_command_serves_the_demo(lm, tokenizer):
    """``lora-graph serve`` with no model directory: the demo and its four adapters on 127.0.0.1."""
    import os
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lora_graph.cli", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "the server did not come up"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert {m.id for m in client.models.list().data} == {MODEL_ID, "upper", "reverse", "shift", "double"}
        got = client.completions.create(model="upper", prompt="weight=", max_tokens=10, temperature=0)
        assert got.choices[0].text == expected(lm, tokenizer, "weight=", "upper", 10)[0] == "WEIGHT"
        busy = subprocess.run([sys.executable, "-m", "lora_graph.cli", "serve", "--port", str(port)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert busy.returncode == 2 and f"could not serve on http://127.0.0.1:{port}" in busy.stderr, busy.stderr
        proc.terminate()  # SIGTERM: the engine and uvicorn stop, and the command exits cleanly
        assert proc.wait(30) == 0, proc.stdout.read()
    finally:
        proc.kill()
        proc.wait(30)
