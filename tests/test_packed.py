"""Packed batches: ``lora_graph.Packed(lengths, adapters)`` routes consecutive runs of the forward's
flattened tokens, each with its own SPEC, as one continuous-batching step does.

* Over a batch of equal rows it is the per-row SPEC list, bit for bit (the same plan).
* Over one row holding several sequences, kept apart by a block-diagonal attention mask and
  position ids that restart per sequence, every token equals the same sequence run alone with its
  SPEC: weighted sets with negative weights and the base among them, through ``lm_head`` (an adapter
  targets it) on all positions and on each sequence's last one (``logits_to_keep``).
* A length sum other than the token count fails before any compute, naming both counts.

Both backends (triton in the interpreter), on Llama and Qwen2.
"""

from __future__ import annotations

import pytest
import torch
from helpers import adapter_dir, peft_oracle, save_adapter, targets, tiny_model, token_ids

import lora_graph
from lora_graph import Packed
from lora_graph.backends import torch as torch_backend

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:peft")

ATOL32 = 1e-5
LENGTHS = [5, 3, 7]
SPECS = [{"a": 1.0, "b": -0.5}, None, "b"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Per arch: the pristine model and two adapters, a on every linear module and lm_head, b on
    attention with a bias."""
    root = tmp_path_factory.mktemp("packed")
    out = {}
    for arch in ("llama", "qwen2"):
        model = tiny_model(arch)
        out[arch] = model, {
            "a": save_adapter(model, adapter_dir(root / arch, "a"), seed=5, r=4,
                              target_modules=targets(arch) + ["lm_head"]),
            "b": save_adapter(model, adapter_dir(root / arch, "b"), seed=6, r=2, lora_alpha=6,
                              target_modules=targets(arch, "attn"), lora_bias=True),
        }
    return out


def wrapped(saved, arch, backend):
    model, paths = saved[arch]
    lm = lora_graph.wrap(tiny_model(arch), backend=backend)
    for name, path in paths.items():
        lm.load_adapter(name, path)
    return lm


def packed_inputs(lengths):
    """One row of several sequences: ids, position ids restarting per sequence, and a causal mask
    that keeps sequences apart (4-D, boolean)."""
    seqs = [token_ids(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    total = sum(lengths)
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    causal = torch.arange(total)[:, None] >= torch.arange(total)[None, :]
    mask = ((seg[:, None] == seg[None, :]) & causal)[None, None]  # (1, 1, T, T)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    return seqs, dict(input_ids=torch.cat(seqs, dim=1), position_ids=position_ids, attention_mask=mask)


BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_equal_rows_is_the_row_list(saved, arch, backend):
    lm = wrapped(saved, arch, backend)
    ids = token_ids(4, 6, seed=3)
    specs = ["a", None, {"a": 0.5, "b": -1.0}, "b"]
    with torch.no_grad():
        by_rows = lm(input_ids=ids, adapters=specs).logits
        by_runs = lm(input_ids=ids, adapters=Packed(lengths=[6] * 4, adapters=specs)).logits
        base = lm.model(input_ids=ids).logits
    assert torch.equal(by_runs, by_rows)
    assert torch.equal(by_runs[1], base[1])
    assert all((by_runs[i] - base[i]).abs().max() > 100 * ATOL32 for i in (0, 2, 3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_sequences_match_each_sequence_alone(saved, arch, backend):
    lm = wrapped(saved, arch, backend)
    seqs, inputs = packed_inputs(LENGTHS)
    spec = Packed(lengths=LENGTHS, adapters=SPECS)
    last = torch.tensor(LENGTHS).cumsum(0) - 1  # each sequence's last token
    with torch.no_grad():
        packed = lm(**inputs, adapters=spec).logits[0]  # (T, V)
        kept = lm(**inputs, adapters=spec, logits_to_keep=last).logits[0]  # lm_head sees one token per run
        alone = [lm(input_ids=s, adapters=sp).logits[0] for s, sp in zip(seqs, SPECS)]
        bases = [lm.model(input_ids=s).logits[0] for s in seqs]
    start = 0
    for i, (n, want, base) in enumerate(zip(LENGTHS, alone, bases)):
        got = packed[start:start + n]
        torch.testing.assert_close(got, want, atol=ATOL32, rtol=0, msg=lambda m: f"sequence {i}: {m}")
        torch.testing.assert_close(kept[i], want[-1], atol=ATOL32, rtol=0, msg=lambda m: f"last of {i}: {m}")
        if SPECS[i] is not None:
            assert (want - base).abs().max() > 100 * ATOL32, f"sequence {i} is not routed"
        start += n


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prompt_among_decode_tokens_matches_peft(saved, arch, monkeypatch):
    """A continuous-batching step's shape: one prompt of 40 tokens among one-token sequences of
    other adapters and the base. The torch backend then computes the prompt's adapter as a block
    of its own (less padding); every sequence equals PEFT on that sequence alone."""
    model, paths = saved[arch]
    lm = wrapped(saved, arch, "torch")
    lm.load_adapter("a2", paths["a"])
    lm.load_adapter("b2", paths["b"])
    splits = []
    split = torch_backend.split_slots
    monkeypatch.setattr(torch_backend, "split_slots", lambda grid: splits.append(split(grid)) or splits[-1])
    lengths = [40, 1, 1, 1, 1, 1, 1]
    specs = ["a", "b", "a2", "b2", None, "b", "a2"]
    seqs, inputs = packed_inputs(lengths)
    oracle = peft_oracle(model, {"a": paths["a"], "b": paths["b"]})
    with torch.no_grad():
        packed = lm(**inputs, adapters=Packed(lengths=lengths, adapters=specs)).logits[0]
        start = 0
        for i, (n, spec) in enumerate(zip(lengths, specs)):
            if spec is None:
                with oracle.disable_adapter():
                    want = oracle(input_ids=seqs[i]).logits[0]
            else:
                oracle.set_adapter(spec.rstrip("2"))
                want = oracle(input_ids=seqs[i]).logits[0]
            torch.testing.assert_close(packed[start:start + n], want, atol=ATOL32, rtol=0,
                                       msg=lambda m: f"sequence {i} ({spec}): {m}")
            start += n
    assert any(parts is not None and len(parts[0]) == 1 for parts in splits), "no layer split off the prompt"


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_length_mismatch_fails_before_any_compute(saved, backend):
    lm = wrapped(saved, "llama", backend)
    ran = []
    hook = lm.model.model.embed_tokens.register_forward_hook(lambda *args: ran.append(1))
    _, inputs = packed_inputs(LENGTHS)
    with pytest.raises(ValueError, match=r"14 tokens.*15"), torch.no_grad():
        lm(**inputs, adapters=Packed(lengths=[5, 3, 6], adapters=SPECS))
    assert ran == [], "the model ran before the lengths were checked"
    hook.remove()
    with torch.no_grad():  # the wrapper is usable afterwards: nothing was left routed
        assert torch.equal(lm(input_ids=inputs["input_ids"]).logits, lm.model(input_ids=inputs["input_ids"]).logits)


@pytest.mark.parametrize(
    "lengths, adapters, error, match",
    [
        ([5, 0], ["a", None], ValueError, r"lengths\[1\].*0"),
        ([5, -2], ["a", None], ValueError, r"lengths\[1\]"),
        ([5, 2.5], ["a", None], ValueError, r"lengths\[1\].*2\.5"),
        ([True, 2], ["a", None], ValueError, r"lengths\[0\]"),
        ([5, 2], ["a"], ValueError, "2 lengths but 1"),
        ([], [], ValueError, "at least one"),
        ("52", ["a", "b"], TypeError, "lengths"),
        ([5, 2], "ab", TypeError, "one SPEC per run"),
    ],
)
def test_packed_rejects_malformed_runs(lengths, adapters, error, match):
    with pytest.raises(error, match=match):
        Packed(lengths=lengths, adapters=adapters)


def test_packed_names_the_run_of_an_unknown_adapter(saved):
    lm = wrapped(saved, "llama", "torch")
    with pytest.raises(ValueError, match=r"'nope'.*Packed run 1"), torch.no_grad():
        lm(input_ids=token_ids(1, 4), adapters=Packed(lengths=[2, 2], adapters=["a", {"nope": 1.0}]))
