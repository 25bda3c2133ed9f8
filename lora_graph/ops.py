"""The LoRA branch ops, dispatched to a backend.

``torch`` runs kernels/reference.py: grouped by slot, two ``bmm``s per layer whatever the number of
distinct adapters. It is the CPU path and the specification the Triton kernels are tested against.
"""

from __future__ import annotations

import torch

from .kernels import reference

BACKENDS = ("auto", "torch")


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    return "torch"


def lora_delta(backend: str, x, base, a, b, bias, token, coef, identity: bool) -> torch.Tensor:
    return reference.lora_delta(x, base, a, b, bias, token, coef, identity)


def lora_embedding_delta(backend: str, ids, base, a, b, token, coef, embed_scale) -> torch.Tensor:
    return reference.lora_embedding_delta(ids, base, a, b, token, coef, embed_scale)
