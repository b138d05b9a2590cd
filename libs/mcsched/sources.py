"""Which sources a target accepts, as RBAC: Admiralty's Source and ClusterSource, turned into bindings.

Pure functions, no I/O. A target's administrator says whom it accepts with
Admiralty's own custom resources (``multicluster.admiralty.io/v1alpha1``):

* a **Source** in namespace N (``spec.serviceAccountName`` in N, and/or
  ``spec.userName``) lets that identity place delegates in N only;
* a **ClusterSource** (``spec.serviceAccount: {name, namespace}``, and/or
  ``spec.userName``) lets it place delegates in every namespace and create
  the namespaces it needs.

The source-controller (``services/source_controller``), running in the target
with the target's own credentials, keeps these bindings equal to what the
objects say. The identity a source's services use in the target then has
exactly those rights, so the limit holds in the target's API server, whatever
our services do. Every accepted identity may also read nodes, pods and
namespaces cluster-wide: a source's candidate-scheduler estimates from them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

GROUP = "multicluster.admiralty.io"
VERSION = "v1alpha1"
SOURCES_PATH = f"/apis/{GROUP}/{VERSION}/sources"
CLUSTER_SOURCES_PATH = f"/apis/{GROUP}/{VERSION}/clustersources"
RBAC = "rbac.authorization.k8s.io"
MANAGED_LABEL = "multicluster.admiralty.io/accepted-source"

JSON = dict[str, Any]
# What RBAC accepts as a ServiceAccount subject's name (a DNS subdomain) and namespace (a DNS label):
# a binding naming anything else is refused whole, with every other identity in it.
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _service_account(name: object, namespace: object) -> JSON | None:
    if isinstance(name, str) and isinstance(namespace, str) and len(name) <= 253 and len(namespace) <= 63 \
            and _SUBDOMAIN.fullmatch(name) and _LABEL.fullmatch(namespace):
        return {"kind": "ServiceAccount", "name": name, "namespace": namespace}
    return None


@dataclass(frozen=True)
class AcceptanceRoles:
    """The ClusterRoles bindings point at (named by the chart or the local environment)."""

    work: str  # pods, and copies of ConfigMaps and Secrets, in a namespace
    viewer: str  # nodes, pods and namespaces, read-only, cluster-wide
    namespaces: str  # create namespaces (ClusterSource only)

    @classmethod
    def named(cls, prefix: str) -> AcceptanceRoles:
        return cls(f"{prefix}-accepted-source", f"{prefix}-accepted-source-viewer",
                   f"{prefix}-accepted-source-namespaces")


def subjects(obj: Mapping[str, Any]) -> list[JSON]:
    """The identities a Source or ClusterSource names (none when it names nobody usable: a
    ServiceAccount name RBAC would refuse is left out)."""
    spec = obj.get("spec") or {}
    found: list[JSON] = []
    user = spec.get("userName")
    if isinstance(user, str) and user:
        found.append({"kind": "User", "apiGroup": RBAC, "name": user})
    if obj.get("kind") == "Source":
        account = _service_account(spec.get("serviceAccountName"), obj["metadata"]["namespace"])
    else:
        named = spec.get("serviceAccount")
        account = _service_account(named.get("name"), named.get("namespace")) if isinstance(named, Mapping) else None
    if account is not None:
        found.append(account)
    return found


def _owner(obj: Mapping[str, Any]) -> JSON:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": obj["kind"], "name": obj["metadata"]["name"],
            "uid": obj["metadata"]["uid"], "controller": True, "blockOwnerDeletion": False}


def _binding(kind: str, name: str, role: str, members: list[JSON], namespace: str | None = None,
             owner: Mapping[str, Any] | None = None) -> JSON:
    metadata: JSON = {"name": name, "labels": {MANAGED_LABEL: "true"}}
    if namespace is not None:
        metadata["namespace"] = namespace
    if owner is not None:
        metadata["ownerReferences"] = [_owner(owner)]
    return {"apiVersion": f"{RBAC}/v1", "kind": kind, "metadata": metadata,
            "roleRef": {"apiGroup": RBAC, "kind": "ClusterRole", "name": role}, "subjects": members}


def source_binding(source: Mapping[str, Any], roles: AcceptanceRoles) -> JSON:
    """The RoleBinding a Source grants in its namespace (deleted with the Source by its owner reference)."""
    name = source["metadata"]["name"]
    return _binding("RoleBinding", f"multicluster-scheduler-source-{name}", roles.work, subjects(source),
                    namespace=source["metadata"]["namespace"], owner=source)


def cluster_source_bindings(cluster_source: Mapping[str, Any], roles: AcceptanceRoles) -> list[JSON]:
    """The ClusterRoleBindings a ClusterSource grants: work everywhere, and creating namespaces."""
    name = cluster_source["metadata"]["name"]
    members = subjects(cluster_source)
    return [_binding("ClusterRoleBinding", f"multicluster-scheduler-clustersource-{name}", roles.work, members,
                     owner=cluster_source),
            _binding("ClusterRoleBinding", f"multicluster-scheduler-clustersource-{name}-namespaces",
                     roles.namespaces, members, owner=cluster_source)]


def viewer_binding(accepted: Iterable[Mapping[str, Any]], roles: AcceptanceRoles) -> JSON:
    """One ClusterRoleBinding letting every accepted identity read what estimates need.

    One object for all, rewritten whole on every change, so an identity no
    Source or ClusterSource names any more loses it at once.
    """
    members: list[JSON] = []
    for obj in accepted:
        for subject in subjects(obj):
            if subject not in members:
                members.append(subject)
    members.sort(key=lambda s: (s["kind"], s.get("namespace", ""), s["name"]))
    return _binding("ClusterRoleBinding", "multicluster-scheduler-accepted-sources-viewer", roles.viewer, members)
