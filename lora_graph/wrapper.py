"""LoraGraph: the drop-in wrapper around a Hugging Face model.

``wrap(model)`` patches the model in place and returns a LoraGraph. The model's own parameters and
buffers are never written: LoRA factors live in per-module banks beside them, and the patched
modules call the original ones untouched. Every request names its adapters (a SPEC), per call
(``lm(..., adapters=SPEC)``, ``lm.generate(..., adapters=SPEC)``) or for a block
(``with lm.use(SPEC):``, which also covers plain ``model(...)``, ``model.generate`` and pipelines).

Adapters live in three tiers (store.py): registered (a path), cached on the host, and resident in
one of ``max_loaded`` device slots. A request that names a registered adapter pages it in before
its first forward, evicting the least recently used slot that no running request holds and no one
pinned. Switching adapters between requests copies nothing: only the routing changes.

Threading model. One lock serialises registration, loading, paging, replacing and unloading.
Forwards take no lock: a request (``use()``, ``lm(...)``, ``lm.generate(...)``) resolves its names
to slots once, when it starts, and holds a reference on those slots until it ends. A held slot is
never evicted or rewritten; replacing or unloading an adapter that a running request uses puts the
new weights in another slot (replace) or removes the name at once (unload), and frees the old slot
when its last request ends. So every forward sees a consistent snapshot of the slots it uses, and
requests that started before a replace finish with the old weights.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import types
from collections import Counter, OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import ops, patch
from .adapters import read_adapter, read_config
from .bank import AdapterBank
from .routing import BASE_NAME, Router, resolve_spec, spec_from_adapter_names
from .store import HostAdapter, HostCache, coalesce, to_device

logger = logging.getLogger(__name__)

_UNSET = object()


@dataclass(frozen=True)
class AdapterInfo:
    """A registered adapter. ``targets`` and ``nbytes`` are known once its weights were read."""

    name: str
    path: str
    rank: int
    alpha: float
    use_rslora: bool
    targets: tuple[str, ...] | None = None
    nbytes: int | None = None


class LoraGraph:
    """Many LoRA adapters over one frozen model. Create it with :func:`lora_graph.wrap`."""

    def __init__(
        self,
        model: nn.Module,
        backend: str = "auto",
        adapter_dtype: torch.dtype = torch.float32,
        max_loaded: int | None = None,
        max_cpu: int | None = 8,
        max_rank: int | None = None,
        progress: bool = True,
    ) -> None:
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
        self.model = model
        # the patchable modules (by their original objects) and shapes, found once: walking a large
        # model's module tree on every load would cost more than reading a small adapter
        self._modules = patch.patchable_modules(model)
        self._shapes = {n: patch.shape_of(m) for n, m in self._modules.items()}
        self.backend = ops.resolve_backend(backend, patch.module_device(model))
        self.adapter_dtype = adapter_dtype
        self.max_loaded = max_loaded
        self.max_rank = max_rank
        self.progress = progress
        self._lock = threading.RLock()
        self._infos: dict[str, AdapterInfo] = {}  # registry
        self._pickle_ok: dict[str, bool] = {}
        self._host = HostCache(max_cpu)
        self._slots: dict[str, int] = {}  # resident adapters
        self._lru: OrderedDict[str, None] = OrderedDict()  # resident, least recently used first
        self._pinned: set[str] = set()
        self._slot_modules: dict[int, tuple[str, ...]] = {}
        self._slot_bytes: dict[int, int] = {}
        self._refs: Counter = Counter()  # slot -> running requests holding it
        self._doomed: dict[int, bool] = {}  # slot -> restore emptied modules, freed at refs == 0
        self._banks: dict[str, AdapterBank] = {}
        self._originals: dict[str, nn.Module] = {}
        self._stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        # A model on the CPU: the slots already are host memory, so a load copies straight from
        # the memory-mapped file into its slot, and the OS page cache is the host tier.
        self._coalesce = patch.module_device(model).type != "cpu"
        if not self._coalesce:
            self._host.capacity = 0
        self.router = Router()
        self._tokens = threading.local()
        self._hooks = [
            model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            model.register_forward_hook(self._post_forward, always_call=True),
        ]
        model._lora_graph = self
        self._live = True

    # -- registry ---------------------------------------------------------------------------
    @property
    def adapters(self) -> types.MappingProxyType:
        """Read-only mapping name -> AdapterInfo of every registered adapter."""
        return types.MappingProxyType(self._infos)

    @property
    def resident(self) -> tuple[str, ...]:
        """Adapters in device slots, least recently used first."""
        return tuple(self._lru)

    @property
    def pinned(self) -> frozenset[str]:
        return frozenset(self._pinned)

    def register_adapter(self, name: str, path: str | os.PathLike, allow_pickle: bool = False,
                         replace: bool = False) -> AdapterInfo:
        """Record an adapter directory under ``name``; its weights are read when a request needs it.

        The config is read and validated now (refused fields fail here), the weights later.
        """
        self._check_live()
        folder, settings = self._open(name, path, replace)
        info = self._info(name, path, settings)
        with self._lock:
            if name in self._infos and not replace:
                raise ValueError(f"adapter {name!r} is already registered; unload_adapter({name!r}) first")
            self._infos[name] = info
            self._pickle_ok[name] = allow_pickle
            self._host.drop(name)
        return info

    def register_adapters(self, paths: dict[str, str | os.PathLike], allow_pickle: bool = False) -> None:
        """Register many adapters, with a progress bar on a terminal."""
        for name, path in self._progress(paths.items(), "registering adapters"):
            self.register_adapter(name, path, allow_pickle=allow_pickle)

    def load_adapter(self, name: str, path: str | os.PathLike | None = None, allow_pickle: bool = False,
                     replace: bool = False) -> AdapterInfo:
        """Register ``path`` under ``name`` (unless it is registered already and ``path`` is None)
        and make it resident now.

        With ``replace=True`` an adapter of that name is replaced in place: requests already running
        finish with the old weights, new requests see the new ones. Everything is validated before
        any module is touched: a failed load leaves the wrapper as it was.
        """
        self._check_live()
        if path is None:
            if name not in self._infos:
                raise ValueError(f"adapter {name!r} is not registered; pass its path")
            with self._lock:
                self._page_in([name], protect={name})
                return self._infos[name]
        folder, settings = self._open(name, path, replace)
        host = self._read(folder, allow_pickle)  # outside the lock: reading is the slow part
        with self._lock:
            if name in self._infos and not replace:
                raise ValueError(f"adapter {name!r} is already loaded; unload_adapter({name!r}) first")
            old_slot = self._slots.get(name)
            slot = self._place(host, protect={name}, avoid={old_slot} if old_slot is not None else set())
            if old_slot is not None:
                self._release(old_slot, restore=False)
            self._infos[name] = self._info(name, path, settings, host)
            self._pickle_ok[name] = allow_pickle
            self._host.put(name, host)
            self._slots[name] = slot
            self._touch([name])
        logger.info("loaded adapter %r from %s into slot %d", name, path, slot)
        return self._infos[name]

    def load_adapters(self, paths: dict[str, str | os.PathLike], allow_pickle: bool = False) -> None:
        """Load many adapters, with a progress bar on a terminal."""
        for name, path in self._progress(paths.items(), "loading adapters"):
            self.load_adapter(name, path, allow_pickle=allow_pickle)

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter. Requests already running with it finish with it (its slot is freed
        when the last one ends); modules that no resident adapter targets any more are restored."""
        self._check_live()
        with self._lock:
            if name not in self._infos:
                raise ValueError(f"adapter {name!r} is not loaded (loaded: {', '.join(sorted(self._infos)) or 'none'})")
            del self._infos[name]
            self._pickle_ok.pop(name, None)
            self._host.drop(name)
            self._pinned.discard(name)
            slot = self._slots.pop(name, None)
            self._lru.pop(name, None)
            if slot is not None:
                self._release(slot, restore=True)
            self._restore_empty()

    def pin(self, name: str) -> None:
        """Make ``name`` resident now and never evict it until :meth:`unpin`."""
        with self._lock:
            self._require(name)
            if self.max_loaded is not None and name not in self._pinned and len(self._pinned) >= self.max_loaded:
                raise ValueError(f"cannot pin {name!r}: all {self.max_loaded} slots are pinned already")
            self._page_in([name], protect={name})
            self._pinned.add(name)

    def unpin(self, name: str) -> None:
        with self._lock:
            self._require(name)
            self._pinned.discard(name)

    def prefetch(self, names) -> None:
        """Read adapters ahead of their requests and make them resident while slots allow,
        without evicting anything pinned or in use."""
        names = [names] if isinstance(names, str) else list(names)
        with self._lock:
            for name in names:
                self._require(name)
            for name in self._progress(names, "prefetching adapters"):
                if name in self._slots:
                    continue
                if self.max_loaded is None or len(self._occupied()) < self.max_loaded or self._victim(set()) is not None:
                    self._page_in([name], protect={name})
                else:
                    self._host_copy(name)

    def memory(self) -> dict:
        """Bytes per tier: device slot buffers and the adapter bytes they hold, and the host cache."""
        with self._lock:
            return {
                "device": {
                    "slot_buffers": sum(bank.nbytes for bank in self._banks.values()),
                    "adapters": sum(self._slot_bytes.get(s, 0) for s in self._occupied()),
                    "resident": len(self._slots),
                    "max_loaded": self.max_loaded,
                },
                "host": {
                    "cache": self._host.nbytes,
                    "cached": len(self._host),
                    "max_cpu": self._host.capacity,
                    "pinned_memory": self._stream is not None,
                },
                "registered": len(self._infos),
            }

    # -- requests ---------------------------------------------------------------------------
    @contextmanager
    def use(self, spec=None, *, adapter_names=None):
        """Route every forward of the model inside the block with ``spec``.

        Covers ``lm(...)``, plain ``model(...)``, ``model.generate(...)`` and pipelines built on
        the model. ``adapter_names`` is PEFT's spelling (one name per row, ``"__base__"`` for none).
        Adapters the SPEC names are paged in first; the block holds their slots until it exits.
        """
        self._check_live()
        if adapter_names is not None:
            if spec is not None:
                raise ValueError("pass either adapters (a SPEC) or adapter_names, not both")
            spec = spec_from_adapter_names(adapter_names)
        rows = resolve_spec(spec, self._infos)
        names = rows.names
        with self._lock:
            if self.max_loaded is not None and len(names) > self.max_loaded:
                raise ValueError(
                    f"this request uses {len(names)} distinct adapters but max_loaded={self.max_loaded}; "
                    "split the batch or wrap with a larger max_loaded"
                )
            self._page_in(sorted(names), protect=set(names))
            held = {n: self._slots[n] for n in names}
            for name, slot in held.items():
                self._refs[slot] += 1
                self._lru.move_to_end(name)
        token = self.router.set_spec(rows.slotted(held))
        try:
            yield self
        finally:
            self.router.reset_spec(token)
            with self._lock:
                for slot in held.values():
                    self._refs[slot] -= 1
                    if self._refs[slot] <= 0:
                        del self._refs[slot]
                        if slot in self._doomed:
                            self._free(slot, self._doomed.pop(slot))

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
        batch, positions = patch.batch_shape_of(args, kwargs)
        token = self.router.begin_forward(batch)
        previous = self.router.static
        if self.backend == "triton":
            self.router.static = self._shared_lanes(self.router.running_plan(), batch, positions)
        stack.append((token, previous))

    @torch.compiler.disable
    def _post_forward(self, module, args, output):
        stack = getattr(self._tokens, "stack", None)
        if stack:
            token, previous = stack.pop()
            self.router.static = previous
            self.router.end_forward(token)

    def _shared_lanes(self, plan, batch: int | None, positions: int | None):
        """``Router.static`` for a forward: lanes for its full token count and for one token per row
        (``lm_head`` on the last position), over every slot a bank may hold."""
        if plan is None:
            return () if batch is not None else None
        if positions is None:
            return None
        num_slots = self.max_loaded
        if num_slots is None:
            with self._lock:
                num_slots = max((b.state.a.shape[0] for b in self._banks.values()), default=0)
        device = patch.module_device(self.model)
        per_rows = (positions, 1) if positions != 1 else (1,)
        return num_slots, tuple((batch * n, plan.shared_lanes(n, num_slots, device)) for n in per_rows)

    # -- residency (call with the lock held) ---------------------------------------------------
    def _open(self, name, path, replace: bool):
        """Check a name and a directory and read its config: what registering and loading share."""
        self._check_name(name, replace)
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"adapter directory not found: {str(path)!r}")
        return folder, read_config(folder)

    def _info(self, name: str, path, settings, host=None) -> AdapterInfo:
        """What ``adapters`` says of an adapter; targets and bytes once its weights were read."""
        targets = nbytes = None
        if host is not None:
            targets = tuple(sorted(host.weights.modules))
            # the bytes its slots hold, in the dtype they keep the factors in
            nbytes = host.weights.numel * self.adapter_dtype.itemsize
        return AdapterInfo(name, str(path), settings.r, settings.lora_alpha, settings.use_rslora, targets, nbytes)

    def _read(self, folder: Path, allow_pickle: bool):
        modules = self._modules
        weights = read_adapter(folder, self._shapes, allow_pickle=allow_pickle,
                               base_weight=lambda n: patch.plain_weight(modules.get(n)))
        if self.max_rank is not None:
            too_big = [(n, m.rank) for n, m in weights.modules.items() if m.rank > self.max_rank]
            if too_big:
                raise ValueError(f"{folder}: module {too_big[0][0]!r} has rank {too_big[0][1]} > max_rank={self.max_rank}")
        if not self._coalesce:
            return HostAdapter(weights, None)
        return coalesce(weights, self.adapter_dtype, pin=self._stream is not None)

    def _host_copy(self, name: str):
        host = self._host.get(name)
        if host is None:
            info = self._infos[name]
            host = self._read(Path(info.path), self._pickle_ok.get(name, False))
            self._host.put(name, host)
            if info.targets is None:
                self._infos[name] = self._info(name, info.path, host.weights.settings, host)
        return host

    def _page_in(self, names, protect: set[str]) -> None:
        """Make ``names`` resident. All missing weights are read, and room for them is checked,
        before anything is evicted: a path that vanished or went corrupt, or a batch that cannot
        fit beside pinned and running adapters, fails the request and costs no resident adapter."""
        missing = [n for n in names if n not in self._slots]
        if not missing:
            self._touch(names)
            return
        hosts = {n: self._host_copy(n) for n in missing}
        if self.max_loaded is not None:
            room = self.max_loaded - len(self._occupied())
            if room + len(list(self._evictable(protect))) < len(missing):
                raise RuntimeError(
                    f"cannot page in {missing}: the {self.max_loaded} adapter slots are pinned or held by running "
                    "requests; unpin an adapter, wait for requests to finish, or wrap with a larger max_loaded"
                )
        placed = []
        try:
            for name in missing:
                self._slots[name] = self._place(hosts[name], protect=protect | set(missing))
                self._lru[name] = None
                placed.append(name)
        except BaseException:
            for name in placed:  # roll back: nothing half-resident
                self._lru.pop(name, None)
                self._free(self._slots.pop(name), restore=False)
            raise
        self._touch(names)

    def _touch(self, names) -> None:
        for name in names:
            self._lru[name] = None
            self._lru.move_to_end(name)

    def _occupied(self) -> set[int]:
        return set(self._slots.values()) | set(self._doomed)

    def _evictable(self, protect: set[str]):
        """Resident adapters that may lose their slot, least recently used first."""
        return (n for n in self._lru
                if n not in protect and n not in self._pinned and self._refs[self._slots[n]] == 0)

    def _victim(self, protect: set[str]) -> str | None:
        return next(self._evictable(protect), None)

    def _free_slot(self, protect: set[str], avoid: set[int]) -> int:
        occupied = self._occupied() | avoid
        if self.max_loaded is None:
            return min(set(range(len(occupied) + 1)) - occupied)
        free = set(range(self.max_loaded)) - occupied
        if free:
            return min(free)
        victim = self._victim(protect)
        if victim is None:
            raise RuntimeError(
                f"all {self.max_loaded} adapter slots are pinned or held by running requests; "
                "unpin an adapter, wait for requests to finish, or wrap with a larger max_loaded"
            )
        slot = self._slots.pop(victim)
        self._lru.pop(victim)
        self._free(slot, restore=False)
        logger.debug("evicted adapter %r from slot %d", victim, slot)
        return slot

    def _place(self, host, protect: set[str], avoid: set[int] = frozenset()) -> int:
        """Put a coalesced adapter into a free slot (evicting if needed) and return the slot."""
        modules = self._modules
        slot = self._free_slot(protect, set(avoid))
        capacity = self.max_loaded or slot + 1
        staged, new_banks, on_device = {}, {}, {}
        for mod_name, lora in host.weights.modules.items():
            bank = self._banks.get(mod_name)
            if bank is None:
                base, shape = modules[mod_name], self._shapes[mod_name]
                bank = new_banks[mod_name] = AdapterBank(
                    shape.in_features, shape.out_features, patch.module_device(base), self.adapter_dtype,
                    slots=capacity, rank=self.max_rank or 0, kernel_tables=self.backend == "triton",
                )
            if bank.device not in on_device:  # one transfer per device, not one per tensor
                on_device[bank.device] = to_device(host, bank.device, self._stream).modules
            staged[mod_name] = bank.stage(slot, on_device[bank.device][mod_name])
        wrappers = {n: patch.make_wrapper(modules[n], b, self.router, self.backend) for n, b in new_banks.items()}
        # commit: nothing below can fail on valid input
        banks = {n: new_banks.get(n) or self._banks[n] for n in staged}
        dst, src = [], []
        for mod_name, st in staged.items():
            banks[mod_name].prepare(st, dst, src)
        torch._foreach_copy_(dst, src)  # every factor into its slot, in one call
        for mod_name, st in staged.items():
            banks[mod_name].publish(st)
        for mod_name, wrapper in wrappers.items():
            self._originals[mod_name] = modules[mod_name]
            self._banks[mod_name] = new_banks[mod_name]
            patch.set_module(self.model, mod_name, wrapper)
        self._slot_modules[slot] = tuple(host.weights.modules)
        self._slot_bytes[slot] = host.weights.numel * self.adapter_dtype.itemsize
        return slot

    def _release(self, slot: int, restore: bool) -> None:
        """Free ``slot`` now, or when the last request holding it ends."""
        if self._refs[slot] > 0:
            self._doomed[slot] = restore
        else:
            self._refs.pop(slot, None)
            self._free(slot, restore)

    def _free(self, slot: int, restore: bool) -> None:
        for mod_name in self._slot_modules.pop(slot, ()):
            self._banks[mod_name].remove(slot)
        self._slot_bytes.pop(slot, None)
        if restore:
            self._restore_empty()

    def _restore_empty(self) -> None:
        """Give back the original module wherever no slot is held any more. Eviction alone keeps the
        wrappers (so paging never changes the module tree a compiled graph was traced with)."""
        for mod_name in [n for n, bank in self._banks.items() if not bank.present]:
            patch.set_module(self.model, mod_name, self._originals.pop(mod_name))
            del self._banks[mod_name]

    # -- checks -----------------------------------------------------------------------------
    def _check_name(self, name, replace: bool) -> None:
        if not isinstance(name, str) or not name or name == BASE_NAME:
            raise ValueError(f"invalid adapter name {name!r}")
        if name in self._infos and not replace:
            raise ValueError(f"adapter {name!r} is already loaded; unload_adapter({name!r}) first")

    def _require(self, name: str) -> None:
        if name not in self._infos:
            raise ValueError(f"adapter {name!r} is not registered (registered: {', '.join(sorted(self._infos)) or 'none'})")

    def _progress(self, items, desc: str):
        items = list(items)
        disable = not self.progress or len(items) < 2 or not sys.stderr.isatty()
        return tqdm(items, desc=desc, disable=disable)

    # -- teardown ---------------------------------------------------------------------------
    def unwrap(self) -> nn.Module:
        """Restore the original modules, remove the hooks and return the same model object."""
        self._check_live()
        with self._lock:
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
        names = ", ".join(
            f"{n}(r={i.rank}{', resident' if n in self._slots else ''})" for n, i in self._infos.items()
        ) or "no adapters"
        return f"LoraGraph({type(self.model).__name__}, backend={self.backend!r}, {names}, {len(self._banks)} patched modules)"
