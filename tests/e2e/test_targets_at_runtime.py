"""Clusters at runtime: a third cluster added and removed with Admiralty's ClusterTarget, no service restarted.

The session's services know c1 and c2 from their settings. This test starts a
third local cluster, c3 (accepting c1 through a ClusterSource, as any target
does), then, in c1, creates the Secret and ClusterTarget an Admiralty user
writes. The same service processes must then show c3's virtual node, spread a
Deployment over three clusters, and, when the ClusterTarget is deleted, drop
the virtual node and move its pods to c1 and c2. A misconfigured ClusterTarget
beside it says why on its status and holds nothing up.
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
from localenv.environment import single_kubeconfig
from mcsched.constants import CLUSTER_TARGET_NAME_LABEL, PROXY_CONSTRAINTS_ANNOTATION, target_of_virtual_node
from mcsched.targets import encode_kubeconfig
from tests.e2e.pipeline import SOURCE, TARGETS, converged, create_when_ready, list_pods
from tests.helpers import eventually

pytestmark = pytest.mark.e2e

THIRD = "c3"
GROUP, VERSION = "multicluster.admiralty.io", "v1alpha1"
SECRET_NAMESPACE = "default"


@pytest.fixture(scope="module")
async def third_cluster(pipeline: LocalEnvironment) -> AsyncIterator[tuple[Any, k8s.ApiClient]]:
    cluster = await asyncio.to_thread(pipeline.start_extra_cluster, THIRD)
    api = await new_client_from_config(config_file=str(cluster.admin_kubeconfig))
    try:
        yield cluster, api
    finally:
        await api.close()
        await asyncio.to_thread(pipeline.stop_extra_cluster, cluster)


def cluster_target(name: str, secret: str) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ClusterTarget", "metadata": {"name": name},
            "spec": {"kubeconfigSecret": {"name": secret, "namespace": SECRET_NAMESPACE}}}


async def ready_condition(custom: k8s.CustomObjectsApi, name: str) -> dict[str, Any]:
    obj = await custom.get_cluster_custom_object(GROUP, VERSION, "clustertargets", name)
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"), {})


async def virtual_nodes(core: k8s.CoreV1Api) -> dict[str, bool]:
    """Virtual node name -> Ready."""
    return {n.metadata.name: any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or [])
            for n in (await core.list_node()).items if n.metadata.name.startswith("admiralty-")}


def spread_deployment(replicas: int) -> dict[str, Any]:
    spread = {"topologySpreadConstraints": [{
        "maxSkew": 1, "topologyKey": CLUSTER_TARGET_NAME_LABEL, "whenUnsatisfiable": "DoNotSchedule",
        "labelSelector": {"matchLabels": {"app": "three"}}, "matchLabelKeys": ["pod-template-hash"]}]}
    labels = {"app": "three"}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "three"},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels, "annotations": {
                         "multicluster.admiralty.io/elect": "", PROXY_CONSTRAINTS_ANNOTATION: json.dumps(spread)}},
                         "spec": {"containers": [{"name": "app", "image": "nginx", "resources": {
                             "requests": {"cpu": "10m", "memory": "16Mi"}}}]}}}}


async def split(kube: dict[str, Any], namespace: str) -> dict[str | None, int]:
    counts: dict[str | None, int] = {}
    for proxy in await list_pods(kube[SOURCE], namespace, label_selector="app=three"):
        if proxy["metadata"].get("deletionTimestamp") or proxy["status"].get("phase") != "Running":
            continue
        target = target_of_virtual_node(proxy["spec"].get("nodeName"))
        counts[target] = counts.get(target, 0) + 1
    return counts


async def test_a_cluster_target_added_and_removed_at_runtime(
        kube: dict[str, k8s.ApiClient], namespace: str, third_cluster: tuple[Any, k8s.ApiClient]) -> None:
    cluster, third_api = third_cluster
    core, custom = k8s.CoreV1Api(kube[SOURCE]), k8s.CustomObjectsApi(kube[SOURCE])
    apps = k8s.AppsV1Api(kube[SOURCE])
    everywhere = {**kube, THIRD: third_api}
    # A ClusterTarget whose Secret does not exist: refused with a reason, holding nothing up.
    await custom.create_cluster_custom_object(GROUP, VERSION, "clustertargets", cluster_target("broken", "missing"))
    kubeconfig = single_kubeconfig(cluster.kubeconfig_entry("services"))  # the identity c3 accepts for c1
    await core.create_namespaced_secret(SECRET_NAMESPACE, {"apiVersion": "v1", "kind": "Secret", "metadata": {
        "name": "c3-kubeconfig"}, "data": {"config": encode_kubeconfig(kubeconfig)}})
    try:
        await custom.create_cluster_custom_object(GROUP, VERSION, "clustertargets",
                                                  cluster_target(THIRD, "c3-kubeconfig"))

        async def added() -> bool:
            return (await virtual_nodes(core)).get(f"admiralty-{THIRD}", False)

        await eventually(added, within=30)  # no process restarted: the same services compose again

        async def says_ready() -> bool:
            return (await ready_condition(custom, THIRD)).get("status") == "True"

        await eventually(says_ready, within=30)

        async def broken_says_why() -> bool:
            condition = await ready_condition(custom, "broken")
            return condition.get("status") == "False" and condition.get("reason") == "SecretNotFound"

        await eventually(broken_says_why, within=30)
        assert "admiralty-broken" not in await virtual_nodes(core)

        # Three clusters, twelve replicas spread with maxSkew 1: four in each.
        await create_when_ready(lambda: apps.create_namespaced_deployment(namespace, spread_deployment(12)))
        await converged(everywhere, namespace, 12, within=120, targets=(*TARGETS, THIRD))
        assert await split(kube, namespace) == {"c1": 4, "c2": 4, THIRD: 4}
        assert len(await list_pods(third_api, namespace)) == 4  # the delegates really run in c3
    finally:
        await custom.delete_cluster_custom_object(GROUP, VERSION, "clustertargets", THIRD)
        await custom.delete_cluster_custom_object(GROUP, VERSION, "clustertargets", "broken")
        await core.delete_namespaced_secret("c3-kubeconfig", SECRET_NAMESPACE)

    # Removed: its virtual node goes, its proxies are deleted and replaced in c1 and c2.
    async def removed() -> bool:
        return f"admiralty-{THIRD}" not in await virtual_nodes(core)

    await eventually(removed, within=60)

    async def moved() -> bool:
        counts = await split(kube, namespace)
        return sum(counts.values()) == 12 and set(counts) <= set(TARGETS)

    await eventually(moved, within=120)
    await converged(kube, namespace, 12, within=60)
