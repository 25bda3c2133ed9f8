"""Registering and loading many adapters at once, all or nothing.

    register_adapters(paths): every name checked and every config read first ──> recorded under the lock
    load_adapters(paths):     every config and weight file read and validated first (no lock)
                              ──> room checked ──> placed one by one under the lock
                              ──> on a failure there, what this call placed and registered is undone

Reading is what fails on bad input (a missing file, a refused field, a tensor of the wrong shape)
and it comes before any change, so such a call leaves the wrapper exactly as it was. The price is
memory: a load holds every adapter it reads (as read on a CPU model, host buffers otherwise)
until it commits; a file rewritten meanwhile fails the call before anything is placed. Only an
unexpected error while writing the slots (out of device memory) fails after a change; it is rolled
back, except that an adapter evicted to make room stays evicted (it is still registered, and pages
in again on its next request).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from .adapters import check_unchanged
from .slots import SlotsFull
from .store import AdapterInfo, fingerprint

logger = logging.getLogger(__name__)


def _check_mapping(paths, method: str) -> None:
    if not isinstance(paths, Mapping):
        hint = " (to page registered adapters in, use prefetch(names))" if method == "load_adapters" else ""
        raise TypeError(f"{method} takes a {{name: path}} mapping, got {type(paths).__name__}{hint}")


class Bulk:
    """Mixed into LoraGraph; relies on its registry, lock, ``_open``, ``_check_name`` and residency."""

    def register_adapters(self, paths: dict[str, str | os.PathLike], allow_pickle: bool = False,
                          strict: bool = True) -> None:
        """Register many adapters, all or nothing: every name is checked and every config read
        before any is recorded, so a bad one registers none. A progress bar shows in a notebook or on
        a terminal."""
        from .wrapper import progress_bar  # not at the top: the wrapper imports this module

        self._check_live()
        _check_mapping(paths, "register_adapters")
        sources = {name: self._open(name, path, False, None, None, None, allow_pickle, strict)
                   for name, path in progress_bar(paths.items(), "registering adapters", self.progress)}
        with self._lock:
            for name in paths:
                self._check_name(name, False)
            for name, source in sources.items():
                self._infos[name] = AdapterInfo.of(name, source.path, source.settings)
                self._sources[name] = source
                self._host.drop(name)

    def load_adapters(self, paths: dict[str, str | os.PathLike], allow_pickle: bool = False,
                      strict: bool = True) -> None:
        """Load many adapters, all or nothing: every config and weight file is read and validated
        before any slot is written, and a failure while placing them undoes what this call placed
        and registered. A failed call registers none of them and evicts nothing (see the module
        docstring for the one exception). Names registered from the same files are made resident.
        A progress bar shows in a notebook or on a terminal."""
        from .wrapper import progress_bar

        self._check_live()
        _check_mapping(paths, "load_adapters")
        read = {}  # name -> (settings, host), or None: registered from these files already
        for name, path in progress_bar(paths.items(), "loading adapters", self.progress):
            source = self._open(name, path, None, None, None, None, allow_pickle, strict)  # names checked below
            info = self._infos.get(name)
            if info is not None and info.files == fingerprint(source.path):
                read[name] = None  # registered from these very files already
                continue
            read[name] = (source, self._resident.read(source))
        with self._lock:
            for name, item in read.items():
                if item is None:
                    self._require(name)
                else:
                    self._check_name(name, False)
                    check_unchanged(item[1].weights)  # files rewritten since they were read
            # each load may evict the one before it, so one free or evictable slot is enough
            room = self._slots.room()
            if room is not None and room < 1 and any(n not in self._slots for n in paths):
                raise SlotsFull(f"cannot load {sorted(paths)}: the {self._slots.capacity} adapter slots are pinned "
                                "or held by running requests; unpin an adapter, wait for requests to finish, "
                                "or wrap with a larger max_loaded")
            self._commit_loads(read)

    def _commit_loads(self, read: dict) -> None:
        was_resident = set(self._slots.resident)
        done = []
        try:
            for name, item in read.items():
                if item is None:
                    self._resident.page_in([name], {name}, self._host_copy)
                else:
                    source, host = item
                    slot = self._resident.replace(name, host)
                    self._infos[name] = AdapterInfo.of(name, source.path, source.settings, host.weights,
                                                       self.adapter_dtype)
                    self._sources[name] = source
                    self._host.put(name, host)
                    self._slots.assign(name, slot)
                done.append(name)
        except BaseException:
            for name in reversed(done):
                slot = None if name in was_resident else self._slots.remove(name)
                if slot is not None:
                    self._resident.release(slot, restore=read[name] is not None)
                if read[name] is not None:
                    del self._infos[name], self._sources[name]
                    self._host.drop(name)
            self._patched.restore_empty()
            raise
        logger.info("loaded %d adapters", len(done))
