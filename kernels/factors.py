"""The LoRA factors of every slot of one module, stacked by slot: what the kernels read.

    a      (S, R, K)  lora_A of each slot, as PEFT stores it; values past a slot's rank are never read
    b      (S, N, R)  lora_B of each slot
    bias   (S, N)     lora_B bias, or None when no slot has one
    scale  (S,)       fp32, ``alpha / r`` (or ``alpha / sqrt(r)``) of each slot; never folded into B
    rank   (S,)       integer real rank of each slot; 0 for a slot this module does not hold

One record, passed whole from the bank to the backends, the kernels and the reference, so that a
new per-slot quantity is one new field rather than one new argument in every signature. The custom
ops of triton_ops.py take its fields one by one, since ``torch.library`` ops take tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Factors(NamedTuple):
    a: torch.Tensor  # (S, R, K)
    b: torch.Tensor  # (S, N, R)
    bias: torch.Tensor | None  # (S, N)
    scale: torch.Tensor  # (S,) fp32
    rank: torch.Tensor  # (S,) integer

    @property
    def num_slots(self) -> int:
        return self.a.shape[0]
