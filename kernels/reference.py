"""The specification of the LoRA ops: plain loops over the same (bank, lanes) operands as the kernels.

    out[t] = base[t] + Σ_{lanes l of token t}  w_l · s[slot_l] · (B[slot_l] (A[slot_l] x[t]) + b[slot_l])

and, for a lane of a DoRA slot (``factors.mag``, ``g = mag[slot_l]``; 1 for a LoRA slot), PEFT's
``dora.py`` per lane, with the base layer's own bias taken off the base output as PEFT does:

    w_l · ( s[slot_l] · g ⊙ (B (A x[t]) + b) + (g − 1) ⊙ (base[t] − base_bias) )

Each function here is the reference of the Triton op of the same name in triton_ops.py: it takes the
same ``Factors`` (the whole bank, stacked by slot) and the same ``Lanes`` (kernels/lanes.py), and
walks the lanes chunk by chunk, pass by pass, in the order the kernels do. Within a chunk (at most
``BLOCK_M`` lanes of one slot) the math is written with torch ops on fp32 copies; nothing else is
optimised. A slot of rank 0 adds nothing, and values past a slot's rank are never read.

The fast CPU path is not here: lora_graph/backends/torch.py groups lanes by adapter and runs batched
GEMMs, and its tests compare it against these functions.
"""

from __future__ import annotations

import torch

from .factors import Factors
from .lanes import Lanes


def _chunks(lanes: Lanes, p: int):
    """``(slot, start, end)`` of every used chunk of pass ``p``, in launch order."""
    table = zip(lanes.chunk_slot[p].tolist(), lanes.chunk_start[p].tolist(), lanes.chunk_end[p].tolist())
    return [(s, start, end) for s, start, end in table if s >= 0]


def lora_shrink(x: torch.Tensor, factors: Factors, lanes: Lanes) -> torch.Tensor:
    """``h (1, L, R)`` fp32: ``h[0, l, :r] = x[token[l]] · A[s, :r]ᵀ`` for every covered lane ``l``
    of a chunk of slot ``s`` (``r = rank[s]``); other entries are zero."""
    a, rank = factors.a, factors.rank
    h = torch.zeros(1, lanes.num_lanes, a.shape[1], dtype=torch.float32, device=x.device)
    for p in range(lanes.num_passes):
        for s, start, end in _chunks(lanes, p):
            r = int(rank[s])
            token = lanes.token[start:end].long()
            h[0, start:end, :r] = x[token].float() @ a[s, :r].float().T  # (M, r)
    return h


def lora_expand(h: torch.Tensor, base: torch.Tensor, factors: Factors, lanes: Lanes,
                base_bias: torch.Tensor | None = None) -> torch.Tensor:
    """``base`` plus ``w · s · (h·Bᵀ + b)`` of every covered lane, accumulated in fp32 pass by pass
    and rounded to ``base.dtype`` once. ``h`` is ``(SPLIT_K, L, R')``: its partial sums are added.
    With ``factors.mag`` a lane adds ``w · (s·g ⊙ (h·Bᵀ + b) + (g − 1) ⊙ (base − base_bias))``,
    ``base`` being the value passed in, never the partial sums."""
    b, bias, scale, rank, mag = factors.b, factors.bias, factors.scale, factors.rank, factors.mag
    out = base.float().clone()
    h = h.sum(0)  # (L, R')
    if mag is not None:  # DoRA: the base output without the base layer's bias, as PEFT takes it
        nobias = base.float() if base_bias is None else base.float() - base_bias.float()
    for p in range(lanes.num_passes):
        for s, start, end in _chunks(lanes, p):
            r = int(rank[s])
            if r == 0:  # a slot this module does not hold
                continue
            y = h[start:end, :r] @ b[s, :, :r].float().T  # (M, N)
            if bias is not None:
                y = y + bias[s].float()
            weight = lanes.weight[start:end, None]  # (M, 1)
            token = lanes.token[start:end].long()
            if mag is None:
                out.index_add_(0, token, weight * scale[s].float() * y)
                continue
            g = mag[s].float()  # (N,)
            out.index_add_(0, token, weight * (scale[s].float() * (g * y) + (g - 1) * nobias[token]))
    return out.to(base.dtype)


def lora_delta(x: torch.Tensor, base: torch.Tensor, factors: Factors, lanes: Lanes,
               base_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The LoRA branch of every lane added to ``base``, in ``base.dtype``. ``base_bias`` is the
    base layer's own bias, read only for DoRA slots.

    Semantics::

        out = base.float()
        for each lane l = (t, s, w) with s a slot of the bank, r = rank[s] > 0:
            y = b[s, :, :r].float() @ (a[s, :r].float() @ x[t].float())
            if bias is not None:
                y = y + bias[s].float()
            if mag is None:
                out[t] += w * scale[s] * y
            else:                                   # DoRA; g = 1 for a LoRA slot
                g = mag[s]
                out[t] += w * (scale[s] * g * y + (g - 1) * (base[t].float() - base_bias))
        return out.to(base.dtype)
    """
    return lora_expand(lora_shrink(x, factors, lanes), base, factors, lanes, base_bias)


def lora_embedding_delta(
    ids: torch.Tensor,
    base: torch.Tensor,
    factors: Factors,
    lanes: Lanes,
    embed_scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Embedding LoRA of every lane added to ``base``; A is gathered at the token's id instead of
    multiplied. ``bias`` is not read (PEFT's embedding LoRA has none).

    Semantics::

        out = base.float()
        for each lane l = (t, s, w), r = rank[s] > 0:
            y = b[s, :, :r].float() @ a[s, :r, ids[t]].float()
            if mag is None:
                out[t] += w * scale[s] * y * embed_scale
            else:                                   # DoRA (PEFT scales the base output by g)
                g = mag[s]
                out[t] += w * (scale[s] * g * y * embed_scale + (g - 1) * base[t].float())
        return out.to(base.dtype)
    """
    a, rank = factors.a, factors.rank
    h = torch.zeros(1, lanes.num_lanes, a.shape[1], dtype=torch.float32, device=ids.device)
    for p in range(lanes.num_passes):
        for s, start, end in _chunks(lanes, p):
            r = int(rank[s])
            h[0, start:end, :r] = a[s, :r, ids[lanes.token[start:end].long()]].float().T  # (M, r)
    if embed_scale is not None:
        h = h * (embed_scale.float() if torch.is_tensor(embed_scale) else float(embed_scale))
    return lora_expand(h, base, factors._replace(bias=None), lanes)
