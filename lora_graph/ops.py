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
import math
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
                                inplace=not base.requires_grad, inverse=grid.inverse)


def _torch_operands(bank, state, grid):
    """``reference.lora_delta``'s operands for a grid: the gathered factors, ``coef``, and the one
    ``w · s`` every lane shares when they all do and no lane is padding (else None)."""
    a, b, bias, coef = bank.operands(grid.slots, grid.weight, state)
    alpha = None
    if grid.uniform is not None:
        scales = {state.scale[s] for s in grid.slots}
        if len(scales) == 1:
            alpha = grid.uniform * scales.pop()
    return a, b, bias, coef, alpha


# The largest mixed-batch branch output (elements) computed before the base layer: a decode step's.
# A prefill's would be evicted by the base GEMM and read back from memory (measured slower).
_EARLY_ELEMENTS = 1 << 18


def bound_delta(bank, state, grid, shape: torch.Size):
    """The torch path's :func:`lora_delta` for one (state, grid) and input shape, with everything
    but the activations bound, as ``(pre, post)``: ``pre(x)`` computes what needs only the input
    (the shrink, and for a mixed batch the expand too) and runs before the base layer;
    ``post(pre(x), x, base)`` adds the branch into the base output and returns it. No autograd:
    ``base`` is the caller's own and is updated in place where it can be. Decode steps reuse the
    pair, skipping the routing lookups; running the input-only part first keeps the small ops
    together instead of after the base GEMM, which measured slightly faster on CPU. A mixed
    batch's branch output larger than a decode step's is computed after the base layer instead."""
    a, b, bias, coef, alpha = _torch_operands(bank, state, grid)
    token, identity, inverse = grid.token, grid.identity, grid.inverse
    num_tokens, k = math.prod(shape[:-1]), shape[-1]

    def delta(x, base):
        out = reference.lora_delta(x.reshape(num_tokens, k), base.reshape(num_tokens, -1), a, b, bias, token, coef,
                                   identity, alpha, inplace=True, inverse=inverse)
        return out.view(base.shape)

    def no_pre(x):
        return None

    def unsplit(_, x, base):
        return delta(x, base)

    if bias is not None or (identity and alpha is None):
        return no_pre, unsplit
    # reference.lora_delta's own ops in its own order (so bit for bit the same), operands ready
    if identity:  # one adapter for every token, with one weight: two GEMMs
        at, bt = a[0].float().t(), b[0].float().t()  # (K, R), (R, N)

        def shrink(x):
            return torch.mm(x.view(num_tokens, k), at) if x.dtype == torch.float32 else None

        def expand(h, x, base):
            if h is None or base.dtype != torch.float32 or not base.is_contiguous():
                return delta(x, base)
            base.view(num_tokens, -1).addmm_(h, bt, alpha=alpha)
            return base

        return shrink, expand
    num_slots, rows = coef.shape[0], coef.shape[1]
    at, bt = a.float().transpose(1, 2), b.float().transpose(1, 2)  # (D, K, R), (D, R, N)
    # a (T, K) input, or one token per row (decode): gather and scatter straight on dim 0
    flat = shape[0] == num_tokens
    c = 1.0 if alpha is None else alpha

    if grid.strides is not None and flat:
        # the lanes are a strided view of the tokens: no gather, and the add goes straight into base
        offset, step_d, step_m = grid.strides

        def grouped(x):
            if x.dtype != torch.float32 or not x.is_contiguous():
                return None
            xs = x.as_strided((num_slots, rows, k), (step_d * k, step_m * k, 1), x.storage_offset() + offset * k)
            y = torch.bmm(torch.bmm(xs, at), bt)  # (D, M, N)
            return y.mul_(coef) if alpha is None else y

        def scatter(y, x, base):
            if y is None or base.dtype != torch.float32 or not base.is_contiguous():
                return delta(x, base)
            n = base.shape[-1]
            out = base.as_strided((num_slots, rows, n), (step_d * n, step_m * n, 1), base.storage_offset() + offset * n)
            out.add_(y, alpha=c)
            return base
    else:
        lanes = (num_slots * rows, *shape[1:-1]) if flat else (num_slots * rows,)

        def grouped(x):
            if x.dtype != torch.float32:
                return None
            xs = x.index_select(0, token) if flat else x.reshape(num_tokens, k).index_select(0, token)
            y = torch.bmm(torch.bmm(xs.view(num_slots, rows, k), at), bt)  # (D, M, N)
            if alpha is None:
                y.mul_(coef)
            y = y.view(*lanes, -1)
            return y if inverse is None else y.index_select(0, inverse)  # back in token order

        def scatter(y, x, base):
            if y is None or base.dtype != torch.float32 or not (flat or base.is_contiguous()):
                return delta(x, base)
            out = base if flat else base.view(num_tokens, -1)
            if inverse is None:
                out.index_add_(0, token, y, alpha=c)
            else:
                out.add_(y, alpha=c)
            return base

    if num_slots * rows * bt.shape[-1] <= _EARLY_ELEMENTS:
        return grouped, scatter

    def after(_, x, base):  # a branch output this large would be evicted by the base GEMM
        return scatter(grouped(x), x, base)

    return no_pre, after


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
