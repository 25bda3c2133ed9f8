"""Grouped LoRA branch on Triton: a bank's factors and a lane layout in, ``base + Δ`` out.

    out[t] = base[t] + Σ_{lanes l of token t}  w_l · s[slot_l] · (B[slot_l] (A[slot_l] x[t]) + b[slot_l])

and DoRA's form of the lane for the slots of ``factors.mag`` (kernels/factors.py). Same semantics
as :func:`kernels.reference.lora_delta`, but the kernels read the whole bank directly (no gather
of the used slots, no padding grid) and loop each slot to its real rank. Two launches per layer
(one expand per pass for weighted sets), whatever the number of distinct adapters:

    lanes = build_lanes(lane_token, lane_slot, lane_weight, S, passes)   # once per forward and bank size
    y = lora_delta(x, base, factors, lanes)                              # per layer

Integration notes (``from lora_graph.kernels import triton_ops``; it imports triton):
- ``lane_token (L,)``, ``lane_slot (L,)`` (-1: none) and ``lane_weight (L,)`` list every
  (token, adapter, weight) of the forward, slots being the bank's own (global) slot ids. ``passes``
  is the largest weighted set of any token: pass it, since computing it synchronises with the device.
- Build lanes once per forward and bank size, and share them across the layers of that forward: the
  builder is a dozen small torch ops. Its grid sizes depend only on L, S and ``passes``, and nothing
  in it or in the ops reads a device value on the host, so a decode step can be captured in a CUDA
  graph.
- The kernels take the whole bank (``Factors``: ``a (S, R, K)``, ``b (S, N, R)``, ``bias (S, N)``,
  ``scale (S,)``, ``rank (S,)``, ``mag (S, N)``) as the bank stores it: no gather of the used slots. A slot of rank 0
  adds nothing, whatever its other values, so one lane layout serves every layer of a forward,
  including layers whose bank does not hold some of its slots. Values past a slot's rank are never
  read.
- ``inplace=True`` adds into ``base`` instead of a copy of it: a patched layer owns its fresh base
  output, and this saves one pass over ``(T, N)``.
- Inference only: no autograd formula is registered.

Ops registered with ``torch.library`` (fake implementations included, so ``torch.compile`` sees
one opaque op per call and never traces into Triton): ``lora_graph::lora_delta``, ``lora_delta_``
(in place), ``lora_shrink``, ``lora_expand``, ``lora_expand_`` (in place), ``lora_embedding_delta``.
They take the fields of ``Factors`` and ``Lanes`` one by one; the functions below take the records.
Under ``TRITON_INTERPRET=1`` (set before triton is imported) they run on CPU tensors in Triton's
interpreter, which is how the tests run them; without it, CPU tensors raise a RuntimeError.
"""

from __future__ import annotations

import torch

from .expand import lora_expand as _expand
from .factors import Factors
from .lanes import Lanes, build_lanes
from .shrink import default_split_k, lora_embedding_shrink
from .shrink import lora_shrink as _shrink

__all__ = ["Factors", "Lanes", "build_lanes", "lora_delta", "lora_embedding_delta", "lora_expand", "lora_shrink"]

_BLOCK_K = 128  # the shrink's K tile, also the split-K granularity


# -- the registered ops: records spelled out as tensors ----------------------------------------------


@torch.library.custom_op("lora_graph::lora_shrink", mutates_args=())
def _shrink_op(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
    rank: torch.Tensor, mag: torch.Tensor | None, token: torch.Tensor, weight: torch.Tensor,
    chunk_slot: torch.Tensor, chunk_start: torch.Tensor, chunk_end: torch.Tensor, block_m: int, split_k: int,
) -> torch.Tensor:
    lanes = Lanes(token, weight, chunk_slot, chunk_start, chunk_end, block_m)
    return _shrink(x, Factors(a, b, bias, scale, rank, mag), lanes, split_k=split_k, block_k=_BLOCK_K)


@_shrink_op.register_fake
def _(x, a, b, bias, scale, rank, mag, token, weight, chunk_slot, chunk_start, chunk_end, block_m, split_k):
    return x.new_empty((split_k, token.shape[0], a.shape[1]), dtype=torch.float32)


@torch.library.custom_op("lora_graph::lora_expand", mutates_args=())
def _expand_op(
    h: torch.Tensor, base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
    scale: torch.Tensor, rank: torch.Tensor, mag: torch.Tensor | None, token: torch.Tensor, weight: torch.Tensor,
    chunk_slot: torch.Tensor, chunk_start: torch.Tensor, chunk_end: torch.Tensor, block_m: int,
    base_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    lanes = Lanes(token, weight, chunk_slot, chunk_start, chunk_end, block_m)
    return _expand(h, base, Factors(a, b, bias, scale, rank, mag), lanes, base_bias=base_bias)


@_expand_op.register_fake
def _(h, base, a, b, bias, scale, rank, mag, token, weight, chunk_slot, chunk_start, chunk_end, block_m, base_bias=None):
    return base.new_empty(base.shape)


@torch.library.custom_op("lora_graph::lora_expand_", mutates_args=("base",))
def _expand_inplace_op(
    h: torch.Tensor, base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
    scale: torch.Tensor, rank: torch.Tensor, mag: torch.Tensor | None, token: torch.Tensor, weight: torch.Tensor,
    chunk_slot: torch.Tensor, chunk_start: torch.Tensor, chunk_end: torch.Tensor, block_m: int,
    base_bias: torch.Tensor | None = None,
) -> None:
    lanes = Lanes(token, weight, chunk_slot, chunk_start, chunk_end, block_m)
    _expand(h, base, Factors(a, b, bias, scale, rank, mag), lanes, inplace=True, base_bias=base_bias)


def _delta(x, base, factors: Factors, lanes: Lanes, split_k: int, inplace: bool, base_bias) -> torch.Tensor:
    a, b = factors.a, factors.b
    if x.dim() != 2 or x.shape[0] != base.shape[0] or a.dim() != 3 or b.dim() != 3 or a.shape[:2] != (
        b.shape[0], b.shape[2]
    ):
        raise ValueError(
            f"shapes do not agree: x {tuple(x.shape)}, base {tuple(base.shape)}, a {tuple(a.shape)}, b {tuple(b.shape)}"
        )
    h = _shrink(x, factors, lanes, split_k=split_k, block_k=_BLOCK_K)  # (SPLIT_K, L, R)
    return _expand(h, base, factors, lanes, inplace=inplace, base_bias=base_bias)


@torch.library.custom_op("lora_graph::lora_delta", mutates_args=())
def _delta_op(
    x: torch.Tensor, base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
    scale: torch.Tensor, rank: torch.Tensor, mag: torch.Tensor | None, token: torch.Tensor, weight: torch.Tensor,
    chunk_slot: torch.Tensor, chunk_start: torch.Tensor, chunk_end: torch.Tensor, block_m: int, split_k: int,
    base_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    lanes = Lanes(token, weight, chunk_slot, chunk_start, chunk_end, block_m)
    return _delta(x, base, Factors(a, b, bias, scale, rank, mag), lanes, split_k, False, base_bias)


@_delta_op.register_fake
def _(x, base, a, b, bias, scale, rank, mag, token, weight, chunk_slot, chunk_start, chunk_end, block_m, split_k,
      base_bias=None):
    return base.new_empty(base.shape)


@torch.library.custom_op("lora_graph::lora_delta_", mutates_args=("base",))
def _delta_inplace_op(
    x: torch.Tensor, base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
    scale: torch.Tensor, rank: torch.Tensor, mag: torch.Tensor | None, token: torch.Tensor, weight: torch.Tensor,
    chunk_slot: torch.Tensor, chunk_start: torch.Tensor, chunk_end: torch.Tensor, block_m: int, split_k: int,
    base_bias: torch.Tensor | None = None,
) -> None:
    lanes = Lanes(token, weight, chunk_slot, chunk_start, chunk_end, block_m)
    _delta(x, base, Factors(a, b, bias, scale, rank, mag), lanes, split_k, True, base_bias)


@torch.library.custom_op("lora_graph::lora_embedding_delta", mutates_args=())
def _embedding_delta_op(
    ids: torch.Tensor, base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
    rank: torch.Tensor, mag: torch.Tensor | None, token: torch.Tensor, weight: torch.Tensor,
    chunk_slot: torch.Tensor, chunk_start: torch.Tensor, chunk_end: torch.Tensor, block_m: int,
    embed_scale: torch.Tensor | None,
) -> torch.Tensor:
    lanes = Lanes(token, weight, chunk_slot, chunk_start, chunk_end, block_m)
    if ids.dim() != 1 or ids.shape[0] != base.shape[0] or a.dim() != 3 or b.dim() != 3 or a.shape[:2] != (
        b.shape[0], b.shape[2]
    ):
        raise ValueError(
            f"shapes do not agree: ids {tuple(ids.shape)}, base {tuple(base.shape)}, a {tuple(a.shape)}, b {tuple(b.shape)}"
        )
    factors = Factors(a, b, None, scale, rank, mag)
    h = lora_embedding_shrink(ids, factors, lanes)  # (1, L, R)
    if embed_scale is not None:
        h.mul_(embed_scale.float())
    return _expand(h, base, factors, lanes)


@_embedding_delta_op.register_fake
def _(ids, base, a, b, scale, rank, mag, token, weight, chunk_slot, chunk_start, chunk_end, block_m, embed_scale):
    return base.new_empty(base.shape)


# -- the functions: records in ------------------------------------------------------------------------


def _split_k(split_k: int | None, x: torch.Tensor, lanes: Lanes, factors: Factors) -> int:
    if split_k is not None:
        return split_k
    r_blocks = -(-factors.a.shape[1] // 16)
    return default_split_k(lanes.chunk_slot.numel() * r_blocks, x.shape[1], _BLOCK_K, x.device)


def lora_delta(
    x: torch.Tensor,
    base: torch.Tensor,
    factors: Factors,
    lanes: Lanes,
    split_k: int | None = None,
    inplace: bool = False,
    base_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base`` plus the LoRA branch of every lane, in ``base.dtype``; one op for torch.compile.

    With ``inplace=True`` the branch is added into ``base`` itself, which is returned: no copy of
    the output, for callers that own ``base`` (a patched layer's fresh base output).

    Args:
        x: ``(T, K)`` activations, fp32, fp16 or bf16.
        base: ``(T, N)`` output of the untouched base layer.
        factors: the bank: ``a (S, R, K)`` and ``b (S, N, R)`` in fp32, fp16 or bf16 (not
            necessarily the same), ``bias (S, N)`` or None, ``scale (S,)`` float (``alpha / r``
            or rsLoRA's, per slot), ``rank (S,)`` integer (``<= R``) and ``mag (S, N)`` float
            (DoRA's per-slot ``g``) or None.
        lanes: :func:`build_lanes` of the forward's lanes for ``S`` slots.
        split_k: K-splits of the shrink; default: enough programs to fill the GPU.
        inplace: update ``base`` and return it.
        base_bias: ``(N,)`` the base layer's own bias, which DoRA takes off the base output; read
            only with ``mag``.

    Semantics: :func:`kernels.reference.lora_delta` on the same operands; tokens with several
    lanes add them in pass order, deterministically.
    """
    split_k = _split_k(split_k, x, lanes, factors)
    args = (x, base, *factors, *lanes[:5], lanes.block_m, split_k, base_bias)
    if inplace:
        _delta_inplace_op(*args)
        return base
    return _delta_op(*args)


def lora_shrink(x: torch.Tensor, factors: Factors, lanes: Lanes, split_k: int | None = None) -> torch.Tensor:
    """``h (SPLIT_K, L, R)`` fp32: x through each lane's A. See :func:`kernels.shrink.lora_shrink`;
    feed ``h`` to :func:`lora_expand`."""
    split_k = _split_k(split_k, x, lanes, factors)
    return _shrink_op(x, *factors, *lanes[:5], lanes.block_m, split_k)


def lora_expand(h: torch.Tensor, base: torch.Tensor, factors: Factors, lanes: Lanes,
                inplace: bool = False, base_bias: torch.Tensor | None = None) -> torch.Tensor:
    """``base`` plus ``w · s · (h·Bᵀ + b)`` of every lane (DoRA's form for slots with ``mag``), in
    ``base.dtype`` (into ``base`` itself with ``inplace=True``). See :func:`kernels.expand.lora_expand`."""
    args = (h, base, *factors, *lanes[:5], lanes.block_m, base_bias)
    if inplace:
        _expand_inplace_op(*args)
        return base
    return _expand_op(*args)


def lora_embedding_delta(
    ids: torch.Tensor,
    base: torch.Tensor,
    factors: Factors,
    lanes: Lanes,
    embed_scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Embedding LoRA of every lane added to ``base``, in ``base.dtype``.

    Args:
        ids: ``(T,)`` integer token ids.
        base: ``(T, N)`` output of the untouched embedding.
        factors: the bank: ``a (S, R, V)`` lora_embedding_A and ``b (S, N, R)`` lora_embedding_B,
            as PEFT stores them, ``scale`` and ``rank``; ``bias`` is not read.
        lanes: as in :func:`lora_delta`.
        embed_scale: the base embedding's ``embed_scale`` (Gemma), applied to the delta as PEFT does.

    Semantics: :func:`kernels.reference.lora_embedding_delta` on the same operands.
    """
    if embed_scale is not None and not torch.is_tensor(embed_scale):
        embed_scale = torch.full((), float(embed_scale), dtype=torch.float32, device=base.device)  # no host copy
    return _embedding_delta_op(ids, base, factors.a, factors.b, factors.scale, factors.rank, factors.mag, *lanes[:5],
                               lanes.block_m, embed_scale)
