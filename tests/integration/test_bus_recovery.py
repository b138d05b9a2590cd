"""The bus against a real NATS: it waits for NATS at start, never redelivers a poison message forever,
and re-creates a consumer or a stream deleted under it, also with only a stage's own NATS permissions."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, DeliverPolicy
from prometheus_client import REGISTRY

from localenv.environment import free_port
from localenv.tools import nats_server_binary
from mcsched import bus as bus_module
from mcsched.bus import ACK, Bus, Credentials, Outcome
from mcsched.cli import nats_config
from mcsched.models import DelegateRequest, ElectMessage, Message, PodRef, StatusUpdate
from mcsched.natsauth import STAGE_STREAMS, candidate_durable, feedback_durable, proxy_scheduler_durable, stream_name
from mcsched.settings import Settings

pytestmark = pytest.mark.integration


async def test_service_started_before_nats_connects_once_nats_is_up(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    bus = Bus(f"nats://127.0.0.1:{port}", "recovery", "test")
    connecting = asyncio.create_task(bus.connect())
    await asyncio.sleep(1.5)
    assert not connecting.done(), "connect must keep retrying while NATS is down"
    assert any("NATS unreachable" in r.getMessage() for r in caplog.records)
    server = subprocess.Popen([str(nats_server_binary()), "-a", "127.0.0.1", "-p", str(port), "-js",  # noqa: ASYNC220
                               "-sd", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await asyncio.wait_for(connecting, 30)
        await bus.ensure_streams()
        received: list[ElectMessage] = []

        async def handler(message: ElectMessage) -> Outcome:
            received.append(message)
            return ACK

        message = ElectMessage(proxy=PodRef(cluster="c1", namespace="ns", name="p", uid="u1"))
        await bus.publish(bus.subject("elect", "c1"), message, "elect:u1")
        await bus.publish(bus.subject("elect", "c1"), message, "elect:u1")  # a duplicate: dropped by id
        bus.consume("elect", "test", bus.subject("elect", "c1"), ElectMessage, handler)
        for _ in range(100):
            if received:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        assert received == [message]
    finally:
        await bus.close()
        server.terminate()
        server.wait(10)


async def test_unreadable_and_always_failing_messages_are_dead_lettered_not_redelivered_forever(
        tmp_path: Path) -> None:
    port = free_port()
    server = subprocess.Popen([str(nats_server_binary()), "-a", "127.0.0.1", "-p", str(port), "-js",  # noqa: ASYNC220
                               "-sd", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bus = Bus(f"nats://127.0.0.1:{port}", "poison", "test", max_failed_deliveries=3)
    try:
        await asyncio.wait_for(bus.connect(), 30)
        await bus.ensure_streams()
        dead_before = {reason: _dead("elect", reason) for reason in ("unreadable", "failing")}
        attempts: dict[str, int] = {}

        async def handler(message: ElectMessage) -> Outcome:
            attempts[message.proxy.uid] = attempts.get(message.proxy.uid, 0) + 1
            if message.proxy.uid == "poison":
                raise RuntimeError("this message always fails")
            return ACK

        js = bus._jetstream()
        await js.publish(bus.subject("elect", "c1"), b"\x00 not msgpack", headers={"Nats-Msg-Id": "garbage"})
        future = {"type": "ElectMessage", "v": 99, "body": {}}
        await js.publish(bus.subject("elect", "c1"), msgpack.packb(future), headers={"Nats-Msg-Id": "v99"})
        for uid in ("poison", "fine"):
            await bus.publish(bus.subject("elect", "c1"),
                              ElectMessage(proxy=PodRef(cluster="c1", namespace="ns", name=uid, uid=uid)), uid)
        bus.consume("elect", "test", bus.subject("elect", "c1"), ElectMessage, handler)

        async def settled() -> bool:
            info = await js.stream_info(bus.stream("dead"))
            return info.state.messages == 3 and attempts.get("fine") == 1
        for _ in range(300):
            if await settled():
                break
            await asyncio.sleep(0.1)
        assert await settled(), f"attempts {attempts}"
        await asyncio.sleep(3)  # a redelivery of the poison message would come within its back-off
        assert attempts["poison"] == 3, "retried exactly up to the bound, then never again"
        assert (await js.stream_info(bus.stream("elect"))).state.messages == 0, "nothing left to redeliver"
        dead = await js.pull_subscribe(f"{bus.prefix}.dead.>", durable="inspect", stream=bus.stream("dead"))
        reasons = sorted((m.headers or {}).get("Mcs-Reason", "") for m in await dead.fetch(3, timeout=5))
        assert reasons == ["failing", "unreadable", "unreadable"]
        assert _dead("elect", "unreadable") - dead_before["unreadable"] == 2
        assert _dead("elect", "failing") - dead_before["failing"] == 1
    finally:
        await bus.close()
        server.terminate()
        server.wait(10)


def _dead(kind: str, reason: str) -> float:
    value = REGISTRY.get_sample_value("mcs_messages_dead_lettered_total", {"kind": kind, "reason": reason})
    return value or 0.0


async def test_a_handler_slower_than_ack_wait_keeps_its_message(tmp_path: Path) -> None:
    port = free_port()
    server = subprocess.Popen([str(nats_server_binary()), "-a", "127.0.0.1", "-p", str(port), "-js",  # noqa: ASYNC220
                               "-sd", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bus = Bus(f"nats://127.0.0.1:{port}", "slow", "test")
    try:
        await asyncio.wait_for(bus.connect(), 30)
        await bus.ensure_streams()
        calls: list[str] = []

        async def slow(message: ElectMessage) -> Outcome:
            calls.append(message.proxy.uid)
            await asyncio.sleep(5)  # far longer than ack_wait: JetStream would hand it out again
            return ACK

        await bus.publish(bus.subject("elect", "c1"),
                          ElectMessage(proxy=PodRef(cluster="c1", namespace="ns", name="p", uid="u1")), "u1")
        bus.consume("elect", "test", bus.subject("elect", "c1"), ElectMessage, slow, ack_wait=1.5)
        await asyncio.sleep(8)
        assert calls == ["u1"], "delivered again while its handler was still at work"
    finally:
        await bus.close()
        server.terminate()
        server.wait(10)


# -- a consumer or a stream deleted at runtime ---------------------------------------------------------------
#
# What a real nats-server (v2.15) and nats-py (2.16) do when a pull consumer is deleted, alone or with its stream:
# the pull request waiting at that moment is answered 409 "Consumer Deleted", which nats-py's fetch of a batch
# swallows (it returns no messages once its wait is up, FETCH_WAIT_SECONDS; a fetch of one message raises its
# TimeoutError instead, which the bus takes as "nothing yet"); the next fetch is answered 503 (nobody serves the
# consumer's next-message subject) and raises ServiceUnavailableError at once. The bus takes that failed fetch
# as the cue to ask for the consumer (NotFoundError) one second later, so a deleted consumer is back within about
# two seconds, without waiting for the periodic check (CONSUMER_CHECK_SECONDS). A publish that finds no stream
# raises NoStreamResponseError (503, no responders), on which the bus creates the stream and publishes again.

RECOVERY_PREFIX = "rec"


@dataclass(frozen=True)
class Stage:
    """Who publishes a kind of work and which durable consumer of which stage takes it."""

    kind: str
    cluster: str  # the work is published on <prefix>.<kind>.<cluster>
    publisher: str
    consumer: str
    durable: str
    filter_subject: str
    model: type[Message]
    message: Callable[[str], Message]


def _ref(uid: str) -> PodRef:
    return PodRef(cluster="c1", namespace="ns", name=uid, uid=uid)


STAGES = {
    "elect": Stage("elect", "c1", "watcher", "proxy-scheduler", proxy_scheduler_durable(),
                   f"{RECOVERY_PREFIX}.elect.>", ElectMessage, lambda uid: ElectMessage(proxy=_ref(uid))),
    "delegate": Stage("delegate", "c2", "proxy-scheduler", "candidate-scheduler-c2", candidate_durable("c2"),
                      f"{RECOVERY_PREFIX}.delegate.c2", DelegateRequest,
                      lambda uid: DelegateRequest(proxy=_ref(uid), target="c2")),
    # (the status of partition 0 of c1's proxies)
    "status": Stage("status", "c1.0", "feedback", "feedback", feedback_durable("c1", 0),
                    f"{RECOVERY_PREFIX}.status.c1.0",
                    StatusUpdate, lambda uid: StatusUpdate(proxy=_ref(uid), target="c2", delegate_name=uid,
                                                           delegate_uid=uid, status={})),
}
# The stage users' permissions are what is under test: each case runs with only a stage's own credentials
# (``mcsctl nats-config``), and once anonymously (no permissions at all) as the baseline.
CASES = [pytest.param("elect", False, id="anonymous-elect"),
         *(pytest.param(kind, True, id=f"stage-users-{kind}") for kind in STAGES)]


@dataclass
class Server:
    port: int
    passwords: dict[str, str]  # user -> password; empty: anonymous connections, no permissions

    def bus(self, user: str) -> Bus:
        credentials = Credentials(user, self.passwords[user]) if self.passwords else None
        return Bus(f"nats://127.0.0.1:{self.port}", RECOVERY_PREFIX, f"test-{user}", credentials=credentials)

    async def admin(self) -> NATS:
        auth = f"admin:{self.passwords['admin']}@" if self.passwords else ""
        return await nats.connect(f"nats://{auth}127.0.0.1:{self.port}", allow_reconnect=False)


@asynccontextmanager
async def nats_server(tmp_path: Path, stage_users: bool) -> AsyncIterator[Server]:
    """A nats-server with JetStream, granting each stage only its permissions when ``stage_users``."""
    argv, passwords = [str(nats_server_binary()), "-a", "127.0.0.1", "-js", "-sd", str(tmp_path / "js")], {}
    if stage_users:
        settings = Settings(subject_prefix=RECOVERY_PREFIX,
                            clusters=[{"name": c, "source": c == "c1", "target": True} for c in ("c1", "c2")])
        config = nats_config(settings, tmp_path / "credentials", per_target_candidates=True)
        passwords = {path.name: path.read_text() for path in config.parent.iterdir() if path != config}
        argv += ["-c", str(config)]
    port = free_port()
    process = subprocess.Popen([*argv, "-p", str(port)],  # noqa: ASYNC220
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = Server(port, passwords)
    try:
        for _ in range(100):
            try:
                await (await server.admin()).close()
                break
            except Exception:
                await asyncio.sleep(0.1)
        yield server
    finally:
        process.terminate()
        process.wait(10)


async def _until(condition: Callable[[], bool], timeout: float) -> bool:
    for _ in range(int(timeout / 0.05)):
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


@asynccontextmanager
async def running(server: Server, stage: Stage) -> AsyncIterator[tuple[Bus, Bus, list[str]]]:
    """The publishing and the consuming stage, connected as their users; the consumer has taken one message."""
    publisher, consumer = server.bus(stage.publisher), server.bus(stage.consumer)
    received: list[str] = []

    async def handler(message: Any) -> Outcome:
        received.append(message.proxy.uid)
        return ACK

    try:
        for bus, user in ((publisher, stage.publisher), (consumer, stage.consumer)):
            await bus.connect(attempts=1)
            await bus.ensure_streams(STAGE_STREAMS[user.removesuffix("-c2")])
        consumer.consume(stage.kind, stage.durable, stage.filter_subject, stage.model, handler)
        await publisher.publish(publisher.subject(stage.kind, stage.cluster), stage.message("first"), "first")
        assert await _until(lambda: received == ["first"], 15), f"received {received}"
        assert consumer.problems() == []
        yield publisher, consumer, received
    finally:
        await publisher.close()
        await consumer.close()


async def _sample_problems(bus: Bus, seen: list[str]) -> None:
    """Record every problem the bus reports (readiness asks for them at any time)."""
    while True:
        seen.extend(p for p in bus.problems() if p not in seen)
        await asyncio.sleep(0.01)


@asynccontextmanager
async def _admin_and_problems(server: Any, consumer: Bus) -> AsyncIterator[tuple[NATS, list[str]]]:
    """An administrator's connection, and every problem the consumer's bus reports meanwhile."""
    admin = await server.admin()
    seen: list[str] = []
    sampling = asyncio.create_task(_sample_problems(consumer, seen))
    try:
        yield admin, seen
    finally:
        sampling.cancel()
        await asyncio.gather(sampling, return_exceptions=True)
        await admin.close()


async def _deleted_consumer_comes_back(tmp_path: Path, kind: str, stage_users: bool) -> tuple[float, list[str]]:
    """Delete the consumer under a running stage: it is re-created and takes new work.

    Returns how many seconds that took and the problems the bus reported meanwhile.
    """
    stage = STAGES[kind]
    stream = stream_name(RECOVERY_PREFIX, kind)
    async with nats_server(tmp_path, stage_users) as server, \
            running(server, stage) as (publisher, consumer, received), \
            _admin_and_problems(server, consumer) as (admin, seen):
        start = time.monotonic()
        assert await admin.jetstream().delete_consumer(stream, stage.durable)
        await publisher.publish(publisher.subject(kind, stage.cluster), stage.message("second"), "second")
        assert await _until(lambda: "second" in received, 15), \
            f"not delivered after the consumer was deleted; the bus reported {seen}"
        took = time.monotonic() - start
        assert received == ["first", "second"]
        assert any(stage.durable in problem for problem in seen), f"readiness never named it: {seen}"
        assert (await admin.jetstream().consumer_info(stream, stage.durable)).config.durable_name == stage.durable
        assert consumer.problems() == [] and publisher.problems() == []
        return took, seen


@pytest.mark.parametrize(("kind", "stage_users"), CASES)
async def test_a_consumer_deleted_at_runtime_is_created_again(tmp_path: Path, kind: str, stage_users: bool) -> None:
    await _deleted_consumer_comes_back(tmp_path, kind, stage_users)


async def test_a_deleted_consumer_is_noticed_by_its_failing_fetch_not_only_by_the_periodic_check(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bus_module, "CONSUMER_CHECK_SECONDS", 3600.0)  # only the first check, at subscribing
    took, seen = await _deleted_consumer_comes_back(tmp_path, "elect", stage_users=False)
    assert took < 5, f"took {took:.1f}s"
    # nats-py's answer to a pull on a deleted consumer (see above): if this changes, so may the way it is noticed.
    assert any(p.startswith(f"fetching from consumer {proxy_scheduler_durable()} fails: ServiceUnavailableError")
               for p in seen), seen


@pytest.mark.parametrize(("kind", "stage_users"), CASES)
async def test_a_stream_deleted_at_runtime_is_created_again_by_a_publish_and_its_consumer_too(
        tmp_path: Path, kind: str, stage_users: bool, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # The consumer then learns of the deletion only from its failing fetch, a second or more after it: the publish
    # that follows the deletion at once finds no stream, every time, and must create it itself.
    monkeypatch.setattr(bus_module, "CONSUMER_CHECK_SECONDS", 3600.0)
    stage = STAGES[kind]
    stream = stream_name(RECOVERY_PREFIX, kind)
    async with nats_server(tmp_path, stage_users) as server, \
            running(server, stage) as (publisher, consumer, received), \
            _admin_and_problems(server, consumer) as (admin, seen):
        assert await admin.jetstream().delete_stream(stream)
        await publisher.publish(publisher.subject(kind, stage.cluster), stage.message("second"), "second")
        assert any(r.getMessage().startswith(f"no stream answered for {publisher.subject(kind, stage.cluster)}")
                   for r in caplog.records), "the publish was expected to find no stream"
        assert await _until(lambda: "second" in received, 15), \
            f"not delivered after the stream was deleted; the bus reported {seen}"
        assert received == ["first", "second"]
        assert any(stage.durable in problem for problem in seen), f"readiness never named it: {seen}"
        js = admin.jetstream()
        assert (await js.stream_info(stream)).config.subjects == [f"{RECOVERY_PREFIX}.{kind}.>"]
        assert (await js.consumer_info(stream, stage.durable)).config.filter_subject == stage.filter_subject
        assert consumer.problems() == [] and publisher.problems() == []



@pytest.mark.parametrize(("kind", "stage_users"), CASES)
async def test_a_consumer_made_with_other_settings_takes_this_version_s(tmp_path: Path, kind: str,
                                                                        stage_users: bool) -> None:
    """A durable made earlier (by an older version of the services) with another ack_wait and
    max_ack_pending is updated when a stage subscribes, with only that stage's permissions."""
    stage = STAGES[kind]
    stream = stream_name(RECOVERY_PREFIX, kind)
    async with nats_server(tmp_path, stage_users) as server:
        admin = await server.admin()
        try:
            bus = server.bus(stage.publisher)
            await bus.connect(attempts=1)
            await bus.ensure_streams(STAGE_STREAMS[stage.publisher.removesuffix("-c2")])
            await bus.close()
            await admin.jetstream().add_consumer(stream, ConsumerConfig(
                durable_name=stage.durable, ack_wait=5.0, max_deliver=-1, max_ack_pending=100,
                deliver_policy=DeliverPolicy.ALL, filter_subject=stage.filter_subject))
            async with running(server, stage):  # subscribed, and took a message
                config = (await admin.jetstream().consumer_info(stream, stage.durable)).config
            assert (config.ack_wait, config.max_ack_pending) == (30.0, 10_000)
        finally:
            await admin.close()
