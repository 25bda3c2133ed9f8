"""LoraGraph: the drop-in wrapper around a Hugging Face model, and the facade of the library.

``wrap(model)`` patches the model in place and returns a LoraGraph. The model's own parameters and
buffers are never written: LoRA factors live in per-module banks beside them, and the patched
modules call the original ones untouched. Every request names its adapters (a SPEC), per call
(``lm(..., adapters=SPEC)``, ``lm.generate(..., adapters=SPEC)``) or for a block
(``with lm.use(SPEC):``, which also covers plain ``model(...)``, ``model.generate`` and pipelines).

The wrapper holds the registry and the requests, and installs the two top-level hooks; the rest
sits behind it:

    registry (AdapterInfo, paths) ──read──> host cache (store.py) ──page in──> slot table (slots.py)
                                                                  └──place──> banks of the patched modules (patch.py)
    use(SPEC) ──resolve, hold slots──> Router (routing.py) ──pre-forward hook──> layout (backends/) ──> layers

Adapters live in three tiers: registered (a folder, a Hub snapshot or host tensors: registry.py and
sources.py), cached on the host, and resident in one of ``max_loaded`` device slots. A request that
names a registered adapter pages it in before its first forward, evicting the least recently used
slot that no running request holds and no one pinned. Switching adapters between requests copies
nothing: only the routing changes.

Threading model. One lock serialises registration, loading, paging, replacing and unloading.
Forwards take no lock: a request resolves its names to slots once, when it starts, and holds those
slots until it ends. A held slot is never evicted or rewritten; replacing or unloading an adapter
that a running request uses puts the new weights in another slot (replace) or removes the name at
once (unload), and frees the old slot when its last request ends. So every forward sees a
consistent snapshot of the slots it uses.
"""

from __future__ import annotations

import logging
import sys
import threading
import types
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from . import notebook, patch
from .backends import resolve_backend
from .bulk import Bulk
from .compat import Compat
from .export import Export
from .registry import Registry
from .residency import Residency
from .routing import BASE_NAME, Router, resolve_spec, spec_from_adapter_names
from .slots import SlotTable
from .store import AdapterInfo, HostCache

logger = logging.getLogger(__name__)

_UNSET = object()


def progress_bar(items, desc: str, enabled: bool = True):
    """A tqdm.auto bar over ``items``: a widget in a notebook, text on a terminal, and nothing for a
    script writing to a pipe or a file, for fewer than two items, or with ``enabled=False``."""
    items = list(items)
    in_notebook = "ipykernel.zmqshell" in sys.modules  # the check tqdm.auto makes to draw a widget
    shown = enabled and len(items) >= 2 and (in_notebook or sys.stderr.isatty())
    return tqdm(items, desc=desc, disable=not shown)


class Lease:
    """Slots held for one request (see :meth:`LoraGraph.lease`); ``release`` is idempotent."""

    def __init__(self, owner: LoraGraph, request, held: dict[str, int]) -> None:
        self.request, self._owner, self._held = request, owner, held
        self._released = False
        self._guard = threading.Lock()

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._held)

    @property
    def slots(self) -> dict[str, int]:
        """Adapter name → the slot held for it."""
        return dict(self._held)

    def release(self) -> None:
        with self._guard:
            if self._released:
                return
            self._released = True
        self._owner._release(self._held)


def _check_arguments(model, adapter_dtype, max_loaded, max_cpu, max_rank) -> None:
    if getattr(model, "_lora_graph", None) is not None:
        raise ValueError("this model is already wrapped by lora_graph; call unwrap() on the existing wrapper first")
    if patch.is_peft_model(model):
        raise ValueError("this model already carries PEFT LoRA layers; pass the plain base model")
    if not isinstance(adapter_dtype, torch.dtype) or not adapter_dtype.is_floating_point:
        raise TypeError(f"adapter_dtype must be a floating torch.dtype, got {adapter_dtype!r}")
    for knob, value in (("max_loaded", max_loaded), ("max_rank", max_rank)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{knob} must be a positive int or None, got {value!r}")
    if max_cpu is not None and (isinstance(max_cpu, bool) or not isinstance(max_cpu, int) or max_cpu < 0):
        raise ValueError(f"max_cpu must be a non-negative int or None, got {max_cpu!r}")


class LoraGraph(Registry, Bulk, Export, Compat):
    """Many LoRA adapters over one frozen model. Create it with :func:`lora_graph.wrap`."""

    def __init__(self, model: nn.Module, backend: str = "auto", adapter_dtype: torch.dtype = torch.float32,
                 max_loaded: int | None = None, max_cpu: int | None = 8, max_rank: int | None = None,
                 progress: bool = True) -> None:
        _check_arguments(model, adapter_dtype, max_loaded, max_cpu, max_rank)
        device = patch.execution_device(model)
        self.model = model
        self.router = Router(resolve_backend(backend, device), device)
        self.backend = self.router.backend.name
        self.adapter_dtype, self.max_loaded, self.max_rank, self.progress = adapter_dtype, max_loaded, max_rank, progress
        self._lock = threading.RLock()
        self._patched = patch.PatchedModules(model, self.router, adapter_dtype, max_loaded, max_rank, self._lock)
        self._slots = SlotTable(max_loaded)
        self._host = HostCache(max_cpu)
        self._resident = Residency(self._patched, self._slots, self._host, adapter_dtype, max_rank)
        self._infos: dict[str, AdapterInfo] = {}  # the registry
        self._sources: dict = {}  # name -> sources.Source, where its weights are read from
        self._hooks = [model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
                       model.register_forward_hook(self._post_forward, always_call=True)]
        object.__setattr__(model, "_lora_graph", self)  # a plain attribute, never a submodule
        self._shadowed = patch.shadow_integrations(model)
        self._live = True

    # -- registry ---------------------------------------------------------------------------
    @property
    def adapters(self) -> types.MappingProxyType:
        """Read-only mapping name -> AdapterInfo of every registered adapter."""
        return types.MappingProxyType(self._infos)

    @property
    def resident(self) -> tuple[str, ...]:
        """Adapters in device slots, least recently used first."""
        return self._slots.resident

    @property
    def pinned(self) -> frozenset[str]:
        return frozenset(self._slots.pinned)

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter. Requests already running with it finish with it (its slot is freed
        when the last one ends); modules that no resident adapter targets any more are restored."""
        self._check_live()
        with self._lock:
            self._require(name)
            del self._infos[name]
            self._sources.pop(name, None)
            self._host.drop(name)
            self._forget_default(name)
            slot = self._slots.remove(name)
            if slot is not None:
                self._resident.release(slot, restore=True)
            self._patched.restore_empty()

    def pin(self, name: str) -> None:
        """Make ``name`` resident now and never evict it until :meth:`unpin`."""
        with self._lock:
            self._require(name)
            pinned = self._slots.pinned
            if self.max_loaded is not None and name not in pinned and len(pinned) >= self.max_loaded:
                raise ValueError(f"cannot pin {name!r}: all {self.max_loaded} slots are pinned already")
            self._resident.page_in([name], {name}, self._host_copy)
            pinned.add(name)

    def unpin(self, name: str) -> None:
        with self._lock:
            self._require(name)
            self._slots.pinned.discard(name)

    def evict(self, name: str) -> bool:
        """Give up ``name``'s slot now, unless it is pinned or a running request holds it; it stays
        registered (and cached on the host). True when it was evicted."""
        with self._lock:
            self._require(name)
            slot = self._slots.get(name)
            if slot is None or name in self._slots.pinned or name not in self._slots.evictable():
                return False
            self._resident.release(self._slots.remove(name), restore=False)
            return True

    def prefetch(self, names) -> None:
        """Read adapters ahead of their requests and make them resident while slots allow,
        without evicting anything pinned or in use."""
        names = [names] if isinstance(names, str) else list(names)
        with self._lock:
            for name in names:
                self._require(name)
            self._resident.prefetch(progress_bar(names, "prefetching adapters", self.progress), self._host_copy)

    def memory(self) -> dict:
        """Bytes per tier: device slot buffers and the adapter bytes they hold, the host cache, and
        the host copies of in-memory adapters (``host.in_memory``, kept while they are registered)."""
        with self._lock:
            out = {**self._resident.memory(), "registered": len(self._infos)}
            out["host"]["in_memory"] = sum(source.nbytes for source in self._sources.values())
            return out

    # -- requests ---------------------------------------------------------------------------
    def lease(self, spec=None, *, adapter_names=None) -> Lease:
        """Page in the adapters ``spec`` names and hold their slots until ``release()``: what a
        request does for its whole life, also when it spans many forwards and threads (a serving
        engine's requests). ``lease.request`` is the SPEC resolved to the held slots."""
        self._check_live()
        if adapter_names is not None:
            if spec is not None:
                raise ValueError("pass either adapters (a SPEC) or adapter_names, not both")
            spec = spec_from_adapter_names(adapter_names)
        ahead = self._resident.read_ahead(spec, self._infos, self._sources)  # no lock: reading is slow
        with self._lock:
            request = resolve_spec(spec, self._infos)
            names = request.names
            if self.max_loaded is not None and len(names) > self.max_loaded:
                raise ValueError(
                    f"this request uses {len(names)} distinct adapters but max_loaded={self.max_loaded}; "
                    "split the batch or wrap with a larger max_loaded"
                )
            self._resident.page_in(sorted(names), set(names), lambda n: self._host_copy(n, ahead.get(n)))
            held = self._slots.hold(names)
        return Lease(self, request.slotted(held), held)

    def _release(self, held: dict[str, int]) -> None:
        with self._lock:
            self._resident.unhold(held)

    @contextmanager
    def use(self, spec=None, *, adapter_names=None):
        """Route every forward of the model inside the block with ``spec``.

        Covers ``lm(...)``, plain ``model(...)``, ``model.generate(...)`` and pipelines built on
        the model. ``adapter_names`` is PEFT's spelling (one name per row, ``"__base__"`` for none).
        Adapters the SPEC names are paged in first; the block holds their slots until it exits.
        """
        lease = self.lease(spec, adapter_names=adapter_names)
        scope = self.router.enter(lease.request)
        try:
            yield self
        finally:
            self.router.leave(scope)
            lease.release()

    def generate_batch(self, inputs, adapters=None, max_new_tokens: int = 16, **sampling) -> list[list[int]]:
        """Continuous batching, offline: ``inputs`` are token-id lists, ``adapters`` one SPEC per
        input; returns each input's generated ids, in order. Requests share forward passes and
        join and leave them at every step (lora_graph.serve.engine); ``do_sample``, ``temperature``,
        ``top_p`` and ``seed`` are honoured per request."""
        from .serve.engine import generate_batch

        return generate_batch(self, inputs, adapters, max_new_tokens=max_new_tokens, **sampling)

    def __call__(self, *args, adapters=_UNSET, adapter_names=None, **kwargs):
        """``model(*args, **kwargs)`` routed with ``adapters`` (or PEFT's ``adapter_names``)."""
        if adapters is _UNSET and adapter_names is None:
            return self.model(*args, **kwargs)
        with self.use(None if adapters is _UNSET else adapters, adapter_names=adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapters=_UNSET, adapter_names=None, **kwargs):
        """``model.generate(...)`` routed with ``adapters``; expanded rows (beams,
        ``num_return_sequences``) keep their row's adapters."""
        expanding = self.router.expanding(patch.generate_expansion(self.model, kwargs))
        if adapters is _UNSET and adapter_names is None:
            with expanding:
                return self.model.generate(*args, **kwargs)
        with self.use(None if adapters is _UNSET else adapters, adapter_names=adapter_names), expanding:
            return self.model.generate(*args, **kwargs)

    @torch.compiler.disable
    def _pre_forward(self, module, args, kwargs):
        self.router.begin_forward(*patch.batch_shape_of(args, kwargs))

    @torch.compiler.disable
    def _post_forward(self, module, args, output):
        self.router.end_forward()

    # -- checks -----------------------------------------------------------------------------
    def _check_name(self, name, replace: bool) -> None:
        if not isinstance(name, str) or not name or name == BASE_NAME:
            raise ValueError(f"invalid adapter name {name!r}")
        if name in self._infos and not replace:
            raise ValueError(f"adapter {name!r} is already registered; unload_adapter({name!r}) first")

    def _require(self, name: str) -> None:
        if not isinstance(name, str):  # a list would fail as "unhashable"
            raise TypeError(f"expected one adapter name (a str), got {name!r}; delete_adapter takes a list")
        if name not in self._infos:
            raise ValueError(f"unknown adapter {name!r} (registered: {', '.join(sorted(self._infos)) or 'none'})")

    # -- teardown ---------------------------------------------------------------------------
    def unwrap(self) -> nn.Module:
        """Restore the original modules, remove the hooks and return the same model object."""
        self._check_live()
        self._forget_default()
        with self._lock:
            self._patched.unpatch()
            for hook in self._hooks:
                hook.remove()
            self._slots.clear()
            self._infos.clear()
            patch.unshadow(self.model, self._shadowed)
            del self.model._lora_graph
            self._live = False
        return self.model

    def _check_live(self) -> None:
        if not self._live:
            raise RuntimeError("this wrapper was unwrapped; call lora_graph.wrap(model) again")

    # -- Jupyter (lora_graph.notebook; pandas, matplotlib and ipywidgets are imported on first use) --
    compare, sweep, mixer, _repr_html_ = notebook.compare, notebook.sweep, notebook.mixer, notebook.wrapper_html

    # -- conveniences -----------------------------------------------------------------------

    def __getattr__(self, name: str):
        # Delegate the rest (config, device, ...) to the model, so the wrapper reads like it.
        if name.startswith("_") or name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def __repr__(self) -> str:
        names = ", ".join(
            f"{n}(r={i.rank}{', resident' if n in self._slots else ''})" for n, i in self._infos.items()
        ) or "no adapters"
        return (f"LoraGraph({type(self.model).__name__}, backend={self.backend!r}, {names}, "
                f"{len(self._patched.banks)} patched modules)")
