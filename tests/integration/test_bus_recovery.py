"""The bus against a real NATS: it waits for NATS at start, and never redelivers a poison message forever."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import msgpack
import pytest
from prometheus_client import REGISTRY

from localenv.environment import free_port
from localenv.tools import nats_server_binary
from mcsched.bus import ACK, Bus, Outcome
from mcsched.models import ElectMessage, PodRef

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
