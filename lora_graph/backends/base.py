"""The interface every backend implements, and the layout binding they share (see __init__.py)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Backend(ABC):
    """One way to compute the LoRA branch. ``name`` is for display; nothing branches on it."""

    name: str

    @abstractmethod
    def prepare(self, plan) -> Layout:
        """The layout of a routing plan, shared by every layer of the forwards that use it."""

    @abstractmethod
    def traced_inputs(self, layout: Layout | None, num_tokens: int, bank_sizes: tuple[int, ...],
                      device: torch.device, buffers: dict | None):
        """What layers traced into a compiled graph read for one forward of ``num_tokens`` tokens
        (published per thread), for the banks' slot counts. ``layout`` None: a forward without
        adapters. ``buffers``: this thread's fixed-address storage, or None."""

    def forget(self) -> None:
        """A bank changed: drop whatever was derived from the old banks."""

    @abstractmethod
    def traced_linear(self, layer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """A patched linear layer's branch under torch.compile, ``out`` being its base output."""

    @abstractmethod
    def traced_embedding(self, layer, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The same for an embedding."""


class Layout(ABC):
    """A plan prepared by a backend. It binds each layer's branch for the bank state and input
    shape it saw, and hands the same branch to the next forward like it (a decode step), skipping
    the routing lookups. Layouts are derived data: forwards of several threads may fill one at
    once (each entry is written whole), and the Router drops them all when a bank changes."""

    def __init__(self, plan) -> None:
        self.plan = plan
        self._branches: dict = {}  # layer -> (state, shape, device, (pre, post) | None)

    def branch(self, layer, x: torch.Tensor):
        """``(pre, post)`` for ``layer`` on ``x``, or None when nothing routes there."""
        entry = self._branches.get(layer)
        state = layer.bank.state
        if entry is not None and entry[0] is state and entry[1] == x.shape and entry[2] == x.device:
            return entry[3]
        if layer.bank.device != x.device:  # the model moved after its adapters were loaded
            layer.bank.follow(x.device)
            state = layer.bank.state
        bound = self.bind(layer, state, x) if state.present else None
        self._branches[layer] = (state, x.shape, x.device, bound)
        return bound

    @abstractmethod
    def bind(self, layer, state, x: torch.Tensor):
        """``(pre, post)`` of ``layer`` for bank ``state`` and inputs shaped like ``x``: ``pre(x)``
        runs before the base layer, ``post(pre(x), x, out)`` adds the branch to its output ``out``
        (in place where autograd allows) and returns it. None: nothing routes to this layer."""

    @abstractmethod
    def embedding(self, layer, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """An embedding layer's output ``out`` plus its branch."""
