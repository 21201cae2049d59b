"""Prometheus metrics of one app: requests, latency, generate stages and slots, text-path
batches and queue time, served version, swaps."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

QUEUE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServingMetrics:
    """The app's metrics, in a registry of their own (several apps can share a process)."""

    def __init__(self) -> None:
        disable_created_metrics()  # no `_created` series: they only add noise here
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "sur_http_requests",
            "HTTP requests by route template, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "sur_http_request_seconds",
            "HTTP request latency by route template.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.generate_stage = Histogram(
            "sur_generate_stage_seconds",
            "Seconds per /v1/generate stage: text_path (ONNX), denoise_decode, base_image.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.generate_in_progress = Gauge(
            "sur_generate_in_progress",
            "/v1/generate requests now holding one of the serving.limits."
            "max_concurrent_generate slots.",
            registry=self.registry,
        )
        self.embedded_prompts = Counter(
            "sur_embedded_prompts", "Prompts embedded by /v1/embed.", registry=self.registry
        )
        self.batch_requests = Histogram(
            "sur_text_path_batch_requests",
            "Requests that shared one text-path (ONNX Runtime) call.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_rows = Histogram(
            "sur_text_path_batch_rows",
            "Prompts in one text-path (ONNX Runtime) call.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "sur_text_path_queue_seconds",
            "Seconds a request waited for its text-path batch to start "
            "(serving.batch_window_ms, or a running batch).",
            buckets=QUEUE_BUCKETS,
            registry=self.registry,
        )
        self.batch_waiting = Gauge(
            "sur_text_path_waiting",
            "Requests queued for the next text-path batch.",
            registry=self.registry,
        )
        self.batch_running = Gauge(
            "sur_text_path_running",
            "Requests in the text-path batch now running.",
            registry=self.registry,
        )
        self.swaps = Counter(
            "sur_model_swaps",
            "Version loads by result: ok (swapped in) or failed (old version kept).",
            ["result"],
            registry=self.registry,
        )
        self.served = Gauge(
            "sur_model_served_info",
            "1 for the version now served.",
            ["version", "base_model", "provider"],
            registry=self.registry,
        )
        self.ready = Gauge(
            "sur_model_ready", "1 while a version is served.", registry=self.registry
        )

    def now_serving(self, version: str, base_model: str, provider: str) -> None:
        """Point the served-version gauge at `version`."""
        self.served.clear()
        self.served.labels(version, base_model, provider).set(1)
        self.ready.set(1)

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
