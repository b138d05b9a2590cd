"""What a delegate pod references, and the copies of it we keep in a target: pure, no I/O.

A delegate runs in a target cluster but its spec still names the source's
ConfigMaps and Secrets (volumes, projected sources, ``env[].valueFrom``,
``envFrom``, ``imagePullSecrets``). The follower copies them into the
delegate's namespace in the target; this module says which objects those are
(:func:`referenced_objects`, :func:`delegate_references`,
:func:`delegates_using`), what a copy looks like (:func:`follower_copy`,
:func:`updated_copy`), whether an object in a target is one of our copies
(:func:`is_our_copy`, :func:`copy_source`) and whether it must be updated
(:func:`copy_differs`).

A copy carries the labels ``multicluster.admiralty.io/parent-cluster: <source>``
and ``multicluster.admiralty.io/followed: "true"`` and the annotation
``multicluster.admiralty.io/source-uid`` (the source object's UID). An object
without them was not made by us and is never overwritten or deleted.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from .constants import DOMAIN, PARENT_CLUSTER_LABEL, PARENT_UID_LABEL

JSON = dict[str, Any]

FOLLOWED_LABEL = f"{DOMAIN}/followed"
FOLLOWED_LABEL_VALUE = "true"
FOLLOWED_SELECTOR = f"{FOLLOWED_LABEL}={FOLLOWED_LABEL_VALUE}"
SOURCE_UID_ANNOTATION = f"{DOMAIN}/source-uid"
LAST_APPLIED_ANNOTATION = "kubectl.kubernetes.io/last-applied-configuration"

CONFIG_MAP = "ConfigMap"
SECRET = "Secret"
# kind -> resource (the path segment under /api/v1)
FOLLOWED_KINDS: dict[str, str] = {CONFIG_MAP: "configmaps", SECRET: "secrets"}
# Objects every namespace of every cluster has, made by the cluster itself (the target's own
# CA bundle is the right one there): never copied.
TARGET_PROVIDED: frozenset[tuple[str, str]] = frozenset({(CONFIG_MAP, "kube-root-ca.crt")})
# The fields of a ConfigMap or Secret a copy takes over (stringData is folded into data).
COPIED_FIELDS = ("data", "binaryData", "type", "immutable")

_TERMINAL_PHASES = ("Succeeded", "Failed")

Reference = tuple[str, str]  # (kind, name)
FollowKey = tuple[str, str, str, str]  # (source cluster, namespace, kind, name)


def _named(entry: Any, field: str = "name") -> str | None:
    if isinstance(entry, Mapping):
        name = entry.get(field)
        if isinstance(name, str) and name:
            return name
    return None


def _container_references(container: Mapping[str, Any]) -> Iterable[Reference]:
    for env in container.get("env") or []:
        source = (env or {}).get("valueFrom") or {}
        if name := _named(source.get("configMapKeyRef")):
            yield CONFIG_MAP, name
        if name := _named(source.get("secretKeyRef")):
            yield SECRET, name
    for env_from in container.get("envFrom") or []:
        if name := _named((env_from or {}).get("configMapRef")):
            yield CONFIG_MAP, name
        if name := _named((env_from or {}).get("secretRef")):
            yield SECRET, name


# Volume sources that name a Secret of the pod's namespace for their driver: (source, field).
_DRIVER_SECRETS = (("csi", "nodePublishSecretRef"), ("cephfs", "secretRef"), ("rbd", "secretRef"),
                   ("iscsi", "secretRef"), ("flexVolume", "secretRef"), ("scaleIO", "secretRef"),
                   ("storageos", "secretRef"))


def _volume_references(volume: Mapping[str, Any]) -> Iterable[Reference]:
    if name := _named(volume.get("configMap")):
        yield CONFIG_MAP, name
    if name := _named(volume.get("secret"), "secretName"):
        yield SECRET, name
    if name := _named(volume.get("azureFile"), "secretName"):
        yield SECRET, name
    for kind, field in _DRIVER_SECRETS:
        driver = volume.get(kind)
        if isinstance(driver, Mapping) and (name := _named(driver.get(field))):
            yield SECRET, name
    for source in (volume.get("projected") or {}).get("sources") or []:
        if name := _named((source or {}).get("configMap")):
            yield CONFIG_MAP, name
        if name := _named((source or {}).get("secret")):
            yield SECRET, name


def referenced_objects(spec: Mapping[str, Any]) -> frozenset[Reference]:
    """The ("ConfigMap" | "Secret", name) pairs a pod spec uses.

    From volumes (``configMap``, ``secret``, projected ``configMap``/``secret``
    sources, the Secrets of volume drivers: ``csi.nodePublishSecretRef``,
    ``azureFile.secretName``, ``secretRef`` of cephfs, rbd, iscsi, flexVolume,
    scaleIO and storageos), ``env[].valueFrom`` (``configMapKeyRef``/``secretKeyRef``),
    ``envFrom`` (``configMapRef``/``secretRef``) of containers, init containers
    and ephemeral containers, and ``imagePullSecrets``. Entries without a name
    are ignored; optional references are included (a missing one is skipped
    when copying).
    """
    found: set[Reference] = set()
    for volume in spec.get("volumes") or []:
        if isinstance(volume, Mapping):
            found.update(_volume_references(volume))
    for key in ("containers", "initContainers", "ephemeralContainers"):
        for container in spec.get(key) or []:
            if isinstance(container, Mapping):
                found.update(_container_references(container))
    for pull_secret in spec.get("imagePullSecrets") or []:
        if name := _named(pull_secret):
            found.add((SECRET, name))
    return frozenset(found)


def followed_objects(spec: Mapping[str, Any]) -> frozenset[Reference]:
    """:func:`referenced_objects` minus what the target provides itself (``kube-root-ca.crt``)."""
    return referenced_objects(spec) - TARGET_PROVIDED


# -- copies in a target ------------------------------------------------------------------------


def copy_source(obj: Mapping[str, Any]) -> str | None:
    """The source cluster an object in a target was copied from; None when we did not make it."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    if labels.get(FOLLOWED_LABEL) != FOLLOWED_LABEL_VALUE or not annotations.get(SOURCE_UID_ANNOTATION):
        return None
    source = labels.get(PARENT_CLUSTER_LABEL)
    return source if isinstance(source, str) and source else None


def is_our_copy(obj: Mapping[str, Any], source: str) -> bool:
    """Whether ``obj`` (in a target) is a copy we made of an object of cluster ``source``."""
    return copy_source(obj) == source


def _folded_data(source_obj: Mapping[str, Any]) -> dict[str, str]:
    """A Secret's ``data`` with ``stringData`` folded in (base64), as the API server stores it."""
    data = dict(source_obj.get("data") or {})
    for key, value in (source_obj.get("stringData") or {}).items():
        data[key] = base64.b64encode(str(value).encode()).decode()
    return data


def follower_copy(source_obj: Mapping[str, Any], source_cluster: str, *, kind: str | None = None) -> JSON:
    """The copy of a source ConfigMap or Secret to create in a target (same namespace and name).

    ``kind`` is needed when ``source_obj`` comes from a list (list items carry no kind).
    The user's labels and annotations are kept (minus kubectl's last-applied
    configuration), ours are added; nothing of the source's identity (uid,
    resourceVersion, owners, finalizers, managed fields, timestamps) is.
    """
    kind = kind or source_obj.get("kind")
    if kind not in FOLLOWED_KINDS:
        raise ValueError(f"cannot follow a {kind or 'object without a kind'}: only ConfigMap and Secret")
    meta = source_obj.get("metadata") or {}
    labels = dict(meta.get("labels") or {})
    labels.update({PARENT_CLUSTER_LABEL: source_cluster, FOLLOWED_LABEL: FOLLOWED_LABEL_VALUE})
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != LAST_APPLIED_ANNOTATION}
    annotations[SOURCE_UID_ANNOTATION] = str(meta.get("uid") or "")
    result: JSON = {
        "apiVersion": "v1", "kind": kind,
        "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                     "labels": labels, "annotations": annotations},
    }
    for field in COPIED_FIELDS:
        if field in source_obj and source_obj[field] is not None:
            result[field] = copy.deepcopy(source_obj[field])
    if source_obj.get("stringData"):
        result["data"] = _folded_data(source_obj)
    return result


def _normal(field: str, value: Any, kind: str | None) -> Any:
    if field in ("data", "binaryData"):
        return value or {}
    if field == "immutable":
        return bool(value)
    if field == "type":
        return (value or "Opaque") if kind == SECRET else value
    return value


def copy_differs(current: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Whether the copy in a target must be updated to be ``wanted`` (:func:`follower_copy`).

    Compares data, binaryData, type, immutable, labels and annotations; an
    empty map equals a missing one (the API server omits empty maps).
    """
    kind = wanted.get("kind") or current.get("kind")
    for field in COPIED_FIELDS:
        if _normal(field, current.get(field), kind) != _normal(field, wanted.get(field), kind):
            return True
    current_meta, wanted_meta = current.get("metadata") or {}, wanted.get("metadata") or {}
    return any((current_meta.get(f) or {}) != (wanted_meta.get(f) or {}) for f in ("labels", "annotations"))


def updated_copy(current: Mapping[str, Any], wanted: Mapping[str, Any]) -> JSON:
    """The body of an update (PUT) turning ``current`` into ``wanted``.

    ``current``'s metadata (uid, resourceVersion as the precondition, owners,
    finalizers someone in the target added) is kept; labels, annotations and
    the copied fields are ``wanted``'s.
    """
    body = copy.deepcopy(dict(current))
    body["apiVersion"], body["kind"] = "v1", wanted["kind"]
    meta = body.setdefault("metadata", {})
    meta["labels"] = copy.deepcopy(wanted["metadata"].get("labels") or {})
    meta["annotations"] = copy.deepcopy(wanted["metadata"].get("annotations") or {})
    for field in COPIED_FIELDS:
        if field in wanted:
            body[field] = copy.deepcopy(wanted[field])
        else:
            body.pop(field, None)
    body.pop("stringData", None)
    return body


def created_at(obj: Mapping[str, Any]) -> float | None:
    """An object's creationTimestamp as seconds since the epoch; None when missing or unreadable."""
    stamp = (obj.get("metadata") or {}).get("creationTimestamp")
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# -- what live delegates use -------------------------------------------------------------------


def delegate_references(pod: Mapping[str, Any]) -> frozenset[FollowKey]:
    """The (source, namespace, kind, name) a live delegate pod uses; empty for other pods.

    A delegate carries the parent-cluster and parent-uid labels; one that
    has finished (Succeeded or Failed) uses nothing any more. Objects the
    target provides itself are left out.
    """
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    source = labels.get(PARENT_CLUSTER_LABEL)
    if not source or not labels.get(PARENT_UID_LABEL):
        return frozenset()
    if (pod.get("status") or {}).get("phase") in _TERMINAL_PHASES:
        return frozenset()
    namespace = meta.get("namespace") or ""
    return frozenset((source, namespace, kind, name) for kind, name in followed_objects(pod.get("spec") or {}))


def delegates_using(delegate_pods: Iterable[Mapping[str, Any]]) -> set[FollowKey]:
    """Every (source, namespace, kind, name) some live delegate among ``delegate_pods`` uses.

    A copy in a target whose (parent-cluster, namespace, kind, name) is not in
    this set is used by no delegate there.
    """
    used: set[FollowKey] = set()
    for pod in delegate_pods:
        used.update(delegate_references(pod))
    return used


def copy_key(obj: Mapping[str, Any], kind: str) -> FollowKey | None:
    """The key of one of our copies (its source, namespace, kind, name); None when it is not ours."""
    source = copy_source(obj)
    if source is None:
        return None
    meta = obj["metadata"]
    return source, str(meta.get("namespace") or ""), kind, str(meta["name"])
