"""The bus waits for NATS instead of failing when NATS is down at start."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

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
