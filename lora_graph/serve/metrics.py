"""Prometheus metrics of a server (prometheus_client), fed by the engine's :class:`Recorder` calls.

Each server has its own ``CollectorRegistry`` (several servers can live in one process, as in
tests); gauges that describe the present (queue, running requests, resident adapters) are read
from the engine when /metrics is scraped.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .engine import Recorder

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _label(spec) -> str:
    if spec is None:
        return "base"
    if isinstance(spec, str):
        return spec
    return "+".join(sorted(spec))


class Metrics(Recorder):
    def __init__(self, server) -> None:
        super().__init__()
        self.server = server
        self.registry = r = CollectorRegistry()
        self.requests = Counter("lora_graph_requests", "Requests received, by adapter (or set).", ["adapter"], registry=r)
        self._finished = Counter("lora_graph_requests_finished", "Requests ended, by reason.", ["reason"], registry=r)
        self.prompt_tokens = Counter("lora_graph_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generated = Counter("lora_graph_generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram("lora_graph_time_to_first_token_seconds", "Time to first token.", buckets=_LATENCY,
                              registry=r)
        self.loads = Histogram("lora_graph_adapter_load_seconds", "Time to page adapters in (a request, or a "
                               "replica's multiplexed load).", buckets=_LATENCY, registry=r)
        self.batch = Histogram("lora_graph_batch_size", "Requests in each forward pass.",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.steps_total = Counter("lora_graph_steps", "Forward passes.", registry=r)
        self.batch_peak = Gauge("lora_graph_batch_size_peak", "The most requests one forward pass has served.",
                                registry=r)
        self.queue = Gauge("lora_graph_queue_length", "Requests waiting for admission.", registry=r)
        self.running = Gauge("lora_graph_running_requests", "Requests admitted and generating.", registry=r)
        self.resident = Gauge("lora_graph_resident_adapters", "Adapters in device slots.", registry=r)

    def step(self, batch_size: int) -> None:
        super().step(batch_size)
        self.steps_total.inc()
        self.batch.observe(batch_size)
        self.batch_peak.set(self.batch_size_peak)

    def request(self, spec) -> None:
        self.requests.labels(adapter=_label(spec)).inc()

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def adapter_load(self, seconds: float) -> None:
        self.loads.observe(seconds)

    def finished(self, request) -> None:
        self._finished.labels(reason=request.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(len(request.prompt))
        self.generated.inc(len(request.tokens))

    def render(self) -> tuple[bytes, str]:
        stats = self.server.engine.stats()
        self.queue.set(stats["queue_length"])
        self.running.set(stats["running"])
        self.resident.set(stats["resident_adapters"])
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
