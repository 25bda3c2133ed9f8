"""Serving concurrent clients on CPU: lora_graph's continuous batching against one request at a time and PEFT.

The Llama of bench_cpu_branch.py (hidden 1024, intermediate 2816, 4 layers, vocab 1000, random
weights), adapters of r=16 on every linear layer. 16 closed-loop clients (each sends a request,
waits for its last token, sends the next) share ``--requests`` requests of ``--prompt`` random
tokens, each asking for a number of new tokens drawn uniformly from ``--new`` (seeded, the same
draw for every provider; no end token, so every request generates them all), as answers of
different lengths do; request ``i`` uses adapter ``i mod D``. Every provider first serves a short
warm-up round. Measured per provider: generated tokens per second while the 16 clients are all
busy (``sustained_tokens_per_s``: from the moment every client has a request in flight to the
moment the last request is taken; after it, clients run out of work one by one and the run ends
with fewer than 16 concurrent requests, the last third of a 48-request run), generated tokens per
second over the whole run (``tokens_per_s``), time to first token (submit to first token) and
inter-token latency, p50 and p99.

Every provider computes in the main thread, the one that built the model, as ``lora-graph serve``
does (lora_graph.serve.Engine.run says why); the clients are threads that submit and wait.

Providers (all over the same base weight tensors):
- ``lora_graph`` engine (lora_graph.serve.Engine, continuous batching) with the base only and
  with 1, 8 and 64 distinct adapters; 64 are paged through ``max_loaded=16``;
- the same engine with batching off (``batching=False``: one request at a time), 8 adapters;
- PEFT as a user would write it today, 8 adapters: static batches (a batcher takes whatever
  requests wait, up to 16, runs ``generate(adapter_names=...)`` to the longest request's length
  and answers them all at the end), and one request at a time with ``set_adapter``. Their token
  times come from a generate streamer; a request counts only its own tokens.

Every provider runs once per round (``--rounds``, 3), in an order rotated each round, so that a
slow spell of a shared machine does not fall on one provider only; reported per provider: the
round with the median tokens/s (its latencies too) and every round's tokens/s.

Targets are ratios of two providers. In a round the two runs of a ratio can be minutes apart, and
the speed of a shared machine drifts within minutes (the base-only engine has made 230 to 354
tokens/s across rounds), so each ratio is also measured in ``--pairs`` (6) pairs of adjacent
runs of its two providers, the first of each pair alternating: the targets are the medians of
those pairs' ratios of sustained tokens/s (``targets``), the throughput of 16 concurrent clients;
beside them, the same pairs' ratios of whole-run tokens/s (``targets_whole_run``) and the medians
of the rounds' ratios (``targets_from_rounds``, ``targets_whole_run_from_rounds``). The better
PEFT baseline is the one with the higher median sustained tokens/s in the rounds.

    python benchmarks/bench_serve.py [--requests 48] [--rounds 3] [--pairs 6] [--out benchmarks/results/serve.json]
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import tempfile
import threading
import time

import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer

import lora_graph
from _env import environment, write_json
from bench_cpu_branch import TARGETS, shared_copy
from lora_graph.serve import Engine

CLIENTS = 16
SUSTAINED = "sustained_tokens_per_s"  # while all 16 clients have a request in flight (Timeline.summary)
METRICS = (SUSTAINED, "tokens_per_s")
PEFT = ("PEFT static batches, 8 adapters", "PEFT set_adapter one at a time, 8 adapters")
RATIOS = {  # target: (numerator, denominator); None: the better PEFT baseline
    "8 adapters / base only >= 0.85": ("8 adapters", "base only"),
    "continuous / one at a time >= 4": ("8 adapters", "8 adapters, batching off"),
    "8 adapters / best PEFT >= 2": ("8 adapters", None),
}


def write_adapters(model, folder: str, count: int, rank: int) -> dict[str, str]:
    """``count`` PEFT adapters with random non-zero factors, written straight to safetensors."""
    paths = {}
    for i in range(count):
        gen = torch.Generator().manual_seed(100 + i)
        tensors = {}
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rpartition(".")[2] in TARGETS:
                key = f"base_model.model.{name}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=gen) * 0.02
                tensors[f"{key}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.02
        path = paths[f"a{i}"] = os.path.join(folder, f"a{i}")
        os.makedirs(path, exist_ok=True)
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS).save_pretrained(path)
    return paths


class Timeline:
    """Per request: when it was sent and when each of its tokens arrived."""

    def __init__(self) -> None:
        self.sent: dict[int, float] = {}
        self.tokens: dict[int, list[float]] = {}

    def summary(self, wall: float) -> dict:
        ttft = [times[0] - self.sent[i] for i, times in self.tokens.items() if times]
        itl = [b - a for times in self.tokens.values() for a, b in zip(times, times[1:])]
        total = sum(len(t) for t in self.tokens.values())
        # 16 concurrent clients: from the moment every client has a request in flight to the moment
        # the last request is taken (then clients run out of work one by one, and fewer than 16 wait)
        sends = sorted(self.sent.values())
        start, end = sends[min(CLIENTS, len(sends)) - 1], sends[-1]
        inside = sum(start <= t <= end for times in self.tokens.values() for t in times)

        def pct(xs, q):
            xs = sorted(xs)
            return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None

        return {"tokens": total, "seconds": wall, "tokens_per_s": total / wall,
                SUSTAINED: inside / (end - start) if end > start else None,  # None: 16 requests or fewer
                "sustained_seconds": end - start, "ttft_p50_s": pct(ttft, 0.5),
                "ttft_p99_s": pct(ttft, 0.99), "itl_p50_s": pct(itl, 0.5), "itl_p99_s": pct(itl, 0.99)}


def run_clients(jobs: list, serve_one) -> dict:
    """16 closed-loop clients over ``jobs``; ``serve_one(i, job, timeline)`` blocks until job ``i`` ends."""
    timeline, work = Timeline(), queue.Queue()
    for i, job in enumerate(jobs):
        work.put((i, job))

    def client():
        while True:
            try:
                i, job = work.get_nowait()
            except queue.Empty:
                return
            timeline.sent[i] = time.perf_counter()
            timeline.tokens[i] = []
            serve_one(i, job, timeline)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return timeline.summary(time.perf_counter() - start)


def drive(provider, rounds: list[list]) -> list[dict]:
    """Each round of jobs through 16 clients (threads that only submit and wait), while the calling
    thread, the one that built the model, runs ``provider.compute()`` until the last round ends:
    every provider computes where a server would, see lora_graph.serve.Engine.run."""
    results = []

    def driver():
        try:
            for jobs in rounds:
                results.append(run_clients(jobs, provider.serve_one))
        finally:
            provider.stop()

    thread = threading.Thread(target=driver)
    thread.start()
    provider.compute()
    thread.join()
    if len(results) != len(rounds):
        raise RuntimeError(f"{type(provider).__name__}: a round did not finish")
    return results


class EngineProvider:
    def __init__(self, lm, batching: bool) -> None:
        self.engine = Engine(lm, max_batch_tokens=512, num_blocks=256, page_size=16, batching=batching)
        self.engine.start(steps=False)
        self.compute, self.stop = self.engine.run, self.engine.stop

    def serve_one(self, i, job, timeline):
        prompt, spec, new = job
        stamps = timeline.tokens[i]

        def update(request):
            now = time.perf_counter()
            stamps.extend([now] * (len(request.tokens) - len(stamps)))

        self.engine.submit(prompt, spec, max_new_tokens=new, on_update=update).result(600)


class _Stamps(BaseStreamer):
    """Records, per batch row, the time of each of its own tokens (generate's streamer hook)."""

    def __init__(self, rows: list[list[float]], wanted: list[int]) -> None:
        self.rows, self.wanted, self.prompt_seen = rows, wanted, False

    def put(self, value):
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        now = time.perf_counter()
        for row, wanted in zip(self.rows, self.wanted):
            if len(row) < wanted:
                row.append(now)

    def end(self):
        pass


class PeftProvider:
    """PEFT as a user would serve it today. ``static``: whatever requests wait (up to 16) become one
    ``generate(adapter_names=...)`` run to the longest request's length; otherwise one request at a
    time after ``set_adapter``."""

    def __init__(self, peft, static: bool) -> None:
        self.peft, self.static = peft, static
        self.waiting: queue.Queue = queue.Queue()

    def serve_one(self, i, job, timeline):
        done = threading.Event()
        self.waiting.put((job, timeline.tokens[i], done))
        done.wait()

    def stop(self):
        self.waiting.put(None)

    def compute(self):
        while True:
            first = self.waiting.get()
            if first is None:
                return
            batch = [first]
            while self.static and len(batch) < CLIENTS:
                try:
                    batch.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
            if batch[-1] is None:
                batch.pop()
                self.waiting.put(None)
            self.generate(batch)
            for _, _, done in batch:
                done.set()

    def generate(self, batch):
        width = max(len(job[0]) for job, _, _ in batch)
        longest = max(job[2] for job, _, _ in batch)
        ids = torch.tensor([[0] * (width - len(job[0])) + job[0] for job, _, _ in batch])
        mask = torch.tensor([[0] * (width - len(job[0])) + [1] * len(job[0]) for job, _, _ in batch])
        names = [job[1] for job, _, _ in batch]
        kwargs = {"adapter_names": names} if self.static else {}
        if not self.static:
            self.peft.set_adapter(names[0])
        with torch.no_grad():
            self.peft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                               do_sample=False, pad_token_id=0, **kwargs,
                               streamer=_Stamps([stamps for _, stamps, _ in batch], [job[2] for job, _, _ in batch]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, nargs=2, default=[16, 96], metavar=("MIN", "MAX"))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="every provider once per round; medians are reported")
    ap.add_argument("--pairs", type=int, default=6, help="pairs of adjacent runs per target ratio")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "serve.json"))
    args = ap.parse_args()
    if args.requests <= CLIENTS:
        ap.error(f"--requests must be more than the {CLIENTS} clients, to measure them all busy")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512)
    base = LlamaForCausalLM(cfg).eval()
    base.generation_config.eos_token_id = None  # every request generates --new tokens
    paths = write_adapters(base, tempfile.mkdtemp(), 64, args.rank)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, cfg.vocab_size, (args.prompt,), generator=gen).tolist() for _ in range(args.requests)]
    lengths = torch.randint(args.new[0], args.new[1] + 1, (args.requests,), generator=gen).tolist()

    def jobs(distinct, count=args.requests):
        return [(p, None if distinct == 0 else f"a{i % distinct}", n)
                for i, (p, n) in enumerate(zip(prompts[:count], lengths[:count]))]

    peft = PeftModel.from_pretrained(shared_copy(base), paths["a0"], adapter_name="a0")
    for i in range(1, 8):
        peft.load_adapter(paths[f"a{i}"], adapter_name=f"a{i}")
    peft.eval()

    def engine(distinct, batching, max_loaded):
        def run():
            lm = lora_graph.wrap(shared_copy(base), max_loaded=max_loaded, max_cpu=64)
            lm.register_adapters({f"a{i}": paths[f"a{i}"] for i in range(max(distinct, 1))})
            try:
                return drive(EngineProvider(lm, batching), [
                    [(p, s, 4) for p, s, _ in jobs(distinct, CLIENTS)], jobs(distinct)])[1]
            finally:
                lm.unwrap()
        return run

    def peft_run(static, warm_count):
        return lambda: drive(PeftProvider(peft, static), [[(p, s, 4) for p, s, _ in jobs(8, warm_count)], jobs(8)])[1]

    providers = {"base only": engine(0, True, None), "1 adapter": engine(1, True, None),
                 "8 adapters": engine(8, True, None), "64 adapters, max_loaded=16": engine(64, True, 16),
                 "8 adapters, batching off": engine(8, False, None),
                 "PEFT static batches, 8 adapters": peft_run(True, CLIENTS),
                 "PEFT set_adapter one at a time, 8 adapters": peft_run(False, 2)}
    rounds = []  # every provider once per round, in an order rotated by one each round
    for r in range(args.rounds):
        order = list(providers)[r % len(providers):] + list(providers)[: r % len(providers)]
        rounds.append({})
        for label in order:
            rounds[-1][label] = providers[label]()
            print(f"round {r + 1} {label:>42}: {rounds[-1][label][SUSTAINED]:7.1f} tokens/s sustained, "
                  f"{rounds[-1][label]['tokens_per_s']:7.1f} over the whole run", flush=True)
    results = {}
    for label in providers:  # the round with the median whole-run tokens/s; sustained: the median of the rounds
        runs = sorted((one[label] for one in rounds), key=lambda x: x["tokens_per_s"])
        results[label] = {**runs[len(runs) // 2], "tokens_per_s_rounds": [one[label]["tokens_per_s"] for one in rounds],
                          f"{SUSTAINED}_rounds": [one[label][SUSTAINED] for one in rounds]}
        results[label][SUSTAINED] = statistics.median(results[label][f"{SUSTAINED}_rounds"])
    summary = {metric: _targets(rounds, metric) for metric in METRICS}
    pairs = _pairs(providers, results, args.pairs)
    for label, ratio in pairs["targets"].items():
        print(f"{label}: {ratio:.2f} sustained (adjacent pairs: {', '.join(f'{r:.2f}' for r in pairs['pairs'][label])}; "
              f"from the rounds: {summary[SUSTAINED]['targets'][label]:.2f}); whole run "
              f"{pairs['targets_whole_run'][label]:.2f} (rounds {summary['tokens_per_s']['targets'][label]:.2f})")
    write_json({"benchmark": "serve", **environment(), "config": {k: getattr(cfg, k) for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")}, "clients": CLIENTS,
        "requests": args.requests, "prompt_tokens": args.prompt, "new_tokens_range": args.new, "rank": args.rank,
        "rounds": args.rounds, "results": results, "targets": pairs["targets"], "target_pairs": pairs["pairs"],
        "targets_whole_run": pairs["targets_whole_run"], "target_pairs_whole_run": pairs["pairs_whole_run"],
        "target_providers": pairs["providers"], "targets_from_rounds": summary[SUSTAINED]["targets"],
        "targets_rounds": summary[SUSTAINED]["rounds"],
        "targets_whole_run_from_rounds": summary["tokens_per_s"]["targets"],
        "targets_whole_run_rounds": summary["tokens_per_s"]["rounds"]}, args.out)


def _pairs(providers: dict, results: dict, count: int) -> dict:
    """Each target's ratio over ``count`` pairs of adjacent runs of its two providers (which one
    runs first alternates, so that a machine speeding up or slowing down favours neither), in
    sustained tokens/s and in whole-run tokens/s."""
    peft = max(PEFT, key=lambda label: results[label][SUSTAINED])
    compared = {target: (num, peft if den is None else den) for target, (num, den) in RATIOS.items()}
    out = {metric: {} for metric in METRICS}
    for target, (num, den) in compared.items():
        for metric in METRICS:
            out[metric][target] = []
        for i in range(count):
            runs = {}
            for label in ((num, den) if i % 2 == 0 else (den, num)):
                runs[label] = providers[label]()
            for metric in METRICS:
                out[metric][target].append(runs[num][metric] / runs[den][metric])
            print(f"pair {i + 1} {target}: {out[SUSTAINED][target][-1]:.3f} sustained, "
                  f"{out['tokens_per_s'][target][-1]:.3f} whole run", flush=True)
    return {"targets": {k: statistics.median(v) for k, v in out[SUSTAINED].items()}, "pairs": out[SUSTAINED],
            "targets_whole_run": {k: statistics.median(v) for k, v in out["tokens_per_s"].items()},
            "pairs_whole_run": out["tokens_per_s"], "providers": compared}


def _targets(rounds: list[dict], metric: str) -> dict:
    """Each target's ratio in every round, in ``metric``, and their median."""
    def ratios(results):
        tps = {k: v[metric] for k, v in results.items()}
        best_peft = max(tps[label] for label in PEFT)
        return {target: tps[num] / (best_peft if den is None else tps[den]) for target, (num, den) in RATIOS.items()}

    per_round = [ratios(one) for one in rounds]
    targets = {k: statistics.median(r[k] for r in per_round) for k in per_round[0]}
    return {"targets": targets, "rounds": per_round}


if __name__ == "__main__":
    main()
