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
CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "multicluster-scheduler"
RELEASE = "mcs-localenv"

# The chart creates the MutatingWebhookConfiguration itself; in the local environment
# the watcher registers it (webhook.register_webhook), which needs these verbs too.
WEBHOOK_REGISTRATION = "multicluster-scheduler-localenv-webhook-registration"


def _user_subject() -> list[dict[str, str]]:
    return [{"kind": "User", "name": SERVICE_USER, "apiGroup": "rbac.authorization.k8s.io"}]


def chart_rbac(cluster: str, source: bool) -> list[dict[str, Any]]:
    """The chart's RBAC objects for ``cluster`` (a target; a source too if ``source``), bound to the service user."""
    proc = subprocess.run(
        [str(bin_dir() / "helm"), "template", RELEASE, str(CHART), "--show-only", "templates/rbac.yaml",
         "--set", f"clusterName={cluster}", "--set", "nats.url=nats://localenv:4222",
         "--set", f"source={str(source).lower()}", "--set", "targetSelf=true"],
        capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"helm template of the chart's RBAC failed: {proc.stderr.strip()}")
    objects = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    for obj in objects:
        if obj["kind"] in ("ClusterRoleBinding", "RoleBinding"):
            obj["subjects"] = _user_subject()
    return objects


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


def manifest(cluster: str, source: bool) -> str:
    """Everything to apply in one cluster, as a kubectl List."""
    items = chart_rbac(cluster, source) + (webhook_registration_rbac() if source else [])
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
