"""The message bus: NATS core for quick questions, JetStream for work that must not be lost.

Subjects are ``<prefix>.<kind>.<cluster>`` (kinds: ``elect``, ``candidate``,
``delegate``, ``status``). Durable work goes through one work-queue stream
per kind with de-duplication by message id; each stage pulls from a durable
consumer that its replicas share. Handlers return an :class:`Outcome`; a
message is acked only when the handler says its effect is stored, and an
exception means "try again later" (negative ack with back-off). Trace
context travels in message headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError, OutboundBufferLimitError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import BadRequestError, NoStreamResponseError, NotFoundError, ServiceUnavailableError
from opentelemetry import context as otel_context
from opentelemetry import propagate

from .models import Message, SchemaError, decode
from .natsauth import DEAD_LETTER_KIND, STREAM_KINDS, inbox_prefix, stream_name
from .natsauth import subject as subject_name
from .telemetry import CONSUMER_LAG, MESSAGES_DEAD, MESSAGES_FAILED, MESSAGES_HANDLED, subject_kind
from .workqueue import cancel_all

log = logging.getLogger(__name__)

# Messages that cannot be read or whose handling keeps failing end in the dead-letter stream
# (``<prefix>.dead.<kind>``), kept for inspection (``nats stream view <PREFIX>_DEAD``)
# instead of being redelivered forever.
DEAD_LETTER_MAX_AGE_SECONDS = 7 * 24 * 3600.0
DEAD_LETTER_MAX_MESSAGES = 100_000
# A message to dead-letter while JetStream does not answer comes back after this long to try again.
DEAD_LETTER_RETRY_SECONDS = 30.0
# A message whose handler raised this many times is dead-lettered (a resync re-derives the work
# from the clusters, so a message lost this way is re-published if its work is still due).
MAX_FAILED_DELIVERIES = 10
# How long a publish is tried again while JetStream does not answer (a NATS cluster electing a leader).
# A follower waits 4-9 s (nats-server's raft election timeout) before it campaigns for a lost leader,
# and a split vote takes a second round: 30 s covers two rounds and the answer.
PUBLISH_RETRY_SECONDS = 30.0
# A server that died without closing its connections (a host lost, a network cut) is noticed when
# this many pings in a row go unanswered, one every so many seconds (nats-py's default: 2 min):
# then the client moves to another server of the cluster.
PING_INTERVAL_SECONDS = 5
MAX_OUTSTANDING_PINGS = 3
# How many publishes of one batch (a resync's) wait for their acks at a time.
PUBLISHES_IN_FLIGHT = 256
# What JetStream answers (or fails to) while it has no leader for a stream or for its API, and what
# the client says while it reconnects to another server with its buffer for the meantime full.
JETSTREAM_UNANSWERED = (NatsTimeoutError, NoRespondersError, NoStreamResponseError, ServiceUnavailableError,
                        OutboundBufferLimitError)
# How long one pull waits. nats-py holds the messages of a lingering pull until it has
# its whole batch or this time is up, so it bounds how long a message can sit unhandled.
FETCH_WAIT_SECONDS = 1.0
# An idle consumer (its last pull found nothing) pulls one message at a time, which nats-py
# hands over the moment it comes, so it may wait longer: few wake-ups while nothing flows.
IDLE_FETCH_WAIT_SECONDS = 5.0
# Workers that publish from a service's work queue: each awaits its JetStream ack, so this
# many acks are awaited together (on a loaded machine an ack takes tens of milliseconds).
PUBLISHERS = 32
# How often a consumer is asked whether it still exists (and how far behind it is).
CONSUMER_CHECK_SECONDS = 10.0
# How long a question about another process's consumer (how far it got) may take.
CONSUMER_INFO_SECONDS = 2.0
# How long a stream remembers a message id, to drop a second copy published within it. An elect
# message's id (its proxy's uid and placement round) names one piece of work for good, so the elect
# stream remembers longer: a watcher composed anew (its shares moved, the targets changed) publishes
# the backlog it finds again under the same ids, and those copies are dropped unless the backlog is
# older than this.
DUPLICATE_WINDOW_SECONDS = 120.0
ELECT_DUPLICATE_WINDOW_SECONDS = 900.0
# The settings of a durable consumer that this code chooses and the server lets change on a
# consumer that exists (made by an earlier version of the services, say).
CONSUMER_SETTINGS_KEPT_UP = ("ack_wait", "max_deliver", "max_ack_pending", "filter_subject")
M = TypeVar("M", bound=Message)
R = TypeVar("R", bound=Message)


@dataclass(frozen=True)
class Outcome:
    """What a handler tells the consumer to do with the message."""

    ack: bool
    delay: float = 0.0
    note: str = ""


ACK = Outcome(True)


def retry_later(delay: float, note: str = "") -> Outcome:
    return Outcome(False, delay, note)


Handler = Callable[[M], Awaitable[Outcome]]


@dataclass(frozen=True)
class Credentials:
    """Who a connection says it is: a NATS user and password, and TLS when configured."""

    user: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None


class Bus:
    def __init__(self, url: str, prefix: str, client_name: str,
                 max_failed_deliveries: int = MAX_FAILED_DELIVERIES,
                 credentials: Credentials | None = None, stream_replicas: int = 1) -> None:
        self.url, self.prefix, self.client_name = url, prefix, client_name
        # a cluster's seed URLs, comma-separated: the client connects to any and fails over to the others
        self.servers = [u.strip() for u in url.split(",") if u.strip()]
        self.stream_replicas = stream_replicas
        self.max_failed_deliveries = max_failed_deliveries
        self.credentials = credentials or Credentials()
        self.nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._consumer_problems: dict[str, str] = {}  # durable -> why it does not deliver now
        self._waiting: dict[str, int] = {}  # durable -> messages waiting for it, as of its last check
        self._handling: dict[str, set[asyncio.Task[None]]] = {}  # durable -> its messages being handled here
        self._ensuring: dict[str, asyncio.Future[None]] = {}  # stream kind -> its re-creation in flight
        self._grace = 0.0  # at close: how long handlers in flight may take to finish (set by close)

    # -- naming ------------------------------------------------------------------

    def subject(self, kind: str, cluster: str) -> str:
        return subject_name(self.prefix, kind, cluster)

    def stream(self, kind: str) -> str:
        return stream_name(self.prefix, kind)

    # -- connection --------------------------------------------------------------

    async def connect(self, attempts: int | None = None) -> None:
        """Connect, retrying with back-off while NATS is unreachable (forever by default)."""
        delay, attempt = 0.5, 0
        while True:
            attempt += 1
            try:
                self.nc = await nats.connect(
                    self.servers, name=self.client_name, max_reconnect_attempts=-1, reconnect_time_wait=1,
                    connect_timeout=3, allow_reconnect=True,
                    ping_interval=PING_INTERVAL_SECONDS, max_outstanding_pings=MAX_OUTSTANDING_PINGS,
                    disconnected_cb=self._on_disconnect, reconnected_cb=self._on_reconnect,
                    error_cb=self._on_error, **self._identity(),
                )
                log.info("connected to NATS at %s as %s", self.url, self.credentials.user or "anonymous")
                return
            except (OSError, NoRespondersError, NatsTimeoutError, nats.errors.NoServersError) as exc:
                if attempts is not None and attempt >= attempts:
                    raise
                log.warning("NATS unreachable at %s (%s); retrying in %.1fs", self.url,
                            exc.__class__.__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)

    def _identity(self) -> dict[str, Any]:
        identity: dict[str, Any] = {}
        if self.credentials.user:
            identity.update(user=self.credentials.user, password=self.credentials.password or "",
                            inbox_prefix=inbox_prefix(self.credentials.user))
        if self.credentials.tls is not None:
            identity["tls"] = self.credentials.tls
        return identity

    async def _on_disconnect(self) -> None:
        log.warning("disconnected from NATS at %s; reconnecting", self.url)

    async def _on_reconnect(self) -> None:
        log.info("reconnected to NATS at %s", self.url)

    async def _on_error(self, exc: Exception) -> None:
        if "authorization violation" in str(exc).lower():  # the client retries with the same credentials
            log.error("NATS at %s refused the credentials of user %s: check nats_auth (docs/security.md); "
                      "retrying", self.url, self.credentials.user or "(anonymous)")
        elif self.nc is None or not self.nc.is_connected:  # the client keeps retrying by itself
            log.warning("NATS unreachable at %s (%s); retrying", self.url, describe(exc))
        else:
            log.warning("NATS: %s", exc)

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    def _client(self) -> NATS:
        if self.nc is None:
            raise RuntimeError("bus not connected")
        return self.nc

    def _jetstream(self) -> JetStreamContext:
        if self._js is None:
            self._js = self._client().jetstream()
        return self._js

    async def ensure_streams(self, kinds: tuple[str, ...] = (*STREAM_KINDS, DEAD_LETTER_KIND)) -> None:
        """Create (or update) these streams (default: all); safe to call from every replica.

        A stage ensures only the streams it uses, which are all its NATS user may create.
        """
        js = self._jetstream()
        for kind in kinds:
            if kind == DEAD_LETTER_KIND:
                config = StreamConfig(
                    name=self.stream(kind), subjects=[f"{self.prefix}.{kind}.>"],
                    retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
                    max_age=DEAD_LETTER_MAX_AGE_SECONDS, max_msgs=DEAD_LETTER_MAX_MESSAGES,
                    num_replicas=self.stream_replicas)
            else:
                config = StreamConfig(
                    name=self.stream(kind), subjects=[f"{self.prefix}.{kind}.>"],
                    retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
                    duplicate_window=duplicate_window(kind), num_replicas=self.stream_replicas)
            await self._add_or_update(js, config)

    async def ensure_streams_patiently(self, kinds: tuple[str, ...]) -> None:
        """:meth:`ensure_streams`, tried again with back-off for as long as JetStream does not answer
        (a NATS cluster electing its meta leader, JetStream starting); other errors are raised."""
        delay = 0.5
        while True:
            try:
                await self.ensure_streams(kinds)
                return
            except JETSTREAM_UNANSWERED as exc:
                log.warning("JetStream at %s does not answer (%s) while creating streams; retrying in %.1fs",
                            self.url, describe(exc), delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10)

    @staticmethod
    async def _add_or_update(js: JetStreamContext, config: StreamConfig) -> None:
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.update_stream(config)

    async def close(self, drain_seconds: float = 5.0) -> None:
        """Stop consuming and close. Handlers at work get up to ``drain_seconds`` to finish (and ack);
        the messages of those still at work then are handed back at once (nak), not after ack_wait;
        what is buffered is flushed for up to ``drain_seconds`` too."""
        self._grace = drain_seconds
        await cancel_all(self._tasks)  # (nats-py's fetch waits with wait_for, which can lose a cancellation)
        if self.nc is not None and not self.nc.is_closed:
            if not self.nc.is_connected:  # nothing to drain into: do not wait for a reconnect
                await self.nc.close()
                return
            try:
                await asyncio.wait_for(self.nc.drain(), timeout=drain_seconds)
            except Exception as exc:  # NATS went away meanwhile: nothing left to flush
                log.info("closing NATS without draining (%s)", describe(exc))
                await self.nc.close()

    # -- publishing --------------------------------------------------------------

    @staticmethod
    def _headers(msg_id: str | None = None) -> dict[str, str]:
        headers: dict[str, str] = {}
        propagate.inject(headers)
        if msg_id:
            headers["Nats-Msg-Id"] = msg_id
        return headers

    async def publish(self, subject: str, message: Message, msg_id: str) -> int:
        """Publish durably; returns once JetStream has stored it (or knew it already), with its sequence
        in the stream (the first copy's, for a message id seen already)."""
        return await self._store(subject, message.encode(), self._headers(msg_id))

    async def _store(self, subject: str, data: bytes, headers: dict[str, str]) -> int:
        """Publish to JetStream; a stream deleted meanwhile is created again, then the message stored.

        While a NATS cluster elects a new leader for the stream (a server lost) the publish is not
        answered: it is tried again for up to ``PUBLISH_RETRY_SECONDS`` (the message id makes a second
        copy of one that was stored after all a no-op) before the error reaches the caller.
        """
        deadline, delay, recreated = time.monotonic() + PUBLISH_RETRY_SECONDS, 0.25, False
        while True:
            error: Exception
            try:
                ack = await self._jetstream().publish(subject, data, headers=headers)
                return int(ack.seq)
            except NoStreamResponseError as exc:
                error = exc
                if not recreated:
                    recreated = True
                    try:
                        await self._stream_again(subject)
                        continue
                    except JETSTREAM_UNANSWERED as again:
                        error = again
            except JETSTREAM_UNANSWERED as exc:
                error = exc
            if time.monotonic() + delay > deadline:
                raise error
            log.info("publish to %s not answered (%s); trying again", subject, describe(error))
            await asyncio.sleep(delay)  # short and flat: the new leader is there within a few seconds

    async def _stream_again(self, subject: str) -> None:
        """Ensure the stream of ``subject``'s kind, once for all the publishes that found none meanwhile
        (a thousand publishes of a resync meeting an election make one request, not a thousand)."""
        kind = subject_kind(subject)
        ensuring = self._ensuring.get(kind)
        if ensuring is None or ensuring.done():
            log.warning("no stream answered for %s (a leader election, or the stream was deleted); "
                        "ensuring %s", subject, self.stream(kind))
            ensuring = self._ensuring[kind] = asyncio.ensure_future(self.ensure_streams((kind,)))
        await asyncio.shield(ensuring)

    async def publish_many(self, items: Sequence[tuple[str, Message, str]]) -> list[int | None]:
        """Publish several messages, up to ``PUBLISHES_IN_FLIGHT`` acks awaited at a time; their
        sequences, in order, and None for each one that could not be stored (logged here)."""
        return await publish_all(self.publish, items)

    async def notify(self, subject: str, message: Message) -> None:
        """Fire and forget over core NATS (for hints whose loss costs only a timeout)."""
        await self._client().publish(subject, message.encode(), headers=self._headers())

    async def request(self, subject: str, message: Message, reply: type[R], timeout: float) -> R | None:
        """Ask one responder; None when nobody answers in time."""
        try:
            answer = await self._client().request(subject, message.encode(), timeout=timeout,
                                                  headers=self._headers())
        except (TimeoutError, NoRespondersError, NatsTimeoutError):
            return None
        return decode(answer.data, reply)

    # -- serving -----------------------------------------------------------------

    async def respond(self, subject: str, queue: str, model: type[M],
                      handler: Callable[[M], Awaitable[Message]]) -> None:
        """Answer requests on ``subject``; replicas in the same ``queue`` share them."""

        async def on_request(msg: Msg) -> None:
            token = otel_context.attach(propagate.extract(msg.headers or {}))
            try:
                answer = await handler(decode(msg.data, model))
                if msg.reply:  # fire-and-forget notifications have nobody to answer
                    await msg.respond(answer.encode())
                self._count(True, subject)
            except Exception:
                self._count(False, subject)
                log.exception("request on %s failed", msg.subject)
            finally:
                otel_context.detach(token)

        await self._client().subscribe(subject, queue=queue, cb=on_request)

    async def listen(self, subject: str, model: type[M], handler: Callable[[M], Awaitable[None]]) -> None:
        """Receive every message on ``subject`` (core NATS, no queue group: every listener gets each)."""

        async def on_message(msg: Msg) -> None:
            try:
                await handler(decode(msg.data, model))
            except Exception:
                log.exception("message on %s could not be handled", msg.subject)

        await self._client().subscribe(subject, cb=on_message)

    def consume(self, kind: str, durable: str, subject: str, model: type[M], handler: Handler[M],
                *, in_flight: int = 64, ack_wait: float = 30.0) -> None:
        """Process a stream's messages on ``subject`` with a durable consumer shared by replicas.

        Up to ``in_flight`` messages are handled at once; a slot freed by one is
        refilled at once, so a slow message never holds up the ones behind it.
        """
        self._tasks.append(asyncio.create_task(
            self._consume(kind, durable, subject, model, handler, in_flight, ack_wait),
            name=f"consume {durable}"))

    async def _consume(self, kind: str, durable: str, subject: str, model: type[M], handler: Handler[M],
                       in_flight: int, ack_wait: float) -> None:
        handling: set[asyncio.Task[None]] = set()
        self._handling[durable] = handling
        try:
            turn = 0
            while True:  # each turn: (re-)create the stream and the consumer, then pull until the consumer is gone
                sub = await self._subscribe(kind, durable, subject, ack_wait, recreate_stream=turn > 0)
                turn += 1
                await self._pull(sub, durable, model, handler, in_flight, ack_wait, handling)
                self._consumer_problems[durable] = f"consumer {durable} on {self.stream(kind)} is missing; re-creating"
                log.warning("consumer %s on %s is gone (deleted, or its stream was); re-creating it", durable,
                            self.stream(kind))
                try:
                    await sub.unsubscribe()
                except Exception:  # its inbox goes with the connection anyway
                    pass
        finally:
            if handling and self._grace > 0:  # closing: work in flight finishes and is acked
                await asyncio.wait(handling, timeout=self._grace)
            for task in handling:  # the rest is handed back (nak) for another process, or the next composition
                task.cancel()
            await asyncio.gather(*handling, return_exceptions=True)

    async def _subscribe(self, kind: str, durable: str, subject: str, ack_wait: float,
                         recreate_stream: bool) -> JetStreamContext.PullSubscription:
        """Ensure the durable consumer exists, and pull from it. The stream is ensured too when it may
        have been deleted (``recreate_stream``: the consumer went missing; or subscribing failed); at
        start the runtime ensures the service's streams beside it, so a first failure finds them."""
        stream = self.stream(kind)
        config = ConsumerConfig(durable_name=durable, ack_wait=ack_wait, max_deliver=-1,
                                max_ack_pending=10_000, deliver_policy=DeliverPolicy.ALL,
                                filter_subject=subject)
        self._consumer_problems.setdefault(durable, f"consumer {durable} on {stream} not subscribed yet")
        while True:
            try:
                js = self._jetstream()
                if recreate_stream:
                    await self.ensure_streams((kind,))
                sub = await js.pull_subscribe(subject, durable=durable, stream=stream, config=config)
                await self._bring_up_to_date(js, sub, stream, config)
                self._consumer_problems.pop(durable, None)
                return sub
            except (TimeoutError, OSError, nats.errors.Error) as exc:  # NATS away, or JetStream refusing
                recreate_stream = True
                self._consumer_problems[durable] = f"cannot subscribe {durable} to {subject}: {describe(exc)}"
                log.warning("cannot subscribe %s to %s (%s); retrying", durable, subject, exc)
                await asyncio.sleep(1)

    @staticmethod
    async def _bring_up_to_date(js: JetStreamContext, sub: JetStreamContext.PullSubscription, stream: str,
                                config: ConsumerConfig) -> None:
        """``pull_subscribe`` only creates a missing consumer: one that exists keeps the settings it was
        made with. Update those that differ from ours; a server that refuses keeps the old ones (said).
        Never raises: the subscription is made, and settings are not worth leaking it for."""
        try:
            current = (await sub.consumer_info()).config
        except (TimeoutError, nats.errors.Error) as exc:  # best effort: asked again at the next subscription
            log.warning("cannot read consumer %s's settings on %s: %s", config.durable_name, stream, describe(exc))
            return
        changed = {name: (getattr(current, name), getattr(config, name)) for name in CONSUMER_SETTINGS_KEPT_UP
                   if getattr(current, name) != getattr(config, name)}
        if not changed:
            return
        described = ", ".join(f"{name} {old} -> {new}" for name, (old, new) in changed.items())
        try:  # by name, as nats-py creates it: the subject a stage may use (mcsched.natsauth)
            await js.add_consumer(stream, dataclasses.replace(config, name=config.durable_name))
            log.info("consumer %s on %s updated: %s", config.durable_name, stream, described)
        except (TimeoutError, nats.errors.Error) as exc:
            log.warning("consumer %s on %s keeps its settings (%s): %s", config.durable_name, stream, described,
                        describe(exc))

    async def _pull(self, sub: JetStreamContext.PullSubscription, durable: str, model: type[M],
                    handler: Handler[M], in_flight: int, ack_wait: float,
                    handling: set[asyncio.Task[None]]) -> None:
        """Fetch and handle messages; returns when the consumer is found gone.

        Whether it still exists is asked every few seconds (with its lag) and
        at once after a fetch failed.
        """
        checked = -math.inf  # never yet (the monotonic clock may be younger than the check's period)
        idle = False  # the last pull found nothing: wait for one message, handed over as it comes
        while True:
            if time.monotonic() - checked > CONSUMER_CHECK_SECONDS:
                checked = time.monotonic()
                try:
                    info = await sub.consumer_info()
                    CONSUMER_LAG.labels(durable).set(info.num_pending or 0)
                    self._waiting[durable] = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
                    self._consumer_problems.pop(durable, None)
                except NotFoundError:
                    return
                except Exception as exc:  # NATS away: the client reconnects by itself
                    self._consumer_problems[durable] = f"consumer {durable} unreachable: {describe(exc)}"
            if len(handling) >= in_flight:
                await asyncio.wait(handling, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                messages = await sub.fetch(1, timeout=IDLE_FETCH_WAIT_SECONDS) if idle else \
                    await sub.fetch(in_flight - len(handling), timeout=FETCH_WAIT_SECONDS)
            except (TimeoutError, NatsTimeoutError):
                idle = True
                continue
            except Exception as exc:  # connection trouble, or the consumer is gone: asked at once
                log.warning("fetch on %s failed (%s); retrying", durable, exc)
                self._consumer_problems[durable] = f"fetching from consumer {durable} fails: {describe(exc)}"
                checked = -math.inf
                await asyncio.sleep(1)
                continue
            idle = not messages
            for msg in messages:
                task = asyncio.create_task(self._handle(msg, model, handler, ack_wait))
                handling.add(task)
                task.add_done_callback(handling.discard)

    async def undelivered(self, kind: str, durable: str) -> range | None:
        """The stream sequences of the messages the durable consumer ``durable`` (any process's) has not
        been handed yet: a message published with one of them still waits in the stream. None when
        JetStream cannot say (no such consumer yet, NATS away, not permitted).

        (Every message of a stream matches its one consumer's filter, so those waiting are the
        ``num_pending`` right after the last one delivered.)
        """
        try:
            info = await self._jetstream().consumer_info(self.stream(kind), durable, timeout=CONSUMER_INFO_SECONDS)
        except Exception as exc:
            log.debug("no consumer info for %s: %s", durable, describe(exc))
            return None
        if info.delivered is None or info.delivered.stream_seq is None:
            return None
        last = int(info.delivered.stream_seq)
        return range(last + 1, last + 1 + int(info.num_pending or 0))

    def busy(self, durable: str) -> bool:
        """Whether messages of this process's durable consumer wait or are being handled (the waiting
        ones as of its last check, every ``CONSUMER_CHECK_SECONDS``)."""
        return bool(self._waiting.get(durable)) or bool(self._handling.get(durable))

    def problems(self) -> list[str]:
        """What keeps this bus from working: no connection, a consumer missing or failing (for readiness)."""
        problems = [] if self.connected else [f"NATS at {self.url} not connected"]
        return problems + sorted(self._consumer_problems.values())

    @staticmethod
    async def _keep_alive(msg: Msg, every: float) -> None:
        """Tell JetStream the message is still being worked on, so it is not delivered to another process."""
        while True:
            await asyncio.sleep(every)
            try:
                await msg.in_progress()
            except Exception:  # NATS away: the message may be redelivered, and handlers are idempotent
                return

    async def _handle(self, msg: Msg, model: type[M], handler: Handler[M], ack_wait: float = 30.0) -> None:
        token = otel_context.attach(propagate.extract(msg.headers or {}))
        try:
            try:
                message = decode(msg.data, model)
            except (SchemaError, ValueError) as exc:
                self._count(False, msg.subject)
                await self._dead_letter(msg, "unreadable", str(exc))
                return
            keep_alive = asyncio.create_task(self._keep_alive(msg, ack_wait / 3))
            try:
                outcome = await handler(message)
            except asyncio.CancelledError:  # the bus closes: redelivered at once rather than after ack_wait
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(msg.nak()), 1.0)
                raise
            except Exception as exc:
                deliveries = msg.metadata.num_delivered if msg.metadata else 1
                self._count(False, msg.subject)
                if deliveries >= self.max_failed_deliveries:
                    await self._dead_letter(msg, "failing",
                                            f"{deliveries} failed deliveries, the last: {describe(exc)}")
                    return
                delay = min(0.5 * 2 ** min(deliveries, 6), 30)
                log.warning("handling %s on %s failed (attempt %d, retry in %.1fs): %s",
                            type(message).__name__, msg.subject, deliveries, delay, exc,
                            exc_info=not _self_explaining(exc))
                await msg.nak(delay=delay)
                return
            finally:
                keep_alive.cancel()
            self._count(True, msg.subject)
            if outcome.ack:
                await msg.ack()
            else:
                await msg.nak(delay=outcome.delay)
        except Exception as exc:  # acking itself failed (NATS gone): redelivery will follow
            log.warning("could not settle message on %s: %s", msg.subject, exc)
        finally:
            otel_context.detach(token)

    async def _dead_letter(self, msg: Msg, reason: str, detail: str) -> None:
        """Move a message that cannot be handled to the dead-letter stream, then end its delivery.

        While JetStream does not answer (an election), the message is handed back to be dead-lettered
        on a later delivery rather than ended without its copy; any other failure to store the copy
        still ends it, as a poison message must not loop forever. The copy's id (its stream sequence)
        makes a second process's copy of the same delivery a no-op.
        """
        kind = subject_kind(msg.subject)
        log.error("dead-lettering a %s message on %s (%s): %s", kind, msg.subject, reason, detail)
        headers = {"Mcs-Subject": msg.subject, "Mcs-Reason": reason, "Mcs-Detail": detail[:1000]}
        if msg.metadata is not None and msg.metadata.sequence is not None:
            headers["Nats-Msg-Id"] = f"dead:{msg.metadata.stream}:{msg.metadata.sequence.stream}"
        try:
            await self._store(self.subject(DEAD_LETTER_KIND, kind), msg.data, headers)
        except JETSTREAM_UNANSWERED as exc:
            log.warning("could not store the dead-lettered message from %s (%s); it comes back in %.0fs to be "
                        "dead-lettered then", msg.subject, describe(exc), DEAD_LETTER_RETRY_SECONDS)
            await msg.nak(delay=DEAD_LETTER_RETRY_SECONDS)
            return
        except Exception as exc:
            log.warning("could not store the dead-lettered message from %s: %s", msg.subject, describe(exc))
        MESSAGES_DEAD.labels(kind, reason).inc()
        await msg.term()

    @staticmethod
    def _count(ok: bool, subject: str) -> None:
        (MESSAGES_HANDLED if ok else MESSAGES_FAILED).labels(subject_kind(subject)).inc()


def duplicate_window(kind: str) -> float:
    """How long the stream of this kind of work drops a message whose id it has seen."""
    return ELECT_DUPLICATE_WINDOW_SECONDS if kind == "elect" else DUPLICATE_WINDOW_SECONDS


def _self_explaining(exc: BaseException) -> bool:
    """Errors whose message says it all (network trouble, an API server's HTTP answer): no traceback."""
    return isinstance(exc, (OSError, asyncio.TimeoutError)) or isinstance(getattr(exc, "status", None), int)


async def publish_all(publish: Callable[[str, Message, str], Awaitable[int]],
                      items: Sequence[tuple[str, Message, str]]) -> list[int | None]:
    """``publish`` each of ``items`` with at most ``PUBLISHES_IN_FLIGHT`` at a time; the sequences in
    order, None where it failed. One failure does not hide which of the others were stored."""
    room = asyncio.Semaphore(PUBLISHES_IN_FLIGHT)

    async def one(subject: str, message: Message, msg_id: str) -> int | None:
        async with room:
            try:
                return await publish(subject, message, msg_id)
            except Exception as exc:
                failures.append(exc)
                return None

    failures: list[Exception] = []
    sequences = list(await asyncio.gather(*(one(s, m, i) for s, m, i in items)))
    if failures:
        log.warning("%d of %d messages not stored (%s); they go again later", len(failures), len(items),
                    describe(failures[0]))
    return sequences


def describe(exc: BaseException) -> str:
    """A one-line description of an exception for log lines and Events."""
    return f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
