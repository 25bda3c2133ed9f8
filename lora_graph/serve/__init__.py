"""Serving: a continuous-batching engine over a wrapped model, and an OpenAI-compatible server.

    engine.py       requests with their own SPECs, admitted as their adapters fit, batched per step
    hf_batching.py  the coupling to transformers' continuous batching (the one module that knows it)
    omp.py          helper threads without an OpenMP pool of their own (one pool: the steps')
    app.py          the HTTP layer (FastAPI), imported only when serving
    ray.py          the Ray Serve application: replicas of app.py, routed by Ray's model multiplexing

Only this package knows HTTP and Ray; the engine knows neither.
"""

from .engine import Engine, QueueFull, Request, generate_batch

__all__ = ["Engine", "QueueFull", "Request", "generate_batch", "ray_app"]


def ray_app(*args, **kwargs):
    """The Ray Serve application (lora_graph.serve.ray); importing lora_graph never imports Ray."""
    from .ray import ray_app as build

    return build(*args, **kwargs)
