"""What a proxy pod says while it waits: its ``PodScheduled`` condition and a matching Event,
and the record of a target that refused it.

Used by every stage that finds why a proxy cannot run yet (no cluster fits,
a target refused it, a referenced object cannot be copied), so ``kubectl
describe`` and ``kubectl get`` tell the user the same thing Kubernetes would
for a pod its own scheduler cannot place.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from .choice import Placement
from .events import EventRecorder
from .kube import JSON, KubeClient, KubeError, pod_path, read_pod
from .models import PodRef


async def mark_unscheduled(client: KubeClient, events: EventRecorder, pod: Mapping[str, Any], message: str,
                           reason: str = "Unschedulable", event_reason: str = "FailedScheduling") -> None:
    """``PodScheduled=False`` with ``reason``/``message`` on the proxy, and a Warning Event (once per change).

    Written with a strategic merge patch (the other conditions stay as they
    are), guarded by the resourceVersion of ``pod`` as read: if the proxy
    changed meanwhile (bound, say), nothing is written.
    """
    conditions = (pod.get("status") or {}).get("conditions") or []
    current = next((c for c in conditions if c.get("type") == "PodScheduled"), None)
    if current and current.get("status") == "False" and current.get("message") == message:
        return
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    condition = {"type": "PodScheduled", "status": "False", "reason": reason,
                 "message": message, "lastTransitionTime": now, "lastProbeTime": None}
    meta = pod["metadata"]
    patch: dict[str, Any] = {"status": {"conditions": [condition]}}
    if meta.get("resourceVersion"):
        patch["metadata"] = {"resourceVersion": meta["resourceVersion"]}
    try:
        await client.strategic_patch(pod_path(meta["namespace"], meta["name"], "status"), patch)
    except KubeError as exc:
        if exc.conflict or exc.not_found:  # changed or gone since it was read: its next reading decides
            return
        raise
    await events.record(client, pod, event_reason, message)


async def record_refusal(client: KubeClient, ref: PodRef, proxy: JSON, target: str, reason: str) -> JSON | None:
    """Record on the proxy (with a precondition) that ``target`` refused it; the proxy as recorded.

    The proxy's placement then names no target, so the watcher publishes it
    again and the proxy-scheduler tries the other clusters (``target`` is left
    out for ``rejection_memory_seconds``). None when there is nothing to
    record: the proxy is gone, bound, or placed elsewhere already.
    """
    for _ in range(3):
        placement = Placement.of(proxy)
        if placement.target != target or proxy["spec"].get("nodeName"):
            return None
        try:
            recorded: JSON = await client.merge_patch(pod_path(ref.namespace, ref.name), placement.reject(
                target, reason, time.time()).patch(proxy["metadata"]["resourceVersion"]))
            return recorded
        except KubeError as exc:
            if exc.not_found:
                return None
            if not exc.conflict:
                raise
        fresh = await read_pod(client, ref.namespace, ref.name, ref.uid)
        if fresh is None:
            return None
        proxy = fresh
    raise RuntimeError(f"{ref}: the proxy kept changing while recording {target}'s refusal")
