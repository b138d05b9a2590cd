"""feedback: owns the status step, virtual nodes and clean-up.

Its processes share the work out (:mod:`mcsched.shards`), in two sides that
talk over the bus:

* the *target side* of a process owns whole targets: it watches every
  delegate there, publishes each change to the owner of its proxy, and keeps
  the target's virtual nodes;
* the *source side* owns partitions of each source's proxies: it watches those
  proxies, and binds, mirrors, refuses, ends and finalizes them.

* Virtual nodes: one ``admiralty-<target>`` Node per target in every source,
  tainted for proxy pods only, kept Ready by lease and condition heartbeats,
  its capacity and common labels summarised from the target's real nodes.
* Status: every change of a delegate (scheduled, refused, its status, its
  deletion) is published on ``status.<source>.<partition>``, whose consumer is
  the process owning that partition of the source. It binds the proxy to its
  virtual node once the target's scheduler placed the delegate, records the
  refusal when it could not (the proxy then goes back to the proxy-scheduler
  for another cluster), and mirrors the delegate's status onto the proxy.
* Deletion: a proxy being deleted has its delegate deleted first (the
  proxy's finalizer guards this), then the proxy is released; a proxy drained
  from a cordoned virtual node keeps its delegate until its controller's
  replacement is Ready (or its grace period ends).
* Marks: a proxy labelled cluster-chosen while its placement names no cluster
  (left by an older stage that wrote the annotation alone) loses the label, so
  the watcher sees it again.
* Strays: a pod bound to a virtual node that is not a proxy (a DaemonSet's)
  is failed as a kubelet fails a pod it cannot admit, and removed once deleted.
* A pod lives once: a delegate deleted or evicted in its target ends its
  proxy (deleted, so its controller replaces it), unless the pod had finished,
  which keeps its final status.
* kubectl logs, exec, attach and port-forward on a proxy: each source's API
  server calls its virtual nodes' kubelet endpoint, which forwards the call
  to the delegate (mcsched.kubeletserver).
* Repair: on every resync the target side sends, per partition of each
  source, a digest of its delegates (``digest.<source>.<partition>``, core
  NATS). The source side finds in it what a lost message would have said: a
  delegate whose proxy no longer exists (e.g. created by a late request after
  the proxy's finalizer let it go) or chose another cluster is removed; a
  proxy whose delegate request was lost gets it again; one whose delegate is
  gone ends; a status not mirrored, seen in two digests in a row while no
  status message of that partition waits, is read from the target and mirrored.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mcsched.bus import ACK, PUBLISHERS, Outcome
from mcsched.capacity import common_labels, schedulable_allocatable
from mcsched.choice import Placement, delegate_round, marked_without_a_choice
from mcsched.constants import (
    CLUSTER_CHOSEN_LABEL,
    CLUSTER_TARGET_NAME_LABEL,
    NODE_LEASE_NAMESPACE,
    NODE_ROLE_LABEL,
    PARENT_CLUSTER_LABEL,
    PARENT_UID_LABEL,
    PROXY_FINALIZER,
    PROXY_SCHEDULER_NAME,
    VIRTUAL_NODE_LABELS_ANNOTATION,
    VIRTUAL_NODE_TAINT_KEY,
    VIRTUAL_NODE_TAINT_VALUE,
    VIRTUAL_NODE_TARGET_LABEL,
    VIRTUAL_NODE_TYPE_LABEL,
    VIRTUAL_NODE_TYPE_VALUE,
    target_of_virtual_node,
    virtual_node_name,
)
from mcsched.events import EventRecorder
from mcsched.kube import JSON, Informer, KubeError, pod_by_uid, pod_path, read_pod
from mcsched.kubeletserver import Endpoint, start_endpoints
from mcsched.models import DelegateDigest, DelegateRequest, DelegateSummary, PodRef, StatusUpdate
from mcsched.natsauth import digest_subject, feedback_durable, status_subject
from mcsched.podspec import (
    awaits_replacement,
    belongs_to,
    delegate_name,
    is_finished,
    mirror_patch,
    mirror_patch_after_binding,
    mirrored_status,
    newer_resource_version,
    parent_ref,
    status_differs,
    status_fingerprint,
    stray_action,
    stray_status,
    unschedulable_reason,
)
from mcsched.proxystatus import record_refusal
from mcsched.runtime import Runtime, periodic, run_service
from mcsched.shards import PARTITIONS, partition_of, partition_selector
from mcsched.targetdirectory import target_status
from mcsched.targets import TargetObject, excluded_label
from mcsched.telemetry import RESYNC_ITEMS, RESYNC_SECONDS, observe_since_creation, pod_trace, tracer
from mcsched.workqueue import KeyedLocks, WorkQueue, for_each

log = logging.getLogger("feedback")

# A chosen proxy gets its delegate within moments; only after this long is a missing delegate treated as lost
# (and only when a digest received that long after it was first missed still lacks it).
DELEGATE_GRACE_SECONDS = 15.0
# Delegates listed in one digest message (a few hundred bytes each; NATS takes 1 MiB by default).
DIGEST_PART_SIZE = 1000
# A delegate just scheduled and still Pending is reported this much later, so that its start, which
# usually follows at once, binds the proxy and mirrors its status in one message.
SCHEDULED_FOLD_SECONDS = 1.0
# Status messages handled at once by one process (each mostly waits on its source's API server).
STATUS_IN_FLIGHT = 192
# Proxies (then delegates) a resync handles at once: each may await an API server or a JetStream ack.
RESYNC_CONCURRENCY = 16
# A status just written is not written again for this long, even if the proxy cache does not show it yet.
MIRROR_MEMORY_SECONDS = 10.0
# Every heartbeat asks each target's API server something small: a watch cut off without a reset (a
# partition, a host gone) says nothing for minutes. A target that answered nothing (an error status is
# an answer) within this long is unreachable, whatever its caches say.
PROBE_TIMEOUT_SECONDS = 10.0
SILENT_TARGET_SECONDS = 30.0
# How often the delegate of a proxy being deleted is tried again while its target is unreachable.
UNREACHABLE_RETRY_SECONDS = 10.0


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ref(source: str, pod: JSON) -> PodRef:
    meta = pod["metadata"]
    return PodRef(cluster=source, namespace=meta["namespace"], name=meta["name"], uid=meta["uid"])


def _delegate_signal(delegate: JSON) -> tuple[JSON, str | None, str | None]:
    """What the source side acts on: the mirrored status, the node, and a refusal by the scheduler."""
    return mirrored_status(delegate.get("status") or {}), delegate["spec"].get("nodeName"), \
        unschedulable_reason(delegate)


def _summary(delegate: JSON) -> DelegateSummary:
    """A delegate as its digest lists it."""
    meta = delegate["metadata"]
    parent = parent_ref(delegate)
    assert parent is not None
    status, node, refusal = _delegate_signal(delegate)
    return DelegateSummary(proxy=PodRef(cluster=parent[0], namespace=parent[1], name=parent[2], uid=parent[3]),
                           name=meta["name"], uid=meta["uid"], resource_version=meta.get("resourceVersion") or "",
                           node=node, refused=refusal is not None, status=status_fingerprint(status),
                           round=delegate_round(delegate), deleting=bool(meta.get("deletionTimestamp")))


@dataclass(frozen=True)
class Mirrored:
    """A status this process wrote onto a proxy."""

    status: JSON  # what it wrote
    delegate_uid: str  # from which delegate
    delegate_version: str | None  # and which version of it
    proxy_version: str | None  # the proxy's resourceVersion after the write
    at: float  # when (monotonic): the proxy cache lags behind the write for a moment
    # The status as the source's API server stored it: one that drops fields it does not know (an older
    # version than the target's) never shows the delegate's fingerprint, only this one.
    stored_fingerprint: str


def _mirrors(proxy: JSON, entry: DelegateSummary) -> bool:
    """Whether the proxy shows what its digest says of its delegate: bound once scheduled (or still
    free when not), its status mirrored; a finished pod keeps its final status."""
    if not proxy["spec"].get("nodeName"):
        return entry.node is None and not entry.refused
    return is_finished(proxy) or status_fingerprint(proxy.get("status") or {}) == entry.status


def _assigned_target(proxy: JSON) -> str | None:
    """The target whose delegate belongs to this proxy: the one it is bound to, else the one it chose."""
    return target_of_virtual_node(proxy["spec"].get("nodeName")) or Placement.of(proxy).target


class Feedback:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.events = EventRecorder("admiralty-feedback")
        shares = rt.shares
        # The sources of which this process owns partitions, and their proxies in those partitions.
        self.sources = shares.sources(rt.settings.source_names)
        self.proxies: dict[str, Informer] = {
            source: rt.informer(source, "/api/v1/pods", field_selector=f"spec.schedulerName={PROXY_SCHEDULER_NAME}",
                                **partition_selector(shares.partitions(source)))
            for source in self.sources
        }
        # Each source's virtual nodes: a proxy drained from a cordoned one keeps its delegate until replaced.
        self.virtual_nodes: dict[str, Informer] = {
            source: rt.informer(source, "/api/v1/nodes",
                                label_selector=f"{VIRTUAL_NODE_TYPE_LABEL}={VIRTUAL_NODE_TYPE_VALUE}")
            for source in self.sources
        }
        # Target side, for the targets this process owns whole: their real nodes (summed into the
        # virtual nodes it keeps) and every delegate there of a source they serve.
        self.nodes: dict[str, Informer] = {target: rt.informer(target, "/api/v1/nodes")
                                           for target in shares.clusters(rt.settings.target_names)}
        self.answered: dict[str, float] = {}  # target -> when (monotonic) its API server last answered a probe
        self.delegates: dict[str, Informer] = {
            target: rt.informer(target, "/api/v1/pods", label_selector=(
                f"{PARENT_UID_LABEL},{PARENT_CLUSTER_LABEL} in ({','.join(rt.settings.sources_of(target))})"))
            for target in self.nodes if rt.settings.sources_of(target)
        }
        # proxy uid -> the status this process last wrote onto it (until the proxy is deleted)
        self.mirrored: dict[str, Mirrored] = {}
        # proxy uid -> the target this process bound it to, and when (until the proxy cache shows it)
        self.bound: dict[str, tuple[str, float]] = {}
        self.proxy_locks: KeyedLocks[str] = KeyedLocks()
        self.kubelet_endpoints: dict[str, Endpoint] = {}  # source -> its virtual nodes' kubelet API
        self.reported: dict[TargetObject, tuple[str, str, str]] = {}  # each Target's Ready condition as written
        self.scheduled_fold_seconds = SCHEDULED_FOLD_SECONDS
        # (target, namespace, delegate name) -> the resourceVersion of the delegate last published
        self.published: dict[tuple[str, str, str], str | None] = {}
        # (target, namespace, delegate name) -> the deletion of a delegate, until published
        self.deleted: dict[tuple[str, str, str], tuple[StatusUpdate, int]] = {}
        # proxy uid -> since when (monotonic) the digests find its delegate missing
        self.missing_since: dict[str, float] = {}
        # proxy uid -> since when (monotonic) the cluster it chose cannot take it (not a target, unreachable)
        self.unusable_since: dict[str, float] = {}
        # proxy uid -> the target whose last whole digest listed its delegate (it exists there)
        self.delegate_listed: dict[str, str] = {}
        # (source, namespace) -> when its proxies were listed, and them (drains, with sharded partitions)
        self.namespace_lists: dict[tuple[str, str], tuple[float, list[JSON]]] = {}
        # proxy uid -> the delegate resourceVersion whose status a digest found not mirrored
        self.unmirrored: dict[str, str] = {}
        # (source, partition, target) -> the proxies of that partition whose delegate belongs in that target
        # (bound to it or chose it), uid -> cache key: a digest is checked against these, not all proxies
        self.assigned: dict[tuple[str, int, str], dict[str, str]] = {}
        self.assigned_slot: dict[str, tuple[str, int, str]] = {}  # proxy uid -> its key in ``assigned``
        # (source, partition, target) -> the epoch being received and its parts so far
        self.digest_parts: dict[tuple[str, int, str], tuple[str, dict[int, list[DelegateSummary]]]] = {}
        self.finalizing: WorkQueue[tuple[str, str, str]] = WorkQueue("finalize proxies", self._finalize_key)
        self.statuses: WorkQueue[tuple[str, str, str]] = WorkQueue("publish status", self._publish_status_key,
                                                                 workers=PUBLISHERS)
        for queue in (self.finalizing, self.statuses):
            queue.start()
            rt.closers.append(queue.stop)
        # Pods bound to a virtual node that are not proxies (a DaemonSet's tolerating every taint): per
        # source and virtual node, normally empty. Nothing can run them: failed, as a kubelet would.
        self.strays: WorkQueue[tuple[str, str, str, str]] = WorkQueue("pods strayed onto virtual nodes",
                                                                      self._stray_key)
        # (Per source, by the process owning its partition 0.)
        self.stray_pods: dict[str, list[Informer]] = {
            source: [rt.informer(source, "/api/v1/pods", field_selector=(
                f"spec.nodeName={virtual_node_name(t)},spec.schedulerName!={PROXY_SCHEDULER_NAME}"))
                for t in rt.settings.targets_for(source)]
            for source in rt.settings.source_names if shares.owns(source, 0)}
        self.strays.start()
        # Proxies labelled cluster-chosen whose placement names no cluster: the label goes.
        self.unmarked: WorkQueue[tuple[str, str, str]] = WorkQueue("unmark proxies with no cluster chosen",
                                                                   self._unmark_key)
        self.unmarked.start()
        rt.closers.append(self.unmarked.stop)
        rt.closers.append(self.strays.stop)
        for source, informers in self.stray_pods.items():
            for informer in informers:
                informer.add_handler(functools.partial(self.on_stray, source))
        for source, informer in self.proxies.items():
            informer.add_handler(functools.partial(self.on_proxy, source))
        for target, delegates in self.delegates.items():
            delegates.add_handler(functools.partial(self.on_delegate, target))

    # -- helpers ---------------------------------------------------------------

    def _proxy(self, source: str, namespace: str, name: str, uid: str) -> JSON | None:
        informer = self.proxies.get(source)
        pod = informer.get(f"{namespace}/{name}") if informer else None
        return pod if pod is not None and pod["metadata"]["uid"] == uid else None

    def _synced(self, informer: Informer) -> bool:
        return informer.synced.is_set() and informer.healthy

    async def _delete_pod(self, cluster: str, namespace: str, name: str, uid: str,
                          grace: int | None = None, resource_version: str | None = None) -> bool:
        """Delete exactly this incarnation (and, if given, version) of a pod; False when it was gone or changed."""
        preconditions = {"uid": uid, **({"resourceVersion": resource_version} if resource_version else {})}
        body: JSON = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": preconditions}
        if grace is not None:
            body["gracePeriodSeconds"] = grace
        try:
            await self.rt.clusters[cluster].delete(pod_path(namespace, name), body)
            return True
        except KubeError as exc:
            if exc.not_found or exc.conflict:
                return False
            raise

    # -- status: target side -------------------------------------------------------

    def on_delegate(self, target: str, kind: str, delegate: JSON, old: JSON | None) -> None:
        parent = parent_ref(delegate)
        if parent is None or not belongs_to(delegate, target):  # another key's, in the same cluster
            return
        meta = delegate["metadata"]
        key = (target, meta["namespace"], meta["name"])
        if kind == "DELETED":
            self.published.pop(key, None)
            self.deleted[key] = (self._status_update(target, delegate, gone=True), partition_of(meta.get("labels")))
            self.statuses.add(key)
            return
        signal = _delegate_signal(delegate)
        if old is not None and _delegate_signal(old) == signal:
            return
        if kind == "ADDED" and signal[1] is None and signal[2] is None:
            return  # a new delegate waits for its target's scheduler: nothing to tell the source yet
        # Published by workers, so a burst of delegate events never holds up the watch.
        if signal[1] is not None and (old is None or not old["spec"].get("nodeName")) and \
                signal[0].get("phase") == "Pending" and not signal[0].get("containerStatuses"):
            # Just scheduled: its kubelet usually reports it started moments later, and one message
            # then binds the proxy and mirrors the status at once.
            self.statuses.add_after(key, self.scheduled_fold_seconds)
        else:
            self.statuses.add(key)

    @staticmethod
    def _status_update(target: str, delegate: JSON, gone: bool = False) -> StatusUpdate:
        meta = delegate["metadata"]
        parent = parent_ref(delegate)
        assert parent is not None
        status, node, refusal = _delegate_signal(delegate)
        return StatusUpdate(proxy=PodRef(cluster=parent[0], namespace=parent[1], name=parent[2], uid=parent[3]),
                            target=target, delegate_name=meta["name"], delegate_uid=meta["uid"],
                            delegate_node=node, status=status, unschedulable=refusal,
                            delegate_resource_version=meta.get("resourceVersion"), gone=gone,
                            round=delegate_round(delegate))

    async def _publish_status_key(self, key: tuple[str, str, str]) -> None:
        target, namespace, name = key
        deletion = self.deleted.get(key)
        if deletion is not None:  # then the delegate of that name now, if another one was made since
            gone, partition = deletion
            await self._publish(gone, partition, f"gone:{gone.delegate_uid}:{self.rt.bus.client_name}")
            if self.deleted.get(key) is deletion:
                del self.deleted[key]
        informer = self.delegates.get(target)
        delegate = informer.get(f"{namespace}/{name}") if informer is not None else None
        if delegate is None or parent_ref(delegate) is None:
            self.published.pop(key, None)
            return
        if deletion is not None and delegate["metadata"]["uid"] == deletion[0].delegate_uid:
            return  # the cache still shows the one deleted (not possible once its DELETED event came)
        version = delegate["metadata"].get("resourceVersion")
        if self.published.get(key) == version:
            return  # published already (a folded change queued twice)
        with pod_trace(delegate):
            meta = delegate["metadata"]
            # The id names this process: each replica's copy of a change is delivered, because a
            # replica whose cache lagged may have written an older status after another one wrote the newer.
            await self._publish(self._status_update(target, delegate), partition_of(meta.get("labels")),
                                f"status:{meta['uid']}:{meta['resourceVersion']}:{self.rt.bus.client_name}")
        self.published[key] = version

    async def _publish(self, update: StatusUpdate, partition: int, msg_id: str) -> None:
        """Publish a delegate's change to the owner of its proxy's partition (NATS away: the work queue
        tries again, and the next resync's digests tell the source side meanwhile)."""
        await self.rt.bus.publish(status_subject(self.rt.bus.prefix, update.proxy.cluster, partition), update, msg_id)

    # -- status: source side -------------------------------------------------------

    def _written_already(self, uid: str, wanted: JSON, delegate_uid: str, version: str | None,
                         proxy: JSON) -> bool:
        """Whether this process wrote a status from a later version of this same delegate (a late
        message, whenever it comes, is never written over it), or, moments ago, this very status onto
        a later proxy than ``proxy``.

        The proxy cache may not show that write yet: then the same status is not
        written again. A proxy that shows the write, or a later change (another
        writer's, say an older status), is judged on what it shows, so that
        change is corrected.
        """
        written = self.mirrored.get(uid)
        if written is None or written.delegate_uid != delegate_uid:
            return False  # nothing, or from another delegate (a later round): its versions are not comparable
        if newer_resource_version(written.delegate_version, version):
            return True
        return time.monotonic() - written.at <= MIRROR_MEMORY_SECONDS and written.status == wanted and \
            written.delegate_version == version and \
            newer_resource_version(written.proxy_version, proxy["metadata"].get("resourceVersion"))

    async def _mirror(self, ref: PodRef, target: str, proxy: JSON, wanted: JSON,
                      after_binding: bool = False) -> JSON | None:
        """Write ``wanted`` as the proxy's status, guarded by its resourceVersion; the proxy as written.

        A proxy changed meanwhile is read again and the status computed anew
        from it; None when it is gone, being deleted or no longer bound to ``target``.
        Right after this process bound it (``after_binding``), whose new resourceVersion
        it does not know, the first write is one that needs none.
        """
        client = self.rt.clusters[ref.cluster]
        path = pod_path(ref.namespace, ref.name, "status")
        for attempt in range(3):
            try:
                written: JSON = await (
                    client.strategic_patch(path, mirror_patch_after_binding(proxy, wanted))
                    if after_binding and attempt == 0 else client.merge_patch(path, mirror_patch(proxy, wanted)))
                return written
            except KubeError as exc:
                if exc.not_found:
                    return None
                if not exc.conflict:
                    raise
            current = await read_pod(client, ref.namespace, ref.name, ref.uid)
            if current is None or current["metadata"].get("deletionTimestamp") or \
                    target_of_virtual_node(current["spec"].get("nodeName")) != target:
                return None
            if not status_differs(current.get("status") or {}, wanted):
                return current
            if is_finished(current) and not is_finished({"status": wanted}):
                return None  # finished meanwhile (another process wrote it): final
            proxy = current
        raise RuntimeError(f"{ref}: the proxy kept changing while mirroring its delegate's status")

    async def on_status(self, update: StatusUpdate) -> Outcome:
        # One message per proxy at a time: two changes of one delegate handled together would
        # both find the proxy unbound (its cache lags) and bind it twice.
        async with self.proxy_locks.hold(update.proxy.uid):
            return await self._on_status(update)

    async def _on_status(self, update: StatusUpdate) -> Outcome:
        ref = update.proxy
        informer = self.proxies.get(ref.cluster)
        if informer is None:
            return ACK  # a source this process no longer serves (its shares moved meanwhile)
        # The proxy cache may lag behind the delegate's: then the API server answers.
        proxy = await pod_by_uid(informer, ref.namespace, ref.name, ref.uid)
        if update.gone and not (proxy is not None and is_finished({"status": update.status})
                                and (update.delegate_node or proxy["spec"].get("nodeName"))):
            await self._delegate_gone(update, proxy)
            return ACK
        # A delegate that finished and then went (pod garbage collection, a clean-up) is not a pod
        # ending early: its final status, which may not be mirrored yet (that message still being
        # retried, or folded into this one), is, and the proxy keeps it.
        return await self._apply_status(update, proxy)

    async def _apply_status(self, update: StatusUpdate, proxy: JSON | None) -> Outcome:
        """Bind the proxy once its delegate is scheduled, mirror the delegate's status onto it, or
        record the target's refusal."""
        ref = update.proxy
        if proxy is None:
            # Gone (its API server said so: the cache did not have it): a delegate created by a request
            # handled late, after the proxy's finalizer let it go.
            if await self._delete_pod(update.target, ref.namespace, update.delegate_name, update.delegate_uid):
                log.info("delegate %s/%s in %s has no proxy any more; deleted", ref.namespace, update.delegate_name,
                         update.target)
            return ACK
        if proxy["metadata"].get("deletionTimestamp"):
            self.finalizing.add((ref.cluster, ref.namespace, ref.name))
            return ACK
        # Messages may arrive out of order: what this process wrote lately from a newer delegate
        # version is never turned back (:meth:`_written_already`).
        wanted, node, refusal, version = (update.status, update.delegate_node, update.unschedulable,
                                          update.delegate_resource_version)
        bound_here = self.bound.get(ref.uid)
        if bound_here is not None and not proxy["spec"].get("nodeName"):  # bound moments ago; the cache lags
            proxy = {**proxy, "spec": {**proxy["spec"], "nodeName": virtual_node_name(bound_here[0])}}
        if _assigned_target(proxy) != update.target:
            # A stray, or the cache has not seen the choice yet: the API server decides (and the
            # proxy it returns is the one the binding's precondition needs).
            proxy = await self._remove_stray(update.target, ref, update.delegate_name, update.delegate_uid)
            if proxy is None or proxy["metadata"].get("deletionTimestamp"):
                return ACK
        bound = target_of_virtual_node(proxy["spec"].get("nodeName"))
        just_bound = False  # by this call: its status write then needs no resourceVersion
        if bound is None:
            if refusal is not None:
                await self._refused(update.target, ref, proxy, refusal, update.delegate_name, update.delegate_uid,
                                    version)
                return ACK
            if node is None:
                return ACK  # the target's scheduler has not decided yet
            bound, just_bound = await self._bind(ref, update.target, proxy, node)
            if bound is None:  # gone, or sent to another cluster meanwhile: this delegate is a stray
                await self._remove_stray(update.target, ref, update.delegate_name, update.delegate_uid)
                return ACK
            if bound != update.target:
                return ACK  # bound elsewhere before: this delegate is a stray, removed by its own status
            if wanted.get("phase") == "Pending" and not wanted.get("containerStatuses"):
                return ACK  # only just scheduled: the proxy shows Pending already; Running follows
        if update.round is not None and Placement.of(proxy).round != update.round:
            return ACK  # late news of an earlier round's delegate (refused there, then that cluster chosen again)
        if is_finished(proxy) and wanted.get("phase") not in ("Succeeded", "Failed"):
            return ACK  # a finished pod's status is final (an older message handled after a newer one)
        if status_differs(proxy.get("status") or {}, wanted) and \
                not self._written_already(ref.uid, wanted, update.delegate_uid, version, proxy):
            with tracer.start_as_current_span("mirror status", attributes={
                    "pod": str(ref), "phase": str(wanted.get("phase")), "pod_ip": str(wanted.get("podIP"))}):
                written = await self._mirror(ref, update.target, proxy, wanted, after_binding=just_bound)
            if written is None:
                return ACK
            self.mirrored[ref.uid] = Mirrored(wanted, update.delegate_uid, version,
                                              written["metadata"].get("resourceVersion"), time.monotonic(),
                                              status_fingerprint(written.get("status") or {}))
            if wanted.get("phase") == "Running" and proxy.get("status", {}).get("phase") != "Running":
                observe_since_creation("proxy_running", proxy)
        return ACK

    async def _bind(self, ref: PodRef, target: str, proxy: JSON, node: str) -> tuple[str | None, bool]:
        """Bind the proxy to the target's virtual node, now that its delegate is scheduled.

        The binding is guarded by the resourceVersion of a proxy whose placement
        names ``target``: if the pod was sent elsewhere meanwhile (a refusal this
        process's cache has not seen), the API server refuses it and the proxy
        is read again. Returns the target it is bound to (another one if it was
        bound before), or None if the proxy is gone, being deleted, or no longer
        placed in ``target``; and whether this call bound it.
        """
        client = self.rt.clusters[ref.cluster]
        version = proxy["metadata"].get("resourceVersion")
        for _ in range(3):
            binding = {"apiVersion": "v1", "kind": "Binding",
                       "metadata": {"name": ref.name, "namespace": ref.namespace, "uid": ref.uid,
                                    **({"resourceVersion": version} if version else {})},
                       "target": {"apiVersion": "v1", "kind": "Node", "name": virtual_node_name(target)}}
            try:
                with tracer.start_as_current_span("bind proxy", attributes={"node": virtual_node_name(target)}):
                    await client.create(pod_path(ref.namespace, ref.name, "binding"), binding)
                break
            except KubeError as exc:
                if exc.not_found:
                    return None, False
                if not exc.conflict:  # the API server refuses any other binding as a conflict
                    raise
            current = await read_pod(client, ref.namespace, ref.name, ref.uid)
            if current is None or current["metadata"].get("deletionTimestamp"):
                return None, False
            bound = target_of_virtual_node(current["spec"].get("nodeName"))
            if bound is not None:
                return bound, False
            if Placement.of(current).target != target:
                return None, False
            version = current["metadata"]["resourceVersion"]  # changed meanwhile, still placed here
        else:
            raise RuntimeError(f"{ref}: the proxy kept changing while binding it to {target}")
        self.bound[ref.uid] = (target, time.monotonic())
        observe_since_creation("proxy_bound", proxy)
        self.events.record_soon(client, proxy, "Scheduled",
                                f"Successfully assigned {ref.namespace}/{ref.name} to {virtual_node_name(target)}"
                                f" (node {node} in {target})", kind="Normal")
        return target, True

    async def _refused(self, target: str, ref: PodRef, proxy: JSON, reason: str,
                       delegate: str, delegate_uid: str, delegate_version: str | None) -> None:
        """The target's scheduler cannot place the delegate: record it, free the pod for another cluster.

        The refusal is recorded on the proxy first (with a precondition), so the
        delegate removed next is never mistaken for one deleted by someone else.
        The delegate is removed only as it was when refused (a resourceVersion
        precondition): if its scheduler placed it meanwhile, the refusal is taken
        back instead, unless the pod has gone on to another cluster already.
        """
        client = self.rt.clusters[ref.cluster]
        recorded = await record_refusal(self.rt.clusters[ref.cluster], ref, proxy, target, reason)
        if recorded is None:
            return
        if await self._delete_pod(target, ref.namespace, delegate, delegate_uid, resource_version=delegate_version):
            log.info("%s: %s's scheduler refused the delegate (%s); trying another cluster", ref, target, reason)
            self.events.record_soon(client, proxy, "DelegateUnschedulable",
                                    f"{target}'s scheduler cannot place the delegate: {reason}; trying another cluster")
            return
        try:
            current: JSON | None = await self.rt.clusters[target].get(pod_path(ref.namespace, delegate))
        except KubeError as exc:
            if not exc.not_found:
                raise
            current = None
        if current is None or current["metadata"]["uid"] != delegate_uid:
            return
        if current["spec"].get("nodeName"):
            try:
                await client.merge_patch(pod_path(ref.namespace, ref.name), Placement.of(recorded).take_back(
                    target).patch(recorded["metadata"]["resourceVersion"]))
                log.info("%s: %s placed the delegate after refusing it; refusal taken back", ref, target)
                return
            except KubeError as exc:
                if not (exc.conflict or exc.not_found):
                    raise  # conflict: the pod went on to another cluster; this delegate must go
        await self._delete_pod(target, ref.namespace, delegate, delegate_uid)

    async def _remove_stray(self, target: str, ref: PodRef, delegate: str, delegate_uid: str) -> JSON | None:
        """Delete a delegate in a cluster its proxy did not choose (a stale request), after asking the source.

        Returns the proxy as its API server has it when the delegate belongs there
        after all (the cache had not seen the choice yet); None otherwise.
        """
        proxy = await read_pod(self.rt.clusters[ref.cluster], ref.namespace, ref.name, ref.uid)
        if proxy is not None and _assigned_target(proxy) == target:
            return proxy
        if await self._delete_pod(target, ref.namespace, delegate, delegate_uid):
            log.info("delegate %s/%s in %s does not belong there (proxy %s); deleted", ref.namespace, delegate,
                     target, "gone" if proxy is None else f"placed in {_assigned_target(proxy)}")
        return None

    # -- deletion and a pod's single life ---------------------------------------------

    def _index_proxy(self, source: str, kind: str, pod: JSON) -> None:
        """Keep ``assigned`` in step with the proxy cache."""
        meta = pod["metadata"]
        uid, target = meta["uid"], None if kind == "DELETED" else _assigned_target(pod)
        slot = (source, partition_of(meta.get("labels")), target) if target is not None else None
        previous = self.assigned_slot.get(uid)
        if previous == slot:
            return
        # Another placement: what the digests said of the last one (a delegate missing since, a
        # status not mirrored) says nothing of this one.
        self.missing_since.pop(uid, None)
        self.unmirrored.pop(uid, None)
        self.delegate_listed.pop(uid, None)
        if previous is not None:
            members = self.assigned[previous]
            members.pop(uid, None)
            if not members:
                del self.assigned[previous]
        if slot is None:
            self.assigned_slot.pop(uid, None)
            return
        self.assigned_slot[uid] = slot
        self.assigned.setdefault(slot, {})[uid] = f"{meta['namespace']}/{meta['name']}"

    def on_proxy(self, source: str, kind: str, pod: JSON, _old: JSON | None = None) -> None:
        self._index_proxy(source, kind, pod)
        uid = pod["metadata"]["uid"]
        if kind == "DELETED":
            self.mirrored.pop(uid, None)
            self.missing_since.pop(uid, None)
            self.unusable_since.pop(uid, None)
            self.delegate_listed.pop(uid, None)
            self.unmirrored.pop(uid, None)
            self.bound.pop(uid, None)
            return
        if pod["spec"].get("nodeName"):
            self.bound.pop(uid, None)  # the cache shows the binding now
        if pod["metadata"].get("deletionTimestamp"):
            self.finalizing.add((source, pod["metadata"]["namespace"], pod["metadata"]["name"]))
        if marked_without_a_choice(pod):
            self.unmarked.add((source, pod["metadata"]["namespace"], pod["metadata"]["name"]))

    async def _unmark_key(self, key: tuple[str, str, str]) -> None:
        """Remove the label, guarded by the version seen, so that the watcher sees the proxy again."""
        source, namespace, name = key
        proxy = self.proxies[source].get(f"{namespace}/{name}")
        if proxy is None or not marked_without_a_choice(proxy):
            return
        try:
            await self.rt.clusters[source].merge_patch(pod_path(namespace, name), {"metadata": {
                "resourceVersion": proxy["metadata"]["resourceVersion"], "labels": {CLUSTER_CHOSEN_LABEL: None}}})
        except KubeError as exc:
            if not (exc.not_found or exc.conflict):  # changed meanwhile: its next event brings it back
                raise
            return
        log.info("proxy %s/%s in %s had no cluster chosen but the label saying so: removed", namespace, name,
                 source)

    def on_stray(self, source: str, kind: str, pod: JSON, _old: JSON | None = None) -> None:
        if kind != "DELETED" and stray_action(pod) is not None:
            meta = pod["metadata"]
            self.strays.add((source, meta["namespace"], meta["name"], meta["uid"]))

    async def _stray_key(self, key: tuple[str, str, str, str]) -> None:
        source, namespace, name, uid = key
        pod = await read_pod(self.rt.clusters[source], namespace, name, uid)
        node = (pod or {}).get("spec", {}).get("nodeName") or ""
        action = stray_action(pod) if pod is not None and target_of_virtual_node(node) else None
        if pod is None or action is None:
            return
        meta = pod["metadata"]
        if action == "delete":
            await self._delete_pod(source, namespace, name, meta["uid"], grace=0)
            return
        log.info("pod %s/%s in %s is bound to the virtual node %s but is not a proxy: failing it", namespace,
                 name, source, node)
        try:
            await self.rt.clusters[source].merge_patch(pod_path(namespace, name, "status"), {
                "metadata": {"uid": meta["uid"], "resourceVersion": meta["resourceVersion"]},
                "status": stray_status(node)})
        except KubeError as exc:
            if not (exc.not_found or exc.conflict):
                raise
            self.strays.add_after(key, 1.0)  # changed meanwhile: look again
            return
        await self.events.record(self.rt.clusters[source], pod, "VirtualNode", stray_status(node)["message"])

    async def _finalize_key(self, key: tuple[str, str, str]) -> None:
        source, namespace, name = key
        proxy = self.proxies[source].get(f"{namespace}/{name}")
        if proxy is not None and proxy["metadata"].get("deletionTimestamp"):
            await self._finalize(source, proxy)

    async def _finalize(self, source: str, proxy: JSON) -> None:
        """Delete the delegate, then let the proxy go."""
        meta = proxy["metadata"]
        ref = _ref(source, proxy)
        target = _assigned_target(proxy)
        if target is not None and target in self.rt.settings.target_names:
            name = delegate_name(meta["name"], meta["uid"])
            client = self.rt.clusters[target]
            node = self.virtual_nodes[source].get(proxy["spec"].get("nodeName") or "")
            siblings = await self._proxies_of_namespace(source, meta["namespace"]) \
                if node is not None and node["spec"].get("unschedulable") else []
            if awaits_replacement(proxy, node, siblings, datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")):
                # Drained: the delegate runs on until its controller's replacement is Ready (or the grace ends).
                self.finalizing.add_after((source, meta["namespace"], meta["name"]), 1.0)
                return
            if self._said_unreachable(source, target):
                # Unreachable, as the heartbeat of its owner says: asked again later rather than holding one
                # of the queue's workers for a request's whole timeout, while other targets' proxies wait.
                # (A virtual node Unknown, its owner silent, is no such evidence: the delete is tried.)
                self.finalizing.add_after((source, meta["namespace"], meta["name"]), UNREACHABLE_RETRY_SECONDS)
                return
            try:
                grace = meta.get("deletionGracePeriodSeconds")
                body = {"apiVersion": "v1", "kind": "DeleteOptions",
                        "preconditions": {}, **({"gracePeriodSeconds": grace} if grace is not None else {})}
                await client.delete(pod_path(meta["namespace"], name), body)
                return  # its DELETED event brings us back here
            except KubeError as exc:
                if not exc.not_found:
                    raise
        finalizers = meta.get("finalizers") or []
        client = self.rt.clusters[source]
        if PROXY_FINALIZER in finalizers:
            try:
                await client.merge_patch(pod_path(meta["namespace"], meta["name"]), {"metadata": {
                    "finalizers": [f for f in finalizers if f != PROXY_FINALIZER],
                    "resourceVersion": meta["resourceVersion"]}})
            except KubeError as exc:
                if exc.not_found:
                    return
                if exc.conflict:  # changed meanwhile: the next event retries
                    return
                raise
        if proxy["spec"].get("nodeName"):  # no kubelet will confirm the deletion of a pod on a virtual node
            await self._delete_pod(source, meta["namespace"], meta["name"], meta["uid"], grace=0)
        log.info("proxy %s released after its delegate was deleted", ref)

    async def _proxies_of_namespace(self, source: str, namespace: str) -> list[JSON]:
        """The proxies of a namespace (a drained pod's siblings): from this process's cache when it holds
        every partition of the source, else from the API server (its siblings may be in others' partitions)."""
        if self.rt.shares.owns_every_partition(source):
            return [p for p in self.proxies[source].items() if p["metadata"]["namespace"] == namespace]
        # From the API server's watch cache (no etcd read), and one list a second for every drained proxy
        # of the namespace, each of which asks every second.
        at, items = self.namespace_lists.get((source, namespace), (-math.inf, []))
        if time.monotonic() - at >= 1.0:
            listed = await self.rt.clusters[source].get(f"/api/v1/namespaces/{namespace}/pods", resourceVersion="0",
                                                        fieldSelector=f"spec.schedulerName={PROXY_SCHEDULER_NAME}")
            items = listed.get("items") or []
            now = time.monotonic()
            self.namespace_lists = {k: v for k, v in self.namespace_lists.items() if now - v[0] < 10.0}
            self.namespace_lists[(source, namespace)] = (now, items)
        return items

    async def _remove_orphan(self, target: str, ref: PodRef, delegate: str, delegate_uid: str) -> None:
        """Delete a delegate whose proxy is gone: the proxy cache says so, and then its API server."""
        informer = self.proxies.get(ref.cluster)
        if informer is None or not self._synced(informer) or \
                self._proxy(ref.cluster, ref.namespace, ref.name, ref.uid) is not None:
            return
        try:
            if await read_pod(self.rt.clusters[ref.cluster], ref.namespace, ref.name, ref.uid) is not None:
                return
        except KubeError:
            return
        if await self._delete_pod(target, ref.namespace, delegate, delegate_uid):
            log.info("delegate %s/%s in %s has no proxy any more; deleted", ref.namespace, delegate, target)

    async def _delegate_gone(self, update: StatusUpdate, proxy: JSON | None) -> None:
        """A delegate was deleted in its target: a proxy being deleted is let go, any other ends."""
        ref = update.proxy
        if proxy is None:
            return
        if proxy["metadata"].get("deletionTimestamp"):
            self.finalizing.add((ref.cluster, ref.namespace, ref.name))
        elif _assigned_target(proxy) == update.target and update.delegate_name == delegate_name(ref.name, ref.uid):
            # The message may come late: a delegate of that name made since (a later round in the
            # same cluster) is the pod's, and it lives on.
            try:
                await self.rt.clusters[update.target].get(pod_path(ref.namespace, update.delegate_name))
                return
            except KubeError as exc:
                if not exc.not_found:
                    raise
            await self._end_proxy(update.target, ref, f"its delegate {update.delegate_name} was deleted in "
                                  f"{update.target}", update.round)

    async def _end_proxy(self, target: str, ref: PodRef, why: str, round_: int | None = None) -> None:
        """A pod lives once: the proxy of a delegate that is gone is deleted too, unless it had finished.

        Decided on the proxy as its API server has it (the cache may not show yet
        that the proxy was sent to another cluster, which deleted this delegate).
        """
        client = self.rt.clusters[ref.cluster]
        proxy = await read_pod(client, ref.namespace, ref.name, ref.uid)
        if proxy is None or _assigned_target(proxy) != target:
            return
        if proxy["metadata"].get("deletionTimestamp"):
            self.finalizing.add((ref.cluster, ref.namespace, ref.name))
            return
        if round_ is not None and not proxy["spec"].get("nodeName") and Placement.of(proxy).round != round_:
            return  # a delegate of an earlier round (refused, then the same cluster chosen again)
        if is_finished(proxy):
            return  # a pod that finished keeps its final status, and never runs again
        log.info("%s: %s; deleting the proxy (a pod lives once: its controller replaces it)", ref, why)
        await self.events.record(client, proxy, "DelegateDeleted", f"{why}: the pod ends here")
        await self._delete_pod(ref.cluster, ref.namespace, ref.name, ref.uid)

    # -- resync and digests ----------------------------------------------------------------

    async def resync(self) -> None:
        """Both sides' periodic pass: the source side goes through its proxies, ``RESYNC_CONCURRENCY``
        at a time; the target side sends the digests of its delegates."""
        started = time.monotonic()
        proxies = [(source, proxy) for source, informer in self.proxies.items() if self._synced(informer)
                   for proxy in informer.items()]
        await for_each(proxies, lambda item: self._resync_proxy(*item), RESYNC_CONCURRENCY, "resync of a proxy")
        delegates = await self.send_digests()
        took = time.monotonic() - started
        RESYNC_SECONDS.labels("feedback").set(took)
        RESYNC_ITEMS.labels("feedback").set(len(proxies) + delegates)
        (log.info if took > self.rt.settings.resync_period_seconds / 2 else log.debug)(
            "resync of %d proxies and %d delegates took %.1f s", len(proxies), delegates, took)

    def _target_problem(self, source: str, target: str) -> str | None:
        """Why no delegate can come from ``target`` now: not a target, or unreachable as its virtual
        node says (its Ready condition is kept by the process owning the target); None otherwise."""
        if target not in self.rt.settings.target_names:
            return f"cluster {target} is not a target"
        ready = self._virtual_node_ready(source, target)
        if ready is not None and ready.get("status") != "True":
            return f"cluster {target} is unreachable"
        return None

    def _said_unreachable(self, source: str, target: str) -> bool:
        """Whether the heartbeat of ``target``'s owner says the target does not answer."""
        ready = self._virtual_node_ready(source, target) or {}
        return ready.get("status") == "False" and ready.get("reason") == "TargetUnreachable"

    def _virtual_node_ready(self, source: str, target: str) -> JSON | None:
        """The Ready condition of ``target``'s virtual node in ``source``, as this process's cache has it."""
        node = self.virtual_nodes[source].get(virtual_node_name(target)) or {}
        return next((c for c in (node.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"), None)

    async def _resync_proxy(self, source: str, proxy: JSON) -> None:
        meta = proxy["metadata"]
        if meta.get("deletionTimestamp"):
            self.finalizing.add((source, meta["namespace"], meta["name"]))
            return
        target = _assigned_target(proxy)
        problem = self._target_problem(source, target) \
            if target is not None and not proxy["spec"].get("nodeName") else None
        if problem is None:
            self.unusable_since.pop(meta["uid"], None)
            return
        # Chosen, but the cluster is unknown or unreachable: no delegate can come from it. After the
        # grace period the pod is freed for the others, as if that cluster had refused it. One whose
        # delegate exists there already (the digests listed it) may still be bound and run there, cut
        # off from us: it is freed only after failover_seconds, as a bound pod is evicted.
        grace: float | None = DELEGATE_GRACE_SECONDS
        if self.delegate_listed.get(meta["uid"]) == target and target in self.rt.settings.target_names:
            grace = self.rt.settings.failover_seconds
        first_missed = self.unusable_since.setdefault(meta["uid"], time.monotonic())
        if grace is not None and time.monotonic() - first_missed >= grace:
            ref = _ref(source, proxy)
            assert target is not None
            if await record_refusal(self.rt.clusters[source], ref, proxy, target, problem) is not None:
                log.info("%s chose %s, which cannot take it (%s); trying another cluster", ref, target, problem)

    # -- digests: target side -------------------------------------------------------------

    async def send_digests(self) -> int:
        """For each target this process owns, the digest of its delegates of every partition of every
        source it serves (an empty one too: it says that none is there); the number of delegates."""
        epoch = f"{self.rt.bus.client_name}:{time.time():.3f}"
        count = 0
        for target, informer in self.delegates.items():
            if not self._synced(informer):
                continue  # what it does not know, it does not deny
            groups: dict[tuple[str, int], list[DelegateSummary]] = {
                (source, partition): [] for source in self.rt.settings.sources_of(target)
                for partition in range(PARTITIONS)}
            for done, delegate in enumerate(informer.items(), 1):
                parent = parent_ref(delegate)
                key = (parent[0], partition_of(delegate["metadata"].get("labels"))) if parent else None
                if key in groups and belongs_to(delegate, target):
                    groups[key].append(_summary(delegate))
                if done % 200 == 0:
                    await asyncio.sleep(0)  # new work is not held up behind a large target
            for (source, partition), entries in groups.items():
                parts = [entries[i:i + DIGEST_PART_SIZE] for i in range(0, len(entries), DIGEST_PART_SIZE)] or [[]]
                for number, part in enumerate(parts):
                    digest = DelegateDigest(target=target, source=source, partition=partition, epoch=epoch,
                                            part=number, parts=len(parts), delegates=part)
                    try:
                        await self.rt.bus.notify(digest_subject(self.rt.bus.prefix, source, partition), digest)
                    except Exception as exc:  # NATS away: the next resync sends them
                        log.warning("could not send the digest of %s's delegates: %s", target, exc)
                        return count
                count += len(entries)
        return count

    # -- digests: source side -------------------------------------------------------------

    async def on_digest(self, digest: DelegateDigest) -> None:
        """Collect a digest's parts; a whole one is checked against this process's proxies."""
        key = (digest.source, digest.partition, digest.target)
        if digest.source not in self.proxies or not self.rt.shares.owns(digest.source, digest.partition):
            return
        epoch, parts = self.digest_parts.get(key, (digest.epoch, {}))
        if epoch != digest.epoch:
            parts = {}  # a part of the one before was lost: that one is never whole
        parts[digest.part] = digest.delegates
        if len(parts) < digest.parts:
            self.digest_parts[key] = (digest.epoch, parts)
            return
        self.digest_parts.pop(key, None)
        await self.check_digest(digest.source, digest.partition, digest.target,
                                [entry for number in sorted(parts) for entry in parts[number]])

    async def check_digest(self, source: str, partition: int, target: str, delegates: list[DelegateSummary]) -> None:
        """What lost messages would have said about one partition's delegates in ``target``, repaired."""
        informer = self.proxies[source]
        if not self._synced(informer):
            return
        now = time.monotonic()
        listed = {entry.proxy.uid: entry for entry in delegates}
        repairs: list[Callable[[], Awaitable[object]]] = []
        # While status messages of this partition wait in its stream (a backlog), a status not mirrored
        # yet is most likely on its way: it is not read from the target meanwhile.
        backlog = self.rt.bus.busy(feedback_durable(source, partition))
        for entry in delegates:
            if entry.deleting or entry.proxy.cluster != source:
                continue
            proxy = self._proxy(source, entry.proxy.namespace, entry.proxy.name, entry.proxy.uid)
            if proxy is None:
                repairs.append(functools.partial(self._remove_orphan, target, entry.proxy, entry.name, entry.uid))
            elif _assigned_target(proxy) != target:
                if not proxy["metadata"].get("deletionTimestamp"):
                    repairs.append(functools.partial(self._remove_stray, target, entry.proxy, entry.name, entry.uid))
            elif _mirrors(proxy, entry) or backlog or self._mirrored_as_stored(proxy, entry):
                self.unmirrored.pop(entry.proxy.uid, None)
            elif self.unmirrored.get(entry.proxy.uid) == entry.resource_version:
                # Not mirrored in two digests in a row of the same delegate version: a lost message.
                repairs.append(functools.partial(self._mirror_from_target, target, entry))
            else:
                self.unmirrored[entry.proxy.uid] = entry.resource_version
        for uid, key in list(self.assigned.get((source, partition, target), {}).items()):
            proxy = informer.get(key)
            if proxy is None or proxy["metadata"]["uid"] != uid:
                continue
            if uid in listed:
                self.delegate_listed[uid] = target
            elif self.delegate_listed.get(uid) == target:
                del self.delegate_listed[uid]
            if uid in listed or proxy["metadata"].get("deletionTimestamp") or is_finished(proxy):
                self.missing_since.pop(uid, None)
                continue
            first_missed = self.missing_since.setdefault(uid, now)
            if now - first_missed >= DELEGATE_GRACE_SECONDS:
                repairs.append(functools.partial(self._missing_delegate, source, target, proxy))
        async def run(repair: Callable[[], Awaitable[object]]) -> None:
            await repair()

        await for_each(repairs, run, RESYNC_CONCURRENCY, "repair from a digest")

    def _mirrored_as_stored(self, proxy: JSON, entry: DelegateSummary) -> bool:
        """Whether the proxy's status is still the one this process wrote from exactly that version of
        that delegate, as the source's API server stored it (it may have dropped fields it does not know:
        writing it again would change nothing)."""
        written = self.mirrored.get(entry.proxy.uid)
        return written is not None and written.delegate_uid == entry.uid and \
            written.delegate_version == entry.resource_version and \
            status_fingerprint(proxy.get("status") or {}) == written.stored_fingerprint

    async def _mirror_from_target(self, target: str, entry: DelegateSummary) -> None:
        """A delegate whose status its proxy does not mirror: read from its target and handled as a message."""
        try:
            delegate = await self.rt.clusters[target].get(pod_path(entry.proxy.namespace, entry.name))
        except KubeError as exc:
            if exc.not_found:
                return
            raise
        if delegate["metadata"]["uid"] == entry.uid and parent_ref(delegate) is not None:
            self.unmirrored.pop(entry.proxy.uid, None)
            await self.on_status(self._status_update(target, delegate))

    async def _missing_delegate(self, source: str, target: str, proxy: JSON) -> None:
        """A proxy whose delegate no digest lists: asked for again if it never ran, else ended if the
        target confirms the delegate is gone."""
        ref = _ref(source, proxy)
        if proxy["spec"].get("nodeName"):  # it ran there: is the delegate really gone?
            try:
                await self.rt.clusters[target].get(pod_path(ref.namespace, delegate_name(ref.name, ref.uid)))
                return
            except KubeError as exc:
                if not exc.not_found:
                    raise
            await self._end_proxy(target, ref, f"its delegate in {target} is gone")
            return
        round_ = Placement.of(proxy).round
        log.info("proxy %s chose %s but has no delegate there; requesting it again", ref, target)
        epoch = int(time.time() // self.rt.settings.resync_period_seconds)
        await self.rt.bus.publish(self.rt.bus.subject("delegate", target),
                                  DelegateRequest(proxy=ref, target=target, round=round_),
                                  f"delegate:{ref.uid}:{round_}:{epoch}")

    # -- virtual nodes -----------------------------------------------------------

    def virtual_node(self, target: str) -> JSON:
        nodes = self.nodes[target].items()
        capacity: dict[str, Any] = schedulable_allocatable(nodes).to_dict()
        name = virtual_node_name(target)
        cluster = self.rt.settings.cluster(target)
        labels = {k: v for k, v in common_labels(nodes).items() if not k.startswith("kubernetes.io/hostname")
                  and not excluded_label(cluster.excluded_labels_regexp, k, v)}
        labels.update(cluster.labels)
        labels.update({VIRTUAL_NODE_TYPE_LABEL: VIRTUAL_NODE_TYPE_VALUE, NODE_ROLE_LABEL: "agent",
                       VIRTUAL_NODE_TARGET_LABEL: target, CLUSTER_TARGET_NAME_LABEL: target,
                       "kubernetes.io/hostname": name})
        return {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels},
            "spec": {"taints": [{"key": VIRTUAL_NODE_TAINT_KEY, "value": VIRTUAL_NODE_TAINT_VALUE,
                                 "effect": "NoSchedule"}]},
            "status": {"capacity": capacity, "allocatable": capacity},
        }

    def _ready_condition(self, target: str) -> JSON:
        now = _now()
        heard = time.monotonic() - self.answered.get(target, -math.inf) < SILENT_TARGET_SECONDS
        if heard and self._synced(self.nodes[target]):
            return {"type": "Ready", "status": "True", "reason": "TargetReachable",
                    "message": f"cluster {target} is reachable", "lastHeartbeatTime": now}
        return {"type": "Ready", "status": "False", "reason": "TargetUnreachable",
                "message": f"cluster {target} cannot be reached", "lastHeartbeatTime": now}

    async def heartbeat(self) -> None:
        """The virtual node of every target this process keeps, in every source."""
        await asyncio.gather(*(self.heartbeat_target(target) for target in self.nodes))

    async def heartbeat_target(self, target: str) -> None:
        """``target``'s virtual node in every source it serves, each on its own: one that fails is logged,
        not waited for."""
        await self._probe(target)
        sources = self.rt.settings.sources_of(target)
        results = await asyncio.gather(*(self._heartbeat(source, target) for source in sources),
                                       return_exceptions=True)
        for source, result in zip(sources, results, strict=True):
            if isinstance(result, Exception):
                log.warning("heartbeat of virtual node %s in %s failed: %s", virtual_node_name(target), source,
                            result)

    async def _probe(self, target: str) -> None:
        """Ask the target's API server for its version: any answer, an error status too, is one."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):  # (wait_for can lose a cancellation)
                await self.rt.clusters[target].get("/version")
        except KubeError:
            pass
        except OSError as exc:  # no answer (a timeout is one of these)
            log.debug("cluster %s did not answer: %s", target, exc)
            return
        self.answered[target] = time.monotonic()

    async def _heartbeat(self, source: str, target: str) -> None:
        client = self.rt.clusters[source]
        node = self.virtual_node(target)
        name = node["metadata"]["name"]
        path = f"/api/v1/nodes/{name}"
        try:
            current = await client.get(path)
        except KubeError as exc:
            if not exc.not_found:
                raise
            condition = self._ready_condition(target)
            condition["lastTransitionTime"] = condition["lastHeartbeatTime"]
            node["status"]["conditions"] = [condition]
            current = await client.create("/api/v1/nodes", node)
            log.info("virtual node %s created in %s", name, source)
        # A target not reached since the start: its Ready condition says so; what is known of it stays.
        known = self.nodes[target].synced.is_set()
        condition = self._ready_condition(target)
        previous: JSON = next((c for c in current.get("status", {}).get("conditions") or [] if c["type"] == "Ready"),
                              {})
        same = previous.get("status") == condition["status"]
        condition["lastTransitionTime"] = previous.get("lastTransitionTime") if same else condition["lastHeartbeatTime"]
        # Only what the heartbeat owns: its labels (a merge patch leaves others alone) and its own
        # taint. A cordon (spec.unschedulable) and taints an operator added are kept as they are.
        # Its labels are the ones it set last (the annotation says which): a label that no longer applies
        # (no longer common to the target's nodes, removed from the settings) is removed.
        labels, taints = node["metadata"]["labels"], current["spec"].get("taints") or []
        [own_taint] = node["spec"]["taints"]
        wanted_taints = taints if own_taint in taints else [*taints, own_taint]
        current_labels = current["metadata"].get("labels") or {}
        owned_before = [k for k in ((current["metadata"].get("annotations") or {})
                                    .get(VIRTUAL_NODE_LABELS_ANNOTATION) or "").split(",") if k]
        stale = {k: None for k in owned_before if k not in labels and k in current_labels}
        owned = ",".join(sorted(labels))
        if (known and (stale or owned != ",".join(owned_before) or
                       any(current_labels.get(k) != v for k, v in labels.items()))) or wanted_taints != taints:
            # Only onto the node as read: the node lifecycle controller adds and removes its
            # not-ready/unreachable taints meanwhile, and an old list must not bring one back.
            try:
                await client.merge_patch(path, {
                    "metadata": {"labels": {**labels, **stale} if known else {},
                                 "annotations": {VIRTUAL_NODE_LABELS_ANNOTATION: owned} if known else {},
                                 "resourceVersion": current["metadata"]["resourceVersion"]},
                    "spec": {"taints": wanted_taints}})
            except KubeError as exc:
                if not exc.conflict:
                    raise
                log.info("virtual node %s in %s changed meanwhile; its labels wait for the next heartbeat",
                         name, source)
        status: JSON = dict(node["status"], conditions=[condition]) if known else {"conditions": [condition]}
        endpoint = self.kubelet_endpoints.get(source)
        if endpoint is not None:  # where the source's API server sends kubectl logs and exec
            status["addresses"] = [{"type": "InternalIP", "address": endpoint.address},
                                   {"type": "Hostname", "address": name}]
            status["daemonEndpoints"] = {"kubeletEndpoint": {"Port": endpoint.port}}
        await client.merge_patch(f"{path}/status", {"status": status})
        await self._renew_lease(client, name, current["metadata"]["uid"])

    # -- targets added and removed at runtime (mcsched.targetdirectory) ---------------------------------

    def known_targets(self, source: str) -> set[str] | None:
        """The targets whose virtual nodes belong in ``source``: those it uses, and those named by its
        Target objects even if unusable now (a broken Secret is a lost cluster, not a removed one);
        None while some source could not be read, when nothing may be removed."""
        directory = self.rt.directory
        if directory is None:
            return set(self.rt.settings.targets_for(source))
        if not directory.current.complete:
            return None
        return {*self.rt.settings.targets_for(source),
                *(origin.key for origin in directory.current.problems if origin.source == source)}

    async def remove_unknown_virtual_nodes(self) -> None:
        """Delete the virtual nodes of targets removed from every source (by the process owning the
        source's partition 0), and the proxies bound to them (each process its own partitions'): their
        controllers replace them elsewhere; the delegates stay in the removed cluster, which the
        services no longer reach."""
        for source, nodes in self.virtual_nodes.items():
            known = self.known_targets(source)
            if known is None or not self._synced(nodes):
                continue
            if self.rt.shares.owns(source, 0):
                for node in nodes.items():
                    target = target_of_virtual_node(node["metadata"]["name"])
                    if target is None or target in known:
                        continue
                    name = node["metadata"]["name"]
                    log.warning("cluster %s is no longer a target of %s: deleting virtual node %s and its proxies",
                                target, source, name)
                    try:
                        await self.rt.clusters[source].delete(f"/api/v1/nodes/{name}")
                    except KubeError as exc:
                        if not exc.not_found:
                            raise
            if not self._synced(self.proxies[source]):
                continue
            for proxy in self.proxies[source].items():
                meta, target = proxy["metadata"], target_of_virtual_node(proxy["spec"].get("nodeName"))
                if target is not None and target not in known and not meta.get("deletionTimestamp"):
                    await self._delete_pod(source, meta["namespace"], meta["name"], meta["uid"])

    async def report_targets(self) -> None:
        """Each Target and ClusterTarget's Ready condition: used, or why not (written when it changes)."""
        directory = self.rt.directory
        if directory is None:
            return
        for source, objects in directory.last.items():
            if not self.rt.shares.owns(source, 0):
                continue  # the process owning the source's partition 0 writes them
            for origin, obj, _ in objects:
                if origin not in directory.current.problems:
                    continue
                status = target_status(directory.current.problems[origin])
                [wanted] = status["conditions"]
                ready = next((c for c in (obj.get("status") or {}).get("conditions") or []
                              if isinstance(c, dict) and c.get("type") == "Ready"), {})
                said = tuple(wanted[k] for k in ("status", "reason", "message"))
                # Admiralty's own CRDs prune status fields they do not declare: what was written is
                # remembered too, so such an object is not written again every few seconds.
                if said == tuple(ready.get(k) for k in ("status", "reason", "message")) or \
                        self.reported.get(origin) == said:
                    continue
                try:
                    await self.rt.clusters[source].merge_patch(f"{origin.path}/status", {"status": status})
                except KubeError as exc:
                    if not exc.not_found:
                        raise
                    continue
                self.reported[origin] = said
                if wanted["status"] != "True":
                    log.warning("%s is not used: %s", origin, wanted["message"])

    async def _renew_lease(self, client: Any, name: str, node_uid: str) -> None:
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": name, "namespace": NODE_LEASE_NAMESPACE,
                              "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": node_uid}]},
                 "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": _now()}}
        await client.apply(f"/apis/coordination.k8s.io/v1/namespaces/{NODE_LEASE_NAMESPACE}/leases/{name}", lease)


async def compose(rt: Runtime) -> None:
    feedback = Feedback(rt)
    for source in feedback.sources:
        # A status message may take two writes in a row (the binding, then the status) on a busy
        # source API server: a wider window keeps the consumer from queueing behind them. Shared
        # out among the partitions this process owns.
        partitions = sorted(rt.shares.partitions(source) or range(PARTITIONS))
        for partition in partitions:
            rt.bus.consume("status", feedback_durable(source, partition),
                           status_subject(rt.settings.subject_prefix, source, partition), StatusUpdate,
                           feedback.on_status, in_flight=max(8, STATUS_IN_FLIGHT // len(partitions)))
            await rt.bus.listen(digest_subject(rt.settings.subject_prefix, source, partition), DelegateDigest,
                                feedback.on_digest)

    async def virtual_nodes(target: str) -> None:
        """One target's heartbeats: the first once its nodes are known, or as NotReady if it cannot be reached."""
        try:
            await feedback.nodes[target].wait_synced(rt.settings.heartbeat_seconds)
        except TimeoutError:
            log.warning("cluster %s not reached yet; its virtual nodes say NotReady until it is", target)
        await feedback.heartbeat_target(target)
        await periodic(rt.settings.heartbeat_seconds, functools.partial(feedback.heartbeat_target, target),
                       f"virtual node heartbeat of {target}")

    if rt.settings.kubelet.enabled:
        feedback.kubelet_endpoints = await start_endpoints(
            rt.settings.kubelet, rt.settings.source_names, rt.clusters, rt.settings.target_names, feedback.proxies)
        for endpoint in feedback.kubelet_endpoints.values():
            rt.closers.append(endpoint.server.stop)
    for target in feedback.nodes:  # each on its own: an unreachable target holds up no other
        rt.spawn(virtual_nodes(target), f"virtual nodes of {target}")
    rt.spawn(periodic(rt.settings.resync_period_seconds, feedback.resync, "feedback resync"), "feedback resync")
    if rt.directory is not None:
        async def targets() -> None:
            await feedback.report_targets()
            await feedback.remove_unknown_virtual_nodes()
        rt.spawn(periodic(rt.settings.target_poll_seconds, targets, "virtual nodes of removed targets"),
                 "targets added and removed")


if __name__ == "__main__":
    run_service("feedback", compose)
