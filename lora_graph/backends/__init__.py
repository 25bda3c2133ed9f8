"""Backends: how a patched layer computes its LoRA branch, chosen once per wrapper.

    RoutingPlan ──backend.prepare──> Layout          once per request and forward shape (cached by the Router)
    Layout.branch(layer, x) ──> (pre, post)          once per layer, bank state and input shape; then reused
    layer: y = pre(x); out = base(x); out = post(y, x, out)

- ``torch`` (backends/torch.py): lanes grouped by adapter into a padded grid, two batched GEMMs per
  layer whatever the number of distinct adapters. The CPU path.
- ``triton`` (backends/triton.py): the kernels of lora_graph.kernels over the whole bank, one lane
  layout per forward and bank size. The CUDA path, and the one traced into compiled graphs.

A backend is an object with one interface, in the manner of vLLM's punica wrappers: ``prepare``
(a plan into a layout), ``traced_inputs`` (what a compiled graph's layers read, published per
thread by the top-level hook) and ``traced_linear``/``traced_embedding`` (the layer under
torch.compile). Nothing outside :func:`resolve_backend` looks at a backend's name.
"""

from __future__ import annotations

import importlib.util
import os

from .base import Backend, Layout

__all__ = ["BACKENDS", "Backend", "Layout", "resolve_backend"]

BACKENDS = ("auto", "torch", "triton")


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device) -> Backend:
    """The backend object a model on ``device`` runs with; a clear error when it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and _triton_available() else "torch"
    elif backend == "triton":
        if not _triton_available():
            raise RuntimeError("backend='triton' needs the triton package: pip install 'lora_graph[triton]'")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"backend='triton' needs a CUDA model (this one is on {device.type}); use backend='torch' "
                "or 'auto' here, or set TRITON_INTERPRET=1 before triton is imported to run the kernels "
                "in Triton's interpreter"
            )
    if backend == "triton":
        from .triton import TritonBackend

        return TritonBackend()
    from .torch import TorchBackend

    return TorchBackend()
