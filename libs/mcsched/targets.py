"""Admiralty's Target and ClusterTarget objects, read as clusters: pure, no I/O.

A source cluster names the clusters its pods may go to with Admiralty's own
custom resources (``multicluster.admiralty.io/v1alpha1``, the same fields):

* a **ClusterTarget** ``c2`` (cluster-scoped) is a target for every pod of
  the source; its virtual node is ``admiralty-c2``;
* a **Target** ``c2`` in namespace ``team-a`` is a target for the pods of
  ``team-a`` only; its cluster key and virtual node are ``team-a-c2`` and
  ``admiralty-team-a-c2``.

Each says either ``self: true`` (the source itself) or
``kubeconfigSecret: {name, namespace (ClusterTarget only), key (default
"config"), context}``, exactly one of the two, and may give
``excludedLabelsRegexp``: virtual-node labels (``key=value``) matching it are
left off. :func:`resolve` turns one object and its Secret into the
:class:`~mcsched.settings.ClusterSettings` the services use, or raises
:class:`TargetError` with the condition reason and message to show on it.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from .constants import DOMAIN
from .settings import ClusterSettings, is_cluster_name

_SECRET_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

API_VERSION = f"{DOMAIN}/v1alpha1"
CLUSTER_TARGETS_PATH = f"/apis/{API_VERSION}/clustertargets"
TARGETS_PATH = f"/apis/{API_VERSION}/targets"
DEFAULT_SECRET_KEY = "config"  # as Admiralty's kubeconfig Secrets (kubemcsa export) hold it


class TargetError(Exception):
    """A Target or ClusterTarget that names no usable cluster: ``reason`` (CamelCase) and the message."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class TargetObject:
    """Which object a cluster comes from: its kind, namespace (None for a ClusterTarget) and name."""

    source: str
    kind: str  # "ClusterTarget" or "Target"
    namespace: str | None
    name: str

    @classmethod
    def of(cls, source: str, obj: Mapping[str, Any]) -> TargetObject:
        meta = obj.get("metadata") or {}
        namespace = meta.get("namespace")
        return cls(source, "Target" if namespace else "ClusterTarget", namespace or None, str(meta.get("name")))

    @property
    def key(self) -> str:
        """The cluster's name in the services: subjects, placements, the virtual node admiralty-<key>."""
        return f"{self.namespace}-{self.name}" if self.namespace else self.name

    @property
    def path(self) -> str:
        if self.namespace:
            return f"/apis/{API_VERSION}/namespaces/{self.namespace}/targets/{self.name}"
        return f"{CLUSTER_TARGETS_PATH}/{self.name}"

    def __str__(self) -> str:
        where = f" in namespace {self.namespace}" if self.namespace else ""
        return f"{self.kind} {self.name}{where} of {self.source}"


@dataclass(frozen=True)
class SecretRef:
    namespace: str
    name: str
    key: str


def secret_ref(obj: Mapping[str, Any]) -> SecretRef | None:
    """The kubeconfig Secret an object names (None for ``self: true``); TargetError if the spec is wrong."""
    where = TargetObject.of("", obj)
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise TargetError("InvalidSpec", f"{where.kind} {where.name}: spec must be a mapping")
    is_self, secret = spec.get("self"), spec.get("kubeconfigSecret")
    if is_self not in (None, True, False):
        raise TargetError("InvalidSpec", "spec.self must be true or false")
    if bool(is_self) == (secret is not None):
        raise TargetError("InvalidSpec", "set exactly one of spec.self: true and spec.kubeconfigSecret")
    if secret is None:
        return None
    if not isinstance(secret, Mapping) or not isinstance(secret.get("name"), str) or \
            not _SECRET_NAME.fullmatch(secret["name"]) or len(secret["name"]) > 253:
        raise TargetError("InvalidSpec", "spec.kubeconfigSecret.name must name a Secret (a DNS subdomain)")
    namespace = where.namespace or secret.get("namespace")
    if where.namespace and secret.get("namespace") not in (None, where.namespace):
        raise TargetError("InvalidSpec", "a Target's kubeconfig Secret is in the Target's own namespace: "
                          "remove spec.kubeconfigSecret.namespace")
    if not isinstance(namespace, str) or not is_cluster_name(namespace):
        raise TargetError("InvalidSpec", "spec.kubeconfigSecret.namespace must name the Secret's namespace "
                          "(a DNS label)")
    key = secret.get("key") or DEFAULT_SECRET_KEY
    if not isinstance(key, str):
        raise TargetError("InvalidSpec", "spec.kubeconfigSecret.key must be a string")
    return SecretRef(namespace, secret["name"], key)


def resolve(origin: TargetObject, obj: Mapping[str, Any], secret: Mapping[str, Any] | None) -> ClusterSettings:
    """The target cluster ``obj`` (a Target or ClusterTarget of ``origin.source``) names.

    ``secret`` is the Secret :func:`secret_ref` names, None when it does not
    exist (ignored for ``self: true``). Raises :class:`TargetError`.
    """
    if not is_cluster_name(origin.key):
        raise TargetError("InvalidName", f"cluster key {origin.key!r} (virtual node admiralty-{origin.key}) is not a "
                          "DNS label of at most 63 characters; choose a shorter name")
    ref = secret_ref(obj)
    spec = obj.get("spec") or {}
    excluded = spec.get("excludedLabelsRegexp")
    if excluded is not None:
        if not isinstance(excluded, str):
            raise TargetError("InvalidSpec", "spec.excludedLabelsRegexp must be a string")
        try:
            re.compile(excluded)
        except re.error as exc:
            raise TargetError("InvalidSpec", f"spec.excludedLabelsRegexp {excluded!r}: {exc}") from exc
    common: dict[str, Any] = {"name": origin.key, "target": True, "excluded_labels_regexp": excluded,
                              "sources": [origin.source], "namespace": origin.namespace}
    if ref is None:
        return ClusterSettings(**common, same_as=origin.source)
    if secret is None:
        raise TargetError("SecretNotFound", f"Secret {ref.namespace}/{ref.name} not found")
    raw = (secret.get("data") or {}).get(ref.key)
    if raw is None:
        raise TargetError("SecretKeyNotFound", f"Secret {ref.namespace}/{ref.name} has no key {ref.key!r}")
    try:
        kubeconfig = yaml.safe_load(base64.b64decode(raw, validate=True))
    except (binascii.Error, ValueError, yaml.YAMLError) as exc:
        raise TargetError("InvalidKubeconfig", f"Secret {ref.namespace}/{ref.name} key {ref.key!r} is not a "
                          f"kubeconfig: {exc}") from exc
    context = (spec.get("kubeconfigSecret") or {}).get("context") or None
    problem = kubeconfig_problem(kubeconfig, context)
    if problem is not None:
        raise TargetError("InvalidKubeconfig", f"Secret {ref.namespace}/{ref.name} key {ref.key!r}: {problem}")
    return ClusterSettings(**common, kubeconfig_data=kubeconfig, context=context)


# What a kubeconfig from a Secret may not hold: whoever writes a Target would otherwise have the services
# run a command (exec, auth-provider) or read their own files (paths: the services' token, say) and send
# what they read to a server of the writer's choosing.
_USER_FIELDS_REFUSED = ("exec", "auth-provider", "tokenFile", "client-certificate", "client-key")
_CLUSTER_FIELDS_REFUSED = ("certificate-authority",)


def kubeconfig_problem(kubeconfig: Any, context: str | None) -> str | None:
    """What keeps ``kubeconfig`` from naming a cluster in ``context`` (default: its current one), or None.

    Its credentials must be inline (``token``, ``client-certificate-data``, ``certificate-authority-data``):
    it comes from a Secret that whoever writes a Target names.
    """
    if not isinstance(kubeconfig, Mapping):
        return "not a kubeconfig (a YAML mapping with clusters, contexts and users)"
    contexts = {c.get("name"): c.get("context") or {} for c in kubeconfig.get("contexts") or []
                if isinstance(c, Mapping)}
    name = context or kubeconfig.get("current-context")
    if not name:
        return "no context given and no current-context"
    if name not in contexts:
        return f"no context {name!r}"
    clusters = {c.get("name"): c.get("cluster") or {} for c in kubeconfig.get("clusters") or []
                if isinstance(c, Mapping)}
    cluster = clusters.get(contexts[name].get("cluster"))
    if not cluster or not cluster.get("server"):
        return f"context {name!r} names no cluster with a server"
    refused = [field for field in _CLUSTER_FIELDS_REFUSED if field in cluster]
    users = {u.get("name"): u.get("user") or {} for u in kubeconfig.get("users") or [] if isinstance(u, Mapping)}
    user = users.get(contexts[name].get("user")) or {}
    refused += [field for field in _USER_FIELDS_REFUSED if isinstance(user, Mapping) and field in user]
    if refused:
        return (f"context {name!r} uses {', '.join(refused)}: a kubeconfig in a Secret carries its credentials "
                "inline (token, client-certificate-data, certificate-authority-data), and runs no command")
    return None


def excluded_label(pattern: str | None, key: str, value: str) -> bool:
    """Whether a virtual-node label is left off: ``key=value`` matches ``excludedLabelsRegexp``."""
    return pattern is not None and re.search(pattern, f"{key}={value}") is not None


def encode_kubeconfig(kubeconfig: Mapping[str, Any]) -> str:
    """A kubeconfig as a Secret's data value (for the local environment and tests)."""
    return base64.b64encode(yaml.safe_dump(dict(kubeconfig)).encode()).decode()
