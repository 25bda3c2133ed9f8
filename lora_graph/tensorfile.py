"""Reading a safetensors file into memory the process owns, checking its values on the way.

    safe_open(path): the safetensors library parses and validates the header
    ──> the data read with ordinary reads, a run of tensors (up to ``_RUN_BYTES``) at a time, into
        one buffer; the tensors are views of it
          └─> each run of floating values checked for NaN and infinity on a helper thread,
              while the next run is read

Never through a memory map: touching a mapped page that a rewrite in place (open, truncate,
write) took away from the file kills the process with SIGBUS, while a read only comes back short.

**The check.** NaN and infinity are the bit patterns whose exponent bits are all set: read as
integers, they lie above every finite value of their sign. So the largest value of a run's bits
read as signed integers, and the largest read as unsigned ones, say exactly whether the run holds
a NaN or an infinity (positive, then negative): two passes of numpy's integer ``max``, exact where
a sum of finite values can overflow. A helper thread checks each run just after it was read (still
in cache) while the reader goes on with the next one (the last run, with nothing left to read,
is checked by the reader itself); the reader returns which tensors passed,
and adapters.py checks every other value (tensors of a run that failed, tensors given in memory)
and names the one at fault.

The helper runs numpy, never torch: a torch op in a long-lived second thread gives that thread an
OpenMP pool of its own, after which every small op of the forwards pays for waking its workers
(serve/omp.py); with torch sums on the helper, a serving engine's 8-adapter tokens/s fell by 12%.

A large buffer asks for transparent huge pages (Linux, ``madvise``): reading into fresh memory
costs a page fault per page, and with 2 MB pages instead of 4 kB ones reading an 84 MB adapter
took 12.6 ms instead of 42 ms (measured).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

_RUN_BYTES = 4 << 20  # a run of tensors read, then checked, at once: stays in cache between the two
# From this size on, glibc's malloc maps fresh memory for every buffer (its largest mmap
# threshold), so each read faults every page in; below it, freed memory is reused (measured:
# 16 MB read in 2.4 ms into a plain buffer, 3.0 ms into huge pages; 32 MB in 18.7 and 6.2 ms)
_HUGE_PAGES_FROM = 32 << 20

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# the float dtypes checked here: (signed, unsigned) integers of their width, and the smallest
# bit pattern of a positive and of a negative NaN or infinity
_BITS = {
    torch.bfloat16: (np.int16, np.uint16, 0x7F80, 0xFF80),
    torch.float16: (np.int16, np.uint16, 0x7C00, 0xFC00),
    torch.float32: (np.int32, np.uint32, 0x7F80_0000, 0xFF80_0000),
    torch.float64: (np.int64, np.uint64, 0x7FF0_0000_0000_0000, 0xFFF0_0000_0000_0000),
}


def file_stamp(path: Path) -> tuple:
    """What changes when a file is rewritten: ``(path, size, mtime, inode, device)``."""
    st = os.stat(path)
    return str(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev


def check_stamp(path: Path, stamp: tuple, when: str) -> None:
    try:
        now = file_stamp(path)
    except OSError:
        now = None
    if now != stamp:
        raise _changed(path, when)


def _changed(path: Path, when: str) -> ValueError:
    return ValueError(f"{path}: the file changed while the adapter was {when} (rewritten in place?); "
                      "load it again once it is complete")


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _helper() -> ThreadPoolExecutor:
    """One thread for the checks of every read in the process (they queue; each read waits for its own)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora_graph-check")
        return _pool


def _forget_helper() -> None:  # a forked child has none of its parent's threads: it starts its own
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_helper)


def all_finite(raw: np.ndarray, dtype: torch.dtype) -> bool:
    """Whether the values of ``dtype`` whose bytes are ``raw`` (uint8) are all finite."""
    signed, unsigned, positive, negative = _BITS[dtype]
    if not raw.size:
        return True
    return int(raw.view(signed).max()) < positive and int(raw.view(unsigned).max()) < negative


# -- the reader -------------------------------------------------------------------------------------


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], set[int]]:
    """Tensors of a safetensors file (views of one buffer the process owns), and the ``id()`` of
    each one whose values were checked and found finite. The library validates the header first
    (it refuses overlapping or misplaced data offsets and trailing bytes); a file that changes
    meanwhile fails with a clear error, as does one whose data is not what its header says."""
    before = file_stamp(path)
    try:
        with safe_open(path, framework="pt", backend="pread") as f:  # validates the header
            names = list(f.keys())
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...: the file is unreadable
        raise ValueError(f"{path}: cannot read the adapter weights ({exc})") from None
    finite: set[int] = set()
    pending = []  # (check on the helper, the tensors it covers)
    with open(path, "rb", buffering=0) as file:
        entries, start = _entries(path, file, names)
        data = _buffer(max((end for _, _, _, end in entries.values()), default=0))
        tensors = _views(path, data, entries)
        raw = data.numpy()
        target, done = memoryview(raw), 0
        file.seek(start)
        runs = list(_runs(entries, tensors))
        for i, (begin, end, dtype, members) in enumerate(runs):
            while done < end:  # an ordinary read: a file cut short meanwhile gives a short count
                got = file.readinto(target[done:end])
                if not got:
                    raise _changed(path, "being read")
                done += got
            if dtype is None:
                continue
            if i < len(runs) - 1:
                pending.append((_helper().submit(all_finite, raw[begin:end], dtype), members))
            elif all_finite(raw[begin:end], dtype):  # nothing left to read meanwhile: no hand-off
                finite.update(id(t) for t in members)
    finite.update(id(t) for check, members in pending if _passed(check) for t in members)
    check_stamp(path, before, "being read")
    for name, (dtype, shape, begin, end) in entries.items():
        if tensors[name] is None:  # misaligned: a copy of its own, checked by adapters.py
            tensors[name] = data[begin:end].clone().view(dtype).view(shape)
    return tensors, finite


def _passed(check) -> bool:
    try:
        return check.result()
    except Exception:  # noqa: BLE001 - a check that failed proves nothing: adapters.py checks those values
        return False


def _buffer(size: int) -> torch.Tensor:
    """``size`` bytes to read into. A large buffer is fresh memory, and where the kernel offers
    transparent huge pages on request (Linux), an anonymous mapping asks for them: the read then
    faults in 2 MB pages instead of 4 kB ones, which made reading an 84 MB adapter 3.4x faster
    (42 to 12.6 ms, measured)."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if size < _HUGE_PAGES_FROM or advice is None:
        return torch.empty(size, dtype=torch.uint8)
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(advice)
    except OSError:  # not offered: ordinary pages, as torch.empty would give
        pass
    return torch.frombuffer(region, dtype=torch.uint8)  # holds the mapping until the last view is gone


def _entries(path: Path, file, names: list[str]) -> tuple[dict, int]:
    """``{name: (dtype, shape, begin, end)}`` from the header the library accepted, and where
    the data starts; read again here, since the library does not expose the offsets."""
    try:
        (size,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(size))
        infos = {}
        for name in names:
            begin, end = (int(v) for v in header[name]["data_offsets"])
            infos[name] = (header[name]["dtype"], tuple(int(n) for n in header[name]["shape"]), begin, end)
    except (KeyError, TypeError, ValueError, struct.error, RecursionError) as exc:
        raise ValueError(f"{path}: the file changed while the adapter was being read, or has a header this "
                         f"reader does not know ({type(exc).__name__}: {exc})") from None
    entries = {}
    for name, (kind, shape, begin, end) in infos.items():
        if kind not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {kind}, which lora_graph does not read "
                             "(LoRA factors are F32, F16, BF16 or F64)")
        entries[name] = (_DTYPES[kind], shape, begin, end)
    return entries, 8 + size


def _views(path: Path, data: torch.Tensor, entries: dict) -> dict[str, torch.Tensor | None]:
    """Each tensor as a view of ``data``; None for one whose start is not a multiple of its
    element size (it gets a copy of its own once its bytes are read)."""
    tensors = {}
    for name, (dtype, shape, begin, end) in entries.items():
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise ValueError(f"{path}: the data offsets of {name!r} do not match its shape and dtype")
        tensors[name] = data[begin:end].view(dtype).view(shape) if begin % dtype.itemsize == 0 else None
    return tensors


def _runs(entries: dict, tensors: dict):
    """``(begin, end, dtype, members)`` in file order: consecutive tensors of one float dtype, up to
    ``_RUN_BYTES`` of them, each run ending where the next begins; ``dtype`` None for a tensor
    not checked here (integer, float8, misaligned), alone in its run."""
    run: list[str] = []

    def close():
        first, last = entries[run[0]], entries[run[-1]]
        return first[2], last[3], first[0], [tensors[n] for n in run]

    for name in sorted(entries, key=lambda n: entries[n][2]):
        dtype, _, begin, end = entries[name]
        checked = dtype in _BITS and tensors[name] is not None
        if run and (not checked or dtype != entries[run[0]][0] or begin != entries[run[-1]][3]
                    or end - entries[run[0]][2] > _RUN_BYTES):
            yield close()
            run = []
        if checked:
            run.append(name)
        else:
            yield begin, end, None, []
    if run:
        yield close()
