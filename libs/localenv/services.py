"""Run the four services against the local environment, as recorded processes.

``write_config`` writes the services' settings file (``<env>/mcs.yaml``) from
the environment's endpoints: the first cluster is the source, every cluster a
target (the source too, "target self"). ``start_services`` starts
``replicas`` processes of each service (``svc-<service>-<i>``). Every
watcher serves the admission webhook on the one port the API servers call,
with one certificate (``<env>/webhook/``): the kernel spreads the API
servers' connections among them (``webhook.reuse_port``), as a Service would
spread them among the chart's watcher pods.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from mcsched import pki

from .environment import SUBJECT_PREFIX, EnvironmentInfo, LocalEnvironment, free_port

SERVICES = ("watcher", "proxy_scheduler", "candidate_scheduler", "feedback")


def write_config(env: LocalEnvironment, sources: list[str] | None = None,
                 resync_seconds: float = 10.0) -> Path:
    info: EnvironmentInfo = env.info()
    names = info.cluster_names()
    sources = sources or names[:1]
    config: dict[str, Any] = {
        "clusters": [{"name": n, "kubeconfig": info.services_kubeconfig or info.kubeconfig, "context": n,
                      "source": n in sources, "target": True} for n in names],
        "nats_url": info.nats_url,
        "stream_replicas": min(3, len(info.nats_monitor_urls) or 1),
        "subject_prefix": SUBJECT_PREFIX,
        "resync_period_seconds": resync_seconds,
        "otlp_endpoint": info.otlp_grpc_endpoint,
        "webhook": {"listen_host": "127.0.0.1", "port": free_port(), "reuse_port": True,
                    **_webhook_certificate(env.root / "webhook")},
        "kubelet": {"listen_host": "127.0.0.1", "port": free_port(), "address": "127.0.0.1"},
    }
    path = env.root / "mcs.yaml"
    path.write_text(json.dumps(config, indent=1))
    return path


def _webhook_certificate(directory: Path) -> dict[str, str]:
    """A CA and a serving certificate for 127.0.0.1 that every watcher of the environment serves."""
    files = pki.write_serving(directory, "127.0.0.1", "local-webhook-ca")
    return {"cert_file": str(files.cert_file), "key_file": str(files.key_file), "ca_file": str(files.ca_file)}


def process_name(service: str, replica: int) -> str:
    return f"svc-{service.replace('_', '-')}-{replica}"


def start_service(env: LocalEnvironment, service: str, replica: int = 0) -> None:
    config = env.root / "mcs.yaml"
    metrics_port = free_port()
    environ = dict(os.environ, MCS_CONFIG=str(config), PYTHONUNBUFFERED="1", MCS_METRICS_PORT=str(metrics_port),
                   MCS_NATS_AUTH__PASSWORD_FILE=env.info().nats_password_files[service.replace("_", "-")])
    if service == "feedback" and replica > 0:
        # Each process keeps the virtual nodes of its own targets, which send kubectl logs and exec to it.
        environ["MCS_KUBELET__PORT"] = str(free_port())
    env.processes.start(process_name(service, replica), [sys.executable, "-m", f"services.{service}"],
                        env=environ, meta={"metrics_url": f"http://127.0.0.1:{metrics_port}"})


def start_services(env: LocalEnvironment, replicas: int = 1) -> None:
    if not (env.root / "mcs.yaml").exists():
        write_config(env)
    for service in SERVICES:
        for replica in range(replicas):
            start_service(env, service, replica)


def wait_services_ready(env: LocalEnvironment, timeout: float = 60.0) -> None:
    """Wait until every source has the webhook registered and its virtual nodes Ready."""
    config = json.loads((env.root / "mcs.yaml").read_text())
    sources = [c["name"] for c in config["clusters"] if c["source"]]
    targets = [c["name"] for c in config["clusters"] if c["target"]]
    deadline = time.monotonic() + timeout
    for source in sources:
        cluster = env.cluster(source)
        while True:
            try:
                cluster.kubectl("get", "mutatingwebhookconfiguration", "multicluster-scheduler")
                cluster.kubectl("wait", "--for=condition=Ready", "--timeout=2s",
                                *(f"node/admiralty-{t}" for t in targets))
                break
            except RuntimeError as exc:
                for record in env.processes.load():
                    if record.name.startswith("svc-") and not record.alive():
                        raise RuntimeError(f"{record.name} exited; see {record.log}") from exc
                if time.monotonic() > deadline:
                    raise TimeoutError(f"services not ready in {source} after {timeout:.0f}s: {exc}") from exc
                time.sleep(0.5)


def stop_services(env: LocalEnvironment) -> None:
    for record in env.processes.load():
        if record.name.startswith("svc-"):
            env.processes.stop(record.name)
