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

Topology spread and weighted splits count the source's proxies (a cache of
them, this process's own choices not yet in it): a DoNotSchedule spread
constraint excludes the clusters that would exceed maxSkew, before and again
after the answers; ScheduleAnyway, then the weights, narrow the draw. A
choice under DoNotSchedule is confirmed once its write comes back through the
watch, against what was stored before it, and withdrawn if another
replica's earlier choice made it overshoot (``mcsched.proxycounts``).

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
import contextlib
import functools
import logging
import time
from dataclasses import replace

from opentelemetry import trace

from mcsched.bus import ACK, Outcome, retry_later
from mcsched.choice import Placement, choice_reason, pick_target
from mcsched.cluster_constraints import ConstraintError, preferred, refusal, split
from mcsched.constants import (
    PROXY_SCHEDULER_NAME,
    VIRTUAL_NODE_TYPE_LABEL,
    VIRTUAL_NODE_TYPE_VALUE,
    virtual_node_name,
)
from mcsched.events import EventRecorder
from mcsched.kube import JSON, KubeError, pod_path, read_pod
from mcsched.models import CandidateReply, CandidateRequest, DelegateRequest, ElectMessage, PodRef
from mcsched.natsauth import proxy_scheduler_durable
from mcsched.podspec import delegate_original, is_gated
from mcsched.proxycounts import ProxyCounts
from mcsched.proxystatus import mark_unscheduled
from mcsched.runtime import Runtime, run_service
from mcsched.spread import (
    SpreadError,
    controller_uid,
    spread_allows,
    spread_constraints,
    spread_ranked,
    spread_refusals,
    weighted,
    weights_of,
)
from mcsched.telemetry import observe_since, tracer
from mcsched.workqueue import KeyedLocks, WorkQueue

log = logging.getLogger("proxy-scheduler")

# A write that loses a race on the proxy's resourceVersion is tried again this often, re-reading it.
CHOICE_ATTEMPTS = 3
# How long a choice under a DoNotSchedule spread constraint waits for its own write in the cache to be
# confirmed; past it the choice stands (feedback's resync asks for the delegate 15 s after a choice anyway).
CONFIRM_SECONDS = 5.0


# How long the first pod that counts the source's proxies waits for their list (then it is retried).
PROXY_CACHE_SYNC_SECONDS = 30.0
# How long a pod waits for the source's virtual nodes and namespaces to be listed (at start, after a
# recomposition) before it is handed back: deciding without them would ignore cordons and cluster
# constraints (an unknown virtual node excludes nothing) and namespaces' cluster weights.
SOURCE_CACHE_SYNC_SECONDS = 10.0
# When no candidate-scheduler answered in time (all busy, under a backlog) and no cluster was left out
# for a reason, the pod is asked about again this many times (no sooner than a pod that fits nowhere,
# so busy candidate-schedulers are not asked more often) before it is said to fit nowhere: saying so is
# two writes to its source (its condition, an Event) that a busy moment does not deserve.
UNANSWERED_RETRIES = 3


class ProxyScheduler:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.events = EventRecorder("admiralty-proxy-scheduler")
        # Each source's virtual nodes (a handful of objects): their labels, cordon and taints decide
        # which clusters a pod's cluster-level constraints allow.
        self.virtual_nodes = {source: rt.informer(source, "/api/v1/nodes",
                                                  label_selector=f"{VIRTUAL_NODE_TYPE_LABEL}={VIRTUAL_NODE_TYPE_VALUE}")
                              for source in rt.settings.source_names}
        # Each source's proxies, counted per cluster by topology spread and weighted splits; its
        # namespaces, whose cluster-weights annotation applies to pods without their own. The proxies
        # are watched only once a pod that counts them comes (most workloads have none).
        self.counts = {source: ProxyCounts(functools.partial(
            rt.informer, source, "/api/v1/pods", field_selector=f"spec.schedulerName={PROXY_SCHEDULER_NAME}"))
            for source in rt.settings.source_names}
        self.namespaces = {source: rt.informer(source, "/api/v1/namespaces") for source in rt.settings.source_names}
        self.choosing = {source: asyncio.Lock() for source in rt.settings.source_names}
        self.deciding: KeyedLocks[str] = KeyedLocks()  # proxy uid: one decision at a time
        # proxy uid -> its elect message, while the pod fits nowhere and waits for its retry here
        self.waiting: dict[str, ElectMessage] = {}
        # proxy uid -> how many times in a row no candidate-scheduler answered about it
        self.unanswered: dict[str, int] = {}
        self.retries: WorkQueue[str] = WorkQueue("retry unschedulable", self._retry)
        self.retries.start()
        rt.closers.append(self.retries.stop)

    def excluded_clusters(self, source: str, targets: list[str], constraints: JSON) -> dict[str, str]:
        """The ``targets`` whose virtual node in ``source`` the pod's cluster-level constraints exclude, with why."""
        nodes = self.virtual_nodes[source]
        excluded = {}
        for target in targets:
            reason = refusal(constraints, nodes.get(virtual_node_name(target)))
            if reason is not None:
                excluded[target] = reason
        return excluded

    def cluster_nodes(self, source: str, targets: list[str]) -> dict[str, JSON | None]:
        """The virtual node of each of ``targets`` in ``source`` (None while it does not exist)."""
        return {t: self.virtual_nodes[source].get(virtual_node_name(t)) for t in targets}

    def weights(self, ref: PodRef, original: JSON) -> dict[str, int]:
        """The pod's cluster weights: its own annotation, else its namespace's (SpreadError if malformed)."""
        namespace = self.namespaces[ref.cluster].get(ref.namespace) or {}
        return weights_of(original["metadata"].get("annotations") or {},
                          namespace.get("metadata", {}).get("annotations") or {})

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
            outcome = await self._schedule(message)
        self._forget_unless_waiting(message.proxy.uid)
        return outcome

    async def _schedule(self, message: ElectMessage) -> Outcome:
        """One decision per pod at a time in this process: a copy of its message (a redelivery) waits for
        the first to finish, checks of its choice included, then finds the choice made."""
        async with self.deciding.hold(message.proxy.uid):
            return await self._decide(message)

    def _forget_unless_waiting(self, uid: str) -> None:
        """A pod decided for (or gone) is no longer counted as unanswered: only one waiting is."""
        if uid not in self.waiting:
            self.unanswered.pop(uid, None)

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
        self._forget_unless_waiting(uid)

    def _retry_after(self, message: ElectMessage, delay: float) -> None:
        self.waiting[message.proxy.uid] = message
        self.retries.add_after(message.proxy.uid, delay)

    async def _decide(self, message: ElectMessage) -> Outcome:
        ref = message.proxy
        if ref.cluster not in self.rt.settings.source_names:
            log.error("elect message for unknown source %s; dropping", ref.cluster)
            return ACK
        listed = (self.virtual_nodes[ref.cluster], self.namespaces[ref.cluster])
        if not all(informer.synced.is_set() for informer in listed):  # (listed once: no wait on the way)
            try:
                async with asyncio.timeout(SOURCE_CACHE_SYNC_SECONDS):
                    for informer in listed:
                        await informer.wait_synced()
            except TimeoutError:
                return retry_later(SOURCE_CACHE_SYNC_SECONDS, f"{ref.cluster}'s virtual nodes are not listed yet")
        original, placement, version = message.manifest, Placement.parse(message.placement), message.resource_version
        controller = message.controller
        if original is None or version is None:  # not from our watcher: read the proxy itself
            proxy = await self._current(ref)
            if proxy is None:
                return ACK
            original, placement, version, controller = proxy
        targets = self.rt.settings.targets_for(ref.cluster, ref.namespace)  # the namespace's Targets too
        for _ in range(CHOICE_ATTEMPTS):
            if placement.target is not None and placement.target not in targets:
                # chosen before its cluster was removed (its Target deleted): choose again among the others
                withdrawn = await self._withdraw(ref, placement, version, "its cluster is no longer a target")
                if withdrawn is None:
                    return ACK
                placement, version = withdrawn
            if placement.target is not None:  # chosen before (a redelivery or a racing replica)
                await self._request_delegate(ref, placement.target, placement.round)
                return ACK
            try:
                constraints, target_pod = split(original)
                weights = self.weights(ref, original)
            except (ConstraintError, SpreadError) as exc:  # the webhook refuses these on pods (not on namespaces)
                log.warning("%s: %s", ref, exc)
                return await self._unschedulable(message, {}, {}, {t: str(exc) for t in targets})
            counts = self.counts[ref.cluster]
            pod = counts.subject(ref, original["metadata"].get("labels") or {}, controller)
            # Only a pod with spread constraints or weights counts the source's proxies (a walk over all).
            counted = bool(weights) or bool(spread_constraints(constraints, pod.labels))
            if counted:
                await counts.activate(PROXY_CACHE_SYNC_SECONDS)
            nodes = self.cluster_nodes(ref.cluster, targets)
            excluded = self.excluded_clusters(ref.cluster, targets, constraints)
            excluded.update(spread_refusals(constraints, pod, nodes, counts.members() if counted else [],
                                            [t for t in targets if t not in excluded]))
            for left_out, reason in excluded.items():  # in the pod's trace beside the answers (mcsctl explain)
                with tracer.start_as_current_span(f"exclude {left_out}", attributes={
                        "target": left_out, "fits": False, "reason": f"excluded: {reason}"}):
                    pass
            refused = placement.recent_rejections(time.time(), self.rt.settings.rejection_memory_seconds)
            askable = [t for t in targets if t not in refused and t not in excluded]
            question = CandidateRequest(proxy=ref, pod=target_pod)
            answers = dict(await asyncio.gather(*(self._ask(t, question) for t in askable)))
            scores = {t: r.score for t, r in answers.items() if r is not None and r.fits}
            # Counted again (choices were made while the answers came), then reserved with no await between.
            # Under DoNotSchedule the choices of this process are also written one at a time, in the order
            # they are made, so each is right against every placement stored before it.
            hard = any(s.hard for s in spread_constraints(constraints, pod.labels))
            async with self.choosing[ref.cluster] if hard else contextlib.nullcontext():
                members = counts.members() if counted else []
                late = spread_refusals(constraints, pod, nodes, members, sorted(scores))
                excluded.update(late)
                fitting = sorted(t for t in scores if t not in late)
                by_affinity = preferred(constraints, nodes, fitting)  # preferred affinity first, then spread, weights
                by_spread = spread_ranked(constraints, pod, nodes, members, by_affinity)
                first = weighted(weights, pod, members, by_spread)
                target = pick_target(ref.uid, {t: scores[t] for t in first})
                if target is None:
                    # Every cluster was asked and none answered: a busy moment, not a reason yet.
                    if answers and all(a is None for a in answers.values()) and not excluded and not refused \
                            and self.unanswered.get(ref.uid, 0) < UNANSWERED_RETRIES:
                        tries = self.unanswered[ref.uid] = self.unanswered.get(ref.uid, 0) + 1
                        log.info("%s: no candidate-scheduler answered in time; asking again (%d)", ref, tries)
                        self._retry_after(message, self.rt.settings.unschedulable_retry_seconds)
                        return ACK
                    self.unanswered.pop(ref.uid, None)
                    return await self._unschedulable(message, {t: a for t, a in answers.items() if t not in late},
                                                     refused, excluded)
                self.unanswered.pop(ref.uid, None)
                chosen = placement.choose(target)
                counts.reserve(pod, chosen)
                confirmation = None
                if hard:
                    confirmation = counts.expect(ref.uid, chosen, functools.partial(
                        spread_allows, constraints, pod, nodes, target))
                why = choice_reason(fitting, [("preferred node affinity", by_affinity),
                                              ("topology spread", by_spread), ("cluster weights", first)], target)
                trace.get_current_span().set_attributes({"target": target, "score": scores[target], "why": why})
                try:
                    with tracer.start_as_current_span("record choice", attributes={"target": target}):
                        recorded = await self.rt.clusters[ref.cluster].merge_patch(
                            pod_path(ref.namespace, ref.name), chosen.patch(version))
                except KubeError as exc:
                    counts.release(ref.uid)
                    counts.forget(ref.uid)
                    if exc.not_found:
                        return ACK
                    if not exc.conflict:
                        raise
                    proxy = await self._current(ref)  # changed meanwhile: decide again from what it is now
                    if proxy is None:
                        return ACK
                    original, placement, version, controller = proxy
                    continue
            if confirmation is not None and not await self._confirmed(ref, confirmation):
                # A choice stored before ours (another replica's) makes ours overshoot: withdrawn, decided again.
                withdrawn = await self._withdraw(ref, chosen, recorded["metadata"]["resourceVersion"],
                                                 "it would exceed a topology spread constraint's maxSkew")
                if withdrawn is None:
                    return ACK
                counts.reserve(pod, withdrawn[0])
                placement, version = withdrawn
                continue
            observe_since("cluster_chosen", message.created)
            await self._request_delegate(ref, target, chosen.round, message.created,
                                         recorded["metadata"].get("resourceVersion"))
            log.info("%s -> %s (score %.2f, round %d)", ref, target, scores[target], chosen.round)
            return ACK
        return retry_later(1.0, "the proxy kept changing")

    async def _withdraw(self, ref: PodRef, chosen: Placement, version: str,
                        why: str) -> tuple[Placement, str] | None:
        """Take back ``chosen`` (no delegate was asked for): the placement without a target, and its
        resourceVersion; None when the proxy is gone, bound or holds another choice by now."""
        withdrawn = replace(chosen, target=None)
        for _ in range(CHOICE_ATTEMPTS):
            try:
                recorded = await self.rt.clusters[ref.cluster].merge_patch(
                    pod_path(ref.namespace, ref.name), withdrawn.patch(version))
            except KubeError as exc:
                if exc.not_found:
                    return None
                if not exc.conflict:
                    raise
                current = await self._undecided(ref)  # e.g. its status changed: still ours to take back?
                if current is None or Placement.of(current) != chosen:
                    return None
                version = current["metadata"]["resourceVersion"]
                continue
            log.info("%s: %s withdrawn, %s", ref, chosen.target, why)
            return withdrawn, str(recorded["metadata"]["resourceVersion"])
        raise RuntimeError(f"{ref}: the proxy kept changing while its choice of {chosen.target} was taken back")

    async def _confirmed(self, ref: PodRef, confirmation: asyncio.Future[bool]) -> bool:
        """Whether a choice still holds against the choices stored before it (True if the cache is too slow)."""
        try:
            return await asyncio.wait_for(confirmation, CONFIRM_SECONDS)
        except TimeoutError:
            log.warning("%s: the choice did not come back through the watch in %.0fs; it stands", ref,
                        CONFIRM_SECONDS)
            return True
        finally:
            self.counts[ref.cluster].forget(ref.uid)

    async def _undecided(self, ref: PodRef) -> JSON | None:
        """The proxy as its API server has it, unless it is gone, being deleted, bound already or gated
        (elected again once its gates are lifted)."""
        pod = await self._read_proxy(ref)
        if pod is None or pod["metadata"].get("deletionTimestamp") or pod["spec"].get("nodeName") or is_gated(pod):
            return None
        return pod

    async def _current(self, ref: PodRef) -> tuple[JSON, Placement, str, str | None] | None:
        """The user's pod, placement, resourceVersion and controller of the proxy as its API server has it.

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
        return original, Placement.of(pod), pod["metadata"]["resourceVersion"], controller_uid(pod)

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
            f"{target}: {reason}" for target, reason in sorted(reasons.items())) if reasons else \
            f"no target cluster serves the pods of {ref.cluster} in namespace {ref.namespace}"
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
