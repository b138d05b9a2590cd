"""Which processes of a stage are alive: heartbeats on the bus, each member's list of the others.

Every process of a stage publishes a :class:`~mcsched.models.MemberHeartbeat`
on ``<prefix>.members.<stage>`` every quarter of ``lease_seconds`` and listens
to the others'. A member not heard for ``lease_seconds`` is gone; one that stops
says so (``leaving``) and is gone at once. A new member is answered at once by
every member that did not know it, so it learns the others within moments, and
waits :attr:`Membership.settle_seconds` before taking any work.

Each member derives its shares from the sorted list (:func:`mcsched.shards.assign`):
when a member dies, its shares are taken by the survivors one lease later;
when it returns, they come back to it. Two members may both hold a share only
while their lists differ: less than a heartbeat when one joins or leaves
cleanly, at most one lease when one dies.

Without a connection to NATS a member cannot tell who is alive: it keeps the
list it had (and its shares) rather than taking everything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from .bus import Bus
from .models import MemberHeartbeat
from .workqueue import cancel_all

log = logging.getLogger(__name__)


class Membership:
    def __init__(self, bus: Bus, stage: str, member: str, lease_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.bus, self.stage, self.member = bus, stage, member
        self.lease_seconds = lease_seconds
        self.interval = lease_seconds / 4
        self.settle_seconds = min(1.0, self.interval)
        self.clock = clock
        self.seen: dict[str, float] = {member: clock()}  # member -> when last heard
        self.changed = asyncio.Event()  # the list of members changed (cleared by whoever acts on it)
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def subject(self) -> str:
        return f"{self.bus.prefix}.members.{self.stage}"

    def members(self) -> tuple[str, ...]:
        return tuple(sorted(self.seen))

    async def start(self) -> None:
        """Listen, say hello, and wait until the others have answered."""
        await self.bus.listen(self.subject, MemberHeartbeat, self._heard)
        await self._beat()
        self._task = asyncio.create_task(self._run(), name=f"{self.stage} membership")
        await asyncio.sleep(self.settle_seconds)
        self.changed.clear()  # what was learnt while settling is the starting point, not a change

    async def stop(self) -> None:
        """Say goodbye (the others take this member's shares at once) and stop beating and answering."""
        self._stopped = True
        if self._task is not None:
            await cancel_all([self._task])
        try:
            await self.bus.notify(self.subject, MemberHeartbeat(member=self.member, leaving=True))
        except Exception as exc:  # the others notice when its lease ends
            log.info("could not say goodbye to the other %s processes: %s", self.stage, exc)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self._beat()
            self.expire()

    async def _beat(self) -> None:
        try:
            await self.bus.notify(self.subject, MemberHeartbeat(member=self.member))
        except Exception as exc:  # NATS away: the list is kept as it is until heartbeats flow again
            log.debug("heartbeat not sent: %s", exc)

    def expire(self) -> None:
        """Forget the members not heard for a lease, unless this member is cut off itself."""
        now = self.clock()
        if not self.bus.connected or now - self.seen.get(self.member, now) > self.lease_seconds:
            return  # its own heartbeats do not come back: it cannot know who else is alive
        gone = [m for m, when in self.seen.items() if m != self.member and now - when > self.lease_seconds]
        for member in gone:
            del self.seen[member]
            log.warning("%s process %s not heard for %.0f s: its shares go to the others", self.stage, member,
                        self.lease_seconds)
        if gone:
            self.changed.set()

    async def _heard(self, heartbeat: MemberHeartbeat) -> None:
        if self._stopped:
            return
        if heartbeat.member == self.member:
            self.seen[self.member] = self.clock()
            return
        if heartbeat.leaving:
            if self.seen.pop(heartbeat.member, None) is not None:
                log.info("%s process %s left", self.stage, heartbeat.member)
                self.changed.set()
            return
        new = heartbeat.member not in self.seen
        self.seen[heartbeat.member] = self.clock()
        if new:
            log.info("%s process %s joined", self.stage, heartbeat.member)
            self.changed.set()
            await self._beat()  # so the newcomer knows this member before it takes any work
