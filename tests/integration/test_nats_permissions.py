"""NATS identities against a real nats-server configured by :mod:`mcsched.natsauth`.

Each stage can do its own work with its own user, and nothing else: no
anonymous connections, no publishing another stage's subjects, no taking
another target's delegate requests.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import ConsumerConfig

from localenv.environment import free_port
from localenv.tools import nats_server_binary
from mcsched.bus import ACK, Bus, Credentials, Outcome
from mcsched.cli import nats_config
from mcsched.membership import Membership
from mcsched.models import (
    CandidateReply,
    CandidateRequest,
    DelegateDigest,
    DelegateRequest,
    ElectMessage,
    PodRef,
    StatusUpdate,
)
from mcsched.natsauth import (
    STAGE_STREAMS,
    NatsUser,
    authorization,
    candidate_durable,
    candidate_queue,
    digest_subject,
    feedback_durable,
    proxy_scheduler_durable,
    status_subject,
    stream_name,
)
from mcsched.pki import issue, new_ca
from mcsched.runtime import nats_credentials
from mcsched.settings import Settings
from mcsched.shards import stage_assignment

pytestmark = pytest.mark.integration

PREFIX = "perm"
SOURCES, TARGETS = ["c1"], ["c1", "c2", "c3"]
PASSWORDS: dict[str, str] = {}  # user -> password, as nats_config wrote them


@dataclass
class Server:
    port: int

    def url(self, user: str | None = None) -> str:
        if user is None:
            return f"nats://127.0.0.1:{self.port}"
        return f"nats://{user}:{PASSWORDS[user]}@127.0.0.1:{self.port}"

    def bus(self, user: str) -> Bus:
        return Bus(self.url(), PREFIX, f"test-{user}", credentials=Credentials(user=user, password=PASSWORDS[user]))


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    settings = Settings(subject_prefix=PREFIX, clusters=[{"name": c, "source": c in SOURCES, "target": True}
                                                         for c in TARGETS])
    config = nats_config(settings, tmp_path / "credentials", per_target_candidates=True)
    PASSWORDS.update({path.name: path.read_text() for path in config.parent.iterdir() if path != config})
    port = free_port()
    argv = [str(nats_server_binary()), "-c", str(config), "-a", "127.0.0.1", "-p", str(port),
            "-js", "-sd", str(tmp_path / "js")]
    process = subprocess.Popen(argv,  # noqa: ASYNC220
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                nc = await nats.connect(f"nats://admin:{PASSWORDS['admin']}@127.0.0.1:{port}", allow_reconnect=False)
                await nc.close()
                break
            except Exception:
                await asyncio.sleep(0.1)
        admin = Bus(f"nats://127.0.0.1:{port}", PREFIX, "admin", credentials=Credentials("admin", PASSWORDS["admin"]))
        await admin.connect(attempts=1)
        await admin.ensure_streams()
        await admin.close()
        yield Server(port)
    finally:
        process.terminate()
        process.wait(10)


async def stored(server: Server, kind: str) -> int:
    nc = await nats.connect(server.url("admin"))
    try:
        return (await nc.jetstream().stream_info(stream_name(PREFIX, kind))).state.messages
    finally:
        await nc.close()


async def refused(server: Server, user: str, action: Callable[[Any], Coroutine[Any, Any, Any]]) -> str:
    """Run ``action(nc)`` as ``user``; return the permission error NATS reported (fails if none)."""
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    nc = await nats.connect(server.url(user), error_cb=on_error, inbox_prefix=f"_INBOX.{user}",
                            allow_reconnect=False)
    try:
        try:
            await action(nc)
        except Exception as exc:  # the request times out: NATS dropped it
            errors.append(exc)
        await nc.flush()
        await asyncio.sleep(0.2)
    finally:
        await nc.close()
    violations = [str(e) for e in errors if "permissions violation" in str(e).lower()]
    assert violations, f"{user}: expected a permissions violation, got {errors!r}"
    return violations[0]


def elect() -> ElectMessage:
    return ElectMessage(proxy=PodRef(cluster="c1", namespace="ns", name="p", uid="u1"))


def delegate_request() -> DelegateRequest:
    return DelegateRequest(proxy=PodRef(cluster="c1", namespace="ns", name="p", uid="u1"), target="c3", round=1)


async def test_connections_without_credentials_or_with_a_wrong_password_are_refused(
        server: Server, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(Exception, match=r"(?i)authorization"):
        await nats.connect(server.url(), allow_reconnect=False, max_reconnect_attempts=0)
    with pytest.raises(Exception, match=r"(?i)authorization"):
        await nats.connect(f"nats://watcher:wrong@127.0.0.1:{server.port}", allow_reconnect=False,
                           max_reconnect_attempts=0)
    for credentials in (None, Credentials("watcher", "wrong")):
        caplog.clear()
        bus = Bus(server.url(), PREFIX, "refused", credentials=credentials)
        connecting = asyncio.create_task(bus.connect())
        await asyncio.sleep(1.5)
        assert not connecting.done() and not bus.connected
        assert any("refused the credentials" in r.getMessage() for r in caplog.records)
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
        await bus.close()


async def test_each_stage_does_its_own_work_with_its_own_user(server: Server) -> None:
    """The whole message path, every stage as its own user: elect -> ask -> delegate -> status."""
    buses = {user: server.bus(user) for user in ("watcher", "proxy-scheduler", "candidate-scheduler-c2",
                                                 "feedback")}
    for user, bus in buses.items():
        await bus.connect(attempts=1)
        await bus.ensure_streams(STAGE_STREAMS[user.removesuffix("-c2")])
    got: dict[str, list[Any]] = {"elect": [], "delegate": [], "status": [], "digest": []}

    async def record(kind: str, message: Any) -> Outcome:
        got[kind].append(message)
        return ACK

    async def answer(request: CandidateRequest) -> CandidateReply:
        return CandidateReply(target="c2", fits=True, score=50)

    try:
        proxy_scheduler, candidate, feedback = (buses["proxy-scheduler"], buses["candidate-scheduler-c2"],
                                                buses["feedback"])
        proxy_scheduler.consume("elect", proxy_scheduler_durable(), f"{PREFIX}.elect.>", ElectMessage,
                                lambda m: record("elect", m))
        candidate.consume("delegate", candidate_durable("c2"), candidate.subject("delegate", "c2"), DelegateRequest,
                          lambda m: record("delegate", m))
        await candidate.respond(candidate.subject("candidate", "c2"), candidate_queue("c2"), CandidateRequest, answer)
        feedback.consume("status", feedback_durable("c1", 5), status_subject(PREFIX, "c1", 5), StatusUpdate,
                         lambda m: record("status", m))

        async def digested(digest: DelegateDigest) -> None:
            got["digest"].append(digest)

        await feedback.listen(digest_subject(PREFIX, "c1", 5), DelegateDigest, digested)
        ref = PodRef(cluster="c1", namespace="ns", name="p", uid="u1")
        elect_seq = await buses["watcher"].publish(buses["watcher"].subject("elect", "c1"), elect(), "elect:u1:0")
        reply = None
        for _ in range(50):  # the candidate's subscription may take a moment to reach the server
            reply = await proxy_scheduler.request(proxy_scheduler.subject("candidate", "c2"),
                                                  CandidateRequest(proxy=ref, pod={}), CandidateReply, timeout=1)
            if reply is not None:
                break
        assert reply is not None and reply.fits
        await proxy_scheduler.publish(proxy_scheduler.subject("delegate", "c2"),
                                      DelegateRequest(proxy=ref, target="c2", round=1), "delegate:u1:1")
        status = StatusUpdate(proxy=ref, target="c2", delegate_name="p-x", delegate_uid="d1", status={})
        await feedback.publish(status_subject(PREFIX, "c1", 5), status, "status:u1")
        # a target side's digest for the process owning partition 5 (core NATS: no acknowledgement)
        await feedback.notify(digest_subject(PREFIX, "c1", 5),
                              DelegateDigest(target="c2", source="c1", partition=5, epoch="e"))
        for _ in range(100):
            if all(got.values()):
                break
            await asyncio.sleep(0.1)
        assert {k: len(v) for k, v in got.items()} == {"elect": 1, "delegate": 1, "status": 1, "digest": 1}
        # the watcher may ask how far the proxy-scheduler got (its resync skips what still waits there)
        waiting = await buses["watcher"].undelivered("elect", proxy_scheduler_durable())
        assert waiting is not None and elect_seq not in waiting
    finally:
        for bus in buses.values():
            await bus.close()


async def test_a_stage_cannot_publish_another_stages_work(server: Server) -> None:
    def publish(subject: str, payload: bytes) -> Callable[[Any], Coroutine[Any, Any, Any]]:
        async def action(nc: Any) -> None:
            await nc.jetstream().publish(subject, payload, timeout=1)
        return action

    delegate = delegate_request().encode()
    cases = [
        ("watcher", f"{PREFIX}.delegate.c3", delegate),               # a watcher asks for a delegate
        ("candidate-scheduler", f"{PREFIX}.delegate.c3", delegate),   # a target asks itself for work
        ("watcher", f"{PREFIX}.status.c1.0", b"x"),
        ("proxy-scheduler", f"{PREFIX}.status.c1.0", b"x"),
        ("candidate-scheduler", f"{PREFIX}.elect.c1", elect().encode()),
        ("feedback", f"{PREFIX}.elect.c1", elect().encode()),
    ]
    await asyncio.gather(*(refused(server, user, publish(subject, payload))
                           for user, subject, payload in cases))
    assert await stored(server, "delegate") == 0
    assert await stored(server, "elect") == 0
    assert await stored(server, "status") == 0


async def test_a_candidate_scheduler_serving_c2_cannot_take_or_answer_c3s_work(server: Server) -> None:
    admin = await nats.connect(server.url("admin"))
    try:
        await admin.jetstream().publish(f"{PREFIX}.delegate.c3", delegate_request().encode())
    finally:
        await admin.close()
    stream = stream_name(PREFIX, "delegate")

    async def consume_c3_durable(nc: Any) -> None:
        sub = await nc.jetstream().pull_subscribe(f"{PREFIX}.delegate.c3", durable=candidate_durable("c3"),
                                                  stream=stream)
        await sub.fetch(1, timeout=1)

    async def own_durable_with_c3_filter(nc: Any) -> None:
        await nc.jetstream().add_consumer(stream, ConsumerConfig(
            name=candidate_durable("c2"), durable_name=candidate_durable("c2"),
            filter_subject=f"{PREFIX}.delegate.c3"), timeout=1)

    async def answer_c3_questions(nc: Any) -> None:
        await nc.subscribe(f"{PREFIX}.candidate.c3", queue=candidate_queue("c3"))

    async def steal_feedback_work(nc: Any) -> None:
        sub = await nc.jetstream().pull_subscribe(f"{PREFIX}.status.c1.0", durable=feedback_durable("c1", 0),
                                                  stream=stream_name(PREFIX, "status"))
        await sub.fetch(1, timeout=1)

    for action in (consume_c3_durable, own_durable_with_c3_filter, answer_c3_questions, steal_feedback_work):
        await refused(server, "candidate-scheduler-c2", action)
    assert await stored(server, "delegate") == 1, "c3's delegate request must still be waiting for c3"


async def test_only_the_proxy_scheduler_takes_elect_messages(server: Server) -> None:
    async def take_elect(nc: Any) -> None:
        sub = await nc.jetstream().pull_subscribe(f"{PREFIX}.elect.>", durable=proxy_scheduler_durable(),
                                                  stream=stream_name(PREFIX, "elect"))
        await sub.fetch(1, timeout=1)

    await asyncio.gather(*(refused(server, user, take_elect)
                           for user in ("watcher", "candidate-scheduler", "feedback")))


async def test_a_service_connects_over_tls_with_the_ca_it_is_given_and_refuses_another(tmp_path: Path) -> None:
    ca, stranger = new_ca("nats-ca"), new_ca("someone-else")
    issue(ca, "nats", ip_addresses=("127.0.0.1",), server=True).write(tmp_path / "tls.crt", tmp_path / "tls.key")
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    (tmp_path / "stranger.crt").write_bytes(stranger.cert_pem)
    (tmp_path / "password").write_text("tls-pw")
    config = tmp_path / "auth.conf"
    config.write_text(json.dumps(authorization([NatsUser("watcher", "tls-pw", None)])))
    port = free_port()
    argv = [str(nats_server_binary()), "-c", str(config), "-a", "127.0.0.1", "-p", str(port), "--tls",
            "--tlscert", str(tmp_path / "tls.crt"), "--tlskey", str(tmp_path / "tls.key")]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: ASYNC220

    def bus(ca_file: str) -> Bus:
        settings = Settings(clusters=[{"name": "c1", "source": True, "target": True}],
                            nats_auth={"password_file": tmp_path / "password", "tls_ca_file": tmp_path / ca_file})
        return Bus(f"tls://127.0.0.1:{port}", PREFIX, "tls-test", credentials=nats_credentials("watcher", settings))

    trusting, doubting = bus("ca.crt"), bus("stranger.crt")
    try:
        await asyncio.wait_for(trusting.connect(), 20)
        assert trusting.connected
        connecting = asyncio.create_task(doubting.connect())
        await asyncio.sleep(2)
        assert not doubting.connected, "a server whose certificate the CA did not sign must not be trusted"
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
    finally:
        await trusting.close()
        await doubting.close()
        process.terminate()
        process.wait(10)


async def test_processes_of_a_stage_find_each_other_and_forget_a_dead_one_after_its_lease(server: Server) -> None:
    """Membership (mcsched.membership) over the real server, with each stage's own user."""
    lease = 1.2

    async def member(name: str) -> Membership:
        bus = server.bus("feedback")
        bus.client_name = name
        await bus.connect(attempts=1)
        membership = Membership(bus, "feedback", name, lease)
        await membership.start()
        return membership

    a, b, c = [await member(n) for n in ("feedback@a", "feedback@b", "feedback@c")]
    try:
        assert a.members() == b.members() == c.members() == ("feedback@a", "feedback@b", "feedback@c")
        shares = {m.member: stage_assignment("feedback", SOURCES, TARGETS, m.members(), m.member) for m in (a, b, c)}
        assert sorted(len(s) for s in shares.values()) == [5, 5, 5]  # 12 partitions and 3 targets
        # c dies without a word: its connection closes, its heartbeats stop.
        assert c._task is not None
        c._task.cancel()
        await c.bus.close(0.0)
        for _ in range(int(lease * 10) + 20):
            if a.members() == b.members() == ("feedback@a", "feedback@b"):
                break
            await asyncio.sleep(0.1)
        assert a.members() == b.members() == ("feedback@a", "feedback@b")
        c = await member("feedback@c")  # it returns
        assert a.members() == b.members() == c.members()
        assert stage_assignment("feedback", SOURCES, TARGETS, c.members(), c.member) == shares["feedback@c"]
    finally:
        for m in (a, b, c):
            await m.stop()
            await m.bus.close(0.0)
    # Another stage's user may neither announce itself among feedback's processes nor listen to them.
    for action in (lambda nc: nc.publish(f"{PREFIX}.members.feedback", b"x"),
                   lambda nc: nc.subscribe(f"{PREFIX}.members.feedback")):
        await refused(server, "watcher", action)
    # Nor read or forge the digests of delegates that feedback's processes send each other.
    for action in (lambda nc: nc.publish(digest_subject(PREFIX, "c1", 0), b"x"),
                   lambda nc: nc.subscribe(digest_subject(PREFIX, "c1", 0))):
        await refused(server, "candidate-scheduler", action)
