"""One OpenMP pool per process: the helper threads of serving run their tensor ops alone.

PyTorch's CPU ops run on OpenMP (libgomp), which keeps a pool of worker threads for every thread
that has run a parallel op. Once a second thread has its own pool, the process manages more
threads than there are cores, and libgomp then stops spinning between parallel regions and puts
its workers to sleep: every small op pays for a wake-up, and a decode step with adapters, made
of many small ops, becomes 1.5x slower. Serving has one thread that computes (the steps, see
:meth:`lora_graph.serve.Engine.run`) and helper threads that page adapters in and hand tokens
out; :func:`single_threaded_ops` keeps the helpers' ops on their own thread, so that they never
create a pool. Only the calling thread changes; PyTorch's process-wide setting does not.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import re

import torch

logger = logging.getLogger(__name__)

_RUNTIME = re.compile(r"/lib(gomp|iomp5|omp)[^/]*\.so[.\d]*$")


@functools.cache
def _runtime():
    """The OpenMP runtime PyTorch loaded (Linux: found in /proc/self/maps), or None."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if _RUNTIME.search(line.strip())}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
            lib.omp_set_num_threads.argtypes = [ctypes.c_int]
            lib.omp_get_max_threads.restype = ctypes.c_int
            return lib
        except (OSError, AttributeError):
            continue
    return None


def single_threaded_ops() -> bool:
    """Run the calling thread's CPU tensor ops on that thread alone, without an OpenMP pool of its
    own; other threads keep theirs. True when it took effect (PyTorch on an OpenMP runtime that
    could be found)."""
    torch.get_num_threads()  # PyTorch sets each thread's OpenMP thread count at its first call: before ours
    lib = _runtime()
    if lib is None:
        return False
    lib.omp_set_num_threads(1)
    return torch.get_num_threads() == 1
