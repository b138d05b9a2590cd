"""`helm install` into a local-environment cluster: the real API server accepts every object
and the chart's pods reach Running on kwok nodes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from localenv import EnvironmentInfo, LocalEnvironment
from localenv.tools import bin_dir

pytestmark = pytest.mark.integration

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "multicluster-scheduler"
CLUSTER = "c2"  # not the pipeline's source, so its webhook never meets the chart's


def helm(info: EnvironmentInfo, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(bin_dir() / "helm"), "--kubeconfig", info.kubeconfig, "--kube-context", CLUSTER,
                           *args], capture_output=True, text=True, timeout=300)


def kubectl(info: EnvironmentInfo, *args: str) -> str:
    proc = subprocess.run([str(bin_dir() / "kubectl"), "--kubeconfig", info.kubeconfig, "--context", CLUSTER, *args],
                          capture_output=True, text=True, timeout=120, check=True)
    return proc.stdout


def test_helm_install_is_accepted_and_its_pods_run_on_kwok_nodes(
    local_env: LocalEnvironment, env_info: EnvironmentInfo
) -> None:
    release, namespace = "mcs", "mcs-system"
    kubeconfig_file = env_info.clusters["c1"]["admin_kubeconfig"]  # a remote target, as a Secret
    install = helm(env_info, "install", release, str(CHART), "--namespace", namespace, "--create-namespace",
                   "--set", f"clusterName={CLUSTER}", "--set", "nats.url=nats://nats.example:4222",
                   "--set", "proxyScheduler.replicas=2", "--set", "targets[0].name=c1",
                   "--set-file", f"targets[0].kubeconfig={kubeconfig_file}",
                   "--wait", "--timeout", "120s")
    try:
        assert install.returncode == 0, install.stderr
        manifest = helm(env_info, "get", "manifest", release, "--namespace", namespace).stdout
        kinds = {line.split(":", 1)[1].strip() for line in manifest.splitlines() if line.startswith("kind:")}
        assert {"Deployment", "ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration", "Secret",
                "ConfigMap", "Service", "ServiceAccount"} <= kinds
        pods = json.loads(kubectl(env_info, "get", "pods", "-n", namespace, "-o", "json"))["items"]
        assert len(pods) == 6  # watcher, 2 proxy-schedulers, candidate-scheduler, feedback, source-controller
        for pod in pods:
            assert pod["status"]["phase"] == "Running", pod["metadata"]["name"]
            assert pod["spec"]["nodeName"].startswith(f"{CLUSTER}-worker-")
        hook = json.loads(kubectl(env_info, "get", "mutatingwebhookconfigurations", "-o", "json"))["items"]
        assert any(h["webhooks"][0]["clientConfig"].get("caBundle") for h in hook
                   if h["metadata"]["name"].startswith(release))
    finally:
        helm(env_info, "uninstall", release, "--namespace", namespace, "--wait")
