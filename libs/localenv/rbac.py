"""The services' identity in the local environment: a token user bound to the Helm chart's own roles.

The services never run as cluster admin here. Every cluster gets the chart's
ClusterRoles and Role, rendered by ``helm template`` from ``deploy/helm``, bound
to the user ``multicluster-scheduler`` instead of the chart's ServiceAccount.
So the demo, the tests and the benchmark all run with exactly what the chart
grants: a verb it lacks fails as a 403, a verb it grants needlessly is one the
code review can see unused. As in ``write_config``'s default, the first
cluster is the source (source and target roles); the others are targets only.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from .tools import bin_dir

SERVICE_USER = "multicluster-scheduler"
SOURCE_CONTROLLER_USER = "multicluster-scheduler-source-controller"
CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "multicluster-scheduler"
CRDS = (CHART / "crds" / "sources.yaml", CHART / "crds" / "targets.yaml")
RELEASE = "mcs-localenv"
FULLNAME = f"{RELEASE}-multicluster-scheduler"  # the prefix of the chart's role names here

# The chart creates the MutatingWebhookConfiguration itself; in the local environment
# the watcher registers it (webhook.register_webhook), which needs these verbs too.
WEBHOOK_REGISTRATION = "multicluster-scheduler-localenv-webhook-registration"


def _user_subject() -> list[dict[str, str]]:
    return [{"kind": "User", "name": SERVICE_USER, "apiGroup": "rbac.authorization.k8s.io"}]


def chart_rbac(cluster: str, source: bool) -> list[dict[str, Any]]:
    """The chart's RBAC objects for ``cluster`` (a target; a source too if ``source``), bound to the service user.

    A source is also a target of itself ("target self": the chart's target role is bound to it);
    another cluster has the accepted-source roles, bound by the source-controller (whose own
    role goes to its own user) as the cluster's Sources and ClusterSources say.
    """
    proc = subprocess.run(
        [str(bin_dir() / "helm"), "template", RELEASE, str(CHART), "--show-only", "templates/rbac.yaml",
         "--show-only", "templates/source-acceptance.yaml",
         "--set", f"clusterName={cluster}", "--set", "nats.url=nats://localenv:4222",
         "--set", f"source={str(source).lower()}", "--set", f"targetSelf={str(source).lower()}",
         "--set", "acceptSources.controller=false"],
        capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"helm template of the chart's RBAC failed: {proc.stderr.strip()}")
    objects = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    for obj in objects:
        if obj["kind"] in ("ClusterRoleBinding", "RoleBinding"):
            obj["subjects"] = _user_subject()
    objects.append(
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": f"{FULLNAME}-source-controller"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": f"{FULLNAME}-source-controller"},
         "subjects": [{"kind": "User", "name": SOURCE_CONTROLLER_USER, "apiGroup": "rbac.authorization.k8s.io"}]})
    return objects


def cluster_source(source: str) -> dict[str, Any]:
    """The ClusterSource by which a target accepts the services' user for ``source`` everywhere."""
    return {"apiVersion": "multicluster.admiralty.io/v1alpha1", "kind": "ClusterSource",
            "metadata": {"name": source}, "spec": {"userName": SERVICE_USER}}


def webhook_registration_rbac() -> list[dict[str, Any]]:
    labels = {"app.kubernetes.io/name": "multicluster-scheduler", "app.kubernetes.io/instance": RELEASE}
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": WEBHOOK_REGISTRATION, "labels": labels},
         "rules": [{"apiGroups": ["admissionregistration.k8s.io"], "resources": ["mutatingwebhookconfigurations"],
                    "verbs": ["create", "patch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": WEBHOOK_REGISTRATION, "labels": labels},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": WEBHOOK_REGISTRATION},
         "subjects": _user_subject()},
    ]


def manifest(cluster: str, source: bool, accepted_sources: list[str]) -> str:
    """Everything to apply in one cluster, as a kubectl List (the CRDs of ``CRDS`` must exist)."""
    items = chart_rbac(cluster, source) + (webhook_registration_rbac() if source else [])
    items += [cluster_source(s) for s in accepted_sources]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
