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

DoRA: the same for 1 and 8 DoRA adapters (``use_dora=True``, same ranks and targets, rows
interleaved), in a second wrapper over the same base weights, timed in the same rounds as the LoRA
wrapper on the same row pattern. ``dora_over_lora`` is the median over rounds of the DoRA time over
the LoRA time. PEFT has no DoRA mixed batch (``adapter_names`` refuses DoRA), so it is left out.

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


def make_adapters(model, folder: str, count: int, rank: int, dora: bool = False) -> dict[str, str]:
    paths = {}
    prefix = "d" if dora else "a"
    for i in range(count):
        torch.manual_seed(100 + i)
        pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                             init_lora_weights=False, use_dora=dora))
        path = os.path.join(folder, f"{prefix}{i}")
        pm.save_pretrained(path)
        paths[f"{prefix}{i}"] = path
    return paths


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s modules that holds the very same parameter and buffer tensors."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def paired_ratios(times: dict[str, list[float]], over: str = "base") -> dict[str, float]:
    """Median over rounds of each provider's time over ``over``'s time in the same round."""
    return {p: statistics.median(t / b for t, b in zip(v, times[over])) for p, v in times.items()}


def time_mix(fns, cfg, ids, step_ids, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Per provider, the times of its decode steps and prefills, the providers interleaved."""
    # decode: one token per row over a ctx-long cache, cropped back after each step
    caches = {}
    for p, fn in fns.items():
        cache = DynamicCache(config=cfg)
        fn(input_ids=ids, past_key_values=cache, use_cache=True)
        caches[p] = cache
    decode = {p: [] for p in fns}
    for _ in range(3):
        for p, fn in fns.items():
            fn(input_ids=step_ids, past_key_values=caches[p], use_cache=True)
            caches[p].crop(-1)
    for _ in range(repeats):
        for p, fn in fns.items():
            t0 = time.perf_counter()
            fn(input_ids=step_ids, past_key_values=caches[p], use_cache=True)
            decode[p].append(time.perf_counter() - t0)
            caches[p].crop(-1)
    # prefill: ctx tokens per row, no cache
    prefill = {p: [] for p in fns}
    for _ in range(2):
        for fn in fns.values():
            fn(input_ids=ids, use_cache=False)
    for _ in range(max(5, repeats // 3)):
        for p, fn in fns.items():
            t0 = time.perf_counter()
            fn(input_ids=ids, use_cache=False)
            prefill[p].append(time.perf_counter() - t0)
    return {"decode": decode, "prefill": prefill}


def summary(times: dict[str, dict[str, list[float]]]) -> dict:
    out = {}
    for phase, per in times.items():
        out[f"{phase}_ms"] = {p: statistics.median(v) * 1e3 for p, v in per.items()}
        out[f"{phase}_ratio"] = paired_ratios(per)
        if "lora_graph_dora" in per:
            out[f"{phase}_dora_over_lora"] = paired_ratios(per, "lora_graph")["lora_graph_dora"]
    return out


def report(mix: str, result: dict) -> None:
    for phase in ("decode", "prefill"):
        ms, ratio = result[f"{phase}_ms"], result[f"{phase}_ratio"]
        line = "  ".join(f"{p} {ms[p]:7.2f} ms ({ratio[p]:.3f}x)" for p in ms)
        if f"{phase}_dora_over_lora" in result:
            line += f"  dora/lora {result[f'{phase}_dora_over_lora']:.3f}x"
        print(f"{mix:>20}  {phase:7s} {line}")


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

    dora_paths = make_adapters(base, folder, 8, args.rank, dora=True)

    lg_model = shared_copy(base)
    lm = lora_graph.wrap(lg_model)
    for name, path in paths.items():
        lm.load_adapter(name, path)
    names = list(paths)
    dora_model = shared_copy(base)
    lm_dora = lora_graph.wrap(dora_model)
    for name, path in dora_paths.items():
        lm_dora.load_adapter(name, path)
    dora_names = list(dora_paths)
    peft = PeftModel.from_pretrained(shared_copy(base), paths[names[0]], adapter_name=names[0])
    weights = {t.data_ptr() for t in base.parameters()}  # one set of base weights for all of them
    assert weights == {t.data_ptr() for t in lg_model.parameters()} == {t.data_ptr() for t in dora_model.parameters()}
    assert weights <= {t.data_ptr() for t in peft.parameters()}
    for name in names[1:]:
        peft.load_adapter(paths[name], adapter_name=name)
    peft.eval()

    b, ctx = args.batch, args.context
    ids = torch.randint(0, cfg.vocab_size, (b, ctx))
    step_ids = torch.randint(0, cfg.vocab_size, (b, 1))
    shuffled = torch.randperm(b, generator=torch.Generator().manual_seed(0)).tolist()
    mixes = {
        "1 adapter": [0] * b,
        # rows interleaved a0..a7, a0..a7: each adapter's rows are a strided view of the batch
        "8 adapters": [i % 8 for i in range(b)],
        # the same rows in a random order: the general case, gathered and scattered by index
        "8 adapters, shuffled": [i % 8 for i in shuffled],
    }
    dora_mixes = {"1 DoRA adapter": mixes["1 adapter"], "8 DoRA adapters": mixes["8 adapters"]}

    results = {}
    with torch.inference_mode():
        for mix, rows in {**mixes, **dora_mixes}.items():
            lora_rows = [names[i] for i in rows]
            fns = {"base": lambda **kw: base(**kw), "lora_graph": lambda rows=lora_rows, **kw: lm(adapters=rows, **kw)}
            if mix in dora_mixes:
                dora_rows = [dora_names[i] for i in rows]
                fns["lora_graph_dora"] = lambda rows=dora_rows, **kw: lm_dora(adapters=rows, **kw)
            else:
                fns["peft"] = lambda rows=lora_rows, **kw: peft(adapter_names=rows, **kw)
            results[mix] = summary(time_mix(fns, cfg, ids, step_ids, args.repeats))
            report(mix, results[mix])

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
