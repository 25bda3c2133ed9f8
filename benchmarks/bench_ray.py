"""Ray Serve on this machine: throughput with 1 and 2 replicas, and the adapter loads that affinity saves.

A local Ray cluster (one CPU per replica, one intra-op thread each) serves the shipped demo model with
``--adapters`` generated adapters (r=8 on q_proj and v_proj, random non-zero factors), through Ray
Serve's HTTP proxy on 127.0.0.1. 16 closed-loop HTTP clients send ``--requests`` requests; request
``i`` names an adapter drawn from a Zipf-like popularity over all of them (seeded; the same sequence for
every configuration), as traffic over many fine-tunes often is. Measured per configuration:
generated tokens per second over the run, and the adapter loads the replicas made (page-ins, from the
``lora_graph_adapter_load_seconds`` count of /metrics, summed over replicas).

    1 replica, affinity            the baseline for throughput
    2 replicas, affinity           Ray's multiplexed routing: a request goes to a replica holding its adapter
    2 replicas, round-robin        no model id: Ray spreads requests; each replica pages through max_loaded

    python benchmarks/bench_ray.py [--adapters 32] [--max-loaded 8] [--out benchmarks/results/ray.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import socket
import tempfile
import time

import httpx2 as httpx
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from _env import environment, write_json


def write_adapters(folder: str, count: int) -> dict[str, str]:
    from peft import LoraConfig

    from lora_graph import demo

    model = AutoModelForCausalLM.from_pretrained(demo.base_path())
    paths = {}
    for i in range(count):
        gen = torch.Generator().manual_seed(i)
        tensors = {}
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rpartition(".")[2] in ("q_proj", "v_proj"):
                key = f"base_model.model.{name}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(8, module.in_features, generator=gen) * 0.05
                tensors[f"{key}.lora_B.weight"] = torch.randn(module.out_features, 8, generator=gen) * 0.05
        path = paths[f"u{i}"] = os.path.join(folder, f"u{i}")
        os.makedirs(path, exist_ok=True)
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]).save_pretrained(path)
    return paths


def workload(names: list[str], count: int) -> list[str]:
    rng = random.Random(0)
    weights = [1.0 / (k + 1) ** 0.8 for k in range(len(names))]
    return rng.choices(names, weights=weights, k=count)


def run(url: str, models: list[str], new_tokens: int) -> dict:
    def ask(model):
        body = {"model": model, "prompt": "weight=", "max_tokens": new_tokens, "temperature": 0}
        for _ in range(20):
            r = httpx.post(url + "/v1/completions", json=body, timeout=120)
            if r.status_code == 200:
                return r.json()["usage"]["completion_tokens"]
            time.sleep(0.5)
        raise RuntimeError(r.text)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        tokens = sum(pool.map(ask, models))
    seconds = time.perf_counter() - start
    metrics = httpx.get(url + "/metrics", timeout=60).text
    loads = sum(float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("lora_graph_adapter_load_seconds_count"))
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "adapter_loads": loads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--max-loaded", type=int, default=8)
    ap.add_argument("--requests", type=int, default=192)
    ap.add_argument("--new", type=int, default=12)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "ray.json"))
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # one intra-op thread per replica process
    import ray
    from ray import serve

    from lora_graph.serve.ray import ray_app

    paths = write_adapters(tempfile.mkdtemp(), args.adapters)
    models = workload(list(paths), args.requests)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results = {}
    for label, replicas, affinity in [("1 replica, affinity", 1, True), ("2 replicas, affinity", 2, True),
                                      ("2 replicas, round-robin", 2, False)]:
        serve.run(ray_app(adapters=paths, replicas=replicas, max_loaded=args.max_loaded, affinity=affinity,
                          ray_actor_options={"num_cpus": 1}), name="bench", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        run(url, [f"u{i}" for i in range(2)], 2)  # warm-up
        before = run(url, [], 1)["adapter_loads"]
        result = run(url, models, args.new)
        result["adapter_loads"] -= before
        results[label] = result
        print(f"{label:>26}: {result['tokens_per_s']:7.1f} tokens/s, {result['adapter_loads']:5.0f} adapter loads",
              flush=True)
        serve.delete("bench")
    serve.shutdown()
    ray.shutdown()
    saved = results["2 replicas, round-robin"]["adapter_loads"] - results["2 replicas, affinity"]["adapter_loads"]
    write_json({"benchmark": "ray", **environment(), "adapters": args.adapters, "max_loaded": args.max_loaded,
                "requests": args.requests, "new_tokens": args.new, "clients": 16, "results": results,
                "loads_saved_by_affinity": saved,
                "speedup_2_replicas": results["2 replicas, affinity"]["tokens_per_s"]
                / results["1 replica, affinity"]["tokens_per_s"]}, args.out)


if __name__ == "__main__":
    main()
