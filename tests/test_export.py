"""Export: ``save_merged`` (a plain HF checkpoint with the blend merged in) and ``save_adapter``
(the blend as one PEFT adapter), on Llama, GPT-2 (Conv1D, tied embedding) and Qwen2 (lm_head and
embedding LoRA), with rank/alpha patterns, rsLoRA, lora_B biases, negative weights and DoRA.

Oracles, each independent of export.py:
- the wrapper's own forward ``lm(..., adapters=SPEC)`` (tested against PEFT elsewhere), which the
  reloaded checkpoint or adapter must reproduce within 1e-5 in fp32;
- ``helpers.merged_copy``: ``W + Σ w·s·B·A`` computed in fp64 from the adapter files alone;
- PEFT's own ``merge_and_unload`` for a single adapter (DoRA included), and PEFT's
  ``PeftModel.from_pretrained`` on the written adapter;
- over nf4, ``bitsandbytes.functional.dequantize_4bit`` of each weight plus the file deltas.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from helpers import (
    adapter_dir,
    assert_original_modules,
    digest,
    make_adapters,
    merged_copy,
    module_map,
    quantized_model,
    save_adapter,
    save_dora,
    targets,
    tiny_model,
    tiny_tokenizer,
    token_ids,
    wide_model,
)
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import lora_graph

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

ATOL = 1e-5
EMBEDDING = {"llama": "embed_tokens", "qwen2": "embed_tokens", "gpt2": "wte"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Per arch: make_adapters' a (patterns, + lm_head on qwen2), b (rsLoRA) and c (lora_B bias),
    e (embedding LoRA), d (DoRA on attention and MLP, rank and alpha patterns); on Qwen2, de (DoRA
    on the embedding); on GPT-2, h (lm_head LoRA, where lm_head is tied to the embedding)."""
    cache = {}

    def get(arch):
        if arch not in cache:
            model, root = tiny_model(arch), tmp_path_factory.mktemp(arch)
            found = make_adapters(model, arch, root)
            found["e"] = save_adapter(model, adapter_dir(root, "e"), seed=14, r=3, lora_alpha=5,
                                      target_modules=[EMBEDDING[arch]])
            attn, mlp = targets(arch, "attn"), targets(arch, "mlp")
            found["d"] = save_dora(model, adapter_dir(root, "d"), seed=15, r=4, lora_alpha=6, target_modules=attn + mlp,
                                   rank_pattern={mlp[0]: 2}, alpha_pattern={attn[0]: 3})
            if arch == "qwen2":  # DoRA on the embedding: g per embedding dimension
                found["de"] = save_dora(model, adapter_dir(root, "de"), seed=18, r=3, lora_alpha=4,
                                        target_modules=["embed_tokens"])
            if arch == "gpt2":  # lm_head, tied to wte
                found["h"] = save_adapter(model, adapter_dir(root, "h"), seed=17, r=2, lora_alpha=3,
                                          target_modules=["lm_head"])
            cache[arch] = found
        return cache[arch]

    return get


def wrapped(arch, dirs, names=None, load=True):
    lm = lora_graph.wrap(tiny_model(arch))
    for name in names or dirs:
        (lm.load_adapter if load else lm.register_adapter)(name, dirs[name])
    return lm


def logits(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def reload(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def assert_state_close(got: torch.nn.Module, want: torch.nn.Module, atol: float = 1e-6, rtol: float = 0) -> None:
    """Every tensor of ``want`` is in ``got`` (same name and shape) and within ``atol + rtol·|want|``."""
    have = got.state_dict()
    for key, tensor in want.state_dict().items():
        assert key in have, f"{key} is missing from the checkpoint"
        torch.testing.assert_close(have[key], tensor, atol=atol, rtol=rtol, msg=lambda m: f"{key}: {m}")


# SPECs per arch: single adapters, sets with negative weights over rank/alpha patterns, rsLoRA,
# embedding (and lm_head on qwen2) LoRA, DoRA alone and in a set. c's lora_B bias needs a base
# bias to merge into: GPT-2's Conv1D has one, Llama's and Qwen2's MLP do not (see test_errors).
SPECS = {
    "llama": ["a", {"a": 0.7, "b": -1.3, "e": 0.9}, "d", {"d": 0.6, "b": -0.4, "e": 1.0}],
    "qwen2": ["a", {"a": 0.7, "b": -1.3, "e": 0.9}, "d", {"d": -0.5, "a": 1.2}, {"de": 0.8, "e": -0.6, "d": 0.3}],
    "gpt2": ["e", {"a": 1.0, "b": 0.5, "c": -0.8}, {"a": 0.7, "b": -1.3, "e": 0.9}, "d", {"d": 0.6, "c": 1.0},
             {"h": -0.8, "a": 0.5}],
}


@pytest.mark.parametrize("arch", list(SPECS))
def test_save_merged_reloads_to_the_blend(arch, dirs, tmp_path):
    found = dirs(arch)
    lm = wrapped(arch, found)
    ids = token_ids(3, 9, seed=1)
    base = logits(lm, ids)
    before, modules = digest(lm.model), module_map(lm.model)
    for i, spec in enumerate(SPECS[arch]):
        want = logits(lm, ids, adapters=spec)
        assert (want - base).abs().max() > 100 * ATOL, f"{spec} barely changes the logits"
        out = lm.save_merged(tmp_path / f"m{i}", adapters=spec)
        merged = reload(out)
        torch.testing.assert_close(logits(merged, ids), want, atol=ATOL, rtol=0, msg=lambda m: f"{spec}: {m}")
        weights = {spec: 1.0} if isinstance(spec, str) else spec
        if not any(n in ("d", "de") for n in weights):  # LoRA only: the fp64 merge from the files
            assert_state_close(merged, merged_copy(tiny_model(arch), found, weights))
        config = json.loads((out / "config.json").read_text())
        untied = "e" in weights or "h" in weights  # one side of GPT-2's tie changed
        assert config["tie_word_embeddings"] is (arch == "gpt2" and not untied), config
        assert "quantization_config" not in config and config["dtype"] == "float32"
        assert (out / "generation_config.json").is_file()
        assert torch.equal(logits(lm, ids, adapters=spec), want)
    assert digest(lm.model) == before
    assert_original_modules(lm.model, modules)
    assert torch.equal(logits(lm, ids), base)


@pytest.mark.parametrize(("arch", "name"), [("llama", "a"), ("llama", "d"), ("gpt2", "a"), ("gpt2", "d"),
                                           ("qwen2", "e"), ("qwen2", "de")])
def test_save_merged_equals_peft_merge_and_unload(arch, name, dirs, tmp_path):
    """A single adapter, LoRA or DoRA, merged by PEFT itself (Conv1D: fan_in_fan_out; embeddings)."""
    found = dirs(arch)
    lm = wrapped(arch, found, [name])
    out = lm.save_merged(tmp_path / "m", adapters=name)
    oracle = PeftModel.from_pretrained(tiny_model(arch), found[name]).merge_and_unload().eval()
    assert_state_close(reload(out), oracle, atol=2e-6, rtol=1e-6)  # fp32 rounding of both merges


def test_save_merged_of_registered_adapters_shards_and_tokenizer(dirs, tmp_path):
    """Adapters only registered (never resident) export the same, and stay non-resident; a small
    max_shard_size gives several shards and an index; the tokenizer is written; dtype is honoured."""
    found = dirs("llama")
    lm = wrapped("llama", found, ["a", "b", "e"], load=False)
    spec = {"a": -0.6, "b": 1.1, "e": 0.8}
    out = lm.save_merged(tmp_path / "m", adapters=spec, max_shard_size="20KB", tokenizer=tiny_tokenizer())
    assert lm.resident == ()
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    ids = token_ids(2, 7, seed=3)
    torch.testing.assert_close(logits(reload(out), ids), logits(lm, ids, adapters=spec), atol=ATOL, rtol=0)
    assert AutoTokenizer.from_pretrained(out)("t5 t9")["input_ids"] == [5, 9]

    half = lm.save_merged(tmp_path / "bf16", adapters=spec, dtype=torch.bfloat16)
    reloaded = AutoModelForCausalLM.from_pretrained(half)
    assert reloaded.dtype == torch.bfloat16
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    full = reload(out).state_dict()
    for key, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, full[key].to(torch.bfloat16)), key


def test_save_merged_of_a_bf16_model_is_bf16(dirs, tmp_path):
    """The default dtype is the model's: a bf16 model gives a bf16 checkpoint, merged in fp32 and
    rounded once (so within one bf16 rounding of the fp64 merge)."""
    found = dirs("qwen2")
    lm = lora_graph.wrap(tiny_model("qwen2", dtype=torch.bfloat16))
    for name in ("a", "e"):
        lm.load_adapter(name, found[name])
    spec = {"a": 0.9, "e": -1.1}
    out = lm.save_merged(tmp_path / "m", adapters=spec)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    got = AutoModelForCausalLM.from_pretrained(out).state_dict()
    want = merged_copy(tiny_model("qwen2", dtype=torch.bfloat16), found, spec).state_dict()
    for key, tensor in want.items():
        assert got[key].dtype == torch.bfloat16, key
        torch.testing.assert_close(got[key].float(), tensor, atol=1e-6, rtol=2**-8, msg=lambda m: f"{key}: {m}")


# -- nf4 base --------------------------------------------------------------------------------------


def file_deltas(adapters: dict[str, str], weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """``{module: Σ w·s·B·A}`` (N, K) in fp64, from the saved safetensors and configs alone."""
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    out = {}
    for name, weight in weights.items():
        config = json.loads(open(os.path.join(adapters[name], "adapter_config.json")).read())
        tensors = load_file(os.path.join(adapters[name], "adapter_model.safetensors"))
        for key, a in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key[len("base_model.model."):-len(".lora_A.weight")]
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            r = config["rank_pattern"].get(get_pattern_key(config["rank_pattern"], module), config["r"])
            alpha = config["alpha_pattern"].get(get_pattern_key(config["alpha_pattern"], module), config["lora_alpha"])
            scale = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
            out[module] = out.get(module, 0) + weight * scale * (b.double() @ a.double())
    return out


def test_save_merged_over_nf4_is_dequantize_then_merge(tmp_path):
    import bitsandbytes.functional as bnbf

    model = wide_model("llama")
    adapters = {"a": make_adapters(model, "llama", tmp_path)["a"],  # attention, rank and alpha patterns
                "n": save_adapter(model, adapter_dir(tmp_path, "n"), seed=16, r=8, lora_alpha=16, use_rslora=True,
                                  target_modules=targets("llama", "attn"))}  # the MLP stays untouched
    nf4 = quantized_model(model, "nf4", tmp_path)
    quantized = {n: m for n, m in nf4.named_modules() if type(m).__name__ == "Linear4bit"}
    # the oracle reads each weight before any forward: bitsandbytes repacks it for its CPU kernel then
    dense = {n: bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state).double() for n, m in quantized.items()}
    plain = {k: v.clone() for k, v in nf4.state_dict().items() if not k.split(".weight")[0] in quantized}
    before = digest(nf4)

    lm = lora_graph.wrap(nf4)
    for name, path in adapters.items():
        lm.load_adapter(name, path)
    spec = {"a": 0.7, "n": -1.3}
    out = lm.save_merged(tmp_path / "m", adapters=spec)
    assert digest(nf4) == before
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    state = reload(out).state_dict()
    deltas = file_deltas(adapters, spec)
    assert set(deltas) < set(quantized)
    for name, w in dense.items():
        want = (w + deltas.get(name, 0)).float()
        torch.testing.assert_close(state[name + ".weight"], want, atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")
    for key, tensor in plain.items():
        if tensor.is_floating_point():
            assert torch.equal(state[key], tensor), key

    # After a forward, bitsandbytes (on a CPU with AVX512-BF16) has repacked each weight for its
    # kernel, with the block scales rounded to bf16: the export then reads the weights the forward
    # multiplies by, which differ from the oracle by that rounding (bf16's unit roundoff, 2^-8 relative) only.
    ids = token_ids(2, 7, seed=4)
    want = logits(lm, ids, adapters=spec)
    assert (want - logits(lm, ids)).abs().max() > 0.1
    repacked = digest(nf4)
    state = reload(lm.save_merged(tmp_path / "m2", adapters=spec)).state_dict()
    assert digest(nf4) == repacked
    for name, w in dense.items():
        error = (state[name + ".weight"].double() - (w + deltas.get(name, 0))).abs()
        assert (error <= 2**-8 * w.abs() + 1e-6).all(), f"{name}: off by {error.max():.3g}"


def test_save_merged_over_int8_is_dequantize_then_merge(tmp_path):
    """LLM.int8 weights: one scale per row, ``W = CB · SCB / 127``, written here from that formula.
    GPT-2: transformers swaps each Conv1D for a bitsandbytes Linear, so the export transposes the
    weights back to Conv1D's ``(in, out)`` (c_proj is square: its shape cannot tell)."""
    model = wide_model("gpt2")
    adapters = {"a": save_adapter(model, adapter_dir(tmp_path, "a"), seed=19, r=4, lora_alpha=8,
                                  target_modules=["c_attn"], rank_pattern={"h.0.attn.c_attn": 6})}
    int8 = quantized_model(model, "int8", tmp_path)
    quantized = {n: m for n, m in int8.named_modules() if type(m).__name__ == "Linear8bitLt"}
    assert quantized

    def dequantized(m):
        scb = m.weight.SCB if getattr(m.weight, "SCB", None) is not None else m.state.SCB
        return m.weight.data.double() * scb.double()[:, None] / 127

    lm = lora_graph.wrap(int8)
    lm.load_adapter("a", adapters["a"])
    before = digest(int8)
    out = lm.save_merged(tmp_path / "m", adapters={"a": -1.5})
    assert digest(int8) == before
    merged = reload(out)
    state, deltas = merged.state_dict(), file_deltas(adapters, {"a": -1.5})
    for name, m in quantized.items():
        want = (dequantized(m) + deltas.get(name, 0)).float()  # (out, in), as the quantized Linear holds it
        got = state[name + ".weight"].t()  # GPT-2's Conv1D stores (in, out)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, msg=lambda x: f"{name}: {x}")
    ids = token_ids(2, 6, seed=9)
    want, base = logits(lm, ids, adapters={"a": -1.5}), logits(lm, ids)
    # LLM.int8 quantizes activations too, so the dense checkpoint is close to it, not equal
    assert (logits(merged, ids) - want).abs().max() < 0.03 < (want - base).abs().max()


# -- save_adapter ----------------------------------------------------------------------------------

# On the tiny Qwen2 (logits up to ~4) the fp32 noise floor is close to the tolerance: lm and PEFT's own
# forward with a, e and b active at weight 1 differ by 8e-6 (GEMM summation order), so its blend keeps
# weights of magnitude below 1.
ADAPTER_SPECS = {
    "llama": [{"a": 0.7, "b": -1.3, "c": 0.5}, "b", "d", {"e": -1.5, "b": 0.25}],
    "qwen2": [{"a": 0.7, "e": -0.9, "b": 0.6}, "a"],
    "gpt2": [{"a": 1.0, "b": 0.5, "c": -0.8}, {"d": 1.0}],
}


@pytest.mark.parametrize("arch", list(ADAPTER_SPECS))
def test_save_adapter_reproduces_the_blend_in_peft_and_here(arch, dirs, tmp_path):
    found = dirs(arch)
    lm = wrapped(arch, found)
    ids = token_ids(3, 8, seed=5)
    before = digest(lm.model)
    for i, spec in enumerate(ADAPTER_SPECS[arch]):
        want = logits(lm, ids, adapters=spec)
        out = lm.save_adapter(tmp_path / f"x{i}", adapters=spec)
        peft_model = PeftModel.from_pretrained(tiny_model(arch), out).eval()
        torch.testing.assert_close(logits(peft_model, ids), want, atol=ATOL, rtol=0, msg=lambda m: f"{spec}: {m}")
        check_written_ranks(out, found, spec, peft_model)
        if not json.loads((out / "adapter_config.json").read_text())["lora_bias"]:  # PEFT cannot merge c's bias
            merged = peft_model.merge_and_unload()  # its fan_in_fan_out and scales, merged by PEFT
            torch.testing.assert_close(logits(merged, ids), want, atol=ATOL, rtol=0, msg=lambda m: f"{spec}: {m}")
        lm.load_adapter(f"x{i}", out)
        torch.testing.assert_close(logits(lm, ids, adapters=f"x{i}"), want, atol=ATOL, rtol=0)
    assert digest(lm.model) == before


def check_written_ranks(out, found, spec, peft_model) -> None:
    """Per module, the written rank is the sum of the set's ranks there, and PEFT's scale is 1."""
    from safetensors.torch import load_file

    assert not json.loads((out / "adapter_config.json").read_text())["use_rslora"]
    tensors = {}
    for name in ([spec] if isinstance(spec, str) else spec):
        for key, t in load_file(os.path.join(found[name], "adapter_model.safetensors")).items():
            if key.endswith(("lora_A.weight", "lora_embedding_A")):
                tensors[key] = tensors.get(key, 0) + t.shape[0]
    written = load_file(str(out / "adapter_model.safetensors"))
    assert {k: t.shape[0] for k, t in written.items() if k in tensors} == tensors
    scales = {s for m in peft_model.modules() if isinstance(getattr(m, "scaling", None), dict)
              for s in m.scaling.values()}
    assert scales == {1.0}, scales


# -- errors: clear messages, nothing written, the wrapper as it was ---------------------------------


def test_errors_write_nothing_and_leave_the_wrapper_as_it_was(dirs, tmp_path):
    found = dirs("llama")
    lm = wrapped("llama", found, ["a", "b", "c", "d", "e"])
    lm.register_adapter("b2", found["b"])
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    (tmp_path / "a_file").write_text("x")
    state = (digest(lm.model), dict(lm.adapters), lm.resident, module_map(lm.model))
    cases = [
        ("save_merged", "nope", tmp_path / "o1", r"unknown adapter 'nope'"),
        ("save_adapter", {"a": 1.0, "nope": 2.0}, tmp_path / "o2", r"unknown adapter 'nope'"),
        ("save_adapter", {"d": 1.0, "a": 0.5}, tmp_path / "o3", r"DoRA adapter 'd'.*save_merged"),
        ("save_adapter", {"d": 0.5}, tmp_path / "o4", r"DoRA adapter 'd'"),
        ("save_merged", ["a", "b"], tmp_path / "o5", r"ONE SPEC.*got a list"),
        ("save_adapter", lora_graph.Packed([2], ["a"]), tmp_path / "o6", r"ONE SPEC.*Packed"),
        ("save_merged", "a", tmp_path / "a_file", r"existing file"),
        ("save_adapter", "a", occupied, r"not empty"),
        ("save_adapter", None, tmp_path / "o7", r"names no adapter"),
        ("save_adapter", {"a": 0.0}, tmp_path / "o8", r"names no adapter"),
        ("save_merged", {"a": 1.0, "c": 0.5}, tmp_path / "o9", r"adapter 'c' has a lora_B bias on module "
                                                               r"'model\.layers\.0\.mlp\.\w+_proj', which has no bias"),
        ("save_adapter", {"c": 1.0, "e": 0.5}, tmp_path / "new" / "o10",
         r"adapter 'c' has lora_B biases.*'model\.embed_tokens'"),
    ]
    listing = sorted(p.name for p in tmp_path.iterdir())
    for method, spec, out, message in cases:
        with pytest.raises((ValueError, FileExistsError), match=message):
            getattr(lm, method)(out, adapters=spec)
        assert sorted(p.name for p in tmp_path.iterdir()) == listing, f"{method}({spec!r}) left files behind"
    with pytest.raises(TypeError, match="dtype must be a floating"):
        lm.save_merged(tmp_path / "o11", adapters="a", dtype=torch.int8)
    with pytest.raises(ValueError, match="max_shard_size"):
        lm.save_merged(tmp_path / "o12", adapters="a", max_shard_size="lots")
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
    assert (occupied / "keep.txt").read_text() == "mine" and (tmp_path / "a_file").read_text() == "x"
    assert (digest(lm.model), dict(lm.adapters), lm.resident) == state[:3]
    assert_original_modules(lm.model, state[3])


def test_a_failed_write_removes_the_partial_directory(dirs, tmp_path, monkeypatch):
    """A failure while the shards are written (disk full, ...) leaves no directory behind."""
    from lora_graph import export

    lm = wrapped("llama", dirs("llama"), ["a"])

    def fail(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(export, "_write_config", fail)
    with pytest.raises(OSError, match="No space"):
        lm.save_merged(tmp_path / "deep" / "out", adapters="a")
    assert list(tmp_path.iterdir()) == []


def test_factors_from_the_host_cache(dirs, tmp_path, monkeypatch):
    """A model off the CPU keeps adapters in a host cache (one coalesced buffer each); the export
    reads them from there. That tier is switched on here on a CPU model, as it is on a GPU."""
    found = dirs("gpt2")
    lm = lora_graph.wrap(tiny_model("gpt2"), max_loaded=3)
    lm._resident.coalesce, lm._host.capacity = True, 8
    for name in ("a", "d", "e"):
        lm.load_adapter(name, found[name])
    spec = {"a": 0.5, "d": -0.7, "e": 1.2}
    ids = token_ids(2, 6, seed=8)
    want = logits(lm, ids, adapters=spec)
    assert lm.evict("a") and lm.evict("d")
    assert lm.resident == ("e",) and all(n in lm._host for n in ("a", "d", "e"))

    def no_read(*args):
        raise AssertionError("the export read the files although the host cache holds the adapter")

    monkeypatch.setattr(lm._resident, "read", no_read)
    out = lm.save_merged(tmp_path / "m", adapters=spec)
    assert lm.resident == ("e",)
    torch.testing.assert_close(logits(reload(out), ids), want, atol=ATOL, rtol=0)
    single = lm.save_adapter(tmp_path / "x", adapters="d")
    peft_model = PeftModel.from_pretrained(tiny_model("gpt2"), single).eval()
    torch.testing.assert_close(logits(peft_model, ids), logits(lm, ids, adapters="d"), atol=ATOL, rtol=0)


def test_in_memory_adapters_export_like_their_folders(dirs, tmp_path):
    """An adapter registered from tensors (no file to read again) exports as its folder does."""
    from safetensors.torch import load_file

    found = dirs("llama")
    spec = {"a": 0.7, "b": -1.3}
    from_files = wrapped("llama", found, names=["a", "b"], load=False)
    in_memory = lora_graph.wrap(tiny_model("llama"), max_cpu=0)
    for name in spec:
        config = json.loads((open(os.path.join(found[name], "adapter_config.json"))).read())
        in_memory.register_adapter(name, state_dict=load_file(os.path.join(found[name], "adapter_model.safetensors")),
                                   config=config)
    ids = token_ids(2, 8, seed=6)
    for how in ("save_merged", "save_adapter"):
        want = getattr(from_files, how)(tmp_path / f"{how}-files", adapters=spec)
        got = getattr(in_memory, how)(tmp_path / f"{how}-memory", adapters=spec)
        if how == "save_merged":
            torch.testing.assert_close(logits(reload(got), ids), logits(reload(want), ids), atol=0, rtol=0)
        else:
            assert load_file(str(got / "adapter_model.safetensors")).keys() == \
                load_file(str(want / "adapter_model.safetensors")).keys()
            torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_model("llama"), got), ids),
                                       logits(from_files, ids, adapters=spec), atol=ATOL, rtol=0)
    assert in_memory.resident == ()  # exporting pages nothing in
