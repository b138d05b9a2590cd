"""The local environment as a whole: clusters, NATS JetStream and Jaeger.

``LocalEnvironment(root).up(...)`` starts everything under ``root`` (default
``.local`` in the repository), writes ``root/kubeconfig`` (one context per
cluster) and ``root/env.json`` (endpoints for scripts and tests), and waits
until every API server is healthy and every node Ready. ``down()`` stops every
process it recorded; ``status()`` reports what runs.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mcsched.cli import nats_config
from mcsched.settings import Settings

from .cluster import ClusterPorts, ClusterSpec, LocalCluster, gpu_workers
from .processes import ProcessTable
from .rbac import FULLNAME
from .tools import bin_dir, nats_server_binary

SUBJECT_PREFIX = "mcs"  # the services' subject prefix in the local environment

_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback TCP port nothing listens on right now.

    Ports come from below the kernel's ephemeral range (32768+), so outgoing
    connections made meanwhile cannot take them before the server binds.
    """
    while True:
        port = random.randint(20000, 32000)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


@dataclass
class EnvironmentInfo:
    """What ``env.json`` holds: everything a script needs to use the environment."""

    root: str
    kubeconfig: str
    bin_dir: str
    clusters: dict[str, dict[str, Any]]
    nats_url: str
    nats_monitor_url: str
    jaeger_query_url: str
    otlp_grpc_endpoint: str
    otlp_http_endpoint: str
    services_kubeconfig: str = ""  # the services' identity: the chart's roles only
    nats_admin_url: str = ""  # NATS as an administrator (tests, tools): the URL with the admin's credentials
    nats_password_files: dict[str, str] = field(default_factory=dict)  # NATS user -> file holding its password
    nats_monitor_urls: list[str] = field(default_factory=list)  # every NATS server's, the first's first
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, root: Path) -> EnvironmentInfo:
        return cls(**json.loads((root / "env.json").read_text()))

    def cluster_names(self) -> list[str]:
        return list(self.clusters)


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return bool(200 <= resp.status < 300)
    except (urllib.error.URLError, OSError):
        return False


def _wait_http(url: str, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _http_ok(url):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} not healthy at {url} after {timeout:.0f}s")


def jaeger_config(otlp_grpc: int, otlp_http: int, query_http: int, query_grpc: int, health: int) -> str:
    """Jaeger v2 all-in-one with in-memory storage, every listener on loopback."""
    config = {
        "service": {
            "extensions": ["jaeger_storage", "jaeger_query", "healthcheckv2"],
            "pipelines": {"traces": {
                "receivers": ["otlp"], "processors": ["batch"], "exporters": ["jaeger_storage_exporter"]}},
            "telemetry": {"metrics": {"level": "none"}, "logs": {"level": "warn"}},
        },
        "extensions": {
            "healthcheckv2": {"use_v2": True, "http": {"endpoint": f"127.0.0.1:{health}"}},
            "jaeger_query": {
                "storage": {"traces": "memstore"},
                "http": {"endpoint": f"127.0.0.1:{query_http}"},
                "grpc": {"endpoint": f"127.0.0.1:{query_grpc}"},
            },
            "jaeger_storage": {"backends": {"memstore": {"memory": {"max_traces": 100000}}}},
        },
        "receivers": {"otlp": {"protocols": {
            "grpc": {"endpoint": f"127.0.0.1:{otlp_grpc}"},
            "http": {"endpoint": f"127.0.0.1:{otlp_http}"}}}},
        "processors": {"batch": {}},
        "exporters": {"jaeger_storage_exporter": {"trace_storage": "memstore"}},
    }
    return json.dumps(config, indent=1)  # JSON is YAML


def nats_store(root: Path, index: int) -> Path:
    """Where the ``index``-th NATS server of the environment under ``root`` keeps its JetStream data."""
    return root / "nats" / f"jetstream-{index}"


def nats_process_name(index: int) -> str:
    """The process of the ``index``-th NATS server: ``nats`` for the first (the only one by default)."""
    return "nats" if index == 0 else f"nats-{index}"


def single_kubeconfig(entry: dict[str, Any]) -> dict[str, Any]:
    """A kubeconfig of one cluster entry (:meth:`LocalCluster.kubeconfig_entry`), its context current."""
    return {"apiVersion": "v1", "kind": "Config", "clusters": [entry["cluster"]], "users": [entry["user"]],
            "contexts": [entry["context"]], "current-context": entry["context"]["name"]}


def inline_kubeconfig(kubeconfig: dict[str, Any]) -> dict[str, Any]:
    """``kubeconfig`` with the files it names (CA, client certificate and key) inlined as their ``-data``
    fields, as a kubeconfig in a Target's Secret must be (mcsched.targets.kubeconfig_problem)."""
    def inlined(entry: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
        entry = dict(entry)
        for name in fields:
            if name in entry:
                entry[f"{name}-data"] = base64.b64encode(Path(entry.pop(name)).read_bytes()).decode()
        return entry

    return {**kubeconfig,
            "clusters": [{**c, "cluster": inlined(c["cluster"], ("certificate-authority",))}
                         for c in kubeconfig["clusters"]],
            "users": [{**u, "user": inlined(u["user"], ("client-certificate", "client-key"))}
                      for u in kubeconfig["users"]]}


class LocalEnvironment:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.processes = ProcessTable(self.root)

    @property
    def info_path(self) -> Path:
        return self.root / "env.json"

    def info(self) -> EnvironmentInfo:
        return EnvironmentInfo.load(self.root)

    def running(self) -> bool:
        return self.info_path.exists() and any(r.alive() for r in self.processes.load())

    # -- up ----------------------------------------------------------------------

    def up(self, clusters: list[str], nodes: int = 3, log: Any = print, nats_nodes: int = 1) -> EnvironmentInfo:
        """Start the environment; a previous one under the same root is stopped first.

        ``nats_nodes`` > 1 runs NATS as a cluster of that many servers (the services then keep every
        stream on ``min(3, nats_nodes)`` of them)."""
        if self.processes.load():
            log("stopping the previous environment in this directory")
            self.down()
        for stale in ("env.json", "kubeconfig", "services.kubeconfig", "source-controller.kubeconfig", "mcs.yaml"):
            (self.root / stale).unlink(missing_ok=True)
        for stale_dir in ("clusters", "nats", "logs"):  # every `up` starts from empty clusters
            shutil.rmtree(self.root / stale_dir, ignore_errors=True)
        missing = [b for b in ("etcd", "kube-apiserver", "kubectl", "kwok", "jaeger")
                   if not (bin_dir() / b).exists()]
        if missing:
            raise FileNotFoundError(f"tools missing in {bin_dir()}: {', '.join(missing)}; run `make tools`")
        started = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        specs = [
            ClusterSpec(name, index, ClusterPorts(free_port(), free_port(), free_port(), free_port()), nodes)
            for index, name in enumerate(clusters)
        ]
        local = [LocalCluster(spec, self.root, self.processes) for spec in specs]
        try:
            nats = self.start_nats(log, clusters, nats_nodes)
            jaeger = self._start_jaeger(log)
            for cluster in local:
                log(f"starting cluster {cluster.spec.name} (etcd, kube-apiserver on {cluster.spec.server}, "
                    "controller-manager, scheduler, kwok)")
                cluster.start()
            for cluster in local:
                cluster.grant_services_rbac(source=cluster is local[0], accepted_sources=clusters[:1])
                workers = cluster.spec.node_names()
                cluster.add_nodes(workers, gpu_nodes=gpu_workers(workers))
            self._write_kubeconfig(local)
            self._start_source_controller(clusters)
            for cluster in local:
                cluster.wait_nodes_ready(cluster.spec.node_names())
                log(f"  {cluster.spec.name}: {nodes} kwok nodes Ready")
            for monitor in nats["monitors"]:
                _wait_http(monitor + "/healthz?js-enabled-only=true", "NATS JetStream")
            _wait_http(jaeger["health"] + "/status", "Jaeger")
        except BaseException:
            log(f"start failed; logs are in {self.processes.logs}; stopping what started")
            self.down()
            raise
        info = EnvironmentInfo(
            root=str(self.root),
            kubeconfig=str(self.root / "kubeconfig"),
            services_kubeconfig=str(self.root / "services.kubeconfig"),
            bin_dir=str(bin_dir()),
            clusters={c.spec.name: {
                "server": c.spec.server, "context": c.spec.name,
                "admin_kubeconfig": str(c.admin_kubeconfig), "ca_file": str(c.ca_file),
                "nodes": c.spec.node_names(), "gpu_nodes": gpu_workers(c.spec.node_names()),
                "pod_cidr": c.spec.pod_cidr, "ports": asdict(c.spec.ports),
            } for c in local},
            nats_url=nats["url"], nats_monitor_url=nats["monitor"], nats_admin_url=nats["admin_url"],
            nats_password_files=nats["password_files"], nats_monitor_urls=nats["monitors"],
            jaeger_query_url=jaeger["query"],
            otlp_grpc_endpoint=jaeger["otlp_grpc"], otlp_http_endpoint=jaeger["otlp_http"],
        )
        self._write_kubeconfig(local)
        tmp = self.info_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(info), indent=1))
        os.replace(tmp, self.info_path)
        log(f"environment up in {time.monotonic() - started:.1f}s")
        return info

    def start_nats(self, log: Any, clusters: list[str], nodes: int = 1) -> dict[str, Any]:
        """nats-server with JetStream and one user per stage (every cluster a source and a target), an
        administrator, and a candidate-scheduler user per target (``candidate-scheduler-<target>``).

        With ``nodes`` > 1, a NATS cluster of that many servers (``nats``, ``nats-1``...; routes between
        all of them), whose client URLs are all given as seeds."""
        ports = [(free_port(), free_port(), free_port()) for _ in range(nodes)]  # client, monitor, route
        store = self.root / "nats"
        credentials = store / "credentials"
        credentials.mkdir(parents=True, mode=0o700)
        every_role = Settings(subject_prefix=SUBJECT_PREFIX,
                              clusters=[{"name": c, "source": True, "target": True} for c in clusters])
        config = nats_config(every_role, credentials, per_target_candidates=True)
        files = {path.name: str(path) for path in sorted(credentials.iterdir()) if path != config}
        routes = ",".join(f"nats://127.0.0.1:{route}" for _, _, route in ports)
        log(f"starting NATS JetStream on {', '.join(f'127.0.0.1:{p}' for p, _, _ in ports)} (a user per stage"
            f"{f'; a cluster of {nodes} servers' if nodes > 1 else ''})")
        for index, (port, monitor, route) in enumerate(ports):
            argv = [str(nats_server_binary()), "-c", str(config), "-a", "127.0.0.1", "-p", str(port),
                    "-m", str(monitor), "-js", "-sd", str(nats_store(self.root, index)),
                    "--server_name", f"local-env-{index}"]
            if nodes > 1:
                argv += ["--cluster_name", "local-env", "--cluster", f"nats://127.0.0.1:{route}", "--routes", routes]
            self.processes.start(nats_process_name(index), argv)
        admin = Path(files["admin"]).read_text()
        first, monitor, _ = ports[0]
        return {"url": ",".join(f"nats://127.0.0.1:{p}" for p, _, _ in ports),
                "monitor": f"http://127.0.0.1:{monitor}",
                "monitors": [f"http://127.0.0.1:{m}" for _, m, _ in ports],
                "admin_url": f"nats://admin:{admin}@127.0.0.1:{first}", "password_files": files}

    def restart_nats(self) -> None:
        """Stop and start nats-server on the same port and storage (for recovery tests)."""
        record = self.processes.get("nats")
        if record is None:
            raise RuntimeError("NATS is not part of this environment")
        self.processes.stop("nats")
        self.processes.start("nats", record.argv)
        _wait_http(self.info().nats_monitor_url + "/healthz?js-enabled-only=true", "NATS JetStream")

    def _start_jaeger(self, log: Any) -> dict[str, str]:
        ports = {k: free_port() for k in ("otlp_grpc", "otlp_http", "query", "query_grpc", "health")}
        config = self.root / "jaeger.yaml"
        config.write_text(jaeger_config(ports["otlp_grpc"], ports["otlp_http"], ports["query"],
                                        ports["query_grpc"], ports["health"]))
        log(f"starting Jaeger (OTLP 127.0.0.1:{ports['otlp_grpc']}, query http://127.0.0.1:{ports['query']})")
        self.processes.start("jaeger", [str(bin_dir() / "jaeger"), "--config", str(config)])
        return {
            "otlp_grpc": f"127.0.0.1:{ports['otlp_grpc']}",
            "otlp_http": f"http://127.0.0.1:{ports['otlp_http']}",
            "query": f"http://127.0.0.1:{ports['query']}",
            "health": f"http://127.0.0.1:{ports['health']}",
        }

    def _start_source_controller(self, clusters: list[str]) -> None:
        """One source-controller for every cluster, as its own user (rbac.py): it turns each
        cluster's Sources and ClusterSources into bindings."""
        self.processes.start("source-controller", [
            sys.executable, "-m", "services.source_controller", "--kubeconfig",
            str(self.root / "source-controller.kubeconfig"), "--role-prefix", FULLNAME,
            *(arg for c in clusters for arg in ("--context", c))], env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def _write_kubeconfig(self, clusters: list[LocalCluster]) -> None:
        for file, identity in (("kubeconfig", "user"), ("services.kubeconfig", "services"),
                               ("source-controller.kubeconfig", "source-controller")):
            entries = [c.kubeconfig_entry(identity) for c in clusters]
            kubeconfig = {
                "apiVersion": "v1", "kind": "Config",
                "clusters": [e["cluster"] for e in entries],
                "users": [e["user"] for e in entries],
                "contexts": [e["context"] for e in entries],
                "current-context": clusters[0].spec.name,
            }
            (self.root / file).write_text(json.dumps(kubeconfig, indent=1))

    # -- a cluster the services do not know (added at runtime as a Target) --------------------------

    def start_extra_cluster(self, name: str, nodes: int = 2) -> LocalCluster:
        """Start a cluster beside the environment's, accepting its first cluster as a source (a
        ClusterSource and a source-controller of its own), unknown to the services' settings: a test
        adds it as a ClusterTarget at runtime. Stopped with :meth:`stop_extra_cluster` or ``down``."""
        info = self.info()
        spec = ClusterSpec(name, len(info.clusters), ClusterPorts(free_port(), free_port(), free_port(), free_port()),
                           nodes)
        cluster = LocalCluster(spec, self.root, self.processes)
        cluster.start()
        cluster.grant_services_rbac(source=False, accepted_sources=info.cluster_names()[:1])
        cluster.add_nodes(spec.node_names())
        entry = cluster.kubeconfig_entry("source-controller")
        controller_kubeconfig = self.root / f"source-controller-{name}.kubeconfig"
        controller_kubeconfig.write_text(json.dumps(single_kubeconfig(entry)))
        self.processes.start(f"source-controller-{name}", [
            sys.executable, "-m", "services.source_controller", "--kubeconfig", str(controller_kubeconfig),
            "--role-prefix", FULLNAME, "--context", name], env=dict(os.environ, PYTHONUNBUFFERED="1"))
        cluster.wait_nodes_ready(spec.node_names())
        return cluster

    def stop_extra_cluster(self, cluster: LocalCluster) -> None:
        self.processes.stop(f"source-controller-{cluster.spec.name}")
        cluster.stop()

    # -- down and status ---------------------------------------------------------

    def cluster(self, name: str) -> LocalCluster:
        """A running cluster of this environment, to add nodes or call kubectl."""
        info = self.info().clusters[name]
        spec = ClusterSpec(name, list(self.info().clusters).index(name), ClusterPorts(**info["ports"]),
                           len(info["nodes"]))
        return LocalCluster(spec, self.root, self.processes)

    def down(self) -> None:
        if (self.root / "compose" / "podman.sock").exists():  # the compose stack first (make compose-up)
            from .compose import down as compose_down

            compose_down(self)
        self.processes.stop_all()
        self.info_path.unlink(missing_ok=True)

    def status(self) -> list[dict[str, Any]]:
        return [
            {"name": r.name, "pid": r.pid, "running": r.alive(), "rss_mib": round(r.rss_bytes() / 2**20, 1),
             "log": r.log}
            for r in self.processes.load()
        ]

    def total_rss_bytes(self) -> int:
        return sum(r.rss_bytes() for r in self.processes.load())
