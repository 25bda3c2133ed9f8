"""The triton backend: the grouped-GEMM kernels of lora_graph.kernels over the whole bank.

    plan ──lanes(T, S)──> Lanes: every (token, slot, weight) of the forward, sorted and chunked, for banks of S slots
    layer: out = triton_ops.lora_delta(x, out, bank.factors, lanes, inplace=True)   (one shrink, one expand)

A bank holding a DoRA slot has ``factors.mag``; the layer then passes its base layer's bias too,
and the expand applies each slot's ``g`` in its epilogue (kernels/expand.py).

A bank holding several ranks keeps one storage per rank and no slot-indexed ``factors``
(lora_graph/bank.py). Its layers run the same two launches on the rows of the slots the plan uses,
gathered into one record once per bank state and slot set (the torch backend's ``Gathered``), with
the lanes' slots renumbered to those rows: the kernels stay the ones above, and the memory stays
per rank. Under torch.compile such a layer takes the eager branch.

One lane layout serves every layer of a forward that sees ``T`` tokens and whose bank has ``S``
slots: it covers every slot the request uses, and a slot a module does not hold has rank 0 there
and adds nothing. So the layout is built once per forward shape, not per layer, and layers traced
into a compiled graph can take it as a graph input.

**Compiled forwards.** Under torch.compile a patched layer is traced: the graph holds the registered
kernel op, whose inputs are the bank's ``factors`` (fixed addresses while the bank does not grow)
and the forward's lanes. The top-level hook publishes those lanes per thread (``traced_inputs``),
for the forward's token count and one token per row (``lm_head`` on the last position), and for
each bank size. They are copied into buffers that stay at fixed addresses per thread and shape, as
vLLM's ``LoRAKernelMeta`` does, so CUDA graphs replay each forward's routing in place. Rows get a
power of two of passes, so mixtures of other sizes mostly keep the shapes; a forward without
adapters publishes ``()``, and traced layers then return the base output.
"""

from __future__ import annotations

import torch

from ..kernels import triton_ops
from ..kernels.factors import Factors
from ..kernels.lanes import Lanes
from .base import Backend, Layout
from .torch import Gathered


def _fixed(lanes: Lanes, buffers: dict, key) -> Lanes:
    """``lanes`` copied into this thread's buffers for ``key``, allocated once at fixed addresses."""
    held = buffers.get(key)
    if held is None or held[0] is not lanes:
        kept = held[1] if held is not None else None
        if kept is None:
            kept = Lanes(*(t.clone() for t in lanes[:5]), lanes.block_m)
            if kept.token.is_cuda:
                for t in kept[:5]:
                    torch._dynamo.mark_static_address(t)
        else:
            torch._foreach_copy_(list(kept[:5]), list(lanes[:5]))
        buffers[key] = (lanes, kept)
        return kept
    return held[1]


class TritonLayout(Layout):
    """Lanes by (token count, bank size or used slots, device). A bank of several rank classes
    (no ``factors``, bank.py) is read through the rows of the slots the plan uses, gathered once
    per bank state and slot set (``gathered``), with the lanes' slots renumbered to those rows."""

    def __init__(self, plan, gathered: Gathered) -> None:
        super().__init__(plan)
        self._lanes: dict = {}
        self._gathered = gathered

    def lanes(self, num_tokens: int, num_slots: int | tuple, device: torch.device) -> Lanes:
        """``num_slots``: the bank's slot count, or the slots whose rows a gathered bank holds."""
        key = (num_tokens, num_slots, device)
        try:
            return self._lanes[key]
        except KeyError:
            if isinstance(num_slots, tuple):
                lanes = self.plan.lanes(num_tokens, len(num_slots), device, rows=num_slots)
            else:
                lanes = self.plan.lanes(num_tokens, num_slots, device)
            self._lanes[key] = lanes
            return lanes

    def operands(self, layer, state, num_tokens: int, device: torch.device) -> tuple[Factors, Lanes] | None:
        """The factors a layer's kernels read and their lanes; None when no lane uses the bank."""
        if state.factors is not None:
            return state.factors, self.lanes(num_tokens, state.factors.num_slots, device)
        used = tuple(sorted({s for lanes in self.plan.sets for s, _ in lanes if s in state.present}))
        if not used:
            return None
        return self._gathered.get(layer, state, used), self.lanes(num_tokens, used, device)

    def bind(self, layer, state, x: torch.Tensor):
        k = x.shape[-1]
        num_tokens = x.numel() // k if k else 0
        found = self.operands(layer, state, num_tokens, x.device)
        if found is None:
            return None
        factors, lanes = found
        base_bias = _base_bias(layer, factors)

        def post(_, x, out):
            inplace = not out.requires_grad
            y = triton_ops.lora_delta(x.reshape(num_tokens, k), out.reshape(num_tokens, -1), factors, lanes,
                                      inplace=inplace, base_bias=base_bias)
            return out if inplace else y.view(out.shape)

        return _no_pre, post

    def embedding(self, layer, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        state = layer.bank.state
        if not state.present:
            return out
        num_tokens = ids.numel()
        found = self.operands(layer, state, num_tokens, out.device)
        if found is None:
            return out
        factors, lanes = found
        y = triton_ops.lora_embedding_delta(ids.reshape(num_tokens), out.reshape(num_tokens, -1), factors,
                                            lanes, getattr(layer.base_layer, "embed_scale", None))
        return y.view(out.shape)


def _no_pre(x):
    return None


def _rows(state, slots: tuple[int, ...], device: torch.device) -> Factors:
    return state.rows_of(slots)


class TritonBackend(Backend):
    name = "triton"

    def __init__(self) -> None:
        self.gathered = Gathered(_rows)

    def prepare(self, plan) -> TritonLayout:
        return TritonLayout(plan, self.gathered)

    def forget(self) -> None:
        self.gathered.clear()

    def traced_inputs(self, layout, num_tokens, bank_sizes, device, buffers):
        """``(((T, S), Lanes), ...)`` for every bank size and each token count a layer may see (all
        of them, or one per row or run: ``lm_head`` on the last position), ``()`` without adapters."""
        if layout is None:
            return ()
        entries = []
        plan = layout.plan
        for tokens in dict.fromkeys((num_tokens, len(plan.sets), sum(plan.kept) if plan.kept else num_tokens)):
            for num_slots in bank_sizes:
                lanes = layout.lanes(tokens, num_slots, device)
                if buffers is not None:
                    lanes = _fixed(lanes, buffers, (tokens, num_slots, lanes.num_passes, device))
                entries.append(((tokens, num_slots), lanes))
        return tuple(entries)

    def traced_linear(self, layer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        entries = layer.router.traced.inputs
        factors = layer.bank.factors  # None: several rank classes, read by the eager branch
        if entries is None or factors is None:  # a forward the top-level hook did not plan, or several ranks
            return _eager_linear(layer, x, out)
        if not entries:  # a forward without adapters
            return out
        k = x.shape[-1]
        num_tokens = x.numel() // k
        lanes = _find(entries, num_tokens, factors.a.shape[0])
        if lanes is None or factors.a.device != out.device:
            return _eager_linear(layer, x, out)
        y = triton_ops.lora_delta(x.reshape(num_tokens, k), out.reshape(num_tokens, -1), factors, lanes, inplace=True,
                                  base_bias=_base_bias(layer, factors))
        return y.view(out.shape)

    def traced_embedding(self, layer, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        entries = layer.router.traced.inputs
        factors = layer.bank.factors  # None: several rank classes, read by the eager branch
        if entries is None or factors is None:
            return _eager_embedding(layer, ids, out)
        if not entries:
            return out
        num_tokens = ids.numel()
        lanes = _find(entries, num_tokens, factors.a.shape[0])
        if lanes is None or factors.a.device != out.device:
            return _eager_embedding(layer, ids, out)
        y = triton_ops.lora_embedding_delta(ids.reshape(num_tokens), out.reshape(num_tokens, -1), factors, lanes,
                                            getattr(layer.base_layer, "embed_scale", None))
        return y.view(out.shape)


def _base_bias(layer, factors) -> torch.Tensor | None:
    """The base layer's own bias, which DoRA slots (``factors.mag``) take off the base output."""
    return getattr(layer.base_layer, "bias", None) if factors.mag is not None else None


def _find(entries, num_tokens: int, num_slots: int) -> Lanes | None:
    """The published lanes for a layer's token count and bank size (unrolled when traced)."""
    found = None
    for key, lanes in entries:
        if key == (num_tokens, num_slots):
            found = lanes
    return found


@torch.compiler.disable
def _eager_linear(layer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    layout = layer.router.current(x)
    bound = None if layout is None else layout.branch(layer, x)
    return out if bound is None else bound[1](bound[0](x), x, out)


@torch.compiler.disable
def _eager_embedding(layer, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    layout = layer.router.current(ids, ids=True)
    return out if layout is None else layout.embedding(layer, ids, out)
