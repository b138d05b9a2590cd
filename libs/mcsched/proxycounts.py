"""The proxies of one source as topology spread and weighted splits count them.

Three parts, all in one proxy-scheduler process:

* the cache: every proxy of the source (an informer), each counted where it
  is bound or where its placement annotation sends it (:func:`mcsched.spread.member`),
  opened only once a pod that counts (spread constraints, cluster weights)
  comes: until then the process watches no proxy at all;
* reservations: this process's own choices from the moment they are made
  until the cache shows them, so concurrent decisions in one process count
  each other (the check and the reservation happen with no await between);
* confirmations: a choice under a DoNotSchedule spread constraint is checked
  again against the cache *as it was when the choice's own write arrived
  through the watch*, i.e. against every placement stored before it (a watch
  delivers one resource's changes in resourceVersion order). A choice that
  overshoots given the choices stored before it (another replica's, made
  from a cache that had not seen them) is withdrawn before any delegate is
  asked for. So of two replicas racing for one domain, the later write yields.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .choice import Placement
from .kube import Informer
from .models import PodRef
from .spread import Member, controller_uid, member

Verdict = Callable[[list[Member]], bool]


@dataclass
class _Waiter:
    round: int
    target: str
    verdict: Verdict
    future: asyncio.Future[bool]


class ProxyCounts:
    def __init__(self, open_cache: Callable[[], Informer]) -> None:
        self._open_cache = open_cache
        self.proxies: Informer | None = None  # opened by the first pod that counts
        # proxy uid -> (its placement once written, the member counted meanwhile: target None for a withdrawal)
        self.reserved: dict[str, tuple[Placement, Member]] = {}
        self.waiters: dict[str, _Waiter] = {}

    async def activate(self, timeout: float) -> None:
        """Open the cache of the source's proxies if not yet, and wait until it has listed them.

        Choices made before hold no reservation: they were written before the list (or
        arrive through the watch), and pods that do not count never count for one that does
        (the pods of one controller share its constraints and weights).
        """
        if self.proxies is None:
            self.proxies = self._open_cache()
            self.proxies.add_handler(self._on_event)
        await self.proxies.wait_synced(timeout)

    def subject(self, ref: PodRef, labels: dict[str, str], controller: str | None) -> Member:
        """The pod being placed, with its controller's UID (from the cache when a message without one
        came from an older watcher and the cache has the pod already)."""
        if controller is None and self.proxies is not None:
            cached = self.proxies.get(f"{ref.namespace}/{ref.name}")
            if cached is not None and cached["metadata"].get("uid") == ref.uid:
                controller = controller_uid(cached)
        return Member(ref.uid, ref.namespace, labels, controller)

    def stored(self) -> list[Member]:
        """The proxies counted from the cache alone (none while it is not open)."""
        if self.proxies is None:
            return []
        return [m for pod in self.proxies.items() if (m := member(pod)) is not None]

    def members(self) -> list[Member]:
        """The proxies counted: the cache, overlaid with this process's choices it does not show yet."""
        found = {m.uid: m for m in self.stored()}
        for uid, (_, reserved) in self.reserved.items():
            if reserved.target is None:
                found.pop(uid, None)
            else:
                found[uid] = reserved
        return list(found.values())

    def reserve(self, pod: Member, placement: Placement) -> None:
        if self.proxies is None:
            return  # nothing counts yet; the cache, once open, lists this choice
        self.reserved[pod.uid] = (placement, Member(pod.uid, pod.namespace, pod.labels, pod.owner, placement.target))

    def release(self, uid: str) -> None:
        """The write of a reserved choice failed: nothing to count."""
        self.reserved.pop(uid, None)

    def expect(self, uid: str, placement: Placement, verdict: Verdict) -> asyncio.Future[bool]:
        """A future set to ``verdict(proxies stored then)`` when the cache receives ``placement`` on ``uid``.

        Registered before the write, so the event cannot pass unseen.
        """
        assert placement.target is not None
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.waiters[uid] = _Waiter(placement.round, placement.target, verdict, future)
        return future

    def forget(self, uid: str) -> None:
        self.waiters.pop(uid, None)

    def _on_event(self, kind: str, pod: dict[str, Any], _old: dict[str, Any] | None = None) -> None:
        uid = str(pod["metadata"].get("uid"))
        placement = Placement.of(pod)
        reserved = self.reserved.get(uid)
        if reserved is not None and (kind == "DELETED" or pod["spec"].get("nodeName") or
                                     (placement.round, placement.target) == (reserved[0].round, reserved[0].target)
                                     or placement.round > reserved[0].round):
            del self.reserved[uid]  # the cache shows it now (or it is gone)
        waiter = self.waiters.get(uid)
        if waiter is None or waiter.future.done():
            return
        if kind == "DELETED":
            waiter.future.set_result(True)  # nothing left to withdraw
        elif (placement.round, placement.target) == (waiter.round, waiter.target):
            # The store holds exactly what was stored up to this change: judge the choice against it.
            waiter.future.set_result(waiter.verdict(self.stored()))
