"""End-to-end fixtures: the four services running against the session's local environment."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from kubernetes_asyncio import client as k8s

from localenv import LocalEnvironment
from localenv.services import start_services, stop_services, wait_services_ready, write_config
from mcsched.constants import NAMESPACE_LABEL, NAMESPACE_LABEL_VALUE
from tests.e2e.pipeline import SOURCE, empty_and_delete_namespace, wait_virtual_nodes_ready


@pytest.fixture(scope="session")
def pipeline(local_env: LocalEnvironment) -> Iterator[LocalEnvironment]:
    """The services (one replica each), with a short resync so repairs are quick to observe."""
    write_config(local_env, resync_seconds=3.0)
    start_services(local_env)
    wait_services_ready(local_env)
    try:
        yield local_env
    finally:
        stop_services(local_env)


@pytest.fixture
async def namespace(pipeline: LocalEnvironment, kube: dict[str, k8s.ApiClient]) -> AsyncIterator[str]:
    """A fresh namespace in the source, enabled for multicluster scheduling."""
    await wait_virtual_nodes_ready(kube)
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    await k8s.CoreV1Api(kube[SOURCE]).create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(
        name=name, labels={NAMESPACE_LABEL: NAMESPACE_LABEL_VALUE})))
    yield name
    await empty_and_delete_namespace(kube, name)
