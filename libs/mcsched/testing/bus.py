"""An in-memory NATS for tests: the JetStream work queues and request/reply the services use.

:class:`FakeBroker` is the server, shared by every service under test; each
service gets its own :class:`FakeBus` (a :class:`~mcsched.bus.Bus`, so the
services take it as theirs) naming the process in ``client_name``. What is
modelled, and only that:

* ``publish``: a message on ``<prefix>.<kind>.<cluster>`` with ``kind`` one of
  the work-queue streams (``elect``, ``delegate``, ``status``) is stored, encoded
  as on the wire; another subject is refused as NATS would (no stream). A
  message id seen in the stream within its duplicate window (15 min for elect, 2 min for the others) is
  dropped (recorded in ``FakeBroker.duplicates``);
* ``consume``: a durable consumer with a subject filter (``*`` and ``>``
  wildcards); processes that register the same durable are its replicas;
* ``request``/``respond``: one responder of the subject's queue group answers;
  with none, a failing one, a slow one (``timeout``) or a subject the
  client cannot reach (``FakeBus.unreachable``), the answer is None;
  ``notify`` reaches every responder and waits for no answer.

Nothing is delivered by itself: the test decides. :meth:`FakeBus.pending`
lists the messages waiting, :meth:`FakeBus.deliver` hands one to a replica
of its consumer (decoded as the consumer's model) and returns a
:class:`Delivery` with the handler's :class:`~mcsched.bus.Outcome`: an ack
removes the message, a retry or an exception leaves it for redelivery, an
unreadable message is terminated. :meth:`FakeBus.drop` loses one,
:meth:`FakeBus.duplicate` queues it again (a redelivery), delivering in
another order reorders them, :meth:`FakeBus.deliver_together` hands messages
to handlers at once (racing replicas) and :meth:`FakeBus.deliver_all` runs
the queue dry. Not modelled: ack timeouts and nak delays (a redelivery
happens when the test asks), headers and trace context.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..bus import Bus, Handler, Outcome, duplicate_window, publish_all
from ..models import Message, SchemaError, decode
from ..natsauth import STREAM_KINDS

M = TypeVar("M", bound=Message)
R = TypeVar("R", bound=Message)

def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, ``>`` the rest (one token at least)."""
    wanted, tokens = pattern.split("."), subject.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > index
        if index >= len(tokens) or (token != "*" and token != tokens[index]):
            return False
    return len(tokens) == len(wanted)


@dataclass(eq=False)
class Envelope:
    """A message in a stream, as stored (``data`` is its wire encoding)."""

    seq: int
    stream: str
    subject: str
    msg_id: str | None
    data: bytes
    publisher: str
    message: Message  # as published, for the test to read
    delivered: int = 0  # how many times a handler got this copy

    @property
    def kind(self) -> str:
        return self.subject.split(".")[1]

    def __repr__(self) -> str:
        return f"<{type(self.message).__name__} #{self.seq} {self.msg_id} on {self.subject}>"


@dataclass(frozen=True)
class Delivery:
    """One handler call: the message, which consumer replica handled it, and how it ended."""

    envelope: Envelope
    durable: str
    replica: int
    outcome: Outcome | None
    error: BaseException | None = None
    terminated: bool = False  # unreadable: dropped without handling

    @property
    def acked(self) -> bool:
        return self.outcome is not None and self.outcome.ack

    @property
    def retried(self) -> bool:
        """Left for redelivery (a retry_later outcome or an exception)."""
        return not self.acked and not self.terminated


@dataclass(frozen=True)
class RequestRecord:
    client: str
    subject: str
    request: Message
    reply: Message | None


@dataclass
class _Consumer:
    kind: str
    durable: str
    subject: str
    model: type[Message]
    handler: Callable[[Any], Awaitable[Outcome]]
    client: str


@dataclass
class _Responder:
    subject: str
    queue: str
    model: type[Message]
    handler: Callable[[Any], Awaitable[Message]]
    client: str


@dataclass
class _Listener:
    subject: str
    model: type[Message]
    handler: Callable[[Any], Awaitable[None]]
    client: str


@dataclass
class FakeBroker:
    """The NATS server: streams, consumers, responders, and what went through them."""

    duplicate_window: float | None = None  # None: the real streams' (mcsched.bus.duplicate_window)
    clock: Callable[[], float] = time.monotonic
    pending: list[Envelope] = field(default_factory=list)
    published: list[Envelope] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (subject, msg id) dropped
    deliveries: list[Delivery] = field(default_factory=list)
    requests: list[RequestRecord] = field(default_factory=list)
    consumers: dict[str, list[_Consumer]] = field(default_factory=dict)  # durable -> replicas
    responders: list[_Responder] = field(default_factory=list)
    listeners: list[_Listener] = field(default_factory=list)
    ids: dict[tuple[str, str], tuple[float, int]] = field(default_factory=dict)  # (stream, msg id) -> when, seq
    sequences: dict[str, Iterator[int]] = field(default_factory=dict)  # stream -> its next numbers, as in NATS
    turns: dict[str, int] = field(default_factory=dict)  # round-robin position per durable or subject

    def forget_message_ids(self) -> None:
        """As if the duplicate window had passed for every message id."""
        self.ids.clear()

    def store(self, kind: str, stream: str, subject: str, message: Message, msg_id: str | None,
              publisher: str) -> int:
        """Keep a published message, unless its id was seen in the stream within the duplicate window;
        its sequence (the first copy's for a duplicate)."""
        now = self.clock()
        if msg_id:
            seen = self.ids.get((stream, msg_id))
            window = duplicate_window(kind) if self.duplicate_window is None else self.duplicate_window
            if seen is not None and now - seen[0] < window:
                self.duplicates.append((subject, msg_id))
                return seen[1]
        seq = next(self.sequences.setdefault(stream, itertools.count(1)))
        if msg_id:
            self.ids[(stream, msg_id)] = (now, seq)
        envelope = Envelope(seq, stream, subject, msg_id, message.encode(), publisher, message)
        self.pending.append(envelope)
        self.published.append(envelope)
        return seq

    def turn(self, key: str, among: int) -> int:
        """The next of ``among`` members, in turn."""
        turn = self.turns.get(key, 0)
        self.turns[key] = turn + 1
        return turn % among

    def consumer_of(self, subject: str) -> list[_Consumer]:
        for replicas in self.consumers.values():
            if replicas and subject_matches(replicas[0].subject, subject):
                return replicas
        return []


class FakeBus(Bus):
    """One process's connection to a :class:`FakeBroker`, with the delivery controls of the test."""

    def __init__(self, broker: FakeBroker | None = None, *, prefix: str = "mcs", client_name: str = "test") -> None:
        super().__init__("nats://fake", prefix, client_name)
        self.broker = broker if broker is not None else FakeBroker()
        self.unreachable: set[str] = set()  # subjects this process's requests get no answer on
        self.closed = False

    # -- what the services call --------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return not self.closed

    async def connect(self, attempts: int | None = None) -> None:
        self.closed = False

    async def ensure_streams(self, kinds: tuple[str, ...] = ()) -> None:
        return None

    async def close(self, drain_seconds: float = 5.0) -> None:
        self.closed = True
        broker = self.broker
        for durable, replicas in list(broker.consumers.items()):
            broker.consumers[durable] = [c for c in replicas if c.client != self.client_name]
        broker.responders = [r for r in broker.responders if r.client != self.client_name]
        broker.listeners = [li for li in broker.listeners if li.client != self.client_name]

    async def publish(self, subject: str, message: Message, msg_id: str) -> int:
        await asyncio.sleep(0)  # as over a network
        kind = subject.split(".")[1] if subject.startswith(f"{self.prefix}.") and subject.count(".") >= 2 else ""
        if kind not in STREAM_KINDS:
            raise RuntimeError(f"nats: no response from stream: no stream holds {subject}")
        return self.broker.store(kind, self.stream(kind), subject, message, msg_id, self.client_name)

    async def publish_many(self, items: Sequence[tuple[str, Message, str]]) -> list[int | None]:
        return await publish_all(self.publish, items)

    async def notify(self, subject: str, message: Message) -> None:
        if self.closed:
            raise RuntimeError("nats: connection closed")
        for listener in [li for li in self.broker.listeners if subject_matches(li.subject, subject)]:
            try:
                await listener.handler(decode(message.encode(), listener.model))
            except Exception:
                pass
        for responder in [r for r in self.broker.responders if subject_matches(r.subject, subject)]:
            try:
                await responder.handler(decode(message.encode(), responder.model))
            except Exception:  # nobody waits for an answer
                pass

    async def request(self, subject: str, message: Message, reply: type[R], timeout: float) -> R | None:
        answer: R | None = None
        responders = [r for r in self.broker.responders if subject_matches(r.subject, subject)]
        if subject not in self.unreachable and responders:
            responder = responders[self.broker.turn(subject, len(responders))]
            try:
                answered = await asyncio.wait_for(responder.handler(decode(message.encode(), responder.model)),
                                                  timeout)
                answer = decode(answered.encode(), reply)
            except Exception:  # the responder failed or was too slow: nobody answers in time
                answer = None
        self.broker.requests.append(RequestRecord(self.client_name, subject, message, answer))
        return answer

    async def respond(self, subject: str, queue: str, model: type[M],
                      handler: Callable[[M], Awaitable[Message]]) -> None:
        self.broker.responders.append(_Responder(subject, queue, model, handler, self.client_name))

    async def listen(self, subject: str, model: type[M], handler: Callable[[M], Awaitable[None]]) -> None:
        self.broker.listeners.append(_Listener(subject, model, handler, self.client_name))

    def consume(self, kind: str, durable: str, subject: str, model: type[M], handler: Handler[M],
                *, in_flight: int = 64, ack_wait: float = 30.0) -> None:
        if kind not in STREAM_KINDS:
            raise ValueError(f"no stream for {kind}")
        self.broker.consumers.setdefault(durable, []).append(
            _Consumer(kind, durable, subject, model, handler, self.client_name))

    async def undelivered(self, kind: str, durable: str) -> range | None:
        """As JetStream says it: the ``num_pending`` sequences after the highest one handed to ``durable``
        (messages never delivered; None with no such consumer)."""
        if durable not in self.broker.consumers:
            return None
        last = max((d.envelope.seq for d in self.broker.deliveries if d.durable == durable), default=0)
        never = sum(1 for e in self._waiting_for(durable) if e.delivered == 0)
        return range(last + 1, last + 1 + never)

    # -- what the test does ----------------------------------------------------------------------------

    def _waiting_for(self, durable: str) -> list[Envelope]:
        """The messages in the broker that this durable consumer is to take."""
        return [e for e in self.broker.pending if durable in [c.durable for c in self.broker.consumer_of(e.subject)]]

    def busy(self, durable: str) -> bool:
        """Whether messages for this durable consumer wait (on the fake broker, at once)."""
        return bool(self._waiting_for(durable))

    def pending(self, kind: str | None = None, *, cluster: str | None = None) -> list[Envelope]:
        """Messages waiting for their consumer, oldest first (optionally of one kind, for one cluster)."""
        return [e for e in self.broker.pending if (kind is None or e.kind == kind)
                and (cluster is None or e.subject.split(".")[-1] == cluster)]

    def messages(self, kind: str | None = None) -> list[Message]:
        """Every message stored so far (delivered or not; duplicates dropped by id not included)."""
        return [e.message for e in self.broker.published if kind is None or e.kind == kind]

    def drop(self, envelope: Envelope) -> None:
        """The message is lost (e.g. a stream wiped)."""
        self.broker.pending.remove(envelope)

    def duplicate(self, envelope: Envelope) -> Envelope:
        """The same message once more, after the others (a redelivery of an unacked or re-sent message)."""
        copy = Envelope(envelope.seq, envelope.stream, envelope.subject, envelope.msg_id, envelope.data,
                        envelope.publisher, envelope.message, envelope.delivered)
        self.broker.pending.append(copy)
        return copy

    async def deliver(self, envelope: Envelope | None = None, *, replica: int | None = None) -> Delivery:
        """Hand ``envelope`` (default: the oldest that has a consumer) to one replica of its consumer."""
        broker = self.broker
        if envelope is None:
            envelope = next(e for e in broker.pending if broker.consumer_of(e.subject))
        if envelope not in broker.pending:
            raise AssertionError(f"{envelope} is not pending")
        replicas = broker.consumer_of(envelope.subject)
        if not replicas:
            raise AssertionError(f"nobody consumes {envelope.subject}")
        if replica is None:
            replica = broker.turn(replicas[0].durable, len(replicas))
        consumer = replicas[replica]
        envelope.delivered += 1
        try:
            message = decode(envelope.data, consumer.model)
        except (SchemaError, ValueError) as exc:
            self._settle(envelope)
            return self._record(Delivery(envelope, consumer.durable, replica, None, exc, terminated=True))
        try:
            outcome = await consumer.handler(message)
        except Exception as exc:
            return self._record(Delivery(envelope, consumer.durable, replica, None, exc))
        if outcome.ack:
            self._settle(envelope)
        return self._record(Delivery(envelope, consumer.durable, replica, outcome))

    async def deliver_together(self, *handed: tuple[Envelope, int | None]) -> list[Delivery]:
        """Hand messages to replicas at the same time, e.g. one message to two replicas (an ack that came late)."""
        return list(await asyncio.gather(*(self.deliver(e, replica=r) for e, r in handed)))

    async def deliver_all(self, kind: str | None = None, *, between: Callable[[], Awaitable[None]] | None = None,
                          limit: int = 200) -> list[Delivery]:
        """Deliver pending messages, oldest first, until none is left but those retried since the last ack.

        ``between`` runs before every delivery (e.g. letting caches catch up).
        """
        done: list[Delivery] = []
        retried: set[int] = set()
        for _ in range(limit):
            if between is not None:
                await between()
            ready = [e for e in self.pending(kind) if id(e) not in retried and self.broker.consumer_of(e.subject)]
            if not ready:
                return done
            delivery = await self.deliver(ready[0])
            done.append(delivery)
            if delivery.retried:
                retried.add(id(ready[0]))
            else:
                retried.clear()
        raise AssertionError(f"messages kept coming after {limit} deliveries: {self.pending(kind)}")

    def _settle(self, envelope: Envelope) -> None:
        if envelope in self.broker.pending:  # acking a message acked already is a no-op
            self.broker.pending.remove(envelope)

    def _record(self, delivery: Delivery) -> Delivery:
        self.broker.deliveries.append(delivery)
        return delivery
