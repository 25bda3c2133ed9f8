"""Train the demo assets shipped in lora_graph/demo_assets: a tiny byte-level copy model and four LoRA adapters.

    base     LlamaForCausalLM from a config, one token per byte, trained on  word= -> word\\n
    upper    abc -> ABC        reverse  abc -> cba
    shift    abz -> bca        double   abc -> aabbcc

The adapters are ordinary PEFT adapters (``get_peft_model`` + ``save_pretrained``) with different
ranks and target sets. Words held out by ``lora_graph.demo.is_heldout`` are never trained on; the
accuracies printed at the end are measured on 200 of them (the "valid" sample; tests and benchmarks
use the separate "test" sample). Everything is seeded (same seed and thread count, same weights);
a run takes about 6 minutes on two idle CPU cores, and up to about 20 when they are shared:

    nice -n 10 .venv/bin/python scripts/train_demo.py            # writes lora_graph/demo_assets
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shutil
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lora_graph import demo

logger = logging.getLogger("train_demo")

PAD_ID = 256
# Chat requests to the demo are its prompt format: the user's messages, as they are ("weight=").
CHAT_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ message['content'] }}"
                 "{% endif %}{% endfor %}")
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]

MODEL = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)

# name -> LoRA settings and training. Mixed ranks and target sets, on purpose. The base never read or
# wrote an uppercase letter (its embedding and lm_head rows for them are untrained), so `upper`
# adapts embed_tokens and lm_head as well.
ADAPTERS = {
    "upper": dict(r=8, lora_alpha=16, target_modules=["embed_tokens", *ATTN, "lm_head"], steps=400, lr=5e-3),
    "reverse": dict(r=8, lora_alpha=16, target_modules=ATTN + MLP, steps=500, lr=1e-2),
    "shift": dict(r=4, lora_alpha=8, target_modules=ATTN + MLP, steps=400, lr=1e-2),
    "double": dict(r=16, lora_alpha=16, target_modules=ATTN + MLP, steps=500, lr=1e-2),
}


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, so a byte-level BPE vocabulary holds all 256."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level, no merges: token id == byte value; id 256 is padding; "\\n" (10) is EOS."""
    b2u = byte_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=b2u[ord(demo.EOS)], pad_token="<pad>",
                                   padding_side="left", model_max_length=MODEL["max_position_embeddings"])
    fast.chat_template = CHAT_TEMPLATE
    assert fast.pad_token_id == PAD_ID and fast.eos_token_id == ord(demo.EOS)
    return fast


def training_words(rng: random.Random, n: int) -> list[str]:
    words = []
    while len(words) < n:
        word = demo.random_word(rng)
        if not demo.is_heldout(word):
            words.append(word)
    return words


def make_batch(words: list[str], task: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``prompt + completion + EOS``; the loss sees only the completion and EOS."""
    seqs = []
    for w in words:
        p = list(demo.prompt(w).encode())
        c = list((demo.expected(task, w) + demo.EOS).encode())
        seqs.append((p, c))
    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, c) in enumerate(seqs):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        mask[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(c)
    return ids, mask, labels


def train(model, task: str, steps: int, lr: float, batch_size: int, seed: int, warmup: int = 50,
          probe=None) -> None:
    rng = random.Random(f"{task}-{seed}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        ids, mask, labels = make_batch(training_words(rng, batch_size), task)
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("%s step %d/%d loss %.4f (%.0fs)", task, step, steps, loss.item(), time.perf_counter() - start)
        if probe and step % probe[0] == probe[0] - 1:
            model.eval()
            logger.info("%s step %d held-out accuracy %.3f", task, step, accuracy(model, probe[1], task, probe[2]))
            model.train()
    model.eval()


@torch.no_grad()
def accuracy(model, tokenizer, task: str, words: list[str]) -> float:
    enc = tokenizer([demo.prompt(w) for w in words], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=demo.max_new_tokens(words), do_sample=False)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=False)
    hits = sum(t.startswith(demo.expected(task, w) + demo.EOS) for t, w in zip(texts, words))
    return hits / len(words)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(demo.ASSETS), help="assets directory (replaced)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--probe-every", type=int, default=0, help="log held-out accuracy every N steps (tuning)")
    parser.add_argument("--only", nargs="*", choices=["base", *ADAPTERS], help="train only these (base must exist)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    todo = set(args.only or ["base", *ADAPTERS])
    evaluation = demo.heldout_words(200, "valid")
    t0 = time.perf_counter()
    report = {}

    base_dir = out / "base"
    if "base" in todo:
        torch.manual_seed(args.seed)
        tokenizer = build_tokenizer()
        config = LlamaConfig(vocab_size=PAD_ID + 1, bos_token_id=None, eos_token_id=ord(demo.EOS),
                             pad_token_id=PAD_ID, tie_word_embeddings=False, **MODEL)
        model = LlamaForCausalLM(config)
        probe = (args.probe_every, tokenizer, evaluation[:100]) if args.probe_every else None
        train(model, "copy", args.base_steps, 3e-3, args.batch_size, args.seed, probe=probe)
        report["copy"] = accuracy(model, tokenizer, "copy", evaluation)
        logger.info("base copy accuracy on held-out words: %.3f", report["copy"])
        if base_dir.exists():
            shutil.rmtree(base_dir)
        model.generation_config.pad_token_id = PAD_ID
        model.generation_config.eos_token_id = ord(demo.EOS)
        model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base_dir)

    for i, (name, spec) in enumerate(ADAPTERS.items()):
        if name not in todo:
            continue
        spec = dict(spec)
        steps, lr = spec.pop("steps"), spec.pop("lr")
        torch.manual_seed(args.seed + 1 + i)
        base = LlamaForCausalLM.from_pretrained(base_dir)
        model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **spec))
        probe = (args.probe_every, tokenizer, evaluation[:100]) if args.probe_every else None
        train(model, name, steps, lr, args.batch_size, args.seed, probe=probe)
        report[name] = accuracy(model, tokenizer, name, evaluation)
        logger.info("%s accuracy on held-out words: %.3f", name, report[name])
        target = out / "adapters" / name
        if target.exists():
            shutil.rmtree(target)
        model.save_pretrained(target, save_embedding_layers=False)
        (target / "README.md").unlink(missing_ok=True)  # PEFT's empty model card
        cfg_path = target / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = "lora_graph/demo_assets/base"  # not the training machine's path
        cfg["target_modules"] = sorted(cfg["target_modules"])  # PEFT writes a set, in hash order
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    logger.info("done in %.0fs: %s", time.perf_counter() - t0, json.dumps(report))


if __name__ == "__main__":
    main()
