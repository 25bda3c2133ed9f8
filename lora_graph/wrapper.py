"""LoraGraph: the drop-in wrapper around a Hugging Face model.

``wrap(model)`` patches the model in place and returns a LoraGraph. The model's own parameters and
buffers are never written: LoRA factors live in per-module banks beside them, and the patched
modules call the original ones untouched. Every request names its adapters (a SPEC), per call
(``lm(..., adapters=SPEC)``, ``lm.generate(..., adapters=SPEC)``) or for a block
(``with lm.use(SPEC):``, which also covers plain ``model(...)``, ``model.generate`` and pipelines).

Routing reaches the layers through a forward pre-hook on the top-level model, which builds the
plan from the batch size of the input (see routing.py). Loads are checked whole before any module
is touched, and unloading restores the modules no adapter targets any more, so the set of patched
modules is always exactly the set some loaded adapter targets.

Threading: forwards may run in several threads, each with its own SPEC (context variables).
Loading and unloading while another thread runs a forward is not supported yet.
"""

from __future__ import annotations

import logging
import os
import threading
import types
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from . import ops, patch
from .adapters import read_adapter
from .bank import AdapterBank
from .routing import BASE_NAME, Router, resolve_spec, spec_from_adapter_names

logger = logging.getLogger(__name__)

_UNSET = object()


@dataclass(frozen=True)
class AdapterInfo:
    """What is loaded under one name."""

    name: str
    path: str
    rank: int
    alpha: float
    use_rslora: bool
    targets: tuple[str, ...]
    nbytes: int
    slot: int


class LoraGraph:
    """Many LoRA adapters over one frozen model. Create it with :func:`lora_graph.wrap`."""

    def __init__(self, model: nn.Module, backend: str = "auto", adapter_dtype: torch.dtype = torch.float32) -> None:
        if getattr(model, "_lora_graph", None) is not None:
            raise ValueError("this model is already wrapped by lora_graph; call unwrap() on the existing wrapper first")
        if patch.is_peft_model(model):
            raise ValueError("this model already carries PEFT LoRA layers; pass the plain base model")
        if not isinstance(adapter_dtype, torch.dtype) or not adapter_dtype.is_floating_point:
            raise TypeError(f"adapter_dtype must be a floating torch.dtype, got {adapter_dtype!r}")
        self.model = model
        self.backend = ops.resolve_backend(backend, patch.module_device(model))
        self.adapter_dtype = adapter_dtype
        self._slots: dict[str, int] = {}
        self._infos: dict[str, AdapterInfo] = {}
        self._banks: dict[str, AdapterBank] = {}
        self._originals: dict[str, nn.Module] = {}
        self.router = Router(self._slots)
        self._tokens = threading.local()
        self._hooks = [
            model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            model.register_forward_hook(self._post_forward, always_call=True),
        ]
        model._lora_graph = self
        self._live = True

    # -- adapters ---------------------------------------------------------------------------
    @property
    def adapters(self) -> types.MappingProxyType:
        """Read-only mapping name -> AdapterInfo."""
        return types.MappingProxyType(self._infos)

    def load_adapter(self, name: str, path: str | os.PathLike, allow_pickle: bool = False) -> AdapterInfo:
        """Read a PEFT adapter directory and make it available under ``name``.

        Everything is validated before any module is touched: a failed load leaves the wrapper as
        it was.
        """
        self._check_live()
        if not isinstance(name, str) or not name or name == BASE_NAME:
            raise ValueError(f"invalid adapter name {name!r}")
        if name in self._slots:
            raise ValueError(f"adapter {name!r} is already loaded; unload_adapter({name!r}) first")
        modules = patch.patchable_modules(self.model)
        shapes = {n: patch.shape_of(m) for n, m in modules.items()}
        weights = read_adapter(path, shapes, allow_pickle=allow_pickle, base_weight=lambda n: patch.plain_weight(modules.get(n)))
        slot = min(set(range(len(self._slots) + 1)) - set(self._slots.values()))

        staged = {}
        new_banks = {}
        for mod_name, lora in weights.modules.items():
            bank = self._banks.get(mod_name)
            if bank is None:
                base = modules[mod_name]
                shape = shapes[mod_name]
                bank = AdapterBank(shape.in_features, shape.out_features, patch.module_device(base), self.adapter_dtype)
                new_banks[mod_name] = bank
            staged[mod_name] = bank.stage(slot, lora)
        wrappers = {
            n: patch.make_wrapper(modules[n], bank, self.router, self.backend) for n, bank in new_banks.items()
        }
        # commit: nothing below can fail on valid input
        for mod_name, st in staged.items():
            (new_banks.get(mod_name) or self._banks[mod_name]).commit(st)
        for mod_name, wrapper in wrappers.items():
            self._originals[mod_name] = modules[mod_name]
            self._banks[mod_name] = new_banks[mod_name]
            patch.set_module(self.model, mod_name, wrapper)
        s = weights.settings
        info = AdapterInfo(
            name=name, path=str(path), rank=s.r, alpha=s.lora_alpha, use_rslora=s.use_rslora,
            targets=tuple(sorted(weights.modules)), nbytes=weights.nbytes, slot=slot,
        )
        self._slots[name] = slot
        self._infos[name] = info
        self.router.invalidate()
        logger.info("loaded adapter %r from %s into slot %d (%d modules)", name, path, slot, len(weights.modules))
        return info

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter; modules that no loaded adapter targets any more are restored."""
        self._check_live()
        if name not in self._slots:
            raise ValueError(f"adapter {name!r} is not loaded (loaded: {', '.join(sorted(self._slots)) or 'none'})")
        slot = self._slots.pop(name)
        info = self._infos.pop(name)
        for mod_name in info.targets:
            bank = self._banks[mod_name]
            bank.remove(slot)
            if not bank.present:
                patch.set_module(self.model, mod_name, self._originals.pop(mod_name))
                del self._banks[mod_name]
        self.router.invalidate()

    # -- requests ---------------------------------------------------------------------------
    @contextmanager
    def use(self, spec=None, *, adapter_names=None):
        """Route every forward of the model inside the block with ``spec``.

        Covers ``lm(...)``, plain ``model(...)``, ``model.generate(...)`` and pipelines built on
        the model. ``adapter_names`` is PEFT's spelling (one name per row, ``"__base__"`` for none).
        """
        self._check_live()
        if adapter_names is not None:
            if spec is not None:
                raise ValueError("pass either adapters (a SPEC) or adapter_names, not both")
            spec = spec_from_adapter_names(adapter_names)
        rows = resolve_spec(spec, self._slots)
        token = self.router.set_spec(rows)
        try:
            yield self
        finally:
            self.router.reset_spec(token)

    def __call__(self, *args, adapters=_UNSET, adapter_names=None, **kwargs):
        """``model(*args, **kwargs)`` routed with ``adapters`` (or PEFT's ``adapter_names``)."""
        if adapters is _UNSET and adapter_names is None:
            return self.model(*args, **kwargs)
        with self.use(None if adapters is _UNSET else adapters, adapter_names=adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapters=_UNSET, adapter_names=None, **kwargs):
        """``model.generate(...)`` routed with ``adapters``; expanded rows (beams,
        ``num_return_sequences``) keep their row's adapters."""
        if adapters is _UNSET and adapter_names is None:
            return self.model.generate(*args, **kwargs)
        with self.use(None if adapters is _UNSET else adapters, adapter_names=adapter_names):
            return self.model.generate(*args, **kwargs)

    @torch.compiler.disable
    def _pre_forward(self, module, args, kwargs):
        stack = getattr(self._tokens, "stack", None)
        if stack is None:
            stack = self._tokens.stack = []
        stack.append(self.router.begin_forward(patch.batch_size_of(args, kwargs)))

    @torch.compiler.disable
    def _post_forward(self, module, args, output):
        stack = getattr(self._tokens, "stack", None)
        if stack:
            self.router.end_forward(stack.pop())

    # -- teardown ---------------------------------------------------------------------------
    def unwrap(self) -> nn.Module:
        """Restore the original modules, remove the hooks and return the same model object."""
        self._check_live()
        for mod_name, original in self._originals.items():
            patch.set_module(self.model, mod_name, original)
        for hook in self._hooks:
            hook.remove()
        self._originals.clear()
        self._banks.clear()
        self._slots.clear()
        self._infos.clear()
        del self.model._lora_graph
        self._live = False
        return self.model

    def _check_live(self) -> None:
        if not self._live:
            raise RuntimeError("this wrapper was unwrapped; call lora_graph.wrap(model) again")

    # -- conveniences -----------------------------------------------------------------------
    def __deepcopy__(self, memo):
        return self.router.__deepcopy__(memo)

    def __getattr__(self, name: str):
        # Delegate the rest (config, device, ...) to the model, so the wrapper reads like it.
        if name.startswith("_") or name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def __repr__(self) -> str:
        names = ", ".join(f"{n}(r={i.rank})" for n, i in self._infos.items()) or "no adapters"
        return f"LoraGraph({type(self.model).__name__}, backend={self.backend!r}, {names}, {len(self._banks)} patched modules)"
