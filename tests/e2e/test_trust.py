"""Targets choose whom they accept, end to end: Admiralty's Source and ClusterSource, enforced by RBAC.

The local environment's c2 accepts c1 through a ClusterSource named ``c1``
(its services' user). Here c2 trades it for a Source in one namespace: pods
of that namespace still run in c2; pods of any other namespace never get a
delegate there, and their proxies say why; and c2's own API server refuses
c1's identity outside the granted namespace, whatever our services do.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid

import pytest
from kubernetes_asyncio import client as k8s

from localenv import LocalEnvironment
from localenv.rbac import SERVICE_USER, cluster_source
from localenv.tools import bin_dir
from mcsched.constants import NAMESPACE_LABEL, NAMESPACE_LABEL_VALUE
from tests.e2e.pipeline import JSON, SOURCE, create_when_ready, empty_and_delete_namespace, list_pods
from tests.helpers import eventually

pytestmark = pytest.mark.e2e

TARGET = "c2"


def can(env: LocalEnvironment, verb: str, resource: str, namespace: str | None) -> bool:
    """What c2's API server says the services' user may do (``kubectl auth can-i --as``)."""
    args = [str(bin_dir() / "kubectl"), "--kubeconfig", str(env.cluster(TARGET).admin_kubeconfig),
            "auth", "can-i", verb, resource, "--as", SERVICE_USER, *(["-n", namespace] if namespace else [])]
    answer = subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.strip()
    assert answer in ("yes", "no"), answer
    return answer == "yes"


def pinned_pod(name: str) -> JSON:
    """An elected pod only c2 can run (its nodeSelector names a node of c2)."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "annotations": {"multicluster.admiralty.io/elect": ""}},
            "spec": {"nodeSelector": {"kubernetes.io/hostname": f"{TARGET}-worker-0"},
                     "containers": [{"name": "app", "image": "nginx",
                                     "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}}


async def test_a_target_accepts_a_source_only_where_its_sources_say(
        kube: dict[str, k8s.ApiClient], pipeline: LocalEnvironment) -> None:
    c2 = pipeline.cluster(TARGET)
    suffix = uuid.uuid4().hex[:6]
    accepted, refused = f"accepted-{suffix}", f"refused-{suffix}"
    source_core, target_core = k8s.CoreV1Api(kube[SOURCE]), k8s.CoreV1Api(kube[TARGET])
    for name in (accepted, refused):
        await source_core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(
            name=name, labels={NAMESPACE_LABEL: NAMESPACE_LABEL_VALUE})))
    await target_core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=accepted)))
    source = {"apiVersion": "multicluster.admiralty.io/v1alpha1", "kind": "Source",
              "metadata": {"name": SOURCE, "namespace": accepted}, "spec": {"userName": SERVICE_USER}}
    c2.kubectl("apply", "-f", "-", input_text=json.dumps(source))
    c2.kubectl("delete", "clustersource", SOURCE)
    try:
        # c2's RBAC, as the source-controller rewrote it: c1 may work in `accepted` only.
        await eventually(lambda: asyncio.to_thread(lambda: not can(pipeline, "create", "pods", refused)))
        assert can(pipeline, "create", "pods", accepted)
        assert not can(pipeline, "create", "namespaces", None)
        assert not can(pipeline, "create", "secrets", refused)
        assert can(pipeline, "list", "nodes", None)  # estimates still read the cluster

        for namespace in (accepted, refused):
            await create_when_ready(lambda ns=namespace: source_core.create_namespaced_pod(ns, pinned_pod("web")))

        async def delegate_in_accepted() -> list[JSON]:
            return [p for p in await list_pods(kube[TARGET], accepted) if p.get("status", {}).get("phase") == "Running"]

        await eventually(delegate_in_accepted, within=60)

        async def refused_says_why() -> str:
            proxy = (await source_core.read_namespaced_pod("web", refused)).to_dict()
            conditions = (proxy.get("status") or {}).get("conditions") or []
            return next((c["message"] for c in conditions if c["type"] == "PodScheduled"
                         and c["status"] == "False" and "does not accept" in (c.get("message") or "")), "")

        message = await eventually(refused_says_why, within=60)
        assert f"cluster {TARGET} does not accept this source's pods in namespace {refused}" in message
        assert await list_pods(kube[TARGET], refused) == []
        assert (await source_core.read_namespaced_pod("web", refused)).spec.node_name is None
    finally:
        c2.kubectl("apply", "-f", "-", input_text=json.dumps(cluster_source(SOURCE)))
        c2.kubectl("delete", "source", SOURCE, "-n", accepted, "--ignore-not-found")
        await eventually(lambda: asyncio.to_thread(lambda: can(pipeline, "create", "namespaces", None)))
        for namespace in (accepted, refused):
            await empty_and_delete_namespace(kube, namespace)
