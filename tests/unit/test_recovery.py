"""Recovery (issue 11): what a slow handler, a deleted stream or consumer, an unreachable cluster,
an unschedulable pod, a late delegate, a stale status and a big resync must not do.

The bus tests run the real :class:`~mcsched.bus.Bus` on :class:`~mcsched.testing.jetstream.FakeJetStream`
(its pull loop, acks and recovery are what run); the others run the services on
the fakes of ``mcsched.testing``, as ``test_placement_protocol.py`` does.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from nats.errors import OutboundBufferLimitError
from nats.js.api import ConsumerConfig
from nats.js.errors import NoStreamResponseError

from mcsched import pki
from mcsched.admission import WEBHOOK_CONFIGURATION_NAME, WEBHOOK_PATH
from mcsched.bus import ACK, DEAD_LETTER_RETRY_SECONDS, PUBLISH_RETRY_SECONDS, Bus, Outcome
from mcsched.choice import Placement
from mcsched.constants import (
    NAMESPACE_LABEL,
    NAMESPACE_LABEL_VALUE,
    PARENT_CLUSTER_LABEL,
    PARENT_NAME_LABEL,
    PARENT_NAMESPACE_LABEL,
    PARENT_UID_LABEL,
    PLACEMENT_ANNOTATION,
    PROXY_SCHEDULER_NAME,
)
from mcsched.kube import JSON, pod_path
from mcsched.models import DelegateSummary, ElectMessage, PodRef, decode
from mcsched.natsauth import DEAD_LETTER_KIND
from mcsched.podspec import delegate_name, mirror_patch, mirrored_status, status_differs
from mcsched.settings import WebhookSettings
from mcsched.testing import (
    FakeBus,
    FakeCluster,
    FakeJetStream,
    FakeRuntime,
    connect_bus,
    fake_settings,
    merge_patch,
    settle,
)
from mcsched.workqueue import WorkQueue
from services.candidate_scheduler import __main__ as candidate_module
from services.feedback.__main__ import DELEGATE_GRACE_SECONDS, RESYNC_CONCURRENCY, Feedback
from services.feedback.__main__ import compose as feedback
from services.watcher import __main__ as watcher_module
from services.watcher.__main__ import compose as watcher
from tests.unit.test_placement_protocol import NS, SOURCE, TARGETS, World, admitted, node, ref, user_pod


def elect(uid: str) -> ElectMessage:
    return ElectMessage(proxy=PodRef(cluster="c1", namespace="ns", name=uid, uid=uid))


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


@pytest.fixture
async def jetstream() -> AsyncIterator[tuple[FakeJetStream, list[Bus]]]:
    js = FakeJetStream()
    buses: list[Bus] = []
    yield js, buses
    for bus in buses:
        await bus.close()


async def started(js: FakeJetStream, buses: list[Bus], name: str) -> Bus:
    bus = connect_bus(Bus("nats://fake", "mcs", name), js)
    buses.append(bus)
    await bus.ensure_streams(("elect",))
    return bus


# -- a slow handler ----------------------------------------------------------------------------------


async def test_a_handler_slower_than_ack_wait_keeps_its_message_from_other_processes(
        jetstream: tuple[FakeJetStream, list[Bus]]) -> None:
    js, buses = jetstream
    first, second = await started(js, buses, "p1"), await started(js, buses, "p2")
    calls: list[str] = []

    def slow(process: str) -> Callable[[ElectMessage], Awaitable[Outcome]]:
        async def handle(message: ElectMessage) -> Outcome:
            calls.append(process)
            await asyncio.sleep(1.0)  # more than three times ack_wait
            return ACK
        return handle

    await first.publish(first.subject("elect", "c1"), elect("u1"), "elect:u1")
    first.consume("elect", "proxy-scheduler", "mcs.elect.>", ElectMessage, slow("p1"), ack_wait=0.3)
    await until(lambda: calls == ["p1"])
    second.consume("elect", "proxy-scheduler", "mcs.elect.>", ElectMessage, slow("p2"), ack_wait=0.3)
    await until(lambda: not js.messages["MCS_ELECT"])
    await asyncio.sleep(0.2)
    assert calls == ["p1"], "handed to another process while its handler was still at work"


# -- a stream or consumer deleted at runtime -------------------------------------------------------------


def collecting(into: list[str]) -> Callable[[ElectMessage], Awaitable[Outcome]]:
    async def handle(message: ElectMessage) -> Outcome:
        into.append(message.proxy.uid)
        return ACK
    return handle


async def consuming_after_one(js: FakeJetStream, buses: list[Bus]) -> tuple[Bus, list[str]]:
    """A proxy-scheduler's bus consuming the elect stream, once it has handled one message ("before")."""
    bus = await started(js, buses, "p1")
    received: list[str] = []
    bus.consume("elect", "proxy-scheduler", "mcs.elect.>", ElectMessage, collecting(received))
    await bus.publish(bus.subject("elect", "c1"), elect("before"), "elect:before")
    await until(lambda: received == ["before"])
    return bus, received


async def test_a_consumer_deleted_at_runtime_is_created_again_and_readiness_says_so_meanwhile(
        jetstream: tuple[FakeJetStream, list[Bus]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mcsched.bus.CONSUMER_CHECK_SECONDS", 0.1, raising=False)
    js, buses = jetstream
    bus, received = await consuming_after_one(js, buses)
    assert bus.problems() == []

    js.unavailable = True  # the consumer cannot be created again yet
    js.delete_consumer("MCS_ELECT", "proxy-scheduler")
    await until(lambda: any("proxy-scheduler" in p for p in bus.problems()))
    js.unavailable = False
    await bus.publish(bus.subject("elect", "c1"), elect("after"), "elect:after")
    await until(lambda: received == ["before", "after"])
    assert ("MCS_ELECT", "proxy-scheduler") in js.consumers
    await until(lambda: bus.problems() == [])


async def test_a_consumer_made_by_an_earlier_version_takes_the_settings_of_this_one(
        jetstream: tuple[FakeJetStream, list[Bus]]) -> None:
    js, buses = jetstream
    bus = await started(js, buses, "p1")
    earlier = ConsumerConfig(durable_name="proxy-scheduler", ack_wait=5.0, max_deliver=3, max_ack_pending=100,
                             filter_subject="mcs.elect.>")
    await js.add_consumer("MCS_ELECT", earlier)
    received: list[str] = []
    bus.consume("elect", "proxy-scheduler", "mcs.elect.>", ElectMessage, collecting(received), ack_wait=45.0)
    await bus.publish(bus.subject("elect", "c1"), elect("one"), "elect:one")
    await until(lambda: received == ["one"])
    config = js.consumers[("MCS_ELECT", "proxy-scheduler")][0]
    assert (config.ack_wait, config.max_deliver, config.max_ack_pending) == (45.0, -1, 10_000)


async def test_a_consumer_deleted_on_a_machine_booted_moments_ago_is_asked_for_after_its_failing_fetch(
        jetstream: tuple[FakeJetStream, list[Bus]], monkeypatch: pytest.MonkeyPatch) -> None:
    # The monotonic clock counts from boot: on a young machine it is below the periodic check's period,
    # which "never checked" must not be mistaken for "checked at boot".
    booted = time.monotonic() - 5.0
    monkeypatch.setattr("mcsched.bus.time", SimpleNamespace(monotonic=lambda: time.monotonic() - booted))
    monkeypatch.setattr("mcsched.bus.CONSUMER_CHECK_SECONDS", 3600.0)  # only the checks a failed fetch asks for
    js, buses = jetstream
    bus, received = await consuming_after_one(js, buses)

    js.delete_consumer("MCS_ELECT", "proxy-scheduler")
    await bus.publish(bus.subject("elect", "c1"), elect("after"), "elect:after")
    await until(lambda: received == ["before", "after"])


async def test_a_stream_deleted_at_runtime_is_created_again_by_its_publisher_and_its_consumer(
        jetstream: tuple[FakeJetStream, list[Bus]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mcsched.bus.CONSUMER_CHECK_SECONDS", 0.1, raising=False)
    js, buses = jetstream
    watcher, scheduler = await started(js, buses, "watcher"), await started(js, buses, "proxy-scheduler")
    received: list[str] = []
    scheduler.consume("elect", "proxy-scheduler", "mcs.elect.>", ElectMessage, collecting(received))
    await watcher.publish(watcher.subject("elect", "c1"), elect("before"), "elect:before")
    await until(lambda: received == ["before"])

    js.delete_stream("MCS_ELECT")
    await watcher.publish(watcher.subject("elect", "c1"), elect("after"), "elect:after")  # no stream: made again
    await until(lambda: received == ["before", "after"])
    assert ("MCS_ELECT", "proxy-scheduler") in js.consumers
    await until(lambda: scheduler.problems() == [] and watcher.problems() == [])


class FakeClock:
    """The bus's view of time (its ``time`` and ``asyncio``), moved on by its pauses instead of
    waiting them out; the rest of ``asyncio`` is the real one."""

    def __init__(self) -> None:
        self.now = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


async def on_a_fake_clock(monkeypatch: pytest.MonkeyPatch, name: str,
                          kinds: tuple[str, ...]) -> tuple[FakeClock, FakeJetStream, Bus]:
    """A bus (process ``name``) on a fake JetStream with these streams, both on one fake clock."""
    clock = FakeClock()
    monkeypatch.setattr("mcsched.bus.time", clock)
    monkeypatch.setattr("mcsched.bus.asyncio", clock)
    js = FakeJetStream(clock=clock.monotonic)
    bus = connect_bus(Bus("nats://fake", "mcs", name), js)
    await bus.ensure_streams(kinds)
    return clock, js, bus


@pytest.mark.parametrize("election_seconds", [0.5, 9.0, 18.0])
async def test_a_publish_waits_out_a_stream_leader_election_of_two_rounds(
        election_seconds: float, monkeypatch: pytest.MonkeyPatch) -> None:
    # nats-server's followers wait 4-9 s for a lost leader before they campaign; a split vote takes
    # a second round. The publish must outlast both rather than fail the stage's handler.
    clock, js, bus = await on_a_fake_clock(monkeypatch, "watcher", ("elect",))
    js.leaderless_until = election_seconds
    await bus.publish(bus.subject("elect", "c1"), elect("p"), "elect:p")
    assert [m.subject for m in js.messages["MCS_ELECT"]] == ["mcs.elect.c1"]
    assert election_seconds <= clock.now < election_seconds + 1


async def test_a_publish_made_while_the_client_reconnects_with_a_full_buffer_is_tried_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock, js, bus = await on_a_fake_clock(monkeypatch, "watcher", ("elect",))
    stored = js.publish
    refusals = [OutboundBufferLimitError(), OutboundBufferLimitError()]

    async def buffer_full_at_first(*args: Any, **kwargs: Any) -> Any:
        if refusals:
            raise refusals.pop()
        return await stored(*args, **kwargs)

    monkeypatch.setattr(js, "publish", buffer_full_at_first)
    await bus.publish(bus.subject("elect", "c1"), elect("p"), "elect:p")
    assert len(js.messages["MCS_ELECT"]) == 1 and 0 < clock.now < 1


async def test_the_bus_pings_its_server_often_enough_to_notice_a_silent_death_in_seconds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # nats-py's default (a ping every 2 min, 2 unanswered) kept a client on a dead server for minutes.
    asked: dict[str, Any] = {}

    async def connect(servers: list[str], **options: Any) -> object:
        asked.update(options)
        return object()

    monkeypatch.setattr("mcsched.bus.nats.connect", connect)
    await Bus("nats://a:4222,nats://b:4222", "mcs", "watcher").connect(attempts=1)
    assert asked["ping_interval"] * (asked["max_outstanding_pings"] + 1) <= 20


async def test_a_publish_no_stream_answers_for_fails_once_the_retry_budget_is_spent(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock, js, bus = await on_a_fake_clock(monkeypatch, "watcher", ("elect",))
    js.leaderless_until = float("inf")
    with pytest.raises(NoStreamResponseError):
        await bus.publish(bus.subject("elect", "c1"), elect("p"), "elect:p")
    assert PUBLISH_RETRY_SECONDS - 1 <= clock.now <= PUBLISH_RETRY_SECONDS
    assert js.messages["MCS_ELECT"] == []


async def test_a_message_to_dead_letter_while_no_stream_answers_comes_back_instead_of_ending_without_its_copy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock, js, bus = await on_a_fake_clock(monkeypatch, "proxy-scheduler", ("elect", DEAD_LETTER_KIND))
    await bus.publish(bus.subject("elect", "c1"), elect("poison"), "elect:poison")
    [poison] = js.messages["MCS_ELECT"]

    js.leaderless_until = float("inf")
    await bus._dead_letter(poison, "failing", "10 failed deliveries")  # type: ignore[arg-type]
    assert poison.acks == ["nak"] and js.messages["MCS_ELECT"] == [poison]
    assert poison.due >= clock.now + DEAD_LETTER_RETRY_SECONDS
    assert js.messages[bus.stream(DEAD_LETTER_KIND)] == []

    js.leaderless_until = 0.0  # a leader again: the next delivery is dead-lettered for good
    await bus._dead_letter(poison, "failing", "10 failed deliveries")  # type: ignore[arg-type]
    assert poison.acks == ["nak", "term"] and js.messages["MCS_ELECT"] == []
    [copy] = js.messages[bus.stream(DEAD_LETTER_KIND)]
    assert copy.data == poison.data and copy.headers["Nats-Msg-Id"] == f"dead:MCS_ELECT:{poison.seq}"


async def test_a_resync_s_publishes_meeting_an_election_ask_for_their_stream_once_and_report_each_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _, js, bus = await on_a_fake_clock(monkeypatch, "watcher", ("elect",))
    js.leaderless_until = 5.0
    items = [(bus.subject("elect", "c1"), elect(f"p{i}"), f"elect:p{i}") for i in range(500)]
    sequences = await bus.publish_many(items)
    assert all(isinstance(seq, int) for seq in sequences) and len(js.messages["MCS_ELECT"]) == 500
    assert js.api_calls.count("STREAM.CREATE.MCS_ELECT") == 2  # the first ensure_streams, then one for all

    js.leaderless_until = float("inf")  # an election that outlasts the budget: each message says so
    sequences = await bus.publish_many(items[:3])
    assert sequences == [None, None, None]


async def test_a_key_that_failed_a_thousand_times_is_still_retried_every_30_seconds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # (a target down for hours while its proxies are finalised): 0.2 * 2**1024 s overflowed a float.
    clock = FakeClock()
    monkeypatch.setattr("mcsched.workqueue.asyncio", clock)
    tries: list[float] = []

    async def reconcile(key: str) -> None:
        tries.append(clock.now)
        if len(tries) < 3:
            raise RuntimeError("target unreachable")

    queue = WorkQueue("finalize", reconcile, workers=1)
    queue._failures["proxy"] = 1100
    queue.start()
    try:
        queue.add("proxy")
        await until(lambda: len(tries) == 3)
        assert [b - a for a, b in itertools.pairwise(tries)] == [30, 30]
        await until(lambda: "proxy" not in queue._failures)
    finally:
        await queue.stop()


async def test_the_bus_tells_which_published_messages_still_wait_for_another_process_s_consumer(
        jetstream: tuple[FakeJetStream, list[Bus]]) -> None:
    js, buses = jetstream
    watcher, scheduler = await started(js, buses, "watcher"), await started(js, buses, "proxy-scheduler")
    assert await watcher.undelivered("elect", "proxy-scheduler") is None  # no such consumer yet
    release, received = asyncio.Event(), []

    async def slow(message: ElectMessage) -> Outcome:
        received.append(message.proxy.uid)
        await release.wait()
        return ACK

    scheduler.consume("elect", "proxy-scheduler", "mcs.elect.>", ElectMessage, slow, in_flight=1)
    first = await watcher.publish(watcher.subject("elect", "c1"), elect("a"), "elect:a")
    await until(lambda: received == ["a"])
    second = await watcher.publish(watcher.subject("elect", "c1"), elect("b"), "elect:b")
    waiting = await watcher.undelivered("elect", "proxy-scheduler")
    assert waiting is not None and first not in waiting and second in waiting  # "a" is in hand, "b" waits
    release.set()
    await until(lambda: received == ["a", "b"])
    waiting = await watcher.undelivered("elect", "proxy-scheduler")
    assert waiting is not None and second not in waiting


# -- a pod that fits nowhere -----------------------------------------------------------------------------


@pytest.fixture
async def world() -> AsyncIterator[World]:
    w = World()
    w.settings = fake_settings(sources=(SOURCE,), targets=TARGETS, unschedulable_retry_seconds=0.05)
    await w.start()
    try:
        yield w
        assert w.problems() == []
    finally:
        await w.close()


async def test_a_pod_that_fits_nowhere_holds_no_ack_pending_slot_and_piles_up_no_copies(world: World) -> None:
    proxy = await world.c1.create(pod_path(NS), admitted(user_pod("big", cpu="64")))
    await world.settle()
    [first] = [d for d in await world.run() if d.envelope.kind == "elect"]
    assert first.acked, "a nak keeps the message pending ack for as long as the pod waits"
    assert world.bus.pending("elect") == []

    asked = len(world.broker.requests)  # a resync re-publishes it meanwhile: acked at once, nothing asked
    await world.bus.publish(f"mcs.elect.{SOURCE}", ElectMessage(proxy=ref(proxy), reason="resync"),
                            f"elect:{proxy['metadata']['uid']}:0:1")
    [copy] = world.bus.pending("elect")
    assert (await world.bus.deliver(copy)).acked and len(world.broker.requests) == asked

    await until(lambda: len(world.broker.requests) >= asked + len(TARGETS))  # the proxy-scheduler tries again
    world.clusters["c2"].put("nodes", node("c2-big", cpu="128"))  # room appears
    await world.settle()
    await until(lambda: Placement.of(world.proxy(proxy)).target == "c2")
    assert world.bus.pending("elect") == []
    assert not any(d.retried for d in world.broker.deliveries)


# -- the webhook while a watcher composes itself again -----------------------------------------------------


async def test_the_webhook_listens_on_while_the_watcher_composes_itself_again_and_closes_once_nobody_takes_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A change of members or targets closes one composition and starts the next: the listener of the
    first must serve until the next takes it over (a pod created meanwhile was refused)."""
    monkeypatch.setattr(watcher_module, "_listener", None)
    monkeypatch.setattr(watcher_module, "WEBHOOK_HANDOVER_SECONDS", 0.3)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    webhook = WebhookSettings(enabled=True, register_webhook=False, listen_host="127.0.0.1", port=port)
    client_tls = ssl.create_default_context()
    client_tls.check_hostname, client_tls.verify_mode = False, ssl.CERT_NONE

    async def answers() -> bool:
        try:
            async with aiohttp.ClientSession() as session, \
                    session.get(f"https://127.0.0.1:{port}/healthz", ssl=client_tls) as response:
                return response.status == 200
        except aiohttp.ClientConnectionError:
            return False

    def composition(failover_seconds: int) -> FakeRuntime:
        settings = fake_settings(sources=("c1",), targets=("c2",), webhook=webhook, failover_seconds=failover_seconds)
        return FakeRuntime("watcher", settings, FakeBus(), {"c1": FakeCluster("c1"), "c2": FakeCluster("c2")})

    first = composition(100)
    _, ca = await watcher_module.serve_webhook(first)
    assert await answers()
    await first.close()
    assert await answers()  # between two compositions
    second = composition(200)
    _, again = await watcher_module.serve_webhook(second)
    assert again == ca and await answers()
    assert watcher_module._listener is not None and watcher_module._listener.failover_seconds == 200
    await asyncio.sleep(0.5)  # the first composition's hand-over time is over: taken over, still served
    assert await answers()
    await second.close()  # and nobody takes it over
    await asyncio.sleep(0.5)
    assert not await answers() and watcher_module._listener is None


async def test_a_webhook_with_certificate_files_is_taken_over_too_and_serves_the_renewed_certificate(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The Helm chart and compose give the webhook certificate files: the next composition must take the
    listener over as well (it was closed and opened again), reading the files anew."""
    monkeypatch.setattr(watcher_module, "_listener", None)
    monkeypatch.setattr(watcher_module, "WEBHOOK_HANDOVER_SECONDS", 0.3)
    ca = pki.new_ca("webhook-ca")
    pki.serving(ca, "127.0.0.1").write(tmp_path / "tls.crt", tmp_path / "tls.key")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    webhook = WebhookSettings(enabled=True, register_webhook=False, listen_host="127.0.0.1", port=port,
                              cert_file=tmp_path / "tls.crt", key_file=tmp_path / "tls.key")

    async def served_certificate() -> bytes | None:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_unverified_tls())
        except OSError:
            return None
        certificate = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        return bytes(certificate)

    def composition() -> FakeRuntime:
        settings = fake_settings(sources=("c1",), targets=("c2",), webhook=webhook)
        return FakeRuntime("watcher", settings, FakeBus(), {"c1": FakeCluster("c1"), "c2": FakeCluster("c2")})

    async def healthz(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: watcher\r\n\r\n")
        await writer.drain()
        return await asyncio.wait_for(reader.readuntil(b"ok"), 5)

    first = composition()
    await watcher_module.serve_webhook(first)
    before = await served_certificate()
    assert before is not None
    # An API server keeps its connections to the webhook open between calls.
    kept = await asyncio.open_connection("127.0.0.1", port, ssl=_unverified_tls())
    assert (await healthz(*kept)).startswith(b"HTTP/1.1 200")
    await first.close()
    assert await served_certificate() == before  # between two compositions
    pki.serving(ca, "127.0.0.1").write(tmp_path / "tls.crt", tmp_path / "tls.key")  # renewed meanwhile
    second = composition()
    await watcher_module.serve_webhook(second)
    renewed = await served_certificate()
    assert renewed is not None and renewed != before
    assert (await healthz(*kept)).startswith(b"HTTP/1.1 200"), "the listener was closed and opened again"
    kept[1].close()
    await second.close()
    await asyncio.sleep(0.5)
    assert await served_certificate() is None


async def test_the_webhook_takes_an_admission_review_of_a_pod_as_large_as_the_api_server_takes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watcher_module, "_listener", None)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    webhook = WebhookSettings(enabled=True, register_webhook=False, listen_host="127.0.0.1", port=port)
    rt = FakeRuntime("watcher", fake_settings(sources=("c1",), targets=("c2",), webhook=webhook), FakeBus(),
                     {"c1": FakeCluster("c1"), "c2": FakeCluster("c2")})
    await watcher_module.serve_webhook(rt)
    pod = user_pod("big")
    pod["metadata"]["annotations"]["notes"] = "x" * (2 * 1024 * 1024)  # 2 MiB, under the API server's 3 MiB
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "r1", "kind": {"kind": "Pod"}, "operation": "CREATE", "namespace": NS, "object": pod}}
    try:
        async with aiohttp.ClientSession() as session, session.post(
                f"https://127.0.0.1:{port}{WEBHOOK_PATH}", json=review, ssl=_unverified_tls()) as response:
            assert response.status == 200
            assert (await response.json())["response"]["uid"] == "r1"
    finally:
        await rt.close()
        assert watcher_module._listener is not None
        await watcher_module._listener.close()


def _unverified_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


# -- a cluster unreachable at start-up -------------------------------------------------------------------


async def test_a_source_unreachable_at_start_holds_up_neither_the_other_sources_nor_their_watch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    class NoSocket:  # the webhook is served as configured, without listening on a port
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        async def start(self) -> None:
            return None

    monkeypatch.setattr("aiohttp.web.TCPSite", NoSocket)
    monkeypatch.setattr(watcher_module, "_listener", None)  # no listener of another test's to take over
    monkeypatch.setattr("services.watcher.__main__.REGISTER_RETRY_SECONDS", 0.05, raising=False)
    clusters = {name: FakeCluster(name) for name in ("c0", "c1", "c2")}
    for source in ("c0", "c1"):
        clusters[source].put("namespaces", {"metadata": {"name": NS, "labels": {NAMESPACE_LABEL:
                                                                                NAMESPACE_LABEL_VALUE}}})
    clusters["c1"].set_reachable(False)
    settings = fake_settings(sources=("c0", "c1"), targets=("c2",),
                             webhook=WebhookSettings(enabled=True, register_webhook=True))
    rt = FakeRuntime("watcher", settings, FakeBus(), clusters, run_spawned=True)
    try:
        await asyncio.wait_for(watcher(rt), 2)  # compose returns: nothing waits for c1
        await clusters["c0"].create(pod_path(NS), admitted(user_pod("web-0")))
        await until(lambda: len(rt.fake_bus.pending("elect", cluster="c0")) == 1)  # c0's watch works
        await until(lambda: clusters["c0"].find("mutatingwebhookconfigurations", "", WEBHOOK_CONFIGURATION_NAME)
                    is not None)
        assert clusters["c1"].find("mutatingwebhookconfigurations", "", WEBHOOK_CONFIGURATION_NAME) is None
        clusters["c1"].set_reachable(True)
        await until(lambda: clusters["c1"].find("mutatingwebhookconfigurations", "", WEBHOOK_CONFIGURATION_NAME)
                    is not None)
        assert rt.failures == []
    finally:
        await rt.close()


async def test_a_target_unreachable_at_start_holds_up_no_other_target_s_virtual_node() -> None:
    clusters = {name: FakeCluster(name) for name in ("c1", "c2", "c3")}
    for target in ("c2", "c3"):
        clusters[target].put("nodes", node(f"{target}-n1"))
    clusters["c3"].set_reachable(False)
    settings = fake_settings(sources=("c1",), targets=("c2", "c3"), heartbeat_seconds=0.05)
    rt = FakeRuntime("feedback", settings, FakeBus(), clusters, run_spawned=True)
    try:
        await feedback(rt)

        def ready(target: str) -> str | None:
            virtual = clusters["c1"].find("nodes", "", f"admiralty-{target}")
            conditions = (virtual or {}).get("status", {}).get("conditions") or []
            return next((str(c["status"]) for c in conditions if c["type"] == "Ready"), None)

        await until(lambda: ready("c2") == "True")
        await until(lambda: ready("c3") == "False")  # NotReady, as Kubernetes says of a node it cannot reach
        clusters["c3"].set_reachable(True)
        await until(lambda: ready("c3") == "True")
        virtual = clusters["c1"].find("nodes", "", "admiralty-c3")
        assert virtual is not None and virtual["status"]["allocatable"]["cpu"] == "4000m"
        assert rt.failures == []
    finally:
        await rt.close()


# -- a big resync ----------------------------------------------------------------------------------------


async def test_a_resync_handles_proxies_and_delegates_concurrently_but_bounded() -> None:
    clusters = {name: FakeCluster(name) for name in ("c1", "c2")}
    for cluster in clusters.values():
        cluster.put("namespaces", {"metadata": {"name": NS}})
    for i in range(40):
        clusters["c1"].put("pods", {"metadata": {"name": f"p{i}", "namespace": NS},
                                    "spec": {"schedulerName": PROXY_SCHEDULER_NAME, "containers": []}})
        clusters["c2"].put("pods", {"metadata": {"name": f"d{i}", "namespace": NS, "labels": {
            PARENT_UID_LABEL: f"u{i}", PARENT_CLUSTER_LABEL: "c1", PARENT_NAMESPACE_LABEL: NS,
            PARENT_NAME_LABEL: f"p{i}"}}, "spec": {"containers": []}})
    rt = FakeRuntime("feedback", fake_settings(sources=("c1",), targets=("c2",)), FakeBus(), clusters)
    try:
        await feedback(rt)
        await settle(rt)
        [service] = [c.handler.__self__ for c in rt.fake_bus.broker.consumers["feedback-c1-0"]]
        assert isinstance(service, Feedback)
        at_once, peak, seen, digested = 0, 0, [], []

        async def slow(_source: str, pod: JSON) -> None:
            nonlocal at_once, peak
            at_once += 1
            peak = max(peak, at_once)
            await asyncio.sleep(0.01)  # an API call, a JetStream ack
            seen.append(pod["metadata"]["name"])
            at_once -= 1

        async def check(_source: str, _partition: int, _target: str, delegates: list[DelegateSummary]) -> None:
            digested.extend(entry.name for entry in delegates)

        service._resync_proxy = slow  # type: ignore[method-assign]
        service.check_digest = check  # type: ignore[method-assign]
        await service.resync()
        assert sorted(seen) == sorted(f"p{i}" for i in range(40))
        assert 1 < peak <= RESYNC_CONCURRENCY
        assert sorted(digested) == sorted(f"d{i}" for i in range(40))  # every delegate in its partition's digest
    finally:
        await rt.close()


# -- a late delegate -------------------------------------------------------------------------------------


async def late_delegate(world: World) -> tuple[JSON, str]:
    """A delegate created after its proxy was let go: its request read the proxy before the user
    deleted it, and copying what it uses took a moment (too short to read the proxy again)."""
    proxy, target = await delegate_requested_by_a_proxy_deleted_meanwhile(world)
    assert world.delegate(target, proxy) is not None  # an orphan: unscheduled, nothing was published yet
    return proxy, target


async def delegate_requested_by_a_proxy_deleted_meanwhile(world: World) -> tuple[JSON, str]:
    """A delegate request whose handler read the proxy, which the user deleted while what it uses was
    being copied: (the proxy, its target) once the request is handled."""
    proxy = await world.create_proxy()
    await world.run("elect")
    target = Placement.of(world.proxy(proxy)).target
    assert target is not None
    [request] = world.bus.pending("delegate")
    follower = world.target_schedulers[target].follower
    ensure, reached, release = follower.ensure, asyncio.Event(), asyncio.Event()

    async def slow_ensure(*args: Any) -> str | None:  # the proxy was read; copying what it uses takes a while
        reached.set()
        await release.wait()
        return await ensure(*args)

    follower.ensure = slow_ensure  # type: ignore[method-assign]
    handling = asyncio.create_task(world.bus.deliver(request))
    await asyncio.wait_for(reached.wait(), 5)
    await world.c1.delete(pod_path(NS, proxy["metadata"]["name"]))  # the user deletes the pod meanwhile
    await world.settle()
    assert world.c1.pod(NS, proxy["metadata"]["name"]) is None, "no delegate yet: the finalizer let it go"

    release.set()
    assert (await handling).acked
    await world.run()
    return proxy, target


async def test_a_delegate_whose_preparation_took_a_while_is_not_made_for_a_proxy_deleted_meanwhile(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """When copying what the pod uses (or a new namespace's ServiceAccount) took long, the proxy is read
    again first: one deleted meanwhile gets no delegate, which could start before anything removes it."""
    monkeypatch.setattr(candidate_module, "STALE_PROXY_SECONDS", 0.0)
    proxy, target = await delegate_requested_by_a_proxy_deleted_meanwhile(world)
    assert world.delegate(target, proxy) is None


async def test_a_delegate_created_after_its_proxy_was_let_go_is_removed_once_its_target_schedules_it(
        world: World) -> None:
    proxy, target = await late_delegate(world)

    # The target's scheduler places it moments later: its proxy's owner hears of it and finds no proxy.
    await world.schedule(target, proxy)
    await world.run()
    assert world.delegate(target, proxy) is None


async def test_an_unscheduled_delegate_whose_proxy_is_gone_is_removed_by_the_next_resync_s_digest(
        world: World) -> None:
    proxy, target = await late_delegate(world)

    await world.feedback.resync()
    await world.settle()
    assert world.delegate(target, proxy) is None


# -- lost messages, found in the digests --------------------------------------------------------------


async def _succeeded_in_its_target(world: World) -> tuple[JSON, str]:
    """A proxy and its target, where its delegate ran and has just succeeded (its status message is published)."""
    proxy, target = await world.running()
    name = delegate_name(proxy["metadata"]["name"], proxy["metadata"]["uid"])
    world.clusters[target].set_pod_phase(NS, name, "Succeeded")
    await world.settle()
    return proxy, target


async def test_what_the_digests_said_under_one_placement_is_forgotten_when_the_proxy_is_placed_again(
        world: World) -> None:
    """A delegate missed under the last placement must not cut the next placement's grace short (its
    request was sent again at once, with a misleading "has no delegate there")."""
    proxy, target = await world.place()
    uid = proxy["metadata"]["uid"]
    world.feedback.missing_since[uid] = time.monotonic() - 3600
    world.feedback.unmirrored[uid] = "41"
    other = next(t for t in TARGETS if t != target)
    world.c1.modify("pods", NS, proxy["metadata"]["name"], lambda pod: pod["metadata"]["annotations"].update(
        {PLACEMENT_ANNOTATION: Placement.of(pod).reject(target, "full", time.time()).choose(other).annotation()}))
    await world.settle()
    assert uid not in world.feedback.missing_since and uid not in world.feedback.unmirrored


async def test_a_lost_status_message_is_mirrored_after_two_digests_show_the_same_delegate_version(
        world: World) -> None:
    proxy, _target = await _succeeded_in_its_target(world)
    for envelope in world.bus.pending("status"):
        world.bus.drop(envelope)  # lost

    await world.feedback.resync()  # first digest: not mirrored, maybe a message on its way
    await world.settle()
    assert world.proxy(proxy)["status"]["phase"] == "Running"
    await world.feedback.resync()  # the same delegate version, still not mirrored: read and mirrored
    await world.settle()
    assert world.proxy(proxy)["status"]["phase"] == "Succeeded"


async def test_a_status_not_mirrored_is_not_read_from_the_target_while_its_partition_has_a_backlog(
        world: World) -> None:
    proxy, target = await _succeeded_in_its_target(world)
    [waiting] = world.bus.pending("status")  # its message waits in the stream (a backlog)
    reads = len([c for c in world.clusters[target].calls if c.method == "GET"])

    for _ in range(3):
        await world.feedback.resync()
        await world.settle()
    assert world.proxy(proxy)["status"]["phase"] == "Running"  # left to the message on its way
    assert len([c for c in world.clusters[target].calls if c.method == "GET"]) == reads

    await world.bus.deliver(waiting)
    await world.settle()
    assert world.proxy(proxy)["status"]["phase"] == "Succeeded"


async def test_a_lost_deletion_message_ends_the_proxy_once_the_digests_miss_its_delegate_past_the_grace(
        world: World) -> None:
    proxy, target = await world.running()
    await world.clusters[target].delete(pod_path(NS, delegate_name(proxy["metadata"]["name"],
                                                                   proxy["metadata"]["uid"])))
    await world.settle()
    [gone] = world.bus.pending("status")
    world.bus.drop(gone)  # lost

    await world.feedback.resync()
    await world.settle()
    assert world.c1.pod(NS, proxy["metadata"]["name"]) is not None  # missed once: maybe a cache lagging
    world.feedback.missing_since[proxy["metadata"]["uid"]] -= DELEGATE_GRACE_SECONDS
    await world.feedback.resync()
    await world.settle()
    assert world.c1.pod(NS, proxy["metadata"]["name"]) is None  # a pod lives once


# -- status mirroring ------------------------------------------------------------------------------------


async def test_a_status_field_the_delegate_no_longer_has_leaves_the_proxy_too(world: World) -> None:
    proxy, target = await world.running()
    name = delegate_name(proxy["metadata"]["name"], proxy["metadata"]["uid"])

    def disrupted(pod: JSON) -> None:
        pod["status"].update(message="The node had condition: [DiskPressure].", reason="Terminating")
        pod["status"]["conditions"].append({"type": "DisruptionTarget", "status": "True"})

    world.clusters[target].modify("pods", NS, name, disrupted)
    await world.settle()
    await world.run()
    assert world.proxy(proxy)["status"]["reason"] == "Terminating"

    def recovered(pod: JSON) -> None:
        for field in ("message", "reason"):
            del pod["status"][field]
        pod["status"]["conditions"] = [c for c in pod["status"]["conditions"] if c["type"] != "DisruptionTarget"]

    world.clusters[target].modify("pods", NS, name, recovered)
    await world.settle()
    await world.run()
    status = world.proxy(proxy)["status"]
    assert "message" not in status and "reason" not in status
    assert sorted(c["type"] for c in status["conditions"]) == ["ContainersReady", "Initialized", "PodScheduled",
                                                              "Ready"]


async def test_a_status_turned_back_by_another_writer_is_corrected_by_the_next_copy(world: World) -> None:
    proxy, _target = await world.running()
    last = [e for e in world.broker.published if e.kind == "status"][-1]
    # Another replica, its cache lagging, writes an older status moments after this one wrote the newer.
    world.c1.modify("pods", NS, proxy["metadata"]["name"], lambda pod: pod["status"].update(phase="Pending"))
    await world.settle()

    assert (await world.bus.deliver(world.bus.duplicate(last))).acked  # the newer status, once more
    await world.settle()
    assert world.proxy(proxy)["status"]["phase"] == "Running", "swallowed as 'just mirrored'"


def test_the_mirror_patch_writes_exactly_the_delegate_s_fields_over_the_proxy_version_it_read() -> None:
    proxy = {"metadata": {"resourceVersion": "41"}, "status": {
        "phase": "Running", "message": "gone since", "conditions": [
            {"type": "PodScheduled", "status": "True"}, {"type": "DisruptionTarget", "status": "True"}]}}
    wanted = mirrored_status({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"},
                                                                 {"type": "PodScheduled", "status": "True"}]})
    assert status_differs(proxy["status"], wanted)
    patch = mirror_patch(proxy, wanted)
    assert patch["metadata"] == {"resourceVersion": "41"}
    assert patch["status"]["message"] is None and patch["status"]["phase"] == "Running"
    assert patch["status"]["conditions"] == [{"type": "PodScheduled", "status": "True"},
                                             {"type": "Ready", "status": "True"}]
    assert not status_differs(merge_patch(proxy, patch)["status"], wanted)


# -- an API error at each step ------------------------------------------------------------------------


async def _converge(world: World, proxy: JSON) -> None:
    """What the clusters, the retries and the resyncs do over a while: deliveries (a failed handler's message
    again), feedback's resync, and the watcher's re-publication of a proxy still waiting for a cluster."""
    for _ in range(8):
        await world.run()
        await world.feedback.resync()
        await world.settle()
        await asyncio.sleep(0.02)  # work queues retry after a short back-off
        current = world.proxy(proxy)
        if not current["spec"].get("nodeName") and Placement.of(current).target is None:
            await world.bus.publish(f"mcs.elect.{SOURCE}", ElectMessage(proxy=ref(current), reason="resync"),
                                    f"elect:resync:{len(world.broker.deliveries)}")
        await world.run()


async def _place_and_run(world: World, fault: tuple[str, str, str] | None = None) -> tuple[JSON, str]:
    """A pod from creation to Running through every stage, as the targets' schedulers and kubelets act;
    the services' first ``fault`` = (cluster, method, path) request fails."""
    proxy = await world.create_proxy()
    if fault is not None:
        cluster, method, path = fault
        world.clusters[cluster].fail(method, path)
    await _converge(world, proxy)
    target = Placement.of(world.proxy(proxy)).target
    assert target is not None, "no cluster chosen"
    name = delegate_name(proxy["metadata"]["name"], proxy["metadata"]["uid"])
    world.clusters[target].bind_pod(NS, name, f"{target}-n1")
    await world.settle()
    await _converge(world, proxy)
    world.clusters[target].set_pod_phase(NS, name, "Running")
    await world.settle()
    await _converge(world, proxy)
    return world.proxy(proxy), target


def _writes(world: World) -> list[tuple[str, str, str]]:
    """Every write any service sent, once each, in order: (cluster, method, path)."""
    seen: dict[tuple[str, str, str], None] = {}
    for name, cluster in world.clusters.items():
        for call in cluster.calls:
            if call.method != "GET":
                seen.setdefault((name, call.method, call.path), None)
    return list(seen)


async def test_an_api_error_at_any_write_of_the_pipeline_is_repaired() -> None:
    """Each write of a pod's journey (choice, delegate, namespace, binding, status, Events...) fails once in
    its own run: the pod still ends Running, bound to its cluster, with exactly one delegate."""
    reference = await World().start()
    try:
        await _place_and_run(reference)
        # all but the proxy's creation, which is the test's own write
        writes = [w for w in _writes(reference) if w != (SOURCE, "POST", pod_path(NS))]
    finally:
        await reference.close()
    assert len(writes) >= 6, writes  # the choice, the delegate, its namespace, the binding, the status...
    for cluster, method, path in writes:
        world = await World().start()
        try:
            proxy, target = await _place_and_run(world, (cluster, method, path))
            where = f"after a {method} {path} in {cluster} failed"
            assert proxy["spec"].get("nodeName") == f"admiralty-{target}", where
            assert proxy["status"].get("phase") == "Running", where
            assert [len(world.delegates(t)) for t in TARGETS].count(1) == 1, where
            assert sum(len(world.delegates(t)) for t in TARGETS) == 1, where
            unexpected = [p for p in world.problems() if "injected fault" not in p]
            assert unexpected == [], where
        finally:
            await world.close()


# -- closing with work in flight (a restart, a rolling update, a composition replaced) --------------------


async def test_closing_lets_quick_work_finish_and_hands_slow_work_back_at_once(
        jetstream: tuple[FakeJetStream, list[Bus]]) -> None:
    js, buses = jetstream
    first = await started(js, buses, "p1")
    finishing, stuck = asyncio.Event(), asyncio.Event()

    async def handle(message: ElectMessage) -> Outcome:
        if message.proxy.uid == "quick":
            await finishing.wait()
        else:
            await stuck.wait()  # never set: still at work when the bus closes
        return ACK

    await first.publish(first.subject("elect", "c1"), elect("quick"), "elect:quick")
    await first.publish(first.subject("elect", "c1"), elect("slow"), "elect:slow")
    first.consume("elect", "proxy-scheduler", "mcs.elect.>", ElectMessage, handle, ack_wait=30.0)
    await until(lambda: all(m.deliveries == 1 for m in js.messages["MCS_ELECT"]))
    closing = asyncio.create_task(first.close(drain_seconds=0.3))
    await asyncio.sleep(0.05)
    finishing.set()  # the quick one finishes within the grace and is acked
    await closing
    [left] = js.messages["MCS_ELECT"]
    assert decode_uid(left) == "slow" and left.acks == ["nak"], left.acks  # handed back, not left for ack_wait
    second = await started(js, buses, "p2")
    received: list[str] = []
    second.consume("elect", "proxy-scheduler", "mcs.elect.>", ElectMessage, collecting(received), ack_wait=30.0)
    await until(lambda: received == ["slow"], timeout=2.0)  # at once, far sooner than the 30 s ack_wait


def decode_uid(msg: Any) -> str:
    return decode(msg.data, ElectMessage).proxy.uid


async def test_a_long_resync_of_items_needing_nothing_lets_new_work_run_meanwhile() -> None:
    """10,000 items that need nothing (most of a full resync) never hold the event loop for long."""
    import itertools

    from mcsched.workqueue import YIELD_EVERY, for_each

    handled, turns_seen = 0, []

    async def nothing(_: int) -> None:
        nonlocal handled
        handled += 1

    async def new_work() -> None:
        while handled < 10_000:
            turns_seen.append(handled)
            await asyncio.sleep(0)

    await asyncio.gather(for_each(range(10_000), nothing, 4, "resync"), new_work())
    assert handled == 10_000
    gaps = [b - a for a, b in itertools.pairwise(turns_seen)]
    assert len(turns_seen) >= 10_000 // (4 * YIELD_EVERY) and max(gaps) <= 4 * YIELD_EVERY
