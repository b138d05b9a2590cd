"""Clusters at runtime: a third cluster added with Admiralty's ClusterTarget and Target, no service restarted.

The session's services know c1 and c2 from their settings. This module starts a
third local cluster, c3 (accepting c1 through a ClusterSource, as any target
does; its kwok nodes carry ``topology.kubernetes.io/region: c3``), then, in c1,
creates the Secret and ClusterTarget an Admiralty user writes. The same service
processes must show c3's virtual node, use it like the others (regions, spread
over three clusters, weights, a namespace's own Target), and, when the
ClusterTarget is deleted, drop the virtual node and move its pods to c1 and c2.
A misconfigured ClusterTarget beside it says why on its status and holds
nothing up.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.config import new_client_from_config

from localenv import LocalEnvironment
from localenv.environment import inline_kubeconfig, single_kubeconfig
from mcsched.constants import (
    CLUSTER_TARGET_NAME_LABEL,
    CLUSTER_WEIGHTS_ANNOTATION,
    PROXY_CONSTRAINTS_ANNOTATION,
    USE_SPEC_CONSTRAINTS_ANNOTATION,
    target_of_virtual_node,
)
from mcsched.targets import encode_kubeconfig
from tests.e2e.pipeline import SOURCE, TARGETS, converged, create_when_ready, list_pods
from tests.helpers import eventually

pytestmark = pytest.mark.e2e

THIRD = "c3"
THREE = (*TARGETS, THIRD)
GROUP, VERSION = "multicluster.admiralty.io", "v1alpha1"
SECRET_NAMESPACE = "default"
REGION = "topology.kubernetes.io/region"


class Third:
    """c3, its admin client, and the kubeconfig Secret data by which c1's services reach it."""

    def __init__(self, cluster: Any, api: k8s.ApiClient) -> None:
        self.cluster, self.api = cluster, api
        self.secret_data = {"config": encode_kubeconfig(inline_kubeconfig(single_kubeconfig(
            cluster.kubeconfig_entry("services"))))}


async def virtual_nodes(core: k8s.CoreV1Api) -> dict[str, bool]:
    """Virtual node name -> Ready."""
    return {n.metadata.name: any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or [])
            for n in (await core.list_node()).items if n.metadata.name.startswith("admiralty-")}


async def node_ready(core: k8s.CoreV1Api, name: str) -> bool:
    return (await virtual_nodes(core)).get(name, False)


def cluster_target(name: str, secret: str) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ClusterTarget", "metadata": {"name": name},
            "spec": {"kubeconfigSecret": {"name": secret, "namespace": SECRET_NAMESPACE}}}


@pytest.fixture(scope="module")
async def third(pipeline: LocalEnvironment, kube: dict[str, k8s.ApiClient]) -> AsyncIterator[Third]:
    """c3 started, and added to c1 as the ClusterTarget c3 (the last test removes it)."""
    cluster = await asyncio.to_thread(pipeline.start_extra_cluster, THIRD)
    api = await new_client_from_config(config_file=str(cluster.admin_kubeconfig))
    core, custom = k8s.CoreV1Api(kube[SOURCE]), k8s.CustomObjectsApi(kube[SOURCE])
    added = Third(cluster, api)
    await core.create_namespaced_secret(SECRET_NAMESPACE, {"apiVersion": "v1", "kind": "Secret", "metadata": {
        "name": "c3-kubeconfig"}, "data": added.secret_data})
    await custom.create_cluster_custom_object(GROUP, VERSION, "clustertargets", cluster_target(THIRD, "c3-kubeconfig"))
    try:
        # no process restarted: the same services compose again with c3
        await eventually(lambda: node_ready(core, f"admiralty-{THIRD}"), within=45)
        yield added
    finally:
        for delete in (lambda: custom.delete_cluster_custom_object(GROUP, VERSION, "clustertargets", THIRD),
                       lambda: core.delete_namespaced_secret("c3-kubeconfig", SECRET_NAMESPACE)):
            try:
                await delete()
            except k8s.ApiException as exc:
                if exc.status != 404:
                    raise
        await eventually(lambda: _gone(core, f"admiralty-{THIRD}"), within=60)
        await api.close()
        await asyncio.to_thread(pipeline.stop_extra_cluster, cluster)


async def _gone(core: k8s.CoreV1Api, name: str) -> bool:
    return name not in await virtual_nodes(core)


async def ready_condition(custom: k8s.CustomObjectsApi, name: str) -> dict[str, Any]:
    obj = await custom.get_cluster_custom_object(GROUP, VERSION, "clustertargets", name)
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"), {})


def deployment(name: str, replicas: int, annotations: dict[str, str]) -> dict[str, Any]:
    labels = {"app": name}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels, "annotations": {
                         "multicluster.admiralty.io/elect": "", **annotations}},
                         "spec": {"containers": [{"name": "app", "image": "nginx", "resources": {
                             "requests": {"cpu": "10m", "memory": "16Mi"}}}]}}}}


def spread(app: str) -> dict[str, str]:
    return {PROXY_CONSTRAINTS_ANNOTATION: json.dumps({"topologySpreadConstraints": [{
        "maxSkew": 1, "topologyKey": CLUSTER_TARGET_NAME_LABEL, "whenUnsatisfiable": "DoNotSchedule",
        "labelSelector": {"matchLabels": {"app": app}}, "matchLabelKeys": ["pod-template-hash"]}]})}


def elected_pod(name: str, annotations: dict[str, str], **spec: object) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "annotations": {"multicluster.admiralty.io/elect": "", **annotations}},
            "spec": {"containers": [{"name": "app", "image": "nginx",
                                     "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}], **spec}}


async def split(kube: dict[str, Any], namespace: str, app: str) -> dict[str | None, int]:
    """Running proxies of ``app`` per cluster they are bound to."""
    counts: dict[str | None, int] = {}
    for proxy in await list_pods(kube[SOURCE], namespace, label_selector=f"app={app}"):
        if proxy["metadata"].get("deletionTimestamp") or proxy["status"].get("phase") != "Running":
            continue
        target = target_of_virtual_node(proxy["spec"].get("nodeName"))
        counts[target] = counts.get(target, 0) + 1
    return counts


async def bound_to(core: k8s.CoreV1Api, namespace: str, name: str) -> str | None:
    return target_of_virtual_node((await core.read_namespaced_pod(name, namespace)).spec.node_name)


async def pending_message(core: k8s.CoreV1Api, namespace: str, name: str) -> str:
    pod = await core.read_namespaced_pod(name, namespace)
    return next((str(c.message or "") for c in pod.status.conditions or []
                 if c.type == "PodScheduled" and c.status == "False"), "")


async def test_a_cluster_target_added_at_runtime_is_ready_and_a_broken_one_says_why(
        kube: dict[str, k8s.ApiClient], third: Third) -> None:
    core, custom = k8s.CoreV1Api(kube[SOURCE]), k8s.CustomObjectsApi(kube[SOURCE])
    await custom.create_cluster_custom_object(GROUP, VERSION, "clustertargets", cluster_target("broken", "missing"))
    try:
        async def conditions() -> bool:
            ok, broken = await ready_condition(custom, THIRD), await ready_condition(custom, "broken")
            return ok.get("status") == "True" and (broken.get("status"), broken.get("reason")) == (
                "False", "SecretNotFound")

        await eventually(conditions, within=30)
        assert "admiralty-broken" not in await virtual_nodes(core)
        assert await node_ready(core, f"admiralty-{THIRD}"), "a broken neighbour holds nothing up"
    finally:
        await custom.delete_cluster_custom_object(GROUP, VERSION, "clustertargets", "broken")


async def test_three_clusters_regions_spread_and_weights(
        kube: dict[str, k8s.ApiClient], namespace: str, third: Third) -> None:
    """Issue 10's checks with a third cluster: a region picks c3, a pod fitting only c3 but held to other
    regions waits with the reason, 12 replicas spread 4/4/4, weights 1:1:2 split 8 replicas 2/2/4."""
    core, apps = k8s.CoreV1Api(kube[SOURCE]), k8s.AppsV1Api(kube[SOURCE])
    everywhere = {**kube, THIRD: third.api}
    regional = elected_pod("regional", {USE_SPEC_CONSTRAINTS_ANNOTATION: "true"}, nodeSelector={REGION: THIRD})
    await create_when_ready(lambda: core.create_namespaced_pod(namespace, regional))
    assert await eventually(lambda: bound_to(core, namespace, "regional"), within=60) == THIRD
    held = elected_pod("held", {PROXY_CONSTRAINTS_ANNOTATION: json.dumps({"affinity": {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": REGION, "operator": "In", "values": list(TARGETS)}]}]}}}})},
        nodeSelector={"kubernetes.io/hostname": f"{THIRD}-worker-0"})
    await core.create_namespaced_pod(namespace, held)
    message = await eventually(lambda: pending_message(core, namespace, "held"), within=60)
    assert f"{THIRD}: excluded: the pod's cluster constraints" in message, message

    await apps.create_namespaced_deployment(namespace, deployment("spread", 12, spread("spread")))
    await apps.create_namespaced_deployment(namespace, deployment("weighted", 8, {
        CLUSTER_WEIGHTS_ANNOTATION: f"c1=1,c2=1,{THIRD}=2"}))

    async def placed() -> bool:
        return sum((await split(kube, namespace, "spread")).values()) == 12 and \
            sum((await split(kube, namespace, "weighted")).values()) == 8

    await eventually(placed, within=120)
    assert await split(kube, namespace, "spread") == {"c1": 4, "c2": 4, THIRD: 4}
    assert await split(kube, namespace, "weighted") == {"c1": 2, "c2": 2, THIRD: 4}
    await core.delete_namespaced_pod("held", namespace, grace_period_seconds=0)
    await converged(everywhere, namespace, 21, within=60, targets=THREE)
    assert len(await list_pods(third.api, namespace)) == 1 + 4 + 4  # the delegates really run in c3


async def test_a_namespace_s_own_target_serves_that_namespace_only(
        kube: dict[str, k8s.ApiClient], namespace: str, third: Third) -> None:
    """Admiralty's Target in a namespace: key <namespace>-c3, virtual node admiralty-<namespace>-c3, usable by
    that namespace's pods; the same cluster is also the ClusterTarget c3, and neither key's reconcilers touch
    the other's delegates."""
    core, custom = k8s.CoreV1Api(kube[SOURCE]), k8s.CustomObjectsApi(kube[SOURCE])
    key = f"{namespace}-{THIRD}"
    await core.create_namespaced_secret(namespace, {"apiVersion": "v1", "kind": "Secret",
                                                    "metadata": {"name": "c3"}, "data": third.secret_data})
    await custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "targets", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "Target", "metadata": {"name": THIRD, "namespace": namespace},
        "spec": {"kubeconfigSecret": {"name": "c3"}}})
    await eventually(lambda: node_ready(core, f"admiralty-{key}"), within=45)
    for name, cluster in (("by-target", key), ("by-cluster-target", THIRD)):
        pod = elected_pod(name, {PROXY_CONSTRAINTS_ANNOTATION: json.dumps({"nodeSelector": {
            CLUSTER_TARGET_NAME_LABEL: cluster}})})
        await create_when_ready(lambda pod=pod: core.create_namespaced_pod(namespace, pod))
    for name, cluster in (("by-target", key), ("by-cluster-target", THIRD)):
        assert await eventually(lambda name=name: bound_to(core, namespace, name), within=60) == cluster

    async def both_running() -> bool:
        pods = {p["metadata"]["name"]: p for p in await list_pods(kube[SOURCE], namespace)}
        return all(pods[n]["status"].get("phase") == "Running" for n in ("by-target", "by-cluster-target"))

    await eventually(both_running, within=60)
    await asyncio.sleep(5)  # a resync (3 s) of both keys: neither takes the other's delegate for a stray
    assert len(await list_pods(third.api, namespace)) == 2
    assert await both_running()

    # Another namespace's pod cannot use it.
    other = f"{namespace}-x"
    await core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": other, "labels": {"multicluster-scheduler": "enabled"}}})
    try:
        outsider = elected_pod("outsider", {PROXY_CONSTRAINTS_ANNOTATION: json.dumps({"nodeSelector": {
            CLUSTER_TARGET_NAME_LABEL: key}})})
        await create_when_ready(lambda: core.create_namespaced_pod(other, outsider))
        message = await eventually(lambda: pending_message(core, other, "outsider"), within=60)
        assert "0/3 clusters are available" in message and f"{key}:" not in message, message
    finally:
        await core.delete_namespace(other)


async def test_a_removed_cluster_target_takes_its_virtual_node_and_its_pods_move(
        kube: dict[str, k8s.ApiClient], namespace: str, third: Third) -> None:
    core, custom = k8s.CoreV1Api(kube[SOURCE]), k8s.CustomObjectsApi(kube[SOURCE])
    apps = k8s.AppsV1Api(kube[SOURCE])
    await create_when_ready(lambda: apps.create_namespaced_deployment(namespace, deployment("moved", 12, spread(
        "moved"))))

    async def spread_over_three() -> bool:
        return await split(kube, namespace, "moved") == {"c1": 4, "c2": 4, THIRD: 4}

    await eventually(spread_over_three, within=120)
    await custom.delete_cluster_custom_object(GROUP, VERSION, "clustertargets", THIRD)
    await eventually(lambda: _gone(core, f"admiralty-{THIRD}"), within=60)

    async def moved() -> bool:
        counts = await split(kube, namespace, "moved")
        return sum(counts.values()) == 12 and set(counts) <= set(TARGETS)

    await eventually(moved, within=120)
    await converged(kube, namespace, 12, within=60)
