"""How fast is the grouped LoRA branch on a GPU: Triton kernels vs a plain torch path vs a PEFT-style loop?

One LoRA branch ``base + Σ w·s·(B(Ax))`` at Llama-3-8B shapes, bf16 activations and adapters:
    qkvo     K=4096,  N=4096
    gate_up  K=4096,  N=14336
    down     K=14336, N=4096
for decode batches (1 to 256 tokens, one token per row) and prefills (512 to 8192 tokens), with 1,
8, 32 and 128 distinct adapters at rank 16 and a mixed set of 32 adapters at ranks 8/16/32/64
(rows assigned round-robin; configurations with more adapters than tokens are skipped).

Providers, each given everything it can prepare once per forward (lanes, grids, index lists):
    triton          lora_graph.kernels.triton_ops.lora_delta over the whole bank, returns a new tensor
    triton_inplace  the same, adding into the base output (what a patched layer does)
    torch           gather the used slots' tokens into a padded (adapters, rows) grid, two bmm's,
                    index_add back: the plain torch way, padded to the largest rank
    peft_loop       PEFT's mixed-batch forward: a Python loop over adapters, x[rows] @ Aᵀ @ Bᵀ
Also timed: building the lanes (once per forward, shared by every layer).

Times are medians from triton.testing.do_bench (eager, L2 flushed) and, for decode, from
do_bench_cudagraph (one CUDA graph replay, no launch overhead). Decode rows also report achieved
bandwidth: bytes that must move (the used adapters' A and B, x, base, output) over the graph time.
It is given as a fraction of the HBM bandwidth measured in the same run by a device-to-device copy
of 1 GiB (read + write), and of the datasheet peak. Each configuration is first checked against
the reference (kernels/reference.py, fp32 accumulation): max abs error per provider.

    python benchmarks/bench_kernels.py [--quick] [--shapes qkvo down] [--out benchmarks/results/kernels.json]

Needs a CUDA GPU; without one it exits with a message and writes nothing. ``sweep`` also runs on
CPU (Triton interpreted, perf_counter timing): gpu_check.py's dry run uses it that way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from _env import environment, use_checkout, write_json

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
    """The datasheet peak (from the memory clock and bus width, else by name); None off CUDA."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate
    for name, gbps in HBM_GBPS.items():
        if name in props.name:
            return float(gbps)
    return None


def timers(device: torch.device):
    """``(eager_ms, graph_ms)``: median milliseconds of ``fn()``. On CUDA, triton's do_bench and
    do_bench_cudagraph; on CPU, a perf_counter median of a few calls, and no graph timer (None)."""
    if device.type == "cuda":
        from triton.testing import do_bench, do_bench_cudagraph

        return (lambda fn: do_bench(fn, warmup=5, rep=25, return_mode="median"),
                lambda fn: do_bench_cudagraph(fn, rep=25, return_mode="median"))

    def cpu_ms(fn, repeats: int = 2) -> float:
        fn()
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)

    return cpu_ms, None


def copy_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured memory bandwidth: a device-to-device copy of ``nbytes`` reads and writes each byte once."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timers(device)[0](lambda: dst.copy_(src))
    return 2 * nbytes / (ms / 1e3) / 1e9


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
    """``(timed, reference, extra)``: the providers' functions, the reference's output, and the
    extra timings."""
    from lora_graph.kernels import reference
    from lora_graph.kernels.factors import Factors
    from lora_graph.kernels.lanes import build_lanes
    from lora_graph.kernels.triton_ops import lora_delta

    a, b, scale, rank, x, base = (case[key] for key in ("a", "b", "scale", "rank", "x", "base"))
    num_slots, tokens, n = a.shape[0], x.shape[0], b.shape[1]
    factors = Factors(a, b, None, scale, rank)
    lane_args = (case["lane_token"], case["lane_slot"], case["lane_weight"], num_slots)
    lanes = build_lanes(*lane_args, passes=1, num_tokens=tokens)
    # torch: a (D, M) grid of the used slots (the first D, round-robin); padding lanes have weight 0.
    # The gather of the used slots' factors is shared by a forward's layers: not timed.
    used = min(num_slots, tokens)
    a_t, b_t = a[:used].transpose(1, 2).contiguous(), b[:used].transpose(1, 2).contiguous()  # (D, K, R), (D, R, N)
    width = -(-tokens // used)
    grid_lane = torch.arange(used, device=x.device)[:, None] + used * torch.arange(width, device=x.device)
    token = grid_lane.clamp(max=tokens - 1).flatten()  # (D*M,)
    coef = torch.where(grid_lane < tokens, scale[:used, None], 0.0)[..., None]  # (D, M, 1)

    def torch_grid():
        h = torch.bmm(x.index_select(0, token).view(used, width, -1), a_t)  # (D, M, R)
        y = torch.bmm(h, b_t).float() * coef  # (D, M, N)
        return base.float().index_add_(0, token, y.view(-1, n)).to(base.dtype)

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
        "triton": lambda: lora_delta(x, base, factors, lanes),
        "triton_inplace": lambda: lora_delta(x, scratch, factors, lanes, inplace=True),
        "torch": torch_grid,
        "peft_loop": peft_loop,
    }
    checked = dict(timed, triton_inplace=lambda: lora_delta(x, base.clone(), factors, lanes, inplace=True))
    want = reference.lora_delta(x, base, factors, lanes).float()
    extra = {"lanes": lambda: build_lanes(*lane_args, passes=1, num_tokens=tokens)}
    return timed, checked, want, extra


def moved_bytes(case) -> int:
    a, x, base = case["a"], case["x"], case["base"]
    k, n = x.shape[1], base.shape[1]
    used = {s % a.shape[0] for s in range(x.shape[0])}
    adapter = sum(case["ranks"][s] * (k + n) for s in used) * a.element_size()
    return adapter + x.numel() * x.element_size() + 2 * base.numel() * base.element_size()


def configs(shapes: dict, decode, prefill, adapters) -> list[tuple]:
    """``(shape, K, N, phase, tokens, adapters)``, decode first, skipping more adapters than tokens."""
    return [(shape, *shapes[shape], phase, tokens, count)
            for phase, token_counts in (("decode", decode), ("prefill", prefill))
            for shape in shapes for tokens in token_counts for count in adapters
            if count == "mixed" or int(count) <= tokens]


def measure(config: tuple, names, device, hbm: dict) -> dict:
    """One configuration: error against the reference and the time of each provider in ``names``."""
    shape, k, n, phase, tokens, adapters = config
    eager_ms, graph_ms = timers(device)
    case = make_case(k, n, tokens, adapters, device)
    fns, checked, want, extra = providers(case)
    row = {"shape": shape, "K": k, "N": n, "phase": phase, "tokens": tokens, "adapters": adapters,
           "distinct_in_batch": min(len(case["ranks"]), tokens), "ranks": sorted(set(case["ranks"])),
           "max_abs_err_vs_reference": {p: (checked[p]().float() - want).abs().max().item() for p in names},
           "ms": {p: eager_ms(fns[p]) for p in names}}
    if phase == "decode" and graph_ms is not None:
        row["graph_ms"] = {p: graph_ms(fns[p]) for p in names}
    row["extra_ms"] = {name: eager_ms(fn) for name, fn in extra.items()}
    if phase == "decode":
        row["bytes"] = moved_bytes(case)
        times = row.get("graph_ms", row["ms"])
        row["GBps"] = {p: row["bytes"] / 1e9 / (t / 1e3) for p, t in times.items()}
        for label, gbps in hbm.items():
            row[f"fraction_of_{label}"] = {p: v / gbps for p, v in row["GBps"].items()} if gbps else None
    return row


def sweep(todo: list[tuple], names, device, hbm: dict, deadline: float | None = None, on_row=None):
    """Measure every configuration in order; ``(rows, skipped)``. With a ``deadline`` (time.time()),
    a configuration that would likely end past it (as long as the slowest so far) is skipped; one
    that raises is listed among the skipped with its error."""
    rows, skipped, slowest = [], [], 0.0
    with torch.inference_mode():
        for config in todo:
            label = "{} {} T={} adapters={}".format(*config[:1], *config[3:])
            if deadline is not None and time.time() + slowest > deadline:
                skipped.append(label)
                continue
            t0 = time.time()
            try:
                row = measure(config, names, device, hbm)
            except Exception as exc:  # noqa: BLE001  one configuration that fails (compile, memory) ends alone
                skipped.append(f"{label}: failed: {type(exc).__name__}: {exc}"[:500])
                print(skipped[-1], flush=True)
                continue
            slowest = max(slowest, time.time() - t0)
            rows.append(row)
            times = "  ".join(f"{p} {row['ms'][p] * 1e3:8.1f}us" + (
                f" ({row['GBps'][p]:6.0f} GB/s)" if "GBps" in row else "") for p in names)
            print(f"{row['shape']:>7} {row['phase']:>7} T={row['tokens']:<5} adapters={row['adapters']:<5} {times}",
                  flush=True)
            if on_row is not None:
                on_row(row)
    return rows, skipped


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
    use_checkout()

    device = torch.device("cuda")
    hbm = {"measured_hbm": copy_gbps(device), "hbm_peak": hbm_peak_gbps(device)}
    todo = configs({s: SHAPES[s] for s in args.shapes}, args.decode, args.prefill, args.adapters)
    rows, _ = sweep(todo, args.providers, device, hbm)
    props = torch.cuda.get_device_properties(device)
    out = {
        "benchmark": "kernels",
        **environment(),
        "sm_count": props.multi_processor_count,
        "measured_hbm_GBps": hbm["measured_hbm"],
        "hbm_peak_GBps": hbm["hbm_peak"],
        "dtype": "bfloat16",
        "rank": 16,
        "mixed_ranks": list(MIXED_RANKS),
        "timing": "median ms; triton.testing.do_bench (eager) and do_bench_cudagraph (decode)",
        "results": rows,
    }
    write_json(out, args.out)


if __name__ == "__main__":
    main()
