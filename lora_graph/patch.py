"""Finding and swapping the modules that carry LoRA: by type plus name, never per architecture.

A module is patchable when it is an ``nn.Linear`` (which bitsandbytes' Linear4bit and Linear8bitLt
are), a transformers ``Conv1D`` (GPT-2), or an ``nn.Embedding``. Which of them get wrapped is
decided by the adapters' configs; this module only knows how to describe, replace and restore them.
This is the one place in the library that knows about transformers.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import ModuleShape
from .layers import LoraEmbedding, LoraLinear, _LoraModule

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()


def shape_of(module: nn.Module) -> ModuleShape | None:
    """in/out features of a patchable module, or None when the type is not supported."""
    if isinstance(module, nn.Linear):
        return ModuleShape("linear", module.in_features, module.out_features)
    if Conv1D and isinstance(module, Conv1D):
        nx, nf = module.weight.shape  # Conv1D stores (in, out)
        return ModuleShape("linear", nx, nf)
    if isinstance(module, nn.Embedding):
        return ModuleShape("embedding", module.num_embeddings, module.embedding_dim)
    return None


def patchable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every supported module by its name inside ``model``; a wrapped one is given by its base."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, _LoraModule):
            found[name] = module.base_layer
        elif shape_of(module) is not None and not name.endswith(".base_layer") and name:
            found[name] = module
    return found


def plain_weight(module: nn.Module | None) -> torch.Tensor | None:
    """The unquantized weight of an Embedding or Linear, in PEFT's (out, in) / (vocab, dim) layout."""
    if isinstance(module, (nn.Embedding, nn.Linear)) and type(module.weight) in (torch.Tensor, nn.Parameter):
        return module.weight
    return None


def module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def make_wrapper(base: nn.Module, bank, router, backend: str) -> _LoraModule:
    cls = LoraEmbedding if isinstance(base, nn.Embedding) else LoraLinear
    return cls(base, bank, router, backend)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def is_peft_model(model: nn.Module) -> bool:
    """True when PEFT has already injected its own LoRA layers into ``model``."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def batch_shape_of(args: tuple, kwargs: dict) -> tuple[int | None, int | None]:
    """``(rows, positions)`` of a top-level HF forward call, from input_ids / inputs_embeds / the
    first tensor; ``positions`` is None when the input has no sequence dimension."""
    for key in ("input_ids", "inputs_embeds", "decoder_input_ids", "pixel_values"):
        value = kwargs.get(key)
        if torch.is_tensor(value) and value.dim() >= 2:
            return value.shape[0], (value.shape[1] if key != "pixel_values" else None)
    for value in args:
        if torch.is_tensor(value) and value.dim() >= 2:
            return value.shape[0], value.shape[1] if not value.is_floating_point() or value.dim() == 3 else None
    return None, None
