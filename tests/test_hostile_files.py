"""Hostile or odd adapter files: each is refused with an error that names the culprit (field, file,
module and tensor) and leaves the wrapper exactly as it was (the snapshot of test_errors.py:
outputs bit-identical, base digest, modules, ``lm.adapters``; and ``lm.resident``).

A file rewritten in place (open, truncate, write: what ``save_pretrained`` does) while a load waits
between reading it and placing it must give that load a clear error. Before lora_graph read files
with ordinary reads, the load held a memory map of the file and touching a page the truncation took
away killed the process with SIGBUS; those tests run in a subprocess so that such a death is a
failure of the test, not of the test run.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_graph
from helpers import copy_adapter, edit_adapter_config, edit_adapter_tensors, tiny_model
from test_errors import _message, assert_unchanged, dora_saved, saved, served  # noqa: F401 - fixtures

ST = "adapter_model.safetensors"


def _refused(lm, before, path, *culprits, register=False, error=ValueError):
    """Loading (or registering) ``path`` fails naming every culprit, and changes nothing."""
    resident = lm.resident
    call = lm.register_adapter if register else lm.load_adapter
    with pytest.raises(error) as exc_info:
        call("new", path)
    msg = _message(exc_info, path)
    for culprit in culprits:
        assert culprit in msg, msg
    assert lm.resident == resident and "new" not in lm.adapters
    assert_unchanged(lm, before)
    return msg


def _edited(saved, tmp_path, **changes):
    return edit_adapter_config(copy_adapter(saved["good"], str(tmp_path / "x")), **changes)


# -- config values ---------------------------------------------------------------------------------

BAD_VALUES = [
    ("lora_alpha", float("nan")), ("lora_alpha", float("inf")), ("lora_alpha", -float("inf")),
    ("lora_alpha", 1e300),  # alpha / r overflows the float32 the scale is kept in
    ("alpha_pattern", {"q_proj": float("nan")}), ("alpha_pattern", {"q_proj": 1e300}),
    ("r", float("nan")), ("r", float("inf")),
    ("rank_pattern", {"v_proj": float("nan")}), ("rank_pattern", {"v_proj": float("inf")}),
    ("rank_pattern", {"v_proj": 4.7}),
    ("use_rslora", "false"), ("lora_bias", "false"), ("use_dora", "false"), ("use_rslora", 1),
    ("layers_pattern", 5),
]


@pytest.mark.parametrize("field, value", BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_bad_config_value(served, saved, tmp_path, field, value):
    lm, before = served
    path = _edited(saved, tmp_path, **{field: value}, layers_to_transform=[0, 1] if field == "layers_pattern" else None)
    _refused(lm, before, path, field, "adapter_config.json")


BAD_REGEX = [
    dict(target_modules="model.*(q_proj"),
    dict(exclude_modules="[v_proj"),
    dict(layers_pattern="layers(", layers_to_transform=[0]),
    dict(layers_pattern=["layers", "h)"], layers_to_transform=[0]),
    dict(rank_pattern={"q_proj)": 4}),
]


@pytest.mark.parametrize("changes", BAD_REGEX, ids=[next(iter(c)) + str(i) for i, c in enumerate(BAD_REGEX)])
@pytest.mark.parametrize("register", [True, False], ids=["register", "load"])
def test_bad_regex_refused_when_registered(served, saved, tmp_path, changes, register):
    """Not at the first request, which is where a bad target_modules regex used to fail."""
    lm, before = served
    path = _edited(saved, tmp_path, **changes)
    _refused(lm, before, path, next(iter(changes)), "regex", register=register)


def test_config_nested_too_deep(served, saved, tmp_path):
    lm, before = served
    path = copy_adapter(saved["good"], str(tmp_path / "x"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        f.write('{"r": 4, "note": ' + "[" * 100_000 + "]" * 100_000 + "}")
    _refused(lm, before, path, "adapter_config.json", "nested", register=True)


@pytest.mark.parametrize("path", [5, 2.5, b"\xff"], ids=["int", "float", "bytes"])
def test_path_of_the_wrong_type(served, path):
    lm, before = served
    for call in (lm.load_adapter, lm.register_adapter):
        with pytest.raises(TypeError) as exc_info:
            call("new", path)
        assert "adapter path" in str(exc_info.value) and repr(path) in str(exc_info.value)
    assert "new" not in lm.adapters
    assert_unchanged(lm, before)


# -- tensor values ---------------------------------------------------------------------------------

Q = "base_model.model.model.layers.1.self_attn.q_proj"


def _poke(key: str, value: float, dtype: torch.dtype | None = None):
    def edit(tensors):
        t = tensors[key].to(dtype or tensors[key].dtype)
        t.view(-1)[3] = value
        tensors[key] = t
    return edit


POKES = {
    "nan-in-A": (_poke(f"{Q}.lora_A.weight", float("nan")), "lora_A.weight"),
    "inf-in-B": (_poke(f"{Q}.lora_B.weight", float("inf")), "lora_B.weight"),
    "-inf-in-B": (_poke(f"{Q}.lora_B.weight", -float("inf")), "lora_B.weight"),
    # finite in the file's F64, infinite once kept in the adapters' fp32
    "f64-overflows-fp32": (_poke(f"{Q}.lora_B.weight", 1e39, torch.float64), "lora_B.weight"),
    "f64-overflows-fp32-negative": (_poke(f"{Q}.lora_A.weight", -1e300, torch.float64), "lora_A.weight"),
}


@pytest.mark.parametrize("case", POKES)
def test_non_finite_factor(served, saved, tmp_path, case):
    lm, before = served
    edit, part = POKES[case]
    path = edit_adapter_tensors(copy_adapter(saved["good"], str(tmp_path / "x")), edit)
    _refused(lm, before, path, "model.layers.1.self_attn.q_proj", part)


def test_fp32_factor_beyond_fp16_adapters(saved, tmp_path):
    """70000 fits fp32 but not fp16: a wrapper keeping adapters in fp16 refuses it, an fp32 one takes it."""
    path = edit_adapter_tensors(copy_adapter(saved["good"], str(tmp_path / "x")),
                                _poke(f"{Q}.lora_B.weight", 7e4))
    lm = lora_graph.wrap(tiny_model("llama"), adapter_dtype=torch.float16)
    with pytest.raises(ValueError) as exc_info:
        lm.load_adapter("new", path)
    assert "lora_B.weight" in str(exc_info.value) and "float16" in str(exc_info.value)
    assert not lm.adapters and not lm.resident
    lora_graph.wrap(tiny_model("llama")).load_adapter("new", path)


def test_non_finite_dora_magnitude(served, saved, dora_saved, tmp_path):
    lm, before = served
    path = edit_adapter_tensors(copy_adapter(dora_saved, str(tmp_path / "x")),
                                _poke(f"{Q}.lora_magnitude_vector", float("nan")))
    _refused(lm, before, path, "model.layers.1.self_attn.q_proj", "lora_magnitude_vector")


# -- the safetensors container ---------------------------------------------------------------------


def _rewrite(path: str, edit_header, tail: bytes = b"") -> None:
    """Rewrite ``path``/adapter_model.safetensors with its header edited by ``edit_header(header)``."""
    st = os.path.join(path, ST)
    with open(st, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    edit_header(header)
    blob = json.dumps(header).encode()
    with open(st, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data + tail)


def _overlap(header):
    """The second tensor (by offset) starts inside the first; the file stays the same size."""
    (k1, e1), (k2, e2) = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                                key=lambda kv: kv[1]["data_offsets"][0])[:2]
    size = e2["data_offsets"][1] - e2["data_offsets"][0]
    e2["data_offsets"] = [e1["data_offsets"][0] + 4, e1["data_offsets"][0] + 4 + size]


def _not_an_object(header):
    header[f"{Q}.lora_A.weight"] = [1, 2, 3]


def _float_offsets(header):
    entry = header[f"{Q}.lora_A.weight"]
    entry["data_offsets"] = [float(o) for o in entry["data_offsets"]]


CONTAINERS = {"overlapping-offsets": (_overlap, b""), "trailing-garbage": (lambda h: None, b"\0garbage\0"),
              "entry-not-an-object": (_not_an_object, b""), "float-offsets": (_float_offsets, b"")}


@pytest.mark.parametrize("case", CONTAINERS)
def test_malformed_safetensors(served, saved, tmp_path, case):
    lm, before = served
    path = copy_adapter(saved["good"], str(tmp_path / "x"))
    _rewrite(path, *CONTAINERS[case])
    _refused(lm, before, path, ST)


# -- pickle files (allow_pickle=True) ---------------------------------------------------------------


def _to_bin(saved, tmp_path, edit) -> str:
    path = copy_adapter(saved["good"], str(tmp_path / "x"))
    tensors = load_file(os.path.join(path, ST))
    os.remove(os.path.join(path, ST))
    edit(tensors)
    torch.save(tensors, os.path.join(path, "adapter_model.bin"))
    return path


BINS = {
    "int-key": (lambda t: t.update({7: torch.ones(2)}), "7"),
    "sparse": (lambda t: t.update({f"{Q}.lora_A.weight": t[f"{Q}.lora_A.weight"].to_sparse()}), "sparse"),
    "meta": (lambda t: t.update({f"{Q}.lora_B.weight": torch.empty(t[f"{Q}.lora_B.weight"].shape, device="meta")}),
             "meta"),
}


@pytest.mark.parametrize("case", BINS)
def test_hostile_pickle(served, saved, tmp_path, case):
    lm, before = served
    edit, culprit = BINS[case]
    path = _to_bin(saved, tmp_path, edit)
    resident = lm.resident
    with pytest.raises(ValueError) as exc_info:
        lm.load_adapter("new", path, allow_pickle=True)
    msg = _message(exc_info, path)
    assert "adapter_model.bin" in msg and culprit in msg, msg
    assert lm.resident == resident and "new" not in lm.adapters
    assert_unchanged(lm, before)


# -- forward compatibility and provenance -----------------------------------------------------------


def test_unknown_field_strict_false(served, saved, tmp_path, caplog):
    """Refused by default with a pointer to strict=False; with it, loaded as if the field were absent
    (outputs equal to the same adapter without it), and the field named in the log."""
    lm, before = served
    path = _edited(saved, tmp_path, future_lora_knob={"enabled": True})
    msg = _refused(lm, before, path, "future_lora_knob")
    assert "strict=False" in msg
    with caplog.at_level(logging.WARNING, logger="lora_graph"):
        lm.load_adapter("new", path, strict=False)
    assert any("future_lora_knob" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        ids = torch.arange(12).view(2, 6)
        assert torch.equal(lm(input_ids=ids, adapters="new").logits, lm(input_ids=ids, adapters="good").logits)
    # registered with strict=False: the read at the first request is lenient too
    lm.register_adapter("lazy", path, strict=False)
    with torch.no_grad():
        lm(input_ids=ids, adapters="lazy")
    assert "lazy" in lm.resident
    with pytest.raises(ValueError, match="strict=False"):
        lm.register_adapter("strict", path)
    # a field that changes the math stays refused
    edit_adapter_config(path, use_qalora=True)
    with pytest.raises(ValueError, match="use_qalora"):
        lm.load_adapter("qa", path, strict=False)


@pytest.mark.parametrize("trained_on, warned", [("some-org/another-model", True), (None, False), ("same", False)])
def test_adapter_for_another_base_model_warns(saved, tmp_path, caplog, trained_on, warned):
    model = tiny_model("llama")
    model.config._name_or_path = "my-org/tiny-llama"
    path = _edited(saved, tmp_path, base_model_name_or_path="my-org/tiny-llama" if trained_on == "same" else trained_on)
    lm = lora_graph.wrap(model)
    with caplog.at_level(logging.WARNING, logger="lora_graph"):
        lm.load_adapter("a", path)
    hits = [r.getMessage() for r in caplog.records if "trained on" in r.getMessage()]
    assert bool(hits) == warned, hits
    if warned:
        assert "some-org/another-model" in hits[0] and "my-org/tiny-llama" in hits[0]
    assert "a" in lm.resident


# -- files rewritten under a load -------------------------------------------------------------------

_RACE = textwrap.dedent('''
    import os, sys, threading
    import torch
    import lora_graph
    from helpers import save_adapter, targets, tiny_model

    how, root = sys.argv[1], sys.argv[2]
    model = tiny_model("llama")
    keep = save_adapter(model, os.path.join(root, "keep"), seed=1, target_modules=targets("llama"), r=4)
    new = save_adapter(model, os.path.join(root, "new"), seed=2, target_modules=targets("llama"), r=4)
    st = os.path.join(new, "adapter_model.safetensors")
    lm = lora_graph.wrap(model)
    lm.load_adapter("keep", keep)
    ids = torch.arange(10).view(2, 5)
    with torch.no_grad():
        before = lm(input_ids=ids, adapters="keep").logits
    if how == "page":
        lm.register_adapter("new", new)
    infos, resident = dict(lm.adapters), lm.resident

    real, waiting = lm._lock, threading.Event()

    class Gate:
        """The wrapper's lock, saying when a thread starts waiting for it."""
        def __enter__(self):
            waiting.set()
            return real.__enter__()
        def __exit__(self, *exc):
            return real.__exit__(*exc)

    errors = []
    def run():
        try:
            if how == "load":
                lm.load_adapter("new", new)
            elif how == "bulk":
                lm.load_adapters({"new": new, "other": keep})
            else:
                with torch.no_grad():
                    lm(input_ids=ids, adapters="new")
        except Exception as exc:
            errors.append(exc)

    real.acquire()
    lm._lock = Gate()
    worker = threading.Thread(target=run)
    worker.start()
    assert waiting.wait(60), "the load never reached the lock"
    with open(st, "r+b") as f:  # rewritten in place, as save_file does: truncate, then write
        f.truncate(0)
        f.write(b"\\0" * 64)
    real.release()
    worker.join(60)
    lm._lock = real
    assert len(errors) == 1, errors
    print("ERROR:", type(errors[0]).__name__, errors[0])
    assert dict(lm.adapters) == infos and lm.resident == resident, (lm.adapters, lm.resident)
    with torch.no_grad():
        assert torch.equal(lm(input_ids=ids, adapters="keep").logits, before)
    print("CLEAN")
''')


@pytest.mark.parametrize("how", ["load", "bulk", "page"])
def test_file_rewritten_while_waiting_for_the_lock(tmp_path, how):
    """``load_adapter`` (how=load), ``load_adapters`` (how=bulk) and a request paging in a
    registered adapter (how=page) read the file before taking the wrapper's lock; the file is
    truncated and rewritten while they wait."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _RACE, how, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=os.path.dirname(tests))
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert "CLEAN" in proc.stdout
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("ERROR:"))
    assert "ValueError" in line and os.path.join(str(tmp_path), "new", ST) in line, line
    if how != "page":  # a request reads the changed file again, and fails on what it finds
        assert "changed while" in line, line


def test_reader_never_maps_the_file(saved, tmp_path):
    """Tensors read from a file stay valid after the file is truncated (no view of a mapping)."""
    from lora_graph.adapters import read_safetensors

    path = copy_adapter(saved["good"], str(tmp_path / "x"))
    st = os.path.join(path, ST)
    want = {k: v.clone() for k, v in load_file(st).items()}  # load_file maps the file
    got, _ = read_safetensors(type(tmp_path)(st))
    os.truncate(st, 0)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_file_changing_during_the_read_is_refused(saved, tmp_path, monkeypatch):
    """A rewrite that lands between the reader's stat and its read: the stamps differ, the read fails."""
    from lora_graph import adapters, tensorfile

    path = copy_adapter(saved["good"], str(tmp_path / "x"))
    st = os.path.join(path, ST)
    real_open = tensorfile.safe_open

    def rewriting_open(*args, **kwargs):
        save_file({k: v + 1 for k, v in load_file(st).items()}, st)  # same size, new contents
        os.utime(st, ns=(1, 1))
        return real_open(*args, **kwargs)

    monkeypatch.setattr(tensorfile, "safe_open", rewriting_open)
    with pytest.raises(ValueError, match="changed while the adapter was being read"):
        adapters.read_safetensors(type(tmp_path)(st))


def test_in_memory_adapter_is_checked_alike(served, saved, caplog):
    """state_dict= and config= go through the same checks: a NaN factor is refused, an unknown
    config field needs strict=False, a config for another base model warns."""
    lm, before = served
    with open(os.path.join(saved["good"], "adapter_config.json")) as f:
        config = json.load(f)
    tensors = load_file(os.path.join(saved["good"], ST))
    poisoned = dict(tensors)
    poisoned[f"{Q}.lora_A.weight"] = tensors[f"{Q}.lora_A.weight"].clone().fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN or infinite values in its lora_A.weight"):
        lm.load_adapter("new", state_dict=poisoned, config=config)
    with pytest.raises(ValueError, match="strict=False"):
        lm.load_adapter("new", state_dict=tensors, config={**config, "future_lora_knob": 1})
    deep = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ValueError, match="in-memory adapter 'new'"):
        lm.load_adapter("new", state_dict=tensors, config={**config, "note": deep})
    assert "new" not in lm.adapters
    assert_unchanged(lm, before)
    lm.model.config._name_or_path = "my-org/tiny-llama"
    with caplog.at_level(logging.WARNING, logger="lora_graph"):
        lm.load_adapter("new", state_dict=tensors, strict=False,
                        config={**config, "future_lora_knob": 1, "base_model_name_or_path": "other/model"})
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "future_lora_knob" in logged and "other/model" in logged and "my-org/tiny-llama" in logged
    assert "new" in lm.resident
