"""Prometheus metrics of the REST app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
