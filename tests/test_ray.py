"""Scale-out on Ray Serve (lora_graph.serve.ray): a real local Ray cluster started by the test (4 CPUs,
no dashboard), two replicas of the demo model with its four adapters behind Ray Serve's HTTP proxy on
127.0.0.1, talked to with the official ``openai`` client.

Checked, in order, on one cluster: greedy completions equal the single-process server's for 40
requests over the four adapters, a weighted set and the base; sequential requests for one adapter
stay on one replica (``x-lora-graph-replica``); killing a replica mid-run loses no request (each gets
its answer, or a clean 503 that is retried) and Ray brings the replica back; /metrics gathers both
replicas; shutting down leaves no Ray process behind. Every wait is bounded.
"""

from __future__ import annotations

import concurrent.futures
import socket
import subprocess
import time

import httpx2 as httpx
import openai
import pytest
from transformers import AutoTokenizer

from helpers import DEMO_ID, demo_lm, serving
from lora_graph import demo

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from lora_graph.serve.ray import ray_app  # noqa: E402

PROMPTS = ["weight=", "python=", "lora=", "banana=", "abcdefgh=", "cluster="]
SPECS = [("upper", None), ("reverse", None), ("shift", None), ("double", None), (DEMO_ID, None),
         (DEMO_ID, {"upper": 1.0, "shift": 0.5}), ("double", {"reverse": 1.0, "double": -0.25})]


def ray_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if ("raylet" in line or "gcs_server" in line or line.startswith("ray::"))]


@pytest.fixture(scope="module")
def cluster():
    assert not ray_processes(), "a Ray cluster is already running here"
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(ray_app(replicas=2, max_loaded=4, ray_actor_options={"num_cpus": 1}), name="lora_graph",
              route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    if ray.is_initialized():  # the last test shuts down itself; this is for a failure before it
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def single():
    """Answers of the single-process server (lora_graph.serve.app) for every (prompt, spec)."""
    tokenizer = AutoTokenizer.from_pretrained(demo.base_path())
    answers = {}
    with serving(demo_lm(), tokenizer) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for prompt in PROMPTS:
            for model, adapters in SPECS:
                answers[prompt, model, repr(adapters)] = ask(client, prompt, model, adapters).choices[0].text
    return answers


def ask(client, prompt, model, adapters, **kwargs):
    return client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                     extra_body={"adapters": adapters} if adapters else None, **kwargs)


def ask_with_retries(url, prompt, model, adapters, tries: int = 20):
    """One request over HTTP, retried on a 503 or a dropped connection (a replica that died)."""
    body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    if adapters:
        body["adapters"] = adapters
    for _ in range(tries):
        try:
            response = httpx.post(url + "/v1/completions", json=body, timeout=60)
        except httpx.HTTPError:
            time.sleep(0.5)
            continue
        if response.status_code == 503:
            time.sleep(float(response.headers.get("retry-after", "1")))
            continue
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]
    raise AssertionError(f"no answer after {tries} tries")


def test_40_requests_equal_the_single_process_server(cluster, single):
    client = openai.OpenAI(base_url=cluster + "/v1", api_key="unused", max_retries=0, timeout=120)
    jobs = [(p, m, a) for p in PROMPTS for m, a in SPECS][:40]
    assert len(jobs) == 40
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda job: ask(client, *job).choices[0].text, jobs, timeout=180))
    for (prompt, model, adapters), text in zip(jobs, answers):
        assert text == single[prompt, model, repr(adapters)], (prompt, model, adapters)
    streamed = ask(client, "weight=", "reverse", None, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == single["weight=", "reverse", "None"]


def test_one_adapter_stays_on_one_replica(cluster):
    for model in ("shift", "upper"):
        replicas = set()
        for prompt in PROMPTS:
            response = httpx.post(cluster + "/v1/completions", timeout=60,
                                  json={"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0})
            assert response.status_code == 200, response.text
            replicas.add(response.headers["x-lora-graph-replica"])
        assert len(replicas) == 1, f"{model} was served by {replicas}"


def test_metrics_gather_both_replicas(cluster):
    text = httpx.get(cluster + "/metrics", timeout=60).text
    replicas = {line.split('replica="')[1].split('"')[0] for line in text.splitlines() if 'replica="' in line}
    assert len(replicas) == 2
    assert sum(line.startswith("# TYPE lora_graph_requests_total ") for line in text.splitlines()) == 1


def test_a_killed_replica_loses_no_request(cluster, single):
    jobs = [(p, m, a) for p in PROMPTS for m, a in SPECS[:4]] * 2
    victims = [name for name in ray.util.list_named_actors(all_namespaces=True)
               if "LoraReplica" in str(name.get("name", ""))]
    assert len(victims) == 2, victims
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask_with_retries, cluster, *job) for job in jobs]
        time.sleep(1.0)
        ray.kill(ray.get_actor(victims[0]["name"], namespace=victims[0]["namespace"]), no_restart=False)
        answers = [f.result(timeout=240) for f in futures]
    for (prompt, model, adapters), text in zip(jobs, answers):
        assert text == single[prompt, model, repr(adapters)], (prompt, model, adapters)
    deadline = time.time() + 120
    while True:  # Ray brings the killed replica back
        status = serve.status().applications["lora_graph"].deployments["LoraReplica"]
        if status.replica_states.get("RUNNING", 0) == 2 and status.status == "HEALTHY":
            break
        assert time.time() < deadline, status
        time.sleep(1.0)


def test_shutdown_leaves_no_ray_process(cluster):
    serve.shutdown()
    ray.shutdown()
    deadline = time.time() + 60
    while ray_processes():
        assert time.time() < deadline, ray_processes()
        time.sleep(0.5)
