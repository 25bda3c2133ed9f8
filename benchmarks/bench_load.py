"""How long does it take to load an adapter, and to switch the adapter a request uses?

A Llama-8B-shaped base (hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads, bf16)
is built on the meta device and given storage with ``to_empty``: its weights are never written
or read, so on CPU their pages are never touched and cost no memory (on a GPU they hold 16 GB of
device memory), and nothing here runs a forward. The vocabulary is tiny (256), since embeddings
are not targeted. Two bf16 PEFT adapters are written with random factors:
- big: r=16 on every linear layer of every block (224 modules, 84 MB);
- small: r=8 on q_proj and v_proj (64 modules, 6 MB).

Timed, each file read twice first so that it is served from the page cache:
- lora_graph ``load_adapter(name, path, replace=True)`` into a wrapper with ``max_loaded=2`` and
  ``max_rank=16`` (slot buffers preallocated; the first load, which allocates them, is reported
  apart): reading through mmap, validating, one copy into a coalesced host buffer, one into the slot;
- switching the adapter a request uses: entering and leaving ``with lm.use(name)`` with both
  adapters resident (no copy, only routing);
- PEFT ``load_adapter`` + ``set_adapter`` (default, and ``low_cpu_mem_usage=True``), PEFT
  ``set_adapter`` alone between two loaded adapters, and ``peft.utils.hotswap.hotswap_adapter``
  (copies new weights into an adapter of the same shapes).
Load speeds are given in GB/s of adapter bytes, next to a plain copy of the same number of bytes
(memcpy on CPU; pinned host-to-device on GPU), timed in the same rounds as lora_graph's loads: each
round copies, then loads. Medians are reported; lora_graph's fraction of the copy speed is the
median of the per-round ratios.

Readers (``results.readers``): loads of the same adapter, one of each per round in rotating order:
as shipped (lora_graph's reader: the library validates the header, the data is read a run of
tensors at a time into huge pages, and a helper thread checks each run for NaN and infinity while
the next is read, tensorfile.py), the same with the checks in the reading thread (a machine with
one core), the same reader with no check of the factors' values, the safetensors library's own
``get_tensors``, and the hand-written memory-map reader of earlier versions (kept in this file only
for this comparison), the last two without the check. What the check adds to a load is the
median of the per-round differences; its own work is also timed alone, beside the check an
adapter given in memory gets (a sum per tensor, after the read).

DoRA (``--dora-repeats``, on by default): a big adapter of the same shape with ``use_dora=True``.
Loading it computes ``g = m / ‖W + s·B·A‖`` for every module, which reads the base weights, so this
part needs real ones: a second base whose 32 blocks share one block's linear weights, drawn at
random (``randn · 0.02`` in bf16), so it holds 0.44 GB instead of 14 GB. Every module's norm still
reads a whole weight matrix (32 to 117 MB, far beyond the caches) from memory, as with 32
distinct blocks. Each round loads the LoRA adapter and then the DoRA adapter with the same factors
into the same wrapper (``replace=True``); the difference is the norms. PEFT's DoRA load, which also
computes the norms (on the whole ``B·A``), is timed once.

    OMP_NUM_THREADS=1 python benchmarks/bench_load.py [--repeats 10] [--dora-repeats 3] [--out benchmarks/results/load.json]

(On a CPU shared with other jobs, more OpenMP threads than idle cores make every op wait for a
descheduled thread, and the numbers measure that instead.)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import tempfile
import time
import warnings
from concurrent.futures import Future
from pathlib import Path


import torch
from _env import environment, use_checkout, write_json
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

use_checkout()
import lora_graph  # noqa: E402
from lora_graph import adapters, tensorfile  # noqa: E402

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {"big": dict(rank=16, targets=ALL_LINEAR), "small": dict(rank=8, targets=["q_proj", "v_proj"])}
DTYPE = torch.bfloat16


LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8)


def base_model(device: torch.device, **shape) -> LlamaForCausalLM:
    """Llama-8B shapes (or ``shape``'s) with uninitialised storage that is never read."""
    config = LlamaConfig(vocab_size=256, max_position_embeddings=4096, **{**LLAMA_8B, **shape})
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(DTYPE)
    return model.to_empty(device=device).eval()


def shared_weight_model() -> LlamaForCausalLM:
    """The Llama-8B shape with real values in its linear weights, for DoRA's norms: block 0's are
    drawn at random and every other block's modules share them (0.44 GB instead of 14 GB)."""
    model = base_model(torch.device("cpu"))
    gen = torch.Generator().manual_seed(7)
    first = model.model.layers[0]
    for name, module in first.named_modules():
        if isinstance(module, torch.nn.Linear):
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen).mul_(0.02))
            for layer in model.model.layers[1:]:
                layer.get_submodule(name).weight = module.weight
    return model


def write_adapter(model, folder: str, rank: int, targets: list[str], seed: int, std: float = 0.01,
                  dtype: torch.dtype = DTYPE, dora: bool = False) -> str:
    """A PEFT adapter directory with random non-zero factors (``std`` each), in PEFT's key layout,
    with ``lora_alpha = 2r``; with ``dora``, a DoRA adapter (magnitudes in [0.5, 1.5))."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rpartition(".")[2] in targets:
            key = f"base_model.model.{name}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, module.in_features, generator=gen) * std).to(dtype)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(module.out_features, rank, generator=gen) * std).to(dtype)
            if dora:
                tensors[f"{key}.lora_magnitude_vector"] = (torch.rand(module.out_features, generator=gen) + 0.5).to(dtype)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, task_type="CAUSAL_LM",
               use_dora=dora).save_pretrained(folder)
    return folder


def warm_page_cache(folder: str) -> None:
    for _ in range(2):
        with open(os.path.join(folder, "adapter_model.safetensors"), "rb") as f:
            while f.read(1 << 24):
                pass


def file_bytes(folder: str) -> int:
    """Bytes of the tensors in the file (the header excluded)."""
    path = os.path.join(folder, "adapter_model.safetensors")
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return os.path.getsize(path) - 8 - header


def timer(device: torch.device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(fn, repeats: int, before=None) -> float:
        """Median seconds of ``fn()``; ``before()`` runs untimed ahead of each call."""
        times = []
        for _ in range(repeats):
            if before is not None:
                before()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return run


def copy_fn(nbytes: int, device: torch.device):
    """A plain copy of ``nbytes``: memcpy between host buffers on CPU, pinned host to device on GPU."""
    src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    dst = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    return lambda: dst.copy_(src, non_blocking=True)


COPY_KIND = {"cuda": "pinned host-to-device copy", "cpu": "memcpy (Tensor.copy_ host to host)"}


def bench_lora_graph(model, paths, device, run, repeats: int) -> dict:
    """Loads are timed in rounds, each a plain copy of the adapter's bytes and then a load, so the
    ratio of the two sees the same machine load; ``of_copy`` is the median of the per-round ratios."""
    out = {}
    lm = lora_graph.wrap(model, max_loaded=2, max_rank=16, adapter_dtype=DTYPE, progress=False)
    for kind in ADAPTERS:
        path, path2 = paths[kind]
        warm_page_cache(path)
        t0 = time.perf_counter()
        lm.load_adapter(kind, path)  # first load of this target set: allocates the slot buffers
        out[f"{kind}_first_load_s"] = time.perf_counter() - t0
        nbytes = out[f"{kind}_bytes"] = lm.adapters[kind].nbytes
        plain_copy = copy_fn(nbytes, device)
        copies, loads = [], []
        for _ in range(repeats):
            copies.append(run(plain_copy, 1))
            loads.append(run(lambda: lm.load_adapter(kind, path, replace=True), 1))
        out[f"{kind}_copy_s"] = statistics.median(copies)
        out[f"{kind}_load_s"] = statistics.median(loads)
        out[f"{kind}_load_of_copy"] = statistics.median(c / t for c, t in zip(copies, loads))
        lm.unload_adapter(kind)
    # switch: two big adapters resident, requests alternate between them
    lm.load_adapter("x", paths["big"][0])
    lm.load_adapter("y", paths["big"][1])
    resident, host = set(lm.resident), lm.memory()["host"]
    names = iter(["x", "y"] * 5000)

    def switch():
        with lm.use(next(names)):
            pass

    out["switch_s"] = run(switch, 2000)
    assert set(lm.resident) == resident and lm.memory()["host"] == host  # nothing was paged or read
    out["slot_buffers_bytes"] = lm.memory()["device"]["slot_buffers"]
    lm.unwrap()
    return out


def mmap_reader(path) -> dict[str, torch.Tensor]:
    """The hand-written reader lora_graph used before it read files with the safetensors library:
    zero-copy views of a memory map (kept here only to time the two side by side)."""
    import json
    import mmap

    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    header_len = int.from_bytes(mapped[:8], "little")
    header = json.loads(bytes(mapped[8 : 8 + header_len]))
    header.pop("__metadata__", None)
    begin = 8 + header_len
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # views of a read-only map; never written
        data = torch.frombuffer(mapped, dtype=torch.uint8, offset=begin)
    available, flat, tensors = size - begin, {}, {}
    for name, info in header.items():
        dtype, shape, (start, end) = dtypes[info["dtype"]], info["shape"], info["data_offsets"]
        numel = 1
        for d in shape:
            numel *= d
        if not 0 <= start <= end <= available or end - start != numel * dtype.itemsize:
            raise ValueError(f"data offsets of {name!r} do not match its shape or the file size")
        if start % dtype.itemsize == 0 and begin % dtype.itemsize == 0:
            whole = flat.get(dtype)
            if whole is None:
                whole = flat[dtype] = data[: available // dtype.itemsize * dtype.itemsize].view(dtype)
            tensors[name] = whole.as_strided(shape, (shape[1], 1), start // dtype.itemsize)
        else:
            tensors[name] = data[start:end].clone().view(dtype).view(tuple(shape))
    return tensors


class _Inline:
    """Stands for the reader's helper thread: makes each check at once, in the reading thread."""

    def submit(self, fn, *args):
        future = Future()
        future.set_result(fn(*args))
        return future


@contextlib.contextmanager
def reader_variant(variant: str):
    """``shipped``: as shipped (lora_graph's reader, each run of tensors checked for NaN and
    infinity on a helper thread while the next is read, tensorfile.py); ``check_inline``: the same
    with the checks in the reading thread (a machine with one core); ``shipped_no_value_check``:
    the same reader with no check of the values; ``library_no_value_check``: the safetensors library's own
    ``get_tensors`` (pread), no check; ``mmap_no_value_check``: the hand-written memory-map reader
    of earlier versions, no check."""
    saved = adapters._read_tensors, adapters._check_values, tensorfile.all_finite, tensorfile._helper
    if variant == "check_inline":
        tensorfile._helper = _Inline
    if variant.endswith("no_value_check"):
        adapters._check_values = lambda *args: None
        tensorfile.all_finite = lambda raw, dtype: False
    if variant in ("library_no_value_check", "mmap_no_value_check"):
        def read(folder, allow_pickle):
            path = folder / adapters.SAFETENSORS_NAME
            stamp = adapters.file_stamp(path)
            if variant == "mmap_no_value_check":
                return mmap_reader(path), stamp, set()
            with safe_open(path, framework="pt", backend="pread") as f:
                return f.get_tensors(), stamp, set()

        adapters._read_tensors = read
    try:
        yield
    finally:
        adapters._read_tensors, adapters._check_values, tensorfile.all_finite, tensorfile._helper = saved


READERS = ("shipped", "check_inline", "shipped_no_value_check", "library_no_value_check", "mmap_no_value_check")


def bench_readers(model, paths, device, run, repeats: int) -> dict:
    """The variants of ``reader_variant`` loading the same adapter (``replace=True``), one of each
    per round, in rotating order; medians, and what the value check adds to a load as the median
    of the per-round ratios (with - without) / with."""
    out = {}
    lm = lora_graph.wrap(model, max_loaded=2, max_rank=16, adapter_dtype=DTYPE, progress=False)
    for kind in ADAPTERS:
        path = paths[kind][0]
        warm_page_cache(path)
        lm.load_adapter(kind, path)
        times = {v: [] for v in READERS}
        for i in range(repeats):
            k = i % len(READERS)
            for variant in READERS[k:] + READERS[:k]:
                with reader_variant(variant):
                    times[variant].append(run(lambda: lm.load_adapter(kind, path, replace=True), 1))
        entry = {v: statistics.median(t) for v, t in times.items()}
        def added(checked: str) -> float:  # median over rounds of (with - without) / with
            return statistics.median((a - b) / a for a, b in zip(times[checked], times["shipped_no_value_check"]))

        entry["value_check_of_load_paired"] = added("shipped")
        entry["value_check_inline_of_load_paired"] = added("check_inline")
        # the check's own work, timed alone: the reader's checks of the file's runs (each just
        # after its run is read, in the reading thread), and the check that an adapter given in
        # memory gets instead (a sum per tensor, after the read)
        st = Path(path) / adapters.SAFETENSORS_NAME
        entry["value_check_s"] = check_work(st, 3 * repeats)
        entry["value_check_of_load"] = entry["value_check_s"] / entry["shipped"]
        tensors, _ = tensorfile.read_safetensors(st)
        parts = {}
        for key, tensor in tensors.items():
            module, part = adapters.split_key(key)
            parts.setdefault(module, {})[part] = tensor
        entry["in_memory_check_s"] = run(lambda: adapters._check_values("", parts, DTYPE), 3 * repeats)
        entry["library_over_mmap"] = statistics.median(
            a / b for a, b in zip(times["library_no_value_check"], times["mmap_no_value_check"]))
        out[kind] = entry
        lm.unload_adapter(kind)
    lm.unwrap()
    return out


def check_work(path: Path, repeats: int) -> float:
    """Seconds the reader's value checks take over one read of ``path`` (median of ``repeats`` reads)."""
    spent: list[float] = []
    check, helper = tensorfile.all_finite, tensorfile._helper

    def timed(raw, dtype):
        start = time.perf_counter()
        try:
            return check(raw, dtype)
        finally:
            spent[-1] += time.perf_counter() - start

    tensorfile.all_finite, tensorfile._helper = timed, _Inline
    try:
        for _ in range(repeats):
            spent.append(0.0)
            tensorfile.read_safetensors(path)
    finally:
        tensorfile.all_finite, tensorfile._helper = check, helper
    return statistics.median(spent)


def bench_peft(model, paths, device, run, repeats: int) -> dict:
    from peft import PeftModel
    from peft.utils.hotswap import hotswap_adapter

    out = {}
    dev = str(device)
    peft_model = None
    for kind in ADAPTERS:
        path, path2 = paths[kind]
        warm_page_cache(path)
        warm_page_cache(path2)
        t0 = time.perf_counter()
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, path, adapter_name=kind, torch_device=dev)
        else:
            peft_model.load_adapter(path, adapter_name=kind, torch_device=dev)
        out[f"{kind}_first_load_s"] = time.perf_counter() - t0
        for low_mem in (False, True):
            counter = iter(range(10**6))
            name = {"current": None}

            def load():
                name["current"] = f"{kind}_tmp{next(counter)}"
                peft_model.load_adapter(path, adapter_name=name["current"], torch_device=dev,
                                        low_cpu_mem_usage=low_mem)
                peft_model.set_adapter(name["current"])

            def drop():
                if name["current"] is not None:
                    peft_model.set_adapter(kind)
                    peft_model.delete_adapter(name["current"])
                    name["current"] = None

            key = f"{kind}_load_set_low_cpu_mem_s" if low_mem else f"{kind}_load_set_s"
            out[key] = run(load, repeats, before=drop)
            drop()
        versions = iter([path2, path] * repeats)
        out[f"{kind}_hotswap_s"] = run(
            lambda: hotswap_adapter(peft_model, next(versions), adapter_name=kind, torch_device=dev), repeats)
    names = iter(list(ADAPTERS) * 5000)
    out["switch_s"] = run(lambda: peft_model.set_adapter(next(names)), 200)
    out["adapter_dtype"] = str(next(p.dtype for n, p in peft_model.named_parameters() if "lora_A" in n))
    return out


def bench_dora(folder: str, repeats: int) -> dict:
    """Rounds of a LoRA load then a DoRA load of the same factors (``replace=True``) into one
    wrapper over a model with real base weights; PEFT's DoRA load once."""
    from peft import PeftModel

    model = shared_weight_model()
    spec = ADAPTERS["big"]
    lora = write_adapter(model, os.path.join(folder, "dora_as_lora"), spec["rank"], spec["targets"], seed=30)
    dora = write_adapter(model, os.path.join(folder, "dora"), spec["rank"], spec["targets"], seed=30, dora=True)
    # every module's norm reads its whole weight (blocks share them, so count per module)
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and n.rpartition(".")[2] in spec["targets"])
    run = timer(torch.device("cpu"))
    lm = lora_graph.wrap(model, max_loaded=2, max_rank=16, adapter_dtype=DTYPE, progress=False)
    lm.load_adapter("x", lora)
    lm.load_adapter("x", dora, replace=True)
    loras, doras = [], []
    for _ in range(repeats):
        warm_page_cache(lora)
        warm_page_cache(dora)
        loras.append(run(lambda: lm.load_adapter("x", lora, replace=True), 1))
        doras.append(run(lambda: lm.load_adapter("x", dora, replace=True), 1))
    assert lm.adapters["x"].use_dora
    lm.unwrap()
    t0 = time.perf_counter()
    peft_model = PeftModel.from_pretrained(model, dora, adapter_name="x", torch_device="cpu")
    peft_s = time.perf_counter() - t0
    assert any("lora_magnitude_vector" in n for n, _ in peft_model.named_parameters())
    lora_s, dora_s = statistics.median(loras), statistics.median(doras)
    return {"rank": spec["rank"], "targets": spec["targets"], "base_weight_bytes_read": weight_bytes,
            "repeats": repeats, "lora_graph_lora_load_s": lora_s, "lora_graph_dora_load_s": dora_s,
            "norms_s": dora_s - lora_s, "norms_GBps_of_base_weights": weight_bytes / (dora_s - lora_s) / 1e9,
            "peft_dora_load_s": peft_s,
            "weights": "32 blocks sharing block 0's linear weights, randn * 0.02 in bf16"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--dora-repeats", type=int, default=3, help="rounds of the DoRA load (0: skip it)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "load.json"))
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = timer(device)
    folder = tempfile.mkdtemp(prefix="bench_load_")
    try:
        model = base_model(device)
        paths = {kind: tuple(write_adapter(model, os.path.join(folder, f"{kind}{v}"), spec["rank"], spec["targets"],
                                           seed=10 * i + v)
                             for v in (1, 2))
                 for i, (kind, spec) in enumerate(ADAPTERS.items())}
        with torch.inference_mode():
            lg = bench_lora_graph(model, paths, device, run, args.repeats)
            readers = bench_readers(model, paths, device, run, args.repeats)
            pf = bench_peft(model, paths, device, run, max(3, args.repeats // 2))
        results = {}
        for kind, spec in ADAPTERS.items():
            nbytes = lg[f"{kind}_bytes"]
            assert nbytes == file_bytes(paths[kind][0]), "adapter bytes differ from the file's"
            copy = {"kind": COPY_KIND[device.type], "s": lg[f"{kind}_copy_s"], "GBps": nbytes / lg[f"{kind}_copy_s"] / 1e9}
            entry = {"rank": spec["rank"], "targets": spec["targets"], "bytes": nbytes,
                     "copy_baseline": copy,
                     "lora_graph_first_load_s": lg[f"{kind}_first_load_s"],
                     "peft_first_load_s": pf[f"{kind}_first_load_s"]}
            for label, seconds in (("lora_graph_load", lg[f"{kind}_load_s"]),
                                   ("peft_load_set", pf[f"{kind}_load_set_s"]),
                                   ("peft_load_set_low_cpu_mem", pf[f"{kind}_load_set_low_cpu_mem_s"]),
                                   ("peft_hotswap", pf[f"{kind}_hotswap_s"])):
                entry[label] = {"s": seconds, "GBps": nbytes / seconds / 1e9, "of_copy": copy["s"] / seconds}
            entry["lora_graph_load"]["of_copy"] = lg[f"{kind}_load_of_copy"]  # paired rounds
            results[kind] = entry
        results["readers"] = readers
        results["switch"] = {"lora_graph_use_s": lg["switch_s"], "peft_set_adapter_s": pf["switch_s"]}
        if args.dora_repeats and device.type == "cpu":
            del model
            with torch.inference_mode():
                results["dora"] = bench_dora(folder, args.dora_repeats)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    out = {
        "benchmark": "load",
        **environment(),
        "model": {"shape": "Llama-8B", "hidden": 4096, "intermediate": 14336, "layers": 32, "heads": 32,
                  "kv_heads": 8, "vocab": 256, "dtype": str(DTYPE), "weights": "to_empty, never touched"},
        "adapter_dtype": {"lora_graph": str(DTYPE), "peft": pf["adapter_dtype"]},
        "lora_graph_slot_buffers_bytes": lg["slot_buffers_bytes"],
        "repeats": args.repeats,
        "results": results,
    }
    write_json(out, args.out)

    print(f"device: {out['device']} ({out['threads']} threads), torch {out['torch']}, peft {out['peft']}")
    print(f"{'':28}{'big r=16 all-linear':>26}{'small r=8 q,v':>26}")
    print(f"{'bytes':28}" + "".join(f"{results[k]['bytes'] / 1e6:>23.1f} MB" for k in ADAPTERS))
    print(f"{'copy baseline':28}" + "".join(
        f"{results[k]['copy_baseline']['s'] * 1e3:>11.2f} ms {results[k]['copy_baseline']['GBps']:>6.2f} GB/s"
        for k in ADAPTERS))
    for label in ("lora_graph_load", "peft_load_set", "peft_load_set_low_cpu_mem", "peft_hotswap"):
        print(f"{label:28}" + "".join(
            f"{results[k][label]['s'] * 1e3:>11.2f} ms {results[k][label]['GBps']:>6.2f} GB/s" for k in ADAPTERS))
    print(f"{'lora_graph load / copy':28}" + "".join(
        f"{results[k]['lora_graph_load']['of_copy'] * 100:>21.0f} %   " for k in ADAPTERS) + " (median of paired rounds)")
    for kind, r in results["readers"].items():
        print(f"{kind} load by reader: shipped {r['shipped'] * 1e3:.2f} ms, checked in the reading thread "
              f"{r['check_inline'] * 1e3:.2f} ms, without the value check {r['shipped_no_value_check'] * 1e3:.2f} ms: "
              f"the check adds {r['value_check_of_load_paired'] * 100:.1f}% to a load "
              f"({r['value_check_inline_of_load_paired'] * 100:.1f}% in the reading thread; paired rounds); the check alone {r['value_check_s'] * 1e3:.2f} ms "
              f"({r['value_check_of_load'] * 100:.1f}% of a load; an in-memory adapter's {r['in_memory_check_s'] * 1e3:.2f} ms); "
              f"library get_tensors {r['library_no_value_check'] * 1e3:.2f} ms, hand-written mmap "
              f"{r['mmap_no_value_check'] * 1e3:.2f} ms (library / mmap {r['library_over_mmap']:.2f}x)")
    sw = results["switch"]
    print(f"switch: lora_graph use() {sw['lora_graph_use_s'] * 1e6:.1f} us, "
          f"peft set_adapter {sw['peft_set_adapter_s'] * 1e6:.1f} us")
    if "dora" in results:
        d = results["dora"]
        print(f"DoRA big: lora_graph {d['lora_graph_dora_load_s']:.2f} s (the LoRA load of the same factors "
              f"{d['lora_graph_lora_load_s'] * 1e3:.1f} ms; norms {d['norms_s']:.2f} s over "
              f"{d['base_weight_bytes_read'] / 1e9:.1f} GB of base weights, {d['norms_GBps_of_base_weights']:.2f} GB/s), "
              f"PEFT load {d['peft_dora_load_s']:.2f} s")


if __name__ == "__main__":
    main()
