"""Scale-out on Ray Serve: replicas of the server, with requests routed to a replica that holds their adapters.

    client ──HTTP──> Ray's proxy ──> Ingress (FastAPI): reads "model"/"adapters" from the body
        ──handle.options(multiplexed_model_id=ID)──> LoraReplica (one of N), picked by Ray's router:
          one that already has ID loaded, unless it is overloaded
    LoraReplica: its own copy of the model, wrapped, with the engine and the OpenAI app of app.py;
        the request is run against that app in-process, and its response streamed back as it comes

Residency follows Ray's model multiplexing. A request's multiplexed model id is its adapter name, or
for a weighted set a canonical key of the sorted names (``set:a+b``); the base model has none.
``@serve.multiplexed(max_num_models_per_replica=max_loaded)`` keeps an LRU of ids per replica and
tells Ray's router which replica holds which id. Loading an id leases its adapters in the replica's
wrapper (paged in and held); when Ray's LRU drops the id, the lease is released and the adapters that
no other loaded id uses are evicted. So the slots hold exactly what Ray thinks is loaded, plus what
running requests hold: one cache, not two. (The wrapper itself runs without ``max_loaded``; Ray's
LRU bounds it.)

Every response carries ``x-lora-graph-replica``, the replica that served it. ``/metrics`` of the
ingress gathers every replica's Prometheus text, each sample labelled with its replica.

Importing lora_graph never imports Ray: this module is imported only by ``ray_app`` callers.
"""

# FastAPI reads the route signatures below at run time, through Ray: no postponed annotations here.

import asyncio
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayError

logger = logging.getLogger(__name__)

_GENERATION = ("/v1/completions", "/v1/chat/completions")


def multiplexed_id(path: str, body: bytes, base_id: str) -> str:
    """The multiplexed model id of a request: its adapter, a key of its weighted set, or "" (base)."""
    if path not in _GENERATION:
        return ""
    try:
        data = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError):
        return ""
    if not isinstance(data, dict):
        return ""
    adapters = data.get("adapters")
    if isinstance(adapters, dict) and adapters:
        return "set:" + "+".join(sorted(str(n) for n in adapters))
    model = data.get("model")
    return model if isinstance(model, str) and model != base_id else ""


def names_of(model_id: str) -> list[str]:
    return model_id[4:].split("+") if model_id.startswith("set:") else [model_id]


class _Held:
    """What Ray's multiplexer keeps per loaded id: a lease on its adapters, released (and the
    adapters no other loaded id uses evicted) when Ray unloads the id."""

    def __init__(self, replica, model_id: str, lease) -> None:
        self.replica, self.model_id, self.lease = replica, model_id, lease
        replica.held[model_id] = self

    def __del__(self) -> None:
        lease, self.lease = self.lease, None
        if lease is None:
            return
        self.replica.held.pop(self.model_id, None)
        lease.release()
        still = {n for model_id in self.replica.held for n in names_of(model_id)}
        for name in names_of(self.model_id):
            if name not in still and name in self.replica.lm.adapters:
                self.replica.lm.evict(name)


async def asgi_call(app, method: str, path: str, query: bytes, headers: list, body: bytes):
    """Run one HTTP request against an ASGI app in-process: yields ``(status, headers)``, then the
    body's chunks as they come. Cancelling the consumer tells the app the client went away."""
    events: asyncio.Queue = asyncio.Queue()
    done = asyncio.Event()
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        await events.put(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 0)}
    task = asyncio.create_task(app(scope, receive, send))
    try:
        while True:
            message = await events.get()
            if message["type"] == "http.response.start":
                yield message["status"], [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]]
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body"):
                    return
    finally:
        done.set()
        if not task.done():
            task.cancel()




class LoraReplica:
    """One replica: the model wrapped by lora_graph, its engine and the OpenAI app, run in-process.
    ``hold`` is decorated with ``serve.multiplexed`` by :func:`ray_app`."""

    def __init__(self, model_dir: str | None, adapters: dict | None, model_id: str, api_key: str | None,
                 backend: str, quantize: str, max_loaded: int | None, engine_kwargs: dict) -> None:
        from .app import create_app
        from .loading import load_served

        self.lm, tokenizer = load_served(model_dir, adapters, backend=backend, quantize=quantize,
                                         max_loaded=max_loaded, preload=False)
        self.model_id, self.held = model_id, {}
        context = serve.get_replica_context()
        self.name = str(getattr(getattr(context, "replica_id", None), "unique_id", None) or context.replica_tag)
        self.app = create_app(self.lm, tokenizer, model_id, api_key=api_key, replica=self.name, **engine_kwargs)
        self.app.state.server.engine.start()  # the app runs in-process: no ASGI lifespan starts it

    async def _hold(self, model_id: str) -> _Held:
        started, resident = time.perf_counter(), set(self.lm.resident)
        lease = await asyncio.to_thread(self.lm.lease, {n: 1.0 for n in names_of(model_id)})
        if lease.names - resident:
            self.app.state.server.metrics.adapter_load(time.perf_counter() - started)
        return _Held(self, model_id, lease)

    async def handle(self, method: str, path: str, query: bytes, headers: list, body: bytes):
        model_id = serve.get_multiplexed_model_id()
        if model_id and all(n in self.lm.adapters for n in names_of(model_id)):
            await self.hold(model_id)  # an unknown name is left to the app's 404
        async for item in asgi_call(self.app, method, path, query, headers, body):
            yield item

    def metrics(self) -> tuple[str, str]:
        text, _ = self.app.state.server.metrics.render()
        return self.name, text.decode()


def merge_metrics(texts: dict[str, str]) -> str:
    """Several replicas' Prometheus text as one: each family once, each sample labelled with its
    ``replica``."""
    families: dict[str, list[str]] = {}
    for replica, text in sorted(texts.items()):
        family = None
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split()[2]
                head = families.setdefault(family, [])
                if line not in head:
                    head.append(line)
            elif line and not line.startswith("#") and family is not None:
                name, _, rest = line.partition(" ")
                label = f'replica="{replica}"'
                name = name.replace("{", "{" + label + ",", 1) if "{" in name else name + "{" + label + "}"
                families[family].append(f"{name} {rest}")
    return "".join(line + "\n" for lines in families.values() for line in lines)


def _ingress_deployment(model_id: str, num_replicas: int, affinity: bool):
    """The ingress: forwards each request to a replica picked by its multiplexed model id."""
    app = FastAPI(title="lora_graph (Ray Serve)")

    @serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0})  # it only forwards: no CPU of its own
    @serve.ingress(app)
    class Ingress:
        def __init__(self, replicas) -> None:
            self.replicas = replicas

        @app.get("/metrics")
        async def metrics(self):
            seen: dict[str, str] = {}
            for _ in range(20 * num_replicas):  # Ray picks the replica: ask until every one answered
                name, text = await self.replicas.metrics.remote()
                seen[name] = text
                if len(seen) >= num_replicas:
                    break
            return Response(merge_metrics(seen), media_type="text/plain; version=0.0.4; charset=utf-8")

        @app.api_route("/{path:path}", methods=["GET", "POST"])
        async def forward(self, request: Request, path: str):
            body, route = await request.body(), "/" + path
            model = multiplexed_id(route, body, model_id) if affinity else ""
            handle = self.replicas.options(multiplexed_model_id=model, stream=True)
            stream = handle.handle.remote(request.method, route, request.url.query.encode(),
                                          list(request.headers.items()), body)
            try:
                status, headers = await stream.__anext__()
            except (RayError, StopAsyncIteration) as exc:  # the replica died: the client may retry
                logger.warning("a replica failed a request: %s", exc)
                return JSONResponse({"error": {"message": "the replica serving this request stopped; retry",
                                               "type": "ServiceUnavailableError", "param": None,
                                               "code": "replica_unavailable"}},
                                    status_code=503, headers={"Retry-After": "1"})

            async def rest():
                async for chunk in stream:
                    yield chunk

            kept = {k: v for k, v in headers if k.lower() not in ("content-length", "transfer-encoding")}
            return StreamingResponse(rest(), status_code=status, headers=kept)

    return Ingress


def ray_app(model_dir: str | None = None, adapters: dict | None = None, replicas: int = 2, max_loaded: int = 8,
            ray_actor_options: dict | None = None, api_key: str | None = None, served_model_name: str | None = None,
            backend: str = "auto", quantize: str = "none", affinity: bool = True, **engine_kwargs):
    """A Ray Serve application serving lora_graph's OpenAI API from ``replicas`` replicas.

    Each replica loads ``model_dir`` (default: the shipped demo) with ``adapters`` ({name: path};
    default: the demo's four) and keeps at most ``max_loaded`` multiplexed ids (adapters or weighted
    sets) resident, as Ray's LRU decides. ``ray_actor_options`` go to each replica
    (``{"num_gpus": 1}`` for one replica per GPU). ``affinity=False`` routes without model ids (each
    replica then pages adapters through its own ``max_loaded`` slots): a baseline for benchmarks.
    Run it with ``serve.run(ray_app(...))``.
    """
    from .loading import served_name

    model_id = served_model_name or served_name(model_dir)

    class Replica(LoraReplica):
        @serve.multiplexed(max_num_models_per_replica=max_loaded)
        async def hold(self, model_id: str) -> _Held:
            return await self._hold(model_id)

    replica = serve.deployment(Replica, name="LoraReplica", num_replicas=replicas,
                               ray_actor_options=ray_actor_options or {}, max_ongoing_requests=64)
    bound = replica.bind(model_dir, adapters, model_id, api_key, backend, quantize,
                         None if affinity else max_loaded, engine_kwargs)
    return _ingress_deployment(model_id, replicas, affinity).bind(bound)
