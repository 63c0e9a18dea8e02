"""Prometheus metrics of the service, added to BentoML's own on ``/metrics``.

BentoML already exports per-route request counts and latencies
(``bentoml_service_request_total``, ``bentoml_service_request_duration_seconds``). These add
what only the service knows. Created on first use, inside the worker: BentoML sets
``PROMETHEUS_MULTIPROC_DIR`` after importing the service module, and metrics created before that
would never reach ``/metrics``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@dataclass(frozen=True)
class Metrics:
    errors: Any  # Counter{kind}
    images: Any  # Counter
    text_cache: Any  # Counter{result="hit"|"miss"}
    batch_size: Any  # Histogram
    stage_seconds: Any  # Histogram{stage}


@functools.cache
def get_metrics() -> Metrics:
    from prometheus_client import Counter, Histogram

    return Metrics(
        errors=Counter("promptbake_errors", "Refused or failed requests by kind", ["kind"]),
        images=Counter("promptbake_images", "Images embedded"),
        text_cache=Counter("promptbake_text_cache", "Class-name embedding cache lookups by result", ["result"]),
        batch_size=Histogram("promptbake_image_batch_size", "Images per onnxruntime image-graph run (across requests)",
                             buckets=_BATCH_BUCKETS),
        stage_seconds=Histogram("promptbake_stage_seconds", "Time per request stage", ["stage"],
                                buckets=_SECONDS_BUCKETS),
    )
