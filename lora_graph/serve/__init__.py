"""Serving: a continuous-batching engine over a wrapped model, and an OpenAI-compatible server.

    engine.py       requests with their own SPECs, admitted as their adapters fit, batched per step
    hf_batching.py  the coupling to transformers' continuous batching (the one module that knows it)
    app.py          the HTTP layer (FastAPI), imported only when serving

Only this package knows HTTP (and, later, Ray); the engine knows neither.
"""

from .engine import Engine, QueueFull, Request, generate_batch

__all__ = ["Engine", "QueueFull", "Request", "generate_batch"]
