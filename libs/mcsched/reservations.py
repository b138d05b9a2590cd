"""Short-lived reservations of node capacity in a target, shared by all replicas.

A candidate reply reserves the pod's requests on one node until the delegate
shows up in the target's cache (or the reservation expires). Reservations
live in a NATS key-value bucket, one key per target, written with
compare-and-set on the key's revision: two candidate-scheduler replicas can
never both hand out the last room on a node.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Container
from dataclasses import dataclass

import msgpack
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from .placement import Resources


@dataclass(frozen=True)
class Reservation:
    node: str
    requests: Resources
    expires: float  # wall-clock seconds

    def pack(self) -> list[object]:
        r = self.requests
        return [self.node, r.cpu_milli, r.memory_bytes, r.pods, self.expires]

    @classmethod
    def unpack(cls, raw: list[object]) -> Reservation:
        node, cpu, memory, pods, expires = raw
        return cls(str(node), Resources(int(cpu), int(memory), int(pods)), float(expires))  # type: ignore[call-overload, arg-type]


Decision = Callable[[dict[str, Reservation]], Reservation | None]


class ReservationBook:
    """The reservations of one target: read, decide, compare-and-set, retry on conflict."""

    def __init__(self, kv: KeyValue, target: str) -> None:
        self.kv, self.target = kv, target
        self._lock = asyncio.Lock()  # one writer per process; CAS handles other replicas
        # The book as this process last read or wrote it. With one replica it is always
        # current, so a change costs one compare-and-set; another replica's write makes the
        # compare-and-set fail, and the book is read again.
        self._book: dict[str, Reservation] | None = None
        self._revision = 0

    async def _read(self) -> tuple[dict[str, Reservation], int]:
        try:
            entry = await self.kv.get(self.target)
        except KeyNotFoundError:
            return {}, 0
        raw = msgpack.unpackb(entry.value or b"\x80", raw=False)
        return {uid: Reservation.unpack(r) for uid, r in raw.items()}, int(entry.revision or 0)

    async def _write(self, book: dict[str, Reservation], revision: int) -> None:
        value = msgpack.packb({uid: r.pack() for uid, r in book.items()})
        if revision:
            self._revision = await self.kv.update(self.target, value, last=revision)
        else:
            self._revision = await self.kv.create(self.target, value)
        self._book = book

    async def change(self, proxy_uid: str, decide: Decision, settled: Container[str]) -> Reservation | None:
        """Set ``proxy_uid``'s reservation to ``decide(live reservations of others)``.

        ``settled`` are proxies whose delegates are already counted by the
        target's cache; their reservations are dropped. Returns the stored
        reservation, or None when ``decide`` found no room (nothing stored).
        """
        async with self._lock:
            for attempt in range(20):
                if attempt or self._book is None:
                    self._book, self._revision = await self._read()
                book, revision = self._book, self._revision
                now = time.time()
                live = {u: r for u, r in book.items() if r.expires > now and u not in settled and u != proxy_uid}
                decision = decide(live)
                if decision is not None:
                    live[proxy_uid] = decision
                if live == book:
                    return decision
                try:
                    await self._write(live, revision)
                    return decision
                except (KeyWrongLastSequenceError, KeyNotFoundError):
                    continue  # another replica wrote first: decide again on fresh data
            raise RuntimeError(f"reservations for {self.target} kept changing; giving up this attempt")

    async def release(self, proxy_uid: str, settled: Container[str]) -> None:
        await self.change(proxy_uid, lambda _others: None, settled)

    async def current(self, fresh: bool = True) -> dict[str, Reservation]:
        """Live reservations; ``fresh=False`` answers from this process's last view (no round trip)."""
        if fresh or self._book is None:
            async with self._lock:
                self._book, self._revision = await self._read()
        now = time.time()
        return {u: r for u, r in self._book.items() if r.expires > now}


def reserved_per_node(book: dict[str, Reservation]) -> dict[str, Resources]:
    per_node: dict[str, Resources] = {}
    for reservation in book.values():
        per_node[reservation.node] = per_node.get(reservation.node, Resources()) + reservation.requests
    return per_node
