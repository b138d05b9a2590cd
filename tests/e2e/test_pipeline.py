"""The elect -> proxy -> delegate -> status pipeline, end to end on the local environment."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import urllib.request
import uuid

import pytest
from kubernetes_asyncio import client as k8s

from localenv import LocalEnvironment
from localenv.services import process_name, start_service
from localenv.tools import bin_dir
from mcsched.constants import PARENT_CLUSTER_LABEL, PARENT_NAME_LABEL, PARENT_NAMESPACE_LABEL, PARENT_UID_LABEL
from mcsched.placement import cpu_milli, pod_requests
from tests.e2e.pipeline import (
    JSON,
    SOURCE,
    TARGETS,
    converged,
    create_when_ready,
    list_pods,
    nginx_deployment,
    observe,
    violations,
)
from tests.helpers import eventually

pytestmark = pytest.mark.e2e


async def deploy_nginx(kube: dict[str, k8s.ApiClient], namespace: str, replicas: int) -> None:
    apps = k8s.AppsV1Api(kube[SOURCE])
    await create_when_ready(lambda: apps.create_namespaced_deployment(namespace, nginx_deployment(replicas)))


async def test_admiralty_getting_started_scenario(kube: dict[str, k8s.ApiClient], namespace: str) -> None:
    await deploy_nginx(kube, namespace, 10)
    state = await converged(kube, namespace, 10)
    targets_used = {p["spec"]["nodeName"] for p in state.proxies}
    assert targets_used == {"admiralty-c1", "admiralty-c2"}, "pods should spread over both targets"
    nodes = {n.metadata.name: n for n in (await k8s.CoreV1Api(kube[SOURCE]).list_node()).items}
    for target in TARGETS:
        virtual = nodes[f"admiralty-{target}"]
        assert any(c.type == "Ready" and c.status == "True" for c in virtual.status.conditions)
        assert virtual.status.allocatable["pods"] == "330"  # 3 kwok nodes x 110
        assert any(t.key == "virtual-kubelet.io/provider" for t in virtual.spec.taints)
    assert {f"c1-worker-{i}" for i in range(3)} <= set(nodes)


async def test_scale_up_to_30_and_down_to_5(kube: dict[str, k8s.ApiClient], namespace: str) -> None:
    await deploy_nginx(kube, namespace, 10)
    await converged(kube, namespace, 10)
    apps = k8s.AppsV1Api(kube[SOURCE])
    await apps.patch_namespaced_deployment_scale("nginx", namespace, {"spec": {"replicas": 30}})
    await converged(kube, namespace, 30)
    await apps.patch_namespaced_deployment_scale("nginx", namespace, {"spec": {"replicas": 5}})
    await converged(kube, namespace, 5)


async def test_deleting_the_deployment_deletes_proxies_and_delegates(
    kube: dict[str, k8s.ApiClient], namespace: str
) -> None:
    await deploy_nginx(kube, namespace, 6)
    await converged(kube, namespace, 6)
    await k8s.AppsV1Api(kube[SOURCE]).delete_namespaced_deployment("nginx", namespace)

    async def all_gone() -> bool:
        state = await observe(kube, namespace)
        return not state.proxies and not any(state.delegates.values())

    await eventually(all_gone, within=60)


async def test_a_deleted_delegate_ends_its_proxy_and_the_deployment_replaces_it(
    kube: dict[str, k8s.ApiClient], namespace: str, pipeline: LocalEnvironment
) -> None:
    """A pod lives once (Admiralty's rule): nothing recreates a delegate under the same identity."""
    await deploy_nginx(kube, namespace, 4)
    state = await converged(kube, namespace, 4)
    for proxy in state.proxies:
        conditions = {c["type"]: c["status"] for c in proxy["status"].get("conditions") or []}
        assert conditions.get("PodScheduled") == "True", proxy["status"]
        assert conditions.get("Ready") == "True", proxy["status"]
    # What every tool that waits for scheduling does: it returns for every placed proxy.
    waited = await asyncio.to_thread(subprocess.run, [
        str(bin_dir() / "kubectl"), "--kubeconfig", pipeline.info().kubeconfig, "--context", SOURCE,
        "-n", namespace, "wait", "--for=condition=PodScheduled", "--timeout=20s",
        *(f"pod/{p['metadata']['name']}" for p in state.proxies)], capture_output=True, text=True)
    assert waited.returncode == 0, waited.stderr
    target, victim = next((t, d) for t, pods in state.delegates.items() for d in pods)
    parent_uid = victim["metadata"]["labels"][PARENT_UID_LABEL]
    await k8s.CoreV1Api(kube[target]).delete_namespaced_pod(victim["metadata"]["name"], namespace)

    async def proxy_ended() -> bool:
        return parent_uid not in {p["metadata"]["uid"] for p in await list_pods(kube[SOURCE], namespace)}

    await eventually(proxy_ended, within=60)
    state = await converged(kube, namespace, 4)
    assert not state.delegates_of(parent_uid), "the deleted delegate was recreated under the same identity"


async def test_delegate_without_proxy_is_removed(kube: dict[str, k8s.ApiClient], namespace: str) -> None:
    orphan = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "orphan-x7k2p", "labels": {
            PARENT_CLUSTER_LABEL: SOURCE, PARENT_NAMESPACE_LABEL: namespace,
            PARENT_NAME_LABEL: "orphan", PARENT_UID_LABEL: str(uuid.uuid4())}},
        "spec": {"containers": [{"name": "c", "image": "nginx"}]},
    }
    core = k8s.CoreV1Api(kube["c2"])
    await core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
    await create_when_ready(lambda: core.create_namespaced_pod(namespace, orphan))

    async def removed() -> bool:
        return not await list_pods(kube["c2"], namespace, field_selector="metadata.name=orphan-x7k2p")

    await eventually(removed, within=60)


async def test_pod_that_fits_nowhere_waits_with_a_reason_then_is_placed(
    kube: dict[str, k8s.ApiClient], namespace: str, pipeline: LocalEnvironment
) -> None:
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "big", "annotations": {"multicluster.admiralty.io/elect": ""}},
        "spec": {"containers": [{"name": "big", "image": "nginx", "resources": {"requests": {"cpu": "6"}}}]},
    }
    core = k8s.CoreV1Api(kube[SOURCE])
    await create_when_ready(lambda: core.create_namespaced_pod(namespace, pod))

    async def unschedulable() -> str | None:
        proxy = await core.read_namespaced_pod("big", namespace)
        condition = next((c for c in proxy.status.conditions or [] if c.type == "PodScheduled"), None)
        if proxy.spec.node_name is None and condition and condition.status == "False":
            return str(condition.reason) + ": " + str(condition.message)
        return None

    reason = await eventually(unschedulable, within=30)
    assert reason.startswith("Unschedulable: 0/2 clusters are available")
    assert "insufficient cpu" in reason

    async def failed_scheduling_event() -> bool:
        events = await core.list_namespaced_event(namespace, field_selector="involvedObject.name=big")
        return any(e.reason == "FailedScheduling" for e in events.items)

    await eventually(failed_scheduling_event, within=30)

    big_node = "c2-worker-big"
    await asyncio.to_thread(pipeline.cluster("c2").add_nodes, [big_node],
                            {"cpu": "8", "memory": "32Gi", "pods": "110"})
    try:
        state = await converged(kube, namespace, 1, within=60)
        assert state.proxies[0]["spec"]["nodeName"] == "admiralty-c2"
        assert state.delegates["c2"][0]["spec"]["nodeName"] == big_node
        await core.delete_namespaced_pod("big", namespace)
        await converged(kube, namespace, 0)
    finally:
        await k8s.CoreV1Api(kube["c2"]).delete_node(big_node)


async def test_malformed_elect_annotation_is_refused_with_a_clear_error(
    kube: dict[str, k8s.ApiClient], namespace: str
) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "odd", "annotations": {"multicluster.admiralty.io/elect": "maybe"}},
           "spec": {"containers": [{"name": "c", "image": "nginx"}]}}
    with pytest.raises(k8s.ApiException) as refused:
        await create_when_ready(lambda: k8s.CoreV1Api(kube[SOURCE]).create_namespaced_pod(namespace, pod))
    assert refused.value.status == 400
    message = json.loads(refused.value.body)["message"]
    assert 'multicluster.admiralty.io/elect="maybe" is not understood' in message


@pytest.mark.parametrize("service", ["watcher", "proxy_scheduler", "candidate_scheduler", "feedback"])
async def test_service_killed_while_placing_30_pods_converges(
    kube: dict[str, k8s.ApiClient], namespace: str, pipeline: LocalEnvironment, service: str
) -> None:
    record = pipeline.processes.get(process_name(service, 0))
    assert record is not None and record.alive()
    await deploy_nginx(kube, namespace, 30)
    await asyncio.sleep(0.3)  # let placement start, then pull the plug
    pipeline.processes.stop(record.name, timeout=0, sig=signal.SIGKILL)
    await asyncio.sleep(1.0)
    start_service(pipeline, service, 0)
    await converged(kube, namespace, 30, within=90)


def overcommitted(pods: list[JSON], allocatable_milli: dict[str, int]) -> list[str]:
    """Nodes whose pods request more CPU than the node has allocatable."""
    requested: dict[str, int] = {}
    for pod in pods:
        node = pod["spec"].get("nodeName")
        if node in allocatable_milli and pod.get("status", {}).get("phase") not in ("Succeeded", "Failed"):
            requested[node] = requested.get(node, 0) + pod_requests(pod).cpu_milli
    return [f"{node}: {milli}m of {allocatable_milli[node]}m" for node, milli in requested.items()
            if milli > allocatable_milli[node]]


async def test_two_replicas_of_every_stage_fill_the_nodes_past_90_percent_without_overcommit(
    kube: dict[str, k8s.ApiClient], namespace: str, pipeline: LocalEnvironment
) -> None:
    for service in ("watcher", "proxy_scheduler", "candidate_scheduler", "feedback"):
        start_service(pipeline, service, 1)
    try:
        allocatable: dict[str, dict[str, int]] = {}
        for target in TARGETS:
            nodes = (await k8s.CoreV1Api(kube[target]).list_node()).items
            allocatable[target] = {n.metadata.name: cpu_milli(n.status.allocatable["cpu"]) for n in nodes
                                   if n.metadata.name.startswith(f"{target}-worker-")}
        total = sum(sum(a.values()) for a in allocatable.values())
        replicas = int(total * 0.92) // 250  # 250m pods filling the real nodes past 90 %
        apps = k8s.AppsV1Api(kube[SOURCE])
        await create_when_ready(lambda: apps.create_namespaced_deployment(
            namespace, nginx_deployment(replicas, "250m")))
        # Sample while the pods are being placed, not only once they all run.
        samples = 0
        while True:
            for target in TARGETS:
                problems = overcommitted(await list_pods(kube[target], ""), allocatable[target])
                assert not problems, f"{target} over-committed while placing: {problems}"
            samples += 1
            state = await observe(kube, namespace)
            if not violations(state, replicas):
                break
            assert samples < 400, f"not converged: {violations(state, replicas)[:5]}"
            await asyncio.sleep(0.2)
        assert samples > 3, "placement was over before it could be sampled"
        await apps.delete_namespaced_deployment("nginx", namespace)
        await converged(kube, namespace, 0, within=120)
    finally:
        for service in ("watcher", "proxy_scheduler", "candidate_scheduler", "feedback"):
            pipeline.processes.stop(process_name(service, 1))


async def test_unreachable_target_is_avoided_and_used_again_when_it_returns(
    kube: dict[str, k8s.ApiClient], namespace: str, pipeline: LocalEnvironment
) -> None:
    core = k8s.CoreV1Api(kube[SOURCE])

    async def virtual_node_ready(ready: str) -> bool:
        """admiralty-c2's Ready condition is ``ready``; when "True", the node lifecycle controller has also
        taken its not-ready/unreachable taints off again (until then c2 is rightly left out)."""
        node = await core.read_node("admiralty-c2")
        lost = {"node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"}
        return any(c.type == "Ready" and c.status == ready for c in node.status.conditions) and (
            ready != "True" or not any(t.key in lost for t in node.spec.taints or []))

    c2 = pipeline.cluster("c2")
    await asyncio.to_thread(c2.stop_api_server)
    try:
        await eventually(lambda: virtual_node_ready("False"), within=60)
        await deploy_nginx(kube, namespace, 4)
        state = await converged(kube, namespace, 4, within=60, targets=("c1",))  # c2 cannot be listed now
        assert {p["spec"]["nodeName"] for p in state.proxies} == {"admiralty-c1"}
    finally:
        await asyncio.to_thread(c2.start_api_server)
        await asyncio.to_thread(c2.wait_recovered)
    await eventually(lambda: virtual_node_ready("True"), within=60)
    # Each stage reconnects to c2 on its own back-off (up to 10 s): new pods go on arriving, two every 3 s,
    # until one is placed in c2; it must happen well within the reconnection time.
    replicas = 4

    async def c2_used() -> bool:
        nonlocal replicas
        proxies = await list_pods(kube[SOURCE], namespace)
        if any(p["spec"].get("nodeName") == "admiralty-c2" for p in proxies):
            return True
        replicas += 2
        await k8s.AppsV1Api(kube[SOURCE]).patch_namespaced_deployment_scale(
            "nginx", namespace, {"spec": {"replicas": replicas}})
        return False

    await eventually(c2_used, within=45, interval=3)
    await converged(kube, namespace, replicas, within=90)


def _gauges(pipeline: LocalEnvironment, service: str, replica: int) -> dict[str, float] | None:
    """A process's gauges without labels (``mcs_shares_owned``, ``mcs_stage_members``); None if it is not up."""
    record = pipeline.processes.get(process_name(service, replica))
    if record is None or not record.alive():
        return None
    try:
        with urllib.request.urlopen(record.meta["metrics_url"] + "/metrics", timeout=5) as response:
            lines = response.read().decode().splitlines()
    except OSError:
        return None
    return {name: float(value) for name, _, value in (line.partition(" ") for line in lines)
            if name in ("mcs_shares_owned", "mcs_stage_members")}


async def test_three_processes_of_each_stage_share_the_work_and_a_killed_ones_share_moves_and_returns(
    kube: dict[str, k8s.ApiClient], namespace: str, pipeline: LocalEnvironment
) -> None:
    # c1's proxies in 12 partitions; feedback also keeps each target's virtual nodes; candidate-schedulers
    # take whole targets (three processes, two targets: one target is served by two of them).
    def expected(service: str, processes: int) -> int:
        """The shares all ``processes`` of ``service`` own together."""
        return {"watcher": 12, "feedback": 12 + len(TARGETS),
                "candidate_scheduler": max(len(TARGETS), processes)}[service]

    stages = ("watcher", "feedback", "candidate_scheduler")
    extra = [(service, replica) for service in stages for replica in (1, 2)]

    def shared_out(service: str, replicas: tuple[int, ...]) -> list[dict[str, float] | None] | None:
        """Each process's gauges once those ``replicas`` hear each other and split the work exactly."""
        gauges = [_gauges(pipeline, service, r) for r in replicas]
        if all(g is not None and g.get("mcs_stage_members") == len(replicas) and g.get("mcs_shares_owned", 0) > 0
               for g in gauges) and sum(g["mcs_shares_owned"] for g in gauges if g) == expected(service, len(replicas)):
            return gauges
        return None

    async def settled(service: str, replicas: tuple[int, ...]) -> list[dict[str, float] | None] | None:
        return shared_out(service, replicas)

    for service, replica in extra:
        start_service(pipeline, service, replica)
    try:
        for service in stages:
            gauges = await eventually(lambda s=service: settled(s, (0, 1, 2)), within=60)  # type: ignore[misc]
            assert gauges is not None
            if service != "candidate_scheduler":  # an even split: 4 partitions each (and a target or none)
                assert all(g is not None and 4 <= g["mcs_shares_owned"] <= 5 for g in gauges), gauges
        await deploy_nginx(kube, namespace, 30)
        await asyncio.sleep(0.3)  # placement under way: kill one feedback process without a word
        pipeline.processes.stop(process_name("feedback", 1), timeout=0, sig=signal.SIGKILL)
        await converged(kube, namespace, 30, within=120)
        # Its lease ended: the two others took its partitions and its target between them.
        await eventually(lambda: settled("feedback", (0, 2)), within=30)
        start_service(pipeline, "feedback", 1)
        await eventually(lambda: settled("feedback", (0, 1, 2)), within=60)  # and it took its share back
        await k8s.AppsV1Api(kube[SOURCE]).patch_namespaced_deployment_scale(
            "nginx", namespace, {"spec": {"replicas": 40}})
        await converged(kube, namespace, 40, within=120)
    finally:
        for service, replica in extra:
            pipeline.processes.stop(process_name(service, replica))
    # The one left of each stage takes everything again (the next tests run with one process each).
    for service in stages:
        await eventually(lambda s=service: settled(s, (0,)), within=30)  # type: ignore[misc]
