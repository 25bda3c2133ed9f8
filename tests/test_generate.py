"""generate() on mixed batches: each row gets the tokens it would get alone.

A row generated alone is the reference for the same row in a mixed batch, under every decoding
mode that expands or reorders rows: greedy, beam search, beams with several returned sequences,
and left padding. That comparison is only meaningful where the plain HF model is itself batch
invariant on the same inputs and settings, so each test checks that on the base model first.
Rows alone are anchored to PEFT (``set_adapter`` / ``disable_adapter()`` and generate).
"""

from __future__ import annotations

import pytest
import torch
from helpers import ARCHS, peft_oracle, tiny_model, token_ids

import lora_graph

ARCH_NAMES = list(ARCHS)
SPEC = ["a", None, {"a": 0.5, "b": -1.0, "c": 2.0}, "c", "b"]
LENGTHS = [7, 4, 6, 5, 3]  # unpadded prompt lengths, for the left-padded batches
COMMON = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
MODES = {
    "greedy": {},
    "beams": dict(num_beams=2),
    "beams_2_sequences": dict(num_beams=2, num_return_sequences=2),
}


def prompts(padded: bool):
    """(input_ids, attention_mask, per-row unpadded prompts) for the SPEC's rows."""
    ids = token_ids(len(SPEC), max(LENGTHS), seed=5)
    if not padded:
        return ids, torch.ones_like(ids), [ids[i : i + 1] for i in range(len(SPEC))]
    width = max(LENGTHS)
    padded_ids = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    rows = []
    for i, n in enumerate(LENGTHS):
        padded_ids[i, width - n :] = ids[i, :n]
        mask[i, width - n :] = 1
        rows.append(ids[i : i + 1, :n])
    return padded_ids, mask, rows


def new_tokens(batch_out, rows, width, per_row):
    """Split a batch's generated tokens per prompt row, dropping the (padded) prompt."""
    return [batch_out[i * per_row : (i + 1) * per_row, width:] for i in range(len(rows))]


def generate(fn, ids, mask, mode, **spec):
    with torch.no_grad():
        return fn(input_ids=ids, attention_mask=mask, **COMMON, **MODES[mode], **spec)


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("mode", list(MODES))
def test_mixed_batch_generates_each_row_as_alone(arch, mode, padded, adapter_dirs):
    dirs = adapter_dirs(arch)
    model = tiny_model(arch)
    ids, mask, rows = prompts(padded)
    width = ids.shape[1]
    per_row = MODES[mode].get("num_return_sequences", 1)

    # the plain model must be batch invariant here, or "same as alone" means nothing
    base_batch = new_tokens(generate(model.generate, ids, mask, mode), rows, width, per_row)
    base_alone = [generate(model.generate, r, torch.ones_like(r), mode)[:, r.shape[1]:] for r in rows]
    for i in range(len(rows)):
        assert torch.equal(base_batch[i], base_alone[i]), f"the base model is not batch invariant on row {i}"

    peft_model = peft_oracle(model, dirs)
    lm = lora_graph.wrap(model)
    for n, path in dirs.items():
        lm.load_adapter(n, path)
    batch = new_tokens(generate(lm.generate, ids, mask, mode, adapters=SPEC), rows, width, per_row)
    changed = 0
    for i, (row, spec) in enumerate(zip(rows, SPEC)):
        alone = generate(lm.generate, row, torch.ones_like(row), mode, adapters=[spec])[:, row.shape[1]:]
        assert torch.equal(batch[i], alone), f"row {i} ({spec}) differs from the same row generated alone"
        if spec is None:
            assert torch.equal(alone, base_alone[i])
        elif isinstance(spec, str):
            peft_model.set_adapter(spec)
            expected = generate(peft_model.generate, row, torch.ones_like(row), mode)[:, row.shape[1]:]
            assert torch.equal(alone, expected), f"row {i} ({spec}) alone differs from PEFT"
        changed += spec is not None and not torch.equal(alone, base_alone[i])
    # tiny random models often repeat one token, so not every adapter changes its row's tokens
    assert changed >= 2, "the adapters barely change the generated tokens; the comparison would be vacuous"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
def test_generate_accepts_peft_adapter_names(arch, adapter_dirs):
    """adapter_names=[..., "__base__"] gives PEFT's own mixed-batch generation, token for token."""
    dirs = adapter_dirs(arch)
    model = tiny_model(arch)
    names = ["b", "__base__", "a", "c", "a"]
    ids, mask, _ = prompts(padded=False)
    peft_model = peft_oracle(model, dirs)
    expected = generate(peft_model.generate, ids, mask, "beams", adapter_names=names)
    lm = lora_graph.wrap(model)
    for n, path in dirs.items():
        lm.load_adapter(n, path)
    assert torch.equal(generate(lm.generate, ids, mask, "beams", adapter_names=names), expected)
    spec = [None if n == "__base__" else n for n in names]
    assert torch.equal(generate(lm.generate, ids, mask, "beams", adapters=spec), expected)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_sampling_with_several_sequences_keeps_each_rows_adapter(arch, adapter_dirs):
    """do_sample with num_return_sequences=2 under a fixed seed: a batch whose rows all use one
    adapter gives the same tokens through a per-row SPEC list (expanded rows keep their row's
    adapter) as through the broadcast SPEC, and a batch of one row gives PEFT's tokens."""
    dirs = adapter_dirs(arch)
    model = tiny_model(arch)
    ids, mask, rows = prompts(padded=False)
    peft_model = peft_oracle(model, dirs)
    lm = lora_graph.wrap(model)
    for n, path in dirs.items():
        lm.load_adapter(n, path)
    sample = dict(COMMON, do_sample=True, top_k=8, num_return_sequences=2)

    def run(fn, input_ids, attention_mask, **spec):
        torch.manual_seed(1234)
        with torch.no_grad():
            return fn(input_ids=input_ids, attention_mask=attention_mask, **sample, **spec)

    broadcast = run(lm.generate, ids, mask, adapters="b")
    per_row = run(lm.generate, ids, mask, adapters=["b"] * len(SPEC))
    assert torch.equal(per_row, broadcast)
    peft_model.set_adapter("b")
    assert torch.equal(run(lm.generate, rows[0], torch.ones_like(rows[0]), adapters=["b"]),
                       run(peft_model.generate, rows[0], torch.ones_like(rows[0])))
    assert not torch.equal(broadcast, run(model.generate, ids, mask))
