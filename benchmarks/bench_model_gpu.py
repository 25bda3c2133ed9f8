"""Model-level cost of the LoRA branch on GPU: decode-step and prefill latency, base vs lora_graph vs PEFT.

A Llama built from a config at 1B-8B shapes, with ``--layers`` of its blocks (default: all) and random
weights, bf16 on CUDA. Adapters are r=16 on every linear layer, written straight in PEFT's format
(random factors; save_pretrained per adapter would cost more than the timing). Providers, which
share one set of base weight tensors:
- the base model alone;
- lora_graph (backend "auto": the Triton kernels on CUDA) with 1, 8, 32 and 64 distinct adapters in
  batches of 32 and 64 rows (rows round-robin; a count above the rows is skipped: 64 distinct
  adapters need 64 rows), called as ``lm(adapters=rows, ...)``;
- PEFT ``adapter_names`` with the same rows. Its adapters are loaded as the counts grow, and with a
  deadline only while the deadline allows (they load slowly): the base and lora_graph come first.
Decode is one new token per row over a KV cache of --context tokens, cropped back after each step;
prefill is --prefill tokens in total, split over the rows, without cache. The providers run
interleaved, one call each per round (CUDA events), so slow drifts of clocks cancel out; times are
medians, and a ratio to the base is the median of the per-round ratios.

Fewer layers than the model has change the ratios: per-forward costs (routing, the lane layout)
are shared by fewer layers. The JSON says how many layers ran.

    python benchmarks/bench_model_gpu.py [--shape 8b] [--layers 32] [--batches 32 64] [--adapters 1 8 32 64]
                                         [--out benchmarks/results/model_gpu.json]
    python benchmarks/bench_model_gpu.py --smoke     # tiny shapes on CPU: checks the script, writes nothing

Without CUDA (and without --smoke) it exits with a message and writes nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
from _env import environment, use_checkout, write_json
from bench_load import write_adapter
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

use_checkout()
import lora_graph  # noqa: E402
from bench_cpu_branch import paired_ratios, shared_copy  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
}
COUNTS = (1, 8, 32, 64)
BATCHES = (32, 64)


def build(shape: str, layers: int | None, device, dtype, vocab: int = 32000):
    dims = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=8192, **dims)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    return cfg, model


def call_seconds(fn, device) -> float:
    """Seconds of one call of ``fn``: CUDA events on a GPU, perf_counter on CPU."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def interleaved(fns: dict, repeats: int, device, warmup: int = 2) -> dict:
    """``{"s": median seconds, "ratio": median per-round ratio to "base"}`` of each provider, one
    call of each per round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {p: [] for p in fns}
    for _ in range(repeats):
        for p, fn in fns.items():
            times[p].append(call_seconds(fn, device))
    return {"s": {p: statistics.median(v) for p, v in times.items()}, "ratio": paired_ratios(times)}


class Providers:
    """The base, a lora_graph wrapper and a PEFT model over one set of base weights, with
    ``count`` adapters each (PEFT's loaded on demand)."""

    def __init__(self, base, paths: dict[str, str], backend: str, dtype) -> None:
        self.base, self.paths, self.names = base, paths, list(paths)
        self.lm = lora_graph.wrap(shared_copy(base), backend=backend, adapter_dtype=dtype, progress=False)
        self.lm.load_adapters(paths)
        self.peft, self.peft_load_s = None, []

    def load_peft(self, count: int) -> None:
        from peft import PeftModel

        for name in self.names[len(self.peft_load_s):count]:
            t0 = time.perf_counter()
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(shared_copy(self.base), self.paths[name], adapter_name=name)
                self.peft.eval()
            else:
                self.peft.load_adapter(self.paths[name], adapter_name=name)
            self.peft_load_s.append(time.perf_counter() - t0)

    def peft_seconds(self, count: int) -> float:
        """Estimated seconds to have ``count`` PEFT adapters loaded."""
        missing = max(0, count - len(self.peft_load_s))
        per = statistics.median(self.peft_load_s) if self.peft_load_s else 1.0
        return missing * per

    def warm(self, cfg, batches, context: int, prefill: int, device) -> float:
        """One lora_graph forward of every token count the pairs will run, so that compiling the
        kernels is neither timed nor taken for a pair's cost (a deadline plans with pair times);
        its seconds."""
        t0 = time.time()
        for rows in batches:
            names = [self.names[j % len(self.names)] for j in range(rows)]
            for ids in inputs(cfg, rows, context, prefill, device).values():
                self.lm(input_ids=ids, adapters=names, use_cache=False)
        return time.time() - t0

    def calls(self, rows: list[str], with_peft: bool) -> dict:
        fns = {"base": lambda **kw: self.base(**kw), "lora_graph": lambda **kw: self.lm(adapters=rows, **kw)}
        if with_peft:
            fns["peft"] = lambda **kw: self.peft(adapter_names=rows, **kw)
        return fns


def time_count(providers: Providers, cfg, rows: list[str], ids: dict, with_peft: bool, repeats: int, device) -> dict:
    """Decode and prefill of every provider with one batch of ``rows``."""
    fns = providers.calls(rows, with_peft)
    steps = {}
    for p, fn in fns.items():
        cache = DynamicCache(config=cfg)
        fn(input_ids=ids["context"], past_key_values=cache, use_cache=True)

        def step(fn=fn, cache=cache):
            fn(input_ids=ids["step"], past_key_values=cache, use_cache=True)
            cache.crop(-1)

        steps[p] = step
    decode = interleaved(steps, repeats, device, warmup=3)
    del steps
    prefill = interleaved({p: (lambda fn=fn: fn(input_ids=ids["prefill"], use_cache=False)) for p, fn in fns.items()},
                          max(3, repeats // 3), device)
    return {"decode_s": decode["s"], "decode_ratio": decode["ratio"],
            "prefill_s": prefill["s"], "prefill_ratio": prefill["ratio"]}


def key(rows: int, count: int) -> str:
    """A result's name: ``rows`` in the batch, ``count`` distinct adapters among them."""
    return f"batch {rows}, {count} adapters"


def run(shape: str = "8b", layers: int | None = None, batches=BATCHES, counts=COUNTS, context: int = 512,
        prefill: int = 2048, repeats: int = 20, dtype=torch.bfloat16, vocab: int = 32000, rank: int = 16,
        device=None, backend: str = "auto", deadline: float | None = None, on_result=None) -> dict:
    """Time every (batch, count) pair with count <= batch: base and lora_graph always, PEFT while
    ``deadline`` (time.time()) leaves room for the pairs still to come. ``on_result(key, entry)``
    sees each pair's entry as soon as it is measured."""
    device = device or torch.device("cuda")
    t0 = time.time()
    cfg, base = build(shape, layers, device, dtype, vocab)
    folder = tempfile.mkdtemp(prefix="bench_model_gpu_")
    try:
        paths = {f"a{i}": write_adapter(base, os.path.join(folder, f"a{i}"), rank, TARGETS, seed=i, dtype=dtype)
                 for i in range(max(counts))}
        providers = Providers(base, paths, backend, dtype)
        out = {"setup_s": time.time() - t0, "layers": cfg.num_hidden_layers, "backend": providers.lm.backend,
               "results": {}, "skipped": []}
        pairs = [(b, c) for b in batches for c in counts if c <= b]
        took = []  # seconds of each pair's timing
        with torch.inference_mode():
            out["warmup_s"] = providers.warm(cfg, batches, context, prefill, device)
            for i, (rows, count) in enumerate(pairs):
                if deadline is not None and time.time() + max(took, default=0.0) > deadline:
                    out["skipped"].append(key(rows, count))
                    continue
                # PEFT, slow to load, only while the pairs still to come keep their time
                need = (statistics.median(took) if took else 0.0) * (len(pairs) - i) + providers.peft_seconds(count)
                with_peft = deadline is None or time.time() + need < deadline
                if with_peft:
                    providers.load_peft(count)
                else:
                    out["skipped"].append(f"peft, {key(rows, count)}")
                ids = inputs(cfg, rows, context, prefill, device)
                names = [providers.names[j % count] for j in range(rows)]
                start = time.time()
                entry = time_count(providers, cfg, names, ids, with_peft, repeats, device)
                took.append(time.time() - start)
                out["results"][key(rows, count)] = entry
                print(f"{key(rows, count):>24}  decode " + "  ".join(
                    f"{p} {entry['decode_s'][p] * 1e3:8.3f} ms ({entry['decode_ratio'][p]:.3f}x)"
                    for p in entry["decode_s"]) + "  prefill " + "  ".join(
                    f"{p} {entry['prefill_ratio'][p]:.3f}x" for p in entry["prefill_s"]), flush=True)
                if on_result is not None:
                    on_result(key(rows, count), entry)
        out["peft_load_s"] = providers.peft_load_s
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def inputs(cfg, rows: int, context: int, prefill: int, device) -> dict:
    """Token ids: one decode step, the context before it, and ``prefill`` tokens split over the rows."""
    gen = torch.Generator().manual_seed(rows)
    sizes = {"step": (rows, 1), "context": (rows, context), "prefill": (rows, max(1, prefill // rows))}
    return {name: torch.randint(0, cfg.vocab_size, size, generator=gen).to(device) for name, size in sizes.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="8b", choices=[s for s in SHAPES if s != "smoke"])
    ap.add_argument("--layers", type=int, default=None, help="blocks of the model to build (default: all)")
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="rows per batch")
    ap.add_argument("--adapters", type=int, nargs="+", default=list(COUNTS),
                    help="distinct adapters per batch (those up to each batch size)")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--prefill", type=int, default=2048, help="prefill tokens in total (split over rows)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU; checks the script, writes nothing")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "model_gpu.json"))
    args = ap.parse_args()
    if args.smoke:
        run("smoke", batches=(4,), counts=(1, 4), context=8, prefill=32, repeats=2, dtype=torch.float32, vocab=256,
            rank=args.rank, device=torch.device("cpu"))
        print("smoke run: nothing written")
        return
    if not torch.cuda.is_available():
        sys.exit("bench_model_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); no results written.")
    out = run(args.shape, args.layers, args.batches, args.adapters, args.context, args.prefill, args.repeats,
              rank=args.rank)
    report = {"benchmark": "model_gpu", **environment(), "shape": args.shape, "config": SHAPES[args.shape],
              "dtype": "torch.bfloat16", "context": args.context, "prefill_tokens": args.prefill, "rank": args.rank,
              "targets": TARGETS, **out}
    write_json(report, args.out)


if __name__ == "__main__":
    main()
