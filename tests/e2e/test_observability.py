"""One trace per elected pod in Jaeger, and each service's metrics and health endpoints."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

import pytest
from kubernetes_asyncio import client as k8s

from localenv import EnvironmentInfo, LocalEnvironment
from localenv.services import SERVICES, process_name
from mcsched.constants import TRACE_ID_ANNOTATION
from tests.e2e.pipeline import SOURCE, converged, create_when_ready
from tests.helpers import eventually

pytestmark = pytest.mark.e2e


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_a_pods_whole_scheduling_is_one_trace_across_all_four_services(
    kube: dict[str, k8s.ApiClient], namespace: str, env_info: EnvironmentInfo
) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "traced", "annotations": {"multicluster.admiralty.io/elect": ""}},
           "spec": {"containers": [{"name": "c", "image": "nginx",
                                    "resources": {"requests": {"cpu": "100m"}}}]}}
    core = k8s.CoreV1Api(kube[SOURCE])
    await create_when_ready(lambda: core.create_namespaced_pod(namespace, pod))
    state = await converged(kube, namespace, 1)
    proxy = state.proxies[0]
    trace_id = proxy["metadata"]["annotations"][TRACE_ID_ANNOTATION]
    target = proxy["spec"]["nodeName"].removeprefix("admiralty-")

    async def whole_trace() -> dict[str, Any] | None:
        status, body = await asyncio.to_thread(_get, f"{env_info.jaeger_query_url}/api/traces/{trace_id}")
        if status != 200:
            return None
        data = json.loads(body)["data"][0]
        names = {s["operationName"] for s in data["spans"]}
        # Every service exports its spans on its own schedule: wait for one span of each.
        wanted = {"publish elect", "schedule proxy", "record choice", f"create delegate in {target}",
                  "bind proxy", "mirror status"}
        missing[:] = sorted(wanted - names)
        return data if not missing else None

    missing: list[str] = ["the trace"]
    try:
        trace = await eventually(whole_trace, within=60)
    except AssertionError as exc:
        raise AssertionError(f"spans never reported: {missing}") from exc
    spans = {s["spanID"]: s for s in trace["spans"]}
    service_of = {sid: trace["processes"][s["processID"]]["serviceName"] for sid, s in spans.items()}
    assert set(service_of.values()) >= {"watcher", "proxy-scheduler", "candidate-scheduler", "feedback"}

    def parent(span: dict[str, Any]) -> dict[str, Any] | None:
        refs = [r for r in span.get("references", []) if r["refType"] == "CHILD_OF"]
        return spans.get(refs[0]["spanID"]) if refs else None

    by_name = {s["operationName"]: s for s in spans.values()}
    roots = [s for s in spans.values() if parent(s) is None]
    assert [r["operationName"] for r in roots] == ["admit pod"], "one root, the admission"
    edges = {(s["operationName"], p["operationName"]) for s in spans.values() if (p := parent(s)) is not None}
    expected_edges = {
        ("publish elect", "admit pod"),
        ("schedule proxy", "publish elect"),
        ("ask c1", "schedule proxy"), ("ask c2", "schedule proxy"),  # every target estimates
        ("candidate c1", "ask c1"), ("candidate c2", "ask c2"),  # ... in its candidate-scheduler
        ("record choice", "schedule proxy"),  # the cluster chosen, on the proxy
        (f"create delegate in {target}", "schedule proxy"),
        ("bind proxy", f"create delegate in {target}"),  # once the target's scheduler placed the delegate
        ("mirror status", f"create delegate in {target}"),
    }
    assert expected_edges <= edges, f"missing parent links: {expected_edges - edges}"
    tags = {t["key"]: t["value"] for t in by_name["schedule proxy"]["tags"]}
    assert tags["target"] == target
    ask_tags = {t["key"]: t["value"] for t in by_name[f"ask {target}"]["tags"]}
    assert ask_tags["fits"] is True


async def test_every_service_serves_metrics_and_health(
    pipeline: LocalEnvironment, kube: dict[str, k8s.ApiClient], namespace: str
) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "counted", "annotations": {"multicluster.admiralty.io/elect": ""}},
           "spec": {"containers": [{"name": "c", "image": "nginx"}]}}
    await create_when_ready(lambda: k8s.CoreV1Api(kube[SOURCE]).create_namespaced_pod(namespace, pod))
    await converged(kube, namespace, 1)
    expected = {
        "watcher": 'mcs_api_requests_total{cluster="c1",method="PATCH"}',
        "proxy_scheduler": 'mcs_messages_handled_total{kind="elect"}',
        "candidate_scheduler": 'mcs_messages_handled_total{kind="delegate"}',
        "feedback": 'mcs_messages_handled_total{kind="status"}',
    }
    for service in SERVICES:
        record = pipeline.processes.get(process_name(service, 0))
        assert record is not None
        base = record.meta["metrics_url"]
        assert await asyncio.to_thread(_get, f"{base}/healthz") == (200, "ok")
        assert await asyncio.to_thread(_get, f"{base}/readyz") == (200, "ok")
        status, metrics = await asyncio.to_thread(_get, f"{base}/metrics")
        assert status == 200
        line = next((m for m in metrics.splitlines() if m.startswith(expected[service])), None)
        assert line is not None and float(line.rsplit(" ", 1)[1]) >= 1, f"{service}: {expected[service]}"
    for service, stage in (("proxy_scheduler", "cluster_chosen"), ("candidate_scheduler", "delegate_created"),
                           ("feedback", "proxy_bound"), ("feedback", "proxy_running")):
        record = pipeline.processes.get(process_name(service, 0))
        assert record is not None
        _, scraped = await asyncio.to_thread(_get, record.meta["metrics_url"] + "/metrics")
        line = next((m for m in scraped.splitlines()
                     if m.startswith(f'mcs_placement_seconds_count{{stage="{stage}"}}')), None)
        assert line is not None and float(line.rsplit(" ", 1)[1]) >= 1, f"{service} observes {stage}"
        if service == "proxy_scheduler":
            assert 'mcs_consumer_lag_messages{consumer="proxy-scheduler"}' in scraped
