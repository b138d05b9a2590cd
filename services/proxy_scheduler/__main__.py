"""proxy-scheduler: owns the proxy step, choosing the *cluster* of each elected pod.

For each ``elect`` message: ask every target's candidate-scheduler for an
estimate from its caches (nothing is held), leave out the targets whose
scheduler refused this pod moments ago, draw one of the fitting targets in
proportion to its room, and record that choice on the proxy (its placement
annotation, written with a resourceVersion precondition) before asking the
chosen candidate-scheduler for the delegate. The target's own kube-scheduler
then picks the node; feedback binds the proxy to ``admiralty-<target>`` once
the delegate is scheduled, or records the refusal, which brings the pod back
here for the next target.

The recorded choice is what makes a pod run once: a racing replica or a
redelivered message finds a target recorded already and only re-requests
that target's delegate. A pod that fits nowhere gets ``PodScheduled=False``
with every cluster's reason and a ``FailedScheduling`` Event; its message is
acked (a nak would hold one of the consumer's ``max_ack_pending`` slots for
as long as the pod waits) and this process tries it again every
``unschedulable_retry_seconds``, from the proxy as its API server has it.
Copies of its message meanwhile (a resync's) are acked at once; the
watcher's resync brings it back if this process goes away.
"""

from __future__ import annotations

import asyncio
import logging
import time

from opentelemetry import trace

from mcsched.bus import ACK, Outcome, retry_later
from mcsched.choice import Placement, pick_target
from mcsched.cluster_constraints import ConstraintError, preferred, refusal, split
from mcsched.constants import VIRTUAL_NODE_TYPE_LABEL, VIRTUAL_NODE_TYPE_VALUE, virtual_node_name
from mcsched.events import EventRecorder
from mcsched.kube import JSON, KubeError, pod_path, read_pod
from mcsched.models import CandidateReply, CandidateRequest, DelegateRequest, ElectMessage, PodRef
from mcsched.natsauth import proxy_scheduler_durable
from mcsched.podspec import delegate_original
from mcsched.proxystatus import mark_unscheduled
from mcsched.runtime import Runtime, run_service
from mcsched.telemetry import observe_since, tracer
from mcsched.workqueue import WorkQueue

log = logging.getLogger("proxy-scheduler")

# A write that loses a race on the proxy's resourceVersion is tried again this often, re-reading it.
CHOICE_ATTEMPTS = 3


class ProxyScheduler:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.events = EventRecorder("admiralty-proxy-scheduler")
        # Each source's virtual nodes (a handful of objects): their labels, cordon and taints decide
        # which clusters a pod's cluster-level constraints allow.
        self.virtual_nodes = {source: rt.informer(source, "/api/v1/nodes",
                                                  label_selector=f"{VIRTUAL_NODE_TYPE_LABEL}={VIRTUAL_NODE_TYPE_VALUE}")
                              for source in rt.settings.source_names}
        # proxy uid -> its elect message, while the pod fits nowhere and waits for its retry here
        self.waiting: dict[str, ElectMessage] = {}
        self.retries: WorkQueue[str] = WorkQueue("retry unschedulable", self._retry)
        self.retries.start()
        rt.closers.append(self.retries.stop)

    def excluded_clusters(self, source: str, constraints: JSON) -> dict[str, str]:
        """Targets whose virtual node in ``source`` the pod's cluster-level constraints exclude, with why."""
        nodes = self.virtual_nodes[source]
        excluded = {}
        for target in self.rt.settings.target_names:
            reason = refusal(constraints, nodes.get(virtual_node_name(target)))
            if reason is not None:
                excluded[target] = reason
        return excluded

    async def _read_proxy(self, ref: PodRef) -> JSON | None:
        return await read_pod(self.rt.clusters[ref.cluster], ref.namespace, ref.name, ref.uid)

    async def _request_delegate(self, ref: PodRef, target: str, round_: int, created: str | None = None,
                                resource_version: str | None = None) -> None:
        request = DelegateRequest(proxy=ref, target=target, round=round_, created=created,
                                  resource_version=resource_version)
        await self.rt.bus.publish(self.rt.bus.subject("delegate", target), request, f"delegate:{ref.uid}:{round_}")

    async def _ask(self, target: str, request: CandidateRequest) -> tuple[str, CandidateReply | None]:
        with tracer.start_as_current_span(f"ask {target}", attributes={"target": target}) as span:
            reply = await self.rt.bus.request(self.rt.bus.subject("candidate", target), request, CandidateReply,
                                              self.rt.settings.candidate_timeout_seconds)
            if reply is None:
                span.set_attributes({"fits": False, "reason": "no candidate-scheduler answered"})
            else:
                span.set_attributes({"fits": reply.fits, "node": reply.node or "", "score": reply.score,
                                     "reason": reply.reason})
        return target, reply

    async def on_elect(self, message: ElectMessage) -> Outcome:
        if message.proxy.uid in self.waiting:
            return ACK  # fits nowhere, and tried again here soon: a copy adds nothing
        with tracer.start_as_current_span("schedule proxy", attributes={"pod": str(message.proxy),
                                                                        "reason": message.reason}):
            return await self._schedule(message)

    async def _retry(self, uid: str) -> None:
        """Try a pod that fit nowhere again, from the proxy as its API server has it now."""
        message = self.waiting.pop(uid, None)
        if message is None:
            return
        fresh = message.model_copy(update={"manifest": None, "resource_version": None})
        try:
            with tracer.start_as_current_span("schedule proxy", attributes={"pod": str(message.proxy),
                                                                            "reason": "unschedulable"}):
                outcome = await self._schedule(fresh)
        except Exception:
            self.waiting.setdefault(uid, message)  # the work queue tries again with back-off
            raise
        if not outcome.ack:
            self._retry_after(fresh, outcome.delay)

    def _retry_after(self, message: ElectMessage, delay: float) -> None:
        self.waiting[message.proxy.uid] = message
        self.retries.add_after(message.proxy.uid, delay)

    async def _schedule(self, message: ElectMessage) -> Outcome:
        ref = message.proxy
        if ref.cluster not in self.rt.settings.source_names:
            log.error("elect message for unknown source %s; dropping", ref.cluster)
            return ACK
        original, placement, version = message.manifest, Placement.parse(message.placement), message.resource_version
        if original is None or version is None:  # not from our watcher: read the proxy itself
            proxy = await self._current(ref)
            if proxy is None:
                return ACK
            original, placement, version = proxy
        for _ in range(CHOICE_ATTEMPTS):
            if placement.target is not None:  # chosen before (a redelivery or a racing replica)
                await self._request_delegate(ref, placement.target, placement.round)
                return ACK
            try:
                constraints, target_pod = split(original)
            except ConstraintError as exc:  # the webhook refuses these; a proxy made without it may have one
                log.warning("%s: %s", ref, exc)
                return await self._unschedulable(message, {}, {}, {t: str(exc) for t in self.rt.settings.target_names})
            excluded = self.excluded_clusters(ref.cluster, constraints)
            for left_out, reason in excluded.items():  # in the pod's trace beside the answers (mcsctl explain)
                with tracer.start_as_current_span(f"exclude {left_out}", attributes={
                        "target": left_out, "fits": False, "reason": f"excluded: {reason}"}):
                    pass
            refused = placement.recent_rejections(time.time(), self.rt.settings.rejection_memory_seconds)
            askable = [t for t in self.rt.settings.target_names if t not in refused and t not in excluded]
            question = CandidateRequest(proxy=ref, pod=target_pod)
            answers = dict(await asyncio.gather(*(self._ask(t, question) for t in askable)))
            scores = {t: r.score for t, r in answers.items() if r is not None and r.fits}
            nodes = {t: self.virtual_nodes[ref.cluster].get(virtual_node_name(t)) for t in scores}
            first = preferred(constraints, nodes, sorted(scores))  # preferred affinity ranks the clusters
            target = pick_target(ref.uid, {t: scores[t] for t in first})
            if target is None:
                return await self._unschedulable(message, answers, refused, excluded)
            chosen = placement.choose(target)
            trace.get_current_span().set_attributes({"target": target, "score": scores[target]})
            try:
                with tracer.start_as_current_span("record choice", attributes={"target": target}):
                    recorded = await self.rt.clusters[ref.cluster].merge_patch(
                        pod_path(ref.namespace, ref.name), chosen.patch(version))
            except KubeError as exc:
                if exc.not_found:
                    return ACK
                if not exc.conflict:
                    raise
                proxy = await self._current(ref)  # changed meanwhile: decide again from what it is now
                if proxy is None:
                    return ACK
                original, placement, version = proxy
                continue
            observe_since("cluster_chosen", message.created)
            await self._request_delegate(ref, target, chosen.round, message.created,
                                         recorded["metadata"].get("resourceVersion"))
            log.info("%s -> %s (score %.2f, round %d)", ref, target, scores[target], chosen.round)
            return ACK
        return retry_later(1.0, "the proxy kept changing")

    async def _undecided(self, ref: PodRef) -> JSON | None:
        """The proxy as its API server has it, unless it is gone, being deleted or bound already."""
        pod = await self._read_proxy(ref)
        if pod is None or pod["metadata"].get("deletionTimestamp") or pod["spec"].get("nodeName"):
            return None
        return pod

    async def _current(self, ref: PodRef) -> tuple[JSON, Placement, str] | None:
        """The user's pod, placement and resourceVersion of the proxy as its API server has it.

        None when there is nothing (more) to decide: the proxy is gone, being
        deleted, bound already, or not a proxy made by our webhook (then an Event says so).
        """
        pod = await self._undecided(ref)
        if pod is None:
            return None
        try:
            original = delegate_original(pod)
        except ValueError as exc:
            await self.events.record(self.rt.clusters[ref.cluster], pod, "FailedScheduling", f"bad proxy pod: {exc}")
            return None
        return original, Placement.of(pod), pod["metadata"]["resourceVersion"]

    async def _unschedulable(self, message: ElectMessage, answers: dict[str, CandidateReply | None],
                             refused: dict[str, str], excluded: dict[str, str]) -> Outcome:
        ref = message.proxy
        pod = await self._undecided(ref)
        if pod is None or Placement.of(pod).target is not None:  # or another replica chose meanwhile
            return ACK
        reasons = {target: reply.reason if reply else "no candidate-scheduler answered"
                   for target, reply in answers.items()}
        reasons.update({target: f"refused by its scheduler: {reason}" for target, reason in refused.items()})
        reasons.update({target: f"excluded: {reason}" for target, reason in excluded.items()})
        why = f"0/{len(reasons)} clusters are available: " + "; ".join(
            f"{target}: {reason}" for target, reason in sorted(reasons.items()))
        trace.get_current_span().set_attributes({"unschedulable": True, "reason": why})
        await mark_unscheduled(self.rt.clusters[ref.cluster], self.events, pod, why)
        log.info("%s is unschedulable: %s", ref, why)
        self._retry_after(message, self.rt.settings.unschedulable_retry_seconds)
        return ACK


async def compose(rt: Runtime) -> None:
    scheduler = ProxyScheduler(rt)
    rt.bus.consume("elect", proxy_scheduler_durable(), f"{rt.settings.subject_prefix}.elect.>", ElectMessage,
                   scheduler.on_elect)


if __name__ == "__main__":
    run_service("proxy-scheduler", compose)
