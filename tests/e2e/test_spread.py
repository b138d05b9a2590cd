"""Spreading a Deployment across clusters end to end: topology spread over virtual-node labels, weighted splits.

The local environment's targets are c1 (the source itself) and c2. The proxies are
sampled while the Deployment's pods are placed: a cluster counts once its choice
is recorded on a proxy (the placement annotation) or the proxy is bound to its
virtual node, as the proxy-scheduler counts.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from kubernetes_asyncio import client as k8s

from mcsched.choice import Placement
from mcsched.constants import (
    CLUSTER_TARGET_NAME_LABEL,
    CLUSTER_WEIGHTS_ANNOTATION,
    PROXY_CONSTRAINTS_ANNOTATION,
    PROXY_SCHEDULER_NAME,
    target_of_virtual_node,
)
from tests.e2e.pipeline import JSON, SOURCE, TARGETS, converged, create_when_ready, list_pods

pytestmark = pytest.mark.e2e


def deployment(name: str, replicas: int, annotations: dict[str, str] | None = None) -> JSON:
    labels = {"app": name}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels, "annotations": {
                         "multicluster.admiralty.io/elect": "", **(annotations or {})}},
                         "spec": {"containers": [{"name": "app", "image": "nginx", "resources": {
                             "requests": {"cpu": "10m", "memory": "16Mi"}}}]}}}}


async def split(kube: dict[str, Any], namespace: str, app: str) -> tuple[dict[str, int], int]:
    """Live proxies per cluster (bound, or with a cluster recorded), and how many proxies there are."""
    proxies = [p for p in await list_pods(kube[SOURCE], namespace, label_selector=f"app={app}")
               if p["spec"].get("schedulerName") == PROXY_SCHEDULER_NAME and not p["metadata"].get("deletionTimestamp")]
    counts = dict.fromkeys(TARGETS, 0)
    for proxy in proxies:
        target = target_of_virtual_node(proxy["spec"].get("nodeName")) or Placement.of(proxy).target
        if target is not None:
            counts[target] += 1
    return counts, len(proxies)


async def sample_until_placed(kube: dict[str, Any], namespace: str, app: str, replicas: int,
                              within: float = 90.0) -> list[dict[str, int]]:
    """Every split seen until all ``replicas`` proxies have a cluster (sampled every 0.1 s)."""
    samples: list[dict[str, int]] = []
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        counts, _ = await split(kube, namespace, app)
        samples.append(counts)
        if sum(counts.values()) == replicas:
            return samples
        await asyncio.sleep(0.1)
    raise AssertionError(f"not all {replicas} pods got a cluster within {within}s: {samples[-5:]}")


async def test_a_deployment_spread_with_max_skew_1_over_clusters_splits_4_4_at_every_moment(
        kube: dict[str, k8s.ApiClient], namespace: str) -> None:
    spread = {"topologySpreadConstraints": [{
        "maxSkew": 1, "topologyKey": CLUSTER_TARGET_NAME_LABEL, "whenUnsatisfiable": "DoNotSchedule",
        "labelSelector": {"matchLabels": {"app": "spread"}}, "matchLabelKeys": ["pod-template-hash"]}]}
    apps = k8s.AppsV1Api(kube[SOURCE])
    await create_when_ready(lambda: apps.create_namespaced_deployment(
        namespace, deployment("spread", 8, {PROXY_CONSTRAINTS_ANNOTATION: json.dumps(spread)})))
    samples = await sample_until_placed(kube, namespace, "spread", 8)
    over = [s for s in samples if abs(s["c1"] - s["c2"]) > 1]
    assert not over, f"a moment with a skew above 1: {over[:5]} (of {len(samples)} samples)"
    assert samples[-1] == {"c1": 4, "c2": 4}, samples[-1]
    await converged(kube, namespace, 8, within=90)
    assert (await split(kube, namespace, "spread"))[0] == {"c1": 4, "c2": 4}


async def test_a_deployment_weighted_c1_1_c2_3_in_its_namespace_splits_2_6(
        kube: dict[str, k8s.ApiClient], namespace: str) -> None:
    core, apps = k8s.CoreV1Api(kube[SOURCE]), k8s.AppsV1Api(kube[SOURCE])
    await core.patch_namespace(namespace, {"metadata": {"annotations": {CLUSTER_WEIGHTS_ANNOTATION: "c1=1,c2=3"}}})
    await asyncio.sleep(1)  # the proxy-scheduler's cache of namespaces sees it
    await create_when_ready(lambda: apps.create_namespaced_deployment(namespace, deployment("weighted", 8)))
    samples = await sample_until_placed(kube, namespace, "weighted", 8)
    # c1's share never runs ahead of a quarter (rounded up), whatever order the choices are stored in
    assert all(s["c1"] <= 2 for s in samples), [s for s in samples if s["c1"] > 2][:5]
    assert samples[-1] == {"c1": 2, "c2": 6}, samples[-1]
    await converged(kube, namespace, 8, within=90)
    assert (await split(kube, namespace, "weighted"))[0] == {"c1": 2, "c2": 6}


async def test_malformed_weights_on_a_pod_are_refused_at_creation(
        kube: dict[str, k8s.ApiClient], namespace: str) -> None:
    core = k8s.CoreV1Api(kube[SOURCE])
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bad-weights", "annotations": {
        "multicluster.admiralty.io/elect": "", CLUSTER_WEIGHTS_ANNOTATION: "c1=1;c2=3"}},
        "spec": {"containers": [{"name": "app", "image": "nginx"}]}}
    with pytest.raises(k8s.ApiException) as refused:
        await create_when_ready(lambda: core.create_namespaced_pod(namespace, pod))
    assert refused.value.status == 400 and CLUSTER_WEIGHTS_ANNOTATION in str(refused.value.body)
