"""The LoRA factors of every slot of one module, stacked by slot: what the kernels read.

    a      (S, R, K)  lora_A of each slot, as PEFT stores it; values past a slot's rank are never read
    b      (S, N, R)  lora_B of each slot
    bias   (S, N)     lora_B bias, or None when no slot has one
    scale  (S,)       fp32, ``alpha / r`` (or ``alpha / sqrt(r)``) of each slot; never folded into B
    rank   (S,)       integer real rank of each slot; 0 for a slot this module does not hold
    mag    (S, N)     fp32, DoRA's ``g = m / ‖W + s·B·A‖`` of each slot (1 for a LoRA slot), or None
                      when no slot is DoRA

One record, passed whole from the bank to the backends, the kernels and the reference, so that a
new per-slot quantity is one new field rather than one new argument in every signature. The custom
ops of triton_ops.py take its fields one by one, since ``torch.library`` ops take tensors.

**DoRA.** A lane of a slot with ``mag`` adds ``w · (s·g ⊙ (B(Ax) + b) + (g − 1) ⊙ (base − base_bias))``,
where ``base_bias`` is the base layer's own bias (PEFT subtracts it from the base output). With
``g = 1`` that is the LoRA lane exactly, so LoRA and DoRA slots share every op.
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
    mag: torch.Tensor | None = None  # (S, N) fp32

    @property
    def num_slots(self) -> int:
        return self.a.shape[0]
