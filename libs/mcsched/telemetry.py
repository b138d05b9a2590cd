"""Traces and metrics: one trace per elected pod, Prometheus metrics, health endpoints.

Tracing: the admission webhook starts a pod's trace and stores its
``traceparent`` on the proxy pod (annotations); every later step continues
it, through NATS message headers between services and through the same
annotation on the delegate. Spans go to an OTLP gRPC endpoint when one is
configured.

Metrics (``/metrics`` on ``metrics_port``): messages handled and failed per
subject kind, consumer lag, placement latency per stage, API requests per
cluster. ``/healthz`` answers while the event loop runs; ``/readyz`` only
while NATS is connected and every cache can reach its API server.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from .constants import TRACE_ID_ANNOTATION, TRACEPARENT_ANNOTATION

log = logging.getLogger(__name__)

tracer = trace.get_tracer("multicluster-scheduler")

MESSAGES_HANDLED = Counter("mcs_messages_handled_total", "Bus messages handled", ["kind"])
MESSAGES_FAILED = Counter("mcs_messages_failed_total", "Bus messages whose handling failed", ["kind"])
MESSAGES_DEAD = Counter("mcs_messages_dead_lettered_total",
                        "Bus messages moved to the dead-letter stream (unreadable, or failing every delivery)",
                        ["kind", "reason"])
CONSUMER_LAG = Gauge("mcs_consumer_lag_messages", "Messages waiting for a durable consumer", ["consumer"])
API_REQUESTS = Counter("mcs_api_requests_total", "Kubernetes API requests", ["cluster", "method"])
RESYNC_SECONDS = Gauge("mcs_resync_seconds", "How long the last full resync took", ["what"])
RESYNC_ITEMS = Gauge("mcs_resync_items", "Objects the last full resync went through", ["what"])
SHARES_OWNED = Gauge("mcs_shares_owned", "Shares of its stage's work this process owns (partitions and whole "
                     "clusters; mcsched.shards)")
STAGE_MEMBERS = Gauge("mcs_stage_members", "Processes of this stage alive, as this one hears them")
PLACEMENT_SECONDS = Histogram(
    "mcs_placement_seconds", "Seconds from proxy creation to each step", ["stage"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300))


def subject_kind(subject: str) -> str:
    """``mcs.elect.c1`` -> ``elect``."""
    parts = subject.split(".")
    return parts[1] if len(parts) > 2 else subject


def setup_tracing(service: str, otlp_endpoint: str | None) -> TracerProvider | None:
    if not otlp_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    # The SDK's batching (OTEL_BSP_* variables; by default a batch every 5 s or every 512 spans):
    # each export is a gRPC call and a wake-up of its thread, paid by every process of a stage;
    # exporting twice a second cost three proxy-schedulers 8-10 % of their CPU (docs/performance.md).
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)))
    trace.set_tracer_provider(provider)
    log.info("exporting traces to %s", otlp_endpoint)
    return provider


def trace_annotations() -> dict[str, str]:
    """Annotations that let later steps (and users) find the current trace."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    span = trace.get_current_span().get_span_context()
    if not span.is_valid or "traceparent" not in carrier:
        return {}
    return {TRACEPARENT_ANNOTATION: carrier["traceparent"], TRACE_ID_ANNOTATION: format(span.trace_id, "032x")}


@contextmanager
def pod_trace(pod: Mapping[str, Any]) -> Iterator[None]:
    """Continue the trace recorded on a pod (proxy or delegate), if any."""
    annotations = pod.get("metadata", {}).get("annotations") or {}
    parent = annotations.get(TRACEPARENT_ANNOTATION)
    if not parent:
        yield
        return
    token = otel_context.attach(propagate.extract({"traceparent": parent}))
    try:
        yield
    finally:
        otel_context.detach(token)


def observe_since_creation(stage: str, pod: Mapping[str, Any]) -> None:
    """Record in ``mcs_placement_seconds`` how long after the pod's creation ``stage`` was reached."""
    observe_since(stage, pod.get("metadata", {}).get("creationTimestamp"))


def observe_since(stage: str, created: str | None) -> None:
    """Record how long after ``created`` (an RFC 3339 time, e.g. a proxy's creationTimestamp) ``stage`` was reached."""
    if created:
        start = datetime.fromisoformat(created.replace("Z", "+00:00"))
        PLACEMENT_SECONDS.labels(stage).observe((datetime.now(UTC) - start).total_seconds())


async def start_http(port: int, ready: Callable[[], list[str]]) -> web.AppRunner:
    """Serve /metrics, /healthz and /readyz on ``port``; ``ready()`` lists what is not ready."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(_: web.Request) -> web.Response:
        problems = ready()
        if problems:
            return web.Response(status=503, text="\n".join(problems) + "\n")
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    log.info("metrics and health on :%d", port)
    return runner
