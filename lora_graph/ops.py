"""The LoRA branch ops, dispatched to a backend.

``torch`` runs kernels/reference.py: grouped by slot, two ``bmm``s per layer whatever the number of
distinct adapters. It is the CPU path and the specification the Triton kernels are tested against.

``triton`` runs kernels/triton_ops.py: grouped-GEMM kernels that read the whole bank, loop each
slot to its real rank and compute every adapter of the batch in one launch per projection. They
need CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``, which is how CI checks them).

``auto`` picks ``triton`` for a model on CUDA when triton is installed, and ``torch`` otherwise.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .kernels import reference

BACKENDS = ("auto", "torch", "triton")


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend a model on ``device`` runs with; raises a clear error when it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if backend == "triton":
        if not _triton_available():
            raise RuntimeError("backend='triton' needs the triton package: pip install 'lora_graph[triton]'")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"backend='triton' needs a CUDA model (this one is on {device.type}); use backend='torch' "
                "or 'auto' here, or set TRITON_INTERPRET=1 before triton is imported to run the kernels "
                "in Triton's interpreter"
            )
    return backend


def _triton():
    from .kernels import triton_ops

    return triton_ops


def lora_delta(backend: str, x, base, bank, state, grid, lanes) -> torch.Tensor:
    """``base + Σ w·s·(B(Ax) + b)`` over the grid's lanes, in ``base.dtype``; ``state`` is the
    bank snapshot this forward reads. ``base`` is the caller's own fresh tensor: it may be updated
    in place and returned."""
    if backend == "triton":
        bias = state.bias if state.with_bias.intersection(grid.slots) else None
        return triton_delta(x, base, state.a, state.b, bias, state.scale_t, state.rank_t, lanes)
    a, b, bias, coef, alpha = _torch_operands(bank, state, grid)
    return reference.lora_delta(x, base, a, b, bias, grid.token, coef, grid.identity, alpha,
                                inplace=not base.requires_grad)


def _torch_operands(bank, state, grid):
    """``reference.lora_delta``'s operands for a grid: the gathered factors, ``coef``, and the one
    ``w · s`` of an identity grid whose lanes share a weight (else None)."""
    a, b, bias, coef = bank.operands(grid.slots, grid.weight, state)
    alpha = grid.uniform * state.scale[grid.slots[0]] if grid.identity and grid.uniform is not None else None
    return a, b, bias, coef, alpha


def bound_delta(bank, state, grid):
    """The torch path's :func:`lora_delta` for one (state, grid), with everything but the
    activations bound: ``fn(x, base)`` updates a ``base`` the caller owns (no autograd) and returns
    it. Decode steps reuse it, skipping the routing lookups."""
    a, b, bias, coef, alpha = _torch_operands(bank, state, grid)
    token, identity = grid.token, grid.identity

    def delta(x, base):
        return reference.lora_delta(x, base, a, b, bias, token, coef, identity, alpha, inplace=True)

    if bias is not None or (identity and alpha is None):
        return delta
    # reference.lora_delta's own ops in its own order (so bit for bit the same), operands ready
    if identity:  # one adapter for every token, with one weight: two GEMMs
        at, bt = a[0].float().t(), b[0].float().t()  # (K, R), (R, N)

        def one_adapter(x, base):
            if x.dtype != torch.float32 or base.dtype != torch.float32:
                return delta(x, base)
            return base.addmm_(torch.mm(x, at), bt, alpha=alpha)

        return one_adapter
    num_slots, rows = coef.shape[0], coef.shape[1]
    at, bt = a.float().transpose(1, 2), b.float().transpose(1, 2)  # (D, K, R), (D, R, N)

    def grouped(x, base):
        if x.dtype != torch.float32 or base.dtype != torch.float32:
            return delta(x, base)
        h = torch.bmm(x.index_select(0, token).view(num_slots, rows, -1), at)  # (D, M, R)
        y = torch.bmm(h, bt).mul_(coef)  # (D, M, N)
        return base.index_add_(0, token, y.view(num_slots * rows, -1))

    return grouped


def lora_embedding_delta(backend: str, ids, base, bank, state, grid, lanes, embed_scale) -> torch.Tensor:
    if backend == "triton":
        return _triton().lora_embedding_delta(ids, base, state.a, state.b, state.scale_t, state.rank_t, lanes,
                                              embed_scale)
    a, b, _, coef = bank.operands(grid.slots, grid.weight, state)
    return reference.lora_embedding_delta(ids, base, a, b, grid.token, coef, embed_scale)


def triton_delta(x, base, a, b, bias, scale, rank, lanes) -> torch.Tensor:
    """The Triton op on a whole bank, added into ``base`` (the traced path of a compiled model)."""
    return _triton().lora_delta(x, base, a, b, bias, scale, rank, lanes, inplace=True)


def triton_embedding_delta(ids, base, a, b, scale, rank, lanes, embed_scale) -> torch.Tensor:
    return _triton().lora_embedding_delta(ids, base, a, b, scale, rank, lanes, embed_scale)


def build_lanes(grid, num_slots: int, passes: int, num_tokens: int):
    """The kernels' lane layout of a routing grid (padding lanes have weight 0 and are dropped)."""
    m = grid.weight.shape[1]
    slots = torch.tensor(grid.slots, dtype=torch.int64, device=grid.token.device).repeat_interleave(m)  # (D*M,)
    return _triton().build_lanes(grid.token, slots, grid.weight.reshape(-1), num_slots,
                                 passes=passes, num_tokens=num_tokens)
