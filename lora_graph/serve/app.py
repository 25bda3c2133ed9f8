"""The OpenAI-compatible HTTP layer (FastAPI): requests in, the engine's tokens out as text.

    POST /v1/completions, /v1/chat/completions   model = an adapter or the base id; "adapters": {name: w}
    GET  /v1/models                               the base and every adapter (parent = the base)
    POST /v1/load_lora_adapter, /v1/unload_lora_adapter   vLLM's names; only with allow_runtime_loading
    GET  /health, /metrics                        liveness; Prometheus (prometheus_client)

Each completion choice is one engine request; ``stream=true`` sends Server-Sent Events through
FastAPI's ``StreamingResponse``. Text is detokenized incrementally (a trailing partial UTF-8
character is held back) and ``stop`` strings end a choice: the text is cut before them, the engine
request is cancelled, and while streaming the tail that could still start a stop string is held
back. A client that disconnects mid-stream cancels its requests, which frees their place at the
next step.

Security: the server binds where it is told (the CLI's default is 127.0.0.1); with ``api_key`` every
route but /health needs ``Authorization: Bearer <key>``; runtime loading reads only directories
inside ``adapter_roots`` (resolved, so ``..`` and symlinks cannot leave them). Errors use OpenAI's
JSON shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..slots import SlotsFull
from .engine import Engine, QueueFull
from .metrics import Metrics


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|[a-z-]+\[.*\])$")
_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
          503: "ServiceUnavailableError"}


def _error(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": _TYPES.get(status, "APIError"), "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    seed: int | None = None
    stop: str | list[str] | None = None
    adapters: dict[str, float] | None = None


class CompletionBody(_Body):
    prompt: str | list[str]


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)


class LoadBody(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadBody(BaseModel):
    lora_name: str = Field(min_length=1)


class Server:
    """What the routes share: the wrapper, its tokenizer, the engine and the settings."""

    def __init__(self, lm, tokenizer, model_id: str, api_key: str | None, allow_runtime_loading: bool,
                 adapter_roots, default_max_tokens: int, engine_kwargs: dict) -> None:
        self.lm, self.tokenizer, self.model_id = lm, tokenizer, model_id
        self.api_key, self.allow_runtime_loading = api_key, allow_runtime_loading
        self.adapter_roots = [Path(r).resolve() for r in adapter_roots]
        self.default_max_tokens = default_max_tokens
        self.metrics = Metrics(self)
        self.engine = Engine(lm, recorder=self.metrics, **engine_kwargs)

    # -- what a body asks for --------------------------------------------------------------------
    def spec_of(self, body: _Body):
        if body.adapters is not None:
            unknown = sorted(set(body.adapters) - set(self.lm.adapters))
            if unknown:
                raise ApiError(404, f"The adapter `{unknown[0]}` does not exist.", "adapters", "model_not_found")
            return dict(body.adapters)
        if body.model == self.model_id:
            return None
        if body.model in self.lm.adapters:
            return body.model
        raise ApiError(404, f"The model `{body.model}` does not exist.", "model", "model_not_found")

    def prompt_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text)["input_ids"]
        if not ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        return ids

    def chat_ids(self, messages: list[Message]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, f"the tokenizer of `{self.model_id}` has no chat template; use /v1/completions",
                           "messages")
        text = self.tokenizer.apply_chat_template([m.model_dump() for m in messages], tokenize=False,
                                                  add_generation_prompt=True)
        return self.prompt_ids(text)

    # -- running choices ---------------------------------------------------------------------------
    def submit(self, ids: list[int], spec, body: _Body, index: int, loop, events: asyncio.Queue):
        """One engine request for one choice; its updates are put on ``events`` as ``(index, request)``."""
        limit = self.lm.model.config.max_position_embeddings if hasattr(self.lm.model.config,
                                                                          "max_position_embeddings") else None
        max_tokens = body.max_tokens or self.default_max_tokens
        if limit is not None and len(ids) + max_tokens > limit:
            max_tokens = limit - len(ids)
            if max_tokens < 1:
                raise ApiError(400, f"the prompt has {len(ids)} tokens; the model's context is {limit}", "prompt")
        seed = None if body.seed is None else body.seed + index

        def update(request):
            loop.call_soon_threadsafe(events.put_nowait, (index, request))

        try:
            return self.engine.submit(ids, spec, max_new_tokens=max_tokens, temperature=body.temperature,
                                      top_p=body.top_p, seed=seed, on_update=update)
        except QueueFull as exc:
            raise ApiError(503, str(exc), code="queue_full", headers={"Retry-After": "1"}) from None
        except ValueError as exc:
            raise ApiError(404 if "unknown adapter" in str(exc) else 400, str(exc), "adapters") from None


class Choice:
    """Incremental text of one choice: detokenized, cut at the end token and at stop strings."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.sent = ""  # text already sent
        self.stopped = False

    def text(self, request, final: bool) -> str:
        tokens = list(request.tokens)
        eos = request._engine._eos if request._engine is not None else []
        if tokens and tokens[-1] in eos:
            tokens = tokens[:-1]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for stop in self.stops:
            cut = text.find(stop)
            if cut >= 0:
                text, self.stopped = text[:cut], True
        if not final and not self.stopped:
            if text.endswith("\ufffd"):  # a character whose bytes have not all come yet
                text = text.rstrip("\ufffd")
            hold = max((len(s) - 1 for s in self.stops), default=0)
            text = text[: max(len(self.sent), len(text) - hold)]
        return text

    def delta(self, request, final: bool = False) -> str:
        text = self.text(request, final)
        new, self.sent = text[len(self.sent):], max(text, self.sent, key=len)
        return new


def _finish_reason(request, choice: Choice) -> str:
    if choice.stopped:
        return "stop"
    return {"stop": "stop", "length": "length"}.get(request.finish_reason, request.finish_reason or "stop")


class Choices:
    """The engine requests of one completion (``body.n`` choices), submitted before any response
    is sent, so that a bad request gets its status code even when streaming."""

    def __init__(self, server: Server, ids: list[int], spec, body: _Body) -> None:
        loop, self.events = asyncio.get_running_loop(), asyncio.Queue()
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        self.choices = [Choice(server.tokenizer, stops) for _ in range(body.n)]
        self.requests = []
        try:
            for i in range(body.n):
                self.requests.append(server.submit(ids, spec, body, i, loop, self.events))
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    async def progress(self):
        """Yield ``(index, request, choice, delta, finished)`` as the choices progress; cancels what
        is left if the consumer stops early (a client that disconnected)."""
        try:
            open_choices = set(range(len(self.requests)))
            while open_choices:
                index, request = await self.events.get()
                if index not in open_choices:
                    continue
                choice = self.choices[index]
                finished = request.done.is_set() or choice.stopped
                delta = choice.delta(request, final=finished)
                if choice.stopped and not request.done.is_set():
                    request.cancel()
                    finished = True
                if finished:
                    open_choices.discard(index)
                    if request.finish_reason == "error" and not choice.stopped:
                        bad = isinstance(request.error, ValueError)
                        raise ApiError(400 if bad else 500, str(request.error), "adapters" if bad else None)
                yield index, request, choice, delta, finished
        finally:
            self.cancel()


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _complete(run: Choices, ids: list[int], body: _Body, chat: bool) -> dict:
    texts, reasons, completion = [""] * body.n, [None] * body.n, 0
    async for index, request, choice, delta, finished in run.progress():
        texts[index] += delta
        if finished:
            reasons[index] = _finish_reason(request, choice)
            completion += len(request.tokens)
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": body.model, "choices": choices, "usage": _usage(len(ids), completion)}


async def _stream(run: Choices, body: _Body, chat: bool):
    """Server-Sent Events: one chunk per new piece of text, the finish reason, then [DONE]."""
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": body.model}

    def chunk(index: int, text: str | None, reason: str | None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "finish_reason": reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
        return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

    if chat:
        for i in range(body.n):
            yield chunk(i, None, None, role=True)
    try:
        async for index, request, choice, delta, finished in run.progress():
            if delta:
                yield chunk(index, delta, None)
            if finished:
                yield chunk(index, None, _finish_reason(request, choice))
    except ApiError as exc:
        yield f"data: {json.dumps({'error': {'message': exc.message, 'type': _TYPES.get(exc.status), 'param': exc.param}})}\n\n"
    yield "data: [DONE]\n\n"


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def create_app(lm, tokenizer, model_id: str, api_key: str | None = None, allow_runtime_loading: bool = False,
               adapter_roots=(), default_max_tokens: int = 16, replica: str | None = None,
               **engine_kwargs: Any) -> FastAPI:
    """The FastAPI application serving ``lm``; its engine starts and stops with the app.

    ``adapter_roots``: directories under which /v1/load_lora_adapter may read. ``replica``: a name
    sent back in the ``x-lora-graph-replica`` header. ``engine_kwargs`` go to :class:`Engine`.
    """
    server = Server(lm, tokenizer, model_id, api_key, allow_runtime_loading, adapter_roots, default_max_tokens,
                    engine_kwargs)

    @asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.engine.stop)

    app = FastAPI(title="lora_graph", lifespan=lifespan)
    app.state.server = server
    _install_handlers(app, server, replica)
    _install_generation(app, server)
    _install_admin(app, server)
    return app


def _install_handlers(app: FastAPI, server: Server, replica: str | None) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        # pydantic names the member of a union it tried (prompt.str, stop.list[str]): not a field
        parts = [str(p) for p in first.get("loc", ())[1:] if not _TYPE_TAG.match(str(p))]
        field = ".".join(parts) or None
        return _error(400, f"{field or 'body'}: {first.get('msg', 'invalid request body')}", field,
                      "invalid_request_error")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if server.api_key is not None and request.url.path != "/health":
            if request.headers.get("authorization") != f"Bearer {server.api_key}":
                return _error(401, "missing or wrong API key; send Authorization: Bearer <key>", code="invalid_api_key")
        response = await call_next(request)
        if replica is not None:
            response.headers["x-lora-graph-replica"] = replica
        return response


def _install_generation(app: FastAPI, server: Server) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        if isinstance(body.prompt, list) and len(body.prompt) != 1:
            raise ApiError(400, "send one prompt per request (a list of one is accepted)", "prompt")
        prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        return await _respond(server, server.prompt_ids(prompt), server.spec_of(body), body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        spec = server.spec_of(body)
        return await _respond(server, server.chat_ids(body.messages), spec, body, chat=True)


async def _respond(server: Server, ids: list[int], spec, body: _Body, chat: bool):
    run = Choices(server, ids, spec, body)
    if body.stream:
        return StreamingResponse(_stream(run, body, chat), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await _complete(run, ids, body, chat)


def _install_admin(app: FastAPI, server: Server) -> None:
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_id}

    @app.get("/metrics")
    async def metrics():
        text, content_type = server.metrics.render()
        return Response(text, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        data = [{"id": server.model_id, "object": "model", "created": created, "owned_by": "lora-graph",
                 "root": server.model_id, "parent": None}]
        data += [{"id": name, "object": "model", "created": created, "owned_by": "lora-graph", "root": name,
                  "parent": server.model_id} for name in sorted(server.lm.adapters)]
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load(body: LoadBody):
        path = _checked_path(server, body.lora_path)
        if body.lora_name in server.lm.adapters or body.lora_name == server.model_id:
            raise ApiError(400, f"an adapter or model named `{body.lora_name}` already exists", "lora_name")
        try:
            await asyncio.to_thread(_load, server.lm, body.lora_name, path)
        except (ValueError, OSError) as exc:
            raise ApiError(400, str(exc), "lora_path") from None
        return {"status": "ok", "lora_name": body.lora_name}

    @app.post("/v1/unload_lora_adapter")
    async def unload(body: UnloadBody):
        if not server.allow_runtime_loading:
            raise ApiError(403, "runtime loading is off; start the server with --allow-runtime-loading")
        if body.lora_name not in server.lm.adapters:
            raise ApiError(404, f"The adapter `{body.lora_name}` does not exist.", "lora_name", "model_not_found")
        await asyncio.to_thread(server.lm.unload_adapter, body.lora_name)
        return {"status": "ok", "lora_name": body.lora_name}


def _checked_path(server: Server, raw: str) -> Path:
    if not server.allow_runtime_loading:
        raise ApiError(403, "runtime loading is off; start the server with --allow-runtime-loading")
    path = Path(os.path.expanduser(raw)).resolve()
    if not _inside(path, server.adapter_roots):
        roots = ", ".join(str(r) for r in server.adapter_roots) or "none"
        raise ApiError(403, f"lora_path {raw!r} is outside the adapter roots ({roots})", "lora_path")
    if not path.is_dir():
        raise ApiError(400, f"lora_path {raw!r} is not an adapter directory", "lora_path")
    return path


def _load(lm, name: str, path: Path) -> None:
    """Register and read (validating the weights), resident if a slot is free; undone on failure."""
    lm.register_adapter(name, path)
    try:
        lm.prefetch([name])
    except SlotsFull:
        pass  # registered and cached; paged in by its first request
    except BaseException:
        lm.unload_adapter(name)
        raise
