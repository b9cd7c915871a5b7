"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    """Requests, tokens, queue depth, batch size and latency; ``model`` labels name the adapter."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, base_name: str) -> None:
        self.base_name = base_name
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "deltatune_requests",
            "Requests answered, by endpoint, model and HTTP status.",
            ["endpoint", "model", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("deltatune_prompt_tokens", "Prompt tokens read, by model.", ["model"], registry=r)
        self.generated_tokens = Counter(
            "deltatune_generated_tokens", "Tokens generated, by model.", ["model"], registry=r
        )
        self.queue_depth = Gauge("deltatune_queue_depth", "Requests waiting for a place in the batch.", registry=r)
        self.running_rows = Gauge("deltatune_running_rows", "Rows decoding in the batch now.", registry=r)
        self.batch_rows = Histogram(
            "deltatune_batch_rows", "Rows in each decoding step.", buckets=BATCH_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "deltatune_request_latency_seconds",
            "Time from a request's arrival to its last token.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "deltatune_time_to_first_token_seconds",
            "Time from a request's arrival to its first token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def label(self, adapter: str | None) -> str:
        return self.base_name if adapter is None else adapter

    def count_tokens(self, adapter: str | None, count: int) -> None:
        self.generated_tokens.labels(model=self.label(adapter)).inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
