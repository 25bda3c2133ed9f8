"""How much device memory do the slot buffers take, next to the adapter bytes they hold?

A Llama-shaped base from a config (hidden 512, intermediate 1408, 4 layers, vocabulary 256, fp32,
random weights: only the module shapes matter here), with PEFT adapters on q_proj, k_proj, v_proj
and o_proj written straight to safetensors files (random factors). ``lm.memory()["device"]`` gives
``slot_buffers`` (the banks' stacked storage) and ``adapters`` (the bytes of the factors the
resident adapters hold); their ratio is the overhead, and ``rank_classes`` splits the slot buffers
by rank. Two cases, with ``max_loaded=None`` and no ``max_rank`` (nothing preallocated, nothing
declared):

- unload: an r=4 adapter, then an r=128 one beside it, then the r=128 one unloaded;
- many: 200 r=1 adapters plus one r=64 adapter, then the r=64 one unloaded.

Each bank keeps one storage per rank (lora_graph/bank.py), so adapters of very different ranks
resident together cost their own bytes: the only overhead left is the tenth of rows a storage grows
by at a time (the 200 r=1 rows), and it stays when the r=64 storage goes.

    OMP_NUM_THREADS=1 python benchmarks/bench_memory.py [--out benchmarks/results/memory.json]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _env import environment, use_checkout, write_json

use_checkout()

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import lora_graph  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def base_model():
    config = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def write_adapter(model, folder: Path, rank: int, seed: int) -> str:
    """A PEFT adapter directory with random factors of ``rank`` on every module of TARGETS."""
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS).save_pretrained(str(folder))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            stem = f"base_model.model.{name}"
            tensors[f"{stem}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=gen)
            tensors[f"{stem}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.01
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return str(folder)


def snapshot(lm) -> dict:
    device = lm.memory()["device"]
    return {"slot_buffers": device["slot_buffers"], "adapters": device["adapters"], "resident": device["resident"],
            "ratio": round(device["slot_buffers"] / device["adapters"], 3) if device["adapters"] else None,
            "rank_classes": device["rank_classes"]}


def measure(model, load_small, big: str, big_path: str) -> tuple[dict, dict, dict]:
    """Snapshots with what ``load_small(lm)`` loads, with adapter ``big`` beside it, and after
    unloading ``big``."""
    lm = lora_graph.wrap(model, progress=False)
    load_small(lm)
    small = snapshot(lm)
    lm.load_adapter(big, big_path)
    both = snapshot(lm)
    lm.unload_adapter(big)
    after = snapshot(lm)
    lm.unwrap()
    return small, both, after


def case_unload(model, root: Path) -> dict:
    r4 = write_adapter(model, root / "r4", 4, 1)
    alone, both, after = measure(model, lambda lm: lm.load_adapter("r4", r4), "r128",
                                 write_adapter(model, root / "r128", 128, 2))
    return {"r4_alone": alone, "with_r128": both, "r128_unloaded": after}


def case_many(model, root: Path, count: int) -> dict:
    one = write_adapter(model, root / "r1", 1, 3)  # the same files under many names: only bytes matter
    small, both, after = measure(model, lambda lm: lm.load_adapters({f"u{i:03d}": one for i in range(count)}),
                                 "r64", write_adapter(model, root / "r64", 64, 4))
    return {f"{count}_r1": small, "with_r64": both, "r64_unloaded": after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory.json"))
    args = parser.parse_args()
    model = base_model()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        report = {"env": environment(), "unload": case_unload(model, root), "many": case_many(model, root, args.count)}
    for case in ("unload", "many"):
        for step, m in report[case].items():
            print(f"{case:7s} {step:14s} slot buffers {m['slot_buffers']:>12,} B   adapters {m['adapters']:>11,} B"
                  f"   ratio {m['ratio']}")
    write_json(report, args.out)


if __name__ == "__main__":
    main()
