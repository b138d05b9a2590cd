"""docker-compose.yml for real: the containerised stack places pods on the local environment's clusters.

The project's compose file, unchanged but for an override that points it at the
session's clusters (host networking, free ports: :mod:`localenv.compose`), runs
through the compose v2 binary against podman's Docker API, with the project's
image (``make image``) and NATS and Jaeger images built from the project's
binaries, as ``docker compose up --scale watcher=2 --scale feedback=3``. The
session's own services stop meanwhile and start again after.
Skipped where podman cannot run (not installed, or not root).
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
from kubernetes_asyncio import client as k8s

from localenv import LocalEnvironment, compose, image
from localenv.services import start_services, wait_services_ready
from mcsched.admission import WEBHOOK_CONFIGURATION_NAME
from tests.e2e.pipeline import SOURCE, converged, create_when_ready, list_pods, nginx_deployment
from tests.helpers import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(image.usable() is not None, reason=str(image.usable()))]

SERVICES = {"watcher", "proxy-scheduler", "candidate-scheduler", "feedback"}
SCALE = {"watcher": 2, "feedback": 3}
# runtime's log line each time a process learns how many its stage has, and what it takes
SHARES_LINE = re.compile(r" (\S+): (\d+) processes of this stage(?: now)?; this one (?:takes|keeps) (.+)$")


@pytest.fixture(scope="module")
async def stack(pipeline: LocalEnvironment, kube: dict[str, k8s.ApiClient]) -> AsyncIterator[dict[str, Any]]:
    try:
        yield await asyncio.to_thread(compose.up, pipeline, lambda _: None, SCALE)
    finally:
        await asyncio.to_thread(compose.down, pipeline)
        start_services(pipeline)
        await asyncio.to_thread(wait_services_ready, pipeline)
        # The containers' webhook is gone: wait until the session's watcher has registered its own again.
        wanted = f"https://127.0.0.1:{json.loads((pipeline.root / 'mcs.yaml').read_text())['webhook']['port']}/"
        admission = k8s.AdmissionregistrationV1Api(kube[SOURCE])

        async def ours_again() -> bool:
            config = await admission.read_mutating_webhook_configuration(WEBHOOK_CONFIGURATION_NAME)
            return all((w.client_config.url or "").startswith(wanted) for w in config.webhooks or [])

        await eventually(ours_again, within=60)


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


async def test_the_compose_stack_places_pods_and_traces_them_in_its_jaeger(
        kube: dict[str, k8s.ApiClient], namespace: str, stack: dict[str, Any]) -> None:
    listed = await asyncio.to_thread(image.podman, "ps", "--filter",
                                     f"label=com.docker.compose.project={compose.PROJECT}", "--format",
                                     "{{.Labels}}", capture_output=True)
    # the four services, NATS and Jaeger running as containers of the project
    assert sum("com.docker.compose.service" in line for line in listed.stdout.splitlines()) >= len(SERVICES) + 2

    apps = k8s.AppsV1Api(kube[SOURCE])
    await create_when_ready(lambda: apps.create_namespaced_deployment(namespace, nginx_deployment(4, cpu="10m")))
    await converged(kube, namespace, 4, within=120)
    [proxy, *_] = [p for p in await list_pods(kube[SOURCE], namespace, label_selector="app=nginx")
                   if p["spec"].get("schedulerName") == "admiralty-proxy"]
    trace_id = proxy["metadata"]["annotations"]["multicluster.admiralty.io/trace-id"]

    async def whole_trace() -> set[str] | None:
        try:
            found = await asyncio.to_thread(_get, f"{stack['jaeger_query_url']}/api/traces/{trace_id}")
        except OSError:
            return None
        services = {p["serviceName"] for t in found.get("data") or [] for p in t["processes"].values()}
        return services if services >= SERVICES else None

    assert await eventually(whole_trace, within=60) >= SERVICES  # every containerised stage, one trace


def _containers(service: str) -> list[str]:
    listed = image.podman("ps", "--filter", f"label=com.docker.compose.project={compose.PROJECT}", "--filter",
                          f"label=com.docker.compose.service={service}", "--format", "{{.Names}}",
                          capture_output=True)
    names: list[str] = listed.stdout.split()
    return names


def _last_shares(container: str) -> tuple[int, str] | None:
    """(processes of its stage, what it takes) as the container's process last logged them."""
    logs = image.podman("logs", container, capture_output=True, check=False)
    found = [m for m in (SHARES_LINE.search(line) for line in (logs.stdout + logs.stderr).splitlines()) if m]
    return (int(found[-1].group(2)), found[-1].group(3)) if found else None


async def test_scaled_stages_share_their_work_out_without_further_settings(stack: dict[str, Any]) -> None:
    """`--scale feedback=3` in the host's network: three containers, each its own member of the stage
    (host name and PID 1 alike), each taking a different share; every watcher serves the webhook (on
    one port, with the compose file's one certificate)."""
    for service, count in SCALE.items():
        containers = await asyncio.to_thread(_containers, service)
        assert len(containers) == count, containers

        async def shared_out(containers: list[str] = containers, count: int = count) -> list[str] | None:
            last = [await asyncio.to_thread(_last_shares, c) for c in containers]
            if not all(entry is not None and entry[0] == count for entry in last):
                return None
            shares = [entry[1] for entry in last if entry is not None]
            return shares if len(set(shares)) == count and "everything" not in shares else None

        try:
            await eventually(shared_out, within=60)
        except AssertionError as exc:  # what each process believes
            raise AssertionError(f"{service}: {[_last_shares(c) for c in containers]}") from exc
    for watcher in await asyncio.to_thread(_containers, "watcher"):
        logs = await asyncio.to_thread(image.podman, "logs", watcher, capture_output=True, check=False)
        assert "admission webhook listening on" in logs.stdout + logs.stderr, watcher
