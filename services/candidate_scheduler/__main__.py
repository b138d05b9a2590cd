"""candidate-scheduler: owns the delegate step in each target it serves.

Its processes share the targets out (:mod:`mcsched.shards`): each watches and
serves only its own, and a target has several when there are more processes
than targets.

* Answers ``candidate.<target>`` requests with an estimate from the target's
  caches: whether the pod would fit on some node and how much room the target
  would have left. Nothing is held: the target's own scheduler decides.
* Consumes ``delegate.<target>``: reads the proxy from its source and, only if
  it is one of ours, alive, and its recorded placement names this target,
  copies the ConfigMaps and Secrets it uses into the target and creates the
  delegate pod (deterministic name), unbound, for the target's scheduler to
  place, from the proxy's own admitted spec plus the user's scheduling fields.
  What the message says is only where to look.
"""

from __future__ import annotations

import asyncio
import logging
import time

from opentelemetry import trace

from mcsched.bus import ACK, Outcome, retry_later
from mcsched.capacity import TargetView
from mcsched.choice import Placement
from mcsched.cluster_constraints import split
from mcsched.constants import PLACEMENT_ROUND_ANNOTATION, PROXY_SCHEDULER_NAME
from mcsched.events import EventRecorder
from mcsched.follow import created_at
from mcsched.follower import Follower
from mcsched.kube import ACCESS_REVIEWS_PATH, JSON, KubeError, read_pod
from mcsched.models import CandidateReply, CandidateRequest, DelegateRequest, Message, PodRef
from mcsched.natsauth import candidate_durable, candidate_queue
from mcsched.placement import first_fit, pod_requests, target_score
from mcsched.podspec import delegate_manifest, delegate_original, is_proxy
from mcsched.proxystatus import mark_unscheduled, record_refusal
from mcsched.runtime import Runtime, run_service
from mcsched.telemetry import observe_since, trace_annotations, tracer
from mcsched.workqueue import KeyedLocks

log = logging.getLogger("candidate-scheduler")

# A namespace we just created gets its default ServiceAccount from the controller-manager within moments.
NEW_NAMESPACE_SECONDS = 10.0
# How long what the target's RBAC said about a namespace is taken as still true.
ACCEPTANCE_MEMORY_SECONDS = 30.0
# A delegate whose preparation (namespace, ServiceAccount, copies) took longer than this is made only if
# its proxy, read again, still wants it here.
STALE_PROXY_SECONDS = 1.0


class TargetScheduler:
    """Estimates and delegate creation for one target cluster."""

    def __init__(self, rt: Runtime, target: str) -> None:
        self.rt, self.target = rt, target
        self.client = rt.clusters[target]
        self.scheduler_name = rt.settings.cluster(target).scheduler_name
        self.view = TargetView(
            target, rt.informer(target, "/api/v1/nodes"),
            # Pods that use room on real nodes or wait for one; proxies (on virtual nodes) are left out.
            rt.informer(target, "/api/v1/pods", field_selector="status.phase!=Succeeded,status.phase!=Failed,"
                        f"spec.schedulerName!={PROXY_SCHEDULER_NAME}"))
        self.follower = Follower(rt, target, self.view.pods)
        self.events = EventRecorder(f"admiralty-candidate-scheduler-{target}")
        # The target's namespaces, watched: a delegate's owner reference must name the namespace's
        # current UID, or the garbage collector deletes the delegate.
        self.namespaces = rt.informer(target, "/api/v1/namespaces")
        self.proxy_locks: KeyedLocks[str] = KeyedLocks()
        self.acceptance: dict[str, tuple[bool, float]] = {}  # namespace -> (we may create pods, when checked)

    # -- estimates -----------------------------------------------------------------

    def estimate(self, pod: JSON) -> CandidateReply:
        """Whether ``pod`` would fit on one of the target's nodes, from the caches; nothing is held.

        The score is the share (0..100) of the target's cpu and memory left after the pod,
        counting the delegates still waiting for the target's scheduler.
        """
        if not self.view.ready:
            return CandidateReply(target=self.target, fits=False,
                                  reason=f"cluster {self.target} is unreachable or not yet synced")
        # Some node that fits, looked for from where the last one was found (not the best one: the
        # target's scheduler chooses); nodes are looked at in the cache's order.
        choice, self.view.cursor = first_fit(pod, self.view.real_nodes(), self.view.usage, self.view.cursor)
        if choice.node is None:
            return CandidateReply(target=self.target, fits=False, reason=choice.reason)
        allocatable, used = self.view.totals()
        free_after = allocatable - used - self.view.pending - pod_requests(pod)
        return CandidateReply(target=self.target, fits=True, node=choice.node,
                              score=target_score(free_after, allocatable))

    async def accepts(self, namespace: str) -> bool:
        """Whether this target lets our identity create pods in ``namespace`` (its Sources and
        ClusterSources, as RBAC says: a SelfSubjectAccessReview, remembered for a while)."""
        known = self.acceptance.get(namespace)
        if known is not None and time.monotonic() - known[1] < ACCEPTANCE_MEMORY_SECONDS:
            return known[0]
        review = await self.client.create(ACCESS_REVIEWS_PATH, {
            "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": {"namespace": namespace, "verb": "create", "resource": "pods"}}})
        allowed = bool((review.get("status") or {}).get("allowed"))
        self.acceptance[namespace] = (allowed, time.monotonic())
        return allowed

    def serves(self, ref: PodRef) -> bool:
        """Whether pods of the proxy's source and namespace may come here (a Target serves one namespace)."""
        return self.rt.settings.cluster(self.target).serves(ref.cluster, ref.namespace)

    def not_served(self, ref: PodRef) -> str:
        return f"cluster {self.target} is not a target of {ref.cluster} for namespace {ref.namespace}"

    def not_accepted(self, namespace: str) -> str:
        return (f"cluster {self.target} does not accept this source's pods in namespace {namespace} "
                "(no Source there nor ClusterSource names this source's identity)")

    async def on_candidate(self, request: CandidateRequest) -> Message:
        with tracer.start_as_current_span(f"candidate {self.target}", attributes={"pod": str(request.proxy)}) as span:
            existing = self.view.delegates.get(request.proxy.uid)
            if existing is not None:
                reply = CandidateReply(target=self.target, fits=True, node=existing["spec"].get("nodeName"),
                                       score=100.0)
            elif not self.serves(request.proxy):
                reply = CandidateReply(target=self.target, fits=False, reason=self.not_served(request.proxy))
            elif self.view.ready and not await self.accepts(request.proxy.namespace):
                reply = CandidateReply(target=self.target, fits=False,
                                       reason=self.not_accepted(request.proxy.namespace))
            else:
                reply = self.estimate(request.pod)
            span.set_attributes({"fits": reply.fits, "node": reply.node or "", "score": reply.score,
                                 "reason": reply.reason})
            return reply

    # -- delegates -----------------------------------------------------------------

    async def _namespace(self, name: str) -> JSON:
        cached = self.namespaces.get(name)
        if cached is not None and not cached["metadata"].get("deletionTimestamp"):
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
        return namespace

    async def on_delegate(self, request: DelegateRequest) -> Outcome:
        with tracer.start_as_current_span(f"create delegate in {self.target}", attributes={"pod": str(request.proxy)}):
            # One request per proxy at a time: a second copy (a redelivery, a resync's) waits, then finds
            # the delegate, instead of creating it again from a read older than a refusal.
            async with self.proxy_locks.hold(request.proxy.uid):
                return await self._delegate(request)

    async def _assigned_proxy(self, ref: PodRef, resource_version: str | None) -> JSON | None:
        """The proxy, if a delegate for it belongs in this target now; None (logged) otherwise.

        Read at least as new as the request's resourceVersion (the choice), which the
        API server answers from its watch cache; without one, from etcd.
        """
        if ref.cluster not in self.rt.settings.source_names:
            log.warning("delegate request for %s from unknown source %s; ignored", ref, ref.cluster)
            return None
        if not self.serves(ref):
            log.warning("delegate request for %s: %s; ignored", ref, self.not_served(ref))
            return None
        proxy = await read_pod(self.rt.clusters[ref.cluster], ref.namespace, ref.name, ref.uid,
                               not_older_than=resource_version)
        if proxy is None or proxy["metadata"].get("deletionTimestamp"):
            return None
        if not is_proxy(proxy):
            log.warning("delegate request for %s, which is not a proxy pod made by our webhook; ignored", ref)
            return None
        placement = Placement.of(proxy)
        if placement.target != self.target or proxy["spec"].get("nodeName"):
            # A bound proxy had its delegate already: a pod lives once, so it never gets another.
            log.info("delegate request for %s in %s is stale (placement: %s, node: %s); ignored", ref, self.target,
                     placement.target or "none", proxy["spec"].get("nodeName") or "none")
            return None
        return proxy

    async def _follow(self, ref: PodRef, original: JSON, namespace: JSON) -> str | None:
        """Copy what the pod uses into the target; a reason when the delegate must wait.

        In a namespace created moments ago, the default ServiceAccount is about to
        appear: that is waited for here rather than reported to the user. The
        namespace's age is taken once (the target's clock against ours, clamped),
        and the wait is bounded on this process's own clock, whatever the skew.
        """
        age = min(max(time.time() - (created_at(namespace) or 0.0), 0.0), NEW_NAMESPACE_SECONDS)
        deadline = time.monotonic() + NEW_NAMESPACE_SECONDS - age
        while True:
            waiting = await self.follower.ensure(ref.cluster, ref.namespace, original.get("spec") or {})
            if waiting is None or time.monotonic() >= deadline:
                return waiting
            await asyncio.sleep(0.5)

    async def _delegate(self, request: DelegateRequest) -> Outcome:
        ref = request.proxy
        if ref.uid in self.view.delegates:
            return ACK
        if not self.view.ready:
            return retry_later(2.0, "target cache not ready")
        proxy = await self._assigned_proxy(ref, request.resource_version)
        if proxy is None:
            return ACK
        try:
            _, original = split(delegate_original(proxy))  # under use-constraints-from-spec, without them
        except ValueError as exc:  # posing as a proxy with a broken annotation: nothing to create
            log.warning("delegate request for %s: %s; ignored", ref, exc)
            return ACK
        try:
            return await self._create_delegate(request, proxy, original)
        except KubeError as exc:
            if exc.status != 403:
                raise
            # Refused: by the target's RBAC (its Sources changed since the estimate: the whole namespace
            # is refused now), or by its admission for this pod alone (a quota, Pod Security, an unknown
            # PriorityClass), which a fresh access review tells apart. Either way recorded as this
            # target's refusal, so the pod goes on to the other clusters.
            self.acceptance.pop(ref.namespace, None)
            reason = exc.message if await self.accepts(ref.namespace) else \
                f"{self.not_accepted(ref.namespace)}: {exc.message}"
            source = self.rt.clusters[ref.cluster]
            if await record_refusal(source, ref, proxy, self.target, reason) is not None:
                await self.events.record(source, proxy, "DelegateRefused", reason)
                log.info("%s: %s", ref, reason)
            return ACK

    async def _create_delegate(self, request: DelegateRequest, proxy: JSON, original: JSON) -> Outcome:
        ref = request.proxy
        started = time.monotonic()
        namespace = await self._namespace(ref.namespace)
        waiting = await self._follow(ref, original, namespace)
        if waiting is None and time.monotonic() - started > STALE_PROXY_SECONDS:
            # That took a while (a new namespace's ServiceAccount, copies): the proxy may have gone, or
            # been sent elsewhere, meanwhile; a delegate made for it now would be an orphan.
            if await self._assigned_proxy(ref, proxy["metadata"].get("resourceVersion")) is None:
                return ACK
        if waiting is not None:
            message = f"{self.target}: the delegate waits: {waiting}"
            await mark_unscheduled(self.rt.clusters[ref.cluster], self.events, proxy, message,
                                   reason="DelegateWaiting", event_reason="DelegateWaiting")
            log.info("%s: %s", ref, message)
            # Acked: feedback's resync asks again while the proxy has no delegate, so a pod that
            # waits long never piles up copies of its request.
            return ACK
        stamp = {**trace_annotations(), PLACEMENT_ROUND_ANNOTATION: str(Placement.of(proxy).round)}
        manifest = delegate_manifest(original, source=ref.cluster, namespace=ref.namespace, proxy_name=ref.name,
                                     proxy_uid=ref.uid, scheduler_name=self.scheduler_name, owner=namespace,
                                     extra_annotations=stamp, target=self.target)
        trace.get_current_span().set_attributes({"delegate": manifest["metadata"]["name"]})
        try:
            await self.client.create(f"/api/v1/namespaces/{ref.namespace}/pods", manifest)
        except KubeError as exc:
            if exc.conflict:  # created before (redelivery): the name is deterministic
                return ACK
            raise
        observe_since("delegate_created", request.created)
        log.info("delegate %s/%s created in %s (round %d)", ref.namespace, manifest["metadata"]["name"],
                 self.target, request.round)
        return ACK


async def compose(rt: Runtime) -> None:
    # Its shares: whole targets (each one's estimates need all its nodes and pods), as many as the
    # processes of this stage leave it (several processes share a target when there are more of them).
    for target in rt.shares.clusters(rt.settings.served_targets()):
        scheduler = TargetScheduler(rt, target)
        await rt.bus.respond(rt.bus.subject("candidate", target), candidate_queue(target), CandidateRequest,
                             scheduler.on_candidate)
        rt.bus.consume("delegate", candidate_durable(target), rt.bus.subject("delegate", target),
                       DelegateRequest, scheduler.on_delegate)


if __name__ == "__main__":
    run_service("candidate-scheduler", compose)
