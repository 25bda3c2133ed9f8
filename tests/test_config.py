"""Config fields that decide the forward are honoured exactly as PEFT honours them.

Each model-level case saves a PEFT adapter (B non-zero), loads it both into ``PeftModel`` and into
lora_graph, and compares fp32 logits within 1e-4. It also checks that the set of modules carrying
LoRA is PEFT's, and that the adapter moves the logits far more than the tolerance, so a comparison
cannot pass because the branch is missing. The last tests check ``LoraSettings`` directly against
PEFT's own matchers (``check_target_module_exists``, ``get_pattern_key``) on a list of names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

import lora_graph
from helpers import (
    VOCAB, edit_adapter_config, peft_lora_modules, peft_oracle, peft_scales, save_adapter, targets, tiny_model,
)
from lora_graph.adapters import read_config

TOL = 1e-4


def _ids(batch: int = 3, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def check_against_peft(tmp_path, arch: str = "llama", config_edits: dict | None = None, **lora_kwargs):
    """Save an adapter with ``lora_kwargs`` (then rewrite ``config_edits`` into its config), compare
    lora_graph with PEFT; return (lm, oracle, path)."""
    model = tiny_model(arch)
    path = save_adapter(model, str(tmp_path / "adapter"), **lora_kwargs)
    if config_edits:
        edit_adapter_config(path, **config_edits)
    oracle = peft_oracle(model, {"a": path})
    ids = _ids()
    with torch.no_grad():
        expected = oracle(input_ids=ids).logits
        base = model(input_ids=ids).logits
        lm = lora_graph.wrap(model)
        info = lm.load_adapter("a", path)
        got = lm(input_ids=ids, adapters="a").logits

    peft_targets = peft_lora_modules(oracle, "a")
    assert peft_targets, "the config selected no module in PEFT: the case tests nothing"
    assert set(info.targets) == peft_targets
    assert (expected - base).abs().max() > 100 * TOL, "the adapter barely moves the logits: the case is vacuous"
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)

    # per-module rank and scale, as PEFT resolved them
    settings = read_config(Path(path))
    for name, (rank, scaling) in peft_scales(oracle, "a").items():
        assert settings.rank_for(name) == rank, name
        assert settings.scale_for(name) == pytest.approx(scaling, rel=1e-12), name
    return lm, oracle, path


# -- scale: rank_pattern, alpha_pattern, use_rslora ------------------------------------------------------


@pytest.mark.parametrize(
    "rank_pattern, alpha_pattern, q0",
    [
        # Different keys in the two dicts overlap the same module (layer 0's q_proj): rank comes from
        # the first rank key, alpha from the first alpha key, each resolved on its own.
        (
            {"layers.0.self_attn.q_proj": 2, "q_proj": 6, r"layers\.1\.mlp\..*": 3},
            {"q_proj": 5, "layers.0.self_attn.q_proj": 11, "self_attn.*": 7, "down_proj": 20},
            (2, 5 / 2),
        ),
        # The same keys in the other order: the first key in dict order wins, not the most specific.
        (
            {"q_proj": 6, "layers.0.self_attn.q_proj": 2, "^model.layers.1.mlp.up_proj": 5},
            {"self_attn.*": 7, "layers.0.self_attn.q_proj": 11, "q_proj": 5},
            (6, 7 / 6),
        ),
    ],
    ids=["specific-first", "general-first"],
)
def test_rank_and_alpha_patterns(tmp_path, rank_pattern, alpha_pattern, q0):
    # PEFT writes adapter_config.json with sorted keys, and "dict order" is then the file's order.
    # The file is rewritten here in the order the adapter was made with, so that order is tested.
    patterns = {"rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    _, oracle, path = check_against_peft(
        tmp_path, target_modules=targets("llama"), r=4, lora_alpha=8, config_edits=patterns, **patterns
    )
    with open(os.path.join(path, "adapter_config.json")) as f:
        assert list(json.load(f)["alpha_pattern"]) == list(alpha_pattern)
    # (rank, scaling) of the module both dicts' keys overlap, as PEFT itself resolved it
    rank, scaling = peft_scales(oracle, "a")["model.layers.0.self_attn.q_proj"]
    assert (rank, scaling) == (q0[0], pytest.approx(q0[1]))


@pytest.mark.parametrize("with_pattern", [False, True], ids=["plain", "rank_pattern"])
def test_use_rslora(tmp_path, with_pattern):
    extra = {"rank_pattern": {"v_proj": 9}, "alpha_pattern": {"o_proj": 3}} if with_pattern else {}
    _, oracle, _ = check_against_peft(
        tmp_path, target_modules=targets("llama", "attn"), r=4, lora_alpha=8, use_rslora=True, **extra
    )
    # alpha / sqrt(r), not alpha / r
    assert peft_scales(oracle, "a")["model.layers.0.self_attn.q_proj"][1] == pytest.approx(8 / 2)


# -- which modules: target_modules, exclude_modules, layers_to_transform ---------------------------------


def test_target_modules_list(tmp_path):
    lm, _, _ = check_against_peft(tmp_path, target_modules=["q_proj", "down_proj"])
    assert all(n.endswith(("q_proj", "down_proj")) for n in lm.adapters["a"].targets)


def test_target_modules_regex_string(tmp_path):
    regex = r".*\.layers\.1\.(self_attn\.(q|k)_proj|mlp\.down_proj)"
    lm, _, path = check_against_peft(tmp_path, target_modules=regex)
    with open(os.path.join(path, "adapter_config.json")) as f:
        assert json.load(f)["target_modules"] == regex  # saved as a string, matched with fullmatch
    assert sorted(lm.adapters["a"].targets) == [
        "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj",
    ]


def test_target_modules_all_linear_expanded(tmp_path):
    lm, _, path = check_against_peft(tmp_path, target_modules="all-linear")
    with open(os.path.join(path, "adapter_config.json")) as f:
        saved = json.load(f)["target_modules"]
    assert isinstance(saved, list) and len(saved) == 14  # PEFT expands before saving
    assert "lm_head" not in lm.adapters["a"].targets


@pytest.mark.parametrize(
    "exclude",
    [["k_proj", "model.layers.1.mlp.up_proj"], r".*\.layers\.0\.mlp\..*"],
    ids=["list", "regex"],
)
def test_exclude_modules(tmp_path, exclude):
    lm, _, _ = check_against_peft(tmp_path, target_modules=targets("llama"), exclude_modules=exclude)
    names = lm.adapters["a"].targets
    if isinstance(exclude, list):
        assert not any(n.endswith("k_proj") for n in names) and "model.layers.1.mlp.up_proj" not in names
    else:
        assert not any(".layers.0.mlp." in n for n in names)
    assert len(names) < 14


@pytest.mark.parametrize(
    "arch, kwargs",
    [
        ("llama", {"layers_to_transform": [1]}),
        ("llama", {"layers_to_transform": 0, "layers_pattern": "layers"}),
        ("gpt2", {"layers_to_transform": [1], "layers_pattern": ["h"]}),
        ("llama", {"layers_to_transform": [0], "layers_pattern": ""}),  # PEFT: empty pattern = any layer list
    ],
    ids=["list-no-pattern", "int-with-pattern", "gpt2-h-pattern", "empty-pattern"],
)
def test_layers_to_transform(tmp_path, arch, kwargs):
    lm, _, _ = check_against_peft(tmp_path, arch=arch, target_modules=targets(arch), **kwargs)
    layer = kwargs["layers_to_transform"]
    layer = layer if isinstance(layer, int) else layer[0]
    seg = "h" if arch == "gpt2" else "layers"
    assert all(f".{seg}.{layer}." in n for n in lm.adapters["a"].targets)


# -- other fields --------------------------------------------------------------------------------------


def test_lora_bias_is_scaled(tmp_path):
    # alpha/r = 4, so an unscaled bias would be off by a factor 4
    _, oracle, path = check_against_peft(tmp_path, target_modules=targets("llama"), r=4, lora_alpha=16, lora_bias=True)
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    biases = [t for k, t in tensors.items() if k.endswith("lora_B.bias")]
    assert len(biases) == 14 and all(b.abs().max() > 0 for b in biases)


def test_gpt2_conv1d(tmp_path):
    # Conv1D stores its weight (in, out); PEFT keeps A (r, in) and B (out, r) and sets fan_in_fan_out
    _, _, path = check_against_peft(tmp_path, arch="gpt2", target_modules=targets("gpt2"), r=4, lora_alpha=8)
    with open(os.path.join(path, "adapter_config.json")) as f:
        assert json.load(f)["fan_in_fan_out"] is True


def test_lora_dropout_ignored_at_inference(tmp_path):
    lm, _, _ = check_against_peft(tmp_path, target_modules=targets("llama"), lora_dropout=0.5)
    ids = _ids()
    with torch.no_grad():
        torch.manual_seed(1)
        first = lm(input_ids=ids, adapters="a").logits
        torch.manual_seed(2)
        second = lm(input_ids=ids, adapters="a").logits
    assert torch.equal(first, second)


# -- LoraSettings against PEFT's matchers ----------------------------------------------------------------

NAMES = [
    "lm_head",
    "q_proj",
    "model.embed_tokens",
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.0.self_attn.q_proj_extra",
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.mlp.up_proj",
    "model.layers.1.mlp.down_proj",
    "model.layers.2.mlp.down_proj",
    "model.layers.10.mlp.up_proj",
    "model.layers.1.mlp.experts.0.up_proj",
    "model.layers.2.mlp.experts.1.down_proj",
    "model.decoder.layers.1.fc1",
    "transformer.h.0.attn.c_attn",
    "transformer.h.1.attn.c_proj",
    "transformer.h.1.mlp.c_proj",
    "vision_tower.encoder.layers.0.self_attn.q_proj",
    "vision_tower.encoder.layers.1.mlp.up_proj",
]

CONFIGS = [
    {"target_modules": ["q_proj", "down_proj"]},
    {"target_modules": ["model.layers.0.self_attn.q_proj", "lm_head"]},
    {"target_modules": ["q_proj", "up_proj", "down_proj"], "layers_to_transform": [1, 2]},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": 1, "layers_pattern": "layers"},
    {"target_modules": ["c_attn", "c_proj", "up_proj"], "layers_to_transform": [1], "layers_pattern": ["h", "layers"]},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [0], "layers_pattern": "encoder.layers"},
    {"target_modules": r".*layers\.(0|1)\..*_proj", "exclude_modules": ["k_proj", "model.layers.1.mlp.up_proj"]},
    {"target_modules": ["q_proj", "k_proj", "c_proj", "c_attn"], "exclude_modules": r".*\.attn\..*"},
    {"target_modules": ["up_proj", "down_proj"], "layers_to_transform": [1]},  # MoE: the layer index, not the expert
    # an empty layers_to_transform selects every layer; an empty layers_pattern means "any layer list"
    {"target_modules": ["q_proj", "c_attn"], "layers_to_transform": []},
    {"target_modules": ["q_proj", "c_attn"], "layers_to_transform": [1], "layers_pattern": []},
    {"target_modules": ["q_proj", "c_attn"], "layers_to_transform": [0], "layers_pattern": ""},
    # regexes match the whole name: a prefix match would wrongly take (or drop) q_proj_extra
    {"target_modules": r"model\.layers\.\d+\.self_attn\.q_proj"},
    {"target_modules": ["q_proj", "q_proj_extra"], "exclude_modules": r".*layers\.0\..*q_proj"},
]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=[f"cfg{i}" for i in range(len(CONFIGS))])
def test_targets_match_peft(tmp_path, kwargs):
    config = LoraConfig(r=4, lora_alpha=8, **kwargs)
    config.save_pretrained(str(tmp_path))
    settings = read_config(tmp_path)
    expected = {n: bool(check_target_module_exists(config, n)) for n in NAMES}
    got = {n: settings.targets(n) for n in NAMES}
    assert got == expected
    assert any(expected.values()) and not all(expected.values())  # the case discriminates


def test_patterns_match_peft(tmp_path):
    # "proj" must match a whole dotted segment run ("(.*\.)?(proj)$"), so no name here takes it
    rank_pattern = {"proj": 13, "layers.0.self_attn.q_proj": 2, "q_proj": 6, r"layers\.1\..*": 3, "^vision_tower.*": 12}
    alpha_pattern = {"q_proj": 5, "^model.layers.0.*": 11, "down_proj": 7, "c_.*": 1.5}
    LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]).save_pretrained(str(tmp_path))
    # written in this (unsorted) order: the first key in the file's order wins
    edit_adapter_config(str(tmp_path), rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    config = LoraConfig.from_pretrained(str(tmp_path))
    assert list(config.alpha_pattern) == list(alpha_pattern)
    settings = read_config(tmp_path)
    for name in NAMES:
        r_key = get_pattern_key(config.rank_pattern.keys(), name)
        a_key = get_pattern_key(config.alpha_pattern.keys(), name)
        assert settings.rank_for(name) == config.rank_pattern.get(r_key, config.r), name
        assert settings.alpha_for(name) == config.alpha_pattern.get(a_key, config.lora_alpha), name
    # the list holds names where two keys match, and names where none does
    assert settings.rank_for("model.layers.0.self_attn.q_proj") == 2
    assert settings.alpha_for("model.layers.0.self_attn.q_proj") == 5
    assert settings.rank_for("transformer.h.0.attn.c_attn") == 4
