"""Elected pod -> proxy pod -> delegate pod -> mirrored status, as pure transforms."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mcsched.admission import review, webhook_configuration
from mcsched.choice import Placement
from mcsched.constants import (
    CLUSTER_CHOSEN_LABEL,
    ELECT_ANNOTATION,
    PARENT_UID_LABEL,
    PLACEMENT_ANNOTATION,
    PROXY_FINALIZER,
    PROXY_SCHEDULER_NAME,
    SOURCE_MANIFEST_ANNOTATION,
)
from mcsched.placement import tolerates
from mcsched.podspec import (
    SCHEDULING_FIELDS,
    VIRTUAL_NODE_TOLERATION,
    ElectionError,
    apply_patch,
    awaits_replacement,
    delegate_manifest,
    delegate_name,
    delegate_original,
    election,
    is_finished,
    is_proxy,
    mirrored_status,
    newer_resource_version,
    parent_ref,
    proxy_patch,
    source_manifest,
    status_differs,
    stray_action,
    stray_status,
    unschedulable_reason,
)
from mcsched.shards import PARTITION_LABEL, PARTITIONS


def elected_pod(value: str = "") -> dict:
    return {
        "metadata": {"generateName": "nginx-5466f8ddf7-", "namespace": "default",
                     "labels": {"app": "nginx", "pod-template-hash": "5466f8ddf7"},
                     "annotations": {ELECT_ANNOTATION: value, "team": "web"}},
        "spec": {
            "containers": [{"name": "nginx", "image": "nginx",
                            "resources": {"requests": {"cpu": "100m", "memory": "32Mi"}},
                            "volumeMounts": [{"name": "kube-api-access-abcde",
                                              "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]}],
            "volumes": [{"name": "kube-api-access-abcde", "projected": {"sources": []}}],
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute",
                             "tolerationSeconds": 300}],
            "affinity": {"nodeAffinity": {}}, "priority": 0, "schedulerName": "default-scheduler",
        },
    }


@pytest.mark.parametrize(("value", "expected"), [("", True), ("true", True), ("TRUE", True), ("false", False)])
def test_election_values(value: str, expected: bool) -> None:
    assert election(elected_pod(value)) is expected


def test_election_rejects_malformed_value_with_a_clear_message() -> None:
    with pytest.raises(ElectionError, match='elect="yes please" is not understood'):
        election(elected_pod("yes please"))


def test_pod_without_annotation_is_not_elected() -> None:
    assert election({"metadata": {}}) is False


def test_proxy_patch_makes_a_proxy_and_keeps_the_original() -> None:
    pod = elected_pod()
    proxy = apply_patch(pod, proxy_patch(pod))
    assert is_proxy(proxy)
    assert proxy["spec"]["schedulerName"] == PROXY_SCHEDULER_NAME
    assert proxy["spec"]["nodeSelector"] == {"type": "virtual-kubelet"}
    assert "affinity" not in proxy["spec"]
    assert PROXY_FINALIZER in proxy["metadata"]["finalizers"]
    assert VIRTUAL_NODE_TOLERATION in proxy["spec"]["tolerations"]
    # The annotation keeps only what the proxy lost (the scheduling fields), so it stays small.
    assert source_manifest(proxy) == {"spec": {k: pod["spec"][k] for k in SCHEDULING_FIELDS if k in pod["spec"]}}
    original = delegate_original(proxy)
    assert original["spec"]["containers"] == pod["spec"]["containers"]
    assert {k: original["spec"].get(k) for k in SCHEDULING_FIELDS} == {k: pod["spec"].get(k) for k in SCHEDULING_FIELDS}
    assert ELECT_ANNOTATION not in original["metadata"]["annotations"]
    assert SOURCE_MANIFEST_ANNOTATION not in original["metadata"]["annotations"]
    # The partition label (mcsched.shards) is added to the user's labels, and kept if valid.
    partition = original["metadata"]["labels"].pop(PARTITION_LABEL)
    assert partition in {str(p) for p in range(PARTITIONS)}
    assert original["metadata"]["labels"] == pod["metadata"]["labels"]
    assert apply_patch(pod, proxy_patch(pod, partition="7"))["metadata"]["labels"][PARTITION_LABEL] == "7"
    labelled = {**pod, "metadata": {**pod["metadata"], "labels": {PARTITION_LABEL: "11"}}}
    assert apply_patch(labelled, proxy_patch(labelled, partition="7"))["metadata"]["labels"][PARTITION_LABEL] == "11"
    wrong = {**pod, "metadata": {**pod["metadata"], "labels": {PARTITION_LABEL: "12"}}}
    assert apply_patch(wrong, proxy_patch(wrong, partition="7"))["metadata"]["labels"][PARTITION_LABEL] == "7"


NOT_READY, UNREACHABLE = "node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"
DEFAULTED = [{"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
             for key in (NOT_READY, UNREACHABLE)]


def _failover_seconds(tolerations: list[dict[str, Any]]) -> dict[str, list[int | None]]:
    """taint key -> the tolerationSeconds of each toleration that matches its NoExecute taint."""
    taints = {key: {"key": key, "effect": "NoExecute"} for key in (NOT_READY, UNREACHABLE)}
    return {key: [t.get("tolerationSeconds") for t in tolerations if tolerates([t], taint)]
            for key, taint in taints.items()}


@pytest.mark.parametrize(("own", "failover_seconds", "expected"), [
    # What every pod gets from DefaultTolerationSeconds: replaced by the setting.
    (DEFAULTED, 300, {NOT_READY: [300], UNREACHABLE: [300]}),
    (DEFAULTED, 20, {NOT_READY: [20], UNREACHABLE: [20]}),
    (DEFAULTED, None, {NOT_READY: [None], UNREACHABLE: [None]}),
    ([], 45, {NOT_READY: [45], UNREACHABLE: [45]}),
    # A pod's own choice wins, key by key.
    ([{**DEFAULTED[0], "tolerationSeconds": 10}, DEFAULTED[1]], 600, {NOT_READY: [10], UNREACHABLE: [600]}),
    ([{"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute"}], 60,
     {NOT_READY: [60], UNREACHABLE: [None]}),
    ([{"key": UNREACHABLE, "operator": "Exists"}], 60, {NOT_READY: [60], UNREACHABLE: [None]}),
    ([{"operator": "Exists"}], 60, {NOT_READY: [None], UNREACHABLE: [None]}),
    # A toleration of another effect does not keep the pod on a lost cluster.
    ([{"key": NOT_READY, "operator": "Exists", "effect": "NoSchedule"}], 60, {NOT_READY: [60], UNREACHABLE: [60]}),
])
def test_a_proxy_leaves_a_lost_cluster_after_the_pods_own_delay_or_the_setting(
        own: list[dict[str, Any]], failover_seconds: int | None, expected: dict[str, list[int | None]]) -> None:
    pod = elected_pod()
    pod["spec"]["tolerations"] = [*own, {"key": "gpu", "operator": "Exists"}]
    proxy = apply_patch(pod, proxy_patch(pod, failover_seconds=failover_seconds))
    tolerations = proxy["spec"]["tolerations"]
    assert _failover_seconds([t for t in tolerations if t.get("key") != "gpu"]) == expected
    assert {"key": "gpu", "operator": "Exists"} in tolerations and VIRTUAL_NODE_TOLERATION in tolerations
    # The delegate keeps the pod's tolerations as the user (and DefaultTolerationSeconds) made them.
    assert delegate_original(proxy)["spec"]["tolerations"] == pod["spec"]["tolerations"]


def test_a_pod_near_the_size_limit_becomes_a_proxy_whose_annotations_stay_small() -> None:
    """Annotations are limited to 256 KiB in all: a copy of a big spec there would fail admission."""
    pod = elected_pod()
    pod["spec"]["containers"][0]["env"] = [{"name": f"V{i}", "value": "x" * 1000} for i in range(900)]  # ~0.9 MB
    pod["metadata"]["annotations"]["big"] = "y" * 200_000
    proxy = apply_patch(pod, proxy_patch(pod))
    size = sum(len(k) + len(v) for k, v in proxy["metadata"]["annotations"].items())
    assert size < 256 * 1024, f"proxy annotations are {size} bytes"
    delegate = delegate_original(proxy)
    assert len(delegate["spec"]["containers"][0]["env"]) == 900 and delegate["metadata"]["annotations"]["big"]


def test_proxy_patch_is_idempotent() -> None:
    pod = elected_pod()
    proxy = apply_patch(pod, proxy_patch(pod))
    assert proxy_patch(proxy) == []


@pytest.mark.parametrize("from_a_proxy", [True, False], ids=["proxy-yaml", "pod-yaml"])
def test_a_pod_made_from_a_placed_proxy_s_yaml_arrives_with_no_cluster_chosen(from_a_proxy: bool) -> None:
    """The choice and its label would keep the new pod out of the watcher's sight: both are dropped."""
    proxy = apply_patch(elected_pod(), proxy_patch(elected_pod()))
    proxy["metadata"]["labels"][CLUSTER_CHOSEN_LABEL] = "true"
    proxy["metadata"]["annotations"][PLACEMENT_ANNOTATION] = Placement().choose("c2").annotation()
    if not from_a_proxy:  # its scheduler name edited back: an elected pod again
        proxy["spec"].pop("schedulerName")
    created = apply_patch(proxy, proxy_patch(proxy))
    assert CLUSTER_CHOSEN_LABEL not in created["metadata"]["labels"]
    assert PLACEMENT_ANNOTATION not in created["metadata"]["annotations"]
    assert created["metadata"]["labels"]["app"] == proxy["metadata"]["labels"]["app"]
    assert Placement.of(created).target is None


def test_delegate_name_is_stable_and_kubernetes_like() -> None:
    first = delegate_name("nginx-5466f8ddf7-4knlk", "uid-1")
    assert first == delegate_name("nginx-5466f8ddf7-4knlk", "uid-1")
    assert first != delegate_name("nginx-5466f8ddf7-4knlk", "uid-2")
    assert first.startswith("nginx-5466f8ddf7-4knlk-") and len(first.rsplit("-", 1)[1]) == 5


def test_delegate_manifest_from_original() -> None:
    pod = elected_pod()
    original = delegate_original(apply_patch(pod, proxy_patch(pod)))
    owner = {"metadata": {"name": "default", "uid": "ns-uid"}}
    delegate = delegate_manifest(original, source="c1", namespace="default", proxy_name="nginx-abc",
                                 proxy_uid="u1", owner=owner)
    spec, meta = delegate["spec"], delegate["metadata"]
    assert meta["name"] == delegate_name("nginx-abc", "u1")
    # The user's labels move into our domain, so nothing in the target selects the delegate by mistake.
    assert meta["labels"]["multicluster.admiralty.io/app"] == "nginx" and "app" not in meta["labels"]
    assert meta["labels"][PARENT_UID_LABEL] == "u1"
    assert ELECT_ANNOTATION not in meta["annotations"]
    assert meta["ownerReferences"][0]["kind"] == "Namespace" and meta["ownerReferences"][0]["controller"]
    assert "nodeName" not in spec, "the target's scheduler places the delegate"
    assert "priority" not in spec
    assert "volumes" not in spec or not spec["volumes"]
    assert "volumeMounts" not in spec["containers"][0]
    assert spec["schedulerName"] == "default-scheduler"
    assert parent_ref(delegate) == ("c1", "default", "nginx-abc", "u1")


def test_delegate_scheduler_name_per_target() -> None:
    delegate = delegate_manifest({"metadata": {}, "spec": {"containers": [], "nodeName": "c1-worker-0"}},
                                 source="c1", namespace="n", proxy_name="p", proxy_uid="u",
                                 scheduler_name="gpu-scheduler")
    assert delegate["spec"]["schedulerName"] == "gpu-scheduler"
    assert "nodeName" not in delegate["spec"] and "ownerReferences" not in delegate["metadata"]


def test_what_the_source_s_admission_filled_in_is_left_for_the_target_s_to_decide() -> None:
    """overhead (RuntimeClass), preemptionPolicy and priority (PriorityClass) came from the source's classes;
    the target's admission refuses a pod whose values differ from its own classes'."""
    spec = {"containers": [], "priorityClassName": "high", "priority": 1000, "preemptionPolicy": "Never",
            "runtimeClassName": "gvisor", "overhead": {"cpu": "250m"}, "schedulingGates": [{"name": "x"}]}
    delegate = delegate_manifest({"metadata": {}, "spec": spec}, source="c1", namespace="n", proxy_name="p",
                                 proxy_uid="u")
    assert delegate["spec"] == {"containers": [], "priorityClassName": "high", "runtimeClassName": "gvisor"}


def test_names_of_any_legal_length_link_proxy_and_delegate() -> None:
    long_name = "a" * 200 + "-" + "b" * 49  # 250 characters, a legal pod name
    delegate = delegate_manifest({"metadata": {}, "spec": {"containers": []}}, source="c1", namespace="n",
                                 proxy_name=long_name, proxy_uid="u")
    meta = delegate["metadata"]
    assert len(meta["name"]) <= 253
    assert all(len(v) <= 63 for v in meta["labels"].values())
    assert parent_ref(delegate) == ("c1", "n", long_name, "u")
    # A cut that would end a DNS label with "-" or "." before the suffix is trimmed.
    cut = delegate_name("x" * 246 + ".-yyy", "u")
    assert ".-" not in cut and "--" not in cut and len(cut) <= 253


def test_parent_ref_of_a_delegate_without_the_name_annotation() -> None:
    labels = {"multicluster.admiralty.io/parent-cluster": "c1", "multicluster.admiralty.io/parent-namespace": "n",
              "multicluster.admiralty.io/parent-name": "p", PARENT_UID_LABEL: "u"}
    assert parent_ref({"metadata": {"labels": labels}}) == ("c1", "n", "p", "u")
    assert parent_ref({"metadata": {"labels": {PARENT_UID_LABEL: "u"}}}) is None


def test_pod_scheduled_belongs_to_the_proxy() -> None:
    delegate_status = {"phase": "Running", "conditions": [
        {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]}
    wanted = mirrored_status(delegate_status)
    assert [c["type"] for c in wanted["conditions"]] == ["Ready"]
    proxy_status = {"phase": "Running", "conditions": [
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": "t0"}, {"type": "Ready", "status": "True"}]}
    assert not status_differs(proxy_status, wanted), "the proxy's own PodScheduled is no difference"
    assert status_differs({"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}]}, wanted)


def test_unschedulable_reason() -> None:
    refused = {"spec": {}, "status": {"conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes"}]}}
    assert unschedulable_reason(refused) == "0/3 nodes"
    preempting = {"spec": {}, "status": {**refused["status"], "nominatedNodeName": "n1"}}
    assert unschedulable_reason(preempting) is None
    assert unschedulable_reason({"spec": {"nodeName": "n1"}, "status": refused["status"]}) is None
    assert unschedulable_reason({"spec": {}, "status": {"phase": "Pending"}}) is None
    gated = {"spec": {}, "status": {"conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}]}}
    assert unschedulable_reason(gated) is None


def test_is_finished() -> None:
    assert is_finished({"status": {"phase": "Succeeded"}}) and is_finished({"status": {"phase": "Failed"}})
    assert not is_finished({"status": {"phase": "Running"}}) and not is_finished({})


def test_mirrored_status_and_difference() -> None:
    status = {"phase": "Running", "podIP": "10.17.0.2", "podIPs": [{"ip": "10.17.0.2"}], "qosClass": "Burstable",
              "conditions": [{"type": "Ready", "status": "True"}]}
    mirrored = mirrored_status(status)
    assert mirrored["podIP"] == "10.17.0.2" and "qosClass" not in mirrored
    assert status_differs({"phase": "Pending"}, mirrored)
    assert not status_differs(dict(status), mirrored)


def admission_review(pod: dict) -> dict:
    return {"request": {"uid": "r1", "kind": {"kind": "Pod"}, "operation": "CREATE", "namespace": "default",
                        "object": pod}}


def test_review_patches_elected_pods() -> None:
    answer = review(admission_review(elected_pod()))["response"]
    assert answer["allowed"] and answer["uid"] == "r1" and answer["patchType"] == "JSONPatch"


def test_review_refuses_malformed_annotation() -> None:
    answer = review(admission_review(elected_pod("maybe")))["response"]
    assert not answer["allowed"] and "not understood" in answer["status"]["message"]


def test_review_leaves_other_pods_alone() -> None:
    answer = review(admission_review({"metadata": {"name": "x"}, "spec": {}}))["response"]
    assert answer == {"uid": "r1", "allowed": True}


def test_webhook_configuration_selects_enabled_namespaces_and_elected_pods() -> None:
    config = webhook_configuration("https://127.0.0.1:8443/mutate-pods", b"CA", "Fail", 5)
    hook = config["webhooks"][0]
    assert hook["namespaceSelector"] == {"matchLabels": {"multicluster-scheduler": "enabled"}}
    assert ELECT_ANNOTATION in hook["matchConditions"][0]["expression"]
    assert hook["failurePolicy"] == "Fail" and json.dumps(config)
    assert SOURCE_MANIFEST_ANNOTATION.startswith("multicluster.admiralty.io/")


def test_newer_resource_version_compares_revisions_as_numbers() -> None:
    assert newer_resource_version("1000", "999")
    assert not newer_resource_version("999", "1000")
    assert not newer_resource_version("5", "5")
    assert not newer_resource_version(None, "5")
    assert not newer_resource_version("5", None)
    assert not newer_resource_version("opaque", "5")  # not an etcd revision: never claimed newer


def test_a_delegate_is_built_from_the_proxys_own_spec_and_the_users_scheduling_fields() -> None:
    from mcsched.podspec import delegate_original

    pod = elected_pod()
    proxy = apply_patch(pod, proxy_patch(pod))
    proxy["spec"]["priority"] = 0  # set by the source's admission after ours
    original = delegate_original(proxy)
    assert original["spec"]["affinity"] == pod["spec"]["affinity"], "the webhook removed it from the proxy"
    assert original["spec"]["schedulerName"] == "default-scheduler"
    assert original["spec"]["tolerations"] == pod["spec"]["tolerations"]
    assert original["spec"]["containers"] == proxy["spec"]["containers"]
    forged = json.loads(proxy["metadata"]["annotations"][SOURCE_MANIFEST_ANNOTATION])
    forged["spec"]["containers"] = [{"name": "evil", "image": "evil", "securityContext": {"privileged": True}}]
    forged["spec"]["hostNetwork"] = True
    proxy["metadata"]["annotations"][SOURCE_MANIFEST_ANNOTATION] = json.dumps(forged)
    original = delegate_original(proxy)
    assert original["spec"]["containers"] == proxy["spec"]["containers"] and "hostNetwork" not in original["spec"]
    proxy["spec"]["ephemeralContainers"] = [{"name": "debug", "image": "busybox"}]
    proxy["spec"]["nodeName"] = "admiralty-c2"
    assert "ephemeralContainers" not in delegate_original(proxy)["spec"]
    assert "nodeName" not in delegate_original(proxy)["spec"]
    with pytest.raises(ValueError):
        delegate_original({"metadata": {}, "spec": {}})


def test_delegate_labels_move_into_our_domain_and_its_pod_selectors_follow() -> None:
    term = {"labelSelector": {"matchLabels": {"app": "web"},
                              "matchExpressions": [{"key": "example.com/tier", "operator": "In", "values": ["a"]}]},
            "namespaceSelector": {"matchLabels": {"team": "x"}}, "topologyKey": "kubernetes.io/hostname",
            "matchLabelKeys": ["pod-template-hash"]}
    spec = {"containers": [{"name": "c", "image": "i"}],
            "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term],
                                             "preferredDuringSchedulingIgnoredDuringExecution": [
                                                 {"weight": 1, "podAffinityTerm": json.loads(json.dumps(term))}]}},
            "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule",
                                           "labelSelector": {"matchLabels": {"app": "web", "keep.io/me": "1"}}}]}
    original = {"metadata": {"labels": {"app": "web", "example.com/tier": "a", "keep.io/me": "1"},
                             "annotations": {"multicluster.admiralty.io/label-keys-to-skip-prefixing": "keep.io/me"}},
                "spec": spec}
    delegate = delegate_manifest(original, source="c1", namespace="n", proxy_name="p", proxy_uid="u")
    labels = delegate["metadata"]["labels"]
    assert {k: v for k, v in labels.items() if not k.startswith("multicluster.admiralty.io/parent")} == {
        "multicluster.admiralty.io/app": "web", "multicluster.admiralty.io/tier": "a", "keep.io/me": "1",
        PARTITION_LABEL: "0"}  # the proxy had none: partition 0, as the proxy's own watchers see it
    required = delegate["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert required["labelSelector"]["matchLabels"] == {"multicluster.admiralty.io/app": "web"}
    assert required["labelSelector"]["matchExpressions"][0]["key"] == "multicluster.admiralty.io/tier"
    assert required["namespaceSelector"] == {"matchLabels": {"team": "x"}}  # namespaces keep their labels
    assert required["matchLabelKeys"] == ["multicluster.admiralty.io/pod-template-hash"]
    preferred = delegate["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred[0]["podAffinityTerm"]["labelSelector"]["matchLabels"] == {"multicluster.admiralty.io/app": "web"}
    assert delegate["spec"]["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"] == {
        "multicluster.admiralty.io/app": "web", "keep.io/me": "1"}
    assert spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0][
        "labelSelector"]["matchLabels"] == {"app": "web"}, "the original is not changed"


def test_a_virtual_node_fails_pods_that_are_not_proxies_and_removes_them_once_deleted() -> None:
    proxy = apply_patch(elected_pod(), proxy_patch(elected_pod()))
    daemon = {"metadata": {"name": "agent"}, "spec": {"schedulerName": "default-scheduler"}, "status": {}}
    assert stray_action(proxy) is None
    assert stray_action(daemon) == "fail"
    assert stray_action({**daemon, "status": {"phase": "Failed"}}) is None
    assert stray_action({**daemon, "metadata": {"name": "agent", "deletionTimestamp": "2026-01-01T00:00:00Z"}}) \
        == "delete"
    assert stray_status("admiralty-c2")["phase"] == "Failed"


def _drained(**meta: Any) -> dict[str, Any]:
    return {"metadata": {"uid": "old", "deletionTimestamp": "2026-01-01T00:00:30Z", "deletionGracePeriodSeconds": 30,
                         "ownerReferences": [{"kind": "ReplicaSet", "uid": "rs", "controller": True}], **meta}}


def _sibling(uid: str, created: str, ready: bool = True, owner: str = "rs") -> dict[str, Any]:
    return {"metadata": {"uid": uid, "creationTimestamp": created,
                         "ownerReferences": [{"kind": "ReplicaSet", "uid": owner, "controller": True}]},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


CORDONED = {"metadata": {"name": "admiralty-c2"}, "spec": {"unschedulable": True}}


@pytest.mark.parametrize(("proxy", "node", "siblings", "now", "waits"), [
    (_drained(), CORDONED, [], "2026-01-01T00:00:05Z", True),
    # Its replacement (made after the eviction at 00:00:00) is Ready: the delegate may go.
    (_drained(), CORDONED, [_sibling("new", "2026-01-01T00:00:01Z")], "2026-01-01T00:00:05Z", False),
    (_drained(), CORDONED, [_sibling("new", "2026-01-01T00:00:01Z", ready=False)], "2026-01-01T00:00:05Z", True),
    # A pod of the set that ran before is no replacement; another controller's pod neither.
    (_drained(), CORDONED, [_sibling("peer", "2025-12-31T23:00:00Z")], "2026-01-01T00:00:05Z", True),
    (_drained(), CORDONED, [_sibling("new", "2026-01-01T00:00:01Z", owner="other")], "2026-01-01T00:00:05Z", True),
    # Two pods evicted within one second: the first one's Ready replacement is not this one's while
    # another replacement (its own) is not Ready yet; once every live pod is Ready, it may go.
    (_drained(), CORDONED, [_sibling("first-new", "2026-01-01T00:00:00Z"),
                            _sibling("own-new", "2026-01-01T00:00:00Z", ready=False),
                            _sibling("peer", "2025-12-31T23:00:00Z")], "2026-01-01T00:00:02Z", True),
    (_drained(), CORDONED, [_sibling("first-new", "2026-01-01T00:00:00Z"),
                            _sibling("own-new", "2026-01-01T00:00:00Z"),
                            _sibling("peer", "2025-12-31T23:00:00Z")], "2026-01-01T00:00:02Z", False),
    # The grace period is over: it goes whatever happened.
    (_drained(), CORDONED, [], "2026-01-01T00:00:30Z", False),
    # Not a drain: a node not cordoned, a force deletion, a pod without a controller.
    (_drained(), {"metadata": {"name": "admiralty-c2"}, "spec": {}}, [], "2026-01-01T00:00:05Z", False),
    (_drained(), None, [], "2026-01-01T00:00:05Z", False),
    (_drained(deletionGracePeriodSeconds=0), CORDONED, [], "2026-01-01T00:00:05Z", False),
    (_drained(ownerReferences=[]), CORDONED, [], "2026-01-01T00:00:05Z", False),
])
def test_a_drained_proxy_keeps_its_delegate_until_its_replacement_is_ready(
        proxy: dict[str, Any], node: dict[str, Any] | None, siblings: list[dict[str, Any]], now: str,
        waits: bool) -> None:
    assert awaits_replacement(proxy, node, siblings, now) is waits
