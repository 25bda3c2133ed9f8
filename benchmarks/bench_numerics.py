"""Which PEFT path does lora_graph match, in which dtype, and by how much? Largest logit difference.

A Llama-shaped model (hidden 512, 4 layers, GQA 8/2, vocab 4096) with random weights, two PEFT
adapters (r=16 on every linear layer; r=8 rsLoRA on attention, B non-zero), one batch of 8 rows of
64 tokens mixing both adapters and base rows. For fp32 and bf16 bases (adapters kept in fp32, as
PEFT does by default), lora_graph's logits against:

    set_adapter    PEFT, one forward per adapter (and disable_adapter() for base rows)
    adapter_names  PEFT's mixed batch (it rounds each branch to the base dtype before adding it)
    cat            a weighted set {a: 0.7, b: -1.3} against PEFT's add_weighted_adapter(cat)

    .venv/bin/python benchmarks/bench_numerics.py [--out benchmarks/results/numerics.json]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile

import torch
from _env import environment, use_checkout, write_json
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

use_checkout()
import lora_graph  # noqa: E402

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
LINEAR = ATTN + ["gate_proj", "up_proj", "down_proj"]
NAMES = ["a", "b", None, "a", "b", "b", None, "a"]
WEIGHTS = {"a": 0.7, "b": -1.3}


def base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def adapter(model, folder: str, seed: int, **kwargs) -> str:
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(init_lora_weights=False, **kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.05 if "lora_B" in name else 0.5 / p.shape[-1] ** 0.5)
    peft_model.save_pretrained(folder)
    return folder


@torch.no_grad()
def per_adapter(peft_model, ids) -> torch.Tensor:
    out = None
    for name in dict.fromkeys(NAMES):
        if name is None:
            with peft_model.disable_adapter():
                logits = peft_model(input_ids=ids).logits
        else:
            peft_model.set_adapter(name)
            logits = peft_model(input_ids=ids).logits
        out = torch.empty_like(logits) if out is None else out
        for i, row in enumerate(NAMES):
            if row == name:
                out[i] = logits[i]
    return out


@torch.no_grad()
def compare(model, paths: dict[str, str], ids) -> dict:
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), paths["a"], adapter_name="a")
    peft_model.load_adapter(paths["b"], adapter_name="b")
    peft_model.eval()
    lm = lora_graph.wrap(copy.deepcopy(model), progress=False)
    for name, path in paths.items():
        lm.load_adapter(name, path)
    ours = lm(input_ids=ids, adapters=NAMES).logits.float()
    mixed = peft_model(input_ids=ids, adapter_names=["__base__" if n is None else n for n in NAMES]).logits.float()
    rows = per_adapter(peft_model, ids).float()
    peft_model.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), "cat", combination_type="cat")
    peft_model.set_adapter("cat")
    cat = peft_model(input_ids=ids[:2]).logits.float()
    blend = lm(input_ids=ids[:2], adapters=WEIGHTS).logits.float()
    plain = lm(input_ids=ids[:2]).logits.float()
    return {"vs_set_adapter": (ours - rows).abs().max().item(), "vs_adapter_names": (ours - mixed).abs().max().item(),
            "set_adapter_vs_adapter_names": (rows - mixed).abs().max().item(),
            "blend_vs_cat": (blend - cat).abs().max().item(), "blend_moves_logits_by": (blend - plain).abs().max().item(),
            "logit_scale": rows.abs().max().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "numerics.json"))
    args = ap.parse_args()
    model = base()
    ids = torch.randint(3, 4096, (len(NAMES), 64), generator=torch.Generator().manual_seed(1))
    report = {"environment": environment(), "rows": NAMES, "results": {}}
    with tempfile.TemporaryDirectory() as root:
        paths = {"a": adapter(model, os.path.join(root, "a"), 1, r=16, lora_alpha=32, target_modules=LINEAR),
                 "b": adapter(model, os.path.join(root, "b"), 2, r=8, lora_alpha=16, use_rslora=True,
                              target_modules=ATTN)}
        for dtype in (torch.float32, torch.bfloat16):
            found = report["results"][str(dtype).removeprefix("torch.")] = compare(model.to(dtype), paths, ids)
            print(f"{str(dtype):15s} " + "  ".join(f"{k} {v:.3g}" for k, v in found.items()))
    write_json(report, args.out)


if __name__ == "__main__":
    main()
