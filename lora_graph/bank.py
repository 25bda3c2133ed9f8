"""AdapterBank: the LoRA factors of every loaded adapter for one patched module, stacked by slot.

    a    (S, R, K)   lora_A of each slot, zero past the slot's rank
    b    (S, N, R)   lora_B of each slot, zero past the slot's rank
    bias (S, N)      lora_B bias, allocated only once some adapter has one
    scale[S], rank[S]  per-slot runtime data: never folded into the factors

A slot is an adapter's row; slot ids are global to the wrapper, so one request resolves to the same
slot in every module. A module that an adapter does not target simply does not hold its slot.

Writes are staged: ``stage`` builds whatever new storage a load needs without touching what a
running forward reads, and ``commit`` swaps it in with plain assignments that cannot fail. So a
load that fails half-way through the modules leaves every bank as it was.

``operands`` gathers the used slots for a forward and keeps the result while the set of slots and
the bank are unchanged, so decode steps with the same adapters copy nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapters import ModuleLora


@dataclass
class _Staged:
    slot: int
    lora: ModuleLora
    a: torch.Tensor
    b: torch.Tensor
    bias: torch.Tensor | None


class AdapterBank:
    def __init__(self, in_features: int, out_features: int, device: torch.device, dtype: torch.dtype,
                 slots: int = 0, rank: int = 0) -> None:
        """``slots`` and ``rank`` preallocate the stacked buffers; a load that needs more grows them."""
        self.in_features = in_features
        self.out_features = out_features
        self.device = device
        self.dtype = dtype
        self.a = torch.zeros(slots, rank, in_features, device=device, dtype=dtype)  # (S, R, K)
        self.b = torch.zeros(slots, out_features, rank, device=device, dtype=dtype)  # (S, N, R)
        self.bias: torch.Tensor | None = None  # (S, N)
        self.scale: dict[int, float] = {}
        self.rank: dict[int, int] = {}
        self.with_bias: frozenset[int] = frozenset()
        self.present: frozenset[int] = frozenset()
        # per-slot device tables for the kernels; absent slots hold stale values no lane points at
        self.scale_t = torch.zeros(0, dtype=torch.float32, device=device)
        self.rank_t = torch.zeros(0, dtype=torch.int32, device=device)
        self.version = 0
        self._gathered: tuple | None = None
        self._coef: tuple | None = None

    @property
    def nbytes(self) -> int:
        n = self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()
        return n + (self.bias.numel() * self.bias.element_size() if self.bias is not None else 0)

    def to(self, device: torch.device) -> None:
        """Follow the base module when the model is moved after adapters were loaded."""
        self.a, self.b = self.a.to(device), self.b.to(device)
        self.bias = self.bias.to(device) if self.bias is not None else None
        self.scale_t, self.rank_t = self.scale_t.to(device), self.rank_t.to(device)
        self.device = device
        self._changed()

    def stage(self, slot: int, lora: ModuleLora) -> _Staged:
        """Storage holding ``lora`` in ``slot``; self is not modified."""
        slots = max(self.a.shape[0], slot + 1)
        rank = max(self.a.shape[1], lora.rank)
        a, b, bias = self.a, self.b, self.bias
        if (slots, rank) != tuple(a.shape[:2]):
            a = torch.zeros(slots, rank, self.in_features, device=self.device, dtype=self.dtype)
            a[: self.a.shape[0], : self.a.shape[1]] = self.a
            b = torch.zeros(slots, self.out_features, rank, device=self.device, dtype=self.dtype)
            b[: self.b.shape[0], :, : self.b.shape[2]] = self.b
        if bias is not None and bias.shape[0] < slots or bias is None and lora.bias is not None:
            new_bias = torch.zeros(slots, self.out_features, device=self.device, dtype=self.dtype)
            if bias is not None:
                new_bias[: bias.shape[0]] = bias
            bias = new_bias
        return _Staged(slot, lora, a, b, bias)

    def commit(self, staged: _Staged) -> None:
        """Swap staged storage in and write the slot. The slot is not in use, so writing it in place
        is invisible to a running forward."""
        s, lora = staged.slot, staged.lora
        a, b, bias = staged.a, staged.b, staged.bias
        a[s].zero_()
        a[s, : lora.rank].copy_(lora.a)
        b[s].zero_()
        b[s, :, : lora.rank].copy_(lora.b)
        if bias is not None:
            bias[s].zero_()
            if lora.bias is not None:
                bias[s].copy_(lora.bias)
        self.a, self.b, self.bias = a, b, bias
        self.scale[s] = lora.scale
        self.rank[s] = lora.rank
        slots = a.shape[0]
        self.scale_t = torch.tensor([self.scale.get(i, 0.0) for i in range(slots)], dtype=torch.float32, device=self.device)
        self.rank_t = torch.tensor([self.rank.get(i, 0) for i in range(slots)], dtype=torch.int32, device=self.device)
        self.present = self.present | {s}
        self.with_bias = self.with_bias | {s} if lora.bias is not None else self.with_bias - {s}
        self._changed()

    def remove(self, slot: int) -> None:
        if slot not in self.present:
            return
        self.present = self.present - {slot}
        self.with_bias = self.with_bias - {slot}
        del self.scale[slot]
        del self.rank[slot]
        self._changed()

    def _changed(self) -> None:
        self.version += 1
        self._gathered = None
        self._coef = None

    def operands(self, slots: tuple[int, ...], weight: torch.Tensor):
        """Factors of ``slots`` and the per-lane coefficient ``w · s`` for a ``(D, M)`` weight grid.

        Returns ``(a (D, R, K), b (D, N, R), bias (D, N) | None, coef (D, M, 1) fp32)``.
        """
        gathered = self._gathered
        # keyed by version too: a forward racing a load must not keep a gather of older storage
        if gathered is None or gathered[0] != slots or gathered[5] != self.version:
            idx = torch.tensor(slots, dtype=torch.int64, device=self.device)
            if slots == tuple(range(self.a.shape[0])):
                a, b, bias = self.a, self.b, self.bias
            else:
                a, b = self.a.index_select(0, idx), self.b.index_select(0, idx)
                bias = self.bias.index_select(0, idx) if self.bias is not None else None
            if not self.with_bias.intersection(slots):
                bias = None  # no used slot has a bias: skip adding zeros
            scale = torch.tensor([self.scale[s] for s in slots], dtype=torch.float32, device=self.device)
            gathered = (slots, a, b, bias, scale, self.version)
            self._gathered = gathered
        _, a, b, bias, scale, _ = gathered
        coef = self._coef
        if coef is None or coef[0] is not weight or coef[1] is not scale:
            coef = (weight, scale, (weight * scale.unsqueeze(-1)).unsqueeze(-1))  # (D, M, 1)
            self._coef = coef
        return a, b, bias, coef[2]
