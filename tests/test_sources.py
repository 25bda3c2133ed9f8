"""Adapter sources other than a folder: tensors in memory with a config, and Hub repo ids.

In-memory adapters must load bit for bit as the same adapter from its folder, which test_models
holds to PEFT; they are also checked against PEFT directly, including PEFT's own in-memory path
(``inject_adapter_in_model`` + ``set_peft_model_state_dict``), which accepts keys with or without
the ``base_model.model.`` prefix. Hub ids are read from a Hugging Face cache laid out by hand in a
temporary folder, with HF_HUB_OFFLINE set: no test touches the network.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import digest, make_adapters, peft_oracle, peft_rows, tiny_model, token_ids
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file

import lora_graph
from lora_graph.config import AdapterConfigError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:peft")

ATOL32 = 1e-5
PREFIX = "base_model.model."
SPECS = ["a", ["a", "b", None, "c"], [{"a": 0.5, "c": -1.5}, "b", None, {"b": 2.0}]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    model = tiny_model("llama")
    return model, make_adapters(model, "llama", root)


def memory(folder: str) -> tuple[dict, LoraConfig]:
    """The adapter of ``folder`` as tensors and a LoraConfig, as a caller holds it."""
    return load_file(os.path.join(folder, "adapter_model.safetensors")), LoraConfig.from_pretrained(folder)


@torch.no_grad()
def outputs(lm, ids) -> list[torch.Tensor]:
    return [lm(input_ids=ids, adapters=spec).logits for spec in SPECS]


def assert_same_bits(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for spec, g, w in zip(SPECS, got, want):
        assert torch.equal(g, w), f"{spec}: max diff {(g - w).abs().max().item()}"


def test_in_memory_equals_folder_bit_for_bit(setup):
    """LoraConfig, a dict config and PEFT's live state dict all load as the folder does."""
    model, paths = setup
    ids = token_ids(4, 7)
    from_folder = lora_graph.wrap(copy.deepcopy(model))
    for name, path in paths.items():
        from_folder.load_adapter(name, path)
    want = outputs(from_folder, ids)

    for how in ("LoraConfig", "dict"):
        lm = lora_graph.wrap(copy.deepcopy(model))
        for name, path in paths.items():
            tensors, config = memory(path)
            if how == "dict":
                with open(os.path.join(path, "adapter_config.json")) as f:
                    config = json.load(f)
            info = lm.load_adapter(name, state_dict=tensors, config=config)
            assert info.targets == from_folder.adapters[name].targets and info.nbytes == from_folder.adapters[name].nbytes
        assert_same_bits(outputs(lm, ids), want)

    # the tensors of a live PeftModel, as get_peft_model_state_dict gives them
    peft_model = peft_oracle(model, paths)
    lm = lora_graph.wrap(copy.deepcopy(model))
    for name in paths:
        lm.load_adapter(name, state_dict=get_peft_model_state_dict(peft_model, adapter_name=name),
                        config=peft_model.peft_config[name])
    assert_same_bits(outputs(lm, ids), want)
    names = ["a", "b", "__base__", "c"]
    torch.testing.assert_close(lm(input_ids=ids, adapters=[n if n != "__base__" else None for n in names]).logits,
                               peft_rows(peft_model, names, input_ids=ids), atol=ATOL32, rtol=0)


def test_keys_without_prefix_as_peft_accepts_them(setup):
    """PEFT's set_peft_model_state_dict strips ``base_model.model.`` when the model has no such
    prefix, so unprefixed keys are PEFT's own in-memory spelling: they load the same bits."""
    model, paths = setup
    ids = token_ids(2, 6)
    tensors, config = memory(paths["b"])
    bare = {k.removeprefix(PREFIX): v for k, v in tensors.items()}
    assert bare.keys() != tensors.keys()

    oracle = inject_adapter_in_model(config, copy.deepcopy(model))
    result = set_peft_model_state_dict(oracle, bare)
    assert not result.unexpected_keys
    with torch.no_grad():
        want = oracle(input_ids=ids).logits

    lm = lora_graph.wrap(copy.deepcopy(model))
    lm.load_adapter("bare", state_dict=bare, config=config)
    lm.load_adapter("prefixed", state_dict=tensors, config=config)
    with torch.no_grad():
        got = lm(input_ids=ids, adapters="bare").logits
        assert torch.equal(got, lm(input_ids=ids, adapters="prefixed").logits)
    torch.testing.assert_close(got, want, atol=ATOL32, rtol=0)

    key = next(iter(tensors))
    both = {**tensors, key.removeprefix(PREFIX): tensors[key]}
    with pytest.raises(ValueError, match=r"in-memory adapter 'both'.*repeats"):
        lm.load_adapter("both", state_dict=both, config=config)


def _bad_inputs(path):
    tensors, config = memory(path)
    key_a = next(k for k in tensors if k.endswith("lora_A.weight"))
    wide = {**tensors, key_a: torch.zeros(tensors[key_a].shape[0], tensors[key_a].shape[1] + 1)}
    return {
        "refused field": (dict(state_dict=tensors, config={**config.to_dict(), "modules_to_save": ["lm_head"]}),
                          AdapterConfigError, "modules_to_save"),
        "wrong shape": (dict(state_dict=wide, config=config), ValueError, key_a.removeprefix(PREFIX).split(".lora_A")[0]),
        "stray key": (dict(state_dict={**tensors, "base_model.model.model.foo.weight": torch.zeros(2)}, config=config),
                      ValueError, "model.foo.weight"),
        "not a tensor": (dict(state_dict={**tensors, key_a: [1.0]}, config=config), TypeError, key_a),
        "meta tensor": (dict(state_dict={**tensors, key_a: tensors[key_a].to("meta")}, config=config), ValueError, key_a),
        "no config": (dict(state_dict=tensors), ValueError, "config="),
        "no tensors": (dict(config=config), ValueError, "state_dict="),
        "config type": (dict(state_dict=tensors, config="r=4"), TypeError, "LoraConfig or a dict"),
        "path and tensors": (dict(path=path, state_dict=tensors, config=config), ValueError, "not both"),
        "empty": (dict(state_dict={}, config=config), ValueError, "has no weights|no LoRA weights"),
    }


@pytest.mark.parametrize("case", ["refused field", "wrong shape", "stray key", "not a tensor", "meta tensor",
                                  "no config", "no tensors", "config type", "path and tensors", "empty"])
@pytest.mark.parametrize("method", ["load_adapter", "register_adapter"])
def test_bad_in_memory_adapter_is_refused_and_changes_nothing(setup, case, method):
    model, paths = setup
    lm = lora_graph.wrap(copy.deepcopy(model), max_loaded=3)
    for name, path in paths.items():
        lm.load_adapter(name, path)
    ids = token_ids(4, 5)
    before = (dict(lm.adapters), set(lm.resident), digest(lm.model), outputs(lm, ids))
    kwargs, error, words = _bad_inputs(paths["c"])[case]
    for name, replace in (("new", False), ("a", True)):  # a new name, and replacing a resident adapter
        with pytest.raises(error, match=words):
            getattr(lm, method)(name, replace=replace, **kwargs)
        assert (dict(lm.adapters), set(lm.resident), digest(lm.model)) == before[:3]
        assert_same_bits(outputs(lm, ids), before[3])


def test_registered_tensors_are_kept_on_the_host_and_paged_in(setup):
    """A registered in-memory adapter is a host copy: the caller may change or drop its tensors,
    and paging through one slot with no host cache reads it back each time."""
    model, paths = setup
    ids = token_ids(3, 6)
    oracle = lora_graph.wrap(copy.deepcopy(model))
    for name, path in paths.items():
        oracle.load_adapter(name, path)
    lm = lora_graph.wrap(copy.deepcopy(model), max_loaded=1, max_cpu=0)
    kept = 0
    for name, path in paths.items():
        tensors, config = memory(path)
        kept += sum(t.numel() * t.element_size() for t in tensors.values())
        info = lm.register_adapter(name, state_dict=tensors, config=config)
        assert info.targets == oracle.adapters[name].targets  # validated when registered
        for t in tensors.values():
            t.zero_()  # the caller's tensors change afterwards; the adapter does not
    assert lm.resident == () and lm.memory()["host"]["in_memory"] == kept
    with torch.no_grad():
        for spec in ["a", "b", "c", "a", ["c", None, "c"], "b"]:
            got = lm(input_ids=ids, adapters=spec).logits
            assert torch.equal(got, oracle(input_ids=ids, adapters=spec).logits), spec
    lm.unload_adapter("b")
    assert lm.memory()["host"]["in_memory"] == kept - sum(t.numel() * t.element_size()
                                                          for t in memory(paths["b"])[0].values())
    with pytest.raises(ValueError, match="unknown adapter 'b'"):
        lm(input_ids=ids, adapters="b")


# -- Hub ids -----------------------------------------------------------------------------------------

SHA = "0123456789abcdef0123456789abcdef01234567"
SHA2 = "89abcdef0123456789abcdef0123456789abcdef"


def cache_repo(cache, repo_id: str, folder: str, sha: str = SHA, refs=("main",), extra: dict | None = None) -> None:
    """``folder``'s files as snapshot ``sha`` of ``repo_id`` in a Hugging Face cache, laid out as
    huggingface_hub writes it: content-addressed blobs, symlinks in snapshots/<sha>, refs/<name>."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    snapshot = os.path.join(repo, "snapshots", sha)
    os.makedirs(snapshot, exist_ok=True)
    files = {n: open(os.path.join(folder, n), "rb").read() for n in os.listdir(folder)}
    for name, data in {**files, **(extra or {})}.items():
        blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
        with open(blob, "wb") as f:
            f.write(data)
        os.symlink(os.path.relpath(blob, snapshot), os.path.join(snapshot, name))
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    for ref in refs:
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(sha)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline (the env and huggingface_hub's constants, which it
    reads at import)."""
    import huggingface_hub.constants as constants

    cache = str(tmp_path / "hub")
    os.makedirs(cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    return cache


def test_hub_id_is_read_from_the_cache_offline(setup, offline_cache):
    model, paths = setup
    ids = token_ids(3, 5)
    cache_repo(offline_cache, "org/adapter-a", paths["a"], extra={"README.md": b"# a\n"})
    cache_repo(offline_cache, "org/adapter-a", paths["b"], sha=SHA2, refs=("v2",))
    oracle = lora_graph.wrap(copy.deepcopy(model))
    oracle.load_adapter("a", paths["a"])
    oracle.load_adapter("b", paths["b"])

    lm = lora_graph.wrap(copy.deepcopy(model))
    info = lm.load_adapter("a", "org/adapter-a")
    assert SHA in info.path and "models--org--adapter-a" in info.path
    assert lm.load_adapter("a", "org/adapter-a") == info  # the same files again: already loaded
    lm.load_adapter("v2", "org/adapter-a", revision="v2")
    lm.register_adapter("pinned", "org/adapter-a", revision=SHA2)  # a commit hash
    with torch.no_grad():
        assert torch.equal(lm(input_ids=ids, adapters="a").logits, oracle(input_ids=ids, adapters="a").logits)
        for name in ("v2", "pinned"):
            assert torch.equal(lm(input_ids=ids, adapters=name).logits, oracle(input_ids=ids, adapters="b").logits)


def test_hub_id_missing_offline_names_the_repo(setup, offline_cache, tmp_path):
    model, paths = setup
    lm = lora_graph.wrap(copy.deepcopy(model))
    lm.load_adapter("a", paths["a"])
    before = (dict(lm.adapters), lm.resident)
    for call in (lambda: lm.load_adapter("x", "org/missing"), lambda: lm.register_adapter("x", "org/missing"),
                 lambda: lm.load_adapter("x", "org/missing", revision="v9")):
        with pytest.raises(FileNotFoundError, match=r"'org/missing'.*HF_HUB_OFFLINE is set.*no copy"):
            call()
    # a cached repo that is no adapter
    no_adapter = tmp_path / "model_only"
    no_adapter.mkdir()
    (no_adapter / "config.json").write_text("{}")
    cache_repo(offline_cache, "org/a-model", str(no_adapter))
    with pytest.raises(FileNotFoundError, match=r"'org/a-model'.*no adapter_config.json"):
        lm.load_adapter("x", "org/a-model")
    # a folder's revision, and strings that are no repo id, never reach the Hub
    with pytest.raises(ValueError, match="revision='v1' applies to a Hub repo id"):
        lm.load_adapter("x", paths["b"], revision="v1")
    for path in ("no/such/dir", "./org/repo", str(tmp_path / "org" / "repo")):
        with pytest.raises(FileNotFoundError, match=r"adapter directory not found"):
            lm.load_adapter("x", path)
    assert (dict(lm.adapters), lm.resident) == before


def test_hub_repo_that_does_not_exist_is_named(setup, monkeypatch):
    """Online, the Hub answers 404: the error says the repo does not exist (the answer is
    simulated; no test uses the network)."""
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(repo_id, **kwargs):
        assert kwargs["allow_patterns"] == ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]
        error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
        Exception.__init__(error, f"404 {repo_id}")
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_found)
    lm = lora_graph.wrap(copy.deepcopy(setup[0]))
    with pytest.raises(FileNotFoundError, match=r"'org/nothing-here'.*no such repo on the Hub"):
        lm.load_adapter("x", "org/nothing-here")
    assert dict(lm.adapters) == {}


def test_hub_offline_from_the_environment(setup, tmp_path):
    """HF_HUB_OFFLINE and HF_HUB_CACHE set in the environment of a fresh process are honoured."""
    model, paths = setup
    cache = tmp_path / "hub"
    cache_repo(str(cache), "org/adapter-c", paths["c"])
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    code = (
        "import torch, lora_graph\n"
        "from transformers import AutoModelForCausalLM\n"
        f"lm = lora_graph.wrap(AutoModelForCausalLM.from_pretrained({str(model_dir)!r}))\n"
        "print(sorted(lm.load_adapter('c', 'org/adapter-c').targets)[0])\n"
        "try:\n    lm.load_adapter('d', 'org/adapter-d')\nexcept FileNotFoundError as e:\n    print(e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    first, second = out.stdout.strip().splitlines()[-2:]
    assert first == "model.layers.0.mlp.down_proj"
    assert "'org/adapter-d'" in second and "HF_HUB_OFFLINE is set" in second and str(cache) in second
    shutil.rmtree(cache)


@pytest.mark.parametrize("source", ["folder", "memory"])
def test_registering_over_a_resident_adapter_serves_the_new_weights(setup, source):
    """register_adapter(replace=True) on a resident adapter: requests after it get the new weights."""
    model, paths = setup
    ids = token_ids(2, 5)
    oracle = lora_graph.wrap(copy.deepcopy(model))
    oracle.load_adapter("x", paths["b"])
    lm = lora_graph.wrap(copy.deepcopy(model), max_loaded=2)
    lm.load_adapter("x", paths["a"])
    assert lm.resident == ("x",)
    if source == "folder":
        lm.register_adapter("x", paths["b"], replace=True)
    else:
        tensors, config = memory(paths["b"])
        lm.register_adapter("x", state_dict=tensors, config=config, replace=True)
    with torch.no_grad():
        assert torch.equal(lm(input_ids=ids, adapters="x").logits, oracle(input_ids=ids, adapters="x").logits)
    assert lm.adapters["x"].targets == oracle.adapters["x"].targets
