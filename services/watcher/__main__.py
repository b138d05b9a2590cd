"""watcher: owns the elect step.

* Serves the mutating admission webhook that turns elected pods into proxy
  pods at creation (and registers it in every source cluster, each on its
  own: a source unreachable at start holds up neither the others nor the watch).
* Watches the proxy pods with no cluster chosen (the label
  ``cluster-chosen``, written with each choice: :mod:`mcsched.choice`) and not
  bound, in its shares of the sources (partitions of their proxies:
  :mod:`mcsched.shards`), and publishes an ``elect`` message for each: when it
  is new, and again each time a target's scheduler refused it (a new round of
  its placement); a periodic resync publishes them again, so even an emptied
  stream heals.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import orjson
from aiohttp import web
from opentelemetry import context as otel_context

from mcsched import pki
from mcsched.admission import WEBHOOK_CONFIGURATION_NAME, WEBHOOK_PATH, review, webhook_configuration
from mcsched.bus import PUBLISHERS
from mcsched.choice import Placement
from mcsched.constants import CLUSTER_CHOSEN_LABEL, PLACEMENT_ANNOTATION, PROXY_SCHEDULER_NAME
from mcsched.kube import JSON, Informer, KubeError
from mcsched.models import ElectMessage, PodRef
from mcsched.natsauth import proxy_scheduler_durable
from mcsched.podspec import delegate_original, is_gated
from mcsched.runtime import Runtime, periodic, run_service
from mcsched.settings import WebhookSettings
from mcsched.shards import partition_selector
from mcsched.spread import controller_uid
from mcsched.telemetry import RESYNC_ITEMS, RESYNC_SECONDS, pod_trace, trace_annotations, tracer
from mcsched.workqueue import WorkQueue

log = logging.getLogger("watcher")

# A source that refused the webhook's registration (or cannot be reached) is asked again this often.
REGISTER_RETRY_SECONDS = 2.0
# How long the webhook's listener outlives the composition that served it, for the next one to take
# it over (composing again takes a moment); a process that stops exits before then.
WEBHOOK_HANDOVER_SECONDS = 30.0


# host called -> the self-signed serving material made for it, kept for the life of the process: a
# composition after a change of members or targets registers the CA the API servers trust already,
# rather than a new one they would refuse until its registration lands (failurePolicy Fail).
_SELF_SIGNED: dict[str, tuple[ssl.SSLContext, bytes]] = {}
_FROM_FILES: dict[tuple[str, str], ssl.SSLContext] = {}  # (certificate file, key file) -> their context
# The largest AdmissionReview taken: a pod may be as large as the API server takes a request (3 MiB).
WEBHOOK_MAX_REQUEST_BYTES = 4 * 1024 * 1024


def _serving_material(settings: WebhookSettings) -> tuple[ssl.SSLContext, bytes]:
    """TLS context for the webhook and the CA bundle the API servers must trust."""
    if settings.cert_file and settings.key_file:
        # One context per pair of files for the life of the process (so the next composition takes the
        # listener over), the files read into it again each time: they may have been renewed.
        files = (str(settings.cert_file), str(settings.key_file))
        context = _FROM_FILES.setdefault(files, ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
        context.load_cert_chain(settings.cert_file, settings.key_file)
        ca_file = settings.ca_file or settings.cert_file
        return context, Path(ca_file).read_bytes()
    host = settings.called_host()
    if host not in _SELF_SIGNED:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca = pki.new_ca(pki.WEBHOOK_CA_NAME)
        pki.serving(ca, host).load_into(context)
        _SELF_SIGNED[host] = (context, ca.cert_pem)
    return _SELF_SIGNED[host]


@dataclass
class _Listener:
    """The webhook's listener, kept from one composition to the next (a change of members or
    targets): each composition hands it its settings, so no pod is refused while it recomposes."""

    key: tuple[str, int, int]  # listen host, port, and the TLS context it serves with
    runner: web.AppRunner
    failover_seconds: int | None
    closing: asyncio.Task[None] | None = None

    async def release(self) -> None:
        """The composition that served it closes (one of its closers): it closes too unless the next
        one takes it over."""
        self.closing = asyncio.get_running_loop().create_task(self._close_later())

    async def _close_later(self) -> None:
        await asyncio.sleep(WEBHOOK_HANDOVER_SECONDS)
        await self.close()

    async def close(self) -> None:
        global _listener
        if _listener is self:
            _listener = None
        await self.runner.cleanup()


_listener: _Listener | None = None


async def serve_webhook(rt: Runtime) -> tuple[str, bytes]:
    """Serve the admission webhook; the URL the API servers call and the CA bundle they must trust.

    The listener of the previous composition is taken over when it listens the same way (the
    self-signed material is the process's); otherwise it is closed and a new one started.
    """
    global _listener
    settings = rt.settings.webhook
    url = settings.called_url()
    context, ca_bundle = _serving_material(settings)
    key = (settings.listen_host, settings.port, id(context))
    previous = _listener
    if previous is not None:
        if previous.closing is not None:
            previous.closing.cancel()
            previous.closing = None
        if previous.key == key:
            previous.failover_seconds = rt.settings.failover_seconds
            rt.closers.append(previous.release)
            log.info("admission webhook still listening on %s:%d", settings.listen_host, settings.port)
            return url, ca_bundle
        await previous.close()

    async def mutate(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        pod = (body.get("request") or {}).get("object") or {}
        meta = pod.get("metadata") or {}
        # A new trace per elected pod starts here; its context rides on the proxy's annotations.
        with tracer.start_as_current_span("admit pod", context=otel_context.Context(), attributes={
                "k8s.namespace": str((body.get("request") or {}).get("namespace", "")),
                "k8s.pod.generate_name": str(meta.get("generateName") or meta.get("name") or "")}):
            answer = review(body, trace_annotations(), listener.failover_seconds)
            return web.Response(body=orjson.dumps(answer), content_type="application/json")

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=WEBHOOK_MAX_REQUEST_BYTES)
    app.router.add_post(WEBHOOK_PATH, mutate)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.listen_host, settings.port, ssl_context=context,
                      reuse_port=settings.reuse_port or None).start()
    listener = _listener = _Listener(key, runner, rt.settings.failover_seconds)
    rt.closers.append(listener.release)
    log.info("admission webhook listening on %s:%d", settings.listen_host, settings.port)
    return url, ca_bundle


def register_webhook(rt: Runtime, url: str, ca_bundle: bytes) -> None:
    """Register the webhook in every source, each on its own: an unreachable source holds up no other."""
    settings = rt.settings.webhook
    config = webhook_configuration(url.rstrip("/") + WEBHOOK_PATH, ca_bundle, settings.failure_policy,
                                   settings.timeout_seconds)
    for source in rt.settings.source_names:
        rt.spawn(_register(rt, source, url, config), f"register webhook in {source}")


async def _register(rt: Runtime, source: str, url: str, config: JSON) -> None:
    path = f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{WEBHOOK_CONFIGURATION_NAME}"
    while True:
        try:
            await rt.clusters[source].apply(path, config)
            log.info("webhook registered in %s (calls %s)", source, url)
            return
        except (KubeError, OSError) as exc:
            log.warning("cannot register the webhook in %s yet (%s); retrying", source, exc)
            await asyncio.sleep(REGISTER_RETRY_SECONDS)


class ElectPublisher:
    """Publishes an elect message for every proxy pod that still needs a target."""

    def __init__(self, rt: Runtime, informers: dict[str, Informer]) -> None:
        self.rt = rt
        self.informers = informers
        self.queue: WorkQueue[tuple[str, str, str]] = WorkQueue("publish elect", self._publish_key, workers=PUBLISHERS)
        self.queue.start()
        rt.closers.append(self.queue.stop)
        # proxy uid -> (placement round, when, stream sequence) of its last elect message
        self.published: dict[str, tuple[int, float, int]] = {}

    @staticmethod
    def pending(pod: JSON) -> bool:
        """Unbound, alive, not gated (its gates lifted: a MODIFIED event), and no cluster chosen (or the
        chosen one refused it)."""
        return not pod["spec"].get("nodeName") and not pod["metadata"].get("deletionTimestamp") and \
            not is_gated(pod) and Placement.of(pod).target is None

    def _due(self, pod: JSON) -> bool:
        """Pending, and not yet published for its current placement round."""
        if not self.pending(pod):
            return False
        published = self.published.get(pod["metadata"]["uid"])
        return published is None or published[0] != Placement.of(pod).round

    @staticmethod
    def message(source: str, pod: JSON, reason: Literal["created", "resync", "rejected"]) -> ElectMessage:
        meta = pod["metadata"]
        ref = PodRef(cluster=source, namespace=meta["namespace"], name=meta["name"], uid=meta["uid"])
        try:
            manifest: JSON | None = delegate_original(pod)
        except ValueError:  # not made by our webhook: the proxy-scheduler reads it and says what is wrong
            manifest = None
        return ElectMessage(proxy=ref, reason=reason, manifest=manifest, controller=controller_uid(pod),
                            created=meta.get("creationTimestamp"),
                            placement=(meta.get("annotations") or {}).get(PLACEMENT_ANNOTATION),
                            resource_version=meta.get("resourceVersion"))

    async def publish(self, source: str, pod: JSON) -> None:
        round_ = Placement.of(pod).round
        message = self.message(source, pod, "rejected" if round_ else "created")
        with pod_trace(pod), tracer.start_as_current_span("publish elect", attributes={"pod": str(message.proxy)}):
            seq = await self.rt.bus.publish(self.rt.bus.subject("elect", source), message,
                                            f"elect:{message.proxy.uid}:{round_}")
        if self._cached(message.proxy) is not None:  # not bound or deleted while it was being published
            self.published[message.proxy.uid] = (round_, time.monotonic(), seq)

    def _cached(self, ref: PodRef) -> JSON | None:
        """The proxy as this process's cache has it now, if it is still that incarnation and unbound."""
        current = self.informers[ref.cluster].get(f"{ref.namespace}/{ref.name}")
        return current if current is not None and current["metadata"]["uid"] == ref.uid else None

    def on_event(self, source: str, kind: str, pod: JSON, _old: JSON | None = None) -> None:
        if kind == "DELETED" or pod["spec"].get("nodeName"):
            self.published.pop(pod["metadata"]["uid"], None)
        elif self._due(pod):  # published by workers: a burst never holds up the watch
            self.queue.add((source, pod["metadata"]["namespace"], pod["metadata"]["name"]))

    async def _publish_key(self, key: tuple[str, str, str]) -> None:
        source, namespace, name = key
        pod = self.informers[source].get(f"{namespace}/{name}")
        if pod is None or not self._due(pod):
            return
        try:
            await self.publish(source, pod)
        except Exception as exc:  # NATS down: the resync publishes it later
            log.warning("could not publish elect for %s/%s: %s", source, name, exc)

    async def resync(self) -> None:
        """Publish again the proxies still needing a target long after their last elect message.

        A message still waiting in the stream (a backlog is not a loss: the
        proxy-scheduler's consumer has not been handed it yet) counts as
        published just now; of the others, those published three periods ago
        or never (NATS was down) are sent again. Without the first rule, every
        pod of a long backlog would be queued again each period, and each copy
        would ask every cluster about a pod chosen for meanwhile.
        """
        period = self.rt.settings.resync_period_seconds
        epoch = int(time.time() // period)
        now = time.monotonic()
        waiting = await self.rt.bus.undelivered("elect", proxy_scheduler_durable())
        batch = []
        RESYNC_ITEMS.labels("watcher").set(sum(len(i.store) for i in self.informers.values()))
        for source, informer in self.informers.items():
            for pod in informer.items():
                if not self.pending(pod):
                    continue
                uid = pod["metadata"]["uid"]
                last = self.published.get(uid)
                if last is not None and waiting is not None and last[2] in waiting:
                    self.published[uid] = (last[0], now, last[2])
                elif last is None or now - last[1] > 3 * period:
                    batch.append((self.rt.bus.subject("elect", source), self.message(source, pod, "resync"),
                                  f"elect:{uid}:{Placement.of(pod).round}:{epoch}"))
        if batch:
            log.info("resync: %d proxy pods still need a target", len(batch))
            sequences = await self.rt.bus.publish_many(batch)
            for (_, message, _), seq in zip(batch, sequences, strict=True):
                if seq is not None and (cached := self._cached(message.proxy)) is not None:
                    self.published[message.proxy.uid] = (Placement.of(cached).round, now, seq)
        RESYNC_SECONDS.labels("watcher").set(time.monotonic() - now)


async def compose(rt: Runtime) -> None:
    if rt.settings.webhook.enabled:
        url, ca_bundle = await serve_webhook(rt)
        if rt.settings.webhook.register_webhook:
            register_webhook(rt, url, ca_bundle)
    # Only proxies still waiting for a cluster (once one is chosen, a proxy leaves this cache, a DELETED
    # event, and comes back if that cluster refuses it), and of those only the partitions this process
    # owns (the others' watchers publish theirs).
    informers = {
        source: rt.informer(source, "/api/v1/pods",
                            field_selector=f"spec.schedulerName={PROXY_SCHEDULER_NAME},spec.nodeName=",
                            **partition_selector(rt.shares.partitions(source), f"!{CLUSTER_CHOSEN_LABEL}"))
        for source in rt.shares.sources(rt.settings.source_names)
    }
    publisher = ElectPublisher(rt, informers)
    for source, informer in informers.items():
        informer.add_handler(functools.partial(publisher.on_event, source))
    rt.spawn(periodic(rt.settings.resync_period_seconds, publisher.resync, "elect resync"), "elect resync")


if __name__ == "__main__":
    run_service("watcher", compose)
