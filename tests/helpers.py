"""Shared test helpers: tiny models from configs, PEFT adapters with non-zero B, digests.

The oracle is PEFT itself. Adapters are made with ``get_peft_model`` and saved with
``save_pretrained``; B is initialised non-zero (``init_lora_weights=False``, then re-drawn), since a
zero B would make every comparison pass trivially.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 96

# arch -> (config factory, model class, attention targets, mlp targets)
ARCHS = {
    "llama": (
        lambda: LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
        LlamaForCausalLM, ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"],
    ),
    "qwen2": (
        lambda: Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            tie_word_embeddings=False),
        Qwen2ForCausalLM, ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"],
    ),
    "gpt2": (
        lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64),
        GPT2LMHeadModel, ["c_attn", "c_proj"], ["c_fc"],
    ),
    "opt": (
        lambda: OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=64, word_embed_proj_dim=32),
        OPTForCausalLM, ["q_proj", "k_proj", "v_proj", "out_proj"], ["fc1", "fc2"],
    ),
    "gemma": (
        lambda: GemmaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64),
        GemmaForCausalLM, ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"],
    ),
}


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A small randomly initialised causal LM in eval mode."""
    make_config, cls, _, _ = ARCHS[arch]
    torch.manual_seed(seed)
    model = cls(make_config()).eval()
    return model.to(dtype)


def targets(arch: str, which: str = "all") -> list[str]:
    _, _, attn, mlp = ARCHS[arch]
    return {"attn": attn, "mlp": mlp, "all": attn + mlp}[which]


def save_adapter(model, path: str, seed: int = 1, b_std: float = 0.1, **lora_kwargs) -> str:
    """Train-free PEFT adapter on a copy of ``model``: random A and non-zero B, saved with save_pretrained.

    ``lora_kwargs`` go to ``LoraConfig`` (r, lora_alpha, target_modules, rank_pattern, lora_bias, ...).
    """
    lora_kwargs.setdefault("r", 4)
    lora_kwargs.setdefault("lora_alpha", 8)
    lora_kwargs.setdefault("init_lora_weights", False)
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model).float(), LoraConfig(**lora_kwargs))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.normal_(0.0, b_std)
            elif "lora_A" in name or "lora_embedding_A" in name:
                param.normal_(0.0, 0.3)
    peft_model.save_pretrained(path)
    return path


def peft_oracle(model, adapters: dict[str, str]):
    """A PeftModel over a deep copy of ``model`` with every adapter of ``adapters`` loaded, in eval mode."""
    names = list(adapters)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(adapters[name], adapter_name=name)
    return peft_model.eval()


def digest(model) -> dict[str, str]:
    """sha256 of every parameter and buffer, keyed by name (bnb quant state included via buffers/params)."""
    out = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        data = tensor.detach().cpu().contiguous().reshape(-1)
        out[name.replace("base_layer.", "")] = hashlib.sha256(
            data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
        ).hexdigest()
    return out


def adapter_dir(tmp_path, name: str) -> str:
    path = os.path.join(str(tmp_path), name)
    os.makedirs(path, exist_ok=True)
    return path


# -- additions: variants of the tiny models and edits of saved adapters ------------------------------


def tiny_model_with(arch: str, seed: int = 0, **config_overrides):
    """Like :func:`tiny_model`, with some config fields changed (another hidden size, more layers, ...)."""
    make_config, cls, _, _ = ARCHS[arch]
    config = make_config()
    for key, value in config_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return cls(config).eval()


def copy_adapter(src: str, dst: str) -> str:
    """A copy of a saved adapter directory, to be edited."""
    import shutil

    shutil.copytree(src, dst)
    return dst


def edit_adapter_config(path: str, **changes) -> str:
    """Rewrite fields of ``path``/adapter_config.json in place (key order kept)."""
    import json

    cfg_path = os.path.join(path, "adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return path


def edit_adapter_tensors(path: str, edit) -> str:
    """Rewrite ``path``/adapter_model.safetensors as ``edit(tensors)`` (a dict of tensors, edited or returned)."""
    from safetensors.torch import load_file, save_file

    st_path = os.path.join(path, "adapter_model.safetensors")
    tensors = load_file(st_path)
    result = edit(tensors)
    save_file(result if result is not None else tensors, st_path)
    return path


def peft_lora_modules(peft_model, adapter: str | None = None) -> set[str]:
    """Names, inside the base model, of the modules where PEFT placed LoRA (for ``adapter`` if given)."""
    found = set()
    for name, module in peft_model.base_model.model.named_modules():
        factors = getattr(module, "lora_A", None) or {}
        emb = getattr(module, "lora_embedding_A", None) or {}
        if (adapter is None and (len(factors) or len(emb))) or (adapter in factors or adapter in emb):
            found.add(name)
    return found


def peft_scales(peft_model, adapter: str) -> dict[str, tuple[int, float]]:
    """``{module name: (rank, scaling)}`` that PEFT resolved for ``adapter``."""
    out = {}
    for name, module in peft_model.base_model.model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and adapter in scaling:
            out[name] = (module.r[adapter], scaling[adapter])
    return out


# --- model-level suites: adapters, oracles and bases shared by test_models/generate/quantized/lifecycle ----

# Modules outside the attention/MLP blocks that an adapter of the arch also targets: qwen2's untied
# lm_head, and gemma's embed_tokens (its embedding multiplies by embed_scale, and PEFT scales the delta too).
EXTRA_TARGETS = {"qwen2": ["lm_head"], "gemma": ["embed_tokens"]}

# Wider configs for bitsandbytes: its CPU 4-bit path needs in_features to be a multiple of the
# 64-wide quantization block and out_features a multiple of 32.
WIDE = {
    "llama": dict(hidden_size=64, intermediate_size=128, head_dim=16),
    "qwen2": dict(hidden_size=64, intermediate_size=128, head_dim=16),
    "gemma": dict(hidden_size=64, intermediate_size=128, head_dim=16),
    "opt": dict(hidden_size=64, ffn_dim=128, word_embed_proj_dim=64),
    "gpt2": dict(n_embd=64),
}


def make_adapters(model, arch: str, root, exact_scales: bool = False) -> dict[str, str]:
    """Three PEFT adapters for ``model`` with different ranks, scales and target sets.

    a: r=4 on attention (+ EXTRA_TARGETS), with rank_pattern and alpha_pattern keys that overlap,
       so that the first matching key in dict order must win;
    b: r=8 on attention and MLP, rsLoRA;
    c: r=2 on the MLP, with a lora_B bias.

    ``exact_scales`` keeps the same structure (patterns, rsLoRA, bias) with every scale a power of
    two (a: 2, 0.5, 4 and 8 across its modules, b: r=16 rsLoRA 8/4, c: 2). Scaling by a power of two
    rounds nowhere, so applying it before or after B gives the same bits: this removes the one
    legitimate fp32 rounding difference with PEFT, which LLM.int8's activation quantization would
    otherwise amplify into ~1e-3 logit differences.
    """
    attn, mlp = targets(arch, "attn"), targets(arch, "mlp")
    if exact_scales:
        a_patterns = dict(rank_pattern={attn[0]: 8, f"{attn[0]}|{attn[1]}": 2},
                          alpha_pattern={attn[0]: 4, f"{attn[0]}|{attn[-1]}": 16})
        b_rank = dict(r=16, lora_alpha=8)
    else:
        a_patterns = dict(rank_pattern={attn[0]: 6, f"{attn[0]}|{attn[1]}": 5},
                          alpha_pattern={attn[-1]: 3, f"{attn[0]}|{attn[-1]}": 12})
        b_rank = dict(r=8, lora_alpha=16)
    return {
        "a": save_adapter(model, adapter_dir(root, "a"), seed=11, r=4, lora_alpha=8,
                          target_modules=attn + EXTRA_TARGETS.get(arch, []), **a_patterns),
        "b": save_adapter(model, adapter_dir(root, "b"), seed=12, target_modules=attn + mlp, use_rslora=True,
                          **b_rank),
        "c": save_adapter(model, adapter_dir(root, "c"), seed=13, r=2, lora_alpha=4,
                          target_modules=mlp, lora_bias=True),
    }


def token_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Random prompt ids that avoid the special ids 0..2 (pad / eos / bos in the tiny configs)."""
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def peft_rows(peft_model, names: list[str], **inputs) -> torch.Tensor:
    """Per-row PEFT logits without PEFT's mixed-batch path: the whole batch runs once per distinct
    name (``set_adapter``, or ``disable_adapter()`` for "__base__"), and row i is taken from the run
    of ``names[i]``. Works for models that flatten tokens (OPT), where ``adapter_names`` raises."""
    out = None
    for name in dict.fromkeys(names):
        if name == "__base__":
            with peft_model.disable_adapter():
                logits = peft_model(**inputs).logits
        else:
            peft_model.set_adapter(name)
            logits = peft_model(**inputs).logits
        if out is None:
            out = torch.empty_like(logits)
        for i, row_name in enumerate(names):
            if row_name == name:
                out[i] = logits[i]
    return out


_LORA_SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))


def merged_copy(model, adapters: dict[str, str], weights: dict[str, float]):
    """An fp32 copy of ``model`` with ``W + Σ w·s·B·A`` (and ``b + Σ w·s·b_B``) merged in, computed
    from the saved safetensors and adapter_config.json alone.

    Each merged module gets fresh parameters, so a weight tied to another module (gemma's
    embed_tokens and lm_head) is untied rather than changed in both places.
    """
    import json

    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file
    from transformers.pytorch_utils import Conv1D

    merged = copy.deepcopy(model).float()
    deltas: dict[str, list] = {}
    for name, weight in weights.items():
        with open(os.path.join(adapters[name], "adapter_config.json")) as f:
            config = json.load(f)
        tensors = load_file(os.path.join(adapters[name], "adapter_model.safetensors"))
        for key, a in tensors.items():
            for a_suffix, b_suffix in _LORA_SUFFIXES:
                if key.endswith(a_suffix):
                    module = key[len("base_model.model."):-len(a_suffix)]
                    stem = key[:-len(a_suffix)]
                    b = tensors[stem + b_suffix]
                    bias = tensors.get(stem + ".lora_B.bias")
                    break
            else:
                continue
            r = config["rank_pattern"].get(get_pattern_key(config["rank_pattern"].keys(), module), config["r"])
            alpha = config["alpha_pattern"].get(get_pattern_key(config["alpha_pattern"].keys(), module),
                                                config["lora_alpha"])
            assert a.shape[0] == r, (module, a.shape, r)
            scale = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
            delta = weight * scale * (b.double() @ a.double())  # (N, K)
            dbias = weight * scale * bias.double() if bias is not None else None
            deltas.setdefault(module, []).append((delta, dbias))
    for module_name, parts in deltas.items():
        module = merged.get_submodule(module_name)
        delta = sum(d for d, _ in parts)
        if isinstance(module, torch.nn.Embedding) or isinstance(module, Conv1D):
            delta = delta.T  # Embedding (vocab, dim) and Conv1D (in, out) store W transposed
        module.weight = torch.nn.Parameter((module.weight.double() + delta).float(), requires_grad=False)
        biases = [db for _, db in parts if db is not None]
        if biases:
            old = module.bias.double() if module.bias is not None else 0.0
            module.bias = torch.nn.Parameter((old + sum(biases)).float(), requires_grad=False)
    return merged.eval()


def wide_model(arch: str, seed: int = 0):
    """The arch's tiny model at the WIDE sizes, fp32, eval mode."""
    make_config, cls, _, _ = ARCHS[arch]
    config = make_config()
    config = type(config)(**{**config.to_dict(), **WIDE[arch]})
    torch.manual_seed(seed)
    return cls(config).eval()


def quantized_model(model, kind: str, root):
    """``model`` saved to ``root`` (once per root) and reloaded by transformers with bitsandbytes on CPU.

    kind: "nf4" (Linear4bit, fp32 compute), "int8" (Linear8bitLt with the default LLM.int8 outlier
    threshold 6.0, which picks outlier columns over the whole batch, so rows are not computed
    independently), or "int8-t0" (threshold 0: pure int8, rows independent).
    lm_head stays unquantized, as transformers does by default.
    """
    from transformers import BitsAndBytesConfig

    path = os.path.join(str(root), "base")
    if not os.path.isdir(path):
        model.save_pretrained(path)
    configs = {
        "nf4": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32),
        "int8": lambda: BitsAndBytesConfig(load_in_8bit=True),
        "int8-t0": lambda: BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0),
    }
    return type(model).from_pretrained(path, quantization_config=configs[kind](), device_map="cpu",
                                       dtype=torch.float32).eval()


def tiny_tokenizer():
    """A word-level fast tokenizer over the tiny vocabulary, built offline: "t3 t17" -> [3, 17]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def module_map(model) -> dict[str, torch.nn.Module]:
    """Every named submodule of ``model`` (the module objects themselves, for identity checks)."""
    return dict(model.named_modules())


def assert_original_modules(model, modules: dict[str, torch.nn.Module]) -> None:
    """``model`` holds exactly the module objects of an earlier :func:`module_map`."""
    after = module_map(model)
    assert after.keys() == modules.keys()
    for name, module in modules.items():
        assert after[name] is module, f"{name} is not the original module object"


class LayoutProbe:
    """Records the routing layout each forward of ``layer`` reads (through the wrapper's router),
    so a test can look at the grid or the bound branch that forward used."""

    def __init__(self, lm, layer) -> None:
        self.layer = layer
        self.seen = []
        self.handle = layer.register_forward_pre_hook(lambda m, args: self.seen.append(lm.router.current(args[0])))

    @property
    def last(self):
        return self.seen[-1]

    def bound(self):
        """The last forward's ``(state, shape, device, (pre, post) | None)`` entry for the layer."""
        return self.last._branches.get(self.layer)


# -- serving: the shipped demo behind a real server ----------------------------------------------

DEMO_ID = "lora-graph-demo"


def demo_lm(**wrap_kwargs):
    """The shipped demo model, wrapped, with its four adapters registered."""
    from transformers import AutoModelForCausalLM

    import lora_graph
    from lora_graph import demo

    model = AutoModelForCausalLM.from_pretrained(demo.base_path(), dtype=torch.float32).eval()
    lm = lora_graph.wrap(model, **wrap_kwargs)
    lm.register_adapters(demo.adapter_paths())
    return lm


@contextlib.contextmanager
def serving(lm, tokenizer, **app_kwargs):
    """``(base_url, app)`` of a real server (uvicorn, 127.0.0.1, a free port, in a thread); stopped on exit."""
    import socket
    import threading
    import time

    import uvicorn

    from lora_graph.serve.app import create_app

    app = create_app(lm, tokenizer, DEMO_ID, **app_kwargs)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the server did not stop"


MAGNITUDE = ".lora_magnitude_vector"


def save_dora(model, path: str, seed: int, **lora_kwargs) -> str:
    """A PEFT DoRA adapter with non-zero B (:func:`save_adapter`) whose magnitudes are then scaled
    per channel by U(0.5, 1.5), so that g is far from 1."""
    save_adapter(model, path, seed=seed, use_dora=True, **lora_kwargs)
    gen = torch.Generator().manual_seed(seed)

    def scale(tensors):
        for key in sorted(tensors):
            if key.endswith(MAGNITUDE):
                tensors[key] = tensors[key] * (0.5 + torch.rand(tensors[key].shape, generator=gen))

    return edit_adapter_tensors(path, scale)
