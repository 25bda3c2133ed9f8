"""The shipped demo: a tiny byte-level model that copies words, and four LoRA adapters over it.

    prompt      word + "="                 word: 3 to 8 lowercase ASCII letters
    completion  TASK(word) + "\\n"          "\\n" is the EOS token

The base (``copy``) was trained to repeat the word; each adapter teaches it one transformation:
``upper`` (abc→ABC), ``reverse`` (abc→cba), ``shift`` (abz→bca), ``double`` (abc→aabbcc). The
adapters use different ranks and target sets on purpose, so one batch mixes them. Everything here
is reproduced by ``scripts/train_demo.py``; a fixed share of all words (chosen by hash) was never
trained on, and :func:`heldout_words` draws evaluation words from that share only.

This module holds the data side (paths, prompts, expected outputs, held-out words), greedy
decoding of a mixed batch in one ``generate`` call (:func:`complete`), and the optional
quantization of a loaded base. Loading the model is left to the caller (the CLI, tests, benchmarks).
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ASSETS = Path(__file__).resolve().parent / "demo_assets"
SEP = "="
EOS = "\n"
MIN_LEN, MAX_LEN = 3, 8

_LETTERS = string.ascii_lowercase
_SHIFT = str.maketrans(_LETTERS, _LETTERS[1:] + _LETTERS[0])

#: task name -> word transformation. ``copy`` is the base model; the others are the adapters.
TASKS: dict[str, Callable[[str], str]] = {
    "copy": lambda w: w,
    "upper": str.upper,
    "reverse": lambda w: w[::-1],
    "shift": lambda w: w.translate(_SHIFT),
    "double": lambda w: "".join(c + c for c in w),
}
ADAPTERS = ("upper", "reverse", "shift", "double")
QUANTIZE = ("none", "nf4", "int8")


def base_path() -> str:
    """Directory of the base model and its tokenizer (``from_pretrained`` loads it offline)."""
    return str(ASSETS / "base")


def adapter_paths() -> dict[str, str]:
    """Adapter name -> PEFT adapter directory, for the four shipped adapters."""
    return {name: str(ASSETS / "adapters" / name) for name in ADAPTERS}


def prompt(word: str) -> str:
    return word + SEP


def expected(task: str, word: str) -> str:
    """The completion ``task`` should produce for ``word``, without the EOS."""
    return TASKS[task](word)


def max_new_tokens(words) -> int:
    """Enough new tokens for every task on ``words``, EOS included (``double`` is the longest)."""
    return 2 * max(len(w) for w in words) + 1


def complete(model, tokenizer, words, adapters=None) -> tuple[list[str], int]:
    """Greedy answers for ``words`` in ONE ``generate`` call, with ``adapters`` as the SPEC.

    ``model`` is a :class:`~lora_graph.LoraGraph`, or any causal LM when ``adapters`` is None.

    Returns each row's answer (the decoded text before the EOS) and the number of tokens
    generated over all rows, EOS included.
    """
    enc = tokenizer([prompt(w) for w in words], return_tensors="pt", padding=True).to(model.device)
    routed = {} if adapters is None else {"adapters": adapters}
    with torch.inference_mode():
        out = model.generate(**enc, **routed, max_new_tokens=max_new_tokens(words), do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    answers, tokens = [], 0
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        n = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
        answers.append(tokenizer.decode(row[:n]))
        tokens += min(n + 1, len(row))
    return answers, tokens


def is_heldout(word: str) -> bool:
    """True for the ~10% of words that training never sees (fixed by a hash of the word)."""
    return hashlib.sha256(word.encode()).digest()[0] < 26


def random_word(rng: random.Random) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def heldout_words(n: int, split: str = "test") -> list[str]:
    """``n`` distinct held-out words, always the same ones.

    ``split="valid"`` draws another sample, which the training script reports on; tests,
    benchmarks and the CLI use ``"test"``. Neither was ever trained on.
    """
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    rng = random.Random(f"heldout-{split}")
    words: dict[str, None] = {}
    while len(words) < n:
        word = random_word(rng)
        if is_heldout(word):
            words[word] = None
    return list(words)


def valid_word(word: str) -> bool:
    return MIN_LEN <= len(word) <= MAX_LEN and all(c in _LETTERS for c in word)


def quantize_linears(model: nn.Module, mode: str, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace the model's ``nn.Linear`` layers in place by bitsandbytes ``nf4`` or ``int8`` ones.

    Works on CPU as well as CUDA. ``lm_head`` is kept, as transformers does when it quantizes.
    Returns the number of layers replaced; ``mode="none"`` changes nothing.
    """
    if mode not in QUANTIZE:
        raise ValueError(f"unknown quantization {mode!r}; expected one of {QUANTIZE}")
    if mode == "none":
        return 0
    import bitsandbytes as bnb

    names = [
        name for name, m in model.named_modules()
        if type(m) is nn.Linear and name.rsplit(".", 1)[-1] not in skip
    ]
    for name in names:
        lin = model.get_submodule(name)
        weight = lin.weight.data
        has_bias = lin.bias is not None
        if mode == "nf4":
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=has_bias,
                                  compute_dtype=weight.dtype, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4")
        else:
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=0.0)
            q.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
        if has_bias:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        q = q.to(weight.device)  # bitsandbytes quantizes on the move to a device
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    return len(names)
