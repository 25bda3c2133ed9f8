"""bitsandbytes bases on CPU: nf4 (Linear4bit) and int8 (Linear8bitLt), against PEFT over the same
quantized base.

The tiny models are widened (helpers.WIDE) for bnb's CPU kernels, saved, and reloaded by
transformers with a BitsAndBytesConfig, so the quantized modules are exactly what a user gets.
The adapters are made on the fp32 model; PEFT wraps the quantized copy with its bnb LoRA layers.

Tolerance 2e-3, far below what an adapter changes (> 0.2). Two int8 details shape the oracle:
- LLM.int8 quantizes each layer's input per row, so an ulp of difference in an activation can
  flip a rounding and move a logit by ~3e-3. PEFT scales the branch after B and lora_graph before
  B; with power-of-two scales (make_adapters(exact_scales=True)) both orders give the same bits.
- With the default outlier threshold, outlier columns are chosen over the whole batch, so a row's
  output depends on the other rows: only PEFT's own mixed batch (same rows) is a valid oracle.
  OPT flattens tokens before fc1/fc2, where PEFT's mixed batch raises, so OPT's mixed batch is
  checked on "int8-t0" (threshold 0, rows independent) with the per-row oracle instead.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    ARCHS,
    assert_original_modules,
    digest,
    make_adapters,
    module_map,
    peft_oracle,
    peft_rows,
    quantized_model,
    token_ids,
    wide_model,
)

import lora_graph

ATOL = 2e-3
LAYER = {"nf4": "Linear4bit", "int8": "Linear8bitLt", "int8-t0": "Linear8bitLt"}
ROW_INDEPENDENT = {"nf4": True, "int8": False, "int8-t0": True}
NAMES = ["a", "__base__", "b", "c", "b"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Per arch and kind: adapter dirs made on the wide fp32 model, and the folder its quantized
    copies load from."""
    cache = {}

    def get(arch, kind):
        exact = kind != "nf4"
        if (arch, exact) not in cache:
            root = tmp_path_factory.mktemp(f"{arch}-exact" if exact else arch)
            cache[arch, exact] = (make_adapters(wide_model(arch), arch, root, exact_scales=exact), root)
        return cache[arch, exact]

    return get


def load(arch, kind, setup):
    dirs, root = setup(arch, kind)
    model = quantized_model(wide_model(arch), kind, root)
    assert LAYER[kind] in {type(m).__name__ for m in model.modules()}, f"{arch} was not quantized to {kind}"
    return model, dirs


def mixed_oracle(peft_model, arch, kind, names, ids):
    """PEFT's logits for a mixed batch, or None where no valid oracle exists (see module docstring)."""
    with torch.no_grad():
        if arch != "opt":
            return peft_model(input_ids=ids, adapter_names=names).logits
    return peft_rows(peft_model, names, input_ids=ids) if ROW_INDEPENDENT[kind] else None


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("kind", list(LAYER))
def test_quantized_base_matches_peft(arch, kind, setup):
    model, dirs = load(arch, kind, setup)
    ids = token_ids(len(NAMES), 7, seed=6)
    peft_model = peft_oracle(model, dirs)
    assert any(type(m).__module__ == "peft.tuners.lora.bnb" for m in peft_model.modules())
    with torch.no_grad():
        base = model(input_ids=ids).logits
    singles = {n: peft_rows(peft_model, [n] * len(NAMES), input_ids=ids) for n in ("a", "b", "c")}
    for n, logits in singles.items():
        assert (logits - base).abs().max() > 100 * ATOL, f"adapter {n!r} barely changes the logits"
    mixed = mixed_oracle(peft_model, arch, kind, NAMES, ids)
    assert mixed is not None or (arch, kind) == ("opt", "int8")

    lm = lora_graph.wrap(model)
    for n, path in dirs.items():
        lm.load_adapter(n, path)
    with torch.no_grad():
        got_singles = {n: lm(input_ids=ids, adapters=n).logits for n in singles}
        got_mixed = lm(input_ids=ids, adapters=[None if n == "__base__" else n for n in NAMES]).logits
        got_names = lm(input_ids=ids, adapter_names=NAMES).logits
    for n, logits in singles.items():
        torch.testing.assert_close(got_singles[n], logits, atol=ATOL, rtol=0, msg=lambda m: f"adapter {n}: {m}")
    assert torch.equal(got_names, got_mixed)
    if mixed is not None:
        torch.testing.assert_close(got_mixed, mixed, atol=ATOL, rtol=0)
    if ROW_INDEPENDENT[kind]:
        assert torch.equal(got_mixed[1], base[1]), "the row without adapter differs from the base"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_base_is_untouched_and_restored(arch, kind, setup):
    model, dirs = load(arch, kind, setup)
    ids = token_ids(3, 6, seed=7)
    with torch.no_grad():
        # bitsandbytes repacks a 4-bit weight for its CPU kernel on the first forward (its own
        # doing, with or without lora_graph), so the digest is taken after one base forward.
        base = model(input_ids=ids).logits
    before = digest(model)
    modules = module_map(model)

    lm = lora_graph.wrap(model)
    for n, path in dirs.items():
        lm.load_adapter(n, path)
    quantized = [n for n, m in modules.items() if type(m).__name__ == LAYER[kind]]
    for name in quantized:  # every quantized layer is targeted by b: wrapped around the same object
        assert model.get_submodule(name).base_layer is modules[name]
    with torch.no_grad():
        lm(input_ids=ids, adapters=["a", None, {"b": 0.5, "c": -1.0}])
        lm.generate(input_ids=ids, adapters=["c", "a", None], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert digest(model) == before
    lm.unload_adapter("b")
    with torch.no_grad():
        lm(input_ids=ids, adapters="c")
    assert digest(model) == before
    assert lm.unwrap() is model
    assert digest(model) == before
    assert_original_modules(model, modules)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base)


@pytest.mark.parametrize("kind", list(LAYER))
def test_quantized_generate_mixed_batch_rows_as_alone(kind, setup):
    model, dirs = load("llama", kind, setup)
    peft_model = peft_oracle(model, dirs)
    lm = lora_graph.wrap(model)
    for n, path in dirs.items():
        lm.load_adapter(n, path)
    ids = token_ids(4, 5, seed=8)
    spec = ["b", None, "a", "c"]
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        base = model.generate(input_ids=ids, **kwargs)
        base_alone = [model.generate(input_ids=ids[i : i + 1], **kwargs) for i in range(len(spec))]
        if not all(torch.equal(base[i : i + 1], b) for i, b in enumerate(base_alone)):
            assert not ROW_INDEPENDENT[kind], "the base model is not batch invariant here"
        batch = lm.generate(input_ids=ids, adapters=spec, **kwargs)
        peft_batch = peft_model.generate(input_ids=ids, adapter_names=[n or "__base__" for n in spec], **kwargs)
        assert torch.equal(batch, peft_batch)
        for i, name in enumerate(spec):
            alone = lm.generate(input_ids=ids[i : i + 1], adapters=[name], **kwargs)
            if ROW_INDEPENDENT[kind]:
                assert torch.equal(batch[i : i + 1], alone), f"row {i} ({name})"
            if name is not None:
                peft_model.set_adapter(name)
                assert torch.equal(alone, peft_model.generate(input_ids=ids[i : i + 1], **kwargs)), f"row {i} vs PEFT"
