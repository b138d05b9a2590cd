"""What every service process sets up before it composes itself, and how it waits for NATS (mcsched.runtime)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from mcsched.bus import ACK, Bus, Outcome
from mcsched.models import ElectMessage, PodRef
from mcsched.runtime import Runtime, _unless_stopped
from mcsched.testing.jetstream import FakeJetStream, connect_bus
from mcsched.testing.runtime import fake_settings
from mcsched.workqueue import WorkQueue


def test_a_service_process_collects_garbage_rarely_and_never_rescans_what_it_imported() -> None:
    code = ("import gc; from mcsched.runtime import GC_YOUNG_THRESHOLD, tune_garbage_collection; "
            "before = gc.get_freeze_count(); tune_garbage_collection(); "
            "print(before, gc.get_freeze_count(), gc.get_threshold()[0] == GC_YOUNG_THRESHOLD)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, frozen, threshold = run.stdout.split()
    assert before == "0" and int(frozen) > 10_000  # the imports' objects: never traversed again
    assert threshold == "True"


async def test_streams_asked_for_while_jetstream_elects_its_leader_are_made_once_it_answers() -> None:
    # A service composed during a NATS cluster's election: an error here ended the process before;
    # now its composition goes on, and this runs beside it (cancelled with the runtime) until it answers.
    js = FakeJetStream()
    bus = connect_bus(Bus("nats://fake", "mcs", "watcher"), js)
    js.unavailable = True
    ensuring = asyncio.create_task(bus.ensure_streams_patiently(("elect",)))
    await asyncio.sleep(1.2)  # two attempts, both unanswered
    assert not ensuring.done() and js.api_calls.count("STREAM.CREATE.MCS_ELECT") >= 2
    js.unavailable = False
    await asyncio.wait_for(ensuring, 5)
    assert "MCS_ELECT" in js.streams


async def test_a_stop_while_connecting_ends_the_wait() -> None:
    stop = asyncio.Event()
    never = asyncio.Event()
    waiting = asyncio.create_task(_unless_stopped(never.wait(), stop))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    stop.set()
    assert await asyncio.wait_for(waiting, 1) is False


async def test_a_step_s_own_error_is_raised_not_taken_for_success() -> None:
    async def refused() -> None:
        raise PermissionError("no")

    with pytest.raises(PermissionError):
        await _unless_stopped(refused(), asyncio.Event())


async def test_closing_lets_a_handler_at_work_finish_with_the_queues_it_hands_work_to_still_running() -> None:
    # (feedback's status handler hands a proxy to finalize to a work queue, then acks): with the queues
    # stopped first, the work was acked and never done by this process.
    js = FakeJetStream()
    bus = connect_bus(Bus("nats://fake", "mcs", "feedback"), js)
    await bus.ensure_streams(("elect",))
    done: list[str] = []

    async def finalize(key: str) -> None:
        done.append(key)

    queue = WorkQueue("finalize", finalize, workers=1)
    queue.start()
    rt = Runtime("feedback", fake_settings(), bus, {}, closers=[queue.stop])
    handling, go_on = asyncio.Event(), asyncio.Event()

    async def handle(message: ElectMessage) -> Outcome:
        handling.set()
        await go_on.wait()
        queue.add(message.proxy.uid)
        await asyncio.sleep(0.2)  # its work goes on while the handler acks
        return ACK

    bus.consume("elect", "feedback", "mcs.elect.>", ElectMessage, handle)
    await bus.publish("mcs.elect.c1", ElectMessage(proxy=PodRef(cluster="c1", namespace="ns", name="p", uid="p")),
                      "elect:p")
    await asyncio.wait_for(handling.wait(), 5)
    closing = asyncio.create_task(rt.close(drain_seconds=2.0))
    await asyncio.sleep(0.1)
    go_on.set()
    await asyncio.wait_for(closing, 5)
    assert done == ["p"] and js.messages["MCS_ELECT"] == []


async def test_closing_ends_a_task_that_went_on_after_its_cancellation() -> None:
    """asyncio.wait_for (Python 3.11) returns what it awaited when that finishes as the cancellation
    comes: the task goes on, and a recomposition that waited for it waited for ever."""
    bus = connect_bus(Bus("nats://fake", "mcs", "feedback"), FakeJetStream())
    rt = Runtime("feedback", fake_settings(), bus, {})
    ended = asyncio.Event()

    async def heartbeat() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass  # lost, as in wait_for
        try:
            await asyncio.Event().wait()  # its loop goes on
        finally:
            ended.set()

    rt.spawn(heartbeat(), "heartbeat")
    await asyncio.sleep(0)
    await asyncio.wait_for(rt.close(drain_seconds=0.1), 10)
    assert ended.is_set()
