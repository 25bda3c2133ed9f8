"""DoRA adapters (``use_dora=True``) against PEFT, per row, on both backends.

PEFT computes a DoRA module as ``base(x) + (g − 1)⊙(base(x) − bias) + g⊙s·B(Ax)`` with
``g = m / ‖W + s·B·A‖`` per output row (peft/tuners/lora/dora.py), one adapter at a time: its
mixed-batch forward refuses DoRA. So the oracle for mixed batches is PEFT's output for each
adapter on the whole batch (``peft_rows``), row by row. Weighted sets have no PEFT forward; their
oracle (``formula_logits``) is written here from the formula the README gives,
``Σ w·[(g − 1)⊙(base(x) − bias) + g⊙s·B(Ax)]``, as forward hooks on a copy of the model that
compute every module in fp64 from the saved files, with ``g`` from the whole ``W + s·B·A``.

The adapters' A and B are redrawn after PEFT computed ``m`` from its own init, and ``m`` is then
scaled by U(0.5, 1.5) per channel, so ``g`` is far from 1: every check first asserts that DoRA moves
the logits away from the same factors read as plain LoRA by far more than the tolerance.
"""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from helpers import (
    MAGNITUDE,
    adapter_dir,
    assert_original_modules,
    copy_adapter,
    digest,
    edit_adapter_config,
    edit_adapter_tensors,
    module_map,
    peft_oracle,
    peft_rows,
    quantized_model,
    save_adapter,
    save_dora,
    targets,
    tiny_model,
    token_ids,
    wide_model,
)

import lora_graph

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ATOL32 = 1e-5
ATOL_BNB = 2e-3  # tests/test_quantized.py's tolerance
BACKENDS = ["torch", "triton"]


def as_lora(path: str, dst: str) -> str:
    """The same factors without DoRA: what the adapter would give if g were ignored."""
    copy_adapter(path, dst)
    edit_adapter_config(dst, use_dora=False)
    return edit_adapter_tensors(dst, lambda t: {k: v for k, v in t.items() if not k.endswith(MAGNITUDE)})


def make_dora_adapters(model, arch: str, root) -> dict[str, str]:
    """d1: DoRA r=4 on every linear module; d2: DoRA r=8, rsLoRA, rank and alpha patterns on attention;
    c: plain LoRA r=2 with a lora_B bias on the MLP; d1_lora: d1's factors read as LoRA."""
    attn, mlp = targets(arch, "attn"), targets(arch, "mlp")
    dirs = {
        "d1": save_dora(model, adapter_dir(root, "d1"), seed=21, r=4, lora_alpha=8, target_modules=attn + mlp),
        "d2": save_dora(model, adapter_dir(root, "d2"), seed=22, r=8, lora_alpha=6, use_rslora=True,
                        target_modules=attn, rank_pattern={attn[0]: 3, f"{attn[0]}|{attn[-1]}": 5},
                        alpha_pattern={attn[-1]: 2, f"{attn[0]}|{attn[-1]}": 12}),
        "c": save_adapter(model, adapter_dir(root, "c"), seed=23, r=2, lora_alpha=4, target_modules=mlp,
                          lora_bias=True),
    }
    dirs["d1_lora"] = as_lora(dirs["d1"], os.path.join(str(root), "d1_lora"))
    return dirs


@pytest.fixture(scope="module")
def dora_dirs(tmp_path_factory):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = make_dora_adapters(tiny_model(arch), arch, tmp_path_factory.mktemp(f"dora-{arch}"))
        return cache[arch]

    return get


def wrapped(model, dirs, backend, names=None, **kwargs):
    lm = lora_graph.wrap(copy.deepcopy(model), backend=backend, **kwargs)
    for name in names or dirs:
        lm.load_adapter(name, dirs[name])
    return lm


def assert_dora_matters(dora, lora, names, margin):
    """Rows of a DoRA adapter differ from the same factors read as LoRA by more than ``margin``."""
    for i, name in enumerate(names):
        if name.startswith("d"):
            assert (dora[i] - lora[i]).abs().max() > margin, f"g barely changes row {i} ({name})"


# -- against PEFT ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["d1", "d2"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_single_dora_adapter_matches_peft(arch, name, backend, dora_dirs):
    """d1: every linear module (GPT-2: Conv1D with biases); d2: rsLoRA with rank and alpha patterns."""
    dirs = dora_dirs(arch)
    model = tiny_model(arch)
    ids = token_ids(3, 7, seed=5)
    peft_model = peft_oracle(model, {name: dirs[name], "d1_lora": dirs["d1_lora"]})
    with torch.no_grad():
        peft_model.set_adapter(name)
        expected = peft_model(input_ids=ids).logits
        peft_model.set_adapter("d1_lora")
        as_lora_logits = peft_model(input_ids=ids).logits
    if name == "d1":
        assert_dora_matters(expected, as_lora_logits, [name] * 3, 100 * ATOL32)

    lm = wrapped(model, dirs, backend)
    assert lm.adapters[name].use_dora
    with torch.no_grad():
        for spec in (name, [name] * 3, {name: 1.0}):
            got = lm(input_ids=ids, adapters=spec).logits
            torch.testing.assert_close(got, expected, atol=ATOL32, rtol=0, msg=lambda m: f"{spec}: {m}")


MIXED = ["d1", "__base__", "c", "d2", "d1", "c", "__base__", "d2"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length", [7, 1], ids=["prompt", "decode"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_batch_matches_peft_per_adapter(arch, length, backend, dora_dirs):
    """Two DoRA adapters, a LoRA adapter and base rows in one batch: each row equals PEFT's output
    for its own adapter. Each batch runs twice (the second forward reuses the bound branch); one-token
    rows take the decode paths (rows grouped back by a gather, or a strided view)."""
    dirs = dora_dirs(arch)
    model = tiny_model(arch)
    peft_model = peft_oracle(model, {n: dirs[n] for n in ("d1", "d2", "c", "d1_lora")})
    lm = wrapped(model, dirs, backend)
    for names in (MIXED, ["d1", "d2", "c", "d1", "d2", "c"]):
        ids = token_ids(len(names), length, seed=6)
        expected = peft_rows(peft_model, names, input_ids=ids)
        lora_rows = peft_rows(peft_model, [n.replace("d1", "d1_lora") for n in names], input_ids=ids)
        assert_dora_matters(expected, lora_rows, [n if n == "d1" else "-" for n in names], 100 * ATOL32)
        spec = [None if n == "__base__" else n for n in names]
        with torch.no_grad():
            base = model(input_ids=ids).logits
            for _ in range(2):
                got = lm(input_ids=ids, adapters=spec).logits
                torch.testing.assert_close(got, expected, atol=ATOL32, rtol=0)
        for i, n in enumerate(names):
            if n == "__base__":
                assert torch.equal(got[i], base[i]), f"base row {i} differs from the base model"


def ulp16(x: torch.Tensor, dtype: torch.dtype) -> float:
    """One unit in the last place of ``dtype`` at the magnitude of ``x``."""
    mantissa = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    return 2.0 ** (math.floor(math.log2(x.abs().max().item())) - mantissa)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_16bit_base_matches_peft(arch, dtype, backend, dora_dirs):
    """A bf16 or fp16 base with fp32 adapters: g from the weight upcast to fp32, as PEFT computes it.
    Per row within 8 ulps of PEFT's own 16-bit output (every layer rounds its output, and the
    differences grow through the layers), and no further from an fp32 run of the same 16-bit
    weights than twice PEFT's error plus one ulp (test_models.py's bf16 rule)."""
    dirs = {n: dora_dirs(arch)[n] for n in ("d1", "d2", "c")}
    model = tiny_model(arch, dtype=dtype)
    names = ["d1", "__base__", "d2", "c", "d1"]
    ids = token_ids(len(names), 6, seed=13)
    expected = peft_rows(peft_oracle(model, dirs), names, input_ids=ids)
    ref32 = peft_rows(peft_oracle(copy.deepcopy(model).float(), dirs), names, input_ids=ids)
    lm = wrapped(model, dirs, backend)
    with torch.no_grad():
        got = lm(input_ids=ids, adapters=[None if n == "__base__" else n for n in names]).logits
    assert got.dtype == dtype
    for i, name in enumerate(names):
        ulp = ulp16(ref32[i], dtype)
        torch.testing.assert_close(got[i].float(), expected[i].float(), atol=8 * ulp, rtol=0,
                                   msg=lambda m: f"row {i} ({name}): {m}")
        ours, theirs = (got[i].float() - ref32[i]).abs().max(), (expected[i].float() - ref32[i]).abs().max()
        assert ours <= 2 * theirs + ulp, f"row {i} ({name}): {ours:.3g} from fp32 > 2 x PEFT's {theirs:.3g} + 1 ulp"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_dora_on_embeddings_matches_peft(arch, backend, tmp_path):
    """DoRA on embed_tokens (gemma: times its embed_scale) next to DoRA on attention."""
    model = tiny_model(arch)
    dirs = {
        "e": save_dora(model, adapter_dir(tmp_path, "e"), seed=31, r=4, lora_alpha=8,
                       target_modules=["embed_tokens", "q_proj", "v_proj"]),
        "f": save_dora(model, adapter_dir(tmp_path, "f"), seed=32, r=2, lora_alpha=8, target_modules=["embed_tokens"]),
    }
    dirs["f_lora"] = as_lora(dirs["f"], os.path.join(str(tmp_path), "f_lora"))
    names = ["e", "__base__", "f", "e"]
    ids = token_ids(len(names), 6, seed=7)
    peft_model = peft_oracle(model, dirs)
    expected = peft_rows(peft_model, names, input_ids=ids)
    lora_rows = peft_rows(peft_model, ["f_lora"] * len(names), input_ids=ids)
    assert (expected[2] - lora_rows[2]).abs().max() > 100 * ATOL32  # g matters on the embedding alone
    lm = wrapped(model, dirs, backend, names=["e", "f"])
    with torch.no_grad():
        got = lm(input_ids=ids, adapters=[None if n == "__base__" else n for n in names]).logits
    torch.testing.assert_close(got, expected, atol=ATOL32, rtol=0)


def no_cpu_repacking(model):
    """Keep bitsandbytes from repacking 4-bit weights for its AVX512-BF16 CPU kernel at the first
    forward. That layout (block scales rounded to bf16) is one PEFT's ``dequantize_module_weight``
    misreads, so PEFT's DoRA norm would come from scrambled weights; the oracle runs without it."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.support_avx512bf16_for_cpu = False
    return model


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["nf4", "int8-t0"])
def test_dora_over_quantized_base(kind, backend, tmp_path):
    """g over the dequantized weight (as PEFT's dequantize_module_weight reads it), base output from
    the bnb layer itself; the base stays byte-identical through load, forward and unwrap. nf4 is
    checked against PEFT. PEFT's DoRA over LLM.int8 on CPU breaks its own layer (moving the weight
    back to the CPU after dequantizing drops its scales), so int8 is checked against the formula."""
    fp32 = wide_model("llama")
    dirs = make_dora_adapters(fp32, "llama", tmp_path)
    model = quantized_model(fp32, kind, tmp_path)
    assert {"nf4": "Linear4bit", "int8-t0": "Linear8bitLt"}[kind] in {type(m).__name__ for m in model.modules()}
    names = ["d1", "c", "__base__", "d2", "d1"]
    ids = token_ids(len(names), 5, seed=8)
    if kind == "nf4":
        peft_model = peft_oracle(no_cpu_repacking(model), {n: dirs[n] for n in ("d1", "d2", "c", "d1_lora")})
        expected = peft_rows(peft_model, names, input_ids=ids)
        lora_rows = peft_rows(peft_model, [n.replace("d1", "d1_lora") for n in names], input_ids=ids)
    else:
        rows = [{} if n == "__base__" else {n: 1.0} for n in names]
        expected = formula_logits(model, dirs, rows, ids)
        lora_rows = formula_logits(model, dirs, [{"d1_lora": 1.0} if r == {"d1": 1.0} else r for r in rows], ids)
    assert_dora_matters(expected, lora_rows, [n if n == "d1" else "-" for n in names], 20 * ATOL_BNB)

    before, modules = digest(model), module_map(model)
    lm = lora_graph.wrap(model, backend=backend)
    for n in ("d1", "d2", "c"):
        lm.load_adapter(n, dirs[n])
    with torch.no_grad():
        got = lm(input_ids=ids, adapters=[None if n == "__base__" else n for n in names]).logits
    torch.testing.assert_close(got, expected, atol=ATOL_BNB, rtol=0)
    assert digest(model) == before
    lm.unwrap()
    assert_original_modules(model, modules)
    assert digest(model) == before


def test_repacked_4bit_weight_is_read_as_the_weights_it_holds(tmp_path):
    """After a forward on an AVX512-BF16 CPU, bitsandbytes holds a 4-bit weight in its CPU layout
    (scales rounded to bf16). DoRA's norm then reads the same weights as before, to that rounding,
    where a plain ``dequantize_4bit`` (what PEFT calls) would scramble them; the layer keeps its
    bytes and its layout."""
    import bitsandbytes.functional as bnbf

    from lora_graph import patch

    model = quantized_model(wide_model("llama"), "nf4", tmp_path)
    layer = model.model.layers[0].mlp.down_proj
    n = layer.out_features
    before = patch.weight_rows(layer)(0, n)
    with torch.no_grad():
        model(input_ids=token_ids(1, 3))
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes keeps its layout")
    kept = digest(layer)
    after = torch.cat([patch.weight_rows(layer)(i, min(i + 7, n)) for i in range(0, n, 7)])
    scale = before.abs().max()
    assert (after - before).abs().max() <= 4e-3 * scale  # bf16 rounding of the block scales
    assert (bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float() - before).abs().max() > 0.1 * scale
    assert digest(layer) == kept and layer.weight.quant_state.packing_format_for_cpu


# -- weighted sets: an oracle from the formula ------------------------------------------------------------


def _adapter_modules(model, path: str) -> dict[str, dict]:
    """Per module of a saved adapter: A, B, bias, scale and (DoRA) g, in fp64, from the files alone."""
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    with open(os.path.join(path, "adapter_config.json")) as f:
        config = json.load(f)
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    out = {}
    for key in tensors:
        for a_suffix, b_suffix in ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")):
            if key.endswith(a_suffix):
                stem = key[: -len(a_suffix)]
                name = stem[len("base_model.model."):]
                break
        else:
            continue
        a, b = tensors[key].double(), tensors[stem + b_suffix].double()
        r = config["rank_pattern"].get(get_pattern_key(config["rank_pattern"].keys(), name), config["r"])
        alpha = config["alpha_pattern"].get(get_pattern_key(config["alpha_pattern"].keys(), name), config["lora_alpha"])
        scale = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
        bias = tensors.get(stem + ".lora_B.bias")
        g = None
        if config.get("use_dora"):
            weight = _dense_weight(model.get_submodule(name))
            g = tensors[stem + MAGNITUDE].double() / (weight + scale * b @ a).norm(dim=1)
        out[name] = dict(a=a, b=b, scale=scale, g=g, bias=None if bias is None else bias.double(),
                         embedding=a_suffix == ".lora_embedding_A")
    return out


def _dense_weight(module) -> torch.Tensor:
    """The module's weight as ``(out, in)`` fp64: LLM.int8 dequantized as int8 · SCB / 127."""
    if type(module.weight).__name__ == "Int8Params":
        scb = module.weight.SCB if module.weight.SCB is not None else module.state.SCB  # (N,)
        return module.weight.data.double() * scb.double()[:, None] / 127
    weight = module.weight.detach().double()
    return weight if isinstance(module, torch.nn.Linear) else weight.T  # Conv1D, Embedding: (in, out)


def formula_logits(model, dirs: dict[str, str], rows: list[dict[str, float]], ids) -> torch.Tensor:
    """Logits of ``model`` where every patched module of row ``i`` adds, over ``rows[i]``'s adapters,
    ``w·[(g − 1)⊙(base(x) − bias) + g⊙s·(B(Ax) + b)]`` (``g = 1`` for LoRA; an embedding gathers A
    and multiplies by its ``embed_scale``), in fp64. The hooks are removed again."""
    loras = {n: _adapter_modules(model, p) for n, p in dirs.items()}

    def hook(name):
        def add(module, args, out):
            x = args[0]
            delta = torch.zeros(out.shape, dtype=torch.float64)
            nobias = out.double() - (module.bias.double() if getattr(module, "bias", None) is not None else 0.0)
            for i, weights in enumerate(rows):
                for adapter, w in weights.items():
                    m = loras[adapter].get(name)
                    if m is None:
                        continue
                    if m["embedding"]:
                        y = m["a"][:, x[i]].T @ m["b"].T * float(getattr(module, "embed_scale", 1.0))  # (L, N)
                    else:
                        y = x[i].double() @ m["a"].T @ m["b"].T + (0.0 if m["bias"] is None else m["bias"])
                    y = m["scale"] * y
                    delta[i] += w * (y if m["g"] is None else (m["g"] - 1) * nobias[i] + m["g"] * y)
            return (out.double() + delta).to(out.dtype)

        return add

    names = {n for modules in loras.values() for n in modules}
    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        for handle in handles:
            handle.remove()


WEIGHTED = [{"d1": 0.7, "d2": -1.3}, {}, {"d2": 0.5, "c": 2.0}, {"d1": 1.0}, {"d1": -0.25, "d2": 1.5, "c": -1.0}]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_weighted_sets_match_the_formula(arch, backend, dora_dirs):
    """Weighted sets of two DoRA adapters (and with a LoRA adapter) equal the formula's oracle; the
    oracle itself equals PEFT on the row with one DoRA adapter at weight 1."""
    dirs = {n: dora_dirs(arch)[n] for n in ("d1", "d2", "c")}
    model = tiny_model(arch)
    ids = token_ids(len(WEIGHTED), 6, seed=9)
    expected = formula_logits(model, dirs, WEIGHTED, ids)
    peft_model = peft_oracle(model, {"d1": dirs["d1"]})
    with torch.no_grad():
        torch.testing.assert_close(expected[3], peft_model(input_ids=ids).logits[3], atol=ATOL32, rtol=0)
        base = model(input_ids=ids).logits
    single = formula_logits(model, dirs, [{"d1": 0.7}] * len(WEIGHTED), ids)
    assert (expected[0] - single[0]).abs().max() > 100 * ATOL32  # d2 really contributes to row 0
    lm = wrapped(model, dirs, backend)
    with torch.no_grad():
        got = lm(input_ids=ids, adapters=[w or None for w in WEIGHTED]).logits
    torch.testing.assert_close(got, expected, atol=ATOL32, rtol=0)
    assert torch.equal(got[1], base[1])


# -- lifecycle: paging, replace, slot reuse, compile --------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_paging_replace_and_slot_reuse_keep_dora_exact(backend, dora_dirs):
    """With two slots, DoRA and LoRA adapters page in and out of the same slots, are replaced in
    place (DoRA by LoRA and back), and reloaded into slots another kind held: every output equals
    a fresh wrapper's with only that adapter loaded, and the base stays byte-identical."""
    dirs = dora_dirs("llama")
    model = tiny_model("llama")
    ids = token_ids(3, 5, seed=10)
    want = {}
    for name in ("d1", "d2", "c", "d1_lora"):
        with torch.no_grad():
            want[name] = wrapped(model, dirs, "torch", names=[name])(input_ids=ids, adapters=name).logits
    pristine, modules = digest(model), module_map(model)
    lm = lora_graph.wrap(model, backend=backend, max_loaded=2)
    lm.register_adapters({n: dirs[n] for n in ("d1", "d2", "c")})

    def check(name, as_name=None):
        with torch.no_grad():
            got = lm(input_ids=ids, adapters=as_name or name).logits
        torch.testing.assert_close(got, want[name], atol=ATOL32, rtol=0, msg=lambda m: f"{name}: {m}")

    for name in ("d1", "d2", "c", "d1", "c", "d2", "d1"):  # each page-in evicts one of the other two
        check(name)
    assert len(lm.resident) == 2
    lm.load_adapter("d1", dirs["c"], replace=True)  # DoRA replaced by LoRA under the same name
    check("c", "d1")
    lm.load_adapter("d1", dirs["d2"], replace=True)  # and by another DoRA adapter
    check("d2", "d1")
    lm.unload_adapter("d1")
    lm.load_adapter("x", dirs["d1_lora"])  # a LoRA adapter into a slot a DoRA adapter held
    check("d1_lora", "x")
    lm.load_adapter("y", dirs["d1"])
    check("d1", "y")
    assert digest(model) == pristine
    lm.unwrap()
    assert_original_modules(model, modules)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_model_does_not_recompile_with_dora_resident(backend, dora_dirs):
    """DoRA slots are runtime data like LoRA's: once a bank holds one, switching SPECs and paging
    DoRA and LoRA adapters in and out recompiles nothing, and every output is the eager one (the
    triton backend's layers are traced into the graph; the torch backend's branch stays outside)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    dirs = dora_dirs("llama")
    pristine = tiny_model("llama")
    model = copy.deepcopy(pristine)
    lm = lora_graph.wrap(model, backend=backend, max_loaded=2, max_rank=16)
    lm.register_adapters({n: dirs[n] for n in ("d1", "d2", "c", "d1_lora")})
    lm.load_adapter("d1")
    lm.load_adapter("c")
    fresh = wrapped(pristine, dirs, "torch", names=["d1", "d2", "c", "d1_lora"])
    ids = token_ids(3, 5, seed=11)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)

    def check(spec):
        with lm.use(spec), torch.no_grad():
            got, eager = compiled(input_ids=ids).logits, model(input_ids=ids).logits
            want = fresh(input_ids=ids, adapters=spec).logits
        assert torch.equal(got, eager), spec
        torch.testing.assert_close(got, want, atol=ATOL32, rtol=0)

    for spec in (["d1", "c", None], [{"d1": 0.5, "c": -1.0}, "d1", None], None):  # one graph per kind
        check(spec)
    frames = counter.frame_count
    traced = sum(str(n.target) == "lora_graph.lora_delta_.default" for g in counter.graphs for n in g.graph.nodes)
    assert (traced > 0) == (backend == "triton")  # the DoRA banks' layers are in the graph as the kernel op
    with torch._dynamo.config.patch(error_on_recompile=True):
        for spec in ("d1", ["c", None, "d1"], ["d2", "d2", None], [{"d2": 0.5, "d1": -1.0}, None, "d1"],
                     ["d1_lora", "d2", "d1_lora"], "c", [{"c": 2.0, "d2": 1.0}, "d2", None]):
            check(spec)  # d2 and d1_lora page in, evicting the others
    assert counter.frame_count == frames


# -- load-time norms ----------------------------------------------------------------------------------


def test_norms_are_computed_in_bounded_row_chunks(monkeypatch):
    """``dora_scale`` reads the base weight a few rows at a time, never more than ``_NORM_CHUNK``
    elements at once, and gives PEFT's ``m / ‖W + s·B·A‖`` computed on the whole matrix."""
    from lora_graph import adapters

    monkeypatch.setattr(adapters, "_NORM_CHUNK", 1000)
    gen = torch.Generator().manual_seed(0)
    n, k, r = 301, 129, 5
    weight, a, b = torch.randn(n, k, generator=gen), torch.randn(r, k, generator=gen), torch.randn(n, r, generator=gen)
    magnitude = torch.rand(n, generator=gen) + 0.5
    kept = weight.clone()
    reads = []

    def rows(start, stop):
        reads.append(stop - start)
        return weight[start:stop].clone()

    got = adapters.dora_scale(adapters.ModuleLora(a, b, None, r, 0.75), magnitude, rows)
    assert max(reads) * k <= 1000 and sum(reads) == n and len(reads) > 30
    want = magnitude.double() / (weight.double() + 0.75 * b.double() @ a.double()).norm(dim=1)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    assert got.dtype == torch.float32 and torch.equal(weight, kept)
