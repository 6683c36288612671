"""Prometheus metrics of the REST app, and their exposition (summed over worker processes)."""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)


class Metrics:
    """Prometheus metrics in a registry of the app's own (several apps per process in tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "defectscope_http_requests_total",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "defectscope_http_request_duration_seconds",
            "HTTP request latency by route template, method and status.",
            ["route", "method", "status"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "defectscope_batch_size",
            "Images per model call formed by the micro-batcher.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.scores = Histogram(
            "defectscope_normalized_score",
            "Normalised anomaly score of each prediction (0.5 is the threshold).",
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
            registry=self.registry,
        )
        self.predictions = Counter(
            "defectscope_predictions_total", "Images scored.", registry=self.registry
        )
        self.anomalies = Counter(
            "defectscope_anomalies_total", "Images judged anomalous.", registry=self.registry
        )
        self.model_info = Gauge(
            "defectscope_model_info",
            "1 for the loaded model, labelled with its identity.",
            ["fingerprint", "backbone", "defectscope_version"],
            registry=self.registry,
            multiprocess_mode="max",
        )
        # Set when /v1/drift is computed (not on a schedule): the last answer a client asked for.
        self.drift_score_p = Gauge(
            "defectscope_drift_score_p_value",
            "p-value of the score KS drift test of the last /v1/drift window.",
            registry=self.registry,
            multiprocess_mode="min",
        )
        self.drift_verdict = Gauge(
            "defectscope_drift_verdict",
            "Verdict of the last /v1/drift window: 0 ok, 1 warning, 2 drift.",
            registry=self.registry,
            multiprocess_mode="max",
        )
        self.model_ready = Gauge(
            "defectscope_model_ready",
            "1 once the model is loaded (in every worker, with several).",
            registry=self.registry,
            multiprocess_mode="min",
        )
        self.model_identity: tuple[str, str, str] | None = None
        # Per named model (several models in one service); the families above stay totals.
        self.model_predictions = Counter(
            "defectscope_model_predictions_total",
            "Images scored, by model name.",
            ["model"],
            registry=self.registry,
        )
        self.model_anomalies = Counter(
            "defectscope_model_anomalies_total",
            "Images judged anomalous, by model name.",
            ["model"],
            registry=self.registry,
        )
        self.model_loads = Counter(
            "defectscope_model_loads_total",
            "Loads of a named model (first use, reload, or after an eviction).",
            ["model"],
            registry=self.registry,
        )
        self.model_evictions = Counter(
            "defectscope_model_evictions_total",
            "Named models unloaded to stay within the memory budget.",
            ["model"],
            registry=self.registry,
        )
        self.model_loaded = Gauge(
            "defectscope_model_loaded",
            "1 while a named model is loaded in this worker.",
            ["model"],
            registry=self.registry,
            multiprocess_mode="max",
        )
        self.model_memory = Gauge(
            "defectscope_model_memory_bytes",
            "Estimated memory of a named model (bank, plus its backbone unless shared).",
            ["model"],
            registry=self.registry,
            multiprocess_mode="max",
        )

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method, str(status)).observe(seconds)

    def observe_prediction(
        self, normalized_score: float, is_anomalous: bool, model: str = ""
    ) -> None:
        self.predictions.inc()
        self.scores.observe(normalized_score)
        if is_anomalous:
            self.anomalies.inc()
        if model:
            self.model_predictions.labels(model).inc()
            if is_anomalous:
                self.model_anomalies.labels(model).inc()

    def observe_drift(self, score_p_value: float | None, verdict: int) -> None:
        # Always set for the KS test; only reported tests may lack a p-value.
        if score_p_value is not None:
            self.drift_score_p.set(score_p_value)
        self.drift_verdict.set(verdict)

    def set_model(self, identity: tuple[str, str, str]) -> None:
        """One ``model_info`` series for the served model, labelled (fingerprint, backbone,
        version); the model is ready."""
        if identity != self.model_identity:
            self.model_info.clear()
            self.model_info.labels(*identity).set(1)
            self.model_identity = identity
        self.model_ready.set(1)

    def exposition(self) -> bytes:
        """Prometheus text format; with several workers, the sum over all of them."""
        registry = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # Each worker writes its values to files in that folder; any worker can add them up.
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return bytes(generate_latest(registry))
