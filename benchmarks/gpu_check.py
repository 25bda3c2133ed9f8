"""Every GPU figure of lora_graph from one prepared command of about 8 minutes.

    python benchmarks/gpu_check.py                    # CUDA: benchmarks/results/gpu_<part>.json, then a summary
    python benchmarks/gpu_check.py --parts kernels model
    python benchmarks/gpu_check.py --dry-run          # CPU, toy sizes: checks the script; JSON to a temp folder

The check runs once, on a machine that nobody can debug interactively. So each part runs in its own
Python process under its own time limit: a hang, a CUDA error or an out-of-memory in one part costs
only that part. In order:

    part        limit  what
    kernels      60 s  Triton lora_delta / shrink / expand / embedding against kernels/reference.py, fp16
                       and bf16; odd sizes (2049, 3000), mixed ranks 4-64, adapter popularity distinct,
                       uniform, zipf, identical, skewed; weighted sets with negative weights; LoRA bias.
                       Rule: |kernel - ref32| <= 2·|torch_same_dtype - ref32| + atol (tests/test_kernels.py)
    model        75 s  a Llama with 8B shapes (hidden 4096, intermediate 14336, GQA 32/8), 2 blocks,
                       bf16: lora_graph's triton backend against PEFT adapter_names per row, with PEFT on
                       an fp32 copy as the oracle, and against lora_graph's torch backend
    bandwidth    85 s  bench_kernels.py at decode (T=32, 128) and prefill (T=2048) shapes, 1-128 adapters:
                       GB/s over the HBM bandwidth measured by a device copy in the same process
    decode      150 s  bench_model_gpu.py at 8B shapes, 4 blocks, r=16 on every linear layer: decode and
                       a 2k-token prefill against the base and PEFT, with 1, 8, 32 adapters at batch 32 and
                       1, 8, 32, 64 at batch 64 (64 distinct adapters need 64 rows)
    loads        40 s  the pinned host-to-device bandwidth, and bench_load.py's Llama-8B-shaped r=16
                       adapter load as a fraction of a pinned copy of the same bytes
    cudagraphs   70 s  torch.compile(mode="reduce-overhead") over the triton backend (a one-block Llama,
                       hidden 1024, in fp32 so that compiled-vs-eager noise is far below any routing
                       error): routing, weighted sets and resident adapters (loads and evictions within
                       max_loaded) change between calls; recompiles are counted (error_on_recompile and
                       dynamo's graph counter) and every output is compared with eager

The limits sum to 8 minutes; time a part leaves unused goes to the parts after it. Each part works
through its list in order of importance, stops when its deadline nears, and records what it skipped.
It rewrites its JSON after every step (status "running"), so what it measured before a crash or a
kill survives; the runner then marks it "timeout" or "crashed" and adds the end of its output. A
part that raises writes status "failed" with the error and its traceback. The JSON records the
device, the torch, CUDA and triton versions and the commit (with the sources' digest, since a copy
of the tree may have no git history). A part's status says whether its code ran; its checks say
whether the figures meet the targets. The summary prints both, and a miss as a miss.

``--dry-run`` runs the same parts on the CPU at toy sizes, with the kernels in Triton's interpreter
(TRITON_INTERPRET=1 is set for the part processes, before anything imports triton) and
torch.compile's aot_eager backend in place of inductor's CUDA graphs, two parts at a time. It writes
to a temporary folder (never to benchmarks/results), and tests/test_gpu_check.py runs it. Its
figures mean nothing; its correctness checks hold at any size.

The parts import lora_graph from this checkout, installed or not (_env.use_checkout).
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# name: (time limit on a GPU, time limit of a dry run), seconds; a dry run's limits only stop a hang
PARTS = {"kernels": (60, 90), "model": (75, 100), "bandwidth": (85, 90), "decode": (150, 90), "loads": (40, 90),
         "cudagraphs": (70, 120)}

# key: (part, what is measured, comparison, limit); the figures a part checks, in the summary's order
TARGETS = {
    "decode_32": ("decode", "decode, 32 distinct adapters, batch 32: time / base", "<=", 1.15),
    "decode_flat": ("decode", "decode, 1 to 64 distinct adapters, batch 64: slowest / fastest", "<=", 1.05),
    "prefill": ("decode", "2k-token prefill, batch 32: time / base, worst of 1-32 adapters", "<=", 1.10),
    "hbm_fraction": ("bandwidth", "shrink+expand, decode T=128, 128 adapters: of measured HBM, worst shape",
                     ">=", 0.70),
    "load_fraction": ("loads", "Llama-8B r=16 adapter load: of a pinned H2D copy of its bytes", ">=", 0.50),
    "peft_speedup": ("decode", "decode, 8 adapters, batch 32: PEFT adapter_names time / lora_graph", ">=", 2.0),
    "kernel_cases": ("kernels", "kernel cases outside the tolerance rule", "<=", 0),
    "model_rows": ("model", "model, an adapter per row: triton error / bound (PEFT fp32 oracle)", "<=", 1.0),
    "model_torch": ("model", "model, an adapter per row: torch backend error / bound", "<=", 1.0),
    "model_weighted": ("model", "model, weighted sets: triton error / bound (torch path in fp32)", "<=", 1.0),
    "model_base_rows": ("model", "model, rows without adapter: max |logit - base logit|", "<=", 0.0),
    "model_effect": ("model", "model, the adapters' effect on logits / bound (the check means something)",
                     ">=", 4.0),
    "cudagraph_recompiles": ("cudagraphs", "reduce-overhead: recompiles once each kind of call is seen", "<=", 0),
    "cudagraph_mismatches": ("cudagraphs", "reduce-overhead: calls whose output is off eager's", "<=", 0),
}


# -- one part, in its own process ---------------------------------------------------------------------


class Report:
    """One part's JSON, rewritten after every step so that what the part measured outlives it."""

    def __init__(self, part: str, path: Path, deadline: float, limit: float, dry: bool) -> None:
        self.path, self.deadline, self.dry, self.start = path, deadline, dry, time.time()
        self.data = {"part": part, "status": "running", "dry_run": dry, "limit_s": limit, "elapsed_s": 0.0,
                     "env": {}, "checks": {}, "skipped": [], "results": {}}
        self.save()

    @property
    def results(self) -> dict:
        return self.data["results"]

    def left(self) -> float:
        """Seconds to this part's deadline."""
        return self.deadline - time.time()

    def set(self, key: str, value) -> None:
        self.results[key] = value
        self.save()

    def add(self, key: str, value) -> None:
        self.results.setdefault(key, []).append(value)
        self.save()

    def skip(self, what: str) -> None:
        self.data["skipped"].append(what)
        self.save()

    def check(self, key: str, value, note: str = "") -> None:
        """Record a figure against its target in TARGETS; None when it could not be measured."""
        _, what, op, limit = TARGETS[key]
        met = None if value is None else bool(value <= limit if op == "<=" else value >= limit)
        self.data["checks"][key] = {"what": what, "value": value, "target": f"{op} {limit:g}", "met": met,
                                    "note": note}
        self.save()

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.time() - self.start, 2)
        write_atomic(self.path, self.data)


def write_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def start_part(report: Report):
    """Import the stack, pick the device and record the environment; the part's device."""
    if report.dry and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("a dry run needs TRITON_INTERPRET=1 before triton is imported (the runner sets it)")
    from _env import environment, use_checkout

    use_checkout()
    import triton

    import lora_graph

    if report.dry:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (torch.cuda.is_available() is False); on a CPU, use --dry-run")
    else:
        device = torch.device("cuda")
    env = {**environment(), "triton": triton.__version__, "lora_graph": lora_graph.__file__,
           # Triton builds its launchers with the host C compiler: none, and no kernel can run
           "c_compiler": os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                   gpu_memory_GiB=round(props.total_memory / 2**30, 1))
    report.data["env"] = env
    report.data["ready_s"] = round(time.time() - report.start, 2)  # imports and device start-up
    report.save()
    print(f"{env['device']}, torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, "
          f"commit {env['commit'][:12]}", flush=True)
    return device


def part_main(args) -> None:
    """One part, in this process: its JSON ends "ok", or "failed" with the error."""
    report = Report(args.part, Path(args.out), args.deadline, args.limit, args.dry_run)
    try:
        device = start_part(report)
        PART_FUNCTIONS[args.part](report, device)
    except BaseException as exc:  # noqa: BLE001  a part's failure is its result
        report.data.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000],
                           traceback=traceback.format_exc()[-4000:])
        report.save()
        traceback.print_exc()
        sys.exit(1)
    report.data["status"] = "ok"
    report.save()


# -- kernels: the Triton ops against their reference ---------------------------------------------------

MIXED = (4, 8, 16, 32, 64)
# linear: (T, K, N, ranks, S, popularity, lanes per weighted set, LoRA bias, fp32 adapters)
# embedding: (T, vocab, N, ranks, S, popularity, lanes per weighted set, embed_scale)
# In order of importance (a part stops at its deadline); each runs in bf16, then in fp16.
KERNEL_CASES = [
    ("linear", (32, 4096, 4096, (16,), 32, "distinct", 1, False, False)),  # a decode step, an adapter per row
    ("linear", (7, 3000, 2049, MIXED, 5, "zipf", 3, True, False)),  # odd sizes, weighted sets of three
    ("linear", (2048, 4096, 2049, MIXED, 16, "zipf", 1, False, False)),  # a prefill
    ("embedding", (256, 32000, 4096, MIXED, 8, "uniform", 2, None)),
    ("linear", (128, 14336, 4096, MIXED, 64, "uniform", 2, False, False)),
    ("linear", (64, 3000, 4096, MIXED, 8, "uniform", 2, True, True)),  # fp32 adapters (the library's default)
    ("linear", (1, 4096, 14336, (16,), 4, "identical", 1, False, False)),
    ("linear", (300, 2049, 3000, (64,), 8, "skewed", 2, True, False)),
    ("embedding", (33, 32000, 3000, (16,), 4, "zipf", 1, 8.0)),
    ("linear", (2048, 2049, 4096, (4,), 3, "identical", 2, True, False)),
    ("linear", (512, 14336, 3000, (32,), 32, "distinct", 3, False, False)),
    ("linear", (256, 4096, 4096, (16, 64), 128, "skewed", 1, False, True)),
]
DRY_KERNEL_CASES = [("linear", (7, 129, 100, MIXED, 5, "zipf", 3, True, False)),
                    ("embedding", (9, 300, 100, (16, 4), 3, "uniform", 2, 8.0)),
                    ("linear", (16, 100, 129, (16,), 4, "distinct", 1, False, True))]
ATOL = {"torch.float16": 2e-3, "torch.bfloat16": 1e-2, "torch.float32": 1e-4}


def make_lanes(num_tokens: int, num_slots: int, popularity: str, multi: int, gen):
    """Per-lane arrays, as tests/test_kernels.py makes them: one lane per token drawn by ``popularity``
    (15% of tokens with none), and weighted sets of ``multi`` lanes (weights of both signs) on every
    third token."""
    t = torch.arange(num_tokens)
    if popularity == "identical":
        slot = torch.full((num_tokens,), num_slots - 1)
    elif popularity == "distinct":
        slot = t % num_slots
    elif popularity == "uniform":
        slot = torch.randint(0, num_slots, (num_tokens,), generator=gen)
    elif popularity == "zipf":
        p = 1.0 / torch.arange(1, num_slots + 1, dtype=torch.float64) ** 1.2
        slot = torch.multinomial(p, num_tokens, replacement=True, generator=gen)
    else:  # skewed
        slot = torch.where(torch.rand(num_tokens, generator=gen) < 0.9, 0,
                           torch.randint(0, num_slots, (num_tokens,), generator=gen))
    slot = torch.where(torch.rand(num_tokens, generator=gen) < 0.15, -1, slot)
    tokens, slots, weights = [t], [slot], [torch.ones(num_tokens)]
    if multi > 1:
        wset = t[::3]
        first = torch.randint(0, num_slots, (wset.numel(),), generator=gen)
        for j in range(multi):
            tokens.append(wset)
            slots.append((first + j) % num_slots)
            weights.append(torch.randn(wset.numel(), generator=gen))
        slot[wset] = -1  # these tokens use the weighted set only
    return torch.cat(tokens), torch.cat(slots), torch.cat(weights)


def make_bank(num_slots: int, k: int, n: int, ranks, dtype, bias: bool, gen, device):
    """``(factors, factors_nan)``: a bank as the library keeps it (zeros past each slot's rank), and
    the same with NaN there, for the kernels, which must never read past a slot's rank."""
    from lora_graph.kernels.factors import Factors

    r = max(ranks)
    rank = torch.tensor([ranks[s % len(ranks)] for s in range(num_slots)], dtype=torch.int32)
    a = torch.randn(num_slots, r, k, generator=gen) / k**0.5
    b = torch.randn(num_slots, n, r, generator=gen) / r**0.5
    past = torch.arange(r)[None, :] >= rank[:, None]  # (S, R)
    a[past] = 0.0
    b.transpose(1, 2)[past] = 0.0
    a_nan, b_nan = a.clone(), b.clone()
    a_nan[past] = float("nan")
    b_nan.transpose(1, 2)[past] = float("nan")
    bias_t = torch.randn(num_slots, n, generator=gen).to(device, dtype) if bias else None
    scale = (torch.rand(num_slots, generator=gen) * 2 + 0.25).to(device)
    rank = rank.to(device)
    return (Factors(a.to(device, dtype), b.to(device, dtype), bias_t, scale, rank),
            Factors(a_nan.to(device, dtype), b_nan.to(device, dtype), bias_t, scale, rank))


def rule(out, ref32, same, atol: float) -> dict:
    """The project's tolerance rule: max|out - ref32| <= 2·max|same - ref32| + atol."""
    err = (out.float() - ref32.float()).abs().max().item() if out.numel() else 0.0
    bound = 2 * ((same.float() - ref32.float()).abs().max().item() if out.numel() else 0.0) + atol
    ok = bool(torch.isfinite(out).all()) and out.dtype == same.dtype and err <= bound
    return {"err": err, "bound": bound, "ok": ok}


# The one place that calls the kernels and their references (kernels/triton_ops.py, kernels/reference.py).


def linear_checks(x, base, factors, with_nan, lanes, untouched, atol: float) -> dict:
    """lora_delta (new and in place), lora_shrink and lora_expand on one case."""
    from lora_graph.kernels import reference, triton_ops

    f32 = factors._replace(a=factors.a.float(), b=factors.b.float(),
                           bias=None if factors.bias is None else factors.bias.float())
    ref32 = reference.lora_delta(x.float(), base.float(), f32, lanes)
    out = triton_ops.lora_delta(x, base, with_nan, lanes)
    inplace = triton_ops.lora_delta(x, base.clone(), with_nan, lanes, inplace=True)
    h = triton_ops.lora_shrink(x, with_nan, lanes).sum(0)  # (L, R)
    h_ref = reference.lora_shrink(x.float(), f32, lanes)  # (1, L, R)
    covered = torch.zeros(h.shape, dtype=torch.bool, device=h.device)  # (L, R) what the shrink writes
    for p in range(lanes.num_passes):
        tables = (lanes.chunk_slot[p].tolist(), lanes.chunk_start[p].tolist(), lanes.chunk_end[p].tolist())
        for s, start, end in zip(*tables):
            if s >= 0:
                covered[start:end, : int(factors.rank[s])] = True
    shrink_tol = ATOL["torch.float32"] * max(1.0, h_ref.abs().max().item())
    expand = triton_ops.lora_expand(h_ref, base, with_nan, lanes)
    return {
        "lora_delta": rule(out, ref32, reference.lora_delta(x, base, factors, lanes), atol),
        "in_place_equal": {"ok": bool(torch.equal(inplace, out))},
        "lora_shrink": rule(h[covered], h_ref[0][covered], h_ref[0][covered], shrink_tol),
        "lora_expand": rule(expand, reference.lora_expand(h_ref, base.float(), f32, lanes),
                            reference.lora_expand(h_ref, base, factors, lanes), atol),
        "rows_without_lanes_equal_base": {"ok": bool(torch.equal(out[untouched], base[untouched]))},
    }


def embedding_checks(ids, base, factors, with_nan, lanes, embed_scale, atol: float) -> dict:
    from lora_graph.kernels import reference, triton_ops

    f32 = factors._replace(a=factors.a.float(), b=factors.b.float(), bias=None)
    out = triton_ops.lora_embedding_delta(ids, base, with_nan, lanes, embed_scale=embed_scale)
    return {"lora_embedding_delta": rule(
        out, reference.lora_embedding_delta(ids, base.float(), f32, lanes, embed_scale),
        reference.lora_embedding_delta(ids, base, factors, lanes, embed_scale), atol)}


def kernel_case(kind: str, case: tuple, dtype, device, seed: int) -> dict:
    """Inputs of one case, and its checks."""
    from lora_graph.kernels.lanes import build_lanes

    gen = torch.Generator().manual_seed(seed)
    t, k, n, ranks, num_slots, popularity, multi = case[:7]
    adapter_dtype = torch.float32 if kind == "linear" and case[8] else dtype
    factors, with_nan = make_bank(num_slots, k, n, ranks, adapter_dtype, kind == "linear" and case[7],
                                  gen, device)
    tok, slot, w = make_lanes(t, num_slots, popularity, multi, gen)
    lanes = build_lanes(tok.to(device), slot.to(device), w.to(device), num_slots, passes=multi, num_tokens=t)
    base = torch.randn(t, n, generator=gen).to(device, dtype)
    if kind == "embedding":
        scaled = [f._replace(a=f.a * k**0.5) for f in (factors, with_nan)]  # embedding A columns are O(1)
        ids = torch.randint(0, k, (t,), generator=gen).to(device)
        return embedding_checks(ids, base, *scaled, lanes, case[7], ATOL[str(dtype)])
    untouched = torch.ones(t, dtype=torch.bool)
    untouched[tok[(slot >= 0) & (w != 0)]] = False
    x = torch.randn(t, k, generator=gen).to(device, dtype)
    return linear_checks(x, base, factors, with_nan, lanes, untouched.to(device), ATOL[str(dtype)])


def part_kernels(report: Report, device) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    todo = [(kind, case, dtype) for kind, case in (DRY_KERNEL_CASES if report.dry else KERNEL_CASES)
            for dtype in (torch.bfloat16, torch.float16)]
    slowest, failed = 0.0, 0
    for i, (kind, case, dtype) in enumerate(todo):
        name = f"{kind} {str(dtype)[6:]} T={case[0]} K={case[1]} N={case[2]} ranks={case[3]} S={case[4]} " \
               f"{case[5]} lanes/token={case[6]}"
        if time.time() + slowest > report.deadline:
            report.skip(name)
            continue
        t0 = time.time()
        try:
            checks = kernel_case(kind, case, dtype, device, seed=i)
        except Exception as exc:  # noqa: BLE001  a case that cannot compile or launch fails alone
            checks = {"error": {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:1000]}}
            traceback.print_exc()
        slowest = max(slowest, time.time() - t0)
        ok = all(c["ok"] for c in checks.values())
        failed += not ok
        report.add("cases", {"case": name, "ok": ok, "checks": checks, "s": round(time.time() - t0, 2)})
        print(f"{'ok  ' if ok else 'FAIL'} {name}" + "".join(
            f"  {key} {c['err']:.2g}/{c['bound']:.2g}" for key, c in checks.items() if "err" in c), flush=True)
    done = len(report.results.get("cases", []))
    report.check("kernel_cases", failed if done else None,
                 f"{done - failed} of {done} cases pass, {len(todo) - done} skipped")


# -- model: lora_graph against PEFT at 8B shapes ---------------------------------------------------------

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
TOY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name: (rank, targets); a1 and a2 leave some modules without that slot (rank 0 there)
MODEL_ADAPTERS = {"a0": (16, LINEAR), "a1": (8, LINEAR[:4]), "a2": (4, LINEAR[4:]), "a3": (32, LINEAR),
                  "a4": (64, LINEAR), "a5": (16, ["q_proj", "v_proj", "down_proj"])}
MODEL_ROWS = ["a0", "a1", "a2", "a3", "a4", "a5", None, "a3"]
MODEL_WEIGHTED = [{"a0": 0.5, "a3": -1.0}, {"a1": 1.0, "a2": 1.0, "a4": -0.25}, "a5", None, {"a5": -2.0}, "a0",
                  {"a2": 0.75, "a4": 0.5}, None]


def llama(report: Report, device, layers: int, dtype, **shape):
    """A Llama from a config with random weights (8B shapes, or toy ones in a dry run)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = dict(TOY_LLAMA if report.dry else LLAMA_8B, vocab_size=256 if report.dry else 32000)
    cfg = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=4096, **{**dims, **shape})
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(dtype).eval()


def write_adapters(model, folder: str, specs: dict, std: float) -> dict[str, str]:
    from bench_load import write_adapter

    return {name: write_adapter(model, os.path.join(folder, name), rank, targets, seed=i, std=std)
            for i, (name, (rank, targets)) in enumerate(specs.items())}


def peft_logits(model, paths: dict, ids, rows) -> torch.Tensor:
    from peft import PeftModel

    names = list(paths)
    peft = PeftModel.from_pretrained(model, paths[names[0]], adapter_name=names[0]).eval()
    for name in names[1:]:
        peft.load_adapter(paths[name], adapter_name=name)
    with torch.inference_mode():
        return peft(input_ids=ids, adapter_names=["__base__" if r is None else r for r in rows]).logits.float()


def lora_graph_logits(model, paths: dict, ids, specs: list, backend: str, dtype) -> list[torch.Tensor]:
    import lora_graph

    lm = lora_graph.wrap(model, backend=backend, adapter_dtype=dtype, progress=False)
    lm.load_adapters(paths)
    with torch.inference_mode():
        return [lm(input_ids=ids, adapters=spec).logits.float() for spec in specs]


def part_model(report: Report, device) -> None:
    from bench_cpu_branch import shared_copy

    bf16 = torch.bfloat16
    model32 = llama(report, device, 2, torch.float32)
    model16 = copy.deepcopy(model32).to(bf16)  # the same weights, rounded
    ids = torch.randint(0, model16.config.vocab_size, (len(MODEL_ROWS), 4 if report.dry else 32),
                        generator=torch.Generator().manual_seed(0)).to(device)
    # interpreted kernels cost per program, and one rank block of 16 is a quarter of rank 64's
    adapters = {n: (min(r, 16) if report.dry else r, t) for n, (r, t) in MODEL_ADAPTERS.items()}
    report.set("setup", {"layers": 2, "rows": MODEL_ROWS, "weighted": MODEL_WEIGHTED, "tokens": list(ids.shape),
                         "adapters": {n: {"rank": r, "targets": t} for n, (r, t) in adapters.items()}})
    with tempfile.TemporaryDirectory(prefix="gpu_check_model_") as folder:
        paths = write_adapters(model16, folder, adapters, std=0.03)
        with torch.inference_mode():
            base = model16(input_ids=ids).logits.float()
        logits = {"peft32": peft_logits(shared_copy(model32), paths, ids, MODEL_ROWS),
                  "peft16": peft_logits(shared_copy(model16), paths, ids, MODEL_ROWS)}
        print("PEFT done", flush=True)
        specs = [MODEL_ROWS, MODEL_WEIGHTED]
        logits["triton"], logits["triton_weighted"] = lora_graph_logits(shared_copy(model16), paths, ids, specs,
                                                                        "triton", bf16)
        logits["torch"], logits["torch_weighted"] = lora_graph_logits(shared_copy(model16), paths, ids, specs,
                                                                      "torch", bf16)
        logits["torch32_weighted"] = lora_graph_logits(shared_copy(model32), paths, ids, [MODEL_WEIGHTED], "torch",
                                                       torch.float32)[0]
    model_checks(report, base, logits)


def model_checks(report: Report, base, logits: dict) -> None:
    """The tolerance rule at model level: an error against the fp32 oracle within twice the bf16
    oracle's own error plus 1% of the largest logit."""
    def err(a, b):
        return (a - b).abs().max().item()

    ref, ref_w = logits["peft32"], logits["torch32_weighted"]
    atol = 0.01 * ref.abs().max().item()
    bound = 2 * err(logits["peft16"], ref) + atol
    bound_w = 2 * err(logits["torch_weighted"], ref_w) + atol
    plain = [i for i, r in enumerate(MODEL_ROWS) if r is None]
    adapted = [i for i, r in enumerate(MODEL_ROWS) if r is not None]
    figures = {
        "max_abs_logit": ref.abs().max().item(), "atol": atol, "bound": bound, "bound_weighted": bound_w,
        "peft_bf16_vs_fp32": err(logits["peft16"], ref), "triton_vs_fp32": err(logits["triton"], ref),
        "torch_vs_fp32": err(logits["torch"], ref), "triton_vs_peft_bf16": err(logits["triton"], logits["peft16"]),
        "triton_vs_torch": err(logits["triton"], logits["torch"]),
        "triton_vs_fp32_per_row": [err(logits["triton"][i], ref[i]) for i in range(len(MODEL_ROWS))],
        "weighted_triton_vs_fp32": err(logits["triton_weighted"], ref_w),
        "weighted_torch_vs_fp32": err(logits["torch_weighted"], ref_w),
        "weighted_triton_vs_torch": err(logits["triton_weighted"], logits["torch_weighted"]),
        "base_rows_triton": err(logits["triton"][plain], base[plain]),
        "base_rows_torch": err(logits["torch"][plain], base[plain]),
        "effect": err(logits["peft16"][adapted], base[adapted]),
    }
    report.set("logits", figures)
    note = f"err {figures['triton_vs_fp32']:.3g}, bound {bound:.3g}"
    report.check("model_rows", figures["triton_vs_fp32"] / bound, note)
    report.check("model_torch", figures["torch_vs_fp32"] / bound, f"err {figures['torch_vs_fp32']:.3g}")
    report.check("model_weighted", figures["weighted_triton_vs_fp32"] / bound_w,
                 f"err {figures['weighted_triton_vs_fp32']:.3g}, bound {bound_w:.3g}")
    report.check("model_base_rows", max(figures["base_rows_triton"], figures["base_rows_torch"]), "triton and torch")
    report.check("model_effect", figures["effect"] / max(bound, bound_w),
                 f"max |adapted - base| {figures['effect']:.3g}")
    print(json.dumps({k: v for k, v in figures.items() if not isinstance(v, list)}, indent=1), flush=True)


# -- bandwidth: bench_kernels.py's sweep against the measured HBM bandwidth ------------------------------


def part_bandwidth(report: Report, device) -> None:
    import bench_kernels as bk

    hbm = {"measured_hbm": bk.copy_gbps(device, 1 << 24 if report.dry else 1 << 30),
           "hbm_peak": bk.hbm_peak_gbps(device)}
    report.set("measured_hbm_GBps", hbm["measured_hbm"])
    report.set("hbm_peak_GBps", hbm["hbm_peak"])
    print(f"device copy: {hbm['measured_hbm']:.0f} GB/s (datasheet {hbm['hbm_peak']})", flush=True)
    if report.dry:
        todo = bk.configs({"toy": (129, 96)}, decode=(8,), prefill=(16,), adapters=("1", "8"))
    else:
        todo = bk.configs(bk.SHAPES, decode=(32, 128), prefill=(2048,), adapters=bk.ADAPTERS)
        first = [c for c in todo if c[3:] == ("decode", 128, "128")]  # the target's rows, one per shape
        todo = first + [c for c in todo if c not in first]
    names = ("triton_inplace", "triton", "torch", "peft_loop")
    rows, skipped = bk.sweep(todo, names, device, hbm, deadline=report.deadline, on_row=lambda r: report.add("rows", r))
    for what in skipped:
        report.skip(what)
    # the target: decode with the most distinct adapters (every token its own), per shape
    worst = None
    for shape in dict.fromkeys(r["shape"] for r in rows):
        decode = [r for r in rows if r["shape"] == shape and r["phase"] == "decode"]
        top = max(decode, key=lambda r: (r["distinct_in_batch"], r["tokens"]), default=None)
        if top is not None:
            fraction = top["fraction_of_measured_hbm"]["triton_inplace"]
            report.set(f"target_row_{shape}", {"tokens": top["tokens"], "adapters": top["adapters"],
                                               "GBps": top["GBps"]["triton_inplace"], "fraction": fraction})
            worst = fraction if worst is None else min(worst, fraction)
    report.check("hbm_fraction", worst, f"of {hbm['measured_hbm']:.0f} GB/s measured, triton in place")


# -- decode and prefill: bench_model_gpu.py ---------------------------------------------------------------

DECODE_SIZES = dict(shape="8b", layers=4, batches=(32, 64), counts=(1, 8, 32, 64), context=512, prefill=2048,
                    repeats=15, dtype=torch.bfloat16, vocab=32000)
DECODE_ROLES = dict(batch=32, wide=64, peft=8)  # ratios and PEFT at batch 32; flatness up to 64 adapters at 64
DRY_DECODE_SIZES = dict(shape="smoke", layers=2, batches=(4, 8), counts=(1, 4, 8), context=8, prefill=32,
                        repeats=2, dtype=torch.float32, vocab=256)
DRY_DECODE_ROLES = dict(batch=4, wide=8, peft=4)


def part_decode(report: Report, device) -> None:
    import bench_model_gpu as bm

    sizes, roles = (DRY_DECODE_SIZES, DRY_DECODE_ROLES) if report.dry else (DECODE_SIZES, DECODE_ROLES)
    report.set("sizes", {k: str(v) if k == "dtype" else v for k, v in sizes.items()})
    out = bm.run(**sizes, rank=16, device=device, deadline=report.deadline, on_result=report.set)
    for what in out.pop("skipped"):
        report.skip(what)
    report.set("run", {k: v for k, v in out.items() if k != "results"})
    decode_checks(report, out["results"], bm.key, sizes["counts"], **roles)


def decode_checks(report: Report, results: dict, key, counts, batch: int, wide: int, peft: int) -> None:
    """The targets from bench_model_gpu's entries: at ``batch`` rows the ratios to the base and
    PEFT's time with ``peft`` adapters; at ``wide`` rows the spread from 1 to ``wide`` adapters."""
    many, few = results.get(key(batch, batch)), results.get(key(batch, peft))
    report.check("decode_32", many and many["decode_ratio"]["lora_graph"], f"{batch} adapters, batch {batch}")
    flat = [results[key(wide, c)]["decode_s"]["lora_graph"] for c in counts if key(wide, c) in results]
    complete = key(wide, 1) in results and key(wide, wide) in results
    report.check("decode_flat", max(flat) / min(flat) if complete else None, f"{len(flat)} counts, batch {wide}")
    prefill = [results[key(batch, c)]["prefill_ratio"]["lora_graph"] for c in counts if key(batch, c) in results]
    report.check("prefill", max(prefill) if prefill else None, f"{len(prefill)} counts, batch {batch}")
    speedup = few["decode_s"]["peft"] / few["decode_s"]["lora_graph"] if few and "peft" in few["decode_s"] else None
    report.check("peft_speedup", speedup, f"{peft} adapters, median step times of one run")


# -- loads: the pinned host-to-device bandwidth and an adapter load -----------------------------------------


def part_loads(report: Report, device) -> None:
    import bench_load as bl

    run = bl.timer(device)
    nbytes = 1 << 24 if report.dry else 1 << 30
    h2d = nbytes / run(bl.copy_fn(nbytes, device), 5) / 1e9
    report.set("copy", {"kind": bl.COPY_KIND[device.type], "bytes": nbytes, "GBps": h2d})
    print(f"{bl.COPY_KIND[device.type]}: {h2d:.1f} GB/s", flush=True)
    shape = dict(TOY_LLAMA, num_hidden_layers=2) if report.dry else {}
    model = bl.base_model(device, **shape)
    with tempfile.TemporaryDirectory(prefix="gpu_check_loads_") as folder:
        paths = {kind: tuple(bl.write_adapter(model, os.path.join(folder, f"{kind}{v}"), spec["rank"], spec["targets"],
                                              seed=10 * i + v) for v in (1, 2))
                 for i, (kind, spec) in enumerate(bl.ADAPTERS.items())}
        with torch.inference_mode():
            lg = bl.bench_lora_graph(model, paths, device, run, 3 if report.dry else 10)
    big = lg["big_bytes"]
    report.set("lora_graph", {**lg, "big_GBps": big / lg["big_load_s"] / 1e9,
                              "big_of_large_copy": big / lg["big_load_s"] / 1e9 / h2d,
                              "model": "Llama-8B shapes, 32 blocks" if not report.dry else "toy"})
    print(f"big adapter ({big / 1e6:.1f} MB): load {lg['big_load_s'] * 1e3:.2f} ms, "
          f"{lg['big_load_of_copy']:.0%} of a copy of its bytes", flush=True)
    report.check("load_fraction", lg["big_load_of_copy"], f"{big / lg['big_load_s'] / 1e9:.1f} GB/s; "
                 f"{big / lg['big_load_s'] / 1e9 / h2d:.0%} of a {nbytes >> 20} MiB copy")


# -- cudagraphs: torch.compile(mode="reduce-overhead") over the triton backend ------------------------------

# name: (rank, targets), every one within the first's targets (a new target module would change the
# model's structure, and legitimately recompile)
GRAPH_ADAPTERS = {"a": (16, LINEAR), "b": (8, LINEAR[:4]), "c": (4, LINEAR[4:]), "d": (16, LINEAR),
                  "e": (12, ["q_proj", "v_proj"]), "f": (2, LINEAR)}
# kinds of call, each compiled once in the warm-up: an adapter per row, weighted sets of two, no adapter
GRAPH_WARMUP = [["a", "b", None, "a"], [{"a": 0.5, "b": -1.0}, "a", None, {"b": 2.0, "a": 1.0}], None]
# then, each a change of routing, weights, or the resident adapters (max_loaded=3: c..f page in)
GRAPH_SWITCHES = [
    ["b", "a", "a", None], [{"a": -1.0, "b": 0.25}, None, "b", "a"], ["b", "b", "b", "b"], None,
    ["c", "a", None, "c"], [{"c": 1.0, "a": -0.5}, "c", "a", None], ["d", "e", "d", None], "load f",
    [{"f": 1.5, "d": 1.0}, "f", None, "d"], ["a", "b", "c", None], "load e", [{"e": -1.0, "a": 1.0}, "e", "a", "b"],
    ["f", "f", None, None], [{"b": 0.5, "c": 0.5}, "b", "c", None],
]


def part_cudagraphs(report: Report, device) -> None:
    import lora_graph

    model = llama(report, device, 1, torch.float32, **({} if report.dry else dict(
        hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4, vocab_size=1000)))
    ids = torch.randint(0, model.config.vocab_size, (4, 4 if report.dry else 16),
                        generator=torch.Generator().manual_seed(1)).to(device)
    with tempfile.TemporaryDirectory(prefix="gpu_check_graphs_") as folder:
        paths = write_adapters(model, folder, GRAPH_ADAPTERS, std=0.05)
        lm = lora_graph.wrap(model, backend="triton", max_loaded=3, max_rank=16, progress=False)
        lm.register_adapters(paths)
        for name in ("a", "b"):
            lm.load_adapter(name)
        mode = dict(backend="aot_eager") if report.dry else dict(mode="reduce-overhead")
        dims = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        report.set("compile", {**mode, "dtype": "float32", **{k: getattr(model.config, k) for k in dims}})
        torch._dynamo.reset()
        compiled = torch.compile(model, **mode)
        with torch.no_grad():
            base = model(input_ids=ids).logits
        graph_calls(report, lm, compiled, model, ids, base)


def graph_calls(report: Report, lm, compiled, model, ids, base) -> None:
    """Warm each kind of call up, then switch under ``error_on_recompile``; every output against eager."""
    from torch._dynamo.utils import counters

    def call(spec, what: str) -> dict:
        with lm.use(spec), torch.no_grad():
            torch.compiler.cudagraph_mark_step_begin()
            got = compiled(input_ids=ids).logits.clone()  # a replay's output is overwritten by the next one
            eager = model(input_ids=ids).logits
        tol = 1e-3 * eager.abs().max().item() + 1e-5
        err = (got - eager).abs().max().item()
        return {"call": what, "err": err, "tol": tol, "ok": err <= tol, "effect": (eager - base).abs().max().item()}

    t0 = time.time()
    for spec in GRAPH_WARMUP:
        for _ in range(1 if report.dry else 3):  # reduce-overhead: a warm-up run, a recording, then replays
            report.add("warmup", call(spec, repr(spec)))
    report.set("warmup_s", time.time() - t0)
    graphs, inductor = counters["stats"]["unique_graphs"], dict(counters["inductor"])
    recompiles = 0
    for i, step in enumerate(GRAPH_SWITCHES):
        if report.left() < 0:
            report.skip(f"switch {i} {step!r}")
            continue
        if isinstance(step, str):  # "load NAME": make it resident now, evicting the least recently used
            lm.load_adapter(step.split()[1])
            report.add("resident", {"after": step, "resident": list(lm.resident)})
            continue
        try:
            with torch._dynamo.config.patch(error_on_recompile=True):
                report.add("switches", call(step, f"switch {i} {step!r}"))
        except torch._dynamo.exc.RecompileError as exc:  # counted, then the check goes on
            recompiles += 1
            report.add("switches", {"call": f"switch {i} {step!r}", "ok": False, "error": repr(exc)[:500]})
    calls = report.results.get("warmup", []) + report.results.get("switches", [])
    report.set("counters", {"unique_graphs_after_warmup": graphs, "unique_graphs": counters["stats"]["unique_graphs"],
                            "graph_breaks": dict(counters["graph_break"]), "inductor_after_warmup": inductor,
                            "inductor": dict(counters["inductor"])})
    report.check("cudagraph_recompiles", recompiles + counters["stats"]["unique_graphs"] - graphs,
                 f"{len(report.results.get('switches', []))} switching calls")
    mismatches = sum(not c["ok"] for c in calls)
    effects = [c["effect"] for c in calls if "effect" in c and c["effect"] > 0]
    skips = counters["inductor"]["cudagraph_skips"]  # graphs that ran without CUDA graphs
    report.check("cudagraph_mismatches", mismatches, f"{len(calls)} calls, {skips} CUDA graph skips"
                 + (f"; adapters move logits by >= {min(effects):.3g}" if effects else ""))


PART_FUNCTIONS = {"kernels": part_kernels, "model": part_model, "bandwidth": part_bandwidth, "decode": part_decode,
                  "loads": part_loads, "cudagraphs": part_cudagraphs}


# -- the runner ---------------------------------------------------------------------------------------------


def part_env(dry: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally; a hub call could only hang
    if dry:
        env["TRITON_INTERPRET"] = "1"  # read when triton is imported: the part process has not imported it yet
        env.setdefault("OMP_NUM_THREADS", "1")  # toy sizes gain nothing from threads, and lose on a busy CPU
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def run_part(name: str, limit: float, out_dir: Path, dry: bool) -> dict:
    """Run one part in its own process group, kill the group at ``limit`` seconds, and return its
    report, completed with what the process could not write itself."""
    path = out_dir / f"gpu_{name}.json"
    path.unlink(missing_ok=True)  # a stale report must not pass for this run's
    print(f"== {name} (limit {limit:.0f} s)", flush=True)
    start = time.time()
    margin = 3 + 0.1 * limit  # for the part to save its report and exit before the kill
    cmd = [sys.executable, *(["-S"] if sys.flags.no_site else []), str(Path(__file__).resolve()), "--part", name,
           "--deadline", repr(start + limit - margin), "--limit", repr(limit), "--out", str(path)]
    proc = subprocess.Popen(cmd + (["--dry-run"] if dry else []), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", env=part_env(dry), start_new_session=True)
    tail = collections.deque(maxlen=60)
    reader = threading.Thread(target=relay, args=(proc.stdout, name, tail), daemon=True)
    reader.start()
    try:
        proc.wait(timeout=limit)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
    stop_group(proc)  # at the limit; after a normal end, whatever the part left running (compile workers)
    try:
        returncode = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # not even SIGKILL ended it (stuck in the driver): go on without it
        returncode = None
    reader.join(timeout=5)
    report = settle(path, name, returncode, timed_out, list(tail), time.time() - start, limit)
    print(f"== {name}: {report['status']} in {report['wall_s']:.0f} s", flush=True)
    return report


def relay(stream, name: str, tail) -> None:
    for line in stream:
        tail.append(line.rstrip("\n"))
        print(f"  [{name}] {line}", end="" if line.endswith("\n") else "\n", flush=True)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the part's process group, SIGKILL a few seconds later if the part is still there."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def settle(path: Path, name: str, returncode: int | None, timed_out: bool, tail: list[str], elapsed: float,
           limit: float) -> dict:
    """The part's report as it left it; a part that did not end "ok" or "failed" by itself is marked
    "timeout" or "crashed", with the end of its output."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        report = {"part": name, "status": "running", "checks": {}, "skipped": [], "results": {},
                  "report_error": repr(exc)}
    if timed_out:
        report.update(status="timeout", error=f"killed at its time limit of {limit:.0f} s")
    elif returncode != 0 and report.get("status") != "failed":
        report.update(status="crashed", error=f"exit code {returncode}")
    elif report.get("status") == "running":
        report.update(status="crashed", error="exited without finishing its report")
    report.update(returncode=returncode, wall_s=round(elapsed, 1), limit_s=limit)
    if report["status"] != "ok":
        report["output_tail"] = tail
    write_atomic(path, report)
    return report


def summary(reports: dict[str, dict], dry: bool) -> str:
    """One screen: the machine, each part's status, and every target, measured or not."""
    env = next((r["env"] for r in reports.values() if r.get("env")), {})
    lines = [f"gpu_check{' --dry-run (toy sizes on CPU: the figures mean nothing)' if dry else ''}: "
             f"{env.get('device', '?')}, torch {env.get('torch', '?')}, CUDA {env.get('cuda')}, "
             f"triton {env.get('triton', '?')}, commit {str(env.get('commit', '?'))[:12]}", ""]
    lines.append(f"{'part':<11} {'status':<8} {'time':>12}  skipped")
    for name, r in reports.items():
        lines.append(f"{name:<11} {r['status']:<8} {r.get('wall_s', 0):5.0f}/{r.get('limit_s', 0):3.0f} s  "
                     f"{len(r.get('skipped', []))}" + (f"  {r.get('error', '')}"[:90] if r["status"] != "ok" else ""))
    lines += ["", f"{'figure':<78} {'measured':>9} {'target':>8}"]
    met = 0
    for key, (part, what, op, limit) in TARGETS.items():
        if part not in reports:
            continue
        check = reports[part].get("checks", {}).get(key)
        value = None if check is None else check["value"]
        shown = "-" if value is None else f"{value:.3g}"
        verdict = "not measured" if value is None else ("met" if check["met"] else "MISSED")
        met += bool(check and check["met"])
        lines.append(f"{what:<78} {shown:>9} {op + ' ' + format(limit, 'g'):>8}  {verdict}")
    lines.append(f"\n{met} of {sum(p in reports for p, *_ in TARGETS.values())} figures meet their targets; "
                 f"{sum(r['status'] == 'ok' for r in reports.values())} of {len(reports)} parts ran to the end.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS), help="a subset, run in order")
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, Triton interpreted; JSON to --out-dir")
    ap.add_argument("--out-dir", help="default: benchmarks/results, or a new temporary folder with --dry-run")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every part's time limit")
    ap.add_argument("--part", help=argparse.SUPPRESS)  # the part processes
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--limit", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        part_main(args)
        return
    out_dir = Path(args.out_dir or (tempfile.mkdtemp(prefix="gpu_check_dry_") if args.dry_run else RESULTS)).resolve()
    if args.dry_run and out_dir == RESULTS.resolve():
        sys.exit("a dry run never writes to benchmarks/results; give another --out-dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [p for p in PARTS if p in args.parts]
    limits = {p: PARTS[p][1 if args.dry_run else 0] * args.scale for p in parts}
    within = "two at a time, toy sizes on CPU" if args.dry_run else f"in at most {sum(limits.values()):.0f} s"
    print(f"gpu_check: {', '.join(parts)} ({within}); reports in {out_dir}", flush=True)
    reports, saved = {}, 0.0
    if args.dry_run:  # its timings mean nothing: two parts at a time, the longest first
        order = sorted(parts, key=lambda p: -limits[p])
        with ThreadPoolExecutor(2) as pool:
            done = dict(zip(order, pool.map(lambda p: run_part(p, limits[p], out_dir, True), order)))
        reports = {p: done[p] for p in parts}
    for name in [] if args.dry_run else parts:  # one part at a time on the GPU, which each part has alone
        reports[name] = run_part(name, limits[name] + saved, out_dir, False)  # with what earlier parts left
        saved = max(0.0, reports[name]["limit_s"] - reports[name]["wall_s"])
    print("\n" + summary(reports, args.dry_run), flush=True)
    sys.exit(0 if all(r["status"] == "ok" for r in reports.values()) else 1)


if __name__ == "__main__":
    main()
