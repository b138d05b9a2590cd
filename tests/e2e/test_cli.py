"""mcsctl against the running pipeline: tables, JSON, explanations and clear errors."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from kubernetes_asyncio import client as k8s

from localenv import EnvironmentInfo, LocalEnvironment
from mcsched.cli import NO_ANSWERS_YET
from mcsched.kube import JSON
from tests.e2e.pipeline import SOURCE, create_when_ready
from tests.helpers import eventually

pytestmark = pytest.mark.e2e


def mcsctl(env: LocalEnvironment, info: EnvironmentInfo, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mcsched.cli", "--config", str(env.root / "mcs.yaml"),
                           "--kubeconfig", info.kubeconfig, "--jaeger", info.jaeger_query_url, *args],
                          capture_output=True, text=True, timeout=60)


async def test_mcsctl_lists_explains_and_fails_clearly(
    pipeline: LocalEnvironment, env_info: EnvironmentInfo, kube: dict[str, k8s.ApiClient], namespace: str
) -> None:
    pods = [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": name, "annotations": {"multicluster.admiralty.io/elect": ""}},
             "spec": {"containers": [{"name": "c", "image": "nginx", "resources": {"requests": {"cpu": cpu}}}]}}
            for name, cpu in (("small", "100m"), ("huge", "64"))]
    core = k8s.CoreV1Api(kube[SOURCE])
    for pod in pods:
        await create_when_ready(lambda pod=pod: core.create_namespaced_pod(namespace, pod))

    async def small_placed() -> bool:
        proxy = await core.read_namespaced_pod("small", namespace)
        return proxy.status.phase == "Running"


    await eventually(small_placed, within=60)

    clusters = mcsctl(pipeline, env_info, "clusters")
    assert clusters.returncode == 0, clusters.stderr
    assert "admiralty-c2" in clusters.stdout and "Ready" in clusters.stdout
    as_json = json.loads(mcsctl(pipeline, env_info, "-o", "json", "clusters").stdout)
    assert {c["name"] for c in as_json} == {"c1", "c2"}
    assert {v["name"] for v in as_json[0]["virtual_nodes"]} == {"admiralty-c1", "admiralty-c2"}

    proxies = json.loads(mcsctl(pipeline, env_info, "-o", "json", "proxies", "-n", namespace).stdout)
    by_name = {p["name"]: p for p in proxies}
    assert by_name["small"]["phase"] == "Running" and by_name["small"]["delegate_phase"] == "Running"
    assert by_name["small"]["delegate"].startswith("small-") and by_name["small"]["target"] in ("c1", "c2")
    assert by_name["huge"]["target"] is None and by_name["huge"]["delegate"] is None
    table = mcsctl(pipeline, env_info, "proxies", "-n", namespace).stdout
    assert table.splitlines()[0].split()[:3] == ["SOURCE", "NAMESPACE", "PROXY"]

    # The answers and the reason come from the pod's trace, which each service sends to Jaeger in
    # batches every few seconds (a batch may hold some of a round's spans and not yet the others).
    async def explained_fully(pod: str) -> JSON | None:
        result = await asyncio.to_thread(mcsctl, pipeline, env_info, "-o", "json", "explain", f"{namespace}/{pod}")
        assert result.returncode == 0, result.stderr
        explanation: JSON = json.loads(result.stdout)
        assert explanation["answers_error"] is None, explanation
        return explanation if len(explanation["answers"]) == 2 and (
            explanation["why"] or explanation["target"] is None) else None

    await eventually(lambda: explained_fully("small"), within=60)
    explained = mcsctl(pipeline, env_info, "explain", f"{namespace}/small")
    assert explained.returncode == 0, explained.stderr
    assert NO_ANSWERS_YET not in explained.stdout
    assert "Decision:  bound to admiralty-" in explained.stdout
    assert "<- chosen" in explained.stdout and "Jaeger:    http" in explained.stdout
    # Both clusters fit and nothing ranks them: the draw in proportion to room decided.
    assert "Why:       drawn among c1, c2 in proportion to the room each has left" in explained.stdout, \
        explained.stdout
    refused = await eventually(lambda: explained_fully("huge"), within=60)
    assert refused["target"] is None and "insufficient cpu" in refused["decision"]
    assert all(not a["fits"] and "insufficient cpu" in a["reason"] for a in refused["answers"])
    assert len(refused["answers"]) == 2

    missing = mcsctl(pipeline, env_info, "explain", f"{namespace}/nope")
    assert missing.returncode == 1 and f"pod {namespace}/nope not found in cluster c1" in missing.stderr
    unknown = mcsctl(pipeline, env_info, "proxies", "--source", "c9")
    assert unknown.returncode == 1 and "unknown cluster 'c9'" in unknown.stderr
