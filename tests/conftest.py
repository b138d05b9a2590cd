"""Session fixtures: one real local environment for the integration and e2e layers.

The environment (clusters, NATS JetStream, Jaeger) is started once per test
session under ``.local/test`` (``MCS_TEST_ENV_DIR`` overrides it) and stopped at
the end. Unit tests never touch it: the fixtures are only started when a test
asks for them.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.config import new_client_from_config

from localenv import EnvironmentInfo, LocalEnvironment

REPO = Path(__file__).resolve().parent.parent
TEST_ENV_DIR = Path(os.environ.get("MCS_TEST_ENV_DIR", REPO / ".local" / "test"))
TEST_CLUSTERS = os.environ.get("MCS_TEST_CLUSTERS", "c1,c2").split(",")


@pytest.fixture(scope="session")
def local_env() -> Iterator[LocalEnvironment]:
    """The running local environment (started for this session, stopped after it)."""
    env = LocalEnvironment(TEST_ENV_DIR)
    env.up(TEST_CLUSTERS, nodes=3, log=lambda m: print(f"[local-env] {m}", flush=True))
    try:
        yield env
    finally:
        env.down()


@pytest.fixture(scope="session")
def env_info(local_env: LocalEnvironment) -> EnvironmentInfo:
    return local_env.info()


@pytest.fixture(scope="session")
async def kube(env_info: EnvironmentInfo) -> AsyncIterator[dict[str, k8s.ApiClient]]:
    """One kubernetes_asyncio ApiClient per cluster, keyed by cluster name."""
    clients = {
        name: await new_client_from_config(config_file=env_info.kubeconfig, context=name)
        for name in env_info.clusters
    }
    try:
        yield clients
    finally:
        for api in clients.values():
            await api.close()


@pytest.fixture(scope="session")
def nats_url(env_info: EnvironmentInfo) -> str:
    """NATS as an administrator (the services each have a user of their own)."""
    return env_info.nats_admin_url
