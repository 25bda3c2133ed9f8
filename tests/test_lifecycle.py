"""The wrapper's lifecycle on real models: the base stays byte-identical, modules are wrapped when
an adapter first targets them and restored when the last one goes, ``unwrap()`` gives back the
same model with the same module objects, and ``use()`` routes plain ``model(...)``,
``model.generate(...)`` and a transformers pipeline built on the model.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from helpers import (
    ARCHS,
    EXTRA_TARGETS,
    LayoutProbe,
    adapter_dir,
    assert_original_modules,
    digest,
    module_map,
    peft_oracle,
    peft_rows,
    save_adapter,
    targets,
    tiny_model,
    tiny_tokenizer,
    token_ids,
)
from transformers import pipeline

import lora_graph

ARCH_NAMES = list(ARCHS)
ATOL32 = 1e-4
GEN = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)


def module_names(model, suffixes) -> list[str]:
    """Names of the modules PEFT's list matching would select for ``suffixes``."""
    return [n for n, _ in model.named_modules() if any(n == s or n.endswith("." + s) for s in suffixes)]


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def peft_logits(peft_model, arch, names, ids):
    if arch == "opt":  # OPT flattens tokens before fc1/fc2, where PEFT's mixed batch raises
        return peft_rows(peft_model, names, input_ids=ids)
    return logits(peft_model, ids, adapter_names=names)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_base_untouched_and_restored_through_lifecycle(arch, adapter_dirs):
    dirs = adapter_dirs(arch)
    model = tiny_model(arch)
    ids = token_ids(3, 6, seed=9)
    base = logits(model, ids)
    before = digest(model)
    modules = module_map(model)
    types = {n: type(m) for n, m in modules.items()}
    hooks = (dict(model._forward_pre_hooks), dict(model._forward_hooks))

    lm = lora_graph.wrap(model)
    assert digest(model) == before
    steps = [
        ("load a", lambda: lm.load_adapter("a", dirs["a"])),
        ("forward", lambda: logits(lm, ids, adapters=["a", None, {"a": -2.0}])),
        ("load b, c", lambda: (lm.load_adapter("b", dirs["b"]), lm.load_adapter("c", dirs["c"]))),
        ("forward", lambda: logits(lm, ids, adapters=[{"a": 0.5, "b": -1.0, "c": 2.0}, "c", None])),
        ("generate", lambda: lm.generate(input_ids=ids, adapters=["b", None, "a"], **GEN)),
        ("beam generate", lambda: lm.generate(input_ids=ids, adapters=["c", "b", None], num_beams=2,
                                              num_return_sequences=2, **GEN)),
        ("unload a", lambda: lm.unload_adapter("a")),
        ("forward", lambda: logits(lm, ids, adapters="b")),
        ("use + plain forward", lambda: _plain_forward_in_use(lm, model, ids)),
        ("unload b, c", lambda: (lm.unload_adapter("b"), lm.unload_adapter("c"))),
        ("reload a", lambda: lm.load_adapter("a", dirs["a"])),
        ("forward", lambda: logits(lm, ids, adapters="a")),
    ]
    for what, step in steps:
        step()
        assert digest(model) == before, f"a base parameter or buffer changed at: {what}"

    assert lm.unwrap() is model
    assert digest(model) == before
    assert_original_modules(model, modules)
    assert {n: type(m) for n, m in module_map(model).items()} == types
    assert (dict(model._forward_pre_hooks), dict(model._forward_hooks)) == hooks
    assert not hasattr(model, "_lora_graph")
    assert torch.equal(logits(model, ids), base)
    lora_graph.wrap(model).unwrap()  # the unwrapped model can be wrapped again


def _plain_forward_in_use(lm, model, ids):
    with lm.use(["c", None, "b"]):
        return logits(model, ids)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_modules_wrapped_on_first_target_and_restored_with_last(arch, adapter_dirs):
    dirs = adapter_dirs(arch)
    model = tiny_model(arch)
    ids = token_ids(3, 6, seed=10)
    base = logits(model, ids)
    originals = module_map(model)
    attn_names = module_names(model, targets(arch, "attn") + EXTRA_TARGETS.get(arch, []))
    mlp_names = module_names(model, targets(arch, "mlp"))
    a_names = set(attn_names)
    c_names = set(mlp_names)
    assert a_names and c_names and not a_names & c_names

    def wrapped():
        return {n for n, m in model.named_modules() if n in originals and m is not originals[n]}

    lm = lora_graph.wrap(model)
    assert wrapped() == set()
    lm.load_adapter("a", dirs["a"])
    assert wrapped() == a_names
    for name in a_names:
        assert model.get_submodule(name).base_layer is originals[name]
    lm.load_adapter("c", dirs["c"])  # c targets only modules a does not: they are wrapped now
    assert wrapped() == a_names | c_names
    for name in c_names:
        assert model.get_submodule(name).base_layer is originals[name]
    lm.unload_adapter("a")  # the attention modules lose their last adapter
    assert wrapped() == c_names
    for name in a_names:
        assert model.get_submodule(name) is originals[name]

    peft_model = peft_oracle(tiny_model(arch), {"c": dirs["c"], "a": dirs["a"]})
    torch.testing.assert_close(logits(lm, ids, adapters=["c", None, "c"]),
                               peft_logits(peft_model, arch, ["c", "__base__", "c"], ids), atol=ATOL32, rtol=0)
    with pytest.raises(ValueError):
        logits(lm, ids, adapters="a")
    lm.unload_adapter("c")
    assert wrapped() == set()
    assert module_map(model).keys() == originals.keys()
    assert torch.equal(logits(model, ids), base)
    assert torch.equal(logits(lm, ids, adapters=None), base)


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("max_loaded", [None, 2, 1])
def test_adapters_cycling_through_slots_match_peft(arch, max_loaded, adapter_dirs, tmp_path):
    """Unloads and (with max_loaded) evictions free slots that later adapters reuse; every request
    still gives PEFT's logits, so no trace of a slot's previous adapter remains, also in modules the
    new one does not target."""
    dirs = dict(adapter_dirs(arch))
    model = tiny_model(arch)
    dirs["d"] = save_adapter(model, adapter_dir(tmp_path, "d"), seed=21, r=3, lora_alpha=5,
                             target_modules=[targets(arch, "attn")[1], targets(arch, "mlp")[0]])
    ids = token_ids(4, 6, seed=11)
    peft_model = peft_oracle(tiny_model(arch), dirs)
    before = digest(model)
    originals = module_map(model)
    lm = lora_graph.wrap(model, max_loaded=max_loaded)

    def check(names):
        used = {n for n in names if n != "__base__"}
        torch.testing.assert_close(logits(lm, ids, adapters=[None if n == "__base__" else n for n in names]),
                                   peft_logits(peft_model, arch, names, ids), atol=ATOL32, rtol=0,
                                   msg=lambda m: f"{names} (max_loaded={max_loaded}): {m}")
        assert max_loaded is None or len(used) <= max_loaded
        assert digest(model) == before, f"a base parameter or buffer changed after {names}"

    lm.load_adapter("a", dirs["a"])
    lm.load_adapter("b", dirs["b"])
    check(["a", "a", "__base__", "a"])
    check(["b", "b", "b", "__base__"])
    lm.load_adapter("c", dirs["c"])
    check(["c", "__base__", "c", "c"])
    lm.unload_adapter("a")
    lm.load_adapter("d", dirs["d"])
    check(["d", "__base__", "d", "d"])
    check(["b", "__base__", "b", "b"])
    if max_loaded is None or max_loaded >= 2:
        check(["d", "b", "__base__", "d"])
        check(["c", "__base__", "b", "c"])
    lm.load_adapter("a", dirs["a"])
    check(["a", "__base__", "__base__", "a"])
    check(["c", "c", "__base__", "c"])
    assert lm.unwrap() is model
    assert all(module_map(model)[n] is m for n, m in originals.items())
    assert digest(model) == before


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unload_restores_modules_of_evicted_adapters(arch, adapter_dirs):
    """With one device slot, loading c evicts a; once a and c are unloaded, no adapter targets
    any module, so every module is the original object again."""
    dirs = adapter_dirs(arch)
    model = tiny_model(arch)
    ids = token_ids(2, 5, seed=13)
    base = logits(model, ids)
    originals = module_map(model)
    lm = lora_graph.wrap(model, max_loaded=1)
    lm.load_adapter("a", dirs["a"])
    lm.load_adapter("c", dirs["c"])
    logits(lm, ids, adapters="c")
    lm.unload_adapter("a")
    lm.unload_adapter("c")
    changed = sorted(n for n, m in model.named_modules() if n in originals and m is not originals[n])
    assert changed == [], f"still wrapped with no adapter loaded: {changed[:3]}"
    assert module_map(model).keys() == originals.keys()
    assert torch.equal(logits(model, ids), base)


def test_unload_frees_what_the_last_forward_gathered(adapter_dirs):
    """A forward gathers the factors of the adapters it uses and binds its branch to them for the
    next step; unloading one of them drops both at once rather than at the next forward, so the
    memory comes back."""
    dirs = adapter_dirs("llama")
    lm = lora_graph.wrap(tiny_model("llama"))
    lm.load_adapter("a", dirs["a"])
    lm.load_adapter("b", dirs["b"])
    layer = lm.model.model.layers[0].self_attn.q_proj
    probe = LayoutProbe(lm, layer)
    logits(lm, token_ids(4, 1, seed=3), adapters=["a", "b", "b", "a"])
    probe.handle.remove()
    assert probe.bound()[3] is not None
    ((slots, (state, (a, b, *_))),) = lm.router.backend.gathered._entries[(layer, False)].items()  # a set of two slots
    assert len(slots) == 2 and state is layer.bank.state
    gathered = [weakref.ref(a), weakref.ref(b)]
    del a, b, state, probe
    lm.unload_adapter("b")
    gc.collect()
    assert all(ref() is None for ref in gathered), "the gathered factors outlived the unload"


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_use_routes_plain_forward_and_generate(arch, adapter_dirs):
    dirs = adapter_dirs(arch)
    model = tiny_model(arch)
    ids = token_ids(4, 6, seed=12)
    base = logits(model, ids)
    with torch.no_grad():
        base_tokens = model.generate(input_ids=ids, **GEN)
    peft_model = peft_oracle(model, dirs)
    names = ["b", "__base__", "a", "c"]
    expected = peft_logits(peft_model, arch, names, ids)
    expected_a = peft_rows(peft_model, ["a"] * len(names), input_ids=ids)
    expected_tokens = []
    for i, name in enumerate(names):
        if name == "__base__":
            expected_tokens.append(base_tokens[i : i + 1])
            continue
        peft_model.set_adapter(name)
        with torch.no_grad():
            expected_tokens.append(peft_model.generate(input_ids=ids[i : i + 1], **GEN))
    expected_tokens = torch.cat(expected_tokens)
    assert not torch.equal(expected_tokens, base_tokens)

    lm = lora_graph.wrap(model)
    for n, path in dirs.items():
        lm.load_adapter(n, path)
    spec = [None if n == "__base__" else n for n in names]
    with lm.use(spec):
        torch.testing.assert_close(logits(model, ids), expected, atol=ATOL32, rtol=0)
        with torch.no_grad():
            assert torch.equal(model.generate(input_ids=ids, **GEN), expected_tokens)
        with lm.use("a"):  # the innermost block wins, and the outer one is back after it
            torch.testing.assert_close(logits(model, ids), expected_a, atol=ATOL32, rtol=0)
        torch.testing.assert_close(logits(model, ids), expected, atol=ATOL32, rtol=0)
    with lm.use(adapter_names=names):
        torch.testing.assert_close(logits(model, ids), expected, atol=ATOL32, rtol=0)
    assert torch.equal(logits(model, ids), base)  # outside the block: the base model again
    with torch.no_grad():
        assert torch.equal(model.generate(input_ids=ids, **GEN), base_tokens)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_use_routes_a_text_generation_pipeline(arch, adapter_dirs):
    dirs = adapter_dirs(arch)
    model = tiny_model(arch)
    tok = tiny_tokenizer()
    prompt = "t5 t17 t42 t8 t63"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[5, 17, 42, 8, 63]]
    peft_model = peft_oracle(model, dirs)
    expected = {}
    with torch.no_grad():
        expected[None] = model.generate(input_ids=ids, **GEN)[0].tolist()
        for name in ("a", "c"):
            peft_model.set_adapter(name)
            expected[name] = peft_model.generate(input_ids=ids, **GEN)[0].tolist()
    assert expected["a"] != expected[None] or expected["c"] != expected[None]

    lm = lora_graph.wrap(model)
    for n, path in dirs.items():
        lm.load_adapter(n, path)
    pipe = pipeline("text-generation", model=model, tokenizer=tok, device="cpu")

    def run():
        out = pipe(prompt, return_tensors=True, **GEN)
        return out[0]["generated_token_ids"]

    assert run() == expected[None]
    for name in ("a", "c"):
        with lm.use(name):
            assert run() == expected[name], f"pipeline under use({name!r})"
        with lm.use([name]):
            assert run() == expected[name]
    assert run() == expected[None]
