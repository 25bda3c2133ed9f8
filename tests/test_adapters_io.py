"""Reading adapter files: safetensors, the legacy pickle ``.bin``, and what ``lm.adapters`` reports.

A ``.bin`` is pickle, which can run code when read: it is refused unless the caller passes
``allow_pickle=True``, and even then it is read with ``weights_only=True``. The ``.bin`` here is
written by PEFT itself (``save_pretrained(safe_serialization=False)``) from the same adapter as a
safetensors file, so the two must load to identical outputs.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import lora_graph
from helpers import VOCAB, copy_adapter, peft_lora_modules, peft_oracle, save_adapter, targets, tiny_model

IDS = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same adapter as adapter_model.safetensors and as adapter_model.bin."""
    model = tiny_model("llama")
    root = tmp_path_factory.mktemp("io")
    st = save_adapter(model, str(root / "st"), target_modules=targets("llama"), r=4, lora_alpha=8, lora_bias=True,
                      rank_pattern={"v_proj": 2})
    pt = str(root / "pt")
    PeftModel.from_pretrained(tiny_model("llama"), st).save_pretrained(pt, safe_serialization=False)
    assert os.path.isfile(os.path.join(pt, "adapter_model.bin"))
    assert not os.path.exists(os.path.join(pt, "adapter_model.safetensors"))
    return st, pt


def test_bin_refused_without_allow_pickle(pair):
    _, pt = pair
    lm = lora_graph.wrap(tiny_model("llama"))
    with pytest.raises(ValueError) as exc_info:
        lm.load_adapter("a", pt)
    msg = str(exc_info.value)
    assert "allow_pickle=True" in msg and "adapter_model.bin" in msg, msg
    assert len(lm.adapters) == 0


def test_bin_with_allow_pickle_equals_safetensors(pair):
    st, pt = pair
    model = tiny_model("llama")
    oracle = peft_oracle(model, {"a": st})
    lm = lora_graph.wrap(model)
    info_st = lm.load_adapter("st", st)
    info_pt = lm.load_adapter("pt", pt, allow_pickle=True)
    with torch.no_grad():
        out_st = lm(input_ids=IDS, adapters="st").logits
        out_pt = lm(input_ids=IDS, adapters="pt").logits
        expected = oracle(input_ids=IDS).logits
        base = lm(input_ids=IDS).logits
    assert torch.equal(out_st, out_pt)
    torch.testing.assert_close(out_pt, expected, rtol=0, atol=1e-4)
    assert (expected - base).abs().max() > 1e-2
    for field in ("rank", "alpha", "use_rslora", "targets", "nbytes"):
        assert getattr(info_st, field) == getattr(info_pt, field), field


def test_safetensors_preferred_when_both_exist(pair, tmp_path):
    """With both files present the safetensors one is read, so no pickle permission is needed,
    even when the .bin is unreadable."""
    st, _ = pair
    path = copy_adapter(st, str(tmp_path / "both"))
    with open(os.path.join(path, "adapter_model.bin"), "wb") as f:
        f.write(b"not a pickle")
    lm = lora_graph.wrap(tiny_model("llama"))
    lm.load_adapter("a", path)
    lm.load_adapter("b", st)
    with torch.no_grad():
        assert torch.equal(lm(input_ids=IDS, adapters="a").logits, lm(input_ids=IDS, adapters="b").logits)


class _RunsCode:
    """Unpickling this calls os.mkdir(marker)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_that_runs_code_is_refused_even_when_allowed(pair, tmp_path):
    st, _ = pair
    path = str(tmp_path / "evil")
    os.makedirs(path)
    shutil.copy(os.path.join(st, "adapter_config.json"), path)
    marker = str(tmp_path / "code_ran")
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": _RunsCode(marker)},
               os.path.join(path, "adapter_model.bin"))
    lm = lora_graph.wrap(tiny_model("llama"))
    with pytest.raises(ValueError, match="adapter_model.bin"):
        lm.load_adapter("a", path, allow_pickle=True)
    assert not os.path.exists(marker)
    assert len(lm.adapters) == 0


def test_pickle_holding_non_tensors_is_refused(pair, tmp_path):
    st, _ = pair
    path = str(tmp_path / "odd")
    os.makedirs(path)
    shutil.copy(os.path.join(st, "adapter_config.json"), path)
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": [1.0, 2.0]},
               os.path.join(path, "adapter_model.bin"))
    lm = lora_graph.wrap(tiny_model("llama"))
    with pytest.raises(ValueError, match="adapter_model.bin"):
        lm.load_adapter("a", path, allow_pickle=True)
    assert len(lm.adapters) == 0


def test_adapter_info(pair):
    st, _ = pair
    model = tiny_model("llama")
    oracle = peft_oracle(model, {"a": st})
    lm = lora_graph.wrap(model)
    lm.load_adapter("first", st)
    info = lm.load_adapter("a", st)
    assert lm.adapters["a"] == info and set(lm.adapters) == {"first", "a"}
    assert info.name == "a" and info.path == str(st)
    assert (info.rank, info.alpha, info.use_rslora) == (4, 8, False)
    assert set(info.targets) == peft_lora_modules(oracle, "a") and len(info.targets) == 14
    tensors = load_file(os.path.join(st, "adapter_model.safetensors"))
    assert info.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    lm.unload_adapter("first")
    assert set(lm.adapters) == {"a"}


@pytest.mark.parametrize("pad", [0, 3], ids=["aligned", "misaligned"])
def test_reader_equals_safetensors(tmp_path, pad):
    """The reader gives safetensors' own mmap-read tensors, for every dtype and shape, also when a
    file's header length leaves the data misaligned for its dtypes (which the writer may do)."""
    import json

    from safetensors.torch import save_file

    from lora_graph.adapters import read_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(7, generator=g).bfloat16(),
        "f16": torch.randn(4, 1, 3, generator=g).half(), "i8": torch.randint(-9, 9, (2, 2, 3), dtype=torch.int8),
        "i64": torch.randint(0, 1 << 40, (3,)), "empty": torch.empty(0, 4), "scalar": torch.tensor(2.5),
    }
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    raw = path.read_bytes()
    if pad:  # rewrite with a header padded by `pad` spaces: every data offset moves by `pad` bytes
        n = int.from_bytes(raw[:8], "little")
        header = raw[8 : 8 + n].rstrip(b" ") + b" " * pad
        assert (8 + len(header)) % 2
        raw = len(header).to_bytes(8, "little") + header + raw[8 + n :]
        path.write_bytes(raw)
        json.loads(header)
    got, finite = read_safetensors(path)
    ref = load_file(str(path))
    assert set(got) == set(ref)
    for key, want in ref.items():
        assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
        assert torch.equal(got[key], want), key
    # the reader checks the values of the floating tensors (the data is read into a buffer of its
    # own, so the header's length does not move them off their alignment), not the integer ones
    passed = {key for key, t in got.items() if id(t) in finite}
    assert passed == {"f32", "bf16", "f16", "empty", "scalar"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_value_check_finds_exactly_nan_and_infinity(dtype):
    """The reader's test on bit patterns is exact for every float dtype: the largest and smallest
    finite values, subnormals and signed zeros pass; NaN (of either sign) and each infinity fail."""
    from lora_graph.tensorfile import all_finite

    info = torch.finfo(dtype)
    finite = torch.tensor([info.max, -info.max, info.tiny / 4, -info.tiny / 4, 0.0, -0.0, 1.0, -3.5], dtype=dtype)
    assert torch.isfinite(finite).all()

    def raw(t):
        return t.view(torch.uint8).numpy()

    assert all_finite(raw(finite), dtype) and all_finite(raw(finite[:0]), dtype)
    for bad in (float("nan"), -float("nan"), float("inf"), -float("inf")):
        for at in (0, 3, len(finite) - 1):
            values = finite.clone()
            values[at] = bad
            assert not all_finite(raw(values), dtype), (bad, at)


def write_raw_safetensors(path, parts) -> None:
    """A safetensors file written by hand, ``parts`` being ``(name, dtype, shape, raw bytes)`` laid
    out one after the other in that order, with no alignment (which the library's writer would add)."""
    import json

    header, at = {}, 0
    for name, dtype, shape, raw in parts:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, at + len(raw)]}
        at += len(raw)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(raw for *_, raw in parts))


@pytest.mark.parametrize("bad", [None, "nan", "-inf"])
def test_reader_checks_runs_of_tensors(tmp_path, bad):
    """A tensor whose data offset is not a multiple of its element size (an odd-sized int8 tensor
    before it) is read as a copy of its own and left to adapters.py to check; a NaN or an infinity
    fails the check of its run of tensors, so no tensor of that run is passed, while the other
    run's are."""
    from lora_graph import tensorfile

    g = torch.Generator().manual_seed(0)
    half = tensorfile._RUN_BYTES // 8  # fp32 values in half a run: big0 and big1 are a run, big2 and big3 another
    bigs = [torch.randn(half, generator=g) for _ in range(4)]
    if bad:
        bigs[3][-5] = float(bad)
    # bytes 0-2 int8, 3-6 a bf16 pair (misaligned), 7 int8, then the fp32 tensors (aligned again)
    parts = [("odd", torch.arange(3, dtype=torch.int8)), ("late", torch.randn(2, generator=g).bfloat16()),
             ("pad", torch.ones(1, dtype=torch.int8)), *((f"big{i}", t) for i, t in enumerate(bigs))]
    names = {torch.int8: "I8", torch.bfloat16: "BF16", torch.float32: "F32"}
    path = tmp_path / "x.safetensors"
    write_raw_safetensors(path, [(name, names[t.dtype], t.shape, t.contiguous().view(torch.uint8).numpy().tobytes())
                                 for name, t in parts])
    got, finite = tensorfile.read_safetensors(path)
    for name, t in parts:
        torch.testing.assert_close(got[name], t, rtol=0, atol=0, equal_nan=True)
    assert got["late"].data_ptr() % 2 == 0  # a copy, aligned
    passed = {name for name, t in got.items() if id(t) in finite}
    assert passed == ({"big0", "big1", "big2", "big3"} if bad is None else {"big0", "big1"})


def test_key_split_follows_peft_key_grammar():
    """``[base_model.model.]<module>.<part>`` with a non-empty module, as the regular expressions
    below state it; the reader splits keys with string operations instead, for speed."""
    import re

    from lora_graph.adapters import _FULL, split_key

    grammar = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\."
                         r"(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B)$")
    full = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.base_layer\.weight$")
    keys = [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "model.layers.0.mlp.up_proj.lora_B.weight",
        "base_model.model.lm_head.lora_B.bias", "base_model.model.model.embed_tokens.lora_embedding_A",
        "embed_tokens.lora_embedding_B", "base_model.model.lora_A.weight", "lora_A.weight", ".lora_A.weight",
        "base_model.model..lora_A.weight", "a.xlora_A.weight", "a.lora_A.weight.x", "a.lora_A_weight",
        "base_model.model.model.embed_tokens.base_layer.weight", "base_layer.weight", "x.base_layer.weight",
        "base_model.model.x.lora_A.default.weight", "a..lora_B.weight",
    ]
    for key in keys:
        m = grammar.match(key)
        assert split_key(key) == ((m["module"], m["part"]) if m else None), key
        f = full.match(key)
        assert split_key(key, _FULL) == ((f["module"], "base_layer.weight") if f else None), key


def test_reader_dtypes_beyond_floats(tmp_path):
    """Unsigned integer tensors read as such (adapters.py then refuses them as factors); a dtype
    the reader does not know is refused with an error naming the file."""
    from lora_graph import tensorfile

    def write(name, dtype, raw):
        path = tmp_path / name
        write_raw_safetensors(path, [("t", dtype, [len(raw) // 2], raw)])
        return path

    got, finite = tensorfile.read_safetensors(write("u16.safetensors", "U16", (513).to_bytes(2, "little") * 3))
    assert got["t"].dtype == torch.uint16 and got["t"].view(torch.int16).tolist() == [513] * 3 and not finite
    path = write("odd.safetensors", "F8_E8M0", b"\x01\x02")
    with pytest.raises(ValueError, match=str(path).replace(".", r"\.")):
        tensorfile.read_safetensors(path)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX")
def test_reader_in_a_forked_child(tmp_path):
    """A child forked after the parent's reads has none of the parent's threads: its reads start a
    helper of their own instead of queueing checks for a thread that does not exist (they would
    wait forever)."""
    import multiprocessing

    from safetensors.torch import save_file

    from lora_graph import tensorfile

    path = tmp_path / "x.safetensors"
    runs = 3 * tensorfile._RUN_BYTES // 4  # fp32 values in three runs: the first two go to the helper
    save_file({f"t{i}": torch.full((runs // 3,), float(i)) for i in range(3)}, str(path))
    got, finite = tensorfile.read_safetensors(path)  # the parent's helper thread now exists
    assert len(finite) == 3

    def child(queue):
        tensors, passed = tensorfile.read_safetensors(path)
        queue.put(sorted(name for name, t in tensors.items() if id(t) in passed))

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=child, args=(queue,))
    proc.start()
    proc.join(60)
    if proc.is_alive():
        proc.kill()
        pytest.fail("the forked child's read did not finish")
    assert proc.exitcode == 0 and queue.get(timeout=5) == ["t0", "t1", "t2"]
