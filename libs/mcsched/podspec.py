"""Pod manifest transforms: elected pod -> proxy pod -> delegate pod, and status back.

Pure functions on Kubernetes JSON dicts, no I/O:

* :func:`election` reads the elect annotation (and rejects malformed values);
* :func:`proxy_patch` is the admission webhook's JSON patch that turns an
  elected pod into a proxy pod, keeping the original in an annotation;
* :func:`delegate_manifest` builds the delegate for a target from that original;
* :func:`mirrored_status` is the proxy status that mirrors a delegate's, and
  :func:`mirror_patch` the write that puts it on the proxy.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, Literal

import orjson
from pydantic import ValidationError

from .constants import (
    CLUSTER_CHOSEN_LABEL,
    DELEGATE_TARGET_LABEL,
    DOMAIN,
    ELECT_ANNOTATION,
    PARENT_CLUSTER_LABEL,
    PARENT_NAME_ANNOTATION,
    PARENT_NAME_LABEL,
    PARENT_NAMESPACE_LABEL,
    PARENT_UID_LABEL,
    PLACEMENT_ANNOTATION,
    PLACEMENT_ROUND_ANNOTATION,
    PROXY_FINALIZER,
    PROXY_SCHEDULER_NAME,
    SKIP_PREFIXING_ANNOTATION,
    SOURCE_MANIFEST_ANNOTATION,
    TRACE_ID_ANNOTATION,
    TRACEPARENT_ANNOTATION,
    VIRTUAL_NODE_TAINT_KEY,
    VIRTUAL_NODE_TAINT_VALUE,
    VIRTUAL_NODE_TYPE_LABEL,
    VIRTUAL_NODE_TYPE_VALUE,
)
from .models import PodRef
from .shards import PARTITION_LABEL, PARTITIONS, draw_partition, partition_of

PARTITION_VALUES = frozenset(str(p) for p in range(PARTITIONS))

JSON = dict[str, Any]

_TRUE_VALUES = {"", "true"}
_FALSE_VALUES = {"false"}
# The alphabet Kubernetes uses for generated name suffixes (no vowels, no look-alikes).
_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


class ElectionError(ValueError):
    """The elect annotation has a value we cannot interpret."""


def election(pod: Mapping[str, Any]) -> bool:
    """Whether the pod asks to be elected; raises ElectionError on a malformed annotation."""
    annotations = pod.get("metadata", {}).get("annotations") or {}
    if ELECT_ANNOTATION not in annotations:
        return False
    value = str(annotations[ELECT_ANNOTATION]).strip().lower()
    if value in _TRUE_VALUES:
        return True
    if value in _FALSE_VALUES:
        return False
    raise ElectionError(
        f'annotation {ELECT_ANNOTATION}="{annotations[ELECT_ANNOTATION]}" is not understood: '
        'use "" or "true" to run the pod in another cluster, or remove the annotation')


def is_proxy(pod: Mapping[str, Any]) -> bool:
    annotations = pod.get("metadata", {}).get("annotations") or {}
    return SOURCE_MANIFEST_ANNOTATION in annotations and (
        pod.get("spec", {}).get("schedulerName") == PROXY_SCHEDULER_NAME)


def source_manifest(proxy: Mapping[str, Any]) -> JSON:
    """The elected pod as the user created it (labels, annotations, spec)."""
    raw = (proxy.get("metadata", {}).get("annotations") or {}).get(SOURCE_MANIFEST_ANNOTATION)
    if not raw:
        raise ValueError("pod has no source manifest annotation: it is not a proxy pod")
    try:
        manifest = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"the source manifest annotation is not JSON: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("spec", {}), dict) \
            or not isinstance(manifest.get("metadata", {}), dict):
        raise ValueError("the source manifest annotation is not a pod manifest (an object with metadata and spec)")
    return manifest


# The spec fields the admission webhook changes on a proxy; the user's values are in the source manifest.
SCHEDULING_FIELDS = ("schedulerName", "nodeSelector", "tolerations", "affinity")


def delegate_original(proxy: Mapping[str, Any]) -> JSON:
    """The pod a delegate is built from: the proxy's own spec, as its source admitted it.

    Only the scheduling fields the webhook changed (and the labels and
    annotations) come from the source-manifest annotation. Everything else,
    containers, volumes, security contexts, host namespaces, is the proxy's
    real spec, which passed the source's admission (Pod Security and the
    rest), so a proxy made without our webhook, with an annotation of its own,
    can never run in a target more than its creator could run in the source.
    Raises ValueError for a pod without the annotation.
    """
    original = source_manifest(proxy)
    spec = copy.deepcopy(dict(proxy.get("spec") or {}))
    wanted = original.get("spec") or {}
    for name in SCHEDULING_FIELDS:
        if name in wanted:
            spec[name] = copy.deepcopy(wanted[name])
        else:
            spec.pop(name, None)
    for name in ("nodeName", "ephemeralContainers"):  # never set on a pod being created
        spec.pop(name, None)
    metadata = proxy.get("metadata") or {}
    annotations = {k: v for k, v in (metadata.get("annotations") or {}).items() if k not in PROXY_ONLY_ANNOTATIONS}
    return {"metadata": {"labels": dict(metadata.get("labels") or {}), "annotations": annotations}, "spec": spec}


# Annotations the webhook and the stages put on a proxy: never copied to its delegate.
PROXY_ONLY_ANNOTATIONS = frozenset({
    ELECT_ANNOTATION, SOURCE_MANIFEST_ANNOTATION, PLACEMENT_ANNOTATION, PLACEMENT_ROUND_ANNOTATION,
    TRACE_ID_ANNOTATION, TRACEPARENT_ANNOTATION})


# Every proxy tolerates the taint that keeps ordinary pods off virtual nodes.
VIRTUAL_NODE_TOLERATION = {"key": VIRTUAL_NODE_TAINT_KEY, "operator": "Equal", "value": VIRTUAL_NODE_TAINT_VALUE,
                           "effect": "NoSchedule"}

# The taints the node lifecycle controller puts on a node that stopped reporting Ready; a pod that
# does not tolerate them is evicted (for a proxy: its cluster is lost, its controller replaces it).
FAILOVER_TAINT_KEYS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")
# What the API server's DefaultTolerationSeconds admission gives a pod that did not choose.
DEFAULT_TOLERATION_SECONDS = 300


def _is_defaulted(toleration: Mapping[str, Any]) -> bool:
    return (toleration.get("key") in FAILOVER_TAINT_KEYS and toleration.get("operator") == "Exists"
            and toleration.get("effect") == "NoExecute"
            and toleration.get("tolerationSeconds") == DEFAULT_TOLERATION_SECONDS)


def proxy_tolerations(tolerations: list[JSON], failover_seconds: int | None) -> list[JSON]:
    """A proxy's tolerations: the pod's own, the virtual-node taint's, and how long it stays on a lost cluster.

    A pod that chose how long it tolerates a NotReady or unreachable node (any
    value but the 300 s Kubernetes gives every pod, or a toleration matching
    those taints some other way) keeps its choice. Otherwise the defaulted
    toleration is replaced by ``failover_seconds`` (None: forever), so the
    node lifecycle controller evicts the proxy that long after its cluster was
    lost, and its controller starts a replacement in a reachable cluster.
    """
    kept = [t for t in tolerations if not _is_defaulted(t) and t.get("key") != VIRTUAL_NODE_TAINT_KEY]
    for key in FAILOVER_TAINT_KEYS:
        if any(_tolerates_no_execute(t, key) for t in kept):
            continue
        toleration: JSON = {"key": key, "operator": "Exists", "effect": "NoExecute"}
        if failover_seconds is not None:
            toleration["tolerationSeconds"] = failover_seconds
        kept.append(toleration)
    return [*kept, dict(VIRTUAL_NODE_TOLERATION)]


def _tolerates_no_execute(toleration: Mapping[str, Any], key: str) -> bool:
    """Whether ``toleration`` matches the NoExecute taint ``key`` (whatever its value)."""
    if toleration.get("effect") not in (None, "", "NoExecute"):
        return False
    if not toleration.get("key"):
        return toleration.get("operator") == "Exists"
    return bool(toleration.get("key") == key)


def _without_chosen_mark(labels: Mapping[str, str]) -> dict[str, str]:
    """A proxy's labels without the one its placement keeps (mcsched.choice): not a pod's to carry."""
    return {k: v for k, v in labels.items() if k != CLUSTER_CHOSEN_LABEL}


def _without_placement(annotations: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in annotations.items() if k not in (PLACEMENT_ANNOTATION, PLACEMENT_ROUND_ANNOTATION)}


def proxy_patch(pod: Mapping[str, Any], extra_annotations: Mapping[str, str] | None = None,
                failover_seconds: int | None = DEFAULT_TOLERATION_SECONDS, partition: str | None = None) -> list[JSON]:
    """JSON patch turning an elected pod into a proxy pod (idempotent: [] for a proxy with no cluster chosen).

    ``extra_annotations`` (e.g. the pod's trace context) are added to the proxy only;
    ``failover_seconds`` is how long the proxy stays on a lost cluster (:func:`proxy_tolerations`);
    ``partition`` is the proxy's partition label (drawn at random when not given; one the pod
    carries already is kept).
    """
    metadata, spec = pod.get("metadata", {}), pod.get("spec", {})
    if is_proxy(pod):  # e.g. re-created from a proxy's YAML: only a cluster already chosen is dropped
        kept = _without_placement(metadata.get("annotations") or {})
        ops: list[JSON] = []
        if len(kept) != len(metadata.get("annotations") or {}):
            ops.append({"op": "add", "path": "/metadata/annotations", "value": kept})
        labels = _without_chosen_mark(metadata.get("labels") or {})
        if len(labels) != len(metadata.get("labels") or {}):
            ops.append({"op": "add", "path": "/metadata/labels", "value": labels})
        return ops
    # Only what the proxy itself no longer has: the user's scheduling fields (the webhook replaces
    # them below). Everything else is the proxy's own spec and metadata, so the annotation stays
    # small whatever the pod's size (annotations are limited to 256 KiB in all).
    original = {"spec": {name: spec[name] for name in SCHEDULING_FIELDS if name in spec}}
    # A pod created from a proxy's YAML must not arrive with a cluster already chosen.
    annotations = _without_placement(metadata.get("annotations") or {})
    annotations.update(extra_annotations or {})
    annotations[SOURCE_MANIFEST_ANNOTATION] = orjson.dumps(original, option=orjson.OPT_SORT_KEYS).decode()
    finalizers = list(metadata.get("finalizers") or [])
    if PROXY_FINALIZER not in finalizers:
        finalizers.append(PROXY_FINALIZER)
    tolerations = proxy_tolerations(list(spec.get("tolerations") or []), failover_seconds)
    # The partition of the pod's work (mcsched.shards): which process of a sharded stage handles it.
    labels = _without_chosen_mark(metadata.get("labels") or {})
    if str(labels.get(PARTITION_LABEL, "")) not in PARTITION_VALUES:
        labels[PARTITION_LABEL] = partition if partition is not None else draw_partition()
    ops = [
        {"op": "add", "path": "/metadata/labels", "value": labels},
        {"op": "add", "path": "/metadata/annotations", "value": annotations},
        {"op": "add", "path": "/metadata/finalizers", "value": finalizers},
        {"op": "add", "path": "/spec/schedulerName", "value": PROXY_SCHEDULER_NAME},
        {"op": "add", "path": "/spec/nodeSelector", "value": {VIRTUAL_NODE_TYPE_LABEL: VIRTUAL_NODE_TYPE_VALUE}},
        {"op": "add", "path": "/spec/tolerations", "value": tolerations},
    ]
    if "affinity" in spec:
        ops.append({"op": "remove", "path": "/spec/affinity"})
    return ops


def apply_patch(pod: Mapping[str, Any], ops: list[JSON]) -> JSON:
    """Apply the simple add/remove operations :func:`proxy_patch` emits (for tests and tools)."""
    result = copy.deepcopy(dict(pod))
    for op in ops:
        parts = op["path"].strip("/").split("/")
        target = result
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        if op["op"] == "add":
            target[parts[-1]] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            target.pop(parts[-1], None)
        else:
            raise ValueError(f"unsupported op {op['op']}")
    return result


def delegate_name(proxy_name: str, proxy_uid: str) -> str:
    """``<proxy-name>-<suffix>``; the suffix is derived from the proxy's UID, so it is stable."""
    digest = hashlib.sha256(proxy_uid.encode()).digest()
    suffix = "".join(_SUFFIX_ALPHABET[b % len(_SUFFIX_ALPHABET)] for b in digest[:5])
    # A pod name is a DNS subdomain of at most 253 characters: each dot-separated part
    # must end with a letter or digit, so a cut never leaves "-" or "." before the suffix.
    return f"{proxy_name[:247].rstrip('-.')}-{suffix}"


def _is_service_account_volume(volume: Mapping[str, Any]) -> bool:
    name = str(volume.get("name", ""))
    return name.startswith("kube-api-access-") and "projected" in volume


def delegate_manifest(original: Mapping[str, Any], *, source: str, namespace: str, proxy_name: str,
                      proxy_uid: str, scheduler_name: str | None = None, owner: Mapping[str, Any] | None = None,
                      extra_annotations: Mapping[str, str] | None = None, target: str | None = None) -> JSON:
    """The delegate pod for a target, built from the proxy's original manifest.

    The delegate is created unbound: the target's own scheduler places it, so
    every scheduling rule of the pod applies there (``scheduler_name`` names a
    scheduler of the target's other than the pod's own). Fields the target's
    admission would refuse or add again are removed: the source's
    service-account token volume, ``priority`` and ``preemptionPolicy`` (set
    from the source's PriorityClass: the target's class of that name decides),
    ``overhead`` (set from the source's RuntimeClass: the target's decides),
    scheduling gates (lifted on the proxy before any delegate exists: nothing
    in the target would lift them) and any node binding. ``owner`` (the target's Namespace) becomes the delegate's
    controller, so no controller in the target adopts it. ``target`` is the
    cluster key it is created for (:func:`belongs_to`).
    """
    metadata = original.get("metadata", {})
    spec = copy.deepcopy(dict(original.get("spec", {})))
    token_volumes = {v["name"] for v in spec.get("volumes", []) if _is_service_account_volume(v)}
    if token_volumes:
        spec["volumes"] = [v for v in spec["volumes"] if v["name"] not in token_volumes]
        for key in ("containers", "initContainers", "ephemeralContainers"):
            for container in spec.get(key) or []:
                mounts = [m for m in container.get("volumeMounts") or [] if m.get("name") not in token_volumes]
                if mounts:
                    container["volumeMounts"] = mounts
                else:
                    container.pop("volumeMounts", None)
    for field in ("priority", "preemptionPolicy", "overhead", "nodeName", "schedulingGates"):
        spec.pop(field, None)
    if spec.get("schedulerName") == PROXY_SCHEDULER_NAME:
        spec.pop("schedulerName")
    if scheduler_name:
        spec["schedulerName"] = scheduler_name
    skip = skipped_label_keys(metadata.get("annotations") or {})
    labels = {delegate_label_key(k, skip): v for k, v in _without_chosen_mark(metadata.get("labels") or {}).items()}
    _rewrite_selectors(spec, skip)
    labels.update({
        PARENT_CLUSTER_LABEL: source, PARENT_NAMESPACE_LABEL: namespace,
        PARENT_NAME_LABEL: proxy_name[:63].rstrip("-_."), PARENT_UID_LABEL: proxy_uid,
    })
    if target is not None:
        labels[DELEGATE_TARGET_LABEL] = target
    labels[PARTITION_LABEL] = str(partition_of(metadata.get("labels")))  # the proxy's: one process has both
    annotations = {k: v for k, v in (metadata.get("annotations") or {}).items() if k != ELECT_ANNOTATION}
    annotations.update(extra_annotations or {})
    annotations[PARENT_NAME_ANNOTATION] = proxy_name
    meta: JSON = {"name": delegate_name(proxy_name, proxy_uid), "namespace": namespace,
                  "labels": labels, "annotations": annotations}
    if owner is not None:
        meta["ownerReferences"] = [{
            "apiVersion": "v1", "kind": "Namespace", "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": False,
        }]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def belongs_to(delegate: Mapping[str, Any], target: str) -> bool:
    """Whether a delegate found in ``target``'s cluster was created for that cluster key, and not for
    another key naming the same cluster (one made before the label existed belongs to any)."""
    labels = (delegate.get("metadata") or {}).get("labels") or {}
    return str(labels.get(DELEGATE_TARGET_LABEL, target)) == target


def skipped_label_keys(annotations: Mapping[str, str]) -> frozenset[str]:
    """Label keys a pod asks to keep as they are on its delegate (Admiralty's annotation, comma-separated)."""
    raw = annotations.get(SKIP_PREFIXING_ANNOTATION) or ""
    return frozenset(k.strip() for k in raw.split(",") if k.strip())


def delegate_label_key(key: str, skip: frozenset[str] = frozenset()) -> str:
    """A pod's label key as its delegate carries it: in our domain (Admiralty's rule), unless skipped.

    ``app`` becomes ``multicluster.admiralty.io/app`` and ``example.com/tier``
    ``multicluster.admiralty.io/tier``, so that nothing in a target selects a
    delegate by the user's labels by mistake: not a ReplicaSet, a Service, or a
    PodDisruptionBudget of the same application (in the source itself, when it
    is its own target, that would count every pod twice).
    """
    if key in skip:
        return key
    return f"{DOMAIN}/{key.rsplit('/', 1)[-1]}"


def _rewrite_selector(selector: Any, skip: frozenset[str]) -> None:
    if not isinstance(selector, dict):
        return
    if isinstance(selector.get("matchLabels"), dict):
        selector["matchLabels"] = {delegate_label_key(k, skip): v for k, v in selector["matchLabels"].items()}
    for expression in selector.get("matchExpressions") or []:
        if isinstance(expression, dict) and isinstance(expression.get("key"), str):
            expression["key"] = delegate_label_key(expression["key"], skip)


def _rewrite_term(term: Any, skip: frozenset[str]) -> None:
    """A pod (anti-)affinity term or a topology spread constraint: its pod selector names delegates' labels."""
    if not isinstance(term, dict):
        return
    _rewrite_selector(term.get("labelSelector"), skip)
    for field in ("matchLabelKeys", "mismatchLabelKeys"):
        if isinstance(term.get(field), list):
            term[field] = [delegate_label_key(k, skip) if isinstance(k, str) else k for k in term[field]]


def _rewrite_selectors(spec: JSON, skip: frozenset[str]) -> None:
    """Make the delegate's pod selectors (affinity to other pods, topology spread) match delegates' labels.

    Namespace selectors select namespaces, whose labels do not change: they are left alone.
    """
    affinity: JSON = spec["affinity"] if isinstance(spec.get("affinity"), dict) else {}
    for kind in ("podAffinity", "podAntiAffinity"):
        rules: JSON = affinity[kind] if isinstance(affinity.get(kind), dict) else {}
        for term in rules.get("requiredDuringSchedulingIgnoredDuringExecution") or []:
            _rewrite_term(term, skip)
        for weighted in rules.get("preferredDuringSchedulingIgnoredDuringExecution") or []:
            if isinstance(weighted, dict):
                _rewrite_term(weighted.get("podAffinityTerm"), skip)
    for constraint in spec.get("topologySpreadConstraints") or []:
        _rewrite_term(constraint, skip)


MIRRORED_STATUS_FIELDS = (
    "phase", "conditions", "message", "reason", "podIP", "podIPs", "hostIP", "hostIPs", "startTime",
    "containerStatuses", "initContainerStatuses",
)


def mirrored_status(delegate_status: Mapping[str, Any]) -> JSON:
    """The proxy status that mirrors a delegate's (the fields a user reads).

    ``PodScheduled`` belongs to the proxy (the API server sets it when the proxy
    is bound to its virtual node), so it is not mirrored: :func:`mirror_patch`
    keeps the proxy's own.
    The values are shared with ``delegate_status``, not copied: treat the result as read-only.
    """
    status = {k: delegate_status[k] for k in MIRRORED_STATUS_FIELDS if k in delegate_status}
    if "conditions" in status:
        status["conditions"] = [c for c in status["conditions"] if c.get("type") != "PodScheduled"]
    return status


def newer_resource_version(a: str | None, b: str | None) -> bool:
    """Whether resourceVersion ``a`` is later than ``b`` (of objects of one cluster).

    The API server's resourceVersions are etcd revisions, integers growing across the
    whole cluster; anything else is treated as not newer.
    """
    try:
        return a is not None and b is not None and int(a) > int(b)
    except ValueError:
        return False


def _comparable(status: Mapping[str, Any]) -> JSON:
    """A mirrored status with its conditions keyed by type and absent fields dropped, to compare two."""
    mirrored = mirrored_status(status)
    compared: JSON = {k: v for k, v in mirrored.items() if v is not None and k != "conditions"}
    compared["conditions"] = {c.get("type"): c for c in mirrored.get("conditions") or []}
    return compared


def status_differs(proxy_status: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Whether the proxy's status does not mirror ``wanted`` (a :func:`mirrored_status`) exactly.

    A field or condition the delegate no longer has, still on the proxy, is a
    difference; the proxy's own ``PodScheduled`` is not.
    """
    return _comparable(proxy_status) != _comparable(wanted)


def status_fingerprint(status: Mapping[str, Any]) -> str:
    """A short digest of what :func:`status_differs` compares: equal for a delegate's status and a
    proxy's that mirrors it."""
    return hashlib.blake2b(orjson.dumps(_comparable(status), option=orjson.OPT_SORT_KEYS),
                           digest_size=8).hexdigest()


def mirror_patch(proxy: Mapping[str, Any], wanted: Mapping[str, Any]) -> JSON:
    """A merge patch for the proxy's status subresource that makes it mirror ``wanted`` exactly.

    Mirrored fields the delegate no longer has are removed, the conditions are
    replaced as a whole (the proxy's own ``PodScheduled`` kept), and the write
    is guarded by the proxy's resourceVersion: it was computed from that version.
    """
    own = [c for c in (proxy.get("status") or {}).get("conditions") or [] if c.get("type") == "PodScheduled"]
    status: JSON = {field: wanted.get(field) for field in MIRRORED_STATUS_FIELDS}  # None removes it
    status["conditions"] = own + [c for c in wanted.get("conditions") or [] if c.get("type") != "PodScheduled"]
    return {"metadata": {"resourceVersion": proxy["metadata"]["resourceVersion"]}, "status": status}


def mirror_patch_after_binding(proxy: Mapping[str, Any], wanted: Mapping[str, Any]) -> JSON:
    """A strategic merge patch of the status of a proxy this process has just bound (``proxy`` as it
    was when bound), mirroring ``wanted`` without a resourceVersion precondition.

    The binding changed the proxy's resourceVersion, which it does not return, so
    :func:`mirror_patch`'s precondition would fail once and cost a read and a
    write. This patch does not need it: conditions merge by type, so the
    ``PodScheduled`` the binding set stays whatever it is; the other conditions
    ``proxy`` had that ``wanted`` lacks are deleted by type; mirrored fields the
    delegate lacks are removed (null). The write is tied to this incarnation of
    the proxy (its uid).
    """
    wanted_conditions = [c for c in wanted.get("conditions") or [] if c.get("type") != "PodScheduled"]
    keep = {c.get("type") for c in wanted_conditions} | {"PodScheduled"}
    stale = [{"type": c.get("type"), "$patch": "delete"}
             for c in (proxy.get("status") or {}).get("conditions") or [] if c.get("type") not in keep]
    status: JSON = {field: wanted.get(field) for field in MIRRORED_STATUS_FIELDS}
    status["conditions"] = wanted_conditions + stale
    return {"metadata": {"uid": (proxy.get("metadata") or {}).get("uid")}, "status": status}


def unschedulable_reason(pod: Mapping[str, Any]) -> str | None:
    """Why the pod's scheduler could not place it, or None while it is placed, pending or preempting.

    A pod for which the scheduler nominated a node is waiting for preemption
    to make room, which is not a refusal.
    """
    if pod.get("spec", {}).get("nodeName"):
        return None
    status = pod.get("status") or {}
    if status.get("nominatedNodeName"):
        return None
    for condition in status.get("conditions") or []:
        if (condition.get("type") == "PodScheduled" and condition.get("status") == "False"
                and condition.get("reason") == "Unschedulable"):
            return str(condition.get("message") or "unschedulable")
    return None


def is_gated(pod: Mapping[str, Any]) -> bool:
    """Whether the pod has scheduling gates: no scheduler considers it until they are lifted."""
    return bool((pod.get("spec") or {}).get("schedulingGates"))


def is_finished(pod: Mapping[str, Any]) -> bool:
    """Whether the pod ran to its end (Succeeded or Failed): it never runs again."""
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def _ready(pod: Mapping[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def _controller(pod: Mapping[str, Any]) -> str | None:
    return next((str(r.get("uid")) for r in (pod.get("metadata") or {}).get("ownerReferences") or []
                 if r.get("controller")), None)


def awaits_replacement(proxy: Mapping[str, Any], virtual_node: Mapping[str, Any] | None,
                       siblings: Iterable[Mapping[str, Any]], now: str) -> bool:
    """Whether a proxy being drained keeps its delegate running a little longer.

    A proxy evicted from a cordoned virtual node (``kubectl drain``) with a
    grace period keeps its delegate until its controller (Deployment,
    ReplicaSet, StatefulSet...) has a replacement Ready and every live pod of
    that controller is Ready, or until its grace period ends
    (``deletionTimestamp``, RFC 3339 like ``now``): the replacements run before
    the old delegates go. "Every live pod": two pods evicted within one second
    must not both count the first one's replacement (creation times have
    second precision), and the controller creates a replacement for each pod
    evicted, so a replacement not Ready yet is someone's. Anything else (a
    deletion by a user, a force deletion, a pod without a controller) lets it
    go at once.
    """
    meta = proxy.get("metadata") or {}
    deadline = meta.get("deletionTimestamp")
    owner = _controller(proxy)
    if not deadline or not meta.get("deletionGracePeriodSeconds") or owner is None or now >= deadline:
        return False
    if virtual_node is None or not (virtual_node.get("spec") or {}).get("unschedulable"):
        return False
    live = [s for s in siblings if _controller(s) == owner and s.get("metadata", {}).get("uid") != meta.get("uid")
            and not s.get("metadata", {}).get("deletionTimestamp")]
    replaced = any(_ready(s) and str(s.get("metadata", {}).get("creationTimestamp") or "") >= _eviction_time(meta)
                   for s in live)
    return not (replaced and all(_ready(s) for s in live))


def _eviction_time(meta: Mapping[str, Any]) -> str:
    """When the proxy was evicted: its deletionTimestamp less its grace period (second precision)."""
    deadline = datetime.strptime(str(meta["deletionTimestamp"]), "%Y-%m-%dT%H:%M:%SZ")
    return (deadline - timedelta(seconds=int(meta["deletionGracePeriodSeconds"]))).strftime("%Y-%m-%dT%H:%M:%SZ")


def stray_action(pod: Mapping[str, Any]) -> Literal["delete", "fail"] | None:
    """What a virtual node's "kubelet" does with a pod bound to it that is not a proxy (a DaemonSet's
    pod that tolerates every taint, a pod created with ``nodeName`` set): nothing can run it there.

    ``fail`` it as a kubelet fails a pod it cannot admit (its controller replaces it, a DaemonSet's
    with back-off), ``delete`` it for good once it is being deleted (no kubelet will confirm it),
    None for a proxy or a pod that ended already.
    """
    if is_proxy(pod) or (pod.get("spec") or {}).get("schedulerName") == PROXY_SCHEDULER_NAME:
        return None
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return "delete"
    return None if is_finished(pod) else "fail"


def stray_status(node: str) -> JSON:
    """The status :func:`stray_action` ``fail`` writes: Failed, saying why."""
    return {"phase": "Failed", "reason": "VirtualNode",
            "message": f"{node} is a virtual node: it runs only proxy pods (pods with the "
                       f"{ELECT_ANNOTATION} annotation in enabled namespaces), never a pod bound to it otherwise; "
                       "a DaemonSet should not select virtual nodes (affinity: type NotIn [virtual-kubelet])"}


def parent_ref(delegate: Mapping[str, Any]) -> tuple[str, str, str, str] | None:
    """(source, namespace, name, uid) of a delegate's proxy, from its labels.

    The name comes from the parent-name annotation when present: the label is
    cut to 63 characters, a pod name is not.
    """
    metadata = delegate.get("metadata", {})
    labels = metadata.get("labels") or {}
    try:
        name = (metadata.get("annotations") or {}).get(PARENT_NAME_ANNOTATION) or labels[PARENT_NAME_LABEL]
        ref = PodRef(cluster=labels[PARENT_CLUSTER_LABEL], namespace=labels[PARENT_NAMESPACE_LABEL], name=name,
                     uid=labels[PARENT_UID_LABEL])
    except (KeyError, ValidationError):  # not ours, or labels that name no pod Kubernetes could have
        return None
    return (ref.cluster, ref.namespace, ref.name, ref.uid)
