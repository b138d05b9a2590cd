"""The local environment is made of real parts: each claim is checked against them."""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid

import nats
import pytest
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException
from nats.js.api import StreamConfig
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from localenv import EnvironmentInfo, LocalEnvironment
from localenv.tools import KUBERNETES_VERSION
from tests.helpers import eventually

pytestmark = pytest.mark.integration


async def test_api_servers_report_their_real_version(kube: dict[str, k8s.ApiClient]) -> None:
    for api in kube.values():
        version = await k8s.VersionApi(api).get_code()
        assert version.git_version == KUBERNETES_VERSION


async def test_nodes_are_kwok_workers_named_after_their_cluster(
    kube: dict[str, k8s.ApiClient], env_info: EnvironmentInfo
) -> None:
    for name, api in kube.items():
        nodes = (await k8s.CoreV1Api(api).list_node(label_selector="type=kwok")).items
        assert sorted(n.metadata.name for n in nodes) == [f"{name}-worker-{i}" for i in range(3)]
        for node in nodes:
            ready = next(c for c in node.status.conditions if c.type == "Ready")
            assert ready.status == "True"
            assert not node.spec.taints
            assert node.status.allocatable["cpu"] == "3900m"
            assert node.spec.pod_cidr and node.spec.pod_cidr.startswith(env_info.clusters[name]["pod_cidr"][:5])


@pytest.mark.parametrize("cluster", ["c1", "c2"])
async def test_deployment_is_scheduled_runs_and_is_garbage_collected(
    kube: dict[str, k8s.ApiClient], cluster: str
) -> None:
    api = kube[cluster]
    core, apps = k8s.CoreV1Api(api), k8s.AppsV1Api(api)
    namespace = f"env-{uuid.uuid4().hex[:6]}"
    await core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
    labels = {"app": "web"}
    deployment = k8s.V1Deployment(
        metadata=k8s.V1ObjectMeta(name="web"),
        spec=k8s.V1DeploymentSpec(
            replicas=3,
            selector=k8s.V1LabelSelector(match_labels=labels),
            template=k8s.V1PodTemplateSpec(
                metadata=k8s.V1ObjectMeta(labels=labels),
                spec=k8s.V1PodSpec(containers=[k8s.V1Container(
                    name="web", image="nginx",
                    resources=k8s.V1ResourceRequirements(requests={"cpu": "100m", "memory": "32Mi"}))]),
            ),
        ),
    )

    async def create_when_service_account_exists() -> bool:
        try:
            await apps.create_namespaced_deployment(namespace, deployment)
            return True
        except ApiException as exc:  # the namespace's default ServiceAccount may lag a moment
            if exc.status != 403:
                raise
            return False

    await eventually(create_when_service_account_exists, within=30)

    async def running_pods() -> list[k8s.V1Pod]:
        pods = (await core.list_namespaced_pod(namespace, label_selector="app=web")).items
        good = [p for p in pods if p.status.phase == "Running" and p.status.pod_ip
                and p.spec.node_name and p.spec.node_name.startswith(f"{cluster}-worker-")]
        return good if len(good) == 3 and len(pods) == 3 else []

    pods = await eventually(running_pods)
    assert len({p.status.pod_ip for p in pods}) == 3

    await apps.delete_namespaced_deployment("web", namespace, propagation_policy="Background")

    async def no_pods() -> bool:
        return not (await core.list_namespaced_pod(namespace, label_selector="app=web")).items

    await eventually(no_pods)
    await core.delete_namespace(namespace)


async def test_jetstream_message_survives_a_nats_restart(local_env: LocalEnvironment) -> None:
    url = local_env.info().nats_admin_url
    stream, subject = f"ENVTEST_{uuid.uuid4().hex[:6]}", f"envtest.{uuid.uuid4().hex[:6]}"
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=stream, subjects=[subject]))
    ack = await js.publish(subject, b"kept across restarts")
    assert ack.stream == stream
    await nc.close()

    await asyncio.to_thread(local_env.restart_nats)

    nc = await nats.connect(url)
    try:
        sub = await nc.jetstream().pull_subscribe(subject, durable="reader", stream=stream)
        messages = await sub.fetch(1, timeout=10)
        assert [m.data for m in messages] == [b"kept across restarts"]
        await messages[0].ack()
    finally:
        await nc.close()


async def test_span_exported_over_otlp_comes_back_from_jaeger(env_info: EnvironmentInfo) -> None:
    service = f"envtest-{uuid.uuid4().hex[:6]}"
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(
        OTLPSpanExporter(endpoint=env_info.otlp_grpc_endpoint, insecure=True)))
    with provider.get_tracer("envtest").start_as_current_span("probe-span") as span:
        trace_id = format(span.get_span_context().trace_id, "032x")
    provider.shutdown()

    def fetch() -> list[dict[str, object]]:
        url = f"{env_info.jaeger_query_url}/api/traces/{trace_id}"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return list(json.load(resp)["data"])
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return []
            raise

    async def spans() -> list[str]:
        data = await asyncio.to_thread(fetch)
        return [s["operationName"] for t in data for s in t["spans"]]  # type: ignore[index]

    assert await eventually(spans, within=30) == ["probe-span"]
