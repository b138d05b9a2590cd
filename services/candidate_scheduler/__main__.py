"""candidate-scheduler: owns the delegate step in each target it serves.

* Answers ``candidate.<target>`` requests: does the pod fit in this target,
  on which node, with what score; a fitting answer reserves the room for a
  short while (shared reservation book, compare-and-set).
* Consumes ``delegate.<target>``: creates the delegate pod (deterministic
  name) bound to the reserved node, and acks once the API server stored it.
"""

from __future__ import annotations

import logging
import time

from opentelemetry import trace

from mcsched.bus import ACK, Outcome, retry_later
from mcsched.capacity import TargetView
from mcsched.constants import PROXY_SCHEDULER_NAME
from mcsched.kube import JSON, KubeError
from mcsched.models import CandidateRelease, CandidateReply, CandidateRequest, DelegateRequest, Message
from mcsched.placement import NodeChoice, Resources, choose_node, pod_requests, target_score
from mcsched.podspec import delegate_manifest
from mcsched.reservations import Reservation, ReservationBook, reserved_per_node
from mcsched.runtime import Runtime, run_service
from mcsched.telemetry import observe_since, trace_annotations, tracer

log = logging.getLogger("candidate-scheduler")


class TargetScheduler:
    """Placement and delegate creation for one target cluster."""

    def __init__(self, rt: Runtime, target: str, book: ReservationBook) -> None:
        self.rt, self.target, self.book = rt, target, book
        self.client = rt.clusters[target]
        self.view = TargetView(
            target, rt.informer(target, "/api/v1/nodes"),
            # Pods that use room on real nodes; proxies (on virtual nodes) are left out.
            rt.informer(target, "/api/v1/pods", field_selector="status.phase!=Succeeded,status.phase!=Failed,"
                        f"spec.schedulerName!={PROXY_SCHEDULER_NAME}"))
        self.namespaces: dict[str, JSON] = {}

    def _settled(self) -> dict[str, JSON]:
        """Proxies whose delegates the target's cache already counts (a live view, not a copy)."""
        return self.view.delegates

    def _evaluate(self, pod: JSON, others: dict[str, Reservation]) -> tuple[NodeChoice, float]:
        """Where ``pod`` fits given the cache and the others' reservations, and the target's score."""
        used = dict(self.view.usage)
        for node, reserved in reserved_per_node(others).items():
            used[node] = used.get(node, Resources()) + reserved
        choice = choose_node(pod, self.view.real_nodes(), used)
        allocatable, used_total = self.view.totals()
        reserved_total = sum((r.requests for r in others.values()), Resources())
        free_after = allocatable - used_total - reserved_total - pod_requests(pod)
        return choice, target_score(free_after, allocatable) if choice.node else 0.0

    async def estimate(self, proxy_uid: str, pod: JSON) -> tuple[str | None, float, str]:
        """Whether and where ``pod`` would fit, from this process's view; nothing is reserved."""
        settled = self._settled()
        others = {u: r for u, r in (await self.book.current(fresh=False)).items()
                  if u != proxy_uid and u not in settled}
        choice, score = self._evaluate(pod, others)
        return choice.node, score, choice.reason

    async def reserve(self, proxy_uid: str, pod: JSON) -> tuple[Reservation | None, float, str]:
        """Reserve room for ``pod``; returns (reservation, score, reason when it does not fit)."""
        outcome: dict[str, tuple[NodeChoice, float]] = {}
        requests = pod_requests(pod)

        def decide(others: dict[str, Reservation]) -> Reservation | None:
            choice, _score = outcome["result"] = self._evaluate(pod, others)
            if choice.node is None:
                return None
            return Reservation(choice.node, requests, time.time() + self.rt.settings.reservation_ttl_seconds)

        reservation = await self.book.change(proxy_uid, decide, self._settled())
        choice, score = outcome["result"]
        return reservation, score, choice.reason

    async def on_candidate(self, request: CandidateRequest) -> Message:
        with tracer.start_as_current_span(f"candidate {self.target}", attributes={"pod": str(request.proxy)}) as span:
            reply = await self._candidate(request)
            span.set_attributes({"fits": reply.fits, "node": reply.node or "", "score": reply.score,
                                 "reason": reply.reason})
            return reply

    async def _candidate(self, request: CandidateRequest) -> CandidateReply:
        if not self.view.ready:
            return CandidateReply(target=self.target, fits=False,
                                  reason=f"cluster {self.target} is unreachable or not yet synced")
        existing = self.view.delegates.get(request.proxy.uid)
        if existing is not None:  # placed already: say so, and where
            return CandidateReply(target=self.target, fits=True, node=existing["spec"].get("nodeName"), score=100)
        if not request.reserve:
            node, score, reason = await self.estimate(request.proxy.uid, request.pod)
            return CandidateReply(target=self.target, fits=node is not None, node=node, score=score, reason=reason)
        reservation, score, reason = await self.reserve(request.proxy.uid, request.pod)
        if reservation is None:
            return CandidateReply(target=self.target, fits=False, reason=reason)
        return CandidateReply(target=self.target, fits=True, node=reservation.node, score=score)

    async def on_release(self, release: CandidateRelease) -> Message:
        await self.book.release(release.proxy_uid, self._settled())
        return release

    async def _namespace(self, name: str) -> JSON:
        cached = self.namespaces.get(name)
        if cached is not None:
            return cached
        try:
            namespace = await self.client.get(f"/api/v1/namespaces/{name}")
        except KubeError as exc:
            if not exc.not_found:
                raise
            log.info("creating namespace %s in %s for delegates", name, self.target)
            try:
                namespace = await self.client.create("/api/v1/namespaces", {
                    "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
            except KubeError as again:
                if not again.conflict:
                    raise
                namespace = await self.client.get(f"/api/v1/namespaces/{name}")
        self.namespaces[name] = namespace
        return namespace

    async def on_delegate(self, request: DelegateRequest) -> Outcome:
        with tracer.start_as_current_span(f"create delegate in {self.target}", attributes={"pod": str(request.proxy)}):
            return await self._delegate(request)

    async def _delegate(self, request: DelegateRequest) -> Outcome:
        proxy = request.proxy
        if proxy.uid in self.view.delegates:
            return ACK
        if not self.view.ready:
            return retry_later(2.0, "target cache not ready")
        node = request.node
        reserved = (await self.book.current(fresh=False)).get(proxy.uid)
        if reserved is None or reserved.node != node:
            reservation, _score, reason = await self.reserve(proxy.uid, request.manifest)
            node = reservation.node if reservation else None
            if node is None:
                log.warning("%s: no room for %s any more (%s); leaving the delegate to %s's scheduler",
                            self.target, proxy, reason, self.target)
        namespace = await self._namespace(proxy.namespace)
        manifest = delegate_manifest(request.manifest, source=proxy.cluster, namespace=proxy.namespace,
                                     proxy_name=proxy.name, proxy_uid=proxy.uid, node=node, owner=namespace,
                                     extra_annotations=trace_annotations())
        trace.get_current_span().set_attributes({"delegate": manifest["metadata"]["name"], "node": node or ""})
        try:
            await self.client.create(f"/api/v1/namespaces/{proxy.namespace}/pods", manifest)
        except KubeError as exc:
            if exc.conflict:  # created before (redelivery): the name is deterministic
                return ACK
            if exc.not_found:  # namespace deleted meanwhile
                self.namespaces.pop(proxy.namespace, None)
            raise
        observe_since("delegate_created", request.created)
        log.info("delegate %s/%s created in %s on %s", proxy.namespace, manifest["metadata"]["name"],
                 self.target, node or "(target scheduler)")
        return ACK


async def compose(rt: Runtime) -> None:
    kv = await rt.bus.key_value("reservations")
    for target in rt.settings.served_targets():
        scheduler = TargetScheduler(rt, target, ReservationBook(kv, target))
        await rt.bus.respond(rt.bus.subject("candidate", target), f"candidate-{target}", CandidateRequest,
                             scheduler.on_candidate)
        await rt.bus.respond(rt.bus.subject("release", target), f"release-{target}", CandidateRelease,
                             scheduler.on_release)
        rt.bus.consume("delegate", f"candidate-scheduler-{target}", rt.bus.subject("delegate", target),
                       DelegateRequest, scheduler.on_delegate)


if __name__ == "__main__":
    run_service("candidate-scheduler", compose)
