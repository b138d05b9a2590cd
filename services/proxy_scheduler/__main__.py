"""proxy-scheduler: owns the proxy step.

For each ``elect`` message: ask every target's candidate-scheduler whether
and where the pod fits, pick the target with the most room left (spread by
free capacity), bind the proxy pod to that target's virtual node, and ask the
chosen candidate-scheduler for the delegate. The message carries the user's
pod, so this service keeps no cache of proxies. The binding is the decision
of record: the API server refuses a second binding, so a redelivered message
for a bound proxy ends there, gives back the room it reserved and only
re-requests the delegate of the target already chosen; a pod is never placed
twice. A pod that fits nowhere gets ``PodScheduled=False`` with the reasons
and an Event, and is tried again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from datetime import UTC, datetime

from opentelemetry import trace

from mcsched.bus import ACK, Outcome, retry_later
from mcsched.constants import target_of_virtual_node, virtual_node_name
from mcsched.events import EventRecorder
from mcsched.kube import JSON, KubeError, pod_path, read_pod
from mcsched.models import CandidateRelease, CandidateReply, CandidateRequest, DelegateRequest, ElectMessage, PodRef
from mcsched.podspec import source_manifest
from mcsched.runtime import Runtime, run_service
from mcsched.telemetry import observe_since_creation, tracer

log = logging.getLogger("proxy-scheduler")


def _tie_break(proxy_uid: str, target: str) -> str:
    """A per-pod order of targets, so equal scores still spread pods."""
    return hashlib.sha256(f"{proxy_uid}/{target}".encode()).hexdigest()


class ProxyScheduler:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.events = EventRecorder("admiralty-proxy-scheduler")

    async def _read_proxy(self, ref: PodRef) -> JSON | None:
        return await read_pod(self.rt.clusters[ref.cluster], ref.namespace, ref.name, ref.uid)

    async def _follow_binding(self, ref: PodRef, pod: JSON, original: JSON) -> bool:
        """If the proxy is bound already (a redelivery), request its delegate again: that may be what was lost."""
        bound_target = target_of_virtual_node(pod["spec"].get("nodeName"))
        if bound_target is not None:
            await self._request_delegate(ref, bound_target, None, original)
        return bool(pod["spec"].get("nodeName"))

    async def _request_delegate(self, ref: PodRef, target: str, node: str | None, manifest: JSON,
                                created: str | None = None) -> None:
        request = DelegateRequest(proxy=ref, target=target, node=node, manifest=manifest, created=created)
        await self.rt.bus.publish(self.rt.bus.subject("delegate", target), request, f"delegate:{ref.uid}")

    async def _release(self, ref: PodRef, target: str) -> None:
        await self.rt.bus.notify(self.rt.bus.subject("release", target), CandidateRelease(proxy_uid=ref.uid))

    async def _ask(self, target: str, request: CandidateRequest,
                   span_name: str | None = None) -> tuple[str, CandidateReply | None]:
        with tracer.start_as_current_span(span_name or f"ask {target}", attributes={"target": target}) as span:
            reply = await self.rt.bus.request(self.rt.bus.subject("candidate", target), request, CandidateReply,
                                              self.rt.settings.candidate_timeout_seconds)
            if reply is None:
                span.set_attributes({"fits": False, "reason": "no candidate-scheduler answered"})
            else:
                span.set_attributes({"fits": reply.fits, "node": reply.node or "", "score": reply.score,
                                     "reason": reply.reason})
        return target, reply

    async def on_elect(self, message: ElectMessage) -> Outcome:
        with tracer.start_as_current_span("schedule proxy", attributes={"pod": str(message.proxy),
                                                                        "reason": message.reason}):
            return await self._schedule(message)

    async def _original(self, message: ElectMessage) -> JSON | None:
        """The user's pod from the message or, for a message without it, from the proxy itself.

        None when there is nothing (more) to decide: the proxy is gone, being
        deleted, not a proxy we can read, or bound already (then its delegate is
        requested again, for a redelivery after a crash).
        """
        if message.manifest is not None:
            return message.manifest
        ref = message.proxy
        pod = await self._read_proxy(ref)
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            return None
        try:
            original = source_manifest(pod)
        except ValueError as exc:
            await self.events.record(self.rt.clusters[ref.cluster], pod, "FailedScheduling", f"bad proxy pod: {exc}")
            return None
        return None if await self._follow_binding(ref, pod, original) else original

    async def _schedule(self, message: ElectMessage) -> Outcome:
        ref = message.proxy
        if ref.cluster not in self.rt.settings.source_names:
            log.error("elect message for unknown source %s; dropping", ref.cluster)
            return ACK
        original = await self._original(message)
        if original is None:
            return ACK
        # Every target estimates (nothing reserved); then the best one reserves, or the next.
        question = CandidateRequest(proxy=ref, pod=original, reserve=False)
        answers = dict(await asyncio.gather(*(self._ask(t, question) for t in self.rt.settings.target_names)))
        ranked = sorted((r for r in answers.values() if r is not None and r.fits),
                        key=lambda r: (round(r.score, 3), _tie_break(ref.uid, r.target)), reverse=True)
        best = None
        for candidate in ranked:
            _, reply = await self._ask(candidate.target, CandidateRequest(proxy=ref, pod=original, reserve=True),
                                       span_name=f"reserve {candidate.target}")
            answers[candidate.target] = reply
            if reply is not None and reply.fits:
                best = reply
                break
        if best is None:
            return await self._unschedulable(ref, answers, original)
        trace.get_current_span().set_attributes({"target": best.target, "node": best.node or "",
                                                 "score": best.score})
        target = await self._bind(ref, best.target, message.created)
        if target != best.target:  # bound before (a redelivery) or gone: the room is not needed
            await self._release(ref, best.target)
        if target is None:
            return ACK
        await self._request_delegate(ref, target, best.node if target == best.target else None, original,
                                     message.created)
        log.info("%s -> %s (node %s, score %.1f)", ref, target, best.node, best.score)
        return ACK

    async def _bind(self, ref: PodRef, target: str, created: str | None) -> str | None:
        """Bind the proxy to the target's virtual node.

        Returns the target it is bound to (another one if it was bound before),
        or None if the proxy is gone or being deleted.
        """
        binding = {"apiVersion": "v1", "kind": "Binding",
                   "metadata": {"name": ref.name, "namespace": ref.namespace, "uid": ref.uid},
                   "target": {"apiVersion": "v1", "kind": "Node", "name": virtual_node_name(target)}}
        client = self.rt.clusters[ref.cluster]
        pod = {"metadata": {"name": ref.name, "namespace": ref.namespace, "uid": ref.uid,
                            "creationTimestamp": created}}
        try:
            with tracer.start_as_current_span("bind proxy", attributes={"node": virtual_node_name(target)}):
                await client.create(pod_path(ref.namespace, ref.name, "binding"), binding)
            observe_since_creation("proxy_bound", pod)
        except KubeError as exc:
            if exc.not_found:
                return None
            if not exc.conflict:  # the API server refuses any other binding as a conflict
                raise
            current = await self._read_proxy(ref)
            if current is None:
                return None
            if current["metadata"].get("deletionTimestamp"):
                return None  # its finalizer deletes the delegate: never request one again
            bound = target_of_virtual_node(current["spec"].get("nodeName"))
            if bound is None:
                raise
            return bound
        self.events.record_soon(client, pod, "Scheduled",
                                f"Successfully assigned {ref.namespace}/{ref.name} to {virtual_node_name(target)}",
                                kind="Normal")
        return target

    async def _unschedulable(self, ref: PodRef, answers: dict[str, CandidateReply | None],
                             original: JSON) -> Outcome:
        pod = await self._read_proxy(ref)
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            return ACK
        if await self._follow_binding(ref, pod, original):
            return ACK
        reasons = [f"{target}: {reply.reason if reply else 'no candidate-scheduler answered'}"
                   for target, reply in sorted(answers.items())]
        message = f"0/{len(answers)} clusters are available: " + "; ".join(reasons)
        trace.get_current_span().set_attributes({"unschedulable": True, "reason": message})
        client = self.rt.clusters[ref.cluster]
        conditions = pod.get("status", {}).get("conditions") or []
        current = next((c for c in conditions if c.get("type") == "PodScheduled"), None)
        if not current or current.get("status") != "False" or current.get("message") != message:
            now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                         "message": message, "lastTransitionTime": now, "lastProbeTime": None}
            others = [c for c in conditions if c.get("type") != "PodScheduled"]
            await client.merge_patch(pod_path(ref.namespace, ref.name, "status"),
                                     {"status": {"conditions": [*others, condition]}})
            await self.events.record(client, pod, "FailedScheduling", message)
            log.info("%s is unschedulable: %s", ref, message)
        return retry_later(self.rt.settings.unschedulable_retry_seconds, "unschedulable")


async def compose(rt: Runtime) -> None:
    scheduler = ProxyScheduler(rt)
    rt.bus.consume("elect", "proxy-scheduler", f"{rt.settings.subject_prefix}.elect.>", ElectMessage,
                   scheduler.on_elect)


if __name__ == "__main__":
    run_service("proxy-scheduler", compose)
