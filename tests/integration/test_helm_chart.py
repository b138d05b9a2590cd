"""The Helm chart (deploy/helm/multicluster-scheduler), checked with `helm lint` and `helm template` only.

Nothing is installed and no cluster is contacted: helm runs with a kubeconfig that does not exist
and its own cache/config directories. The rendered manifests are parsed and checked against what
the services need (docs/configuration.md) and against the least-privilege RBAC the chart promises.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from localenv.tools import bin_dir, nats_server_binary
from mcsched.natsauth import granted_targets, stage_permissions
from mcsched.settings import Settings

pytestmark = pytest.mark.integration

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "multicluster-scheduler"
RELEASE = "r1"
NAMESPACE = "mcs"
FULLNAME = f"{RELEASE}-multicluster-scheduler"
BASE = ["--set", "clusterName=c1", "--set", "nats.url=nats://nats.nats.svc:4222"]
STAGES = {  # component -> (values key, python module)
    "watcher": ("watcher", "services.watcher"),
    "proxy-scheduler": ("proxyScheduler", "services.proxy_scheduler"),
    "candidate-scheduler": ("candidateScheduler", "services.candidate_scheduler"),
    "feedback": ("feedback", "services.feedback"),
}
INLINE_KUBECONFIG = """apiVersion: v1
kind: Config
clusters:
- name: c2
  cluster: {server: "https://c2.example:6443"}
users:
- name: mcs
  user: {token: abc}
contexts:
- name: c2
  context: {cluster: c2, user: mcs}
current-context: c2
"""

Docs = list[dict[str, Any]]


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., subprocess.CompletedProcess[str]]:
    binary = bin_dir() / "helm"
    assert binary.is_file(), f"{binary} is missing: build the tools with `make tools`"
    home = tmp_path_factory.mktemp("helm")
    env = {
        **os.environ,
        "KUBECONFIG": str(home / "no-such-kubeconfig"),  # never reach a cluster
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(binary), *args], capture_output=True, text=True, env=env, timeout=60, check=False)

    return run


@pytest.fixture(scope="module")
def render(helm: Callable[..., subprocess.CompletedProcess[str]]) -> Callable[..., Docs]:
    def run(*args: str) -> Docs:
        result = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    return run


def find(docs: Docs, kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: Docs, kind: str, name: str) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {[d['metadata']['name'] for d in find(docs, kind)]}"
    return found[0]


def config_of(docs: Docs) -> dict[str, Any]:
    configmap = one(docs, "ConfigMap", f"{FULLNAME}-config")
    config: dict[str, Any] = yaml.safe_load(configmap["data"]["config.yaml"])
    return config


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


# -- helm lint ---------------------------------------------------------------------------------


def test_lint_passes_with_a_cluster_name_and_a_nats_url(
        helm: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    result = helm("lint", "--strict", str(CHART), *BASE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def test_lint_fails_without_cluster_name(helm: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    result = helm("lint", str(CHART), "--set", "nats.url=nats://nats:4222")
    assert result.returncode != 0
    assert "missing property 'clusterName'" in result.stdout + result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "clusterName=C1"], "'/clusterName': 'C1' does not match pattern"),
    (["--set", "clusterName="], "/clusterName"),
    (["--set", "watcher.replicas=-1"], "'/watcher/replicas': minimum"),
    (["--set", "feedback.replicas=1.5"], "/feedback/replicas"),
    (["--set", "targets[0].name=c2"], "'/targets/0': 'oneOf' failed"),
    (["--set", "targets[0].name=c2,targets[0].kubeconfig=x,targets[0].kubeconfigSecret=y"], "'/targets/0': 'oneOf'"),
    (["--set", "targets[0].kubeconfigSecret=y"], "missing property 'name'"),
    (["--set", "webhook.failurePolicy=Sometimes"], "/webhook/failurePolicy"),
    (["--set", "targetself=false"], "additional properties 'targetself' not allowed"),
])
def test_schema_rejects_invalid_values(helm: Callable[..., subprocess.CompletedProcess[str]],
                                       args: list[str], message: str) -> None:
    result = helm("template", RELEASE, str(CHART), *BASE, *args)
    assert result.returncode != 0, f"{args} rendered"
    assert "don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    ([], "needs NATS with JetStream: set nats.url"),
    (["--set", "targetSelf=false"], "no target cluster"),
    (["--set", "targets[0].name=c1,targets[0].kubeconfigSecret=s"], 'cluster name "c1" is used twice'),
    (["--set", "candidateScheduler.serveTargets={c9}"], 'serveTargets names "c9", which is not a target'),
    (["--set", "nats.auth.tlsClientCert=true"], "nats.auth.tlsClientCert needs nats.auth.tlsSecret"),
])
def test_render_fails_with_a_clear_message(helm: Callable[..., subprocess.CompletedProcess[str]],
                                           args: list[str], message: str) -> None:
    result = helm("template", RELEASE, str(CHART), "--set", "clusterName=c1",
                  *([] if not args else ["--set", "nats.url=nats://nats:4222"]), *args)
    assert result.returncode != 0
    assert message in result.stderr


def test_the_bundled_single_nats_server_cannot_hold_streams_of_three_replicas(
        helm: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    result = helm("template", RELEASE, str(CHART), "--set", "clusterName=c1", "--set", "nats.bundled.enabled=true",
                  "--set", "nats.streamReplicas=3")
    assert result.returncode != 0
    assert "nats.streamReplicas > 1 needs a NATS cluster" in result.stderr


# -- workloads ---------------------------------------------------------------------------------


def test_four_deployments_with_per_stage_replicas_and_resources(render: Callable[..., Docs]) -> None:
    replicas = {"watcher": 2, "proxy-scheduler": 3, "candidate-scheduler": 4, "feedback": 0}
    args = [arg for component, count in replicas.items()
            for arg in ("--set", f"{STAGES[component][0]}.replicas={count}")]
    docs = render(*BASE, *args, "--set", "feedback.resources.limits.memory=3Gi",
                  "--set", "proxyScheduler.nodeSelector.pool=system",
                  "--set-json", 'candidateScheduler.extraEnv=[{"name": "MCS_LOG_LEVEL", "value": "DEBUG"}]')
    deployments = [d for d in find(docs, "Deployment") if d["metadata"]["name"] != f"{FULLNAME}-source-controller"]
    assert sorted(d["metadata"]["name"] for d in deployments) == sorted(f"{FULLNAME}-{c}" for c in STAGES)
    for component, (_, module) in STAGES.items():
        deployment = one(docs, "Deployment", f"{FULLNAME}-{component}")
        assert deployment["spec"]["replicas"] == replicas[component]
        pod = deployment["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == FULLNAME
        c = container(deployment)
        assert c["image"] == "multicluster-scheduler:0.1.0"
        assert c["imagePullPolicy"] == "IfNotPresent"
        assert c["command"] == ["python", "-m", module]
        assert {"name": "MCS_CONFIG", "value": "/etc/mcs/config.yaml"} in c["env"]
        assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in c["ports"]
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/mcs/config.yaml")
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["configMap"]["name"] == f"{FULLNAME}-config" and mount["subPath"] == "config.yaml"
        # the watcher alone serves the webhook and mounts its certificate
        has_tls = any(m["mountPath"] == "/etc/mcs/tls" for m in c["volumeMounts"])
        assert has_tls == (component == "watcher")
    feedback = container(one(docs, "Deployment", f"{FULLNAME}-feedback"))
    assert feedback["resources"]["limits"]["memory"] == "3Gi"
    proxy = one(docs, "Deployment", f"{FULLNAME}-proxy-scheduler")["spec"]["template"]["spec"]
    assert proxy["nodeSelector"] == {"pool": "system"}
    candidate = container(one(docs, "Deployment", f"{FULLNAME}-candidate-scheduler"))
    assert {"name": "MCS_LOG_LEVEL", "value": "DEBUG"} in candidate["env"]
    watcher = container(one(docs, "Deployment", f"{FULLNAME}-watcher"))
    assert {"name": "webhook", "containerPort": 8443, "protocol": "TCP"} in watcher["ports"]


# -- webhook -----------------------------------------------------------------------------------


def test_webhook_configuration_trusts_the_generated_certificate(render: Callable[..., Docs]) -> None:
    docs = render(*BASE)
    service_name = f"{FULLNAME}-watcher"
    mwc = one(docs, "MutatingWebhookConfiguration", FULLNAME)
    [webhook] = mwc["webhooks"]
    assert webhook["name"] == "proxy-pods.multicluster.admiralty.io"
    assert webhook["namespaceSelector"] == {"matchLabels": {"multicluster-scheduler": "enabled"}}
    assert webhook["matchConditions"] == [{
        "name": "elected",
        "expression": "has(object.metadata.annotations) && 'multicluster.admiralty.io/elect' in "
                      "object.metadata.annotations",
    }]
    assert webhook["rules"] == [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                                 "resources": ["pods"], "scope": "Namespaced"}]
    assert webhook["sideEffects"] == "None"
    assert webhook["admissionReviewVersions"] == ["v1"]
    assert webhook["failurePolicy"] == "Fail"
    assert webhook["timeoutSeconds"] == 5
    assert webhook["clientConfig"]["service"] == {"name": service_name, "namespace": NAMESPACE,
                                                  "path": "/mutate-pods", "port": 443}
    ca_bundle = webhook["clientConfig"]["caBundle"]
    assert ca_bundle

    service = one(docs, "Service", service_name)
    assert service["spec"]["ports"] == [{"name": "webhook", "port": 443, "targetPort": "webhook", "protocol": "TCP"}]
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "watcher"

    secret = one(docs, "Secret", f"{FULLNAME}-webhook-tls")
    assert secret["data"]["ca.crt"] == ca_bundle
    ca = x509.load_pem_x509_certificate(base64.b64decode(ca_bundle))
    leaf = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    leaf.verify_directly_issued_by(ca)  # raises unless the CA in the caBundle signed the serving cert
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)
    assert {f"{service_name}.{NAMESPACE}.svc", f"{service_name}.{NAMESPACE}.svc.cluster.local"} <= set(names)
    assert base64.b64decode(secret["data"]["tls.key"]).startswith(b"-----BEGIN")

    watcher = one(docs, "Deployment", f"{FULLNAME}-watcher")["spec"]["template"]["spec"]
    tls_volume = next(v for v in watcher["volumes"]
                      if v.get("secret", {}).get("secretName") == secret["metadata"]["name"])
    mount = next(m for m in container({"spec": {"template": {"spec": watcher}}})["volumeMounts"]
                 if m["name"] == tls_volume["name"])
    assert mount["mountPath"] == "/etc/mcs/tls"

    ignore = one(render(*BASE, "--set", "webhook.failurePolicy=Ignore"), "MutatingWebhookConfiguration", FULLNAME)
    assert ignore["webhooks"][0]["failurePolicy"] == "Ignore"


# -- configuration -----------------------------------------------------------------------------


def test_config_lists_the_clusters_with_their_roles_and_kubeconfigs(
        render: Callable[..., Docs], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "c2.kubeconfig"
    kubeconfig.write_text(INLINE_KUBECONFIG)
    docs = render(*BASE,
                  "--set", "targets[0].name=c2", "--set-file", f"targets[0].kubeconfig={kubeconfig}",
                  "--set", "targets[1].name=c3,targets[1].kubeconfigSecret=c3-kubeconfig,targets[1].context=admin@c3",
                  "--set", "targets[0].labels.tier=gold", "--set", "clusterLabels.zone=home")
    config = config_of(docs)
    assert config["clusters"] == [
        {"name": "c1", "source": True, "target": True, "labels": {"zone": "home"}},
        {"name": "c2", "kubeconfig": "/etc/mcs/targets/c2/config", "source": False, "target": True,
         "labels": {"tier": "gold"}},
        {"name": "c3", "kubeconfig": "/etc/mcs/targets/c3/config", "context": "admin@c3",
         "source": False, "target": True},
    ]
    assert config["nats_url"] == "nats://nats.nats.svc:4222"
    assert config["metrics_port"] == 9090
    assert config["webhook"] == {
        "enabled": True, "listen_host": "0.0.0.0", "port": 8443,
        "url": f"https://{FULLNAME}-watcher.{NAMESPACE}.svc:443",
        "cert_file": "/etc/mcs/tls/tls.crt", "key_file": "/etc/mcs/tls/tls.key", "ca_file": "/etc/mcs/tls/ca.crt",
        "register_webhook": False, "failure_policy": "Fail", "timeout_seconds": 5,
    }
    # the services accept it as is (Settings forbids unknown keys)
    for name in list(os.environ):
        if name.startswith("MCS_"):
            monkeypatch.delenv(name)
    settings = Settings(**config)
    assert settings.source_names == ["c1"] and settings.target_names == ["c1", "c2", "c3"]

    # the inline kubeconfig becomes the chart's Secret; the named one is used as is
    secret = one(docs, "Secret", f"{RELEASE}-target-c2")
    assert base64.b64decode(secret["data"]["config"]).decode() == INLINE_KUBECONFIG
    assert not find(docs, "Secret", "c3-kubeconfig")
    for component in STAGES:
        pod = one(docs, "Deployment", f"{FULLNAME}-{component}")["spec"]["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in container({"spec": {"template": {"spec": pod}}})["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        for target, secret_name in (("c2", f"{RELEASE}-target-c2"), ("c3", "c3-kubeconfig")):
            volume = volumes[mounts[f"/etc/mcs/targets/{target}"]]
            assert volume["secret"]["secretName"] == secret_name
            assert volume["secret"]["items"] == [{"key": "config", "path": "config"}]


def test_config_options(render: Callable[..., Docs]) -> None:
    default = config_of(render(*BASE))
    assert "otlp_endpoint" not in default
    assert "serve_targets" not in default
    assert (default["subject_prefix"], default["resync_period_seconds"], default["log_level"]) == ("mcs", 30, "INFO")

    config = config_of(render(
        *BASE, "--set", "otlpEndpoint=jaeger-collector.observability.svc:4317", "--set", "subjectPrefix=prod",
        "--set-json", "resyncPeriodSeconds=12.5", "--set", "logLevel=DEBUG", "--set", "targetSelf=false",
        "--set", "targets[0].name=c2,targets[0].kubeconfigSecret=kc", "--set", "candidateScheduler.serveTargets={c2}",
        "--set", "extraConfig.candidate_timeout_seconds=3", "--set", "extraConfig.nats_url=nats://ignored:4222"))
    assert config["otlp_endpoint"] == "jaeger-collector.observability.svc:4317"
    assert (config["subject_prefix"], config["resync_period_seconds"], config["log_level"]) == ("prod", 12.5, "DEBUG")
    assert config["clusters"][0] == {"name": "c1", "source": True, "target": False}
    assert config["serve_targets"] == ["c2"]
    assert config["candidate_timeout_seconds"] == 3
    assert config["nats_url"] == "nats://nats.nats.svc:4222"  # extraConfig cannot override managed settings
    assert (default["stream_replicas"], config["stream_replicas"]) == (1, 1)
    cluster = config_of(render("--set", "clusterName=c1", "--set", "nats.streamReplicas=3", "--set",
                               "nats.url=nats://n0.nats:4222\\,nats://n1.nats:4222\\,nats://n2.nats:4222"))
    assert cluster["stream_replicas"] == 3
    assert Settings.model_validate(cluster | {"nats_auth": {}}).nats_url.count("nats://") == 3
    tls = config_of(render(*BASE, "--set", "nats.auth.tlsSecret=nats-tls", "--set", "nats.auth.tlsClientCert=true"))
    assert {k: str(v) for k, v in tls["nats_auth"].items() if k.startswith("tls_")} == {
        "tls_ca_file": "/etc/mcs/nats-tls/ca.crt", "tls_cert_file": "/etc/mcs/nats-tls/tls.crt",
        "tls_key_file": "/etc/mcs/nats-tls/tls.key"}
    assert "tls_cert_file" not in config_of(render(*BASE, "--set", "nats.auth.tlsSecret=nats-tls"))["nats_auth"]


# -- RBAC --------------------------------------------------------------------------------------


def rules_of(docs: Docs, kind: str, name: str) -> dict[tuple[str, str], set[str]]:
    return {(group, resource): set(rule["verbs"])
            for rule in one(docs, kind, name)["rules"]
            for group in rule["apiGroups"] for resource in rule["resources"]}


# kubectl logs, exec, attach and port-forward on a proxy, forwarded to its delegate.
REMOTE_POD_ACCESS = {("", "pods/log"): {"get"}, ("", "pods/exec"): {"create"}, ("", "pods/attach"): {"create"},
                     ("", "pods/portforward"): {"create"}}


def test_rbac_is_least_privilege(render: Callable[..., Docs]) -> None:
    docs = render(*BASE)
    roles = find(docs, "ClusterRole") + find(docs, "Role")
    assert roles
    for role in roles:
        for rule in role["rules"]:
            for field in ("verbs", "resources", "apiGroups", "resourceNames", "nonResourceURLs"):
                assert "*" not in rule.get(field, []), f"{role['metadata']['name']} grants * {field}"

    source = rules_of(docs, "ClusterRole", f"{FULLNAME}-source")
    assert source[("", "pods/binding")] == {"create"}
    assert source[("", "pods")] == {"get", "list", "watch", "patch", "delete"}
    assert "create" not in source[("", "pods")]  # a source never creates pods; targets do
    assert source[("", "nodes/status")] == {"patch"}
    # virtual nodes, deleted when their target is removed
    assert source[("", "nodes")] == {"get", "list", "watch", "create", "patch", "delete"}
    # ConfigMaps and Secrets are only read in a source, to copy those a delegate uses into its target.
    assert source[("", "configmaps")] == source[("", "secrets")] == {"get", "list", "watch"}
    assert source[("", "namespaces")] == {"get", "list", "watch"}  # their cluster-weights annotation
    # The virtual nodes' kubelet endpoint checks its callers as a kubelet does.
    assert source.pop(("authorization.k8s.io", "subjectaccessreviews")) == {"create"}
    # Targets added at runtime: read, and their Ready condition written.
    assert source.pop(("multicluster.admiralty.io", "clustertargets")) == \
        source.pop(("multicluster.admiralty.io", "targets")) == {"get", "list", "watch"}
    assert source.pop(("multicluster.admiralty.io", "clustertargets/status")) == \
        source.pop(("multicluster.admiralty.io", "targets/status")) == {"patch"}
    assert all(group == "" for group, _ in source)  # leases are granted in kube-node-lease only

    leases = one(docs, "Role", f"{FULLNAME}-node-leases")
    assert leases["metadata"]["namespace"] == "kube-node-lease"
    assert rules_of(docs, "Role", f"{FULLNAME}-node-leases") == {
        ("coordination.k8s.io", "leases"): {"create", "patch"}}

    target = rules_of(docs, "ClusterRole", f"{FULLNAME}-target")
    assert target == {
        ("", "pods"): {"get", "list", "watch", "create", "delete"},
        ("", "nodes"): {"list", "watch"},
        ("", "namespaces"): {"get", "list", "watch", "create"},
        ("", "configmaps"): {"get", "list", "watch", "create", "update", "delete"},
        ("", "secrets"): {"get", "list", "watch", "create", "update", "delete"},
        ("", "serviceaccounts"): {"get"},
        **REMOTE_POD_ACCESS,
    }

    subject = [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    for role in ("source", "target"):
        binding = one(docs, "ClusterRoleBinding", f"{FULLNAME}-{role}")
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                      "name": f"{FULLNAME}-{role}"}
        assert binding["subjects"] == subject
    assert one(docs, "RoleBinding", f"{FULLNAME}-node-leases")["subjects"] == subject

    # without target self the target role is still there for an operator to bind, but not bound here
    no_self = render(*BASE, "--set", "targetSelf=false", "--set", "targets[0].name=c2,targets[0].kubeconfigSecret=k")
    assert one(no_self, "ClusterRole", f"{FULLNAME}-target")
    assert sorted(b["metadata"]["name"] for b in find(no_self, "ClusterRoleBinding")) == [
        f"{FULLNAME}-source", f"{FULLNAME}-source-controller"]


def test_targets_accept_sources_through_roles_only_the_source_controller_may_bind(
        render: Callable[..., Docs]) -> None:
    docs = render("--set", "clusterName=c2", "--set", "source=false")
    work = rules_of(docs, "ClusterRole", f"{FULLNAME}-accepted-source")
    assert work == {("", "pods"): {"get", "list", "watch", "create", "delete"},
                    ("", "configmaps"): {"get", "list", "watch", "create", "update", "delete"},
                    ("", "secrets"): {"get", "list", "watch", "create", "update", "delete"},
                    ("", "serviceaccounts"): {"get"}, **REMOTE_POD_ACCESS}
    assert rules_of(docs, "ClusterRole", f"{FULLNAME}-accepted-source-viewer") == {
        ("", r): {"get", "list", "watch"} for r in ("nodes", "pods", "namespaces")}
    assert rules_of(docs, "ClusterRole", f"{FULLNAME}-accepted-source-namespaces") == {
        ("", "namespaces"): {"create"}}
    controller = one(docs, "ClusterRole", f"{FULLNAME}-source-controller")["rules"]
    [bind] = [r for r in controller if "bind" in r["verbs"]]
    assert bind["verbs"] == ["bind"] and bind["resources"] == ["clusterroles"]
    assert sorted(bind["resourceNames"]) == sorted(f"{FULLNAME}-{r}" for r in (
        "accepted-source", "accepted-source-namespaces", "accepted-source-viewer"))
    assert not any("escalate" in r["verbs"] or "pods" in r["resources"] for r in controller)
    deployment = one(docs, "Deployment", f"{FULLNAME}-source-controller")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == f"{FULLNAME}-source-controller"
    assert container(deployment)["command"][:3] == ["python", "-m", "services.source_controller"]
    assert FULLNAME in container(deployment)["command"]  # --role-prefix: the roles above
    crds = CHART / "crds" / "sources.yaml"
    kinds = {d["spec"]["names"]["kind"]: d for d in yaml.safe_load_all(crds.read_text())}
    assert set(kinds) == {"Source", "ClusterSource"}
    assert {d["spec"]["group"] for d in kinds.values()} == {"multicluster.admiralty.io"}
    assert kinds["Source"]["spec"]["scope"] == "Namespaced" and kinds["ClusterSource"]["spec"]["scope"] == "Cluster"
    fields = {k: set(d["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"])
              for k, d in kinds.items()}
    assert fields == {"Source": {"serviceAccountName", "userName"}, "ClusterSource": {"serviceAccount", "userName"}}
    assert not find(render("--set", "clusterName=c2", "--set", "source=false",
                           "--set", "acceptSources.controller=false"), "Deployment")


def test_target_only_install_renders_rbac_and_no_services(render: Callable[..., Docs]) -> None:
    docs = render("--set", "clusterName=c2", "--set", "source=false")  # no NATS needed: no stage runs here
    assert [d["metadata"]["name"] for d in find(docs, "Deployment")] == [f"{FULLNAME}-source-controller"]
    assert not find(docs, "StatefulSet")
    assert not find(docs, "MutatingWebhookConfiguration") and not find(docs, "ConfigMap")
    # Whom it accepts, Sources and ClusterSources say (NOTES.txt): the chart's own ServiceAccount gets no
    # target rights here, where no service of it runs.
    assert sorted(b["roleRef"]["name"] for b in find(docs, "ClusterRoleBinding")) == [
        f"{FULLNAME}-source-controller"]
    assert one(docs, "ServiceAccount", FULLNAME)


# -- NATS --------------------------------------------------------------------------------------


def test_a_stage_mounts_the_files_its_settings_name(render: Callable[..., Docs]) -> None:
    """The kubelet endpoint's certificate files, say: feedback gets the volume, the others do not."""
    docs = render(*BASE, "--set-json", 'feedback.extraVolumes=[{"name": "kubelet-tls", "secret": {"secretName": "k"}}]',
                  "--set-json", 'feedback.extraVolumeMounts=[{"name": "kubelet-tls", "mountPath": "/etc/mcs/kt"}]')
    feedback = one(docs, "Deployment", f"{FULLNAME}-feedback")
    assert {"name": "kubelet-tls", "secret": {"secretName": "k"}} in feedback["spec"]["template"]["spec"]["volumes"]
    assert {"name": "kubelet-tls", "mountPath": "/etc/mcs/kt"} in container(feedback)["volumeMounts"]
    watcher = one(docs, "Deployment", f"{FULLNAME}-watcher")
    assert all(v["name"] != "kubelet-tls" for v in watcher["spec"]["template"]["spec"]["volumes"])


def test_the_bundled_nats_can_meet_pod_security_restricted(render: Callable[..., Docs]) -> None:
    base = ["--set", "clusterName=c1", "--set", "nats.bundled.enabled=true"]
    default = one(render(*base), "StatefulSet", f"{FULLNAME}-nats")
    assert container(default)["securityContext"] == {"allowPrivilegeEscalation": False}
    assert "securityContext" not in default["spec"]["template"]["spec"]
    restricted = one(render(*base, "--set-json", 'nats.bundled.podSecurityContext={"runAsNonRoot": true, '
                            '"runAsUser": 1000, "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}}',
                            "--set-json", 'nats.bundled.securityContext={"allowPrivilegeEscalation": false, '
                            '"capabilities": {"drop": ["ALL"]}}'), "StatefulSet", f"{FULLNAME}-nats")
    assert restricted["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container(restricted)["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_bundled_nats_only_when_enabled(render: Callable[..., Docs]) -> None:
    assert not find(render(*BASE), "StatefulSet")

    docs = render("--set", "clusterName=c1", "--set", "nats.bundled.enabled=true",
                  "--set", "nats.bundled.storage=5Gi")
    name = f"{FULLNAME}-nats"
    statefulset = one(docs, "StatefulSet", name)
    nats = container(statefulset)
    assert nats["image"] == "nats:2.10-alpine"
    assert nats["args"][2:5] == ["-js", "-sd", "/data"]
    assert nats["readinessProbe"]["httpGet"]["port"] == "monitor"
    assert nats["readinessProbe"]["httpGet"]["path"].startswith("/healthz")
    assert {"name": "monitor", "containerPort": 8222, "protocol": "TCP"} in nats["ports"]
    assert "-m" in nats["args"] and nats["args"][nats["args"].index("-m") + 1] == "8222"
    [claim] = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in nats["volumeMounts"]
    service = one(docs, "Service", name)
    assert {"name": "client", "port": 4222, "targetPort": "client", "protocol": "TCP"} in service["spec"]["ports"]
    assert config_of(docs)["nats_url"] == f"nats://{name}.{NAMESPACE}.svc:4222"

    # a NATS URL of your own wins over the bundled server
    both = render(*BASE, "--set", "nats.bundled.enabled=true")
    assert config_of(both)["nats_url"] == "nats://nats.nats.svc:4222"


# -- NATS identities ---------------------------------------------------------------------------


def bundled_nats_conf(docs: Docs) -> str:
    conf: str = one(docs, "Secret", f"{FULLNAME}-nats-config")["stringData"]["nats.conf"]
    return conf


def users_of(conf: str) -> dict[str, dict[str, Any]]:
    """The users of the chart's NATS configuration (its passwords are variables: read as their names)."""
    body = conf[conf.index("users:"):].split("[", 1)[1].rsplit("]", 1)[0]
    users = {}
    for line in body.strip().splitlines():
        entry = yaml.safe_load(re.sub(r"password: \$(\w+)", r'password: "\1"', line.strip()))
        users[entry["user"]] = entry
    return users


@pytest.mark.parametrize("extra", [[], ["--set", "candidateScheduler.serveTargets={c2}"]])
def test_bundled_nats_grants_each_stage_what_natsauth_grants_it(render: Callable[..., Docs],
                                                                extra: list[str]) -> None:
    docs = render("--set", "clusterName=c1", "--set", "nats.bundled.enabled=true", "--set", "targets[0].name=c2",
                  "--set", "targets[0].kubeconfigSecret=c2-kubeconfig", *extra)
    users = users_of(bundled_nats_conf(docs))
    assert set(users) == {"admin", *STAGES}
    assert "permissions" not in users["admin"]
    settings = Settings.model_validate(config_of(docs) | {"nats_auth": {}})
    for stage in STAGES:
        targets = granted_targets(stage, settings.serve_targets)
        want = stage_permissions(stage, stage, settings.subject_prefix, settings.source_names, targets)
        got = users[stage]["permissions"]
        assert set(got["publish"]["allow"]) == set(want.publish), stage
        assert set(got["subscribe"]["allow"]) == set(want.subscribe), stage
        assert got.get("allow_responses", False) == want.allow_responses, stage


def test_every_stage_reads_only_its_own_nats_password(render: Callable[..., Docs]) -> None:
    docs = render("--set", "clusterName=c1", "--set", "nats.bundled.enabled=true")
    secret = one(docs, "Secret", f"{FULLNAME}-nats-auth")
    assert set(secret["data"]) == {"admin", *STAGES}
    assert len({base64.b64decode(v) for v in secret["data"].values()}) == 5  # random, one each
    for stage in STAGES:
        deployment = one(docs, "Deployment", f"{FULLNAME}-{stage}")
        env = {e["name"]: e.get("value") for e in container(deployment)["env"]}
        assert env["MCS_NATS_AUTH__PASSWORD_FILE"] == f"/etc/mcs/nats/{stage}"
        [volume] = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "nats-auth"]
        assert volume["secret"]["secretName"] == f"{FULLNAME}-nats-auth"
        assert volume["secret"]["items"] == [{"key": stage, "path": stage}]
    nats = container(one(docs, "StatefulSet", f"{FULLNAME}-nats"))
    assert nats["args"][:2] == ["-c", "/etc/nats/nats.conf"]
    refs = {e["valueFrom"]["secretKeyRef"]["key"] for e in nats["env"]}
    assert refs == {"admin", *STAGES}
    assert config_of(docs)["nats_auth"] == {}  # the password file comes from each Deployment's environment

    own = render("--set", "clusterName=c1", "--set", "nats.bundled.enabled=true",
                 "--set", "nats.auth.existingSecret=mine")
    assert not find(own, "Secret", f"{FULLNAME}-nats-auth")
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in container(one(own, "StatefulSet", f"{FULLNAME}-nats"))[
        "env"]} == {"mine"}

    anonymous = render(*BASE, "--set", "nats.auth.allowAnonymous=true")
    assert not find(anonymous, "Secret", f"{FULLNAME}-nats-auth")
    assert config_of(anonymous)["nats_auth"] == {"allow_anonymous": True}
    for stage in STAGES:
        assert "MCS_NATS_AUTH__PASSWORD_FILE" not in {e["name"] for e in container(
            one(anonymous, "Deployment", f"{FULLNAME}-{stage}"))["env"]}


def test_the_bundled_nats_configuration_is_valid_for_nats_server(render: Callable[..., Docs],
                                                                 tmp_path: Path) -> None:
    docs = render("--set", "clusterName=c1", "--set", "nats.bundled.enabled=true")
    conf = tmp_path / "nats.conf"
    conf.write_text(bundled_nats_conf(docs))
    env = {**os.environ, **{f"MCS_NATS_PASSWORD_{u.upper().replace('-', '_')}": "pw" for u in ("admin", *STAGES)}}
    result = subprocess.run([str(nats_server_binary()), "-c", str(conf), "-t"], capture_output=True, text=True,
                            env=env, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
