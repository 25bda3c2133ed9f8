"""LoRA shrink: every lane's input times its slot's A.

    h[l, :rank] = x[token_l] · A[slot_l, :rank]ᵀ        fp32, l a sorted lane

One program computes a (BLOCK_M lanes) × (BLOCK_R ranks) tile over one K-split. The
lanes of a chunk share a slot (kernels/lanes.py), so the tile is a small GEMM against one
adapter's A. Its rank block exits at once past the slot's real rank: mixed ranks share one launch
and cost follows each slot's rank, not the bank's padded R. Columns past a slot's rank are left
unwritten; the expand never reads them.

**Split-K.** Decode has few lanes and few chunks, so A (R×K per slot) is read by few programs. The
launcher splits K across ``SPLIT_K`` programs that write separate partial sums
``h (SPLIT_K, L, R)``; the expand adds them in a fixed order. No atomics, so the result stays
deterministic.

**Not fused across sibling projections.** q/k/v (and gate/up) read the same x with the same lanes,
so one launch could shrink all three. Hugging Face models call them as three separate modules,
though, and a shared shrink would need the first call to hand its result to the other two through
a side channel keyed on the input tensor, which cannot exist inside a compiled graph where each
layer is one opaque op. Models that fuse the projections in one module (``c_attn``, ``qkv_proj``)
get one shrink for all three anyway.

**Numerics.** Products are formed exactly and summed in fp32: a 16-bit ``tl.dot`` when x and A
share the dtype (bf16×bf16 products are exact in fp32), an fp32 ``ieee`` dot otherwise. Triton's
interpreter multiplies bf16 bit patterns as integers in ``tl.dot``, so under it bf16 tiles go
through the fp32 dot, which gives the same products.

The embedding variant gathers instead of multiplying: h[l, :rank] = A[slot_l, :rank, ids[token_l]].
"""

from __future__ import annotations

import contextlib
import threading

import torch
import triton
import triton.language as tl

from .factors import Factors
from .lanes import Lanes

_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _shrink_kernel(
    # pointers
    x_ptr, a_ptr, rank_ptr, h_ptr, token_ptr, chunk_slot_ptr, chunk_start_ptr, chunk_end_ptr,
    # sizes
    K, k_per_split,
    # strides
    stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_hs, stride_hl, stride_hr,
    # constexprs
    R_BLOCKS: tl.constexpr, SPLIT_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One flat grid, chunk slowest: the programs that read one chunk's x tiles run side by side.
    pid = tl.program_id(0)
    pid_r = pid % R_BLOCKS
    pid_s = (pid // R_BLOCKS) % SPLIT_K
    pid_c = pid // (R_BLOCKS * SPLIT_K)
    slot = tl.load(chunk_slot_ptr + pid_c)
    if slot < 0:
        return
    rank = tl.load(rank_ptr + slot)
    if pid_r * BLOCK_R >= rank:
        return

    start = tl.load(chunk_start_ptr + pid_c)
    end = tl.load(chunk_end_ptr + pid_c)
    offs_m = start + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < end
    mask_r = offs_r < rank
    token = tl.load(token_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    x_rows = x_ptr + token[:, None] * stride_xt  # (BLOCK_M, 1)
    a_cols = a_ptr + slot.to(tl.int64) * stride_as + offs_r[None, :] * stride_ar  # (1, BLOCK_R)

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_start = pid_s * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_stop
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        at = tl.load(a_cols + offs_k[:, None] * stride_ak, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc += tl.dot(x.to(DOT_DTYPE), at.to(DOT_DTYPE), input_precision="ieee")

    h_ptrs = h_ptr + pid_s * stride_hs + offs_m[:, None] * stride_hl + offs_r[None, :] * stride_hr
    tl.store(h_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _embedding_shrink_kernel(
    # pointers
    ids_ptr, a_ptr, rank_ptr, h_ptr, token_ptr, chunk_slot_ptr, chunk_start_ptr, chunk_end_ptr,
    # sizes
    V,
    # strides
    stride_as, stride_ar, stride_av, stride_hl, stride_hr,
    # constexprs
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    slot = tl.load(chunk_slot_ptr + pid_c)
    if slot < 0:
        return
    rank = tl.load(rank_ptr + slot)
    if pid_r * BLOCK_R >= rank:
        return
    start = tl.load(chunk_start_ptr + pid_c)
    end = tl.load(chunk_end_ptr + pid_c)
    offs_m = start + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < end
    mask_r = offs_r < rank
    token = tl.load(token_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    ids = tl.load(ids_ptr + token, mask=mask_m, other=0).to(tl.int64)
    mask = mask_m[:, None] & mask_r[None, :] & (ids[:, None] >= 0) & (ids[:, None] < V)
    a_ptrs = a_ptr + slot.to(tl.int64) * stride_as + offs_r[None, :] * stride_ar + ids[:, None] * stride_av
    h = tl.load(a_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(h_ptr + offs_m[:, None] * stride_hl + offs_r[None, :] * stride_hr, h, mask=mask_m[:, None] & mask_r[None, :])


def is_interpreted() -> bool:
    """Whether the kernels were defined under ``TRITON_INTERPRET=1`` (read when triton decorates them)."""
    return not isinstance(_shrink_kernel, triton.runtime.JITFunction)


# Triton's interpreter swaps triton.language's implementation process-wide while a kernel runs, so
# two threads interpreting kernels at once break each other. Interpreted launches take this lock;
# compiled launches never do.
_INTERPRETER_LOCK = threading.Lock()


def launching():
    """The context every launch runs in: the interpreter's lock, or nothing on a GPU."""
    return _INTERPRETER_LOCK if is_interpreted() else contextlib.nullcontext()


def check_device(*tensors: torch.Tensor) -> None:
    """Triton launches need GPU tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"all tensors must be on one device, got {device} and {t.device}")
    interpreted = is_interpreted()
    if device.type == "cpu" and not interpreted:
        raise RuntimeError(
            "lora_graph.kernels: the Triton kernels need GPU tensors, got CPU tensors. Use the torch "
            "path (lora_graph.kernels.reference) on CPU, or set TRITON_INTERPRET=1 before triton is "
            "imported to run the kernels in Triton's interpreter (slow; for tests)."
        )
    if device.type != "cpu" and interpreted:
        raise RuntimeError(f"TRITON_INTERPRET=1 runs Triton kernels on CPU tensors only; got {device} tensors")


def dot_dtype(x_dtype: torch.dtype, a_dtype: torch.dtype):
    """16-bit ``tl.dot`` when both operands share a 16-bit dtype, else the fp32 ``ieee`` dot."""
    if x_dtype != a_dtype or x_dtype not in _DOT_DTYPES:
        return tl.float32
    if x_dtype == torch.bfloat16 and is_interpreted():
        return tl.float32  # the interpreter's tl.dot multiplies bf16 bit patterns as integers
    return _DOT_DTYPES[x_dtype]


@torch.compiler.assume_constant_result
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_split_k(num_programs: int, k: int, block_k: int, device: torch.device) -> int:
    """Split K until the launch has about two programs per SM, keeping two K tiles per split."""
    if device.type != "cuda":
        return 1
    target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    split = 1
    while split < 32 and num_programs * split * 2 <= target and k >= 2 * split * 2 * block_k:
        split *= 2
    return split


def lora_shrink(
    x: torch.Tensor,
    factors: Factors,
    lanes: Lanes,
    split_k: int | None = None,
    block_r: int = 16,
    block_k: int = 128,
) -> torch.Tensor:
    """Shrink every lane through its slot's A.

    Args:
        x: ``(T, K)`` activations, fp32, fp16 or bf16, any strides.
        factors: the bank; ``a (S, R, K)`` and ``rank (S,)`` are read, A zero or not past each
            slot's rank (columns past it are never read).
        lanes: the layout from :func:`kernels.lanes.build_lanes` for ``S`` slots.
        split_k: K-splits (partial sums the expand adds); default: enough to fill the GPU.

    Returns:
        ``h (SPLIT_K, L, R)`` fp32 partial sums, the input of :func:`kernels.expand.lora_expand`.
        Only ``h[:, l, :rank]`` of lanes that a chunk covers is written.

    Semantics::

        h = torch.empty(SPLIT_K, L, R)
        for l in covered lanes, s = slot of l's chunk, r = rank[s]:
            h[:, l, :r] = split_k partial sums of x[token[l]].float() @ a[s, :r].float().T
    """
    a, rank = factors.a, factors.rank
    if x.dim() != 2:
        raise ValueError(f"x must be (T, K), got shape {tuple(x.shape)}")
    k = x.shape[1]
    if a.dim() != 3 or a.shape[2] != k:
        raise ValueError(f"a must be (S, R, {k}), got shape {tuple(a.shape)}")
    if rank.shape != (a.shape[0],) or rank.is_floating_point():
        raise ValueError(f"rank must be an integer (S,) = ({a.shape[0]},) tensor, got {rank.dtype} {tuple(rank.shape)}")
    check_device(x, a, rank, lanes.token, lanes.chunk_slot)

    num_chunks = lanes.chunk_slot.numel()
    r = a.shape[1]
    r_blocks = triton.cdiv(max(r, 1), block_r)
    if split_k is None:
        split_k = default_split_k(num_chunks * r_blocks, k, block_k, x.device)
    h = torch.empty(split_k, lanes.num_lanes, r, dtype=torch.float32, device=x.device)
    if num_chunks == 0 or r == 0 or k == 0:
        return h.zero_()
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    with launching():
        _shrink_kernel[(num_chunks * split_k * r_blocks,)](
            x, a, rank, h, lanes.token, lanes.chunk_slot, lanes.chunk_start, lanes.chunk_end,
            k, k_per_split,
            x.stride(0), x.stride(1), *a.stride(), *h.stride(),
            R_BLOCKS=r_blocks, SPLIT_K=split_k, DOT_DTYPE=dot_dtype(x.dtype, a.dtype),
            BLOCK_M=lanes.block_m, BLOCK_R=block_r, BLOCK_K=block_k,
        )
    return h


def lora_embedding_shrink(ids: torch.Tensor, factors: Factors, lanes: Lanes, block_r: int = 16) -> torch.Tensor:
    """Gather every lane's A column: ``h (1, L, R)`` fp32 with ``h[0, l, :rank] = A[slot_l, :rank, ids[token_l]]``.

    Args:
        ids: ``(T,)`` integer token ids; an id outside ``[0, V)`` gathers zeros.
        factors: the bank; ``a (S, R, V)`` (lora_embedding_A, as PEFT stores it) and ``rank`` are read.

    Semantics::

        for l in covered lanes, s = slot of l's chunk:
            h[0, l, :rank[s]] = a[s, :rank[s], ids[token[l]]].float()
    """
    a, rank = factors.a, factors.rank
    if ids.dim() != 1 or a.dim() != 3 or rank.shape != (a.shape[0],) or rank.is_floating_point():
        raise ValueError(
            f"expected ids (T,), a (S, R, V) and an integer rank (S,), got {tuple(ids.shape)}, "
            f"{tuple(a.shape)} and {rank.dtype} {tuple(rank.shape)}"
        )
    check_device(ids, a, rank, lanes.token)
    num_chunks = lanes.chunk_slot.numel()
    r = a.shape[1]
    h = torch.empty(1, lanes.num_lanes, r, dtype=torch.float32, device=a.device)
    if num_chunks == 0 or r == 0:
        return h.zero_()
    grid = (num_chunks, triton.cdiv(r, block_r))
    with launching():
        _embedding_shrink_kernel[grid](
            ids, a, rank, h[0], lanes.token, lanes.chunk_slot, lanes.chunk_start, lanes.chunk_end,
            a.shape[2],
            a.stride(0), a.stride(1), a.stride(2), h.stride(1), h.stride(2),
            BLOCK_M=lanes.block_m, BLOCK_R=block_r,
        )
    return h
