"""Choosing clusters end to end: Admiralty's cluster-level constraints, cordon and taints on virtual nodes.

Every kwok node of the local environment carries ``topology.kubernetes.io/region:
<its cluster>``, so each virtual node ``admiralty-<cluster>`` carries that label too
(a label all of a target's nodes share).
"""

from __future__ import annotations

import asyncio

import pytest
from kubernetes_asyncio import client as k8s

from localenv import LocalEnvironment
from mcsched.constants import PROXY_CONSTRAINTS_ANNOTATION, USE_SPEC_CONSTRAINTS_ANNOTATION
from tests.e2e.pipeline import JSON, SOURCE, create_when_ready, list_pods
from tests.helpers import eventually

pytestmark = pytest.mark.e2e

REGION = "topology.kubernetes.io/region"


def elected_pod(name: str, annotations: dict[str, str] | None = None, **spec: object) -> JSON:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "annotations": {"multicluster.admiralty.io/elect": "", **(annotations or {})}},
            "spec": {"containers": [{"name": "app", "image": "nginx",
                                     "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}], **spec}}


async def proxy_node(core: k8s.CoreV1Api, namespace: str, name: str) -> str | None:
    node: str | None = (await core.read_namespaced_pod(name, namespace)).spec.node_name
    return node


async def pending_message(core: k8s.CoreV1Api, namespace: str, name: str) -> str:
    pod = await core.read_namespaced_pod(name, namespace)
    for condition in pod.status.conditions or []:
        if condition.type == "PodScheduled" and condition.status == "False":
            return str(condition.message or "")
    return ""


async def test_cluster_level_constraints_choose_the_cluster(
        kube: dict[str, k8s.ApiClient], namespace: str) -> None:
    core = k8s.CoreV1Api(kube[SOURCE])
    # Under use-constraints-from-spec the pod's own nodeSelector picks the cluster, and the delegate
    # does not keep it (in the target it would be no constraint at all).
    regional = elected_pod("regional", {USE_SPEC_CONSTRAINTS_ANNOTATION: "true"}, nodeSelector={REGION: "c2"})
    await create_when_ready(lambda: core.create_namespaced_pod(namespace, regional))
    assert await eventually(lambda: proxy_node(core, namespace, "regional"), within=60) == "admiralty-c2"
    [delegate] = await list_pods(kube["c2"], namespace)
    assert REGION not in (delegate["spec"].get("nodeSelector") or {}), "the constraint was the cluster's"

    # Proxy constraints allow only c1's region, while the pod itself fits only a node of c2.
    stuck = elected_pod("stuck", {PROXY_CONSTRAINTS_ANNOTATION: f"nodeSelector:\n  {REGION}: c1\n"},
                        nodeSelector={"kubernetes.io/hostname": "c2-worker-0"})
    await core.create_namespaced_pod(namespace, stuck)
    message = await eventually(lambda: pending_message(core, namespace, "stuck"), within=60)
    assert "c2: excluded: the pod's cluster constraints" in message, message
    assert "c1:" in message and await proxy_node(core, namespace, "stuck") is None


async def test_a_cordoned_or_tainted_virtual_node_takes_no_new_pods_and_keeps_it_across_heartbeats(
        kube: dict[str, k8s.ApiClient], namespace: str, pipeline: LocalEnvironment) -> None:
    c1 = pipeline.cluster(SOURCE)
    core = k8s.CoreV1Api(kube[SOURCE])
    c1.kubectl("cordon", "admiralty-c2")
    try:
        for i in range(4):
            await create_when_ready(lambda i=i: core.create_namespaced_pod(namespace, elected_pod(f"web-{i}")))
        for i in range(4):
            assert await eventually(lambda i=i: proxy_node(core, namespace, f"web-{i}"), within=60) == "admiralty-c1"
        await asyncio.sleep(12)  # more than a heartbeat (heartbeat_seconds: 10)
        node = await core.read_node("admiralty-c2")
        assert node.spec.unschedulable, "the heartbeat must keep the operator's cordon"
    finally:
        c1.kubectl("uncordon", "admiralty-c2")
    c1.kubectl("taint", "node", "admiralty-c2", "upgrade=blue:NoSchedule")
    try:
        await asyncio.sleep(12)
        taints = {(t.key, t.effect) for t in (await core.read_node("admiralty-c2")).spec.taints or []}
        assert ("upgrade", "NoSchedule") in taints and ("virtual-kubelet.io/provider", "NoSchedule") in taints
        pinned = elected_pod("pinned", nodeSelector={"kubernetes.io/hostname": "c2-worker-0"})
        await core.create_namespaced_pod(namespace, pinned)
        message = await eventually(lambda: pending_message(core, namespace, "pinned"), within=60)
        assert "c2: excluded: its virtual node has the untolerated taint upgrade=blue:NoSchedule" in message
    finally:
        c1.kubectl("taint", "node", "admiralty-c2", "upgrade-")
    assert await eventually(lambda: proxy_node(core, namespace, "pinned"), within=60) == "admiralty-c2"
