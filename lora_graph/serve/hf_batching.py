"""The one place that touches transformers' continuous batching internals.

transformers ships continuous batching (``ContinuousBatchingManager``): a paged KV cache, a
scheduler that admits requests at every step, chunked prefill, and one packed forward per step
whose tokens are runs of consecutive requests (``cu_seq_lens_q``). It knows nothing of adapters.
This module adds two things to one manager, on the objects it owns, without changing transformers:

- **Routing.** Every step's forward is routed as ``lm.use(Packed(lengths, adapters))`` would route
  it: one run per request in the batch, with that request's SPEC, and the ``logits_to_keep`` the
  step passes to the model (each request with a new token), so ``lm_head`` routes its kept tokens
  too. Each request's SPEC was validated and its slots held once, by the lease the engine took to
  admit it (:class:`Route`), so a step only assembles their slots: no lock, no lookup per step.
- **Sampling per request.** Greedy, temperature, top-p and a seed per request (a generator per
  request), where transformers applies one generation config to the whole batch.

It also turns off what cannot work with per-request adapters: prefix sharing (two requests with
one prompt and different adapters must not share KV blocks), CUDA graphs and compilation of the
step (the routing of each step is Python data, set before the forward). Child requests that the
manager forks (``num_return_sequences``) inherit their parent's SPEC and sampling.

Tested with transformers 5.24 (``TESTED``); :func:`check_version` refuses others with a clear error,
since the attributes below are private there and change between releases.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..routing import Spec, kept_per_run

logger = logging.getLogger(__name__)

TESTED = ((5, 24), (5, 24))  # inclusive (major, minor) range of transformers this module is tested with


def check_version() -> None:
    import transformers

    version = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    if not TESTED[0] <= version <= TESTED[1]:
        raise RuntimeError(
            f"lora_graph's continuous batching is tested with transformers "
            f"{'.'.join(map(str, TESTED[0]))}.x to {'.'.join(map(str, TESTED[1]))}.x, and this is "
            f"{transformers.__version__}; install a tested version (pip install 'lora_graph[serve]')"
        )


@dataclass(frozen=True)
class Sampling:
    """How one request picks its next token: greedy when ``temperature == 0``."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Route:
    """What the steps need to know of one request: its sampling, and the slots its lease holds:
    ``lanes``, its SPEC's weighted set over slots, and ``slots``, adapter name → slot."""

    sampling: Sampling
    generator: torch.Generator | None = None
    lanes: tuple = ()
    slots: dict = field(default_factory=dict)

    @classmethod
    def leased(cls, sampling: Sampling, lease) -> Route:
        """The route of a request admitted with ``lease`` (``lm.lease(spec)``)."""
        held = lease.request  # the SPEC resolved to the held slots: one weighted set
        return cls(sampling, lanes=held.sets[0], slots=lease.slots)


_DISCARDED = Route(Sampling())


def step_request(lengths: list[int], routes: list[Route], keep: list[int] | None) -> Spec:
    """The routing of one step, packed runs of ``lengths`` tokens with ``routes``' slots: what
    ``resolve_spec(Packed(lengths, ..., logits_to_keep=keep)).slotted(...)`` gives, from SPECs
    already resolved and held."""
    held: dict[str, int] = {}
    for route in routes:
        held.update(route.slots)
    kept = None if keep is None else kept_per_run(lengths, keep)
    return Spec(tuple(route.lanes for route in routes), lengths=tuple(lengths),
                order=tuple(held[name] for name in sorted(held)), kept=kept)


def next_output(manager, timeout: float):
    """The next step output of any request, None after ``timeout``, or the exception that stopped
    the manager's thread."""
    error = manager.background_thread_status.fatal_error
    if error is not None and manager.output_router.output_queue.empty():
        time.sleep(timeout)
        return error
    try:
        return manager.output_router.output_queue.get(timeout=timeout)
    except queue.Empty:
        return None


def _root_id(request_id: str) -> str:
    """A forked child's id names its parent (``req__child#1``)."""
    return request_id.split("__child#", 1)[0]


def make_manager(lm, routes: dict[str, Route], max_batch_tokens: int, num_blocks: int, page_size: int,
                 max_requests_per_batch: int, on_step: Callable[[int], None] | None = None):
    """A continuous-batching manager over ``lm.model`` whose steps route and sample per request:
    ``routes`` maps a request id to its :class:`Route` and must hold it before the request is added.
    ``on_step(n)`` is called with each step's number of requests."""
    check_version()
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager

    model = lm.model

    class RoutedManager(ContinuousBatchingManager):
        def _create_batch_processor(self):
            processor = super()._create_batch_processor()
            _instrument(processor, lm, routes, on_step)
            return processor

        def claim_here(self) -> None:
            """Mark the loop as running in the calling thread (``start`` runs it in a thread of its
            own), so that ``stop`` from another thread waits for it; then call :meth:`run_here`."""
            if self.is_running():
                raise RuntimeError("the generation loop is already running")
            self.background_thread_status.clear()
            self._generation_thread = _CallingThread()

        def finish(self, timeout: float | None) -> None:
            """Stop the loop, wherever it runs, and put the model back as it was (its attention
            implementation): also after a loop that ended by itself (an interrupt in ``run_here``)."""
            if self._generation_thread is not None:
                self.stop(block=True, timeout=timeout)

        def run_here(self) -> None:
            """The generation loop, in the calling thread, until ``stop`` is called from another."""
            here = self._generation_thread
            try:
                self._run_generation_loop(use_inference_mode=torch.is_inference_mode_enabled())
            finally:
                here.finished.set()

    config = ContinuousBatchingConfig(
        page_size=page_size, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens,
        max_requests_per_batch=max_requests_per_batch, allow_block_sharing=False, use_async_batching=False,
        use_cuda_graph=False, auto_switch_to_flash=False, max_blocks_per_request=0,
    )
    generation = GenerationConfig(do_sample=False, max_new_tokens=16, eos_token_id=-1,
                                  pad_token_id=model.generation_config.pad_token_id)
    return RoutedManager(model, generation, config)


class _CallingThread:
    """Stands for the manager's generation thread while the loop runs in a caller's thread: what
    ``is_running``, ``stop`` and ``join`` ask of a thread."""

    def __init__(self) -> None:
        self.finished = threading.Event()

    def is_alive(self) -> bool:
        return not self.finished.is_set()

    def join(self, timeout: float | None = None) -> None:
        self.finished.wait(timeout)


def _instrument(processor, lm, routes: dict[str, Route], on_step) -> None:
    """Route and sample each step of ``processor`` (its model runner's step function, replaced on
    the instance)."""
    runner, io = processor.model_runner, processor.inputs_and_outputs
    step = runner._forward_process_and_sample

    def route_of(future) -> Route:  # a request cancelled meanwhile has none: its tokens are discarded
        return routes.get(_root_id(future.state.request_id)) or _DISCARDED

    def routed_step(model, batch_data, *rest):
        batch = io.requests_in_batch  # FutureRequestState, in the order of the packed tokens
        lengths = [f.query_length for f in batch]
        routes = [route_of(f) for f in batch]
        runner._sample = _sampler([route for f, route in zip(batch, routes) if f.has_new_token])
        total = int(batch_data["input_ids"].shape[-1])
        if total > sum(lengths):  # padding tokens at the end: the base
            lengths, routes = lengths + [total - sum(lengths)], routes + [_DISCARDED]
        logits_to_keep = batch_data.get("logits_to_keep")
        keep = None if logits_to_keep is None else [int(i) for i in logits_to_keep.tolist()]
        if on_step is not None:
            on_step(len(batch))
        scope = lm.router.enter(step_request(lengths, routes, keep))
        try:
            step(model, batch_data, *rest)
        finally:
            lm.router.leave(scope)

    runner._forward_process_and_sample = routed_step


def _sampler(routes: list[Route]):
    """The step's ``_sample``: one next token per kept row, written into ``output_ids[0]``."""

    def sample(scores: torch.Tensor, output_ids: torch.Tensor) -> None:
        logits = scores[0].float()  # (M, V)
        tokens = logits.argmax(dim=-1)  # (M,)
        for i, route in enumerate(routes):
            s = route.sampling
            if s.temperature <= 0:
                continue
            probs = torch.softmax(logits[i] / s.temperature, dim=-1)  # (V,)
            if s.top_p < 1.0:
                probs = _top_p(probs, s.top_p)
            if route.generator is None:
                route.generator = torch.Generator(device=probs.device)
                route.generator.manual_seed(s.seed if s.seed is not None else torch.seed())
            tokens[i] = torch.multinomial(probs, 1, generator=route.generator)[0]
        output_ids[0, : tokens.numel()].copy_(tokens)

    return sample


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches ``top_p`` (the first always)."""
    sorted_probs, order = probs.sort(descending=True)
    outside = sorted_probs.cumsum(0) - sorted_probs > top_p  # mass before this token already reaches top_p
    sorted_probs[outside] = 0.0
    return torch.zeros_like(probs).scatter_(0, order, sorted_probs)
