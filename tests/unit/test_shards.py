"""Shares of a stage's work (mcsched.shards) and the membership that hands them out (mcsched.membership)."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
from collections import Counter

import pytest

from mcsched.membership import Membership
from mcsched.runtime import stage_shares
from mcsched.shards import (
    PARTITION_LABEL,
    PARTITIONS,
    Share,
    Shares,
    assign,
    partition_of,
    partition_selector,
    partitions_of,
    selector,
    stage_assignment,
    wholes,
)
from mcsched.testing.bus import FakeBroker, FakeBus
from mcsched.testing.cluster import labels_match
from mcsched.testing.runtime import fake_settings

MEMBERS = ("feedback@a:1", "feedback@b:2", "feedback@c:3")


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 7, 13])
def test_every_share_has_exactly_one_owner_and_shares_are_even(count: int) -> None:
    shares = partitions_of(["c1", "c2"])
    members = [f"m{i}" for i in range(count)]
    owned = {m: assign(shares, members, m) for m in members}
    everyone = Counter(s for mine in owned.values() for s in mine)
    assert set(everyone) == set(shares) and set(everyone.values()) == {1}
    sizes = [len(mine) for mine in owned.values()]
    assert max(sizes) - min(sizes) <= 1


def test_with_many_clusters_a_process_gets_whole_clusters() -> None:
    shares = partitions_of([f"c{i:02}" for i in range(30)])
    owned = assign(shares, MEMBERS, MEMBERS[1])
    clusters = {s.cluster for s in owned}
    assert len(clusters) == 10 and len(owned) == 10 * PARTITIONS


def test_fewer_shares_than_members_go_to_one_member_each_or_are_shared_when_replicated() -> None:
    targets = wholes(["c2", "c3"])
    owned = [assign(targets, MEMBERS, m) for m in MEMBERS]
    assert owned == [{Share("c2")}, {Share("c3")}, set()]
    replicated = [assign(targets, MEMBERS, m, replicate=True) for m in MEMBERS]
    assert replicated == [{Share("c2")}, {Share("c3")}, {Share("c2")}]


def test_all_members_compute_the_same_assignment_whatever_order_they_list_each_other_in() -> None:
    shares = partitions_of(["c1"])
    for order in itertools.permutations(MEMBERS):
        assert assign(shares, order, MEMBERS[0]) == assign(shares, MEMBERS, MEMBERS[0])


def test_stage_assignments() -> None:
    sources, targets = ["c1"], ["c1", "c2", "c3"]
    feedback = [stage_assignment("feedback", sources, targets, MEMBERS, m) for m in MEMBERS]
    for owned, target in zip(feedback, targets, strict=True):
        assert Share(target) in owned and len([s for s in owned if s.partition is not None]) == PARTITIONS // 3
    candidate = stage_assignment("candidate-scheduler", sources, ["c2"], MEMBERS, MEMBERS[2])
    assert candidate == {Share("c2")}  # one target, three processes: all serve it
    assert len(stage_assignment("watcher", sources, targets, MEMBERS[:1], MEMBERS[0])) == PARTITIONS
    with pytest.raises(ValueError):
        stage_assignment("proxy-scheduler", sources, targets, MEMBERS, MEMBERS[0])


def test_serving_some_targets_narrows_the_candidate_schedulers_only_feedback_keeps_every_target() -> None:
    # serve_targets is in the settings every service reads (Helm's candidateScheduler.serveTargets):
    # feedback narrowed by it left the other targets' delegates unwatched and their virtual nodes
    # without heartbeats.
    settings = fake_settings(sources=("c1",), targets=("c1", "c2", "c3"), serve_targets=["c2"])
    feedback = stage_shares("feedback", settings, MEMBERS[:1], MEMBERS[0])
    assert feedback.clusters(settings.target_names) == ["c1", "c2", "c3"]
    assert feedback.owns_every_partition("c1")
    candidate = stage_shares("candidate-scheduler", settings, MEMBERS[:1], MEMBERS[0])
    assert candidate.clusters(settings.target_names) == ["c2"]


def pod(partition: str | None) -> dict[str, object]:
    return {"metadata": {"labels": {} if partition is None else {PARTITION_LABEL: partition}}}


def test_selectors_select_exactly_the_owned_partitions_and_unlabelled_pods_belong_to_partition_0() -> None:
    assert selector(None) is None and selector(frozenset(range(PARTITIONS))) is None
    for owned in (frozenset({0, 1, 2, 3}), frozenset({4, 5, 6, 7}), frozenset({11})):
        chosen = selector(owned)
        for partition in [*map(str, range(PARTITIONS)), None, "01", "007", "12", "x", ""]:
            expected = partition_of(pod(partition)["metadata"]["labels"]) in owned  # type: ignore[arg-type]
            assert labels_match(chosen, pod(partition)) == expected, (owned, partition)
    both = partition_selector(frozenset({5}), "parent-uid", "parent-cluster=c1")["label_selector"]
    assert both == f"parent-uid,parent-cluster=c1,{PARTITION_LABEL} in (5)"
    assert partition_selector(None) == {}
    assert partition_of({PARTITION_LABEL: "12"}) == 0 and partition_of({PARTITION_LABEL: "x"}) == 0


def test_shares_answer_what_a_process_owns() -> None:
    everything = Shares()
    assert everything.owns("c1", 3) and everything.partitions("c1") is None and everything.sources(["c1"]) == ["c1"]
    some = Shares(frozenset({Share("c1", 0), Share("c1", 1), Share("c2")}))
    assert some.partitions("c1") == {0, 1} and some.sources(["c1", "c2"]) == ["c1"]
    assert some.clusters(["c1", "c2", "c3"]) == ["c2"] and some.owns("c1", 0) and not some.owns("c1", 2)
    assert some.describe() == "c2, c1/0-1"
    assert Shares(frozenset()).describe() == "nothing"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_members_learn_of_each_other_at_once_and_forget_a_silent_one_after_a_lease() -> None:
    broker, clock = FakeBroker(), Clock()
    a = Membership(FakeBus(broker, client_name="a"), "feedback", "a", 4.0, clock)
    a.settle_seconds = 0.0
    await a.start()
    assert a.members() == ("a",)
    b = Membership(FakeBus(broker, client_name="b"), "feedback", "b", 4.0, clock)
    b.settle_seconds = 0.0
    await b.start()
    # b said hello; a, which did not know it, answered at once: both know both before b takes work
    assert a.members() == b.members() == ("a", "b") and a.changed.is_set()
    a.changed.clear()

    clock.now += 3.0
    await a._beat()
    a.expire()
    assert a.members() == ("a", "b") and not a.changed.is_set()
    clock.now += 2.0  # b silent for 5 s, more than its 4 s lease (it died without a word)
    await a._beat()
    a.expire()
    assert a.members() == ("a",) and a.changed.is_set()
    for membership in (a, b):
        if membership._task is not None:
            membership._task.cancel()


async def test_a_member_leaving_cleanly_is_forgotten_at_once_and_a_cut_off_member_keeps_its_list() -> None:
    broker, clock = FakeBroker(), Clock()
    a = Membership(FakeBus(broker, client_name="a"), "watcher", "a", 4.0, clock)
    b = Membership(FakeBus(broker, client_name="b"), "watcher", "b", 4.0, clock)
    a.settle_seconds = b.settle_seconds = 0.0
    await a.start()
    await b.start()
    await b.stop()
    assert a.members() == ("a",)
    c = Membership(FakeBus(broker, client_name="c"), "watcher", "c", 4.0, clock)
    c.settle_seconds = 0.0
    await c.start()
    assert a.members() == ("a", "c")
    await a.bus.close()  # a loses NATS: its heartbeats no longer come back to it
    clock.now += 10.0
    a.expire()
    assert a.members() == ("a", "c")  # it cannot tell who is alive: it takes nothing more
    other = Membership(FakeBus(broker, client_name="d"), "feedback", "d", 4.0, clock)  # another stage
    other.settle_seconds = 0.0
    await other.start()
    assert c.members() == ("a", "c")
    for membership in (a, c, other):
        await membership.stop()
    await asyncio.sleep(0)


def test_processes_with_the_same_host_name_and_pid_are_different_members() -> None:
    # Replicas in the host's network share its name, and each container numbers its processes from 1.
    code = ("import os, socket; os.getpid = lambda: 1; socket.gethostname = lambda: 'node-a'; "
            "from mcsched.runtime import process_identity; print(process_identity('feedback'))")
    names = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
             for _ in range(2)}
    assert len(names) == 2
    assert all(name.startswith("feedback@node-a:1") for name in names)
