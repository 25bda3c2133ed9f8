"""LoRA expand: every lane's shrunk vector times its slot's B, scaled and added to its token's row.

    out[token_l] += w_l · s[slot_l] · (h[l, :rank] · B[slot_l, :, :rank]ᵀ + b[slot_l])     fp32

One program computes a (BLOCK_M lanes) × (BLOCK_N outputs) tile for one chunk (lanes of one slot)
and adds it to the rows of those lanes' tokens, read and written through the sorted token index:
the output is never permuted. The rank loop stops at the slot's real rank.

**Reduction of weighted sets.** A token with several lanes gets one lane per pass
(kernels/lanes.py) and the expand runs once per pass, so within a launch no two programs touch
the same output row and a plain load-add-store is race-free. The lanes of a token are summed in a
fixed order, with no atomics: the output is deterministic, bit for bit. With one pass (one adapter
per token, the common case) the kernel adds straight into a copy of ``base`` and rounds once to
the base dtype. With several, it accumulates in an fp32 copy of ``base`` and rounds once at the end,
as the torch path does.

**DoRA** is a second kernel with the same tile and its own epilogue, launched when the bank holds
a DoRA slot (``factors.mag``): each lane adds

    w_l · ( s·g ⊙ (h·Bᵀ + b) + (g − 1) ⊙ (base[token_l] − base_bias) )        g = mag[slot_l]

where ``base`` is read from the base output as it was passed in (never from the partial sums; with
several passes the sums go to a separate fp32 buffer) and ``base_bias`` is the base layer's bias.
A LoRA slot of the same bank has ``g = 1`` and gets exactly the LoRA kernel's result.

The scale ``s`` and the weight ``w`` are runtime data read per chunk and per lane; neither is
folded into B. The dot is an fp32 ``ieee`` dot (h is fp32), as PEFT runs the branch in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .factors import Factors
from .lanes import Lanes
from .shrink import check_device, is_interpreted, launching


@triton.jit
def _branch_tile(
    h_ptr, b_ptr, bias_ptr, slot, rank, offs_m, offs_n, mask_m, mask_n,
    stride_hs, stride_hl, stride_hr, stride_bs, stride_bn, stride_br, stride_bias_s, stride_bias_n,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``(BLOCK_M, BLOCK_N)`` fp32: ``h·Bᵀ + b`` of one chunk's lanes, the rank loop stopping at the
    slot's real rank. Shared by both kernels below."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        h_ptrs = h_ptr + offs_m[:, None] * stride_hl + offs_r[None, :] * stride_hr
        h_mask = mask_m[:, None] & mask_r[None, :]
        h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):  # fixed order: deterministic
            h += tl.load(h_ptrs + s * stride_hs, mask=h_mask, other=0.0)
        bt_ptrs = b_ptr + slot * stride_bs + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn
        bt = tl.load(bt_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(h, bt, input_precision="ieee")
    if HAS_BIAS:
        bias = tl.load(bias_ptr + slot * stride_bias_s + offs_n * stride_bias_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    return acc


@triton.jit
def _expand_kernel(
    # pointers
    h_ptr, b_ptr, bias_ptr, scale_ptr, rank_ptr, out_ptr,
    token_ptr, weight_ptr, chunk_slot_ptr, chunk_start_ptr, chunk_end_ptr,
    # sizes
    N,
    # strides
    stride_hs, stride_hl, stride_hr,
    stride_bs, stride_bn, stride_br,
    stride_bias_s, stride_bias_n,
    stride_ot, stride_on,
    # constexprs
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(chunk_slot_ptr + pid_c)
    if slot < 0:
        return
    start = tl.load(chunk_start_ptr + pid_c)
    end = tl.load(chunk_end_ptr + pid_c)
    rank = tl.load(rank_ptr + slot)
    if rank == 0:  # a slot this module does not hold: it adds nothing (its bias may be stale)
        return
    scale = tl.load(scale_ptr + slot).to(tl.float32)
    slot = slot.to(tl.int64)
    offs_m = start + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < end
    mask_n = offs_n < N

    acc = _branch_tile(h_ptr, b_ptr, bias_ptr, slot, rank, offs_m, offs_n, mask_m, mask_n,
                       stride_hs, stride_hl, stride_hr, stride_bs, stride_bn, stride_br, stride_bias_s, stride_bias_n,
                       SPLIT_K, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_R)
    weight = tl.load(weight_ptr + offs_m, mask=mask_m, other=0.0)
    acc *= (weight * scale)[:, None]

    token = tl.load(token_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    out_ptrs = out_ptr + token[:, None] * stride_ot + offs_n[None, :] * stride_on
    mask = mask_m[:, None] & mask_n[None, :]
    out = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (out + acc).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dora_expand_kernel(
    # pointers
    h_ptr, b_ptr, bias_ptr, scale_ptr, rank_ptr, mag_ptr, base_ptr, base_bias_ptr, out_ptr,
    token_ptr, weight_ptr, chunk_slot_ptr, chunk_start_ptr, chunk_end_ptr,
    # sizes
    N,
    # strides
    stride_hs, stride_hl, stride_hr,
    stride_bs, stride_bn, stride_br,
    stride_bias_s, stride_bias_n,
    stride_mag_s, stride_mag_n,
    stride_base_t, stride_base_n, stride_base_bias_n,
    stride_ot, stride_on,
    # constexprs
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BASE_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # The LoRA kernel's prologue and tile; the epilogue applies the slot's g to the branch and to
    # the base output as it was passed in (base_ptr; out_ptr holds the partial sums).
    pid_c = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(chunk_slot_ptr + pid_c)
    if slot < 0:
        return
    start = tl.load(chunk_start_ptr + pid_c)
    end = tl.load(chunk_end_ptr + pid_c)
    rank = tl.load(rank_ptr + slot)
    if rank == 0:
        return
    scale = tl.load(scale_ptr + slot).to(tl.float32)
    slot = slot.to(tl.int64)
    offs_m = start + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < end
    mask_n = offs_n < N

    acc = _branch_tile(h_ptr, b_ptr, bias_ptr, slot, rank, offs_m, offs_n, mask_m, mask_n,
                       stride_hs, stride_hl, stride_hr, stride_bs, stride_bn, stride_br, stride_bias_s, stride_bias_n,
                       SPLIT_K, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_R)
    g = tl.load(mag_ptr + slot * stride_mag_s + offs_n * stride_mag_n, mask=mask_n, other=1.0).to(tl.float32)
    token = tl.load(token_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    mask = mask_m[:, None] & mask_n[None, :]
    base = tl.load(base_ptr + token[:, None] * stride_base_t + offs_n[None, :] * stride_base_n, mask=mask, other=0.0)
    base = base.to(tl.float32)
    if HAS_BASE_BIAS:
        base_bias = tl.load(base_bias_ptr + offs_n * stride_base_bias_n, mask=mask_n, other=0.0)
        base -= base_bias.to(tl.float32)[None, :]
    weight = tl.load(weight_ptr + offs_m, mask=mask_m, other=0.0)
    # the LoRA lane's w·s·acc, then times g: with g = 1 the LoRA kernel's value, bit for bit
    acc = acc * (weight * scale)[:, None] * g[None, :] + (weight[:, None] * (g[None, :] - 1.0)) * base

    out_ptrs = out_ptr + token[:, None] * stride_ot + offs_n[None, :] * stride_on
    out = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (out + acc).to(out_ptr.dtype.element_ty), mask=mask)


def lora_expand(
    h: torch.Tensor,
    base: torch.Tensor,
    factors: Factors,
    lanes: Lanes,
    inplace: bool = False,
    block_n: int | None = None,
    block_r: int = 16,
    base_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Add every lane's LoRA output to ``base``: a new ``(T, N)`` tensor in ``base.dtype``, or
    ``base`` itself updated in place with ``inplace=True`` (saves a copy of the output).

    Args:
        h: ``(SPLIT_K, L, R')`` fp32 partial sums from :func:`kernels.shrink.lora_shrink`,
            ``R' >= R``; only ``h[:, l, :rank]`` of covered lanes is read.
        base: ``(T, N)`` output of the base layer, any float dtype.
        factors: the bank; ``b (S, N, R)`` (lora_B as PEFT stores it; columns past a slot's rank
            are never read), ``bias (S, N)`` or None, ``scale (S,)`` float (never folded into B),
            ``rank (S,)`` integer and ``mag (S, N)`` float or None (DoRA) are read.
        lanes: the layout from :func:`kernels.lanes.build_lanes`.
        base_bias: ``(N,)`` the base layer's own bias, or None; read only with ``mag``.

    Semantics::

        out = base.float()
        for p in passes, for l in the lanes of pass p, s = slot of l's chunk, r = rank[s]:
            y = h[:, l, :r].sum(0) @ b[s, :, :r].float().T            # (N,)
            if bias is not None:
                y = y + bias[s].float()
            if mag is None:
                out[token[l]] += weight[l] * scale[s] * y
            else:
                g = mag[s].float()
                out[token[l]] += weight[l] * (scale[s] * g * y + (g - 1) * (base[token[l]].float() - base_bias))
        return out.to(base.dtype)
    """
    _check_expand(h, base, factors, lanes, base_bias)
    passes = lanes.num_passes
    # One pass: add into base (or a copy), one rounding. Several: accumulate in fp32, round at the
    # end; DoRA then keeps reading base, so the sums never go into base itself.
    if inplace and (passes == 1 or (base.dtype == torch.float32 and factors.mag is None)):
        out = base
    elif passes == 1:
        out = base.clone(memory_format=torch.contiguous_format)
    else:
        out = base.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    num_chunks = lanes.chunk_slot.shape[1]
    if num_chunks > 0 and factors.b.shape[1] > 0:
        _launch(out, h, base, factors, lanes, block_n, block_r, base_bias)
    if not inplace:
        return out.to(base.dtype)
    if out is not base:
        base.copy_(out)
    return base


def _check_expand(h: torch.Tensor, base: torch.Tensor, factors: Factors, lanes: Lanes,
                  base_bias: torch.Tensor | None) -> None:
    b, bias, scale, rank, mag = factors.b, factors.bias, factors.scale, factors.rank, factors.mag
    if h.dim() != 3 or h.dtype != torch.float32 or h.shape[1] != lanes.num_lanes:
        raise ValueError(f"h must be fp32 (SPLIT_K, L={lanes.num_lanes}, R), got {h.dtype} {tuple(h.shape)}")
    if base.dim() != 2 or b.dim() != 3 or b.shape[1] != base.shape[1] or h.shape[2] < b.shape[2]:
        raise ValueError(
            f"expected base (T, N), b (S, N, R) and h (SPLIT_K, L, >= R); got {tuple(base.shape)}, "
            f"{tuple(b.shape)} and {tuple(h.shape)}"
        )
    num_slots, n, _ = b.shape
    if bias is not None and bias.shape != (num_slots, n):
        raise ValueError(f"bias must be (S, N) = ({num_slots}, {n}), got {tuple(bias.shape)}")
    if scale.shape != (num_slots,) or not scale.is_floating_point():
        raise ValueError(f"scale must be a float (S,) = ({num_slots},) tensor, got {scale.dtype} {tuple(scale.shape)}")
    if rank.shape != (num_slots,) or rank.is_floating_point():
        raise ValueError(f"rank must be an integer (S,) = ({num_slots},) tensor, got {rank.dtype} {tuple(rank.shape)}")
    if mag is not None and (mag.shape != (num_slots, n) or not mag.is_floating_point()):
        raise ValueError(f"mag must be a float (S, N) = ({num_slots}, {n}) tensor, got {mag.dtype} {tuple(mag.shape)}")
    if base_bias is not None and base_bias.shape != (n,):
        raise ValueError(f"base_bias must be (N,) = ({n},), got {tuple(base_bias.shape)}")
    optional = tuple(t for t in (bias, mag, base_bias) if t is not None)
    check_device(h, base, b, scale, rank, lanes.token, *optional)


def _launch(out, h, base, factors: Factors, lanes: Lanes, block_n, block_r, base_bias) -> None:
    b, bias = factors.b, factors.bias
    n = b.shape[1]
    num_chunks = lanes.chunk_slot.shape[1]
    block_n = block_n or (128 if is_interpreted() else 64)
    grid = (num_chunks, triton.cdiv(n, block_n))
    bias_arg = bias if bias is not None else b  # never read without HAS_BIAS
    stride_bias = bias.stride() if bias is not None else (0, 0)
    tile = (h.stride(0), h.stride(1), h.stride(2), b.stride(0), b.stride(1), b.stride(2), *stride_bias)
    blocks = dict(SPLIT_K=h.shape[0], HAS_BIAS=bias is not None, BLOCK_M=lanes.block_m, BLOCK_N=block_n,
                  BLOCK_R=block_r)
    for p in range(lanes.num_passes):  # in order: the lanes of a token add up in a fixed order
        routing = (lanes.token, lanes.weight, lanes.chunk_slot[p], lanes.chunk_start[p], lanes.chunk_end[p])
        with launching():
            if factors.mag is None:
                _expand_kernel[grid](h, b, bias_arg, factors.scale, factors.rank, out, *routing, n, *tile,
                                     out.stride(0), out.stride(1), **blocks)
            else:
                mag = factors.mag
                _dora_expand_kernel[grid](
                    h, b, bias_arg, factors.scale, factors.rank, mag, base,
                    base_bias if base_bias is not None else mag, out,  # never read without HAS_BASE_BIAS
                    *routing, n, *tile, mag.stride(0), mag.stride(1), base.stride(0), base.stride(1),
                    base_bias.stride(0) if base_bias is not None else 0, out.stride(0), out.stride(1),
                    HAS_BASE_BIAS=base_bias is not None, **blocks,
                )
