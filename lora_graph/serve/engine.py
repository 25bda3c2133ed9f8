"""The serving engine: continuous batching over a wrapped model, each request with its own SPEC.

    submit(prompt ids, SPEC, sampling) ──> pending (FIFO) ──admission thread: lm.lease(SPEC)──> running
    running requests ──transformers' continuous batching (hf_batching.py)──> one packed forward per step,
        routed per token by Packed(lengths, SPECs); requests join and leave at every step
    step outputs ──dispatch thread──> Request.tokens, on_update callbacks ──> finished: lease released

Admission is where adapters meet slots. A request is admitted once its adapters are resident and
held (``lm.lease``): a registered adapter that is not resident is paged in by the admission
thread, outside the step loop, so running requests keep decoding meanwhile. Within ``max_loaded``
slots a request whose adapters do not fit beside the running requests' waits in the queue (it is
not failed), and requests behind it whose adapters are resident go ahead. A request naming an
unknown adapter, or more distinct adapters than ``max_loaded``, fails at once.

The steps run in a thread of the engine's own (``start()``), or in the caller's (``run()``, what
``lora-graph serve`` and ``generate_batch`` do: on CPU the thread that loaded the model computes
fastest, see ``run``); the admission and dispatch threads keep their tensor ops to themselves
(omp.py).

The engine knows neither HTTP nor Ray: it takes token ids and gives token ids. ``batching=False``
runs one request at a time through the same machinery (a baseline for benchmarks).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..routing import resolve_spec
from ..slots import SlotsFull
from .hf_batching import Route, Sampling, make_manager, next_output
from .omp import single_threaded_ops

logger = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The engine's queue is full; retry later."""


@dataclass
class Request:
    """One generation request. ``tokens`` grows as the engine generates; ``done`` is set at the end,
    with ``finish_reason`` "stop" (an end token), "length" (``max_new_tokens``), "cancelled" or
    "error" (``error`` says why)."""

    id: str
    prompt: list[int]
    spec: object
    max_new_tokens: int
    sampling: Sampling
    on_update: object = None  # callable(request), from the engine's threads, at each new token and at the end
    tokens: list[int] = field(default_factory=list)
    created: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    finish_reason: str | None = None
    error: Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)
    _engine: Engine | None = field(default=None, repr=False)
    _lease: object = field(default=None, repr=False)

    def cancel(self) -> None:
        """Stop generating; the request's place is freed within one step."""
        if self._engine is not None:
            self._engine._cancel(self)

    def result(self, timeout: float | None = None) -> list[int]:
        """The generated token ids, once finished; raises the request's error."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return list(self.tokens)


class Recorder:
    """What the engine reports as it runs; the HTTP layer exports it (app.py). Counters only here."""

    def __init__(self) -> None:
        self.steps = 0
        self.batch_size = 0
        self.batch_size_peak = 0

    def step(self, batch_size: int) -> None:
        self.steps += 1
        self.batch_size = batch_size
        self.batch_size_peak = max(self.batch_size_peak, batch_size)

    def request(self, spec) -> None:
        pass

    def first_token(self, seconds: float) -> None:
        pass

    def finished(self, request: Request) -> None:
        pass

    def adapter_load(self, seconds: float) -> None:
        pass


class Engine:
    def __init__(self, lm, max_queue: int = 256, max_batch_tokens: int = 256, max_requests_per_batch: int = 64,
                 num_blocks: int = 512, page_size: int = 16, batching: bool = True,
                 recorder: Recorder | None = None) -> None:
        """``max_batch_tokens``: tokens per step (prefill chunks and decode tokens); ``num_blocks`` x
        ``page_size``: the paged KV cache, in tokens, shared by all running requests."""
        self.lm = lm
        self.max_queue = max_queue
        self.batching = batching
        self.recorder = recorder or Recorder()
        self._routes: dict[str, Route] = {}
        self._requests: dict[str, Request] = {}
        self._pending: deque[Request] = deque()
        self._running: set[str] = set()
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._changes = 0  # bumped by every submit and finish: the admission thread retries then
        self._stopping = False
        self._manager = make_manager(lm, self._routes, max_batch_tokens=max_batch_tokens, num_blocks=num_blocks,
                                     page_size=page_size, max_requests_per_batch=max_requests_per_batch,
                                     on_step=self.recorder.step)
        self._threads: list[threading.Thread] = []

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, steps: bool = True) -> Engine:
        """Start admitting and answering requests, with the forward steps in a thread of their own;
        ``steps=False`` leaves the steps to :meth:`run`."""
        if self._threads:
            return self
        if self._stopping:
            raise RuntimeError("this engine was stopped; create a new Engine")
        if steps:
            self._manager.start()
        self._threads = [threading.Thread(target=self._admit_loop, name="lora-graph-admit", daemon=True),
                         threading.Thread(target=self._dispatch_loop, name="lora-graph-dispatch", daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def run(self) -> None:
        """Run the forward steps in the calling thread until :meth:`stop` is called from another one.

        On CPU this is the fast way to serve, from the thread that loaded the model: PyTorch's
        OpenMP keeps one pool of worker threads per thread that ran a parallel op, and once two
        pools exist, more threads than cores wait on each other (libgomp then stops spinning and
        sleeps between ops), which makes the many small ops of a step with adapters about 3x
        slower in a second thread. On a GPU either way is as fast."""
        with self._cond:
            if self._stopping:
                return
        self.start(steps=False)
        with self._cond:  # stop() from another thread either sees the loop running or keeps it from starting
            if self._stopping:
                return
            if self._manager.is_running():
                raise RuntimeError("the engine's steps already run in a thread of their own (start(steps=True))")
            self._manager.claim_here()
        self._manager.run_here()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish nothing more: cancel what is pending or running, and stop every thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for request in list(self._requests.values()):
            self._finish(request, "cancelled")
        self._manager.finish(timeout)
        for t in self._threads:
            t.join(timeout)
        self._threads = []

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- requests ----------------------------------------------------------------------------------
    def submit(self, prompt: list[int], adapters=None, max_new_tokens: int = 16, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, on_update=None) -> Request:
        """Queue a request. Its SPEC is checked now (an unknown adapter raises ValueError); a full
        queue raises :class:`QueueFull`."""
        if not prompt:
            raise ValueError("the prompt has no tokens")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        resolve_spec(adapters, self.lm.adapters)  # an unknown adapter fails here, before queueing
        request = Request(f"lg-{next(self._ids)}", list(prompt), adapters, max_new_tokens,
                          Sampling(temperature, top_p, seed), on_update)
        request._engine = self
        with self._cond:
            if self._stopping or not self._threads:
                raise RuntimeError("the engine is not running; call start()")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"the queue holds {len(self._pending)} requests (max_queue={self.max_queue})")
            self._requests[request.id] = request
            self._pending.append(request)
            self._changes += 1
            self._cond.notify_all()
        self.recorder.request(adapters)
        return request

    def stats(self) -> dict:
        with self._cond:
            pending, running = len(self._pending), len(self._running)
        return {"queue_length": pending, "running": running, "batch_size": self.recorder.batch_size,
                "batch_size_peak": self.recorder.batch_size_peak, "steps": self.recorder.steps,
                "resident_adapters": len(self.lm.resident)}

    # -- admission -----------------------------------------------------------------------------------
    def _admit_loop(self) -> None:
        single_threaded_ops()  # page-ins copy tensors: no second OpenMP pool beside the steps' (omp.py)
        while True:
            with self._cond:
                while not self._stopping and not (self._pending and (self.batching or not self._running)):
                    self._cond.wait(timeout=0.5)
                if self._stopping:
                    return
                candidates, changes = list(self._pending), self._changes
            admitted = False
            for request in candidates:
                if not self.batching and self._running:
                    break
                admitted |= self._admit(request)
            if not admitted:  # what is queued waits for slots: sleep until something changes
                with self._cond:
                    if self._changes == changes and not self._stopping:
                        self._cond.wait(timeout=0.5)

    def _admit(self, request: Request) -> bool:
        """Lease the request's adapters and hand it to the batching manager; leave it queued when
        they do not fit beside the running requests' adapters. True when it was admitted."""
        started = time.perf_counter()
        resident = set(self.lm.resident)
        try:
            lease = self.lm.lease(request.spec)
        except SlotsFull:
            return False  # waits for a running request to finish
        except Exception as exc:  # noqa: BLE001 - a request that can never run fails alone
            self._finish(request, "error", exc)
            return False
        if lease.names - resident:
            self.recorder.adapter_load(time.perf_counter() - started)
        with self._cond:
            if request not in self._pending:  # cancelled meanwhile
                lease.release()
                return False
            self._pending.remove(request)
            request._lease = lease
            self._routes[request.id] = Route.leased(request.sampling, lease)
            self._running.add(request.id)
        self._manager.add_request(request.prompt, request_id=request.id, max_new_tokens=request.max_new_tokens,
                                  streaming=True, eos_token_id=self._eos)
        return True

    @property
    def _eos(self) -> list[int]:
        eos = self.lm.model.generation_config.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    # -- results ---------------------------------------------------------------------------------------
    def _dispatch_loop(self) -> None:
        single_threaded_ops()
        while not self._stopping:
            output = next_output(self._manager, timeout=0.1)
            if output is None:
                continue
            if isinstance(output, Exception):  # the batching thread died: nothing running can finish
                for request in list(self._requests.values()):
                    if request.id in self._running:
                        self._finish(request, "error", output)
                continue
            request = self._requests.get(output.request_id)
            if request is None or request.done.is_set():
                continue
            if output.error:
                self._finish(request, "error", RuntimeError(output.error))
                continue
            new = output.generated_tokens[len(request.tokens):]
            if new and request.first_token is None:
                request.first_token = time.perf_counter()
                self.recorder.first_token(request.first_token - request.created)
            request.tokens.extend(new)
            if output.is_finished():
                last = request.tokens[-1] if request.tokens else None
                self._finish(request, "stop" if last in self._eos else "length")
            elif new and request.on_update is not None:
                request.on_update(request)

    def _cancel(self, request: Request) -> None:
        if request.done.is_set():
            return
        if request.id in self._running:
            self._manager.cancel_request(request.id)
        self._finish(request, "cancelled")

    def _finish(self, request: Request, reason: str, error: Exception | None = None) -> None:
        with self._cond:
            if request.done.is_set():
                return
            request.finish_reason, request.error = reason, error
            self._requests.pop(request.id, None)
            if request in self._pending:
                self._pending.remove(request)
            self._running.discard(request.id)
            self._routes.pop(request.id, None)
            lease, request._lease = request._lease, None
            request.done.set()
            self._changes += 1
            self._cond.notify_all()
        if lease is not None:
            lease.release()
        self.recorder.finished(request)
        if request.on_update is not None:
            request.on_update(request)


def generate_batch(lm, inputs, adapters=None, max_new_tokens: int = 16, do_sample: bool = False,
                   temperature: float | None = None, top_p: float = 1.0, seed: int | None = None,
                   progress: bool | None = None, **engine_kwargs) -> list[list[int]]:
    """Continuous batching, offline: every input's generated token ids, in input order. ``adapters``
    is one SPEC per input (or one SPEC for all, or None for the base)."""
    from ..wrapper import progress_bar

    inputs = [list(map(int, ids)) for ids in inputs]
    if isinstance(adapters, (list, tuple)):
        if len(adapters) != len(inputs):
            raise ValueError(f"adapters has {len(adapters)} entries for {len(inputs)} inputs; give one SPEC per input")
        specs = list(adapters)
    else:
        specs = [adapters] * len(inputs)
    for i, spec in enumerate(specs):
        resolve_spec(spec, lm.adapters)  # every SPEC checked before anything runs
    temperature = (1.0 if temperature is None else temperature) if do_sample else 0.0
    engine_kwargs.setdefault("max_queue", max(len(inputs), 1))
    engine = Engine(lm, **engine_kwargs).start(steps=False)
    try:
        requests = [engine.submit(ids, spec, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  seed=None if seed is None else seed + i)
                    for i, (ids, spec) in enumerate(zip(inputs, specs))]

        def wait_then_stop():  # the steps run in this (the caller's) thread, see Engine.run
            try:
                for request in progress_bar(requests, "generating", lm.progress if progress is None else progress):
                    request.done.wait()
            finally:
                engine.stop()

        watcher = threading.Thread(target=wait_then_stop, name="lora-graph-progress", daemon=True)
        watcher.start()
        engine.run()
        watcher.join()
        return [request.result() for request in requests]
    finally:
        engine.stop()
