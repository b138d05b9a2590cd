"""One local Kubernetes cluster: etcd, control plane and kwok nodes as processes.

A cluster named ``c1`` lives in ``<env>/clusters/c1`` (certificates, etcd data,
component configs) and runs five processes recorded in the environment's
process table: ``c1-etcd``, ``c1-kube-apiserver``, ``c1-kube-controller-manager``,
``c1-kube-scheduler`` and ``c1-kwok``. Its worker nodes (``c1-worker-0`` ...)
are Node objects managed by kwok, which keeps them Ready with lease heartbeats
and moves their pods to Running with IPs from each node's pod CIDR; the last
worker also has GPUs (see :func:`gpu_workers`).
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcsched import pki

from . import rbac
from .processes import ProcessTable
from .rbac import SERVICE_USER, SOURCE_CONTROLLER_USER
from .tools import bin_dir, ensure_kwok_stages

KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"

# A worker the size of a small cloud VM: 4 cores, 16 GiB, 110 pods.
NODE_CAPACITY = {"cpu": "4", "memory": "16Gi", "pods": "110"}
NODE_ALLOCATABLE = {"cpu": "3900m", "memory": "15Gi", "pods": "110"}

# What a GPU worker has on top: an extended resource and the label NVIDIA's GPU feature discovery sets.
GPU_RESOURCE = "nvidia.com/gpu"
GPUS_PER_GPU_NODE = "2"
GPU_PRESENT_LABEL = "nvidia.com/gpu.present"

# What every container of a kwok pod has logged (kwok runs no containers: see _write_kwok_debugging).
KWOK_LOG_LINES = ("starting", "listening on :80", "ready")
# The user the API server is to kubelets (its --kubelet-client-certificate), as kubeadm names it.
KUBELET_CLIENT_USER = "kube-apiserver-kubelet-client"


def gpu_workers(workers: Sequence[str], environ: Mapping[str, str] = os.environ) -> list[str]:
    """The workers of a cluster that get GPUs: the last one, unless ``MCS_GPU_NODES=0``.

    A GPU worker has ``nvidia.com/gpu: "2"`` in capacity and allocatable and the
    label ``nvidia.com/gpu.present: "true"``, so every cluster of the local
    environment can run a pod that needs a GPU, and only on one node.
    """
    if environ.get("MCS_GPU_NODES", "1").strip() == "0" or not workers:
        return []
    return [workers[-1]]


@dataclass
class ClusterPorts:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    kwok: int


@dataclass
class ClusterSpec:
    """What one cluster is: its name, index (for address ranges), ports and node count."""

    name: str
    index: int
    ports: ClusterPorts
    nodes: int

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports.apiserver}"

    @property
    def pod_cidr(self) -> str:
        return f"10.{16 + self.index}.0.0/16"

    @property
    def service_cidr(self) -> str:
        return f"10.{96 + self.index}.0.0/16"

    def node_names(self) -> list[str]:
        return [f"{self.name}-worker-{i}" for i in range(self.nodes)]


class LocalCluster:
    def __init__(self, spec: ClusterSpec, root: Path, processes: ProcessTable) -> None:
        self.spec = spec
        self.dir = root / "clusters" / spec.name
        self.processes = processes

    # -- files -------------------------------------------------------------------

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.dir / "admin.kubeconfig"

    def _write_pki(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        ca = pki.new_ca(f"{self.spec.name}-ca")
        ca.write(self.ca_file, self.dir / "ca.key")
        pki.issue(
            ca, "kube-apiserver", server=True,
            dns_names=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"),
            ip_addresses=("127.0.0.1",),
        ).write(self.dir / "apiserver.crt", self.dir / "apiserver.key")
        pki.issue(ca, f"{self.spec.name}-admin", organization="system:masters", client=True).write(
            self.dir / "admin.crt", self.dir / "admin.key"
        )
        # The API server's identity to kubelets (kwok's, and the virtual nodes' endpoint), as kubeadm's
        # apiserver-kubelet-client: bound to system:kubelet-api-admin (see grant_services_rbac).
        pki.issue(ca, KUBELET_CLIENT_USER, client=True).write(
            self.dir / "apiserver-kubelet-client.crt", self.dir / "apiserver-kubelet-client.key")
        pki.service_account_keys().write(self.dir / "sa.pub", self.dir / "sa.key")
        # Users and services authenticate with bearer tokens, as in-cluster service accounts do:
        # the API server verifies a client certificate's chain on every request, a token once.
        # The user is an admin; the services' user gets the chart's roles only (see rbac.py).
        user_token, services_token = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        controller_token = secrets.token_urlsafe(32)
        self.token_file.write_text(user_token)
        self.services_token_file.write_text(services_token)
        self.source_controller_token_file.write_text(controller_token)
        (self.dir / "tokens.csv").write_text(
            f"{user_token},{self.spec.name}-user,{self.spec.name}-user,system:masters\n"
            f"{services_token},{SERVICE_USER},{SERVICE_USER}\n"
            f"{controller_token},{SOURCE_CONTROLLER_USER},{SOURCE_CONTROLLER_USER}\n")

    @property
    def token_file(self) -> Path:
        return self.dir / "user.token"

    @property
    def services_token_file(self) -> Path:
        return self.dir / "services.token"

    @property
    def source_controller_token_file(self) -> Path:
        return self.dir / "source-controller.token"

    def kubeconfig_entry(self, identity: str = "user") -> dict[str, Any]:
        """This cluster as (cluster, user, context) entries of a kubeconfig.

        ``identity`` is ``user`` (an admin token, for people and tests), ``services``
        (the token of the services' user, bound to the chart's roles) or
        ``component`` (a client certificate, as kubeadm gives the cluster's own components).
        """
        name = self.spec.name
        user: dict[str, Any] = {"name": f"{name}-admin", "user": {
            "client-certificate": str(self.dir / "admin.crt"), "client-key": str(self.dir / "admin.key")}}
        if identity == "user":
            user = {"name": f"{name}-user", "user": {"token": self.token_file.read_text().strip()}}
        elif identity == "services":
            user = {"name": f"{name}-{SERVICE_USER}", "user": {"token": self.services_token_file.read_text().strip()}}
        elif identity == "source-controller":
            user = {"name": f"{name}-{SOURCE_CONTROLLER_USER}",
                    "user": {"token": self.source_controller_token_file.read_text().strip()}}
        return {
            "cluster": {"name": name, "cluster": {
                "server": self.spec.server,
                "certificate-authority": str(self.ca_file)}},
            "user": user,
            "context": {"name": name, "context": {"cluster": name, "user": user["name"]}},
        }

    def _write_component_configs(self) -> None:
        entry = self.kubeconfig_entry("component")
        kubeconfig = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [entry["cluster"]], "users": [entry["user"]],
            "contexts": [entry["context"]], "current-context": self.spec.name,
        }
        self.admin_kubeconfig.write_text(json.dumps(kubeconfig, indent=1))
        scheduler_config = {
            "apiVersion": "kubescheduler.config.k8s.io/v1",
            "kind": "KubeSchedulerConfiguration",
            "clientConnection": {"kubeconfig": str(self.admin_kubeconfig), "qps": 200, "burst": 400},
            "leaderElection": {"leaderElect": False},
        }
        (self.dir / "scheduler.yaml").write_text(json.dumps(scheduler_config, indent=1))

    # -- processes ---------------------------------------------------------------

    def start(self) -> None:
        """Start etcd and the control plane; returns once the API server is ready."""
        self._write_pki()
        self._write_component_configs()
        s, d, b = self.spec, self.dir, bin_dir()
        p = s.ports
        self.processes.start(f"{s.name}-etcd", [
            str(b / "etcd"), "--name", s.name, "--data-dir", str(d / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{p.etcd_client}",
            "--advertise-client-urls", f"http://127.0.0.1:{p.etcd_client}",
            "--listen-peer-urls", f"http://127.0.0.1:{p.etcd_peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{p.etcd_peer}",
            "--initial-cluster", f"{s.name}=http://127.0.0.1:{p.etcd_peer}",
            "--listen-metrics-urls", "",
            "--unsafe-no-fsync", "--quota-backend-bytes", str(2 * 1024**3),
            "--log-level", "warn",
        ])
        self.start_api_server()
        self.processes.start(f"{s.name}-kube-controller-manager", [
            str(b / "kube-controller-manager"),
            "--kubeconfig", str(self.admin_kubeconfig),
            "--leader-elect=false", "--secure-port", "0",
            "--service-account-private-key-file", str(d / "sa.key"),
            "--root-ca-file", str(self.ca_file),
            "--service-cluster-ip-range", s.service_cidr,
            "--kube-api-qps", "200", "--kube-api-burst", "400",
            "--concurrent-deployment-syncs", "10", "--concurrent-replicaset-syncs", "10",
            "--concurrent-gc-syncs", "40",
        ])
        self.processes.start(f"{s.name}-kube-scheduler", [
            str(b / "kube-scheduler"), "--config", str(d / "scheduler.yaml"), "--secure-port", "0",
        ])
        self.processes.start(f"{s.name}-kwok", [
            str(b / "kwok"), "--kubeconfig", str(self.admin_kubeconfig),
            "--config", str(ensure_kwok_stages()), "--config", str(self._write_kwok_debugging()),
            "--node-port", str(p.kwok),
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector", f"{KWOK_NODE_ANNOTATION}=fake",
            "--cidr", s.pod_cidr, "--node-ip", "127.0.0.1",
            "--node-lease-duration-seconds", "40",
            "--server-address", f"127.0.0.1:{p.kwok}", "-v", "WARN",
        ])

    def _write_kwok_debugging(self) -> Path:
        """What kwok answers for its pods' logs, exec and port-forward (it runs no containers).

        Every container's log is ``KWOK_LOG_LINES`` (CRI format, followed like a live log); exec runs
        the command on this machine in an empty directory; a forwarded port echoes what it gets (cat).
        """
        logs, workdir = self.dir / "kwok-container.log", self.dir / "kwok-exec"
        workdir.mkdir(parents=True, exist_ok=True)
        logs.write_text("".join(f"2026-01-01T00:00:0{i}.000000000Z stdout F {line}\n"
                                for i, line in enumerate(KWOK_LOG_LINES)))
        config = self.dir / "kwok-debugging.yaml"
        documents = [
            {"kind": "ClusterLogs", "spec": {"logs": [{"logsFile": str(logs), "follow": True}]}},
            {"kind": "ClusterExec", "spec": {"execs": [{"local": {"workDir": str(workdir)}}]}},
            {"kind": "ClusterPortForward", "spec": {"forwards": [{"command": ["cat"]}]}},
        ]
        config.write_text("\n---\n".join(json.dumps({"apiVersion": "kwok.x-k8s.io/v1alpha1",
                                                       "metadata": {"name": "local-environment"}, **d})
                                           for d in documents) + "\n")
        return config

    def _api_server_argv(self) -> list[str]:
        s, d, b = self.spec, self.dir, bin_dir()
        p = s.ports
        return [
            str(b / "kube-apiserver"),
            "--etcd-servers", f"http://127.0.0.1:{p.etcd_client}",
            "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
            "--secure-port", str(p.apiserver),
            "--tls-cert-file", str(d / "apiserver.crt"), "--tls-private-key-file", str(d / "apiserver.key"),
            "--client-ca-file", str(self.ca_file), "--token-auth-file", str(d / "tokens.csv"),
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file", str(d / "sa.pub"),
            "--service-account-signing-key-file", str(d / "sa.key"),
            "--service-cluster-ip-range", s.service_cidr,
            "--authorization-mode", "Node,RBAC",
            "--allow-privileged=true",
            "--endpoint-reconciler-type", "none",
            "--max-requests-inflight", "800", "--max-mutating-requests-inflight", "400",
            "--profiling=true", "--event-ttl", "2h",
            "--kubelet-client-certificate", str(d / "apiserver-kubelet-client.crt"),
            "--kubelet-client-key", str(d / "apiserver-kubelet-client.key"),
            "--kubelet-preferred-address-types", "InternalIP,Hostname",
        ]

    def start_api_server(self, wait: bool = True) -> None:
        """Start (or start again, after :meth:`stop_api_server`) the API server on its etcd."""
        self.processes.start(f"{self.spec.name}-kube-apiserver", self._api_server_argv())
        if wait:
            self.wait_ready()

    def wait_recovered(self, timeout: float = 150.0) -> None:
        """After the API server came back: wait until the controller-manager, the scheduler and kwok
        act again (their watches back off while it was gone): a probe namespace gets its default
        ServiceAccount and a pod there runs; kwok's nodes get their addresses back. Leaves the
        cluster as a test that stopped it found it."""
        probe = f"recovery-probe-{secrets.token_hex(3)}"
        deadline = time.monotonic() + timeout
        self.kubectl("create", "namespace", probe)
        try:
            while True:
                try:
                    self.kubectl("-n", probe, "get", "serviceaccount", "default")
                    break
                except RuntimeError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{self.spec.name}: no default ServiceAccount after {timeout:.0f}s: "
                                           "the controller-manager did not recover") from None
                    time.sleep(1)
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe", "namespace": probe},
                   "spec": {"containers": [{"name": "probe", "image": "probe"}]}}
            self.kubectl("apply", "-f", "-", input_text=json.dumps(pod))
            remaining = max(1, int(deadline - time.monotonic()))
            self.kubectl("-n", probe, "wait", "--for=jsonpath={.status.phase}=Running", f"--timeout={remaining}s",
                         "pod/probe")
        finally:
            self.kubectl("delete", "namespace", probe, "--wait=false")
        self._restore_node_addresses()

    def _restore_node_addresses(self) -> None:
        """kwok's nodes come back from an API server restart without their addresses (a kubelet posts
        its own again; kwok does not), and without them the API server cannot reach kwok for logs and
        exec: write them back as kwok first set them."""
        nodes = json.loads(self.kubectl("get", "nodes", "-o", "json"))["items"]
        for node in nodes:
            name = node["metadata"]["name"]
            if (node["metadata"].get("annotations") or {}).get(KWOK_NODE_ANNOTATION) == "fake" and \
                    not node.get("status", {}).get("addresses"):
                self.kubectl("patch", "node", name, "--subresource=status", "--type=merge", "-p", json.dumps(
                    {"status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                                              {"type": "Hostname", "address": name}]}}))

    def stop_api_server(self) -> None:
        """Stop the API server only: to clients the cluster is lost, its etcd and the rest keep running."""
        self.processes.stop(f"{self.spec.name}-kube-apiserver")

    def stop(self) -> None:
        for component in ("kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            self.processes.stop(f"{self.spec.name}-{component}")

    # -- health and nodes --------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.load_cert_chain(str(self.dir / "admin.crt"), str(self.dir / "admin.key"))
        return ctx

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.spec.server}/readyz", context=self._ssl_context(),
                                        timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        apiserver = self.processes.get(f"{self.spec.name}-kube-apiserver")
        while time.monotonic() < deadline:
            if self.healthy():
                return
            if apiserver is not None and not apiserver.alive():
                raise RuntimeError(f"{self.spec.name}: kube-apiserver exited; see {apiserver.log}")
            time.sleep(0.3)
        raise TimeoutError(f"{self.spec.name}: API server not ready after {timeout:.0f}s")

    def grant_services_rbac(self, source: bool, accepted_sources: list[str]) -> None:
        """Bind the chart's roles to the services' user (they have nothing else here).

        The first cluster (the source, a target of itself) binds the target role to it as the
        chart does for "target self"; every other cluster accepts it through a ClusterSource
        per source name, which the source-controller turns into bindings (rbac.py).
        """
        for crds in rbac.CRDS:
            self.kubectl("apply", "--server-side", "-f", str(crds))
        self.kubectl("wait", "--for=condition=Established", "--timeout=30s",
                     "crd/sources.multicluster.admiralty.io", "crd/clustersources.multicluster.admiralty.io",
                     "crd/targets.multicluster.admiralty.io", "crd/clustertargets.multicluster.admiralty.io")
        self.kubectl("apply", "--server-side", "-f", "-",
                     input_text=rbac.manifest(self.spec.name, source, [] if source else accepted_sources))
        self.kubectl("create", "clusterrolebinding", "kube-apiserver-kubelet-client",
                     "--clusterrole=system:kubelet-api-admin", f"--user={KUBELET_CLIENT_USER}")

    def kubectl(self, *args: str, input_text: str | None = None) -> str:
        proc = subprocess.run(
            [str(bin_dir() / "kubectl"), "--kubeconfig", str(self.admin_kubeconfig), *args],
            input=input_text, capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{self.spec.name}: kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def node_manifest(self, name: str, capacity: dict[str, str] | None = None, *,
                      gpu: bool = False) -> dict[str, Any]:
        """A kwok worker (default size: NODE_CAPACITY); ``gpu``: with GPUs, as :func:`gpu_workers` says."""
        index = int(name.rsplit("-", 1)[1]) if name.rsplit("-", 1)[-1].isdigit() else 250
        pod_cidr = f"10.{16 + self.spec.index}.{index}.0/24"  # kwok hands out pod IPs from it
        node_capacity = dict(capacity or NODE_CAPACITY)
        allocatable = dict(capacity or NODE_ALLOCATABLE)
        labels = {
            "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64", "type": "kwok",
            "node.kubernetes.io/instance-type": "kwok-4c16g",
            "topology.kubernetes.io/region": self.spec.name,
        }
        if gpu:
            node_capacity[GPU_RESOURCE] = allocatable[GPU_RESOURCE] = GPUS_PER_GPU_NODE
            labels[GPU_PRESENT_LABEL] = "true"
        return {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {KWOK_NODE_ANNOTATION: "fake"},
                "labels": labels,
            },
            "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
            "status": {"capacity": node_capacity, "allocatable": allocatable},
        }

    def add_nodes(self, names: list[str], capacity: dict[str, str] | None = None,
                  gpu_nodes: Collection[str] = ()) -> None:
        """Add kwok worker nodes (default size: NODE_CAPACITY), those in ``gpu_nodes`` with GPUs."""
        manifests = {"apiVersion": "v1", "kind": "List",
                     "items": [self.node_manifest(n, capacity, gpu=n in gpu_nodes) for n in names]}
        self.kubectl("apply", "-f", "-", input_text=json.dumps(manifests))

    def wait_nodes_ready(self, names: list[str], timeout: float = 90.0) -> None:
        self.kubectl("wait", "--for=condition=Ready", f"--timeout={int(timeout)}s",
                     *(f"node/{n}" for n in names))
