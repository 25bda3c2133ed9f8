"""How fast is the grouped LoRA branch on a GPU: Triton kernels vs the torch path vs a PEFT-style loop?

One LoRA branch ``base + Σ w·s·(B(Ax))`` at Llama-3-8B shapes, bf16 activations and adapters:
    qkvo     K=4096,  N=4096
    gate_up  K=4096,  N=14336
    down     K=14336, N=4096
for decode batches (1 to 256 tokens, one token per row) and prefills (512 to 8192 tokens), with 1,
8, 32 and 128 distinct adapters at rank 16 and a mixed set of 32 adapters at ranks 8/16/32/64
(rows assigned round-robin; configurations with more adapters than tokens are skipped).

Providers, each given everything it can prepare once per forward (lanes, grids, index lists):
    triton          lora_graph.kernels.triton_ops.lora_delta, returns a new tensor
    triton_inplace  the same, adding into the base output (what a patched layer can do)
    torch           lora_graph.kernels.reference.lora_delta: gather, two bmm's, index_add
    peft_loop       PEFT's mixed-batch forward: a Python loop over adapters, x[rows] @ Aᵀ @ Bᵀ
Also timed: building the lanes (once per forward, shared by every layer), and for K = N a fused
shrink of three sibling banks (q/k/v) against three separate shrinks.
Times are medians from triton.testing.do_bench (eager, L2 flushed) and, for decode, from
do_bench_cudagraph (one CUDA graph replay, no launch overhead). Decode rows also report achieved
bandwidth, bytes that must move (the used adapters' A and B, x, base, output) over time, next to the
device's HBM peak. Each configuration is checked against the torch path first (max abs error).

    python benchmarks/bench_kernels.py [--quick] [--shapes qkvo down] [--out benchmarks/results/kernels.json]

Needs a CUDA GPU; without one it exits with a message and writes nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch
from _env import git_commit, write_json

SHAPES = {"qkvo": (4096, 4096), "gate_up": (4096, 14336), "down": (14336, 4096)}
DECODE = (1, 16, 64, 256)
PREFILL = (512, 2048, 8192)
ADAPTERS = ("1", "8", "32", "128", "mixed")
MIXED_RANKS = (8, 16, 32, 64)
PROVIDERS = ("triton", "triton_inplace", "torch", "peft_loop")

# HBM peak in GB/s by device name, for devices whose properties do not give clock and bus width.
HBM_GBPS = {"H200": 4800, "H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900,
            "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555,
            "L40S": 864, "L4": 300, "A10G": 600, "A10": 600, "RTX 4090": 1008}


def hbm_peak_gbps(device: torch.device) -> float | None:
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate
    for name, gbps in HBM_GBPS.items():
        if name in props.name:
            return float(gbps)
    return None


def make_case(k: int, n: int, tokens: int, adapters: str, device, dtype=torch.bfloat16):
    """Bank of the used adapters, per-lane arrays (one adapter per token, round-robin) and inputs."""
    ranks = MIXED_RANKS * 8 if adapters == "mixed" else (16,) * int(adapters)
    num_slots, r = len(ranks), max(ranks)
    gen = torch.Generator(device=device).manual_seed(0)
    rank = torch.tensor(ranks, dtype=torch.int32, device=device)
    past = torch.arange(r, device=device)[None, :] >= rank[:, None]  # (S, R)
    a = torch.randn(num_slots, r, k, generator=gen, device=device, dtype=dtype) / k**0.5
    b = torch.randn(num_slots, n, r, generator=gen, device=device, dtype=dtype) / r**0.5
    a[past] = 0
    b.transpose(1, 2)[past] = 0
    scale = torch.full((num_slots,), 2.0, device=device)
    x = torch.randn(tokens, k, generator=gen, device=device, dtype=dtype)
    base = torch.randn(tokens, n, generator=gen, device=device, dtype=dtype)
    lane_token = torch.arange(tokens, device=device)
    lane_slot = lane_token % num_slots
    lane_weight = torch.ones(tokens, device=device)
    return dict(a=a, b=b, scale=scale, rank=rank, ranks=ranks, x=x, base=base,
                lane_token=lane_token, lane_slot=lane_slot, lane_weight=lane_weight)


def providers(case):
    from lora_graph.kernels import reference
    from lora_graph.kernels.lanes import build_lanes
    from lora_graph.kernels.triton_ops import lora_delta, lora_shrink

    a, b, scale, rank, x, base = (case[key] for key in ("a", "b", "scale", "rank", "x", "base"))
    num_slots, tokens = a.shape[0], x.shape[0]
    lane_args = (case["lane_token"], case["lane_slot"], case["lane_weight"], num_slots)
    lanes = build_lanes(*lane_args, passes=1, num_tokens=tokens)
    # torch path: the plan's (D, M) grid of the used slots (the first D, round-robin); padding
    # lanes have weight 0. The bank's gather of the used slots is cached across layers: not timed.
    used = min(num_slots, tokens)
    a_used, b_used = a[:used].contiguous(), b[:used].contiguous()
    width = -(-tokens // used)
    grid_lane = torch.arange(used, device=x.device)[:, None] + used * torch.arange(width, device=x.device)
    token = grid_lane.clamp(max=tokens - 1).flatten()  # (D*M,)
    coef = torch.where(grid_lane < tokens, scale[:used, None], 0.0)  # (D, M)
    # PEFT's loop over the adapters of the batch: one index list each, built once per forward
    rows = [torch.nonzero(case["lane_slot"] == s).flatten() for s in range(used)]
    scales = scale.tolist()
    scratch = base.clone()

    def peft_loop():
        out = base.clone()
        for s, idx in enumerate(rows):
            r = case["ranks"][s]  # PEFT holds each adapter at its own rank
            sub = x.index_select(0, idx)
            y = (sub @ a[s, :r].T) @ b[s, :, :r].T * scales[s]
            out.index_add_(0, idx, y.to(out.dtype))
        return out

    timed = {
        "triton": lambda: lora_delta(x, base, a, b, None, scale, rank, lanes),
        "triton_inplace": lambda: lora_delta(x, scratch, a, b, None, scale, rank, lanes, inplace=True),
        "torch": lambda: reference.lora_delta(x, base, a_used, b_used, None, token, coef),
        "peft_loop": peft_loop,
    }
    checked = dict(timed, triton_inplace=lambda: lora_delta(x, base.clone(), a, b, None, scale, rank, lanes,
                                                            inplace=True))
    extra = {"lanes": lambda: build_lanes(*lane_args, passes=1, num_tokens=tokens)}
    if a.shape[2] == b.shape[1]:  # q/k/v-like: three sibling banks, one fused shrink vs three
        banks = [a, a.clone(), a.clone()]
        extra["shrink_x3"] = lambda: [lora_shrink(x, bank, rank, lanes) for bank in banks]
        extra["shrink_fused_qkv"] = lambda: lora_shrink(x, banks, [rank] * 3, lanes)
    return timed, checked, extra


def moved_bytes(case) -> int:
    a, x, base = case["a"], case["x"], case["base"]
    k, n = x.shape[1], base.shape[1]
    used = {s % a.shape[0] for s in range(x.shape[0])}
    adapter = sum(case["ranks"][s] * (k + n) for s in used) * a.element_size()
    return adapter + x.numel() * x.element_size() + 2 * base.numel() * base.element_size()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--decode", nargs="+", type=int, default=list(DECODE))
    ap.add_argument("--prefill", nargs="+", type=int, default=list(PREFILL))
    ap.add_argument("--adapters", nargs="+", default=list(ADAPTERS), choices=list(ADAPTERS))
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    ap.add_argument("--quick", action="store_true", help="qkvo only; decode 1, 64; prefill 2048")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "kernels.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); no results written.")
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("bench_kernels.py times compiled kernels; unset TRITON_INTERPRET.")
    if args.quick:
        args.shapes, args.decode, args.prefill = ["qkvo"], [1, 64], [2048]

    import triton
    from triton.testing import do_bench, do_bench_cudagraph

    device = torch.device("cuda")
    peak = hbm_peak_gbps(device)
    results = []
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.inference_mode():
        for shape in args.shapes:
            k, n = SHAPES[shape]
            for phase, token_counts in (("decode", args.decode), ("prefill", args.prefill)):
                for tokens in token_counts:
                    for adapters in args.adapters:
                        if adapters != "mixed" and int(adapters) > tokens:
                            continue  # round-robin would use fewer adapters than named
                        case = make_case(k, n, tokens, adapters, device)
                        fns, checked, extra = providers(case)
                        ref = checked["torch"]().float()
                        row = {"shape": shape, "K": k, "N": n, "phase": phase, "tokens": tokens,
                               "adapters": adapters, "distinct_in_batch": min(len(case["ranks"]), tokens),
                               "ranks": sorted(set(case["ranks"])), "ms": {}, "graph_ms": {},
                               "max_abs_err_vs_torch": {}}
                        for p in args.providers:
                            row["max_abs_err_vs_torch"][p] = (checked[p]().float() - ref).abs().max().item()
                            row["ms"][p] = do_bench(fns[p], return_mode="median")
                            if phase == "decode":
                                row["graph_ms"][p] = do_bench_cudagraph(fns[p], return_mode="median")
                        row["extra_ms"] = {name: do_bench(fn, return_mode="median") for name, fn in extra.items()}
                        if phase == "decode":
                            gb = moved_bytes(case) / 1e9
                            row["bytes"] = moved_bytes(case)
                            row["GBps"] = {p: gb / (t / 1e3) for p, t in row["graph_ms"].items()}
                            row["fraction_of_hbm_peak"] = (
                                {p: v / peak for p, v in row["GBps"].items()} if peak else None
                            )
                        results.append(row)
                        times = "  ".join(
                            f"{p} {row['ms'][p] * 1e3:8.1f}us"
                            + (f" (graph {row['graph_ms'][p] * 1e3:7.1f}us, {row['GBps'][p]:6.0f} GB/s)"
                               if phase == "decode" else "")
                            for p in args.providers
                        )
                        print(f"{shape:>7} {phase:>7} T={tokens:<5} adapters={adapters:<5} {times}", flush=True)
                        del case, fns, checked, extra

    props = torch.cuda.get_device_properties(device)
    out = {
        "benchmark": "kernels",
        "device": props.name,
        "sm_count": props.multi_processor_count,
        "hbm_peak_GBps": peak,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "commit": git_commit(),
        "dtype": "bfloat16",
        "rank": 16,
        "mixed_ranks": list(MIXED_RANKS),
        "timing": "median ms; triton.testing.do_bench (eager) and do_bench_cudagraph (decode)",
        "results": results,
    }
    write_json(out, args.out)


if __name__ == "__main__":
    main()
