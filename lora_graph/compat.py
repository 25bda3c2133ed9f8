"""What makes the wrapper fit where users already are: PEFT's adapter methods with lora_graph's
meaning, transformers' pipelines, and clear words for what cannot be done (copying, pickling).

Someone who knows PEFT reaches for ``set_adapter``, ``disable_adapter`` and ``delete_adapter``. On a
wrapped model they mean:

    lm.set_adapter(spec)        the default SPEC of every call and forward that names none
                                (lm(...), lm.generate(...), plain model(...) outside use()); None: the base
    lm.active_adapters()        the adapter names of that default
    with lm.disable_adapter():  the base model inside the block (PEFT's context manager)
    lm.disable_adapters()       the base model by default until lm.enable_adapters() (transformers' names)
    lm.delete_adapter(name)     lm.unload_adapter(name); a list is accepted, as in PEFT

The default holds its adapters' slots (it pages them in, and they are never evicted while it is
the default), like a request that never ends. transformers methods that cannot apply to a wrapped
model (its own ``load_adapter``, ``add_adapter``, continuous batching) are shadowed on the model
by refusals that name the lora_graph equivalent (patch.py), so the wrapper's attribute delegation
never reaches transformers' PEFT integration.

Pipelines check a model's class by name: ``lm.__class__`` is the wrapped model's class, while
``type(lm)`` and ``isinstance(lm, LoraGraph)`` still see the wrapper. A wrapped model cannot be
deep-copied or pickled (its banks and hooks hold live state); both say so and what to do instead.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager


class Compat:
    """Mixed into LoraGraph; relies on its ``lease``, ``use``, ``unload_adapter``, ``model`` and ``router``."""

    _default_lease = None
    _disabled_default = None

    def set_adapter(self, spec=None, *, adapter_names=None) -> None:
        """Make ``spec`` the default SPEC for calls and forwards that name none (None: the base)."""
        lease = None if spec is None and adapter_names is None else self.lease(spec, adapter_names=adapter_names)
        with self._default_guard():
            old, self._default_lease = self._default_lease, lease
            self.router.default = None if lease is None else lease.request
            self._disabled_default = None
        if old is not None:
            old.release()

    def active_adapters(self) -> list[str]:
        """The adapters of the default SPEC (``set_adapter``), sorted; [] for the base."""
        lease = self._default_lease
        return sorted(lease.names) if lease is not None else []

    def delete_adapter(self, adapter_names) -> None:
        """PEFT's name for :meth:`unload_adapter` (one name or a list)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self.unload_adapter(name)

    @contextmanager
    def disable_adapter(self):
        """Inside the block, forwards use the base model (PEFT's ``disable_adapter``)."""
        with self.use(None):
            yield self

    def disable_adapters(self) -> None:
        """The base model by default until :meth:`enable_adapters` (transformers' name)."""
        with self._default_guard():
            if self._default_lease is not None:
                self._disabled_default, self.router.default = self._default_lease, None

    def enable_adapters(self) -> None:
        """Undo :meth:`disable_adapters`: the default SPEC applies again."""
        with self._default_guard():
            if self._disabled_default is not None:
                self.router.default, self._disabled_default = self._disabled_default.request, None

    def _default_guard(self) -> threading.RLock:
        return self._lock

    def _forget_default(self, name: str | None = None) -> None:
        """Drop the default SPEC (all of it, or if it names ``name``, being unloaded)."""
        lease = self._default_lease
        if lease is not None and (name is None or name in lease.names):
            self.set_adapter(None)

    def __deepcopy__(self, memo):
        return self.router.__deepcopy__(memo)

    def __reduce_ex__(self, protocol):
        return self.router.__reduce_ex__(protocol)

    @property
    def __class__(self):
        model = self.__dict__.get("model")
        return type(self) if model is None else type(model)
