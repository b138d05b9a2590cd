"""A NATS cluster, not one server: three real nats-servers, streams kept on all three, one of them killed.

The local environment's NATS started with three nodes (``NATS_NODES=3``), with
no Kubernetes cluster: the services' own :class:`~mcsched.bus.Bus` publishes
delegate requests steadily and consumes them, while the server leading the
stream is killed with SIGKILL. Nothing may be lost, and the work goes on
after a short pause (the cluster electing a new leader).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from localenv import LocalEnvironment
from localenv.environment import _wait_http, nats_process_name
from mcsched.bus import ACK, Bus, Credentials, Outcome
from mcsched.models import DelegateRequest, PodRef

pytestmark = pytest.mark.integration

NODES = 3
MESSAGES = 150


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[tuple[LocalEnvironment, dict[str, Any]]]:
    env = LocalEnvironment(tmp_path)
    nats = env.start_nats(lambda _: None, ["c1", "c2"], nodes=NODES)
    try:
        for monitor in nats["monitors"]:
            _wait_http(monitor + "/healthz?js-enabled-only=true", "NATS JetStream")
        yield env, {**nats, "admin_password": Path(nats["password_files"]["admin"]).read_text().strip()}
    finally:
        env.processes.stop_all()


def request(i: int) -> DelegateRequest:
    return DelegateRequest(proxy=PodRef(cluster="c1", namespace="ns", name=f"p{i}", uid=f"uid-{i}"), target="c2",
                           round=1)


async def test_losing_the_stream_leader_of_a_three_node_cluster_loses_nothing(
        nats_cluster: tuple[LocalEnvironment, dict[str, Any]]) -> None:
    env, nats = nats_cluster
    admin = Credentials(user="admin", password=nats["admin_password"])
    bus = Bus(nats["url"], "mcs", "test", credentials=admin, stream_replicas=NODES)
    await bus.connect(attempts=10)
    handled: dict[str, float] = {}
    everything = asyncio.Event()
    try:
        # The cluster may still be forming its JetStream meta group: creating the streams waits for it.
        for _ in range(60):
            try:
                await bus.ensure_streams()
                break
            except Exception:  # not ready yet: any JetStream error
                await asyncio.sleep(0.5)
        info = await bus._jetstream().stream_info(bus.stream("delegate"))
        assert info.config.num_replicas == NODES
        assert info.cluster is not None and len(info.cluster.replicas or []) == NODES - 1

        async def handle(message: DelegateRequest) -> Outcome:
            handled.setdefault(message.proxy.uid, time.monotonic())
            if len(handled) == MESSAGES:
                everything.set()
            return ACK

        bus.consume("delegate", "candidate-scheduler-c2", "mcs.delegate.c2", DelegateRequest, handle)
        published: dict[str, float] = {}
        for i in range(MESSAGES):
            if i == MESSAGES // 3:  # the leader of the stream goes away mid-stream
                leader = (await bus._jetstream().stream_info(bus.stream("delegate"))).cluster.leader  # type: ignore[union-attr]
                index = int(str(leader).rsplit("-", 1)[-1])
                env.processes.stop(nats_process_name(index), timeout=0.1, sig=signal.SIGKILL)
                killed_at = time.monotonic()
            published[f"uid-{i}"] = time.monotonic()
            await bus.publish("mcs.delegate.c2", request(i), f"delegate:uid-{i}:1")  # retried through the election
            if i == MESSAGES // 3:
                print(f"publishing answered again {time.monotonic() - killed_at:.1f}s after the kill")
            await asyncio.sleep(0.02)
        try:
            await asyncio.wait_for(everything.wait(), 60)
        except TimeoutError:
            pass  # said below: which ones
        missing = sorted(set(published) - set(handled))
        assert not missing, f"{len(missing)} messages lost after the leader was killed: {missing[:5]}"
        # How long work paused around the loss (reported by the test output; bounded generously here).
        after = sorted(t for t in handled.values() if t >= killed_at)
        pause = (after[0] - killed_at) if after else float("inf")
        print(f"first message handled {pause:.1f}s after the stream leader was killed")
        assert pause < 30, pause
    finally:
        await bus.close(drain_seconds=1)
