"""An in-memory JetStream for the real :class:`~mcsched.bus.Bus`: the nats-py calls it makes, answered as NATS would.

:class:`FakeBus` replaces the bus's consuming and publishing wholesale; this
fake instead sits *under* the real ``Bus`` (``connect_bus(bus, js)``), so
its pull loop, its acks, ``in_progress`` and its recovery are what run. What
is modelled, and only that:

* streams: ``add_stream`` (idempotent for the same config, ``BadRequestError``
  for another), ``update_stream``, work-queue retention (an acked or
  terminated message is removed); ``publish`` to a subject no stream holds
  raises ``NoStreamResponseError``, as nats-py does on "no responders";
* durable pull consumers: ``pull_subscribe`` creates a missing one
  (``NotFoundError`` when its stream is missing), ``consumer_info`` (its
  ``num_pending``, ``num_ack_pending`` and the highest stream sequence it
  ``delivered``), ``fetch`` (up to ``batch`` messages that are due, else a
  timeout after ``timeout`` seconds; ``ServiceUnavailableError`` once the
  consumer is gone, as the "no responders" status of a deleted consumer);
* a delivered message is due again ``ack_wait`` seconds after its delivery
  or its last ``in_progress`` (another process would get it), or ``delay``
  after a ``nak``;
* what an operator or a crash does: :meth:`FakeJetStream.delete_stream` and
  :meth:`FakeJetStream.delete_consumer`; ``unavailable``: JetStream cannot
  answer its API (no quorum, say), every stream and consumer call raises
  ``ServiceUnavailableError``; ``leaderless_until``: the servers of every
  stream elect a new leader until that time (by ``clock``), and a publish
  raises ``NoStreamResponseError`` meanwhile, as nats-py does when no
  server answers for the stream.

Not modelled: de-duplication by message id, subject wildcards other than a
trailing ``>``, max_deliver, flow control, headers beyond storing them.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import ConsumerConfig, StreamConfig
from nats.js.errors import BadRequestError, NoStreamResponseError, NotFoundError, ServiceUnavailableError

from ..bus import Bus


def _holds(pattern: str, subject: str) -> bool:
    return subject.startswith(pattern[:-1]) if pattern.endswith(">") else pattern == subject


@dataclass
class FakeSequencePair:
    consumer: int
    stream: int


@dataclass
class FakeMetadata:
    num_delivered: int
    stream: str
    sequence: FakeSequencePair


@dataclass(eq=False)
class FakeMsg:
    """A stored message, as nats-py's ``Msg`` shows it to a consumer."""

    js: FakeJetStream
    stream: str
    seq: int
    subject: str
    data: bytes
    headers: dict[str, str]
    deliveries: int = 0
    due: float = 0.0  # when it may be delivered (again)
    owner: str | None = None  # the consumer it was delivered by, while unsettled
    acks: list[str] = field(default_factory=list)  # what the consumers said: ack, nak, wpi, term

    @property
    def metadata(self) -> FakeMetadata:
        return FakeMetadata(self.deliveries, self.stream, FakeSequencePair(self.seq, self.seq))

    async def ack(self) -> None:
        self.acks.append("ack")
        self.js.remove(self)

    async def term(self) -> None:
        self.acks.append("term")
        self.js.remove(self)

    async def nak(self, delay: float | None = None) -> None:
        self.acks.append("nak")
        self.due = self.js.clock() + (delay or 0.0)

    async def in_progress(self) -> None:
        self.acks.append("wpi")
        self.due = self.js.clock() + self.js.consumer_ack_wait(self)


@dataclass
class FakeSequenceInfo:
    stream_seq: int


@dataclass
class FakePubAck:
    seq: int


@dataclass
class FakeConsumerInfo:
    num_pending: int
    num_ack_pending: int = 0
    delivered: FakeSequenceInfo | None = None
    config: ConsumerConfig | None = None


class FakePullSubscription:
    def __init__(self, js: FakeJetStream, stream: str, durable: str, incarnation: int) -> None:
        self.js, self.stream, self.durable, self.incarnation = js, stream, durable, incarnation

    def _alive(self) -> bool:
        consumer = self.js.consumers.get((self.stream, self.durable))
        return consumer is not None and consumer[1] == self.incarnation

    async def consumer_info(self) -> FakeConsumerInfo:
        return await self.js.consumer_info(self.stream, self.durable)

    async def fetch(self, batch: int = 1, timeout: float | None = 5) -> list[FakeMsg]:
        deadline = self.js.clock() + (timeout or 0.0)
        while True:
            await asyncio.sleep(0)
            if not self._alive():
                raise ServiceUnavailableError
            config = self.js.consumers[(self.stream, self.durable)][0]
            now = self.js.clock()
            due = [m for m in self.js.messages.get(self.stream, [])
                   if m.due <= now and _holds(config.filter_subject or ">", m.subject)][:batch]
            if due:
                for msg in due:
                    msg.deliveries += 1
                    msg.owner = self.durable
                    key = (self.stream, self.durable)
                    self.js.delivered[key] = max(self.js.delivered.get(key, 0), msg.seq)
                    msg.due = now + (config.ack_wait or 30.0)
                self.js.fetched += len(due)
                return due
            if now >= deadline:
                raise NatsTimeoutError
            await asyncio.sleep(min(0.01, deadline - now))

    async def unsubscribe(self) -> None:
        return None


class FakeJetStream:
    """The server side and nats-py's ``JetStreamContext`` in one (see the module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.streams: dict[str, StreamConfig] = {}
        self.messages: dict[str, list[FakeMsg]] = {}
        self.consumers: dict[tuple[str, str], tuple[ConsumerConfig, int]] = {}  # -> (config, incarnation)
        self.sequence = itertools.count(1)
        self.fetched = 0
        self.delivered: dict[tuple[str, str], int] = {}  # (stream, durable) -> highest sequence handed out
        self.api_calls: list[str] = []
        self.unavailable = False
        self.leaderless_until = 0.0  # until then (by ``clock``) a publish finds no stream leader to answer it

    def _api(self, call: str) -> None:
        self.api_calls.append(call)
        if self.unavailable:
            raise ServiceUnavailableError(code=503, description="JetStream not available")

    # -- the nats-py surface the bus uses ---------------------------------------------------------------

    async def add_stream(self, config: StreamConfig) -> None:
        self._api(f"STREAM.CREATE.{config.name}")
        current = self.streams.get(str(config.name))
        if current is not None and current != config:
            raise BadRequestError(code=400, description="stream name already in use with a different configuration")
        self.streams[str(config.name)] = config
        self.messages.setdefault(str(config.name), [])

    async def update_stream(self, config: StreamConfig) -> None:
        self._api(f"STREAM.UPDATE.{config.name}")
        if str(config.name) not in self.streams:
            raise NotFoundError(code=404, description="stream not found")
        self.streams[str(config.name)] = config

    async def publish(self, subject: str, payload: bytes = b"", headers: dict[str, str] | None = None,
                      **_: Any) -> FakePubAck:
        await asyncio.sleep(0)
        if self.clock() < self.leaderless_until:  # the stream's servers are electing a leader: nobody answers
            raise NoStreamResponseError
        for name, config in self.streams.items():
            if any(_holds(s, subject) for s in config.subjects or []):
                seq = next(self.sequence)
                self.messages[name].append(FakeMsg(self, name, seq, subject, payload, dict(headers or {}),
                                                   due=self.clock()))
                return FakePubAck(seq)
        raise NoStreamResponseError

    async def pull_subscribe(self, subject: str, durable: str, stream: str,
                             config: ConsumerConfig) -> FakePullSubscription:
        self._api(f"CONSUMER.INFO.{stream}.{durable}")
        if stream not in self.streams:
            raise NotFoundError(code=404, description="stream not found")
        if (stream, durable) not in self.consumers:
            self.api_calls.append(f"CONSUMER.CREATE.{stream}.{durable}")
            self.consumers[(stream, durable)] = (config, next(self.sequence))
        return FakePullSubscription(self, stream, durable, self.consumers[(stream, durable)][1])

    async def consumer_info(self, stream: str, durable: str, timeout: float | None = None) -> FakeConsumerInfo:
        await asyncio.sleep(0)
        self._api(f"CONSUMER.INFO.{stream}.{durable}")
        if stream not in self.streams:
            raise NotFoundError(code=404, err_code=10059, description="stream not found")
        if (stream, durable) not in self.consumers:
            raise NotFoundError(code=404, err_code=10014, description="consumer not found")
        stored = self.messages[stream]
        never = sum(1 for m in stored if m.deliveries == 0)
        return FakeConsumerInfo(never, len(stored) - never,
                                delivered=FakeSequenceInfo(self.delivered.get((stream, durable), 0)),
                                config=self.consumers[(stream, durable)][0])

    async def add_consumer(self, stream: str, config: ConsumerConfig, timeout: float | None = None) -> None:
        """Create the durable, or update one that exists (the server's create-or-update)."""
        durable = str(config.durable_name)
        self._api(f"CONSUMER.DURABLE.CREATE.{stream}.{durable}")
        if stream not in self.streams:
            raise NotFoundError(code=404, err_code=10059, description="stream not found")
        existing = self.consumers.get((stream, durable))
        self.consumers[(stream, durable)] = (config, existing[1] if existing else next(self.sequence))

    # -- bookkeeping and what the test does -------------------------------------------------------------

    def remove(self, msg: FakeMsg) -> None:
        stored = self.messages.get(msg.stream, [])
        if msg in stored:
            stored.remove(msg)

    def consumer_ack_wait(self, msg: FakeMsg) -> float:
        consumer = self.consumers.get((msg.stream, msg.owner or ""))
        return float(consumer[0].ack_wait or 30.0) if consumer else 30.0

    def delete_stream(self, name: str) -> None:
        """The stream is gone, with its messages and consumers (``nats stream rm``)."""
        self.streams.pop(name, None)
        self.messages.pop(name, None)
        for key in [k for k in self.consumers if k[0] == name]:
            del self.consumers[key]
            self.delivered.pop(key, None)

    def delete_consumer(self, stream: str, durable: str) -> None:
        """The durable consumer is gone (``nats consumer rm``); its stream keeps the messages."""
        self.consumers.pop((stream, durable), None)
        self.delivered.pop((stream, durable), None)  # one made again starts from nothing handed out
        for msg in self.messages.get(stream, []):
            if msg.owner == durable:
                msg.owner, msg.due = None, self.clock()


class _FakeConnection:
    """Enough of nats-py's ``Client`` for :class:`~mcsched.bus.Bus`: connected, with this JetStream."""

    def __init__(self, js: FakeJetStream) -> None:
        self.js = js
        self.is_connected, self.is_closed = True, False

    def jetstream(self) -> FakeJetStream:
        return self.js

    async def close(self) -> None:
        self.is_connected, self.is_closed = False, True

    async def drain(self) -> None:
        await self.close()


def connect_bus(bus: Bus, js: FakeJetStream) -> Bus:
    """Make ``bus`` (a real :class:`~mcsched.bus.Bus`, not connected) talk to ``js``."""
    bus.nc = _FakeConnection(js)  # type: ignore[assignment]
    bus._js = js  # type: ignore[assignment]
    return bus
