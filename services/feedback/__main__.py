"""feedback: owns the status step, virtual nodes and clean-up.

* Virtual nodes: one ``admiralty-<target>`` Node per target in every source,
  tainted for proxy pods only, kept Ready by lease and condition heartbeats,
  its capacity and common labels summarised from the target's real nodes.
* Status: every change of a delegate is published on ``status.<source>``;
  the consumer mirrors the delegate's current status onto its proxy.
* Deletion: a proxy being deleted has its delegate deleted first (the
  proxy's finalizer guards this), then the proxy is released.
* Repair (on events and on every resync): a delegate deleted by someone else
  is replaced; a delegate whose proxy no longer exists is removed; a bound
  proxy without a delegate gets one again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any

from mcsched.bus import ACK, PUBLISHERS, Outcome
from mcsched.capacity import TargetView
from mcsched.constants import (
    NODE_LEASE_NAMESPACE,
    NODE_ROLE_LABEL,
    PARENT_UID_LABEL,
    PROXY_FINALIZER,
    PROXY_SCHEDULER_NAME,
    VIRTUAL_NODE_TAINT_KEY,
    VIRTUAL_NODE_TAINT_VALUE,
    VIRTUAL_NODE_TARGET_LABEL,
    VIRTUAL_NODE_TYPE_LABEL,
    VIRTUAL_NODE_TYPE_VALUE,
    target_of_virtual_node,
    virtual_node_name,
)
from mcsched.kube import JSON, Informer, KubeError, pod_by_uid, pod_path, read_pod
from mcsched.models import DelegateRequest, PodRef, StatusUpdate
from mcsched.podspec import (
    delegate_name,
    mirrored_status,
    newer_resource_version,
    parent_ref,
    source_manifest,
    status_differs,
)
from mcsched.runtime import Runtime, periodic, run_service
from mcsched.telemetry import observe_since_creation, pod_trace, tracer
from mcsched.workqueue import WorkQueue

log = logging.getLogger("feedback")

# A freshly bound proxy gets its delegate within moments; only after this long
# is a missing delegate treated as lost.
DELEGATE_GRACE_SECONDS = 15.0
# A status just written is not written again for this long, even if the proxy cache does not show it yet.
MIRROR_MEMORY_SECONDS = 10.0


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ref(source: str, pod: JSON) -> PodRef:
    meta = pod["metadata"]
    return PodRef(cluster=source, namespace=meta["namespace"], name=meta["name"], uid=meta["uid"])


class Feedback:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.proxies: dict[str, Informer] = {
            source: rt.informer(source, "/api/v1/pods", field_selector=f"spec.schedulerName={PROXY_SCHEDULER_NAME}")
            for source in rt.settings.source_names
        }
        self.targets: dict[str, TargetView] = {
            target: TargetView(target, rt.informer(target, "/api/v1/nodes"),
                               rt.informer(target, "/api/v1/pods", label_selector=PARENT_UID_LABEL))
            for target in rt.settings.target_names
        }
        # proxy uid -> the status last written onto it, from which delegate version, and when (the proxy cache lags)
        self.mirrored: dict[str, tuple[JSON, str | None, float]] = {}
        self.finalizing: WorkQueue[tuple[str, str, str]] = WorkQueue("finalize proxies", self._finalize_key)
        self.statuses: WorkQueue[tuple[str, str, str]] = WorkQueue("publish status", self._publish_status_key,
                                                                 workers=PUBLISHERS)
        for queue in (self.finalizing, self.statuses):
            queue.start()
            rt.closers.append(queue.stop)
        for source, informer in self.proxies.items():
            informer.add_handler(lambda kind, pod, old, source=source: self.on_proxy(source, kind, pod))
        for target, view in self.targets.items():
            view.pods.add_handler(lambda kind, pod, old, target=target: self.on_delegate(target, kind, pod, old))

    # -- helpers ---------------------------------------------------------------

    def _proxy(self, source: str, namespace: str, name: str, uid: str) -> JSON | None:
        informer = self.proxies.get(source)
        pod = informer.get(f"{namespace}/{name}") if informer else None
        return pod if pod is not None and pod["metadata"]["uid"] == uid else None

    def _synced(self, informer: Informer) -> bool:
        return informer.synced.is_set() and informer.healthy

    # -- status ------------------------------------------------------------------

    async def on_delegate(self, target: str, kind: str, delegate: JSON, old: JSON | None) -> None:
        parent = parent_ref(delegate)
        if parent is None:
            return
        source, namespace, name, uid = parent
        ref = PodRef(cluster=source, namespace=namespace, name=name, uid=uid)
        if kind == "DELETED":
            await self._delegate_gone(target, ref, delegate)
            return
        status = mirrored_status(delegate.get("status") or {})
        if old is not None and mirrored_status(old.get("status") or {}) == status:
            return
        if kind == "ADDED":  # a new delegate starts Pending, as its proxy may show already
            proxy = self._proxy(source, namespace, name, uid)
            if proxy is not None and not status_differs(proxy.get("status") or {}, status):
                return
        # Published by workers, so a burst of delegate events never holds up the watch.
        self.statuses.add((target, delegate["metadata"]["namespace"], delegate["metadata"]["name"]))

    async def _publish_status_key(self, key: tuple[str, str, str]) -> None:
        target, namespace, name = key
        delegate = self.targets[target].pods.get(f"{namespace}/{name}")
        parent = parent_ref(delegate) if delegate is not None else None
        if delegate is None or parent is None:
            return
        ref = PodRef(cluster=parent[0], namespace=parent[1], name=parent[2], uid=parent[3])
        with pod_trace(delegate):
            await self._publish_status(target, ref, delegate)

    async def _publish_status(self, target: str, ref: PodRef, delegate: JSON, epoch: int | None = None) -> None:
        meta = delegate["metadata"]
        update = StatusUpdate(proxy=ref, target=target, delegate_name=meta["name"], delegate_uid=meta["uid"],
                              delegate_node=delegate["spec"].get("nodeName"),
                              status=mirrored_status(delegate.get("status") or {}),
                              delegate_resource_version=meta.get("resourceVersion"))
        # The id names this process: each replica's copy of a change is delivered, because a replica
        # whose cache lagged may have written an older status after another replica wrote the newer one.
        try:
            await self.rt.bus.publish(self.rt.bus.subject("status", ref.cluster), update,
                                      f"status:{meta['uid']}:{meta['resourceVersion']}:{self.rt.bus.client_name}"
                                      + (f":{epoch}" if epoch is not None else ""))
        except Exception as exc:  # NATS away: the resync mirrors it later
            log.warning("could not publish status of %s: %s", ref, exc)

    def _just_mirrored(self, uid: str, wanted: JSON, version: str | None) -> bool:
        """Whether this process wrote this status, from this delegate version or a later one, moments ago."""
        written = self.mirrored.get(uid)
        if written is None or time.monotonic() - written[2] > MIRROR_MEMORY_SECONDS:
            return False
        status, written_version, _ = written
        return status == wanted and (written_version == version or newer_resource_version(written_version, version))

    async def on_status(self, update: StatusUpdate) -> Outcome:
        ref = update.proxy
        # The proxy cache may lag behind the delegate's: then the API server answers.
        proxy = await pod_by_uid(self.proxies[ref.cluster], ref.namespace, ref.name, ref.uid)
        if proxy is None or proxy["metadata"].get("deletionTimestamp"):
            return ACK
        view = self.targets.get(update.target)
        delegate = view.delegates.get(ref.uid) if view else None
        # Mirror the newest of the delegate as this process's cache has it and as the message has it:
        # messages may arrive out of order, and another replica may have seen the change first.
        wanted, version = update.status, update.delegate_resource_version
        if delegate is not None and (version is None or newer_resource_version(
                delegate["metadata"].get("resourceVersion"), version)):
            wanted, version = mirrored_status(delegate.get("status") or {}), delegate["metadata"].get("resourceVersion")
        if status_differs(proxy.get("status") or {}, wanted) and not self._just_mirrored(ref.uid, wanted, version):
            with tracer.start_as_current_span("mirror status", attributes={
                    "pod": str(ref), "phase": str(wanted.get("phase")), "pod_ip": str(wanted.get("podIP"))}):
                await self.rt.clusters[ref.cluster].merge_patch(pod_path(ref.namespace, ref.name, "status"),
                                                                {"status": wanted})
            self.mirrored[ref.uid] = (wanted, version, time.monotonic())
            if wanted.get("phase") == "Running" and proxy.get("status", {}).get("phase") != "Running":
                observe_since_creation("proxy_running", proxy)
        return ACK

    # -- deletion and repair -----------------------------------------------------

    def on_proxy(self, source: str, kind: str, pod: JSON) -> None:
        if kind == "DELETED":
            self.mirrored.pop(pod["metadata"]["uid"], None)
        elif pod["metadata"].get("deletionTimestamp"):
            self.finalizing.add((source, pod["metadata"]["namespace"], pod["metadata"]["name"]))

    async def _finalize_key(self, key: tuple[str, str, str]) -> None:
        source, namespace, name = key
        proxy = self.proxies[source].get(f"{namespace}/{name}")
        if proxy is not None and proxy["metadata"].get("deletionTimestamp"):
            await self._finalize(source, proxy)

    async def _finalize(self, source: str, proxy: JSON) -> None:
        """Delete the delegate, then let the proxy go."""
        meta = proxy["metadata"]
        ref = _ref(source, proxy)
        target = target_of_virtual_node(proxy["spec"].get("nodeName"))
        if target in self.targets:
            name = delegate_name(meta["name"], meta["uid"])
            client = self.rt.clusters[target]
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
        if target is not None:  # no kubelet will confirm the deletion of a pod on a virtual node
            try:
                await client.delete(pod_path(meta["namespace"], meta["name"]),
                                    {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                                     "preconditions": {"uid": meta["uid"]}})
            except KubeError as exc:
                if not (exc.not_found or exc.conflict):
                    raise
        log.info("proxy %s released after its delegate was deleted", ref)

    async def _delegate_gone(self, target: str, ref: PodRef, delegate: JSON) -> None:
        proxy = self._proxy(ref.cluster, ref.namespace, ref.name, ref.uid)
        if proxy is None:
            return
        if proxy["metadata"].get("deletionTimestamp"):
            self.finalizing.add((ref.cluster, ref.namespace, ref.name))
        elif target_of_virtual_node(proxy["spec"].get("nodeName")) == target:
            log.info("delegate of %s in %s was deleted; replacing it", ref, target)
            await self._replace(ref, target, proxy, f"replace:{delegate['metadata']['uid']}")

    async def _replace(self, ref: PodRef, target: str, proxy: JSON, msg_id: str) -> None:
        request = DelegateRequest(proxy=ref, target=target, manifest=source_manifest(proxy))
        await self.rt.bus.publish(self.rt.bus.subject("delegate", target), request, msg_id)

    async def resync(self) -> None:
        epoch = int(time.time() // self.rt.settings.resync_period_seconds)
        for source, informer in self.proxies.items():
            if not self._synced(informer):
                continue
            for proxy in informer.items():
                await self._resync_proxy(source, proxy, epoch)
        for target, view in self.targets.items():
            if not self._synced(view.pods):
                continue
            for delegate in list(view.pods.items()):
                await self._resync_delegate(target, delegate, epoch)

    async def _resync_proxy(self, source: str, proxy: JSON, epoch: int) -> None:
        meta = proxy["metadata"]
        if meta.get("deletionTimestamp"):
            self.finalizing.add((source, meta["namespace"], meta["name"]))
            return
        target = target_of_virtual_node(proxy["spec"].get("nodeName"))
        view = self.targets.get(target or "")
        if view is None or not self._synced(view.pods) or meta["uid"] in view.delegates:
            return
        conditions = proxy.get("status", {}).get("conditions") or []
        scheduled = next((c for c in conditions if c.get("type") == "PodScheduled"), {})
        since = scheduled.get("lastTransitionTime") or meta.get("creationTimestamp")
        if since and (datetime.now(UTC) - datetime.fromisoformat(since.replace("Z", "+00:00"))
                      ).total_seconds() < DELEGATE_GRACE_SECONDS:
            return
        log.info("proxy %s is bound to %s but has no delegate; requesting one", _ref(source, proxy), target)
        await self._replace(_ref(source, proxy), target or "", proxy, f"replace:{meta['uid']}:{epoch}")

    async def _resync_delegate(self, target: str, delegate: JSON, epoch: int) -> None:
        parent = parent_ref(delegate)
        if parent is None:
            return
        source, namespace, name, uid = parent
        informer = self.proxies.get(source)
        ref = PodRef(cluster=source, namespace=namespace, name=name, uid=uid)
        proxy = self._proxy(source, namespace, name, uid)
        if proxy is not None:
            if status_differs(proxy.get("status") or {}, mirrored_status(delegate.get("status") or {})):
                await self._publish_status(target, ref, delegate, epoch)
            return
        if informer is None or not self._synced(informer) or delegate["metadata"].get("deletionTimestamp"):
            return
        # The cache says the proxy is gone: ask the API server before deleting anything.
        try:
            if await read_pod(self.rt.clusters[source], namespace, name, uid) is not None:
                return
        except KubeError:
            return
        meta = delegate["metadata"]
        log.info("delegate %s/%s in %s has no proxy any more; deleting it", meta["namespace"], meta["name"], target)
        try:
            await self.rt.clusters[target].delete(pod_path(meta["namespace"], meta["name"]),
                                                  {"apiVersion": "v1", "kind": "DeleteOptions",
                                                   "preconditions": {"uid": meta["uid"]}})
        except KubeError as exc:
            if not (exc.not_found or exc.conflict):
                raise

    # -- virtual nodes -----------------------------------------------------------

    def virtual_node(self, target: str) -> JSON:
        view = self.targets[target]
        allocatable, _ = view.totals()
        capacity: dict[str, Any] = allocatable.to_dict()
        name = virtual_node_name(target)
        labels = {k: v for k, v in view.common_labels().items() if not k.startswith("kubernetes.io/hostname")}
        labels.update({VIRTUAL_NODE_TYPE_LABEL: VIRTUAL_NODE_TYPE_VALUE, NODE_ROLE_LABEL: "agent",
                       VIRTUAL_NODE_TARGET_LABEL: target, "kubernetes.io/hostname": name})
        return {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels},
            "spec": {"taints": [{"key": VIRTUAL_NODE_TAINT_KEY, "value": VIRTUAL_NODE_TAINT_VALUE,
                                 "effect": "NoSchedule"}]},
            "status": {"capacity": capacity, "allocatable": capacity},
        }

    def _ready_condition(self, target: str) -> JSON:
        view = self.targets[target]
        now = _now()
        if view.ready:
            return {"type": "Ready", "status": "True", "reason": "TargetReachable",
                    "message": f"cluster {target} is reachable", "lastHeartbeatTime": now}
        return {"type": "Ready", "status": "False", "reason": "TargetUnreachable",
                "message": f"cluster {target} cannot be reached", "lastHeartbeatTime": now}

    async def heartbeat(self) -> None:
        await asyncio.gather(*(self._heartbeat(source, target) for source in self.rt.settings.source_names
                               for target in self.targets), return_exceptions=False)

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
        condition = self._ready_condition(target)
        previous = next((c for c in current.get("status", {}).get("conditions") or [] if c["type"] == "Ready"), {})
        same = previous.get("status") == condition["status"]
        condition["lastTransitionTime"] = previous.get("lastTransitionTime") if same else condition["lastHeartbeatTime"]
        if current["metadata"].get("labels") != node["metadata"]["labels"] or \
                current["spec"].get("taints") != node["spec"]["taints"]:
            await client.merge_patch(path, {"metadata": {"labels": node["metadata"]["labels"]},
                                            "spec": {"taints": node["spec"]["taints"]}})
        status = dict(node["status"], conditions=[condition])
        await client.merge_patch(f"{path}/status", {"status": status})
        await self._renew_lease(client, name, current["metadata"]["uid"])

    async def _renew_lease(self, client: Any, name: str, node_uid: str) -> None:
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": name, "namespace": NODE_LEASE_NAMESPACE,
                              "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": node_uid}]},
                 "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": _now()}}
        await client.apply(f"/apis/coordination.k8s.io/v1/namespaces/{NODE_LEASE_NAMESPACE}/leases/{name}", lease)


async def compose(rt: Runtime) -> None:
    feedback = Feedback(rt)
    for source in rt.settings.source_names:
        rt.bus.consume("status", f"feedback-{source}", rt.bus.subject("status", source), StatusUpdate,
                       feedback.on_status)

    async def first_heartbeat_then_periodic() -> None:
        for view in feedback.targets.values():
            await view.nodes.wait_synced()
        await feedback.heartbeat()
        await periodic(rt.settings.heartbeat_seconds, feedback.heartbeat, "virtual node heartbeat")

    rt.spawn(first_heartbeat_then_periodic(), "virtual nodes")
    rt.spawn(periodic(rt.settings.resync_period_seconds, feedback.resync, "feedback resync"), "feedback resync")


if __name__ == "__main__":
    run_service("feedback", compose)
