"""Choosing clusters end to end: Admiralty's cluster-level constraints, cordon and taints on virtual nodes.

Every kwok node of the local environment carries ``topology.kubernetes.io/region:
<its cluster>``, so each virtual node ``admiralty-<cluster>`` carries that label too
(a label all of a target's nodes share).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import pytest
from kubernetes_asyncio import client as k8s

from localenv import LocalEnvironment
from mcsched.constants import (
    PARENT_UID_LABEL,
    PROXY_CONSTRAINTS_ANNOTATION,
    PROXY_SCHEDULER_NAME,
    USE_SPEC_CONSTRAINTS_ANNOTATION,
)
from tests.e2e.pipeline import JSON, SOURCE, create_when_ready, list_pods
from tests.helpers import eventually

pytestmark = pytest.mark.e2e

REGION = "topology.kubernetes.io/region"
PROXY = PROXY_SCHEDULER_NAME  # proxies, not the delegates c1 runs as a target of itself


def elected_pod(name: str, annotations: dict[str, str] | None = None, **spec: object) -> JSON:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "annotations": {"multicluster.admiralty.io/elect": "", **(annotations or {})}},
            "spec": {"containers": [{"name": "app", "image": "nginx",
                                     "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}], **spec}}


async def _with(check: Any, key: str) -> dict[str, str] | None:
    """``check()``'s answers once they include ``key`` (spans reach Jaeger a few seconds late)."""
    answers: dict[str, str] = await check()
    return answers if key in answers else None


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

        async def explained() -> dict[str, str]:  # mcsctl explain, from the pod's trace in Jaeger
            info = pipeline.info()
            run = await asyncio.to_thread(subprocess.run, [
                sys.executable, "-m", "mcsched.cli", "--config", str(pipeline.root / "mcs.yaml"), "--kubeconfig",
                info.kubeconfig, "--jaeger", info.jaeger_query_url, "-o", "json", "explain", f"{namespace}/pinned"],
                capture_output=True, text=True, timeout=60)
            return {a["target"]: a["reason"] or "" for a in json.loads(run.stdout)["answers"]}

        answers = await eventually(lambda: _with(explained, "c2"), within=60)
        assert answers["c2"] == "excluded: its virtual node has the untolerated taint upgrade=blue:NoSchedule"
    finally:
        c1.kubectl("taint", "node", "admiralty-c2", "upgrade-")
    assert await eventually(lambda: proxy_node(core, namespace, "pinned"), within=60) == "admiralty-c2"


async def test_draining_a_virtual_node_moves_its_pods_to_other_clusters_within_the_disruption_budget(
        kube: dict[str, k8s.ApiClient], namespace: str, pipeline: LocalEnvironment) -> None:
    c1 = pipeline.cluster(SOURCE)
    apps = k8s.AppsV1Api(kube[SOURCE])
    labels = {"app": "drained"}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "drained"},
                  "spec": {"replicas": 4, "selector": {"matchLabels": labels},
                           "template": {"metadata": {"labels": labels,
                                                     "annotations": {"multicluster.admiralty.io/elect": ""}},
                                        "spec": elected_pod("x")["spec"]}}}
    c1.kubectl("cordon", "admiralty-c1")  # so that every pod starts in c2
    try:
        await create_when_ready(lambda: apps.create_namespaced_deployment(namespace, deployment))

        async def proxies() -> list[JSON]:
            return [p for p in await list_pods(kube[SOURCE], namespace, label_selector="app=drained")  # c1's
                    if not p["metadata"].get("deletionTimestamp") and p["spec"].get("schedulerName") == PROXY]

        async def all_running_on(node: str) -> list[tuple[str, str, str]] | None:
            """The proxies when all 4 run on ``node``; None (and the state in the failure) otherwise."""
            pods = await proxies()
            state = [(p["metadata"]["name"], p["spec"].get("nodeName") or "", p["status"].get("phase") or "")
                     for p in pods]
            if len(pods) == 4 and all(n == node and phase == "Running" for _, n, phase in state):
                return state
            last_state[:] = state
            return None

        last_state: list[tuple[str, str, str]] = []

        await eventually(lambda: all_running_on("admiralty-c2"), within=90)
    finally:
        c1.kubectl("uncordon", "admiralty-c1")
    budget = {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "drained"},
              "spec": {"minAvailable": 3, "selector": {"matchLabels": labels}}}
    await k8s.PolicyV1Api(kube[SOURCE]).create_namespaced_pod_disruption_budget(namespace, budget)

    def ready(pod: JSON) -> bool:
        return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions") or [])

    drain = asyncio.create_task(asyncio.to_thread(
        c1.kubectl, "drain", "admiralty-c2", "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=180s"))
    try:
        async def running_delegates() -> int:
            """The Deployment's delegates running in either cluster and not being deleted.

            The drained cluster (c2) is listed first: a replacement runs in c1 before the delegate it
            replaces in c2 goes, so listing c1 first could miss both in one sample (c1 read just before
            the replacement ran, c2 just after the old one went) and count one too few."""
            pods = [p for c in ("c2", "c1")
                    for p in await list_pods(kube[c], namespace, label_selector=PARENT_UID_LABEL)]
            return sum(p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
                       for p in pods)

        samples: list[list[tuple[str, bool, str]]] = []
        running: list[int] = []
        while not drain.done():  # sample the budget while the drain is under way
            samples.append([(p["metadata"]["name"][-5:], ready(p), p["spec"].get("nodeName") or "")
                            for p in await proxies()])
            running.append(await running_delegates())
            await asyncio.sleep(0.2)
        await drain
        lowest = min((sum(r for _, r, _ in sample) for sample in samples), default=4)
        assert lowest >= 3, f"only {lowest} of 4 pods were ready at one point: the budget was violated: {samples}"
        # Each drained pod's delegate ran on until its replacement was Ready: never fewer than 4 running.
        assert len(running) > 3 and min(running) >= 4, f"running delegates while draining: {running}"
        try:
            await eventually(lambda: all_running_on("admiralty-c1"), within=90)
        except AssertionError:
            raise AssertionError(f"after the drain: {last_state}") from None
        assert await list_pods(kube["c2"], namespace) == []
    finally:
        c1.kubectl("uncordon", "admiralty-c2")


async def test_a_daemonset_tolerating_every_taint_leaves_nothing_stuck_on_virtual_nodes(
        kube: dict[str, k8s.ApiClient], namespace: str) -> None:
    """Its pods on virtual nodes are failed as a kubelet fails a pod it cannot admit, and go when deleted."""
    apps = k8s.AppsV1Api(kube[SOURCE])
    labels = {"app": "everywhere"}
    daemonset = {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "everywhere"},
                 "spec": {"selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}, "spec": {
                     "tolerations": [{"operator": "Exists"}], "terminationGracePeriodSeconds": 30,
                     "containers": [{"name": "agent", "image": "agent"}]}}}}
    await create_when_ready(lambda: apps.create_namespaced_daemon_set(namespace, daemonset))

    async def pods() -> list[JSON]:
        return await list_pods(kube[SOURCE], namespace, label_selector="app=everywhere")

    async def settled() -> list[JSON] | None:
        found = await pods()
        on_virtual = [p for p in found if (p["spec"].get("nodeName") or "").startswith("admiralty-")]
        real = [p for p in found if p not in on_virtual]
        return found if on_virtual and len(real) == 3 and all(p["status"].get("phase") == "Running" for p in real) \
            and all(p["status"].get("phase") == "Failed" for p in on_virtual) else None

    found = await eventually(settled, within=60)
    stray = next(p for p in found if p["spec"]["nodeName"].startswith("admiralty-"))
    assert stray["status"]["reason"] == "VirtualNode" and "virtual node" in stray["status"]["message"]
    await apps.delete_namespaced_daemon_set("everywhere", namespace)

    async def gone() -> bool:
        return not await pods()

    await eventually(gone, within=60)  # none left Terminating for want of a kubelet
