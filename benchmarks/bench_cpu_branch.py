"""What does the LoRA branch cost on CPU, next to the base model and to PEFT's mixed batches?

A Llama built from a config (hidden 1024, 4 layers, vocab 1000, random weights), 16 rows,
r=16 adapters on every linear layer. For 1 and 8 distinct adapters in the batch (8 both with the
rows interleaved a0..a7, a0..a7 and in a random order) it times:
- a decode step (one new token per row over a 128-token KV cache),
- a 128-token prefill,
for the base model alone, lora_graph, and PEFT's ``adapter_names`` mixed batch. The three models
share the same base weight tensors (module copies, not weight copies), so no provider gains or
loses from where its weights happen to sit in memory. The providers run interleaved in one process,
one call each per round. Times are medians; a ratio is the median over
rounds of that round's time over the base's time in the same round, so slow drifts of a shared
machine cancel out.

    python benchmarks/bench_cpu_branch.py [--repeats 30] [--out benchmarks/results/cpu_branch.json]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import lora_graph
from _env import environment, write_json

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model, folder: str, count: int, rank: int) -> dict[str, str]:
    paths = {}
    for i in range(count):
        torch.manual_seed(100 + i)
        pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                             init_lora_weights=False))
        path = os.path.join(folder, f"a{i}")
        pm.save_pretrained(path)
        paths[f"a{i}"] = path
    return paths


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s modules that holds the very same parameter and buffer tensors."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def paired_ratios(times: dict[str, list[float]]) -> dict[str, float]:
    """Median over rounds of each provider's time over the base's time in the same round."""
    return {p: statistics.median(t / b for t, b in zip(v, times["base"])) for p, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu_branch.json"))
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512)
    base = LlamaForCausalLM(cfg).eval()
    folder = tempfile.mkdtemp()
    paths = make_adapters(base, folder, 8, args.rank)

    lg_model = shared_copy(base)
    lm = lora_graph.wrap(lg_model)
    for name, path in paths.items():
        lm.load_adapter(name, path)
    names = list(paths)
    peft = PeftModel.from_pretrained(shared_copy(base), paths[names[0]], adapter_name=names[0])
    weights = {t.data_ptr() for t in base.parameters()}  # one set of base weights for all three
    assert weights == {t.data_ptr() for t in lg_model.parameters()}
    assert weights <= {t.data_ptr() for t in peft.parameters()}
    for name in names[1:]:
        peft.load_adapter(paths[name], adapter_name=name)
    peft.eval()

    b, ctx = args.batch, args.context
    ids = torch.randint(0, cfg.vocab_size, (b, ctx))
    step_ids = torch.randint(0, cfg.vocab_size, (b, 1))
    shuffled = torch.randperm(b, generator=torch.Generator().manual_seed(0)).tolist()
    mixes = {
        "1 adapter": [names[0]] * b,
        # rows interleaved a0..a7, a0..a7: each adapter's rows are a strided view of the batch
        "8 adapters": [names[i % 8] for i in range(b)],
        # the same rows in a random order: the general case, gathered and scattered by index
        "8 adapters, shuffled": [names[i % 8] for i in shuffled],
    }

    def providers(rows):
        return {
            "base": lambda **kw: base(**kw),
            "lora_graph": lambda **kw: lm(adapters=rows, **kw),
            "peft": lambda **kw: peft(adapter_names=rows, **kw),
        }

    results = {}
    with torch.inference_mode():
        for mix, rows in mixes.items():
            fns = providers(rows)
            # decode: one token per row over a ctx-long cache, cropped back after each step
            caches = {}
            for p, fn in fns.items():
                cache = DynamicCache(config=cfg)
                fn(input_ids=ids, past_key_values=cache, use_cache=True)
                caches[p] = cache
            times = {p: [] for p in fns}
            for _ in range(3):
                for p, fn in fns.items():
                    fn(input_ids=step_ids, past_key_values=caches[p], use_cache=True)
                    caches[p].crop(-1)
            for _ in range(args.repeats):
                for p, fn in fns.items():
                    t0 = time.perf_counter()
                    fn(input_ids=step_ids, past_key_values=caches[p], use_cache=True)
                    times[p].append(time.perf_counter() - t0)
                    caches[p].crop(-1)
            decode = {p: statistics.median(v) * 1e3 for p, v in times.items()}
            decode_ratio = paired_ratios(times)
            # prefill: ctx tokens per row, no cache
            times = {p: [] for p in fns}
            for _ in range(2):
                for fn in fns.values():
                    fn(input_ids=ids, use_cache=False)
            for _ in range(max(5, args.repeats // 3)):
                for p, fn in fns.items():
                    t0 = time.perf_counter()
                    fn(input_ids=ids, use_cache=False)
                    times[p].append(time.perf_counter() - t0)
            prefill = {p: statistics.median(v) * 1e3 for p, v in times.items()}
            prefill_ratio = paired_ratios(times)
            results[mix] = {
                "decode_ms": decode,
                "prefill_ms": prefill,
                "decode_ratio": decode_ratio,
                "prefill_ratio": prefill_ratio,
            }
            print(f"{mix:>20}  decode  " + "  ".join(f"{p} {decode[p]:7.2f} ms ({decode_ratio[p]:.3f}x)" for p in decode))
            print(f"{mix:>20}  prefill " + "  ".join(f"{p} {prefill[p]:7.1f} ms ({prefill_ratio[p]:.3f}x)" for p in prefill))

    out = {
        "benchmark": "cpu_branch",
        **environment(),
        "model": {"hidden": 1024, "intermediate": 2816, "layers": 4, "vocab": 1000, "heads": 16},
        "batch": b, "context": ctx, "rank": args.rank, "targets": TARGETS, "repeats": args.repeats,
        "results": results,
    }
    write_json(out, args.out)


if __name__ == "__main__":
    main()
