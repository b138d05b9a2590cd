"""Topology spread over virtual-node labels and weighted splits across clusters (mcsched.spread)."""

from __future__ import annotations

import base64
import json
from typing import Any

import orjson
import pytest

from mcsched.admission import review
from mcsched.choice import Placement
from mcsched.cluster_constraints import ConstraintError, split
from mcsched.constants import CLUSTER_TARGET_NAME_LABEL, CLUSTER_WEIGHTS_ANNOTATION, PROXY_CONSTRAINTS_ANNOTATION
from mcsched.spread import (
    Member,
    SpreadError,
    member,
    parse_weights,
    spread_allows,
    spread_ranked,
    spread_refusals,
    weighted,
    weights_of,
)

REGION = "topology.kubernetes.io/region"
TARGETS = ["c1", "c2"]
APP = {"app": "web", "pod-template-hash": "abc"}


def virtual_node(target: str, region: str = "", **spec: Any) -> dict[str, Any]:
    labels = {CLUSTER_TARGET_NAME_LABEL: target, "type": "virtual-kubelet"}
    if region:
        labels[REGION] = region
    return {"metadata": {"name": f"admiralty-{target}", "labels": labels},
            "spec": {"taints": [{"key": "virtual-kubelet.io/provider", "value": "admiralty", "effect": "NoSchedule"}],
                     **spec}}


def spread(max_skew: int = 1, key: str = CLUSTER_TARGET_NAME_LABEL, when: str = "DoNotSchedule",
           selector: dict[str, Any] | None = None, **more: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"maxSkew": max_skew, "topologyKey": key, "whenUnsatisfiable": when, **more}
    item["labelSelector"] = selector if selector is not None else {"matchLabels": {"app": "web"}}
    return item


def constraints(*items: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {"spec": {"topologySpreadConstraints": list(items), **spec}}


POD = Member("new", "ns", APP, "rs-1")


def placed(*targets: str, labels: dict[str, str] | None = None, namespace: str = "ns",
           owner: str | None = "rs-1") -> list[Member]:
    return [Member(f"p{i}-{t}", namespace, labels or APP, owner, t) for i, t in enumerate(targets)]


NODES = {"c1": virtual_node("c1"), "c2": virtual_node("c2")}


# -- DoNotSchedule ---------------------------------------------------------------------------------------


def test_max_skew_1_excludes_the_cluster_one_ahead_and_says_why() -> None:
    c = constraints(spread(1))
    assert spread_refusals(c, POD, NODES, [], TARGETS) == {}
    refused = spread_refusals(c, POD, NODES, placed("c1"), TARGETS)
    assert list(refused) == ["c1"]
    assert refused["c1"] == (f"topology spread: {CLUSTER_TARGET_NAME_LABEL}=c1 would have a skew of 2 > maxSkew 1 "
                             "(1 matching pods there, 0 in the emptiest domain)")
    assert spread_refusals(c, POD, NODES, placed("c1", "c2"), TARGETS) == {}
    assert list(spread_refusals(c, POD, NODES, placed("c1", "c2", "c2"), TARGETS)) == ["c2"]


def test_max_skew_2_allows_two_ahead_not_three() -> None:
    c = constraints(spread(2))
    assert spread_refusals(c, POD, NODES, placed("c1"), TARGETS) == {}
    assert list(spread_refusals(c, POD, NODES, placed("c1", "c1"), TARGETS)) == ["c1"]


def test_only_the_pods_the_selector_picks_in_the_pods_namespace_and_alive_count() -> None:
    c = constraints(spread(1))
    others = [*placed("c1", labels={"app": "db"}), *placed("c1", namespace="other")]
    assert spread_refusals(c, POD, NODES, others, TARGETS) == {}
    # matchLabelKeys: the old ReplicaSet's pods (another pod-template-hash) do not count
    keyed = constraints(spread(1, matchLabelKeys=["pod-template-hash"]))
    old = placed("c1", labels={"app": "web", "pod-template-hash": "old"})
    assert spread_refusals(keyed, POD, NODES, old, TARGETS) == {}
    assert list(spread_refusals(c, POD, NODES, old, TARGETS)) == ["c1"]  # without it they do
    assert list(spread_refusals(keyed, POD, NODES, placed("c1"), TARGETS)) == ["c1"]
    # the pod itself is never counted (a proxy being chosen again after a refusal)
    assert spread_refusals(c, POD, NODES, [Member("new", "ns", APP, "rs-1", "c1")], TARGETS) == {}


def test_without_a_label_selector_nothing_is_counted_and_nothing_excluded() -> None:
    item = spread(1)
    del item["labelSelector"]
    assert spread_refusals(constraints(item), POD, NODES, placed("c1", "c1", "c1"), TARGETS) == {}
    everything = constraints(spread(1, selector={}))  # an empty selector selects every pod
    assert list(spread_refusals(everything, POD, NODES, placed("c1", labels={"x": "y"}), TARGETS)) == ["c1"]


def test_a_cluster_without_the_topology_label_or_virtual_node_is_excluded() -> None:
    c = constraints(spread(1, key=REGION))
    nodes = {"c1": virtual_node("c1", "us"), "c2": virtual_node("c2"), "c3": None}
    refused = spread_refusals(c, POD, nodes, [], ["c1", "c2", "c3"])
    assert refused == {"c2": f"its virtual node has no label {REGION} (topology spread)",
                       "c3": f"its virtual node has no label {REGION} (topology spread)"}


def test_regions_are_domains_and_a_domain_with_no_eligible_cluster_does_not_count() -> None:
    nodes = {"c1": virtual_node("c1", "us"), "c2": virtual_node("c2", "us"), "c3": virtual_node("c3", "eu")}
    all_three = ["c1", "c2", "c3"]
    c = constraints(spread(1, key=REGION))
    # c1 and c2 share the domain us: one pod in c1 holds c2 back too
    assert sorted(spread_refusals(c, POD, nodes, placed("c1"), all_three)) == ["c1", "c2"]
    # the constraints allow only us: eu (c3 alone) is no domain, so its 0 pins nothing
    us_only = constraints(spread(1, key=REGION), nodeSelector={REGION: "us"})
    assert spread_refusals(us_only, POD, nodes, placed("c1", "c2"), ["c1", "c2"]) == {}
    # ... unless nodeAffinityPolicy: Ignore counts every cluster's domain
    ignore = constraints(spread(1, key=REGION, nodeAffinityPolicy="Ignore"), nodeSelector={REGION: "us"})
    assert sorted(spread_refusals(ignore, POD, nodes, placed("c1"), ["c1", "c2"])) == ["c1", "c2"]


def test_min_domains_counts_missing_domains_as_empty() -> None:
    c = constraints(spread(1, minDomains=3))  # two clusters: the least count is taken as 0
    assert list(spread_refusals(c, POD, NODES, placed("c1", "c2"), TARGETS)) == ["c1", "c2"]
    assert spread_refusals(constraints(spread(1, minDomains=2)), POD, NODES, placed("c1", "c2"), TARGETS) == {}


def test_a_cordoned_cluster_is_still_a_domain_unless_node_taints_policy_honor() -> None:
    nodes = {"c1": virtual_node("c1"), "c2": virtual_node("c2", unschedulable=True)}
    # as kube-scheduler: nodeTaintsPolicy defaults to Ignore, so the cordoned c2 (0 pods) holds c1 at maxSkew
    assert list(spread_refusals(constraints(spread(1)), POD, nodes, placed("c1"), ["c1"])) == ["c1"]
    honor = constraints(spread(1, nodeTaintsPolicy="Honor"))
    assert spread_refusals(honor, POD, nodes, placed("c1", "c1"), ["c1"]) == {}
    tolerating = constraints(spread(1, nodeTaintsPolicy="Honor"),
                             tolerations=[{"key": "node.kubernetes.io/unschedulable", "operator": "Exists"}])
    assert list(spread_refusals(tolerating, POD, nodes, placed("c1"), ["c1"])) == ["c1"]


def test_every_do_not_schedule_constraint_must_hold() -> None:
    nodes = {"c1": virtual_node("c1", "us"), "c2": virtual_node("c2", "eu")}
    both = constraints(spread(3), spread(1, key=REGION))
    assert list(spread_refusals(both, POD, nodes, placed("c1"), TARGETS)) == ["c1"]
    assert spread_allows(both, POD, nodes, "c2", placed("c1"))
    assert not spread_allows(both, POD, nodes, "c1", placed("c1"))


def test_schedule_anyway_ranks_and_never_excludes() -> None:
    c = constraints(spread(1, when="ScheduleAnyway"))
    assert spread_refusals(c, POD, NODES, placed("c1", "c1"), TARGETS) == {}
    assert spread_ranked(c, POD, NODES, [], TARGETS) == TARGETS  # within maxSkew everywhere: the draw decides
    assert spread_ranked(c, POD, NODES, placed("c1"), TARGETS) == ["c2"]
    assert spread_ranked(c, POD, NODES, placed("c1", "c1", "c1"), ["c1"]) == ["c1"], "c2 full: c1 anyway"
    wide = constraints(spread(2, when="ScheduleAnyway"))
    assert spread_ranked(wide, POD, NODES, placed("c1"), TARGETS) == TARGETS
    unlabelled = constraints(spread(1, key=REGION, when="ScheduleAnyway"))
    nodes = {"c1": virtual_node("c1", "us"), "c2": virtual_node("c2")}
    assert spread_ranked(unlabelled, POD, nodes, placed("c1", "c1"), TARGETS) == ["c1"]  # c2 lacks the key
    assert spread_ranked(constraints(), POD, NODES, placed("c1"), TARGETS) == TARGETS


def test_proxies_count_where_bound_or_where_their_placement_sends_them() -> None:
    def proxy(**extra: Any) -> dict[str, Any]:
        pod: dict[str, Any] = {"metadata": {"uid": "u", "namespace": "ns", "labels": APP, "annotations": {},
                                            "ownerReferences": [{"uid": "rs-1", "controller": True}]},
                               "spec": {}, "status": {"phase": "Pending"}}
        for path, value in extra.items():
            section, name = path.split("__")
            pod[section][name] = value
        return pod
    assert member(proxy()) is None  # no cluster yet
    chosen = {"multicluster.admiralty.io/placement": Placement().choose("c2").annotation()}
    assert member(proxy(metadata__annotations=chosen)) == Member("u", "ns", APP, "rs-1", "c2")
    assert member(proxy(spec__nodeName="admiralty-c1")) == Member("u", "ns", APP, "rs-1", "c1")
    assert member(proxy(spec__nodeName="admiralty-c1", status__phase="Succeeded")) is None
    assert member(proxy(spec__nodeName="admiralty-c1", metadata__deletionTimestamp="2024-01-01T00:00:00Z")) is None


@pytest.mark.parametrize("item, message", [
    ({"topologyKey": "k", "whenUnsatisfiable": "DoNotSchedule"}, "maxSkew must be an integer"),
    ({"maxSkew": 0, "topologyKey": "k", "whenUnsatisfiable": "DoNotSchedule"}, "maxSkew must be an integer"),
    ({"maxSkew": 1, "whenUnsatisfiable": "DoNotSchedule"}, "topologyKey must be"),
    ({"maxSkew": 1, "topologyKey": "k", "whenUnsatisfiable": "Sometimes"}, "whenUnsatisfiable must be"),
    ({"maxSkew": 1, "topologyKey": "k", "whenUnsatisfiable": "ScheduleAnyway", "minDomains": 2}, "minDomains needs"),
    ({"maxSkew": 1, "topologyKey": "k", "whenUnsatisfiable": "DoNotSchedule", "labelSelector": []}, "labelSelector"),
    ({"maxSkew": 1, "topologyKey": "k", "whenUnsatisfiable": "DoNotSchedule", "nodeTaintsPolicy": "x"}, "Honor"),
    ("x", "must be a mapping"),
])
def test_a_malformed_spread_constraint_in_the_annotation_is_refused(item: Any, message: str) -> None:
    pod = {"metadata": {"annotations": {PROXY_CONSTRAINTS_ANNOTATION: json.dumps(
        {"topologySpreadConstraints": [item]})}}, "spec": {}}
    with pytest.raises(ConstraintError, match=message):
        split(pod)


# -- weights ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, expected", [
    ("c1=1,c2=3", {"c1": 1, "c2": 3}),
    (" c1 = 1 , c2=3 ", {"c1": 1, "c2": 3}),
    ("c1=0,c2=1", {"c1": 0, "c2": 1}),
])
def test_weights_are_read(raw: str, expected: dict[str, int]) -> None:
    assert parse_weights(raw) == expected


@pytest.mark.parametrize("raw, message", [
    ("c1=1,c2", "is not <cluster>=<weight>"),
    ("c1=-1", "is not <cluster>=<weight>"),
    ("c1=1.5", "is not <cluster>=<weight>"),
    ("c1=1,,c2=1", "an empty entry"),
    ("c1=1,c1=2", "given twice"),
    ("c1=0", "at least one cluster"),
    ("", "at least one cluster"),
])
def test_malformed_weights_are_refused_with_what_is_wrong(raw: str, message: str) -> None:
    with pytest.raises(SpreadError, match=message):
        parse_weights(raw)


def test_the_pods_weights_win_over_its_namespaces() -> None:
    pod, namespace = {CLUSTER_WEIGHTS_ANNOTATION: "c1=1"}, {CLUSTER_WEIGHTS_ANNOTATION: "c2=1"}
    assert weights_of(pod, namespace) == {"c1": 1}
    assert weights_of({}, namespace) == {"c2": 1}
    assert weights_of({}, {}) == {}
    assert weights_of(pod, {CLUSTER_WEIGHTS_ANNOTATION: "bad"}) == {"c1": 1}
    with pytest.raises(SpreadError, match=r"^the namespace's annotation"):
        weights_of({}, {CLUSTER_WEIGHTS_ANNOTATION: "bad"})


@pytest.mark.parametrize("tie", [0, -1], ids=["first of a tie", "last of a tie"])
def test_weights_1_to_3_split_a_burst_of_8_into_2_and_6_whoever_wins_the_ties(tie: int) -> None:
    weights = {"c1": 1, "c2": 3}
    members: list[Member] = []
    shares = []
    for i in range(8):
        pod = Member(f"pod-{i}", "ns", APP, "rs-1")
        target = weighted(weights, pod, members, ["c1", "c2"])[tie]  # the room-proportional draw takes one
        members.append(Member(pod.uid, "ns", APP, "rs-1", target))
        shares.append(sum(m.target == "c1" for m in members))
    assert shares[0] == 0, "the first pod goes to the heavier cluster"
    assert shares[3] == 1 and shares[7] == 2, shares  # 1/3 after 4 pods, 2/6 after 8


def test_weights_count_only_the_pods_set() -> None:
    weights = {"c1": 1, "c2": 1}
    assert weighted(weights, POD, placed("c1"), TARGETS) == ["c2"]
    assert weighted(weights, POD, placed("c1", owner="rs-0"), TARGETS) == TARGETS  # another ReplicaSet
    assert weighted(weights, POD, placed("c1", namespace="other"), TARGETS) == TARGETS
    bare = Member("new", "ns", {"app": "web"}, None)  # pods without a controller: the same labels
    assert weighted(weights, bare, placed("c1", labels={"app": "web"}, owner=None), TARGETS) == ["c2"]
    assert weighted(weights, bare, placed("c1", labels={"app": "db"}, owner=None), TARGETS) == TARGETS


def test_clusters_without_weight_take_pods_only_when_no_weighted_cluster_fits() -> None:
    weights = {"c1": 1, "c2": 0, "c9": 5}  # c9 is no target: ignored
    assert weighted(weights, POD, placed("c1", "c1", "c1"), ["c1", "c2", "c3"]) == ["c1"]
    assert weighted(weights, POD, [], ["c2", "c3"]) == ["c2", "c3"], "no weighted cluster fits: any other"
    assert weighted({}, POD, placed("c1"), TARGETS) == TARGETS  # no weights: no preference


def test_the_weighted_share_is_among_the_clusters_that_fit() -> None:
    weights = {"c1": 1, "c2": 3, "c3": 1}
    # c2 excluded (cordoned, or full): c1 and c3 share, at 1:1
    assert weighted(weights, POD, placed("c1"), ["c1", "c3"]) == ["c3"]
    # c2 back with room after a burst went to c1 and c3: it is made up for first
    assert weighted(weights, POD, placed("c1", "c3", "c1", "c3"), ["c1", "c2", "c3"]) == ["c2"]


def _review(annotations: dict[str, str]) -> dict[str, Any]:
    pod = {"metadata": {"name": "p", "annotations": {"multicluster.admiralty.io/elect": "", **annotations}},
           "spec": {"containers": [{"name": "a", "image": "nginx"}]}}
    response: dict[str, Any] = review({"request": {"uid": "1", "kind": {"kind": "Pod"}, "operation": "CREATE",
                                                   "namespace": "ns", "object": pod}})["response"]
    return response


def test_the_webhook_refuses_malformed_weights_and_admits_good_ones() -> None:
    refused = _review({CLUSTER_WEIGHTS_ANNOTATION: "c1=one"})
    assert not refused["allowed"]
    assert refused["status"]["message"] == (f"annotation {CLUSTER_WEIGHTS_ANNOTATION}: 'c1=one' is not "
                                            "<cluster>=<weight> (a cluster name and a non-negative integer), "
                                            "e.g. c1=1,c2=3")
    admitted = _review({CLUSTER_WEIGHTS_ANNOTATION: "c1=1,c2=3"})
    assert admitted["allowed"]
    ops = orjson.loads(base64.b64decode(admitted["patch"]))
    annotations = next(op["value"] for op in ops if op["path"] == "/metadata/annotations")
    assert annotations[CLUSTER_WEIGHTS_ANNOTATION] == "c1=1,c2=3"  # kept on the proxy, where it is read
    bad_spread = _review({PROXY_CONSTRAINTS_ANNOTATION: json.dumps(
        {"topologySpreadConstraints": [{"maxSkew": 0, "topologyKey": "k", "whenUnsatisfiable": "DoNotSchedule"}]})})
    assert not bad_spread["allowed"] and "maxSkew must be an integer of at least 1" in bad_spread["status"]["message"]
