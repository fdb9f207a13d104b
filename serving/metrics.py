"""Prometheus metrics under the ``adapt_serve:`` prefix (vLLM's names and meanings where they exist).

Labels are bounded enums only (endpoint, finish reason, error code, outcome); never a session id or a key.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_STEP = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("adapt_serve:requests", "Inference requests finished, by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.finished = Counter("adapt_serve:request_success", "Choices finished, by finish reason",
                                ["finished_reason"], registry=r)
        self.errors = Counter("adapt_serve:request_errors", "Error responses, by error code", ["code"], registry=r)
        self.prompt_tokens = Counter("adapt_serve:prompt_tokens", "Prompt tokens received", registry=r)
        self.generation_tokens = Counter("adapt_serve:generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("adapt_serve:time_to_first_token_seconds", "Time to the first generated token",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("adapt_serve:inter_token_latency_seconds", "Time between generated tokens",
                             buckets=_STEP + (2.5, 5.0), registry=r)
        self.e2e = Histogram("adapt_serve:e2e_request_latency_seconds", "Request latency, end to end",
                             buckets=_LATENCY, registry=r)
        self.running = Gauge("adapt_serve:num_requests_running", "Inference requests in flight", registry=r)
        self.disconnects = Counter("adapt_serve:http_requests_client_disconnected",
                                   "Requests whose client went away before the end", registry=r)
        self.batch = Histogram("adapt_serve:decode_batch_size", "Rows per decode step", buckets=_BATCH,
                               registry=r)
        self.step = Histogram("adapt_serve:decode_step_seconds", "Wall time of one batched decode step",
                              buckets=_STEP, registry=r)
        self.session_events = Counter("adapt_serve:session_events", "Session lifecycle events", ["event"],
                                      registry=r)
        self.commits = Counter("adapt_serve:session_turns", "Session turns by outcome (commit or rollback)",
                               ["outcome"], registry=r)
        self.sessions = Gauge("adapt_serve:sessions", "Sessions held, by tier", ["tier"], registry=r)
        self.session_bytes = Gauge("adapt_serve:session_resident_bytes", "Bytes of resident session state",
                                   registry=r)

    def watch_sessions(self, counts: Callable[[], tuple[int, int]], resident_bytes: Callable[[], int]) -> None:
        """Session gauges are computed when scraped."""
        self.sessions.labels(tier="memory").set_function(lambda: counts()[0])
        self.sessions.labels(tier="disk").set_function(lambda: counts()[1])
        self.session_bytes.set_function(resident_bytes)

    def on_step(self, rows: int, seconds: float) -> None:
        self.batch.observe(rows)
        self.step.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
