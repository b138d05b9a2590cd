"""``make namespaces``: thousands of elected pods in thousands of namespaces stall no other pod.

On the running local environment (``make up``), adds one roomy kwok node per
cluster (kwok's default nodes hold 110 pods), then creates
``NAMESPACES_COUNT`` namespaces (2000 by default), each with one elected pod,
20 at a time. Meanwhile, once the namespaces are coming in, a 10-replica
Deployment is created in a namespace of its own: the probe. It prints how
long the probe took to be Running then, against the same probe on the idle
environment before, and how long until every pod was Running; it fails if the
probe or the pods do not get there (``NAMESPACES_TIMEOUT`` seconds). The
namespaces are deleted at the end.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

from mcsched.constants import ELECT_ANNOTATION, NAMESPACE_LABEL, NAMESPACE_LABEL_VALUE, PROXY_SCHEDULER_NAME
from mcsched.kube import KubeClient, KubeError
from mcsched.settings import ClusterSettings

from .environment import LocalEnvironment

PREFIX = "many"
PROBE_REPLICAS = 10


def _pod_spec() -> dict[str, Any]:
    requests = {"cpu": "1m", "memory": "1Mi"}
    return {"containers": [{"name": "app", "image": "nginx", "resources": {"requests": requests}}]}


async def _namespace(client: KubeClient, name: str) -> None:
    await client.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": name, "labels": {NAMESPACE_LABEL: NAMESPACE_LABEL_VALUE}}})


async def _until(what: str, check: Any, timeout: float) -> float:
    """Seconds until ``check()`` is true; TimeoutError naming ``what`` after ``timeout``."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what}: not after {timeout:.0f}s")
        await asyncio.sleep(0.25)
    return time.monotonic() - started


async def _probe(client: KubeClient, namespace: str, timeout: float) -> float:
    """Seconds from creating a Deployment of elected pods in a new namespace to all of them Running."""
    await _namespace(client, namespace)
    labels = {"app": "probe"}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "probe"},
                  "spec": {"replicas": PROBE_REPLICAS, "selector": {"matchLabels": labels}, "template": {
                      "metadata": {"labels": labels, "annotations": {ELECT_ANNOTATION: ""}}, "spec": _pod_spec()}}}
    await _until("the probe's default ServiceAccount", lambda: _has_service_account(client, namespace), timeout)
    started = time.monotonic()
    await client.create(f"/apis/apps/v1/namespaces/{namespace}/deployments", deployment)

    async def running() -> bool:
        pods = (await client.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector="app=probe"))["items"]
        return sum(1 for p in pods if p["status"].get("phase") == "Running") >= PROBE_REPLICAS

    await _until(f"the probe in {namespace}", running, timeout)
    return time.monotonic() - started


async def _has_service_account(client: KubeClient, namespace: str) -> bool:
    return bool((await client.get(f"/api/v1/namespaces/{namespace}/serviceaccounts"))["items"])


async def run(env: LocalEnvironment, count: int, timeout: float) -> int:
    for cluster in env.info().cluster_names():
        local = env.cluster(cluster)
        await asyncio.to_thread(local.add_nodes, [f"{cluster}-roomy-0"],
                                {"cpu": "64", "memory": "256Gi", "pods": str(count + 500)})
        await asyncio.to_thread(local.wait_nodes_ready, [f"{cluster}-roomy-0"])
    source = env.info().cluster_names()[0]
    client = await KubeClient.connect(ClusterSettings(name=source, kubeconfig=Path(env.info().kubeconfig),
                                                      context=source))
    names = [f"{PREFIX}-{i}" for i in range(count)]
    try:
        idle = await _probe(client, f"{PREFIX}-probe-idle", timeout)
        print(f"probe on the idle environment: {PROBE_REPLICAS} pods Running in {idle:.1f}s", flush=True)
        started = time.monotonic()
        gate = asyncio.Semaphore(20)

        async def one(name: str) -> None:
            async with gate:
                await _namespace(client, name)
                pod = {"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": "p", "annotations": {ELECT_ANNOTATION: ""}}, "spec": _pod_spec()}
                for _ in range(200):  # until the new namespace has its default ServiceAccount
                    try:
                        await client.create(f"/api/v1/namespaces/{name}/pods", pod)
                        return
                    except KubeError as exc:
                        if exc.status != 403:
                            raise
                        await asyncio.sleep(0.25)
                raise TimeoutError(f"{name} never got its default ServiceAccount")

        creating = asyncio.gather(*(one(n) for n in names))
        await asyncio.sleep(min(30.0, count / 50))  # well into the flood
        busy = await _probe(client, f"{PREFIX}-probe-busy", timeout)
        print(f"probe while {count} namespaces come in: {PROBE_REPLICAS} pods Running in {busy:.1f}s", flush=True)
        await creating
        print(f"{count} namespaces, each with an elected pod, created in {time.monotonic() - started:.1f}s",
              flush=True)

        async def all_running() -> bool:
            pods = (await client.get("/api/v1/pods", fieldSelector=(
                f"status.phase=Running,spec.schedulerName={PROXY_SCHEDULER_NAME}")))["items"]
            return sum(1 for p in pods if p["metadata"]["namespace"].startswith(f"{PREFIX}-")
                       and p["metadata"]["name"] == "p") >= count

        await _until(f"{count} pods Running", all_running, timeout)
        print(f"every pod Running {time.monotonic() - started:.1f}s after the first namespace", flush=True)
        return 0
    except TimeoutError as exc:
        print(f"FAILED: {exc}", flush=True)
        return 1
    finally:
        for name in [*names, f"{PREFIX}-probe-idle", f"{PREFIX}-probe-busy"]:
            try:
                await client.delete(f"/api/v1/namespaces/{name}")
            except KubeError:
                pass
        await client.close()


def main() -> int:
    env = LocalEnvironment(Path(os.environ.get("MCS_LOCAL_DIR", ".local")))
    if not env.running():
        print("the local environment is not running: `make up` first", file=sys.stderr)
        return 2
    count = int(os.environ.get("NAMESPACES_COUNT", "2000"))
    return asyncio.run(run(env, count, float(os.environ.get("NAMESPACES_TIMEOUT", "600"))))
