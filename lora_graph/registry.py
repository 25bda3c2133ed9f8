"""Registering and loading adapters: the registry half of the wrapper, from any source (sources.py).

    lm.register_adapter(name, path | "org/repo" | state_dict=, config=)   known, read on first use
    lm.load_adapter(name, path | "org/repo" | state_dict=, config=)       and resident now

Registering a folder or a Hub id reads and validates its config now and its weights when a request
first needs them. Registering tensors validates them too, and keeps their host copy (sources.py):
they are paged in from it like a folder's weights from the file. Loading validates everything
before any module is touched, so a failed load leaves the wrapper as it was.
"""

from __future__ import annotations

import logging
import os

from .adapters import check_unchanged, is_unchanged
from .sources import Source, open_source
from .store import AdapterInfo, HostAdapter, fingerprint

logger = logging.getLogger(__name__)


class Registry:
    """Mixed into LoraGraph; relies on its lock, registry (``_infos``, ``_sources``), host cache,
    residency and slot table."""

    def register_adapter(self, name: str, path: str | os.PathLike | None = None, allow_pickle: bool = False,
                         replace: bool = False, state_dict=None, config=None, revision: str | None = None,
                         strict: bool = True) -> AdapterInfo:
        """Record an adapter under ``name``: a folder, a Hub repo id (``revision``: a branch, tag or
        commit), or ``state_dict`` (PEFT keys) with ``config`` (a LoraConfig or a dict). A folder's
        weights are read when a request needs them, its config now (refused fields fail here);
        in-memory weights are validated now and kept on the host until the adapter is unloaded.
        ``strict=False`` ignores config fields unknown to lora_graph (a newer PEFT's), logging them."""
        self._check_live()
        source = self._open(name, path, replace, state_dict, config, revision, allow_pickle, strict)
        host = self._resident.read(source) if source.tensors is not None else None
        with self._lock:
            self._check_name(name, replace)
            info = self._infos[name] = AdapterInfo.of(name, source.path, source.settings, host and host.weights,
                                                      self.adapter_dtype)
            self._sources[name] = source
            self._host.drop(name)
            if host is not None:
                self._host.put(name, host)
            self._resident.drop(name)  # new weights: running requests keep the old copy, new ones page these in
        return info

    def load_adapter(self, name: str, path: str | os.PathLike | None = None, allow_pickle: bool = False,
                     replace: bool = False, state_dict=None, config=None, revision: str | None = None,
                     strict: bool = True) -> AdapterInfo:
        """Register an adapter as :meth:`register_adapter` does (unless ``name`` is registered
        already and no source is given) and make it resident now.

        With ``replace=True`` an adapter of that name is replaced in place: requests already running
        finish with the old weights, new requests see the new ones. Everything is validated before
        any module is touched: a failed load leaves the wrapper as it was.
        """
        self._check_live()
        if path is None and state_dict is None and config is None:
            return self._make_resident(name)
        source = self._open(name, path, None, state_dict, config, revision, allow_pickle, strict)
        info = self._infos.get(name)
        if not replace and info is not None and source.tensors is None and info.files == fingerprint(source.path):
            return self._make_resident(name)  # registered from these very files already
        host = self._resident.read(source)  # outside the lock: reading is the slow part
        with self._lock:
            self._check_name(name, replace)
            check_unchanged(host.weights)  # its files may have been rewritten while this waited for the lock
            slot = self._resident.replace(name, host)  # its own slot when no running request reads it
            self._infos[name] = AdapterInfo.of(name, source.path, source.settings, host.weights, self.adapter_dtype)
            self._sources[name] = source
            self._host.put(name, host)
            self._slots.assign(name, slot)
        logger.info("loaded adapter %r from %s into slot %d", name, source.label or source.path, slot)
        return self._infos[name]

    def _make_resident(self, name: str) -> AdapterInfo:
        with self._lock:
            self._require(name)
            self._resident.page_in([name], {name}, self._host_copy)
            return self._infos[name]

    def _open(self, name, path, replace: bool | None, state_dict, config, revision, allow_pickle,
              strict: bool = True) -> Source:
        """Check a name (and, unless ``replace`` is None, that it is free) and open the source,
        its config validated: what registering and loading share."""
        self._check_name(name, True if replace is None else replace)
        model_name = getattr(getattr(self.model, "config", None), "_name_or_path", None)
        return open_source(name, path, state_dict, config, revision, allow_pickle, strict, model_name)

    def _host_copy(self, name: str, read: HostAdapter | None = None) -> HostAdapter:
        """A registered adapter's weights: from the host cache, ``read`` ahead, or read (and cached) now."""
        host = self._host.get(name)
        if host is None:
            info = self._infos[name]
            fresh = read if read is not None and is_unchanged(read.weights) else None  # else read again now
            host = fresh or self._resident.read(self._sources[name])
            self._host.put(name, host)
            if info.targets is None:
                self._infos[name] = AdapterInfo.of(name, info.path, host.weights.settings, host.weights,
                                                   self.adapter_dtype)
        return host
