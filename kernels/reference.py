"""Grouped LoRA branch, torch path: the reference every kernel is tested against.

    out[t] = base[t] + Σ_{lanes l of token t}  w_l · s[slot_l] · (B[slot_l] (A[slot_l] x[t]) + b[slot_l])

Tokens reach this op already grouped by slot: the routing plan lays the lanes out as a padded
`(D, M)` grid, one row per distinct slot used in the batch, `M` the longest row. A padding lane
carries weight 0 and points at token 0, so it adds an exact zero. With the grid, every adapter of
the batch is computed by two `bmm`s whatever the number of distinct adapters: the op count does
not grow with D, and each token multiplies only by its own adapter's weights.

Mixed ranks share one padded rank R: the bank keeps zeros past each slot's real rank, so the
padding contributes exact zeros. Cost therefore follows the padded rank here; the Triton kernels
bound their loop by the real rank instead.

Not done here: sorting and padding (the plan does that, once per forward) and gathering the used
slots out of the bank (the bank does that, and caches it while the set of slots is unchanged).
"""

from __future__ import annotations

import torch


def _f32(t: torch.Tensor) -> torch.Tensor:
    # a no-op .float() still costs a dispatcher call; this path is per layer
    return t if t.dtype == torch.float32 else t.float()


def lora_delta(
    x: torch.Tensor,
    base: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None,
    token: torch.Tensor,
    coef: torch.Tensor,
    identity: bool = False,
    alpha: float | None = None,
    inplace: bool = False,
    inverse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Add the LoRA branch of every lane to ``base`` and return it in ``base.dtype``.

    Args:
        x: ``(T, K)`` activations, any float dtype.
        base: ``(T, N)`` output of the untouched base layer.
        a: ``(D, R, K)`` lora_A of the D used slots, as PEFT stores it.
        b: ``(D, N, R)`` lora_B of the D used slots, as PEFT stores it.
        bias: ``(D, N)`` lora_B bias of the used slots, or None.
        token: ``(D * M,)`` int64, the token of each lane, grouped by slot.
        coef: ``(D, M)`` or ``(D, M, 1)`` fp32, ``w · s`` of each lane (0 on padding lanes).
        identity: the lanes are exactly tokens ``0..T-1`` in order (one slot, one lane per token),
            so no gather or scatter is needed.
        alpha: the one ``w · s`` every lane shares, if they all do and no lane is padding; then
            ``coef`` is not read and the branch is added with ``alpha`` as the scatter's (or, on an
            identity grid, the expand GEMM's) multiplier, saving a pass over the branch output.
        inplace: an fp32 ``base`` is updated and returned rather than copied (a patched layer owns
            its fresh base output); other dtypes are accumulated in an fp32 copy anyway.
        inverse: ``(T,)`` int64, the lane of each token, when every token has exactly one lane (no
            padding, no token in two lanes): the scatter is then a gather and a dense add.

    Semantics::

        out = base.float()
        for d in range(D):
            for m in range(M):
                t = token[d * M + m]
                h = a[d].float() @ x[t].float()               # (R,)
                y = b[d].float() @ h                          # (N,)
                if bias is not None:
                    y = y + bias[d].float()
                out[t] += coef[d, m] * y
        return out.to(base.dtype)

    Accumulation is fp32 and the result is rounded to the base dtype once, as PEFT does with its
    default fp32 adapter weights; the coefficient multiplies ``B(Ax) + b``, in PEFT's order.
    """
    num_slots, _, k = a.shape
    n = b.shape[1]
    rows = coef.shape[1]
    out = base if inplace and base.dtype == torch.float32 else base.to(torch.float32, copy=True)
    if identity and bias is None and alpha is not None:
        # one slot, every token in order with one shared w·s: two plain GEMMs, the second one
        # accumulating straight into the output
        h = torch.mm(_f32(x), _f32(a[0]).t())  # (T, R)
        out = out.addmm_(h, _f32(b[0]).t(), alpha=alpha)  # (T, N)
    else:
        if coef.dim() == 2:
            coef = coef.unsqueeze(-1)  # (D, M, 1)
        xs = x if identity else x.index_select(0, token)  # (D*M, K)
        h = torch.bmm(_f32(xs).view(num_slots, rows, k), _f32(a).transpose(1, 2))  # (D, M, R)
        y = torch.bmm(h, _f32(b).transpose(1, 2))  # (D, M, N)
        if bias is not None:
            y.add_(_f32(bias).unsqueeze(1))
        if alpha is None:
            y.mul_(coef)
        y = y.view(num_slots * rows, n)  # (D*M, N)
        c = 1.0 if alpha is None else alpha
        if identity:
            out = out.add_(y, alpha=c)
        elif inverse is not None:
            out = out.add_(y.index_select(0, inverse), alpha=c)
        else:
            out = out.index_add_(0, token, y, alpha=c)
    return out if out.dtype == base.dtype else out.to(base.dtype)


def lora_embedding_delta(
    ids: torch.Tensor,
    base: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    token: torch.Tensor,
    coef: torch.Tensor,
    embed_scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Embedding LoRA of every lane added to ``base``; same grid as :func:`lora_delta`.

    Args:
        ids: ``(T,)`` int64 token ids.
        base: ``(T, N)`` output of the untouched embedding.
        a: ``(D, R, V)`` lora_embedding_A of the used slots, as PEFT stores it.
        b: ``(D, N, R)`` lora_embedding_B of the used slots.
        token, coef: the lane grid, as in :func:`lora_delta`.
        embed_scale: the base embedding's ``embed_scale`` (Gemma), which PEFT applies to the delta.

    Semantics::

        out = base.float()
        for d, m:
            t = token[d * M + m]
            y = b[d].float() @ a[d, :, ids[t]].float()        # (N,)
            out[t] += coef[d, m] * y * embed_scale
        return out.to(base.dtype)
    """
    num_slots, r, _ = a.shape
    n = b.shape[1]
    rows = coef.shape[1]
    lane_ids = ids.index_select(0, token).view(num_slots, 1, rows).expand(num_slots, r, rows)
    h = torch.gather(a, 2, lane_ids).float().transpose(1, 2)  # (D, M, R)
    y = torch.bmm(h, _f32(b).transpose(1, 2))  # (D, M, N)
    y = (y * (coef if coef.dim() == 3 else coef.unsqueeze(-1))).view(num_slots * rows, n)  # (D*M, N)
    if embed_scale is not None:
        scale = embed_scale.float() if torch.is_tensor(embed_scale) else float(embed_scale)
        y = y * scale
    return base.float().index_add(0, token, y).to(base.dtype)
