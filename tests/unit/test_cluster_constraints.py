"""Cluster-level constraints (Admiralty's proxy-pod annotations) against virtual nodes."""

from __future__ import annotations

import json

import pytest

from mcsched.cluster_constraints import ConstraintError, preferred, refusal, split
from mcsched.constants import PROXY_CONSTRAINTS_ANNOTATION, USE_SPEC_CONSTRAINTS_ANNOTATION

REGION = "topology.kubernetes.io/region"


def virtual_node(target: str, region: str, **spec: object) -> dict[str, object]:
    return {"metadata": {"name": f"admiralty-{target}", "labels": {
        "multicluster.admiralty.io/cluster-target-name": target, REGION: region, "type": "virtual-kubelet"}},
            "spec": {"taints": [{"key": "virtual-kubelet.io/provider", "value": "admiralty", "effect": "NoSchedule"}],
                     **spec}}


def user_pod(annotations: dict[str, str] | None = None, **spec: object) -> dict[str, object]:
    return {"metadata": {"annotations": annotations or {}},
            "spec": {"containers": [{"name": "app", "image": "nginx"}], **spec}}


def test_a_pod_without_the_annotations_has_no_cluster_constraints_and_keeps_its_own() -> None:
    pod = user_pod(nodeSelector={"disk": "ssd"})
    constraints, target_pod = split(pod)
    assert constraints == {"spec": {}}
    assert target_pod["spec"]["nodeSelector"] == {"disk": "ssd"}
    assert refusal(constraints, virtual_node("c2", "eu")) is None


def test_proxy_constraints_add_to_the_pods_own_which_stay_for_the_target() -> None:
    fragment = f"nodeSelector:\n  {REGION}: us\n"  # YAML, as Admiralty users write it
    pod = user_pod({PROXY_CONSTRAINTS_ANNOTATION: fragment}, nodeSelector={"disk": "ssd"})
    constraints, target_pod = split(pod)
    assert constraints["spec"] == {"nodeSelector": {REGION: "us"}}
    assert target_pod["spec"]["nodeSelector"] == {"disk": "ssd"}
    assert refusal(constraints, virtual_node("c1", "us")) is None
    assert "cluster constraints" in (refusal(constraints, virtual_node("c2", "eu")) or "")
    json_fragment = json.dumps({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": REGION, "operator": "NotIn", "values": ["eu"]}]}]}}}})
    constraints, _ = split(user_pod({PROXY_CONSTRAINTS_ANNOTATION: json_fragment}))
    assert refusal(constraints, virtual_node("c1", "us")) is None
    assert refusal(constraints, virtual_node("c2", "eu")) is not None


def test_use_constraints_from_spec_moves_the_pods_constraints_to_the_clusters() -> None:
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": REGION, "operator": "In", "values": ["eu"]}]}]}}}
    spread = [{"maxSkew": 1, "topologyKey": REGION, "whenUnsatisfiable": "DoNotSchedule"}]
    tolerations = [{"key": "gpu", "operator": "Exists"}]
    pod = user_pod({USE_SPEC_CONSTRAINTS_ANNOTATION: ""}, affinity=affinity, topologySpreadConstraints=spread,
                   tolerations=tolerations)
    constraints, target_pod = split(pod)
    assert constraints["spec"] == {"affinity": affinity, "tolerations": tolerations,
                                   "topologySpreadConstraints": spread}
    assert "affinity" not in target_pod["spec"] and "topologySpreadConstraints" not in target_pod["spec"]
    assert target_pod["spec"]["tolerations"] == tolerations and target_pod["spec"]["containers"]
    assert refusal(constraints, virtual_node("c2", "eu")) is None
    assert refusal(constraints, virtual_node("c1", "us")) is not None


def test_a_cordoned_or_tainted_virtual_node_takes_no_new_pods_unless_tolerated() -> None:
    free, _ = split(user_pod())
    assert refusal(free, virtual_node("c2", "eu", unschedulable=True)) == "its virtual node is cordoned"
    tainted = virtual_node("c2", "eu")
    tainted["spec"]["taints"].append({"key": "upgrade", "value": "blue", "effect": "NoSchedule"})  # type: ignore[index]
    assert refusal(free, tainted) == "its virtual node has the untolerated taint upgrade=blue:NoSchedule"
    tolerant, _ = split(user_pod({PROXY_CONSTRAINTS_ANNOTATION: json.dumps(
        {"tolerations": [{"key": "upgrade", "operator": "Exists"},
                         {"key": "node.kubernetes.io/unschedulable", "operator": "Exists"}]})}))
    assert refusal(tolerant, tainted) is None
    assert refusal(tolerant, virtual_node("c2", "eu", unschedulable=True)) is None
    prefer = virtual_node("c2", "eu")
    prefer["spec"]["taints"].append({"key": "x", "effect": "PreferNoSchedule"})  # type: ignore[index]
    assert refusal(free, prefer) is None  # a preference, not a refusal
    assert refusal(free, None) is None  # a virtual node not created yet excludes nothing


@pytest.mark.parametrize("raw, message", [
    ("nodeSelector: [", "not YAML"),
    ("- a\n- b", "a mapping"),
    ("containers: []", "fields other than"),
    ("nodeSelector: [a]", "must be a mapping"),
    ("tolerations: {}", "must be a list"),
    # well-formed at the top, not inside: each of these used to pass and then fail the proxy-scheduler
    ("tolerations: [everything]", r"tolerations\[0\] must be a mapping"),
    ("affinity: {nodeAffinity: {preferredDuringSchedulingIgnoredDuringExecution: [{weight: high, preference: {}}]}}",
     r"preferredDuringSchedulingIgnoredDuringExecution\[0\].weight must be an integer"),
    ("affinity: {nodeAffinity: {preferredDuringSchedulingIgnoredDuringExecution: [{weight: 101, preference: {}}]}}",
     "weight must be less than or equal to 100"),
    ("affinity: {nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: {nodeSelectorTerms: c2}}}",
     "nodeSelectorTerms must be a list"),
    ("affinity: {nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: {nodeSelectorTerms: [{matchExpressions:"
     " [{key: a, operator: In, values: [[1]]}]}]}}}", r"values\[0\] must be a string"),
    ("topologySpreadConstraints: [{maxSkew: 1, topologyKey: k, whenUnsatisfiable: DoNotSchedule, labelSelector:"
     " {matchExpressions: [app=web]}}]", r"labelSelector.matchExpressions\[0\] must be a mapping"),
    ("nodeSelector: {gpu: {yes: 1}}", "nodeSelector.gpu must be a string"),
])
def test_a_malformed_constraints_annotation_is_refused_with_what_is_wrong(raw: str, message: str) -> None:
    with pytest.raises(ConstraintError, match=message):
        split(user_pod({PROXY_CONSTRAINTS_ANNOTATION: raw}))


def test_numbers_and_booleans_where_kubernetes_wants_strings_read_as_strings_as_admiralty_reads_them() -> None:
    """sigs.k8s.io/yaml turns them into strings for string fields: ``gpu: true`` selects label value "true"."""
    fragment = ("nodeSelector: {gpu: true, rack: 1}\n"
                "tolerations: [{key: k, operator: Equal, value: 2, effect: NoSchedule}]")
    constraints, _ = split(user_pod({PROXY_CONSTRAINTS_ANNOTATION: fragment}))
    assert constraints["spec"]["nodeSelector"] == {"gpu": "true", "rack": "1"}
    assert constraints["spec"]["tolerations"][0]["value"] == "2"
    node = virtual_node("c2", "us")
    node["metadata"]["labels"].update({"gpu": "true", "rack": "1"})
    assert refusal(constraints, node) is None


def test_preferred_affinity_ranks_clusters_and_the_best_ones_are_kept() -> None:
    fragment = json.dumps({"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 10, "preference": {"matchExpressions": [{"key": REGION, "operator": "In", "values": ["us"]}]}},
        {"weight": 1, "preference": {"matchExpressions": [{"key": REGION, "operator": "In", "values": ["eu"]}]}}]}}})
    constraints, _ = split(user_pod({PROXY_CONSTRAINTS_ANNOTATION: fragment}))
    nodes = {"c1": virtual_node("c1", "us"), "c2": virtual_node("c2", "eu"), "c3": virtual_node("c3", "ap")}
    assert preferred(constraints, nodes, ["c1", "c2", "c3"]) == ["c1"]
    assert preferred(constraints, nodes, ["c2", "c3"]) == ["c2"], "c1 full: burst to the next preference"
    assert preferred(constraints, nodes, ["c3"]) == ["c3"]
    free, _ = split(user_pod())
    assert preferred(free, nodes, ["c1", "c2", "c3"]) == ["c1", "c2", "c3"]  # no preference: all drawn from
