"""Lane layout for the Triton LoRA kernels: lanes sorted by (pass, slot), cut into fixed chunks.

    lanes (token, slot, weight)  ──sort by (pass, slot), drop slot -1──>  token[L], weight[L]
                                 ──cut each segment into BLOCK_M lanes──>  chunk (slot, start, end)[P, C]

A lane is one (token, slot, weight) entry; a token with a weighted set has several lanes. The
kernels run one program per chunk: BLOCK_M consecutive sorted lanes that share one slot, so each
program multiplies by one adapter's factors, the way a grouped GEMM does. Tokens are read through
``token``; activations are never permuted.

**Passes.** The ``p``-th lane of a token (in input order) goes to pass ``p``, so within a pass
every token has at most one lane. The expand kernel runs once per pass and updates its output rows
with a plain load-add-store: no two programs of a launch touch the same row, and the lanes of a
token are summed in a fixed order. The result is deterministic (bitwise, run to run) without
atomics. A request with one adapter per row has one pass; a weighted set of three adapters has
three. The shrink ignores passes and runs all chunks in one launch.

**Static sizes.** Everything is built with torch ops on the lanes' device and sized from upper
bounds known on the host, so building it never synchronises with the device (no ``.item()``, no
boolean-mask indexing, no ``bincount``), and the launch grids depend only on ``L``, ``S`` and the
number of passes. A pass holds at most ``n = min(L, T)`` lanes and cuts into at most
``C = ceil(n / BLOCK_M) + min(S, n)`` chunks (one partial chunk per segment); unused chunks carry
slot -1 and their programs exit at once.

Dropped lanes (slot -1, a slot the bank does not have, or weight 0, which adds an exact zero) and
lanes that no chunk covers sit at the end of ``token``; no kernel reads them. So one list of lanes
over every slot of a forward serves banks of any size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Lanes(NamedTuple):
    """The kernel layout of one forward's lanes for one bank of ``num_slots`` slots.

    ``token``/``weight`` are indexed by sorted lane; the chunk tables by ``(pass, chunk)``. Chunk
    ``[p, c]`` covers sorted lanes ``chunk_start[p, c] <= l < chunk_end[p, c]``, all of slot
    ``chunk_slot[p, c]`` (-1: unused), at most ``block_m`` of them.
    """

    token: torch.Tensor  # (L,) int32
    weight: torch.Tensor  # (L,) fp32, request weight; the slot's scale is applied by the kernel
    chunk_slot: torch.Tensor  # (P, C) int32, -1 = unused chunk
    chunk_start: torch.Tensor  # (P, C) int32
    chunk_end: torch.Tensor  # (P, C) int32
    block_m: int

    @property
    def num_lanes(self) -> int:
        return self.token.shape[0]

    @property
    def num_passes(self) -> int:
        return self.chunk_slot.shape[0]


def default_block_m(num_lanes: int) -> int:
    """Lanes per chunk: small for decode-sized batches, where segments are short."""
    return 16 if num_lanes <= 128 else 64


def lane_passes(lane_token: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(L,)`` int64: the rank of each valid lane among its token's valid lanes, in input order."""
    num_lanes = lane_token.shape[0]
    pos = torch.arange(num_lanes, device=lane_token.device)  # (L,)
    key = torch.where(valid, lane_token.long(), -1)  # (L,) dropped lanes group under token -1
    order = torch.sort(key, stable=True).indices  # (L,)
    sorted_key = key[order]
    first = torch.ones(num_lanes, dtype=torch.bool, device=lane_token.device)
    first[1:] = sorted_key[1:] != sorted_key[:-1]
    group_start = torch.cummax(torch.where(first, pos, 0), 0).values  # (L,)
    return torch.empty_like(pos).scatter_(0, order, pos - group_start)


def build_lanes(
    lane_token: torch.Tensor,
    lane_slot: torch.Tensor,
    lane_weight: torch.Tensor,
    num_slots: int,
    passes: int | None = None,
    num_tokens: int | None = None,
    block_m: int | None = None,
) -> Lanes:
    """Sort lanes by (pass, slot) and cut them into chunks of ``block_m`` lanes.

    Args:
        lane_token: ``(L,)`` integer, the token of each lane.
        lane_slot: ``(L,)`` integer, the slot of each lane, or -1 (no adapter). Slots outside
            ``[0, num_slots)`` are dropped too: a bank with fewer slots does not hold them.
        lane_weight: ``(L,)`` float, the request weight of each lane (any real number; 0 drops it).
        num_slots: ``S``, the bank's slot count (its leading dimension).
        passes: the most lanes any token has, a bound the caller knows on the host (the routing plan:
            the size of the largest weighted set). Lanes past it are dropped, so it must not be too
            small. ``None`` computes it, which synchronises with the device: for tests and tools.
        num_tokens: ``T``, when known: tightens the chunk bound from ``L`` to ``min(L, T)`` per pass.
        block_m: lanes per chunk, the kernels' ``BLOCK_M`` (at least 16 for ``tl.dot``);
            default :func:`default_block_m`.

    Semantics::

        keep = [l for l in range(L) if 0 <= lane_slot[l] < S and lane_weight[l] != 0]
        pass_of[l] = #{l' in keep, l' < l, lane_token[l'] == lane_token[l]}
        order = sorted(keep, key=lambda l: (pass_of[l], lane_slot[l]))  # stable
        token, weight = lane_token[order], lane_weight[order]             # then the dropped lanes
        chunks of pass p: each run of equal slots in order, cut every block_m lanes
    """
    _check_lanes(lane_token, lane_slot, lane_weight)
    num_lanes = lane_token.shape[0]
    block_m = default_block_m(num_lanes) if block_m is None else block_m
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    valid = (lane_slot >= 0) & (lane_slot < num_slots) & (lane_weight != 0)  # (L,)
    lane_pass = lane_passes(lane_token, valid)  # (L,)
    if passes is None:
        passes = int(torch.where(valid, lane_pass + 1, 0).max()) if num_lanes else 0  # host sync
    passes = max(int(passes), 1)
    groups = passes * num_slots  # one segment per (pass, slot)
    key = torch.where(valid & (lane_pass < passes), lane_pass * num_slots + lane_slot.long(), groups)  # (L,)
    order = torch.sort(key, stable=True).indices  # (L,)
    token = lane_token.index_select(0, order).to(torch.int32)
    weight = lane_weight.index_select(0, order).to(torch.float32)
    per_pass = num_lanes if num_tokens is None else min(num_lanes, num_tokens)
    chunks = -(-per_pass // block_m) + min(num_slots, per_pass)  # C, upper bound per pass
    if chunks == 0 or num_slots == 0:
        empty = torch.zeros(passes, 0, dtype=torch.int32, device=lane_token.device)
        return Lanes(token, weight, empty, empty, empty, block_m)
    return Lanes(token, weight, *_chunk_tables(key, passes, num_slots, chunks, block_m), block_m)


def _check_lanes(lane_token: torch.Tensor, lane_slot: torch.Tensor, lane_weight: torch.Tensor) -> None:
    if not (lane_token.dim() == lane_slot.dim() == lane_weight.dim() == 1):
        raise ValueError("lane_token, lane_slot and lane_weight must be 1-D")
    num_lanes = lane_token.shape[0]
    if lane_slot.shape[0] != num_lanes or lane_weight.shape[0] != num_lanes:
        raise ValueError(
            f"lane arrays differ in length: token {num_lanes}, slot {lane_slot.shape[0]}, "
            f"weight {lane_weight.shape[0]}"
        )
    if lane_weight.is_complex() or not lane_weight.is_floating_point():
        raise TypeError(f"lane_weight must be a float tensor, got {lane_weight.dtype}")


def _chunk_tables(key: torch.Tensor, passes: int, num_slots: int, chunks: int, block_m: int):
    """``(chunk_slot, chunk_start, chunk_end)``, each ``(P, C)`` int32, from every lane's segment
    key (``pass * S + slot``; ``P * S`` for a dropped lane), with torch ops only."""
    device = key.device
    groups = passes * num_slots
    count = torch.zeros(groups + 1, dtype=torch.int64, device=device)
    count.index_add_(0, key, torch.ones_like(key))  # (P*S + 1,) lanes per segment, dropped last
    seg_end = count.cumsum(0)[:groups].view(passes, num_slots)  # (P, S)
    count = count[:groups].view(passes, num_slots)  # (P, S)
    seg_start = seg_end - count
    seg_chunks = (count + block_m - 1) // block_m  # (P, S)
    chunk_end_of_seg = seg_chunks.cumsum(1)  # (P, S) inclusive
    idx = torch.arange(chunks, device=device).expand(passes, chunks).contiguous()  # (P, C)
    slot = torch.searchsorted(chunk_end_of_seg, idx, right=True)  # (P, C); S past the last segment
    used = slot < num_slots
    slot = slot.clamp_(max=num_slots - 1)
    first_chunk = (chunk_end_of_seg - seg_chunks).gather(1, slot)  # (P, C)
    start = seg_start.gather(1, slot) + (idx - first_chunk) * block_m
    end = torch.minimum(start + block_m, seg_end.gather(1, slot))
    return (torch.where(used, slot, -1).to(torch.int32), torch.where(used, start, 0).to(torch.int32),
            torch.where(used, end, 0).to(torch.int32))
