"""The shipped demo: a tiny byte-level model that copies words, and four LoRA adapters over it.

    prompt      word + "="                 word: 3 to 8 lowercase ASCII letters
    completion  TASK(word) + "\\n"          "\\n" is the EOS token

The base (``copy``) was trained to repeat the word; each adapter teaches it one transformation:
``upper`` (abc→ABC), ``reverse`` (abc→cba), ``shift`` (abz→bca), ``double`` (abc→aabbcc). The
adapters use different ranks and target sets on purpose, so one batch mixes them. Everything here
is reproduced by ``scripts/train_demo.py``; a fixed share of all words (chosen by hash) was never
trained on, and :func:`heldout_words` draws evaluation words from that share only.

This module holds the data side (paths, prompts, expected outputs, held-out words), greedy
decoding of a mixed batch in one ``generate`` call (:func:`complete`), and loading the base,
optionally quantized by transformers' ``BitsAndBytesConfig`` (:func:`load_base`).
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


def quantization_config(mode: str, compute_dtype: torch.dtype = torch.float32):
    """transformers' ``BitsAndBytesConfig`` for ``mode`` (``nf4`` or ``int8``; None for ``none``).

    bitsandbytes 4-bit and 8-bit layers run on CPU as well as CUDA; transformers keeps ``lm_head``
    unquantized. Pass it to ``from_pretrained(..., quantization_config=...)``.
    """
    if mode not in QUANTIZE:
        raise ValueError(f"unknown quantization {mode!r}; expected one of {QUANTIZE}")
    if mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    if mode == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_base(quantize: str = "none", path: str | None = None, dtype=torch.float32, device=None) -> nn.Module:
    """The demo base (or the model at ``path``) in eval mode, quantized by transformers on load.

    ``device``: where a quantized model is placed (default: CUDA when available, else the CPU).
    """
    from transformers import AutoModelForCausalLM

    config = quantization_config(quantize, dtype if isinstance(dtype, torch.dtype) else torch.float32)
    kwargs = {}
    if config is not None:
        kwargs = dict(quantization_config=config,
                      device_map=str(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    return AutoModelForCausalLM.from_pretrained(path or base_path(), dtype=dtype, **kwargs).eval()


def quantized_copy(model: nn.Module, mode: str) -> nn.Module:
    """A copy of an in-memory (e.g. merged) model, quantized by transformers: saved to a temporary
    folder and loaded back with :func:`quantization_config`. ``mode="none"`` returns ``model``."""
    if quantization_config(mode) is None:
        return model
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return load_base(mode, folder, dtype=model.dtype)
