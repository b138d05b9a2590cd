"""Kubernetes Events on pods, so users see in ``kubectl describe`` what happened and why.

Repeated identical events are folded: within ``quiet_seconds`` the same
(pod, reason, message) is not written again.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from .kube import KubeClient, KubeError

log = logging.getLogger(__name__)


class EventRecorder:
    def __init__(self, component: str, quiet_seconds: float = 60.0) -> None:
        self.component = component
        self.quiet_seconds = quiet_seconds
        self._recent: dict[tuple[str, str, str, str], float] = {}
        self._pending: set[asyncio.Task[None]] = set()

    def record_soon(self, client: KubeClient, pod: Mapping[str, Any], reason: str, message: str,
                    kind: str = "Warning") -> None:
        """Record in the background: for events on the hot path, which nobody should wait for."""
        task = asyncio.create_task(self.record(client, pod, reason, message, kind))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def record(self, client: KubeClient, pod: Mapping[str, Any], reason: str, message: str,
                     kind: str = "Warning") -> None:
        meta = pod["metadata"]
        key = (client.name, meta.get("uid", ""), reason, message)
        now = time.monotonic()
        if now - self._recent.get(key, -1e9) < self.quiet_seconds:
            return
        self._recent[key] = now
        if len(self._recent) > 10_000:
            self._recent = {k: t for k, t in self._recent.items() if now - t < self.quiet_seconds}
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid")},
            "reason": reason, "message": message[:1024], "type": kind,
            "source": {"component": self.component},
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
            "reportingComponent": self.component,
        }
        try:
            await client.create(f"/api/v1/namespaces/{meta['namespace']}/events", event)
        except (KubeError, OSError) as exc:  # an event is advice; never fail the work for it
            log.warning("could not record event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], exc)
