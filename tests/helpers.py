"""Shared test helpers: tiny models from configs, PEFT adapters with non-zero B, digests.

The oracle is PEFT itself. Adapters are made with ``get_peft_model`` and saved with
``save_pretrained``; B is initialised non-zero (``init_lora_weights=False``, then re-drawn), since a
zero B would make every comparison pass trivially.
"""

from __future__ import annotations

import copy
import hashlib
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
