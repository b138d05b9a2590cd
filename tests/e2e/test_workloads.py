"""Real workloads end to end: the target's scheduler decides, references follow, pods live once.

Every delegate is placed by its target's own kube-scheduler, so rules the
cluster estimates do not model (pod anti-affinity, topology spread, extended
resources) hold exactly as for a pod created in the target by hand.
"""

from __future__ import annotations

import asyncio
import base64
from collections import Counter

import pytest
from kubernetes_asyncio import client as k8s

from mcsched.constants import PARENT_UID_LABEL, PROXY_SCHEDULER_NAME
from tests.e2e.pipeline import JSON, SOURCE, TARGETS, converged, create_when_ready, list_pods, observe
from tests.helpers import eventually

pytestmark = pytest.mark.e2e

ELECT = {"multicluster.admiralty.io/elect": ""}


def deployment(name: str, replicas: int, spec: JSON, labels: dict[str, str] | None = None) -> JSON:
    labels = labels or {"app": name}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels, "annotations": ELECT}, "spec": spec}}}


def container(name: str = "app", cpu: str = "50m", **extra: object) -> JSON:
    return {"name": name, "image": "nginx", "resources": {"requests": {"cpu": cpu, "memory": "16Mi"}}, **extra}


def pod_scheduled(proxy: JSON) -> JSON | None:
    return next((c for c in (proxy.get("status") or {}).get("conditions") or [] if c["type"] == "PodScheduled"),
                None)


async def why_not_scheduled(kube: dict[str, k8s.ApiClient], namespace: str, name: str) -> str | None:
    """The message of the proxy's PodScheduled=False condition, if it has one."""
    proxy = (await list_pods(kube[SOURCE], namespace, field_selector=f"metadata.name={name}"))[0]
    condition = pod_scheduled(proxy)
    return str(condition["message"]) if condition and condition["status"] == "False" else None


async def test_required_anti_affinity_puts_one_pod_per_node_and_the_rest_wait_with_reasons(
    kube: dict[str, k8s.ApiClient], namespace: str
) -> None:
    nodes = 0
    for t in TARGETS:
        nodes += len([n for n in (await k8s.CoreV1Api(kube[t]).list_node()).items
                      if n.metadata.name.startswith(f"{t}-worker-")])
    replicas = nodes + 2
    anti = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": "solo"}}, "topologyKey": "kubernetes.io/hostname"}]}}
    apps = k8s.AppsV1Api(kube[SOURCE])
    await create_when_ready(lambda: apps.create_namespaced_deployment(
        namespace, deployment("solo", replicas, {"containers": [container()], "affinity": anti})))

    async def settled() -> tuple[list[JSON], list[tuple[JSON, JSON]]] | None:
        state = await observe(kube, namespace)
        placed = [p for p in state.proxies if (p["spec"].get("nodeName") or "").startswith("admiralty-")]
        waiting = [(p, c) for p in state.proxies if not p["spec"].get("nodeName")
                   for c in [pod_scheduled(p)] if c and c["status"] == "False"]
        running = [d for pods in state.delegates.values() for d in pods if d["spec"].get("nodeName")]
        hosts = Counter(d["spec"]["nodeName"] for d in running)
        assert all(n == 1 for n in hosts.values()), f"two pods on one node despite anti-affinity: {hosts}"
        if len(placed) == nodes and len(waiting) == replicas - nodes and len(hosts) == nodes:
            return placed, waiting
        return None

    _placed, waiting = await eventually(settled, within=120, interval=1.0)
    for _proxy, condition in waiting:
        assert condition["reason"] == "Unschedulable"
        assert "clusters are available" in condition["message"], condition["message"]
        assert "anti-affinity" in condition["message"] or "refused" in condition["message"], condition["message"]
    await apps.delete_namespaced_deployment("solo", namespace)
    await converged(kube, namespace, 0, within=90)


async def test_a_gpu_pod_lands_only_on_a_node_with_gpus(kube: dict[str, k8s.ApiClient], namespace: str) -> None:
    gpu_nodes = {t: {n.metadata.name for n in (await k8s.CoreV1Api(kube[t]).list_node()).items
                     if int(n.status.allocatable.get("nvidia.com/gpu", "0")) > 0} for t in TARGETS}
    assert any(gpu_nodes.values()), "the local environment gives some nodes GPUs"
    virtual = await k8s.CoreV1Api(kube[SOURCE]).read_node("admiralty-c2")
    assert int(virtual.status.allocatable.get("nvidia.com/gpu", "0")) == 2 * len(gpu_nodes["c2"])
    core = k8s.CoreV1Api(kube[SOURCE])
    for i in range(3):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"gpu-{i}", "annotations": ELECT},
               "spec": {"containers": [container(resources={"limits": {"nvidia.com/gpu": "1"}})]}}
        await create_when_ready(lambda pod=pod: core.create_namespaced_pod(namespace, pod))
    state = await converged(kube, namespace, 3, within=90)
    for target, pods in state.delegates.items():
        for delegate in pods:
            assert delegate["spec"]["nodeName"] in gpu_nodes[target], delegate["spec"]["nodeName"]
    too_many = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "gpu-greedy", "annotations": ELECT},
                "spec": {"containers": [container(resources={"limits": {"nvidia.com/gpu": "3"}})]}}
    await core.create_namespaced_pod(namespace, too_many)

    message = await eventually(lambda: why_not_scheduled(kube, namespace, "gpu-greedy"), within=30)
    assert "nvidia.com/gpu" in message, message
    await core.delete_collection_namespaced_pod(namespace)
    await converged(kube, namespace, 0, within=90)


async def test_topology_spread_within_a_target_is_honoured(kube: dict[str, k8s.ApiClient], namespace: str) -> None:
    spread = [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule",
               "labelSelector": {"matchLabels": {"app": "spread"}}}]
    spec = {"containers": [container()], "topologySpreadConstraints": spread,
            "nodeSelector": {"topology.kubernetes.io/region": "c2"}}  # only c2's nodes carry this region
    apps = k8s.AppsV1Api(kube[SOURCE])
    await create_when_ready(lambda: apps.create_namespaced_deployment(namespace, deployment("spread", 7, spec)))
    state = await converged(kube, namespace, 7, within=90)
    assert not state.delegates["c1"] and len(state.delegates["c2"]) == 7
    per_node = Counter(d["spec"]["nodeName"] for d in state.delegates["c2"])
    assert max(per_node.values()) - min(per_node.values()) <= 1 and len(per_node) == 3, per_node


async def test_configmaps_and_secrets_follow_the_pod_and_stay_in_step(
    kube: dict[str, k8s.ApiClient], namespace: str
) -> None:
    core, c2 = k8s.CoreV1Api(kube[SOURCE]), k8s.CoreV1Api(kube["c2"])
    await core.create_namespaced_config_map(namespace, {"metadata": {"name": "site"},
                                                        "data": {"index.html": "hello"}})
    await core.create_namespaced_secret(namespace, {"metadata": {"name": "creds"}, "type": "Opaque",
                                                    "data": {"PASSWORD": base64.b64encode(b"s3cret").decode()}})
    spec = {"containers": [container(
        volumeMounts=[{"name": "site", "mountPath": "/usr/share/nginx/html"}],
        envFrom=[{"secretRef": {"name": "creds"}}])],
        "volumes": [{"name": "site", "configMap": {"name": "site"}}],
        "nodeSelector": {"topology.kubernetes.io/region": "c2"}}
    apps = k8s.AppsV1Api(kube[SOURCE])
    await create_when_ready(lambda: apps.create_namespaced_deployment(namespace, deployment("web", 2, spec)))
    state = await converged(kube, namespace, 2, within=90)
    assert len(state.delegates["c2"]) == 2
    copy = await c2.read_namespaced_config_map("site", namespace)
    assert copy.data == {"index.html": "hello"}
    secret = await c2.read_namespaced_secret("creds", namespace)
    assert base64.b64decode(secret.data["PASSWORD"]) == b"s3cret"

    await core.patch_namespaced_config_map("site", namespace, {"data": {"index.html": "hello again"}})

    async def in_step() -> bool:
        return bool((await c2.read_namespaced_config_map("site", namespace)).data == {"index.html": "hello again"})

    await eventually(in_step, within=30)
    await apps.delete_namespaced_deployment("web", namespace)
    await converged(kube, namespace, 0, within=90)

    async def removed() -> bool:
        names = {c.metadata.name for c in (await c2.list_namespaced_config_map(namespace)).items}
        secrets = {s.metadata.name for s in (await c2.list_namespaced_secret(namespace)).items}
        return "site" not in names and "creds" not in secrets

    await eventually(removed, within=90, interval=1.0)
    assert (await core.read_namespaced_config_map("site", namespace)).data == {"index.html": "hello again"}


async def test_an_object_the_target_has_already_is_never_overwritten(
    kube: dict[str, k8s.ApiClient], namespace: str
) -> None:
    core, c2 = k8s.CoreV1Api(kube[SOURCE]), k8s.CoreV1Api(kube["c2"])
    await core.create_namespaced_config_map(namespace, {"metadata": {"name": "settings"}, "data": {"k": "source"}})
    await c2.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
    await c2.create_namespaced_config_map(namespace, {"metadata": {"name": "settings"}, "data": {"k": "theirs"}})
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "reader", "annotations": ELECT},
           "spec": {"containers": [container(envFrom=[{"configMapRef": {"name": "settings"}}])],
                    "nodeSelector": {"topology.kubernetes.io/region": "c2"}}}
    await create_when_ready(lambda: core.create_namespaced_pod(namespace, pod))

    message = await eventually(lambda: why_not_scheduled(kube, namespace, "reader"), within=30)
    assert "settings" in message, message
    assert not await list_pods(kube["c2"], namespace, label_selector=PARENT_UID_LABEL), "the delegate must wait"
    assert (await c2.read_namespaced_config_map("settings", namespace)).data == {"k": "theirs"}
    await core.delete_namespaced_pod("reader", namespace)
    await converged(kube, namespace, 0, within=60)
    assert (await c2.read_namespaced_config_map("settings", namespace)).data == {"k": "theirs"}


async def test_a_service_account_the_target_lacks_makes_the_delegate_wait_with_a_reason(
    kube: dict[str, k8s.ApiClient], namespace: str
) -> None:
    core = k8s.CoreV1Api(kube[SOURCE])
    await create_when_ready(lambda: core.create_namespaced_service_account(
        namespace, {"metadata": {"name": "builder"}}))
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "build", "annotations": ELECT},
           "spec": {"serviceAccountName": "builder", "containers": [container()],
                    "nodeSelector": {"topology.kubernetes.io/region": "c2"}}}
    await create_when_ready(lambda: core.create_namespaced_pod(namespace, pod))
    message = await eventually(lambda: why_not_scheduled(kube, namespace, "build"), within=30)
    assert "builder" in message and "c2" in message, message
    assert not await list_pods(kube["c2"], namespace, label_selector=PARENT_UID_LABEL), "the delegate must wait"
    # Once the target has it, the delegate is created (feedback's resync asks again) and runs.
    c2 = k8s.CoreV1Api(kube["c2"])
    await c2.create_namespaced_service_account(namespace, {"metadata": {"name": "builder"}})
    state = await converged(kube, namespace, 1, within=60)
    assert state.proxies[0]["spec"]["nodeName"] == "admiralty-c2"
    await core.delete_namespaced_pod("build", namespace)
    await converged(kube, namespace, 0, within=60)


async def test_a_job_finishes_exactly_its_completions_and_never_runs_again(
    kube: dict[str, k8s.ApiClient], namespace: str
) -> None:
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "count"},
           "spec": {"completions": 5, "parallelism": 2, "backoffLimit": 0,
                    "template": {"metadata": {"annotations": ELECT},
                                 "spec": {"restartPolicy": "Never", "containers": [container()]}}}}
    batch = k8s.BatchV1Api(kube[SOURCE])
    await create_when_ready(lambda: batch.create_namespaced_job(namespace, job))

    async def complete() -> bool:
        status = (await batch.read_namespaced_job("count", namespace)).status
        return bool(status.succeeded == 5 and any(c.type == "Complete" and c.status == "True"
                                                  for c in status.conditions or []))

    await eventually(complete, within=120, interval=1.0)

    async def live_proxies() -> list[JSON]:
        pods = await list_pods(kube[SOURCE], namespace)  # c1 is a target too: leave its delegates out
        return [p for p in pods if p["spec"].get("schedulerName") == PROXY_SCHEDULER_NAME
                and not p["metadata"].get("deletionTimestamp")]

    seen: list[tuple[str, str]] = []

    async def five_finished() -> bool:  # pods the Job deleted unstarted once complete may still be going
        seen[:] = [(p["metadata"]["name"], p["status"]["phase"]) for p in await live_proxies()]
        return len(seen) == 5 and all(phase == "Succeeded" for _, phase in seen)

    try:
        await eventually(five_finished, within=30)
    except AssertionError as exc:
        raise AssertionError(f"the Job's proxies: {seen}") from exc
    delegates = {t: await list_pods(kube[t], namespace, label_selector=PARENT_UID_LABEL) for t in TARGETS}
    target, finished = next((t, d) for t, pods in delegates.items() for d in pods)
    await k8s.CoreV1Api(kube[target]).delete_namespaced_pod(finished["metadata"]["name"], namespace)
    await asyncio.sleep(8)  # longer than two resyncs of the test configuration
    assert await five_finished(), f"a finished pod keeps its final status: {seen}"
    parent = finished["metadata"]["labels"][PARENT_UID_LABEL]
    again = [d for t in TARGETS for d in await list_pods(kube[t], namespace, label_selector=PARENT_UID_LABEL)
             if d["metadata"]["labels"][PARENT_UID_LABEL] == parent]
    assert not again, "a finished Job pod ran again"
    assert (await batch.read_namespaced_job("count", namespace)).status.succeeded == 5
    await batch.delete_namespaced_job("count", namespace, propagation_policy="Background")
    await converged(kube, namespace, 0, within=90)


async def test_statefulsets_replicasets_and_long_names(kube: dict[str, k8s.ApiClient], namespace: str) -> None:
    apps, core = k8s.AppsV1Api(kube[SOURCE]), k8s.CoreV1Api(kube[SOURCE])
    labels = {"app": "db"}
    statefulset = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db"},
                   "spec": {"replicas": 3, "serviceName": "db", "selector": {"matchLabels": labels},
                            "template": {"metadata": {"labels": labels, "annotations": ELECT},
                                         "spec": {"containers": [container()]}}}}
    await create_when_ready(lambda: apps.create_namespaced_stateful_set(namespace, statefulset))
    replicaset = deployment("rs", 2, {"containers": [container()]})
    replicaset["kind"] = "ReplicaSet"
    await apps.create_namespaced_replica_set(namespace, replicaset)
    long_name = ("long-" * 50)[:249] + "x"  # 250 characters, a legal pod name
    assert len(long_name) == 250
    await core.create_namespaced_pod(namespace, {"apiVersion": "v1", "kind": "Pod",
                                                 "metadata": {"name": long_name, "annotations": ELECT},
                                                 "spec": {"containers": [container()]}})
    state = await converged(kube, namespace, 6, within=90)
    names = {p["metadata"]["name"] for p in state.proxies}
    assert {"db-0", "db-1", "db-2", long_name} <= names
    await apps.delete_namespaced_stateful_set("db", namespace)
    await apps.delete_namespaced_replica_set("rs", namespace)
    await core.delete_namespaced_pod(long_name, namespace)
    await converged(kube, namespace, 0, within=90)
