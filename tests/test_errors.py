"""Bad input gets a clear error naming the culprit, and a failed call leaves no trace.

Every test starts from a wrapper with two adapters loaded, takes a snapshot (outputs for several
SPECs, base digest, the modules and their types, ``lm.adapters``), makes one call fail, and checks
the snapshot again: outputs bit-identical (``torch.equal``), digest and modules unchanged. Where the
failed call was a load, the name it tried is then still free.

Refusals of config fields are written by editing a saved adapter_config.json. Error messages are
checked with the adapter's path removed, so a field name in a directory name cannot satisfy them.
"""

from __future__ import annotations

import math
import os
import re

import pytest
import torch
from peft import PeftModel

import lora_graph
from helpers import (
    VOCAB,
    copy_adapter,
    digest,
    edit_adapter_config,
    edit_adapter_tensors,
    save_adapter,
    targets,
    tiny_model,
    tiny_model_with,
)

IDS = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
SPECS = {
    "good": "good",
    "other": "other",
    "none": None,
    "rows": ["good", {"good": 0.5, "other": -1.5}],
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Adapters saved once for the module, under neutral directory names."""
    model = tiny_model("llama")
    root = tmp_path_factory.mktemp("adapters")
    good = save_adapter(model, str(root / "a0"), seed=1, target_modules=targets("llama"), r=4, lora_alpha=8)
    other = save_adapter(model, str(root / "a1"), seed=2, target_modules=targets("llama", "attn"), r=2,
                         lora_alpha=4, lora_bias=True)
    third = save_adapter(model, str(root / "a2"), seed=3, target_modules=["q_proj", "gate_proj"], r=3)
    return {"good": good, "other": other, "third": third}


def _snapshot(lm) -> dict:
    model = lm.model
    with torch.no_grad():
        outputs = {key: lm(input_ids=IDS, adapters=spec).logits for key, spec in SPECS.items()}
        outputs["plain"] = model(input_ids=IDS).logits  # no SPEC anywhere: the base model
    return {
        "outputs": outputs,
        "digest": digest(model),
        "modules": [(name, type(m), id(m)) for name, m in model.named_modules()],
        "adapters": dict(lm.adapters),
    }


X = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1))  # (B, L, hidden)


def assert_unchanged(lm, before: dict) -> None:
    # a patched layer called on its own, outside any use(): no plan of an earlier forward may linger
    q_proj = lm.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        assert torch.equal(q_proj(X), q_proj.base_layer(X))
    after = _snapshot(lm)
    assert after["adapters"] == before["adapters"]
    assert after["modules"] == before["modules"]
    assert after["digest"] == before["digest"]
    for key, logits in before["outputs"].items():
        assert torch.equal(after["outputs"][key], logits), f"output for SPEC {key!r} changed"


@pytest.fixture
def served(saved):
    model = tiny_model("llama")
    pristine = digest(model)
    with torch.no_grad():
        base_logits = model(input_ids=IDS).logits
    lm = lora_graph.wrap(model)
    lm.load_adapter("good", saved["good"])
    lm.load_adapter("other", saved["other"])
    snap = _snapshot(lm)
    assert snap["digest"] == pristine
    assert torch.equal(snap["outputs"]["plain"], base_logits)
    assert torch.equal(snap["outputs"]["none"], base_logits)
    assert not torch.equal(snap["outputs"]["good"], base_logits)
    return lm, snap


def _message(exc_info, *paths) -> str:
    """The error message with the given paths removed."""
    msg = str(exc_info.value)
    for path in paths:
        msg = msg.replace(str(path), "<path>")
    return msg


def _assert_name_free(lm, name: str, path: str) -> None:
    """After a failed load, ``name`` can be loaded and routed like any fresh name."""
    info = lm.load_adapter(name, path)
    assert info.name == name
    with torch.no_grad():
        lm(input_ids=IDS, adapters=name)


# -- refused config fields -------------------------------------------------------------------------

REFUSED = [
    ("peft_type", "LOHA"),
    ("peft_type", "ADALORA"),
    ("modules_to_save", ["lm_head"]),
    ("bias", "all"),
    ("bias", "lora_only"),
    ("trainable_token_indices", [1, 2, 3]),
    ("target_parameters", ["mlp.experts.gate_up_proj"]),
    ("init_lora_weights", "pissa"),
    ("init_lora_weights", "pissa_niter_4"),
    ("init_lora_weights", "olora"),
    ("init_lora_weights", "corda"),
    ("init_lora_weights", "loftq"),
    ("init_lora_weights", "lora_ga"),
    ("alora_invocation_tokens", [5, 7]),
    ("use_qalora", True),
    ("use_bdlora", {"target_modules_bd_a": ["o_proj"], "target_modules_bd_b": ["q_proj"], "nblocks": 2}),
    ("arrow_config", {"top_k": 2, "router_temperature": 1.0}),
    ("kasa_config", {"beta": 0.0001, "gamma": 0.001}),
    # An empty sub-config is not "unset": PEFT builds the dataclass with its defaults, which is
    # truthy, and switches the variant on (KaSA then changes the logits; Arrow and BD-LoRA raise).
    ("use_bdlora", {}),
    ("arrow_config", {}),
    ("kasa_config", {}),
    ("layer_replication", [[0, 2], [1, 2]]),
    ("megatron_config", {"tensor_model_parallel_size": 1}),
]


@pytest.mark.parametrize("field, value", REFUSED, ids=[f"{f}={v!r}"[:40] for f, v in REFUSED])
def test_refused_config_field(served, saved, tmp_path_factory, field, value):
    lm, before = served
    path = copy_adapter(saved["good"], str(tmp_path_factory.mktemp("edited") / "x"))
    edit_adapter_config(path, **{field: value})
    with pytest.raises(ValueError) as exc_info:
        lm.load_adapter("new", path)
    assert field in _message(exc_info, path), str(exc_info.value)
    assert_unchanged(lm, before)
    _assert_name_free(lm, "new", saved["third"])


def test_unknown_field_with_a_value(served, saved, tmp_path_factory):
    lm, before = served
    path = copy_adapter(saved["good"], str(tmp_path_factory.mktemp("edited") / "x"))
    edit_adapter_config(path, future_lora_variant={"enabled": True})
    with pytest.raises(ValueError) as exc_info:
        lm.load_adapter("new", path)
    assert "future_lora_variant" in _message(exc_info, path)
    assert_unchanged(lm, before)


# -- bad SPECs -------------------------------------------------------------------------------------

UNKNOWN = ["nope", {"good": 1.0, "nope": 0.5}, {"nope": 0.0}, ["good", "nope"], [None, {"nope": 1.0}]]


@pytest.mark.parametrize("spec", UNKNOWN, ids=[repr(s) for s in UNKNOWN])
@pytest.mark.parametrize("how", ["call", "use", "generate"])
def test_unknown_adapter_in_spec(served, spec, how):
    lm, before = served
    with pytest.raises(ValueError, match="'nope'"), torch.no_grad():
        if how == "call":
            lm(input_ids=IDS, adapters=spec)
        elif how == "use":
            with lm.use(spec):
                lm.model(input_ids=IDS)
        else:
            lm.generate(input_ids=IDS, adapters=spec, max_new_tokens=2, do_sample=False)
    assert_unchanged(lm, before)


def test_spec_and_adapter_names_together(served):
    lm, before = served
    with pytest.raises(ValueError, match="adapter_names"), torch.no_grad():
        lm(input_ids=IDS, adapters="good", adapter_names=["good", "other"])
    assert_unchanged(lm, before)


def test_unknown_adapter_in_adapter_names(served):
    lm, before = served
    with pytest.raises(ValueError, match="'nope'"), torch.no_grad():
        lm(input_ids=IDS, adapter_names=["good", "nope"])
    assert_unchanged(lm, before)


@pytest.mark.parametrize("spec_len, batch", [(3, 2), (2, 3), (4, 2), (3, 4)])
@pytest.mark.parametrize("how", ["call", "use", "generate"])
def test_spec_list_length_is_not_the_batch(served, spec_len, batch, how):
    lm, before = served
    ids = torch.randint(0, VOCAB, (batch, 5), generator=torch.Generator().manual_seed(1))
    spec = (["good", None, "other", {"good": 2.0}] * 2)[:spec_len]
    with pytest.raises(ValueError) as exc_info, torch.no_grad():
        if how == "call":
            lm(input_ids=ids, adapters=spec)
        elif how == "use":
            with lm.use(spec):
                lm.model(input_ids=ids)
        else:
            lm.generate(input_ids=ids, adapters=spec, max_new_tokens=2, do_sample=False)
    msg = str(exc_info.value)
    assert re.search(rf"\b{spec_len}\b", msg) and re.search(rf"\b{batch}\b", msg), msg
    assert_unchanged(lm, before)


BAD_WEIGHTS = [math.nan, math.inf, -math.inf, "1.0", None, [1.0], True]


@pytest.mark.parametrize("weight", BAD_WEIGHTS, ids=[repr(w) for w in BAD_WEIGHTS])
@pytest.mark.parametrize("per_row", [False, True], ids=["broadcast", "per-row"])
def test_bad_weight_in_weighted_spec(served, weight, per_row):
    lm, before = served
    item = {"other": 1.0, "good": weight}
    spec = [None, item] if per_row else item
    with pytest.raises((ValueError, TypeError)) as exc_info, torch.no_grad():
        lm(input_ids=IDS, adapters=spec)
    assert "'good'" in str(exc_info.value)
    assert_unchanged(lm, before)


@pytest.mark.parametrize(
    "spec, culprit",
    [({"__base__": 1.0}, "__base__"), ({3: 1.0}, "3"), (3.5, "float"), ([], "empty")],
    ids=["base-with-weight", "int-name", "float-spec", "empty-list"],
)
def test_malformed_spec(served, spec, culprit):
    lm, before = served
    with pytest.raises((ValueError, TypeError), match=culprit), torch.no_grad():
        lm(input_ids=IDS, adapters=spec)
    assert_unchanged(lm, before)


# -- bad adapter directories -----------------------------------------------------------------------


def test_missing_directory(served, saved, tmp_path):
    lm, before = served
    path = tmp_path / "no_such_dir"
    with pytest.raises((FileNotFoundError, ValueError), match=re.escape(str(path))):
        lm.load_adapter("new", path)
    assert_unchanged(lm, before)
    _assert_name_free(lm, "new", saved["third"])


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors"])
def test_missing_file(served, saved, tmp_path, missing):
    lm, before = served
    path = copy_adapter(saved["good"], str(tmp_path / "x"))
    os.remove(os.path.join(path, missing))
    with pytest.raises((FileNotFoundError, ValueError), match=re.escape(missing)):
        lm.load_adapter("new", path)
    assert_unchanged(lm, before)


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _garble_header(data: bytes) -> bytes:
    return data[:8] + b"\xff\xfe{not json" + data[19:]


def _huge_header_length(data: bytes) -> bytes:
    return (2**40).to_bytes(8, "little") + data[8:]


@pytest.mark.parametrize("corrupt", [_truncate, _garble_header, _huge_header_length, lambda d: b""],
                         ids=["truncated", "garbled-header", "huge-header-length", "empty"])
def test_corrupted_safetensors(served, saved, tmp_path, corrupt):
    lm, before = served
    path = copy_adapter(saved["good"], str(tmp_path / "x"))
    st = os.path.join(path, "adapter_model.safetensors")
    with open(st, "rb") as f:
        data = f.read()
    with open(st, "wb") as f:
        f.write(corrupt(data))
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        lm.load_adapter("new", path)
    assert_unchanged(lm, before)
    _assert_name_free(lm, "new", saved["third"])


def test_invalid_config_json(served, saved, tmp_path):
    lm, before = served
    path = copy_adapter(saved["good"], str(tmp_path / "x"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        f.write('{"r": 4, "lora_alpha": ')
    with pytest.raises(ValueError, match="adapter_config.json"):
        lm.load_adapter("new", path)
    assert_unchanged(lm, before)


def test_adapter_for_another_hidden_size(served, saved, tmp_path):
    lm, before = served
    bigger = tiny_model_with("llama", hidden_size=48, head_dim=12)
    path = save_adapter(bigger, str(tmp_path / "x"), target_modules=targets("llama"))
    with pytest.raises(ValueError) as exc_info:
        lm.load_adapter("new", path)
    msg = _message(exc_info, path)
    assert re.search(r"model\.layers\.\d\.(self_attn|mlp)\.\w+_proj", msg), msg
    assert "48" in msg, msg
    assert_unchanged(lm, before)
    _assert_name_free(lm, "new", saved["third"])


def test_duplicate_name(served, saved):
    lm, before = served
    with pytest.raises(ValueError, match="'good'"):
        lm.load_adapter("good", saved["third"])
    assert_unchanged(lm, before)


@pytest.mark.parametrize("name", ["", "__base__", None, 3])
def test_invalid_name(served, saved, name):
    lm, before = served
    with pytest.raises((ValueError, TypeError)):
        lm.load_adapter(name, saved["third"])
    assert_unchanged(lm, before)


def test_pickle_without_allow_pickle(served, saved, tmp_path):
    lm, before = served
    path = str(tmp_path / "x")
    PeftModel.from_pretrained(tiny_model("llama"), saved["third"]).save_pretrained(path, safe_serialization=False)
    assert os.listdir(path) and not os.path.exists(os.path.join(path, "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="allow_pickle"):
        lm.load_adapter("new", path)
    assert_unchanged(lm, before)
    lm.load_adapter("new", path, allow_pickle=True)


def _add_module(name: str, k: int, n: int, r: int = 4):
    def edit(tensors):
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, k)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(n, r)

    return edit


@pytest.mark.parametrize(
    "module, k, n",
    [("model.layers.7.self_attn.q_proj", 32, 32), ("model.norm", 32, 32), ("model.layers.0.self_attn.rotary", 8, 8)],
    ids=["no-such-layer", "not-patchable", "no-such-child"],
)
def test_key_for_a_module_that_does_not_exist(served, saved, tmp_path, module, k, n):
    lm, before = served
    path = copy_adapter(saved["good"], str(tmp_path / "x"))
    edit_adapter_tensors(path, _add_module(module, k, n))
    with pytest.raises(ValueError) as exc_info:
        lm.load_adapter("new", path)
    assert f"'{module}'" in _message(exc_info, path)
    assert_unchanged(lm, before)
    _assert_name_free(lm, "new", saved["third"])


def test_unexpected_key_suffix(served, saved, tmp_path):
    lm, before = served
    path = copy_adapter(saved["good"], str(tmp_path / "x"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def rename(tensors):
        tensors[key + "s"] = tensors.pop(key)

    edit_adapter_tensors(path, rename)
    with pytest.raises(ValueError, match=re.escape(key + "s")):
        lm.load_adapter("new", path)
    assert_unchanged(lm, before)


@pytest.mark.parametrize(
    "edit",
    [{"r": 3}, {"rank_pattern": {"q_proj": 2}}, {"r": 8, "rank_pattern": {"layers.1.mlp.up_proj": 4}}],
    ids=["r", "rank_pattern", "rank_pattern-partial"],
)
def test_rank_disagrees_with_config(served, saved, tmp_path, edit):
    lm, before = served
    path = edit_adapter_config(copy_adapter(saved["good"], str(tmp_path / "x")), **edit)
    with pytest.raises(ValueError) as exc_info:
        lm.load_adapter("new", path)
    msg = _message(exc_info, path)
    assert re.search(r"model\.layers\.\d\.(self_attn|mlp)\.\w+_proj", msg) and "rank" in msg, msg
    assert_unchanged(lm, before)
    _assert_name_free(lm, "new", saved["third"])


def test_a_and_b_ranks_disagree(served, saved, tmp_path):
    lm, before = served
    path = copy_adapter(saved["good"], str(tmp_path / "x"))
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"

    def cut(tensors):
        tensors[key] = tensors[key][:, :3].contiguous()

    edit_adapter_tensors(path, cut)
    with pytest.raises(ValueError, match=re.escape("model.layers.1.mlp.down_proj")):
        lm.load_adapter("new", path)
    assert_unchanged(lm, before)


def test_lora_bias_without_lora_bias_in_config(served, saved, tmp_path):
    lm, before = served
    path = edit_adapter_config(copy_adapter(saved["other"], str(tmp_path / "x")), lora_bias=False)
    with pytest.raises(ValueError) as exc_info:
        lm.load_adapter("new", path)
    assert "lora_bias" in _message(exc_info, path)
    assert_unchanged(lm, before)


MAGNITUDE = ".lora_magnitude_vector"
_Q_PROJ = "base_model.model.model.layers.0.self_attn.q_proj" + MAGNITUDE


def _drop_one_magnitude(tensors):
    del tensors[_Q_PROJ]


def _short_magnitude(tensors):
    tensors[_Q_PROJ] = tensors[_Q_PROJ][:-1].clone()


# how a DoRA adapter is broken -> what the error must name
BROKEN_DORA = {
    "with_lora_bias": (lambda p: edit_adapter_config(p, lora_bias=True), "lora_bias"),
    "a_magnitude_missing": (lambda p: edit_adapter_tensors(p, _drop_one_magnitude), "lora_magnitude_vector"),
    "magnitudes_without_use_dora": (lambda p: edit_adapter_config(p, use_dora=False), "use_dora"),
    "magnitude_of_the_wrong_size": (lambda p: edit_adapter_tensors(p, _short_magnitude), "lora_magnitude_vector"),
}


@pytest.fixture(scope="module")
def dora_saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("dora")
    return save_adapter(tiny_model("llama"), str(root / "d0"), seed=4, target_modules=targets("llama"), r=4,
                        lora_alpha=8, use_dora=True)


@pytest.mark.parametrize("case", list(BROKEN_DORA))
def test_broken_dora_adapter(served, saved, dora_saved, tmp_path, case):
    lm, before = served
    edit, culprit = BROKEN_DORA[case]
    path = edit(copy_adapter(dora_saved, str(tmp_path / "x")))
    with pytest.raises(ValueError) as exc_info:
        lm.load_adapter("new", path)
    assert culprit in _message(exc_info, path)
    assert_unchanged(lm, before)
    _assert_name_free(lm, "new", saved["third"])


def test_dora_norm_failing_half_way_leaves_no_trace(served, saved, dora_saved, monkeypatch):
    """A base weight that cannot be read for DoRA's norm (the fifth module here) fails the load
    before anything is placed; the error names the module."""
    from lora_graph import patch

    lm, before = served
    read, real = [], patch.weight_rows

    def fifth_unreadable(module):
        read.append(module)
        if len(read) == 5:
            raise TypeError("its weight is an unknown format")
        return real(module)

    monkeypatch.setattr(patch, "weight_rows", fifth_unreadable)
    with pytest.raises(ValueError, match="DoRA's norm for module 'model.layers"):
        lm.load_adapter("new", dora_saved)
    assert len(read) == 5
    monkeypatch.undo()
    assert_unchanged(lm, before)
    _assert_name_free(lm, "new", dora_saved)


def test_failure_inside_the_forward(served):
    """The model itself raises (a token id past the vocabulary) while a SPEC is routed: the plan of
    that forward must not outlive it."""
    lm, before = served
    bad = IDS.clone()
    bad[1, 2] = VOCAB + 5
    for spec in ("good", ["other", {"good": 2.0}]):
        with pytest.raises(IndexError), torch.no_grad():
            lm(input_ids=bad, adapters=spec)
        with pytest.raises(IndexError), torch.no_grad(), lm.use(spec):
            lm.model(input_ids=bad)
    assert_unchanged(lm, before)


def test_unload_unknown(served):
    lm, before = served
    with pytest.raises(ValueError, match="'nope'"):
        lm.unload_adapter("nope")
    assert_unchanged(lm, before)


def test_adapters_mapping_is_read_only(served):
    lm, before = served
    with pytest.raises(TypeError):
        lm.adapters["x"] = lm.adapters["good"]
    with pytest.raises(TypeError):
        del lm.adapters["good"]
    assert_unchanged(lm, before)
