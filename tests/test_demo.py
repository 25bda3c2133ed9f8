"""The shipped demo: assets, accuracy through the public API, parity with PEFT, and the CLI.

Accuracy is measured on held-out words (never trained on), in ONE mixed generate call per check,
so routing mistakes between rows show up as wrong answers. The PEFT check loads the shipped
adapters with PEFT itself over the shipped base; lora_graph must give the same logits.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import lora_graph  # noqa: E402
from lora_graph import cli, demo  # noqa: E402

WORDS = demo.heldout_words(100)


def load_base():
    return AutoModelForCausalLM.from_pretrained(demo.base_path(), dtype=torch.float32).eval()


def wrapped(quantize: str = "none"):
    lm = lora_graph.wrap(demo.load_base(quantize))
    for name, path in demo.adapter_paths().items():
        lm.load_adapter(name, path)
    return lm


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(demo.base_path())


def mixed_accuracy(lm, tokenizer, words) -> dict[str, float]:
    """Exact match per task; every word gets a row for each adapter and a base row, interleaved."""
    tasks = [*demo.ADAPTERS, None]
    rows = [(w, t) for w in words for t in tasks]
    answers, _ = demo.complete(lm, tokenizer, [w for w, _ in rows], [t for _, t in rows])
    hits = dict.fromkeys(tasks, 0)
    for (w, t), answer in zip(rows, answers):
        hits[t] += answer == demo.expected(t or "copy", w)
    return {t or "base": n / len(words) for t, n in hits.items()}


# -- assets --------------------------------------------------------------------------------------
def test_assets_sizes_and_mixed_ranks():
    base = os.path.join(demo.base_path(), "model.safetensors")
    assert os.path.getsize(base) <= 8 * 2**20
    ranks, targets = set(), set()
    for name, path in demo.adapter_paths().items():
        assert os.path.getsize(os.path.join(path, "adapter_model.safetensors")) <= 2**20, name
    lm = wrapped()
    for info in lm.adapters.values():
        ranks.add(info.rank)
        targets.add(frozenset(t.rsplit(".", 1)[-1] for t in info.targets))
    assert len(ranks) > 1 and len(targets) > 1


def test_tokenizer_is_one_token_per_byte(tokenizer):
    text = "abc=ABC" + demo.EOS
    assert tokenizer(text)["input_ids"] == list(text.encode())
    assert tokenizer.eos_token_id == ord(demo.EOS)
    assert tokenizer.decode(list(text.encode())) == text


def test_heldout_words_are_heldout_and_fixed():
    assert all(demo.is_heldout(w) and demo.valid_word(w) for w in WORDS)
    assert len(set(WORDS)) == len(WORDS) and WORDS == demo.heldout_words(100)
    assert 0.05 < sum(demo.is_heldout(f"w{i}") for i in range(2000)) / 2000 < 0.15


def test_expected_answers():
    assert [demo.expected(t, "abz") for t in ("copy", "upper", "reverse", "shift", "double")] == [
        "abz", "ABZ", "zba", "bca", "aabbzz"]


# -- accuracy through the public API ---------------------------------------------------------------
def test_mixed_batch_accuracy_fp32(tokenizer):
    acc = mixed_accuracy(wrapped(), tokenizer, WORDS)
    assert all(acc[name] >= 0.95 for name in (*demo.ADAPTERS, "base")), acc


def test_mixed_batch_accuracy_nf4_base(tokenizer):
    lm = wrapped("nf4")
    assert any("Linear4bit" in type(m).__name__ for m in lm.model.modules())
    acc = mixed_accuracy(lm, tokenizer, WORDS)
    assert all(acc[name] >= 0.90 for name in demo.ADAPTERS), acc


def test_accuracy_check_catches_misrouting(tokenizer):
    # The accuracy checks above can fail: with the adapters loaded under rotated names, every
    # adapter row gets another task's answers.
    lm = lora_graph.wrap(load_base())
    paths = demo.adapter_paths()
    for name, other in zip(demo.ADAPTERS, demo.ADAPTERS[1:] + demo.ADAPTERS[:1]):
        lm.load_adapter(name, paths[other])
    acc = mixed_accuracy(lm, tokenizer, WORDS[:20])
    assert all(acc[name] < 0.2 for name in demo.ADAPTERS), acc
    assert acc["base"] >= 0.95


def test_adapters_change_the_answer(tokenizer):
    # The same prompt routed to each task gives that task's answer, not the base's.
    word = WORDS[0]
    answers, _ = demo.complete(wrapped(), tokenizer, [word] * 5, [*demo.ADAPTERS, None])
    assert len(set(answers)) == 5


# -- parity with PEFT ------------------------------------------------------------------------------
def test_shipped_adapters_match_peft_logits(tokenizer):
    texts = [demo.prompt(w) + demo.expected("double", w) for w in WORDS[:8]]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    real = enc["attention_mask"].bool()  # compare real tokens, not left padding
    lm = wrapped()
    names = list(demo.ADAPTERS)
    # ONE mixed forward: each text once per adapter, then base rows.
    spec = [n for n in names for _ in texts] + [None] * len(texts)
    with torch.no_grad():
        mixed = lm(input_ids=enc["input_ids"].repeat(len(names) + 1, 1),
                   attention_mask=enc["attention_mask"].repeat(len(names) + 1, 1), adapters=spec).logits
        plain = load_base()(**enc).logits
    mixed = mixed.split(len(texts))
    torch.testing.assert_close(mixed[-1][real], plain[real], rtol=0, atol=1e-5)
    for name, got_mixed in zip(names, mixed):
        path = demo.adapter_paths()[name]
        with torch.no_grad():
            want = PeftModel.from_pretrained(load_base(), path).eval()(**enc).logits
            ref = PeftModel.from_pretrained(load_base().double(), path).double().eval()(**enc).logits  # fp64 oracle
            alone = lm(**enc, adapters=name).logits
        assert (want - plain)[real].abs().max() > 1e-2, f"{name} leaves the logits unchanged"
        torch.testing.assert_close(alone[real], want[real], rtol=0, atol=1e-4, msg=lambda m: f"{name}: {m}")
        # In a mixed batch the grouped path sums in another order; fp32 noise on logits of size ~30
        # reaches 1e-4, so it is held to twice PEFT's own distance from the fp64 oracle.
        err = (got_mixed.double() - ref)[real].abs().max().item()
        peft_err = (want.double() - ref)[real].abs().max().item()
        assert err <= 2 * peft_err + 1e-5, f"{name}: mixed batch off by {err:.2e}, PEFT fp32 by {peft_err:.2e}"


# -- CLI -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_cli_demo_exits_zero(quantize, capsys):
    assert cli.main(["demo", "--quantize", quantize]) == 0
    out = capsys.readouterr().out
    assert "✗" not in out and "tokens/s" in out


def test_cli_demo_rejects_bad_words():
    assert cli.main(["demo", "--words", "ABC"]) == 2


@pytest.mark.parametrize("quantize, layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_demo_base_is_quantized_by_transformers(quantize, layer):
    """The demo quantizes through transformers' BitsAndBytesConfig, not by swapping layers itself."""
    model = demo.load_base(quantize)
    assert model.hf_quantizer is not None and model.config.quantization_config.quant_method == "bitsandbytes"
    assert type(model.model.layers[0].mlp.down_proj).__name__ == layer
    assert type(model.lm_head) is torch.nn.Linear  # transformers keeps the head unquantized
