"""Losing a cluster end to end: c2's API server stops, its proxies are evicted the Kubernetes way
(after their pods' own tolerationSeconds), replacements run in c1, and when c2 comes back only the
delegates of the evicted proxies are deleted there.

Every kwok node carries ``topology.kubernetes.io/region: <its cluster>``, so ``admiralty-c2`` does too.
"""

from __future__ import annotations

import asyncio

import pytest
from kubernetes_asyncio import client as k8s

from localenv import LocalEnvironment
from mcsched.constants import PARENT_UID_LABEL, PROXY_CONSTRAINTS_ANNOTATION, PROXY_SCHEDULER_NAME
from tests.e2e.pipeline import JSON, SOURCE, create_when_ready, list_pods
from tests.helpers import eventually

pytestmark = pytest.mark.e2e

LOST = "c2"
PREFER_C2 = """affinity:
  nodeAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      preference:
        matchExpressions:
        - {key: topology.kubernetes.io/region, operator: In, values: [c2]}
"""
ONLY_C2 = "nodeSelector:\n  topology.kubernetes.io/region: c2\n"
FAILOVER_SECONDS = 15


def _tolerations(seconds: int | None) -> list[JSON]:
    return [{"key": key, "operator": "Exists", "effect": "NoExecute",
             **({"tolerationSeconds": seconds} if seconds is not None else {})}
            for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")]


def _template(app: str, constraints: str, tolerate_seconds: int | None) -> JSON:
    return {"metadata": {"labels": {"app": app},
                         "annotations": {"multicluster.admiralty.io/elect": "",
                                         PROXY_CONSTRAINTS_ANNOTATION: constraints}},
            "spec": {"terminationGracePeriodSeconds": 5, "tolerations": _tolerations(tolerate_seconds),
                     "containers": [{"name": "app", "image": "nginx",
                                     "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}}


def _workload(kind: str, app: str, replicas: int, constraints: str, tolerate_seconds: int | None) -> JSON:
    spec: JSON = {"replicas": replicas, "selector": {"matchLabels": {"app": app}},
                  "template": _template(app, constraints, tolerate_seconds)}
    if kind == "StatefulSet":
        spec["serviceName"] = app
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": app}, "spec": spec}


def _live(pod: JSON) -> bool:
    return not pod["metadata"].get("deletionTimestamp")


def _running_on(pod: JSON) -> str | None:
    return pod["spec"].get("nodeName") if pod["status"].get("phase") == "Running" else None


async def test_a_lost_cluster_s_proxies_are_replaced_elsewhere_and_only_their_delegates_go_when_it_returns(
        kube: dict[str, k8s.ApiClient], namespace: str, pipeline: LocalEnvironment) -> None:
    apps = k8s.AppsV1Api(kube[SOURCE])
    # movable: prefers c2, leaves a lost cluster after 15 s. steadfast: only c2, tolerates its loss forever.
    # ident: a StatefulSet pod, which must never run twice under one name.
    workloads = [_workload("Deployment", "movable", 2, PREFER_C2, FAILOVER_SECONDS),
                 _workload("Deployment", "steadfast", 1, ONLY_C2, None),
                 _workload("StatefulSet", "ident", 1, PREFER_C2, FAILOVER_SECONDS)]
    for workload in workloads:
        create = apps.create_namespaced_deployment if workload["kind"] == "Deployment" \
            else apps.create_namespaced_stateful_set
        await create_when_ready(lambda create=create, workload=workload: create(namespace, workload))

    async def proxies(app: str) -> list[JSON]:
        return [p for p in await list_pods(kube[SOURCE], namespace, label_selector=f"app={app}")
                if p["spec"].get("schedulerName") == PROXY_SCHEDULER_NAME]

    async def all_running_on(app: str, count: int, node: str = "admiralty-") -> list[JSON] | None:
        """The live proxies of ``app`` once ``count`` of them run on ``node`` (a prefix), else None."""
        live = [p for p in await proxies(app) if _live(p)]
        return live if len(live) == count and all((_running_on(p) or "").startswith(node) for p in live) else None

    for app, count in (("movable", 2), ("steadfast", 1), ("ident", 1)):
        await eventually(lambda app=app, count=count: all_running_on(app, count, f"admiralty-{LOST}"), within=90)
    evicted = {p["metadata"]["uid"] for app in ("movable", "ident") for p in await proxies(app)}
    [steadfast] = await proxies("steadfast")
    c2_delegates = {d["metadata"]["labels"][PARENT_UID_LABEL]: d["metadata"]["uid"]
                    for d in await list_pods(kube[LOST], namespace)}
    assert set(c2_delegates) == evicted | {steadfast["metadata"]["uid"]}

    lost = pipeline.cluster(LOST)
    await asyncio.to_thread(lost.stop_api_server)
    samples = 0
    try:
        async def replaced_while_sampling() -> list[JSON] | None:
            nonlocal samples
            samples += 1
            # A StatefulSet pod never runs twice: no new ident-0 while the old one may still run in c2.
            ident_in_c1 = [d for d in await list_pods(kube[SOURCE], namespace, label_selector="app=ident")
                           if d["spec"].get("schedulerName") != PROXY_SCHEDULER_NAME]
            assert ident_in_c1 == [], "ident-0 runs in c1 while its old delegate may still run in c2"
            assert [p["metadata"]["uid"] for p in await proxies("steadfast") if _live(p)] == \
                [steadfast["metadata"]["uid"]], "the proxy that tolerates the loss was evicted"
            return await all_running_on("movable", 2, f"admiralty-{SOURCE}")

        replacements = await eventually(replaced_while_sampling, within=150, interval=1.0)
        assert not {p["metadata"]["uid"] for p in replacements} & evicted
        # The evicted proxies stay Terminating while their delegates may still run in c2.
        still = {p["metadata"]["uid"]: p for app in ("movable", "ident") for p in await proxies(app)}
        assert evicted <= set(still) and not any(_live(still[uid]) for uid in evicted)
        assert samples > 1
    finally:
        await asyncio.to_thread(lost.start_api_server)
        await asyncio.to_thread(lost.wait_recovered)

    async def settled() -> bool:
        pods = await list_pods(kube[LOST], namespace)
        delegates = {d["metadata"]["labels"][PARENT_UID_LABEL]: d for d in pods}
        left = {p["metadata"]["uid"] for app in ("movable", "ident") for p in await proxies(app)} & evicted
        return not left and not evicted & set(delegates) and bool(await all_running_on("ident", 1))

    await eventually(settled, within=120, interval=1.0)
    # Nothing else in c2 was touched: the steadfast pod's delegate is the same pod, still running.
    [delegate] = [d for d in await list_pods(kube[LOST], namespace)
                  if d["metadata"]["labels"][PARENT_UID_LABEL] == steadfast["metadata"]["uid"]]
    assert delegate["metadata"]["uid"] == c2_delegates[steadfast["metadata"]["uid"]] and _live(delegate)
    [after] = await proxies("steadfast")
    assert after["metadata"]["uid"] == steadfast["metadata"]["uid"] and _running_on(after) == f"admiralty-{LOST}"
    await apps.delete_namespaced_stateful_set("ident", namespace)

