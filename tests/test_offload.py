"""Models dispatched by accelerate with offloaded modules (big-model inference).

An offloaded module's parameters sit on the meta device between forwards; accelerate's hook loads
them from its weights map (host memory, or a file in the offload folder) for the module's forward.
Three ways of getting there, all executing on the CPU here:

    disk      from_pretrained(device_map={... layers 2-3: "disk" ...}, offload_folder=...)
    cpu       accelerate.cpu_offload(model, execution_device=cpu): every module offloaded to host memory
    inferred  accelerate.infer_auto_device_map under a small CPU budget, then dispatch_model: the rest on disk

The oracle is PEFT over an identically offloaded twin: a PeftModel with the same adapters,
dispatched with the same map (PEFT's own ``from_pretrained`` over an offloaded model re-dispatches
it with an inferred map, which fails on this CPU-only machine, so the twin is offloaded after the
adapters are in). PEFT's DoRA cannot run on offloaded modules (its norm reads the meta weight), so
DoRA is held to PEFT on the same model without offloading: the weights are the same.
"""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from accelerate import cpu_offload, dispatch_model, infer_auto_device_map
from helpers import adapter_dir, make_adapters, peft_oracle, peft_rows, save_adapter, targets, tiny_model_with, token_ids
from transformers import AutoModelForCausalLM

import lora_graph

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

ATOL32 = 1e-5
KINDS = ["disk", "cpu", "inferred"]
DISK_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.layers.2": "disk",
            "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload")
    model = tiny_model_with("llama", num_hidden_layers=4)
    model.save_pretrained(root / "model")
    paths = make_adapters(model, "llama", root)
    paths["d"] = save_adapter(model, adapter_dir(root, "d"), seed=14, r=4, lora_alpha=8, use_dora=True,
                              target_modules=targets("llama"))
    return root, paths


def plain(root):
    return AutoModelForCausalLM.from_pretrained(root / "model").eval()


def inferred_map(model) -> dict:
    """accelerate's own map for a CPU budget that holds about half the model: the rest goes to disk."""
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return infer_auto_device_map(model, max_memory={"cpu": size // 2}, no_split_module_classes=["LlamaDecoderLayer"])


def offloaded(root, kind: str, folder, model=None, prefix: str = ""):
    """The saved model (or ``model``, a PeftModel over it) offloaded the ``kind`` way."""
    if kind == "disk" and model is None:
        return AutoModelForCausalLM.from_pretrained(root / "model", device_map=DISK_MAP, offload_folder=folder).eval()
    model = plain(root) if model is None else model
    if kind == "cpu":
        return cpu_offload(model, execution_device=torch.device("cpu"))
    device_map = DISK_MAP if kind == "disk" else inferred_map(plain(root))  # the same map for both twins
    return dispatch_model(model, {prefix + k: v for k, v in device_map.items()}, offload_dir=folder)


def peft_twin(root, kind: str, folder, paths: dict):
    return offloaded(root, kind, folder, peft_oracle(plain(root), paths), prefix="base_model.model.")


def assert_offloaded(model) -> None:
    """The setup is what it claims: some patchable weight lives only in accelerate's weights map."""
    assert any(m.weight.is_meta and m._hf_hook.offload for m in model.modules()
               if isinstance(m, torch.nn.Linear) and hasattr(m, "_hf_hook"))


def offloaded_digest(model, folder=None) -> dict[str, str]:
    """sha256 of every parameter and buffer where it really lives (an offloaded one in its hook's
    weights map), and of every file in the offload folder."""
    out = {}
    for name, module in model.named_modules():
        for pname, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if tensor.is_meta:
                tensor = module._hf_hook.weights_map[pname]
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            out[f"{name}.{pname}"] = hashlib.sha256(data).hexdigest()
    for dirpath, _, files in os.walk(folder) if folder is not None else ():
        for file in files:
            with open(os.path.join(dirpath, file), "rb") as f:
                out[os.path.join(dirpath, file)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_offloaded_mixed_batches_match_peft(setup, tmp_path, kind):
    root, paths = setup
    loras = {n: paths[n] for n in "abc"}
    model = offloaded(root, kind, tmp_path / "off")
    assert_offloaded(model)
    lm = lora_graph.wrap(model)
    for name, path in loras.items():
        lm.load_adapter(name, path)
    twin = peft_twin(root, kind, tmp_path / "off_peft", loras)
    ids = token_ids(5, 7)
    with torch.no_grad():
        for names in (["a", "b", "__base__", "c", "b"], ["c"] * 5, ["__base__"] * 5):
            spec = [None if n == "__base__" else n for n in names]
            torch.testing.assert_close(lm(input_ids=ids, adapters=spec).logits, peft_rows(twin, names, input_ids=ids),
                                       atol=ATOL32, rtol=0, msg=lambda m: f"{names}: {m}")
        # weighted sets: held to the same adapters on the model without offloading
        reference = lora_graph.wrap(plain(root))
        for name, path in loras.items():
            reference.load_adapter(name, path)
        spec = [{"a": 0.5, "c": -1.0}, None, "b", {"b": 2.0, "a": 1.0}, "c"]
        torch.testing.assert_close(lm(input_ids=ids, adapters=spec).logits,
                                   reference(input_ids=ids, adapters=spec).logits, atol=ATOL32, rtol=0)
    if kind == "disk":
        twin.set_adapter("b")
        want = twin.generate(input_ids=ids[:2], max_new_tokens=5, do_sample=False)
        assert torch.equal(lm.generate(input_ids=ids[:2], adapters="b", max_new_tokens=5, do_sample=False), want)


@pytest.mark.parametrize("kind", ["disk", "cpu"])
def test_offloaded_paging_under_max_loaded(setup, tmp_path, kind):
    """Two slots, three adapters, no host cache: every request pages in what it names, and the
    banks of the offloaded modules are written and evicted like any others."""
    root, paths = setup
    loras = {n: paths[n] for n in "abc"}
    lm = lora_graph.wrap(offloaded(root, kind, tmp_path / "off"), max_loaded=2, max_cpu=0)
    for name, path in loras.items():
        lm.register_adapter(name, path)
    twin = peft_twin(root, kind, tmp_path / "off_peft", loras)
    ids = token_ids(3, 6)
    evicted = False
    with torch.no_grad():
        for names in (["a", "b", "a"], ["c", "__base__", "c"], ["b", "c", "__base__"], ["a", "a", "c"], ["b"] * 3):
            spec = [None if n == "__base__" else n for n in names]
            got = lm(input_ids=ids, adapters=spec).logits
            assert len(lm.resident) <= 2
            evicted |= set(lm.resident) != set(names) - {"__base__"}
            torch.testing.assert_close(got, peft_rows(twin, names, input_ids=ids), atol=ATOL32, rtol=0,
                                       msg=lambda m: f"{names}: {m}")
    assert evicted


@pytest.mark.parametrize("kind", KINDS)
def test_unwrap_leaves_the_offloaded_model_as_its_twin(setup, tmp_path, kind):
    root, paths = setup
    model = offloaded(root, kind, tmp_path / "off")
    twin = offloaded(root, kind, tmp_path / "off_twin")
    folder = tmp_path / "off" if kind != "cpu" else None
    before = offloaded_digest(model, folder)
    lm = lora_graph.wrap(model, max_loaded=2)
    ids = token_ids(3, 5)
    for name in "abc":
        lm.load_adapter(name, paths[name])
    with torch.no_grad():
        lm(input_ids=ids, adapters=["a", "b", None])
        lm(input_ids=ids, adapters="c")
    lm.unload_adapter("b")
    assert lm.unwrap() is model
    assert offloaded_digest(model, folder) == before
    assert [type(m) for m in model.modules()] == [type(m) for m in twin.modules()]
    assert {n: p.device for n, p in model.named_parameters()} == {n: p.device for n, p in twin.named_parameters()}
    q = model.model.layers[2].self_attn.q_proj
    assert type(q) is torch.nn.Linear and q.weight.is_meta and q._hf_hook.offload
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, twin(input_ids=ids).logits)


@pytest.mark.parametrize("kind", ["disk", "cpu"])
def test_dora_on_offloaded_modules(setup, tmp_path, kind):
    """DoRA's norm reads the base weight at load: for an offloaded module, from its hook's weights map."""
    root, paths = setup
    lm = lora_graph.wrap(offloaded(root, kind, tmp_path / "off"))
    lm.load_adapter("d", paths["d"])
    lm.load_adapter("a", paths["a"])
    oracle = peft_oracle(plain(root), {"d": paths["d"], "a": paths["a"]})
    ids = token_ids(3, 6)
    names = ["d", "__base__", "a"]
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=ids, adapters=["d", None, "a"]).logits,
                                   peft_rows(oracle, names, input_ids=ids), atol=ATOL32, rtol=0)


def test_dora_on_a_weight_that_holds_no_data_is_refused(setup):
    """A weight on the meta device with no accelerate hook to load it from: DoRA's norm cannot be
    computed, and the error names the module; nothing is loaded."""
    root, paths = setup
    model = plain(root)
    q = model.model.layers[1].self_attn.q_proj
    q.weight = torch.nn.Parameter(q.weight.to("meta"), requires_grad=False)
    lm = lora_graph.wrap(model)
    with pytest.raises(ValueError, match=r"'model.layers.1.self_attn.q_proj'.*meta device"):
        lm.load_adapter("d", paths["d"])
    assert dict(lm.adapters) == {} and lm.resident == ()
    lm.unwrap()


GPU_MAP = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.layers.2": "disk",
           "model.layers.3": "cpu", "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: offloaded modules execute on it")
def test_offloaded_to_cpu_and_disk_executing_on_the_gpu(setup, tmp_path):
    """The usual big-model case: the main device is a GPU, some layers wait in host memory or on
    disk and execute on the GPU; their banks live on the GPU."""
    root, paths = setup
    loras = {n: paths[n] for n in "abc"}
    model = AutoModelForCausalLM.from_pretrained(root / "model", device_map=GPU_MAP, offload_folder=tmp_path / "off")
    assert_offloaded(model.eval())
    lm = lora_graph.wrap(model, max_loaded=2)
    for name, path in loras.items():
        lm.register_adapter(name, path)
    twin = dispatch_model(peft_oracle(plain(root), loras), {"base_model.model." + k: v for k, v in GPU_MAP.items()},
                          offload_dir=tmp_path / "off_peft")
    ids = token_ids(3, 6).cuda()
    with torch.no_grad():
        for names in (["a", "b", "__base__"], ["c", "c", "a"], ["b", "__base__", "c"]):
            spec = [None if n == "__base__" else n for n in names]
            torch.testing.assert_close(lm(input_ids=ids, adapters=spec).logits, peft_rows(twin, names, input_ids=ids),
                                       atol=1e-4, rtol=0, msg=lambda m: f"{names}: {m}")
    for index in (1, 2, 3):
        assert model.model.layers[index].self_attn.q_proj.bank.device.type == "cuda"
