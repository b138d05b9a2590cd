"""What the end-to-end tests observe in the clusters, and the invariants they check.

The invariants (from the design brief): exactly one live delegate per proxy,
in the target its virtual node names; no orphan delegates; proxy status
converged to its delegate's; no elected pod on a real source node.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from kubernetes_asyncio import client as k8s

from mcsched.constants import ELECT_ANNOTATION, PARENT_UID_LABEL, PROXY_SCHEDULER_NAME, SOURCE_MANIFEST_ANNOTATION
from mcsched.podspec import delegate_name
from tests.helpers import eventually

SOURCE = "c1"
TARGETS = ("c1", "c2")

JSON = dict[str, Any]


async def list_pods(api: k8s.ApiClient, namespace: str, **selectors: str) -> list[JSON]:
    """Pods as plain JSON dicts (camelCase, as the API server sends them); "" lists every namespace."""
    core = k8s.CoreV1Api(api)
    if namespace:
        response = await core.list_namespaced_pod(namespace, _preload_content=False, **selectors)
    else:
        response = await core.list_pod_for_all_namespaces(_preload_content=False, **selectors)
    body: JSON = await response.json()
    return list(body["items"])


@dataclass
class PipelineState:
    proxies: list[JSON]
    delegates: dict[str, list[JSON]]  # target -> delegate pods
    elected_on_real_nodes: list[str] = field(default_factory=list)

    def delegates_of(self, proxy_uid: str) -> list[tuple[str, JSON]]:
        return [(t, d) for t, pods in self.delegates.items() for d in pods
                if d["metadata"]["labels"].get(PARENT_UID_LABEL) == proxy_uid
                and not d["metadata"].get("deletionTimestamp")]


def _elected(pod: JSON) -> bool:
    annotations = pod["metadata"].get("annotations") or {}
    return ELECT_ANNOTATION in annotations or SOURCE_MANIFEST_ANNOTATION in annotations


async def observe(kube: dict[str, k8s.ApiClient], namespace: str,
                  targets: tuple[str, ...] = TARGETS) -> PipelineState:
    source_pods = await list_pods(kube[SOURCE], namespace)
    proxies = [p for p in source_pods if p["spec"].get("schedulerName") == PROXY_SCHEDULER_NAME]
    delegates = {t: await list_pods(kube[t], namespace, label_selector=PARENT_UID_LABEL) for t in targets}
    elected_on_real = [p["metadata"]["name"] for p in source_pods if _elected(p) and p["spec"].get("nodeName")
                       and not p["spec"]["nodeName"].startswith("admiralty-")]
    return PipelineState(proxies, delegates, elected_on_real)


def violations(state: PipelineState, expected: int) -> list[str]:
    """Everything that keeps the pipeline from the converged state; [] when converged."""
    problems: list[str] = []
    live = [p for p in state.proxies if not p["metadata"].get("deletionTimestamp")]
    if len(live) != expected:
        problems.append(f"{len(live)} proxies, expected {expected}")
    problems += [f"elected pod {n} bound to a real source node" for n in state.elected_on_real_nodes]
    uids = {p["metadata"]["uid"] for p in state.proxies}
    for target, pods in state.delegates.items():
        for d in pods:
            if d["metadata"]["labels"].get(PARENT_UID_LABEL) not in uids:
                problems.append(f"orphan delegate {target}/{d['metadata']['name']}")
    for proxy in live:
        name, uid = proxy["metadata"]["name"], proxy["metadata"]["uid"]
        node = proxy["spec"].get("nodeName") or ""
        if not node.startswith("admiralty-"):
            problems.append(f"proxy {name} not bound to a virtual node ({node or 'unbound'})")
            continue
        target = node.removeprefix("admiralty-")
        delegates = state.delegates_of(uid)
        if len(delegates) != 1:
            problems.append(f"proxy {name} has {len(delegates)} live delegates")
            continue
        where, delegate = delegates[0]
        if where != target:
            problems.append(f"proxy {name} on {node} but its delegate is in {where}")
        if delegate["metadata"]["name"] != delegate_name(name, uid):
            problems.append(f"delegate {delegate['metadata']['name']} is not named after proxy {name}")
        if not (delegate["spec"].get("nodeName") or "").startswith(f"{where}-worker-"):
            problems.append(f"delegate of {name} not on a real {where} node: {delegate['spec'].get('nodeName')}")
        d_status, p_status = delegate.get("status", {}), proxy.get("status", {})
        if d_status.get("phase") != "Running" or p_status.get("phase") != "Running":
            problems.append(f"{name}: proxy {p_status.get('phase')}, delegate {d_status.get('phase')}")
        elif not d_status.get("podIP") or p_status.get("podIP") != d_status.get("podIP"):
            problems.append(f"{name}: proxy IP {p_status.get('podIP')} != delegate IP {d_status.get('podIP')}")
    return problems


async def converged(kube: dict[str, k8s.ApiClient], namespace: str, expected: int,
                    within: float = 60.0, targets: tuple[str, ...] = TARGETS) -> PipelineState:
    """Wait until the namespace's pipeline state has no violations; fail listing them."""
    last: list[str] = []

    async def check() -> PipelineState | None:
        nonlocal last
        state = await observe(kube, namespace, targets)
        last = violations(state, expected)
        return state if not last else None

    try:
        return await eventually(check, within=within)
    except AssertionError as exc:
        raise AssertionError(f"not converged to {expected} pods: {last[:10]}") from exc


async def wait_virtual_nodes_ready(kube: dict[str, k8s.ApiClient]) -> None:
    async def ready() -> bool:
        nodes = (await k8s.CoreV1Api(kube[SOURCE]).list_node()).items
        virtual = {n.metadata.name: n for n in nodes if n.metadata.name.startswith("admiralty-")}
        wanted = {f"admiralty-{t}" for t in TARGETS}  # and those of targets a test added at runtime
        # Ready, and without the node lifecycle controller's not-ready/unreachable taints, which it
        # removes a few seconds after a heartbeat resumed (services restarted by a previous test)
        return set(virtual) >= wanted and all(
            any(c.type == "Ready" and c.status == "True" for c in virtual[name].status.conditions or [])
            and not any(t.key.startswith("node.kubernetes.io/") for t in virtual[name].spec.taints or [])
            for name in wanted)

    await eventually(ready, within=60)


def nginx_deployment(replicas: int, cpu: str = "100m") -> JSON:
    """The Admiralty getting-started Deployment, unchanged but for the replica count."""
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "nginx"},
        "spec": {
            "replicas": replicas, "selector": {"matchLabels": {"app": "nginx"}},
            "template": {
                "metadata": {"labels": {"app": "nginx"}, "annotations": {"multicluster.admiralty.io/elect": ""}},
                "spec": {"containers": [{
                    "name": "nginx", "image": "nginx",
                    "resources": {"requests": {"cpu": cpu, "memory": "32Mi"}},
                    "ports": [{"containerPort": 80}]}]},
            },
        },
    }


async def create_when_ready(create: Any) -> None:
    """Create, retrying while a new namespace's default ServiceAccount does not exist yet."""
    for _ in range(60):
        try:
            await create()
            return
        except k8s.ApiException as exc:
            if exc.status != 403 or "serviceaccount" not in str(exc.body).lower():
                raise
            await asyncio.sleep(0.5)
    raise AssertionError("namespace never got its default ServiceAccount")


async def empty_and_delete_namespace(kube: dict[str, k8s.ApiClient], name: str) -> None:
    """Leave the clusters empty for the next test: remove the workload, wait until the
    pipeline has deleted every delegate, then drop the namespace everywhere."""
    await k8s.AppsV1Api(kube[SOURCE]).delete_collection_namespaced_deployment(name)
    await k8s.CoreV1Api(kube[SOURCE]).delete_collection_namespaced_pod(name)
    await converged(kube, name, 0, within=90)
    for api in kube.values():
        try:
            await k8s.CoreV1Api(api).delete_namespace(name)
        except k8s.ApiException as exc:
            if exc.status != 404:
                raise
