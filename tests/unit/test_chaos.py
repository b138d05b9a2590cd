"""The chaos suite's checks (libs/localenv/chaos.py) on made-up cluster states: each must catch its fault."""

from __future__ import annotations

from typing import Any

from localenv.chaos import Snapshot, convergence_problems, invariant_violations, pending_consumers
from mcsched.constants import PARENT_UID_LABEL
from mcsched.podspec import delegate_name


def proxy(name: str, uid: str, node: str | None = "admiralty-c2", phase: str = "Running", owner: str = "ReplicaSet",
          deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "uid": uid, "ownerReferences": [{"kind": owner, "name": "x"}]}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "spec": {"schedulerName": "admiralty-proxy", **({"nodeName": node} if node else {})},
            "status": {"phase": phase}}


def delegate(of: dict[str, Any], node: str = "c2-worker-0", phase: str = "Running", cpu: str = "100m",
             name: str | None = None) -> dict[str, Any]:
    meta = of["metadata"]
    return {"metadata": {"name": name or delegate_name(meta["name"], meta["uid"]),
                         "labels": {PARENT_UID_LABEL: meta["uid"]}},
            "spec": {"nodeName": node, "containers": [{"name": "app", "resources": {"requests": {"cpu": cpu}}}]},
            "status": {"phase": phase}}


NODE = {"metadata": {"name": "c2-worker-0"}, "status": {"allocatable": {"cpu": "1", "memory": "1Gi", "pods": "10"}}}


def test_a_converged_state_has_no_problems_and_each_departure_from_it_is_named() -> None:
    web = proxy("web", "u1")
    assert convergence_problems(Snapshot([web], {"c2": [delegate(web)]}), 1) == []
    assert convergence_problems(Snapshot([web], {"c2": []}), 1) == ["proxy web has 0 live delegates in c2"]
    assert convergence_problems(Snapshot([web], {"c2": [delegate(web)]}), 2) == ["1 proxies, expected 2"]
    pending = proxy("web", "u1", node=None, phase="Pending")
    assert convergence_problems(Snapshot([pending], {"c2": []}), 1) == ["proxy web is not bound to a virtual node"]
    stuck = proxy("old", "u2", deleting=True)
    assert "proxy old still Terminating" in convergence_problems(Snapshot([web, stuck], {"c2": [delegate(web)]}), 1)
    orphan = delegate(proxy("gone", "u9"))
    assert f"orphan delegate c2/{orphan['metadata']['name']}" in convergence_problems(
        Snapshot([web], {"c2": [delegate(web), orphan]}), 1)
    assert convergence_problems(Snapshot([web], {"c2": [delegate(web, phase="Pending")]}), 1) == [
        "proxy web is Running, its delegate Pending"]


def test_the_sampler_catches_two_delegates_a_stateful_name_twice_and_an_over_committed_node() -> None:
    web = proxy("web", "u1")
    ok = Snapshot([web], {"c1": [], "c2": [delegate(web)]}, {"c2": [NODE]}, {"c2": [delegate(web)]})
    assert invariant_violations(ok) == []
    twice = Snapshot([web], {"c1": [delegate(web, node="c1-worker-0")], "c2": [delegate(web)]})
    assert invariant_violations(twice) == ["proxy web has 2 live delegates"]
    # A StatefulSet pod replaced (a new proxy, same name) while its old delegate still runs.
    old, new = proxy("ident-0", "u3", owner="StatefulSet", deleting=True), proxy("ident-0", "u4", owner="StatefulSet")
    both = Snapshot([old, new], {"c1": [delegate(new, node="c1-worker-0")], "c2": [delegate(old)]})
    assert invariant_violations(both) == ["StatefulSet pod ident-0 runs 2 times"]
    finished = delegate(old, phase="Succeeded")
    assert invariant_violations(Snapshot([old, new], {"c1": [delegate(new)], "c2": [finished]})) == []
    heavy = [delegate(proxy(f"p{i}", f"u{i}"), cpu="400m") for i in range(3)]
    assert invariant_violations(Snapshot([], {}, {"c2": [NODE]}, {"c2": heavy})) == [
        "node c2/c2-worker-0 is over-committed"]
    assert invariant_violations(Snapshot([], {}, {"c2": [NODE]}, {"c2": heavy[:2]})) == []


def test_consumers_with_messages_left_are_named() -> None:
    jsz = {"account_details": [{"stream_detail": [{"name": "MCS_ELECT", "consumer_detail": [
        {"name": "proxy-scheduler", "num_pending": 0, "num_ack_pending": 2},
        {"name": "other", "num_pending": 0, "num_ack_pending": 0}]}]}]}
    assert pending_consumers(jsz) == ["consumer proxy-scheduler of MCS_ELECT has 2 messages left"]
    assert pending_consumers({}) == []
