"""Patched modules: the untouched base module plus the LoRA branch of whatever the plan routes.

    LoraLinear.forward(x)    = base(x) + Σ_lanes w·s·(B(A x) + b)     nn.Linear, bnb Linear4bit/8bitLt, Conv1D
    LoraEmbedding.forward(i) = base(i) + Σ_lanes w·s·B(A[:, i]) · embed_scale

The base module is called as a black box, so every quantization format works the same way. The
wrapper keeps the base's parameter names in ``state_dict`` (no ``base_layer.`` infix), and forwards
unknown attributes (``weight``, ``embed_scale``, ...) to it, so model code that reaches into the
module keeps working. Tokens are flattened to ``(T, K)``; the plan maps them to lanes.

Eager forwards (and every torch-backend forward) run the branch outside torch.compile: the routing
plan is Python data. Under torch.compile with the triton backend the layer is traced instead: it
reads the forward's shared lanes (``Router.static``, set by the top-level pre-forward hook) and the
bank's ``tables`` from plain attributes and calls the registered kernel op, so the graph holds the
op and takes routing and weights as inputs. A layer whose token count has no shared lanes, or
whose bank is smaller than the lanes' slot range, takes the eager branch (a graph break).
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .bank import AdapterBank
from .routing import Router

_INFIX = "base_layer."
_STALE = object()  # no bound branch fits this forward


def _strip_infix(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix + _INFIX)]:
        state_dict[prefix + key[len(prefix) + len(_INFIX):]] = state_dict.pop(key)


def _add_infix(module, state_dict, prefix, *args):
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + _INFIX)]:
        state_dict[prefix + _INFIX + key[len(prefix):]] = state_dict.pop(key)


class _LoraModule(nn.Module):
    def __init__(self, base_layer: nn.Module, bank: AdapterBank, router: Router, backend: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.bank = bank
        self.router = router
        self.backend = backend
        self.register_state_dict_post_hook(_strip_infix)
        self.register_load_state_dict_pre_hook(_add_infix)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def _route(self, num_tokens: int, leading_dim: int | None, device: torch.device):
        """This forward's bank state, routing grid and (for triton) lane layout for this module."""
        plan = self.router.current(leading_dim)
        if plan is None:
            return None, None, None
        if self.bank.device != device:
            self.bank.to(device)
        state = self.bank.state  # one snapshot: a concurrent load swaps in a new state, never half of one
        present = state.present
        if not present:
            return None, None, None
        grid = plan.grid(num_tokens, present, device)
        if grid is None or self.backend != "triton":
            return state, grid, None
        num_slots = state.a.shape[0]
        lanes = plan.cached(("lanes", num_tokens, present, device, num_slots),
                            lambda: ops.build_lanes(grid, num_slots, plan.max_lanes, num_tokens))
        return state, grid, lanes

    def extra_repr(self) -> str:
        return f"slots={sorted(self.bank.present)}, backend={self.backend!r}"

    def _traced_operands(self, num_tokens: int, device: torch.device):
        """Under torch.compile with the triton backend: the forward's shared lanes for
        ``num_tokens`` and this bank's tables, all read from plain attributes, so the graph holds
        the kernel op itself and takes routing and weights as inputs (no recompilation when they
        change, and CUDA-graph replays read the new ones). None: take the eager branch instead."""
        static = self.router.static
        if not static:
            return static
        num_slots, entries = static
        lanes = None
        for tokens, candidate in entries:
            if tokens == num_tokens:
                lanes = candidate
        tables = self.bank.tables
        if lanes is None or tables[0].shape[0] < num_slots or tables[0].device != device:
            return None
        return tables, lanes


class LoraLinear(_LoraModule):
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            bound = self._bound_for(x)
            if bound is not _STALE:  # a forward like the last one (a decode step)
                base_layer = self._modules["base_layer"]
                if bound is None:
                    return base_layer(x, *args, **kwargs)
                # what needs only x runs first, next to the caller's other small ops, rather than
                # after the base GEMM has evicted the caches (slightly faster on CPU)
                y = bound[0](x)
                out = base_layer(x, *args, **kwargs)
                return self._branch(x, out) if out.requires_grad else bound[1](y, x, out)
        out = self.base_layer(x, *args, **kwargs)
        if self.backend == "triton" and torch.compiler.is_compiling():
            k = x.shape[-1]
            num_tokens = x.numel() // k
            traced = self._traced_operands(num_tokens, out.device)
            if traced == ():  # a forward without adapters
                return out
            if traced is not None:
                (a, b, bias, scale, rank), lanes = traced
                y = ops.triton_delta(x.reshape(num_tokens, k), out.reshape(num_tokens, -1), a, b, bias, scale, rank,
                                     lanes)
                return y.view(out.shape)
        return self._branch(x, out)

    def _bound_for(self, x: torch.Tensor):
        """The branch bound by the last forward (torch backend) if this one has its plan, bank
        state and input shape, as a decode step has, else ``_STALE``; None: it routes nothing here.
        It is kept on the bank, which drops it when a load or unload swaps in a new state; the state
        is compared all the same, since a forward that started before the swap may bind after it."""
        prepared = self.bank.bound
        if (prepared is not None and prepared[0] is self.router.running_plan() and prepared[1] is self.bank.state
                and prepared[2] == x.shape and prepared[3] == x.device):
            return prepared[4]
        return _STALE

    # Routing is Python data that changes with every request. Under torch.compile it stays outside
    # the graph, so new adapters, weights or mixtures never trigger a recompilation.
    @torch.compiler.disable
    def _branch(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        bound = self._bound_for(x) if not out.requires_grad else _STALE
        if bound is not _STALE:
            return out if bound is None else bound[1](bound[0](x), x, out)
        k = x.shape[-1]
        num_tokens = x.numel() // k if k else 0
        state, grid, lanes = self._route(num_tokens, x.shape[0] if x.dim() == 3 else None, out.device)
        if self.backend == "torch" and state is not None and not out.requires_grad:
            # bind the branch for the next forward like this one (no autograd: ops run in place)
            bound = ops.bound_delta(self.bank, state, grid, x.shape) if grid is not None else None
            plan = self.router.running_plan()
            if plan is not None:
                self.bank.bound = (plan, state, x.shape, x.device, bound)
            if bound is not None:
                return bound[1](bound[0](x), x, out)
        if grid is None:
            return out
        x2, out2 = x.reshape(num_tokens, k), out.reshape(num_tokens, -1)  # (T, K), (T, N)
        return ops.lora_delta(self.backend, x2, out2, self.bank, state, grid, lanes).view(out.shape)


class LoraEmbedding(_LoraModule):
    def forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(ids, *args, **kwargs)
        if self.backend == "triton" and torch.compiler.is_compiling():
            num_tokens = ids.numel()
            traced = self._traced_operands(num_tokens, out.device)
            if traced == ():
                return out
            if traced is not None:
                (a, b, _, scale, rank), lanes = traced
                y = ops.triton_embedding_delta(ids.reshape(num_tokens), out.reshape(num_tokens, -1), a, b, scale,
                                               rank, lanes, getattr(self.base_layer, "embed_scale", None))
                return y.view(out.shape)
        return self._branch(ids, out)

    @torch.compiler.disable
    def _branch(self, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        num_tokens = ids.numel()
        state, grid, lanes = self._route(num_tokens, ids.shape[0] if ids.dim() == 2 else None, out.device)
        if grid is None:
            return out
        embed_scale = getattr(self.base_layer, "embed_scale", None)
        y = ops.lora_embedding_delta(
            self.backend, ids.reshape(num_tokens), out.reshape(num_tokens, -1),  # (T,), (T, N)
            self.bank, state, grid, lanes, embed_scale,
        )
        return y.view(out.shape)
