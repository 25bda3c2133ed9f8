"""Model-level cost of the LoRA branch on GPU: decode-step and prefill latency, base vs lora_graph vs PEFT.

A Llama built from a config at 1B-8B shapes with random weights, bf16 on CUDA. Adapters are r=16
on every linear layer. Providers, timed side by side in one process (CUDA events, medians):
- the base model alone;
- lora_graph (backend "auto": the Triton kernels) with 1, 8 and 32 distinct adapters in the batch;
- PEFT ``adapter_names`` with the same adapters.
Decode is one new token per row over a KV cache of --context tokens; prefill is --prefill tokens
per row without cache.

    python benchmarks/bench_model_gpu.py [--shape 8b] [--batch 32] [--out benchmarks/results/model_gpu.json]
    python benchmarks/bench_model_gpu.py --smoke     # tiny shapes on CPU: checks the script, writes nothing

Without CUDA (and without --smoke) it exits with a message and writes nothing.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import lora_graph
from _env import environment, write_json

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


def build(shape: str, device, dtype):
    cfg = LlamaConfig(vocab_size=32000 if shape != "smoke" else 256, max_position_embeddings=8192, **SHAPES[shape])
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    return cfg, model


def write_adapters(model, folder: str, count: int, rank: int) -> dict[str, str]:
    """``count`` adapters; each is the first one with its B scaled by a different factor (cheap to make)."""
    torch.manual_seed(0)
    first = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                             init_lora_weights=False))
    paths = {}
    for i in range(count):
        with torch.no_grad():
            for name, p in first.named_parameters():
                if "lora_B" in name:
                    p.mul_(1.0 + 0.01 * i)
        paths[f"a{i}"] = os.path.join(folder, f"a{i}")
        first.save_pretrained(paths[f"a{i}"])
    first.unload()  # gives the plain model back, untouched
    return paths


def timed(fn, repeats: int, device) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls."""
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="8b", choices=[s for s in SHAPES if s != "smoke"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--prefill", type=int, default=2048, help="prefill tokens in total (split over rows)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU; checks the script, writes nothing")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "model_gpu.json"))
    args = ap.parse_args()
    if args.smoke:
        device, dtype, shape = torch.device("cpu"), torch.float32, "smoke"
        args.batch, args.context, args.prefill, args.repeats = 4, 8, 32, 2
    elif not torch.cuda.is_available():
        print("bench_model_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); no results written.")
        sys.exit(0)
    else:
        device, dtype, shape = torch.device("cuda"), torch.bfloat16, args.shape
    mixes = [1, 8, 32] if args.batch >= 32 else [1, min(8, args.batch)]

    cfg, base = build(shape, device, dtype)
    folder = tempfile.mkdtemp(prefix="bench_model_gpu_")
    paths = write_adapters(base, folder, max(mixes), args.rank)
    names = list(paths)
    lm = lora_graph.wrap(copy.deepcopy(base), adapter_dtype=dtype)
    lm.load_adapters(paths)
    peft = PeftModel.from_pretrained(copy.deepcopy(base), paths[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(paths[name], adapter_name=name)
    peft.eval()

    b = args.batch
    step_ids = torch.randint(0, cfg.vocab_size, (b, 1), device=device)
    ctx_ids = torch.randint(0, cfg.vocab_size, (b, args.context), device=device)
    pre_ids = torch.randint(0, cfg.vocab_size, (b, max(1, args.prefill // b)), device=device)
    results = {}
    with torch.inference_mode():
        for distinct in mixes:
            rows = [names[i % distinct] for i in range(b)]
            fns = {
                "base": lambda **kw: base(**kw),
                "lora_graph": lambda **kw: lm(adapters=rows, **kw),
                "peft": lambda **kw: peft(adapter_names=rows, **kw),
            }
            out = {"decode_s": {}, "prefill_s": {}}
            for p, fn in fns.items():
                cache = DynamicCache(config=cfg)
                fn(input_ids=ctx_ids, past_key_values=cache, use_cache=True)

                def step(fn=fn, cache=cache):
                    fn(input_ids=step_ids, past_key_values=cache, use_cache=True)
                    cache.crop(-1)

                for _ in range(3):
                    step()
                out["decode_s"][p] = timed(step, args.repeats, device)
                fn(input_ids=pre_ids, use_cache=False)
                out["prefill_s"][p] = timed(lambda fn=fn: fn(input_ids=pre_ids, use_cache=False),
                                            max(3, args.repeats // 4), device)
            for kind in ("decode", "prefill"):
                t = out[f"{kind}_s"]
                out[f"{kind}_ratio"] = {p: t[p] / t["base"] for p in t}
            results[f"{distinct} adapters"] = out
            print(f"{distinct:>3} adapters  decode " + "  ".join(
                f"{p} {out['decode_s'][p] * 1e3:8.3f} ms ({out['decode_ratio'][p]:.3f}x)" for p in fns))
            print(f"{distinct:>3} adapters  prefill " + "  ".join(
                f"{p} {out['prefill_s'][p] * 1e3:8.2f} ms ({out['prefill_ratio'][p]:.3f}x)" for p in fns))
    if args.smoke:
        print("smoke run: nothing written")
        return
    report = {
        "benchmark": "model_gpu", **environment(), "shape": shape, "config": SHAPES[shape], "dtype": str(dtype),
        "batch": b, "context": args.context, "prefill_tokens": pre_ids.numel(), "rank": args.rank,
        "targets": TARGETS, "backend": lm.backend, "results": results,
    }
    write_json(report, args.out)


if __name__ == "__main__":
    main()
