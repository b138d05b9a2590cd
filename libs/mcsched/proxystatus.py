"""What a proxy pod says while it waits: its ``PodScheduled`` condition and a matching Event.

Used by every stage that finds why a proxy cannot run yet (no cluster fits,
a target refused it, a referenced object cannot be copied), so ``kubectl
describe`` and ``kubectl get`` tell the user the same thing Kubernetes would
for a pod its own scheduler cannot place.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from .events import EventRecorder
from .kube import KubeClient, KubeError, pod_path


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
