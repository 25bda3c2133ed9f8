"""Patched modules: the untouched base module plus the LoRA branch of whatever the forward routes.

    LoraLinear.forward(x)    = base(x) + Σ_lanes w·s·(B(A x) + b)     nn.Linear, bnb Linear4bit/8bitLt, Conv1D
    LoraEmbedding.forward(i) = base(i) + Σ_lanes w·s·B(A[:, i]) · embed_scale

The base module is called as a black box, so every quantization format works the same way. The
wrapper keeps the base's parameter names in ``state_dict`` (no ``base_layer.`` infix), and forwards
unknown attributes (``weight``, ``embed_scale``, ...) to it, so model code that reaches into the
module keeps working.

A layer reads its forward's layout from the router (routing.py) and asks it for its branch, a
``(pre, post)`` pair bound to this layer's bank state and input shape (backends/): ``pre`` runs on
the input before the base layer, ``post`` adds the branch into the base output. Under torch.compile
the layer hands the base output to the backend's traced path instead (backends/triton.py traces the
kernel op into the graph; the torch backend keeps its branch outside it).
"""

from __future__ import annotations

import torch
from torch import nn

from .bank import AdapterBank

_INFIX = "base_layer."


def _strip_infix(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix + _INFIX)]:
        state_dict[prefix + key[len(prefix) + len(_INFIX):]] = state_dict.pop(key)


def _add_infix(module, state_dict, prefix, *args):
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + _INFIX)]:
        state_dict[prefix + _INFIX + key[len(prefix):]] = state_dict.pop(key)


class _LoraModule(nn.Module):
    def __init__(self, base_layer: nn.Module, bank: AdapterBank, router) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.bank = bank
        self.router = router
        self.register_state_dict_post_hook(_strip_infix)
        self.register_load_state_dict_pre_hook(_add_infix)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def extra_repr(self) -> str:
        return f"slots={sorted(self.bank.present)}, backend={self.router.backend.name!r}"


class LoraLinear(_LoraModule):
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base_layer = self._modules["base_layer"]
        if torch.compiler.is_compiling():
            return self.router.backend.traced_linear(self, x, base_layer(x, *args, **kwargs))
        layout = self.router.current(x)
        bound = None if layout is None else layout.branch(self, x)
        if bound is None:
            return base_layer(x, *args, **kwargs)
        # what needs only x runs first, next to the caller's other small ops, rather than after the
        # base GEMM has evicted the caches (slightly faster on CPU)
        y = bound[0](x)
        return bound[1](y, x, base_layer(x, *args, **kwargs))


class LoraEmbedding(_LoraModule):
    def forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(ids, *args, **kwargs)
        if torch.compiler.is_compiling():
            return self.router.backend.traced_embedding(self, ids, out)
        layout = self.router.current(ids, ids=True)
        return out if layout is None else layout.embedding(self, ids, out)
