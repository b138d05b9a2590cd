"""An in-memory Kubernetes API server for one cluster, and watch-fed caches of it.

:class:`FakeCluster` *is* a :class:`~mcsched.kube.KubeClient`: the services'
calls (``get``, ``create``, ``delete``, ``merge_patch``, ``strategic_patch``,
``apply``, ``request("PUT", ...)``) go through the real client methods down
to :meth:`FakeCluster.request`, which answers them as an API server would,
from a dict of objects, never from the network. What it models, and only that:

* paths ``/api/v1/...`` and ``/apis/<group>/<version>/...``, cluster-scoped and
  namespaced; a namespaced write in a namespace that does not exist is 404;
* uids assigned on create (deterministic per cluster), resourceVersions that
  grow across the whole cluster (like etcd revisions), creationTimestamp;
* create: 409 AlreadyExists; a pod's status is reset to ``Pending`` and its
  ``schedulerName`` defaulted, as the API server does; a new namespace gets its
  ``default`` ServiceAccount at once (the controller-manager's job, modelled);
* update (PUT) and every patch: ``metadata.resourceVersion`` (and ``uid``) in the
  body is a precondition (409 Conflict); a patch that changes nothing writes
  nothing (no new resourceVersion, no event); the ``status`` subresource
  changes only the status, the main resource never does (pods, nodes,
  namespaces); a pod's spec cannot change (422) except through its binding;
  an immutable ConfigMap/Secret's data and a Secret's type cannot (422);
* merge patch (RFC 7386: objects merged, lists replaced, null deletes);
  strategic merge patch, merging lists by their Kubernetes merge key (pod and
  node ``conditions`` by ``type``, ``$patch: delete`` removing an element, ``podIPs``/``hostIPs`` by ``ip``,
  ``ownerReferences`` by ``uid``); server-side apply as create-or-merge;
* the pod ``binding`` subresource: sets ``spec.nodeName`` and
  ``PodScheduled=True``; 409 when the pod is bound already, being deleted,
  or another incarnation (``metadata.uid`` of the Binding);
* delete with ``preconditions`` (uid, resourceVersion: 409); an object with
  finalizers only gets ``deletionTimestamp`` and goes once they are removed;
  a pod bound to a node whose kubelet must confirm (a virtual node, or no
  Node object at all) with a grace period only gets ``deletionTimestamp``
  until it is deleted again with grace 0; a pod on a real Node of this cluster
  (modelled: its kubelet confirms at once), an unbound or finished pod goes at once.

Not modelled: json patches (no service sends one), watches over HTTP (caches
are fed directly, see :class:`FakeInformer`), admission, defaulting beyond the
above, RBAC, garbage collection by owner references, set-based selectors.

:meth:`FakeCluster.set_reachable` cuts the cluster off (and back): every
request then fails as a refused connection does (``ConnectionRefusedError``)
and its caches get no events (they neither sync nor stay healthy) until it
is reachable again.

Other actors (a user with kubectl, the target's kube-scheduler, a kubelet)
act through :meth:`FakeCluster.put`, :meth:`~FakeCluster.modify`,
:meth:`~FakeCluster.remove`, :meth:`~FakeCluster.bind_pod`,
:meth:`~FakeCluster.refuse_pod` and :meth:`~FakeCluster.set_pod_phase`; every
change is seen by the caches as a watch event.

:class:`FakeInformer` *is* an :class:`~mcsched.kube.Informer` whose list+watch
is replaced by the cluster's own change feed: it applies label and field
selectors (an object that stops matching is DELETED from it), calls handlers
in order from its own task, and can lag: after :meth:`FakeInformer.lag`,
events queue up until :meth:`FakeInformer.flush`.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

from kubernetes_asyncio.client import Configuration

from ..constants import VIRTUAL_NODE_TYPE_LABEL, VIRTUAL_NODE_TYPE_VALUE
from ..kube import ACCESS_REVIEWS_PATH, JSON, Informer, KubeClient, KubeError, object_key

log = logging.getLogger(__name__)

KINDS = {"pods": "Pod", "nodes": "Node", "namespaces": "Namespace", "events": "Event", "configmaps": "ConfigMap",
         "secrets": "Secret", "serviceaccounts": "ServiceAccount", "leases": "Lease", "bindings": "Binding"}
# Resources whose status is written only through their status subresource.
STATUS_SUBRESOURCE = frozenset({"pods", "nodes", "namespaces"})
# Strategic merge keys: (resource, path of the list) -> the key its items are merged by.
MERGE_KEYS: dict[tuple[str, tuple[str, ...]], str] = {
    ("pods", ("status", "conditions")): "type",
    ("pods", ("status", "podIPs")): "ip",
    ("pods", ("status", "hostIPs")): "ip",
    ("nodes", ("status", "conditions")): "type",
    ("nodes", ("status", "addresses")): "type",
}
OWNER_REFERENCES = ("metadata", "ownerReferences")
DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
DEFAULT_GRACE_SECONDS = 30
_TERMINAL = ("Succeeded", "Failed")
_UID_NAMESPACE = uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8")


def stamp(seconds: float) -> str:
    """An RFC 3339 time as the API server writes it (whole seconds)."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Location:
    """What a request path names: ``resource`` in ``namespace`` ("" if cluster-scoped), ``name``, ``sub``."""

    resource: str
    namespace: str
    name: str
    sub: str

    @property
    def key(self) -> tuple[str, str, str]:
        return self.resource, self.namespace, self.name


def locate(path: str) -> Location:
    parts = [unquote(p) for p in path.split("?")[0].strip("/").split("/")]
    if parts[:2] == ["api", "v1"]:
        rest = parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 4:
        rest = parts[3:]
    else:
        raise ValueError(f"not an API path: {path}")
    namespace = ""
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not rest or len(rest) > 3:
        raise ValueError(f"not an API path: {path}")
    return Location(rest[0], namespace, rest[1] if len(rest) > 1 else "", rest[2] if len(rest) > 2 else "")


# -- selectors ---------------------------------------------------------------------------------------


def _terms(selector: str | None) -> list[str]:
    """The comma-separated terms of a selector; commas inside a set, ``in (a,b)``, do not separate."""
    terms, depth, current = [], 0, ""
    for char in selector or "":
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    return [t.strip() for t in [*terms, current] if t.strip()]


def _requirements(selector: str | None) -> list[tuple[str, str, str | frozenset[str] | None]]:
    """(key, operator, value) of a selector; operators "=", "!=", "exists", "!exists", and the
    set-based "in" and "notin" (whose value is the set)."""
    found: list[tuple[str, str, str | frozenset[str] | None]] = []
    for term in _terms(selector):
        words = term.split(None, 1)
        if len(words) == 2 and words[1].split("(", 1)[0].strip() in ("in", "notin"):
            op, values = words[1].split("(", 1)
            found.append((words[0], op.strip(), frozenset(v.strip() for v in values.rstrip(")").split(","))))
        elif "!=" in term:
            key, value = term.split("!=", 1)
            found.append((key.strip(), "!=", value.strip()))
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            found.append((key.strip(), "=", value.strip()))
        elif term.startswith("!"):
            found.append((term[1:].strip(), "!exists", None))
        else:
            found.append((term, "exists", None))
    return found


def labels_match(selector: str | None, obj: Mapping[str, Any]) -> bool:
    labels: Mapping[str, str] = (obj.get("metadata") or {}).get("labels") or {}
    for key, op, value in _requirements(selector):
        present = key in labels
        if (op == "exists" and not present) or (op == "!exists" and present) or \
                (op == "=" and labels.get(key) != value) or (op == "!=" and present and labels[key] == value) or \
                (op == "in" and (not present or labels[key] not in (value or ()))) or \
                (op == "notin" and present and labels[key] in (value or ())):
            return False
    return True


def field_value(obj: Mapping[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return "" if value is None else str(value)


def fields_match(selector: str | None, obj: Mapping[str, Any]) -> bool:
    for key, op, value in _requirements(selector):
        actual = field_value(obj, key)
        if (op == "=" and actual != value) or (op == "!=" and actual == value) or op in ("exists", "!exists"):
            return False
    return True


# -- patches -----------------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merged, null deletes, anything else replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any, resource: str, path: tuple[str, ...] = ()) -> Any:
    """A strategic merge patch, for the lists this fake knows a merge key of (see ``MERGE_KEYS``)."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        here = (*path, key)
        merge_key = MERGE_KEYS.get((resource, here)) or ("uid" if here == OWNER_REFERENCES else None)
        if value is None:
            result.pop(key, None)
        elif merge_key and isinstance(value, list) and isinstance(result.get(key), list):
            merged = [copy.deepcopy(item) for item in result[key]]
            for item in value:
                index = next((i for i, have in enumerate(merged)
                              if isinstance(item, Mapping) and isinstance(have, Mapping)
                              and have.get(merge_key) == item.get(merge_key)), None)
                if isinstance(item, Mapping) and item.get("$patch") == "delete":  # the directive removes it
                    if index is not None:
                        del merged[index]
                    continue
                if index is None:
                    merged.append(copy.deepcopy(item))
                else:
                    merged[index] = strategic_merge_patch(merged[index], item, resource, here)
            result[key] = merged
        else:
            result[key] = strategic_merge_patch(result.get(key), value, resource, here)
    return result


# -- the API server ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One request the cluster answered (or refused)."""

    method: str
    path: str
    content_type: str
    body: Any
    status: int = 200


@dataclass
class Fault:
    """Refuse the next ``times`` requests of ``method`` on ``path`` with ``status``."""

    method: str
    path: str
    status: int
    times: int = 1


@dataclass
class _Subscriber:
    informer: FakeInformer
    resource: str
    namespace: str


class FakeCluster(KubeClient):
    """One cluster's API server, in memory (see the module docstring for what is modelled)."""

    def __init__(self, name: str, *, namespaces: tuple[str, ...] = DEFAULT_NAMESPACES,
                 clock: Callable[[], float] = time.time, default_service_accounts: bool = True) -> None:
        super().__init__(name, Configuration())
        self.clock = clock
        self.default_service_accounts = default_service_accounts
        self.objects: dict[tuple[str, str, str], JSON] = {}
        self.calls: list[Call] = []
        self.faults: list[Fault] = []
        # Namespaces this cluster's RBAC refuses writes in (403), as a target without a Source
        # there would; SelfSubjectAccessReviews answer accordingly.
        self.forbidden_namespaces: set[str] = set()
        self.unreachable = False
        self._revision = 100
        self._uids = itertools.count(1)
        self._subscribers: list[_Subscriber] = []
        for namespace in namespaces:
            self.put("namespaces", {"metadata": {"name": namespace}})

    # -- the KubeClient surface: every call of the services ends here ------------------------------

    async def _raw(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"FakeCluster {self.name} has no network")

    async def close(self) -> None:
        """Nothing to let go (no connections)."""

    async def request(self, method: str, path: str, params: Mapping[str, Any] | None = None,
                      body: Any = None, content_type: str = "application/json") -> JSON:
        await asyncio.sleep(0)  # as over a network: other tasks run while a request is on its way
        if self.unreachable:
            raise ConnectionRefusedError(f"{self.name}: connection refused")
        body = copy.deepcopy(body)
        try:
            for fault in self.faults:
                if fault.times > 0 and fault.method == method and fault.path == path:
                    fault.times -= 1
                    raise self._error(method, path, fault.status, "InternalError", "injected fault")
            answer = self._answer(method, path, dict(params or {}), body, content_type)
        except KubeError as exc:
            self.calls.append(Call(method, path, content_type, body, exc.status))
            raise
        self.calls.append(Call(method, path, content_type, body))
        return answer

    def _answer(self, method: str, path: str, params: dict[str, Any], body: Any, content_type: str) -> JSON:
        if method == "POST" and path == ACCESS_REVIEWS_PATH:
            attributes = (body.get("spec") or {}).get("resourceAttributes") or {}
            allowed = attributes.get("namespace") not in self.forbidden_namespaces
            return {**body, "status": {"allowed": allowed}}
        try:
            where = locate(path)
        except ValueError as exc:
            raise self._error(method, path, 404, "NotFound", str(exc)) from None
        if method == "GET":
            return self._get(method, path, where, params)
        if method in ("POST", "PUT", "PATCH", "DELETE") and where.namespace in self.forbidden_namespaces:
            raise self._error(method, path, 403, "Forbidden",
                              f'{where.resource} is forbidden: cannot {method} in the namespace "{where.namespace}"')
        if method == "POST":
            if where.resource == "pods" and where.name and where.sub == "binding":
                return self._bind(method, path, where, body)
            return self._create(method, path, where, body)
        if method == "PUT":
            return self._update(method, path, where, body)
        if method == "DELETE":
            return self._delete(method, path, where, body or {})
        if method == "PATCH":
            if content_type == "application/merge-patch+json":
                return self._patch(method, path, where, body, strategic=False)
            if content_type == "application/strategic-merge-patch+json":
                return self._patch(method, path, where, body, strategic=True)
            if content_type == "application/apply-patch+yaml":
                return self._apply(method, path, where, body)
            raise self._error(method, path, 415, "UnsupportedMediaType", f"{content_type} is not modelled")
        raise self._error(method, path, 405, "MethodNotAllowed", method)

    # -- what the services see ------------------------------------------------------------------------

    def _error(self, method: str, path: str, status: int, reason: str, message: str) -> KubeError:
        body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                "reason": reason, "code": status}
        return KubeError(self.name, method, path, status, json.dumps(body))

    def _current(self, method: str, path: str, where: Location) -> JSON:
        obj = self.objects.get(where.key)
        if obj is None or not where.name:
            raise self._error(method, path, 404, "NotFound", f'{where.resource} "{where.name}" not found')
        return obj

    def _get(self, method: str, path: str, where: Location, params: Mapping[str, Any]) -> JSON:
        if where.name:
            return copy.deepcopy(self._current(method, path, where))
        items = [copy.deepcopy(o) for (resource, namespace, _), o in sorted(self.objects.items())
                 if resource == where.resource and (not where.namespace or namespace == where.namespace)
                 and labels_match(params.get("labelSelector"), o) and fields_match(params.get("fieldSelector"), o)]
        return {"apiVersion": "v1", "kind": f"{KINDS.get(where.resource, where.resource)}List",
                "metadata": {"resourceVersion": str(self._revision)}, "items": items}

    def _check_namespace(self, method: str, path: str, namespace: str) -> None:
        if namespace and ("namespaces", "", namespace) not in self.objects:
            raise self._error(method, path, 404, "NotFound", f'namespaces "{namespace}" not found')

    def _create(self, method: str, path: str, where: Location, body: JSON) -> JSON:
        if where.name or not isinstance(body, dict):
            raise self._error(method, path, 405, "MethodNotAllowed", "create on a collection only")
        meta = body.setdefault("metadata", {})
        if meta.get("resourceVersion") or meta.get("uid"):
            raise self._error(method, path, 400, "BadRequest", "resourceVersion and uid must not be set on create")
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid5(_UID_NAMESPACE, str(next(self._uids))).hex[:5]
        if not meta.get("name"):
            raise self._error(method, path, 422, "Invalid", "metadata.name: Required value")
        if meta.get("namespace", where.namespace) != where.namespace:
            raise self._error(method, path, 400, "BadRequest", "the namespace of the object does not match the path")
        self._check_namespace(method, path, where.namespace)
        if where.namespace:
            meta["namespace"] = where.namespace
        key = (where.resource, where.namespace, meta["name"])
        if key in self.objects:
            raise self._error(method, path, 409, "AlreadyExists", f'{where.resource} "{meta["name"]}" already exists')
        return copy.deepcopy(self._add(where.resource, body))

    def _add(self, resource: str, obj: JSON, *, keep_status: bool = False) -> JSON:
        """Store a new object as the API server would on create (uid, timestamps, defaults).

        The status a client sends is dropped (``keep_status``: an actor's, kept).
        """
        meta = obj.setdefault("metadata", {})
        meta.pop("resourceVersion", None)
        meta["uid"] = str(uuid.uuid5(_UID_NAMESPACE, f"{self.name}/{next(self._uids)}"))
        meta["creationTimestamp"] = stamp(self.clock())
        obj.setdefault("apiVersion", "v1")
        obj.setdefault("kind", KINDS.get(resource, resource))
        if resource == "pods":
            obj.setdefault("spec", {}).setdefault("schedulerName", "default-scheduler")
            if not keep_status or not obj.get("status"):
                obj["status"] = {"phase": "Pending"}
        elif resource == "namespaces" and (not keep_status or not obj.get("status")):
            obj["status"] = {"phase": "Active"}
        stored = self._save((resource, str(meta.get("namespace") or ""), meta["name"]), obj, "ADDED")
        if resource == "namespaces" and self.default_service_accounts:
            self._add("serviceaccounts", {"metadata": {"name": "default", "namespace": meta["name"]}})
        return stored

    def _preconditions(self, method: str, path: str, current: JSON, wanted: Mapping[str, Any]) -> None:
        for field_name in ("uid", "resourceVersion"):
            value = wanted.get(field_name)
            if value is not None and value != current["metadata"].get(field_name):
                raise self._error(method, path, 409, "Conflict",
                                  f"Operation cannot be fulfilled on {current['kind'].lower()}s "
                                  f'"{current["metadata"]["name"]}": precondition on {field_name} failed '
                                  f"({value} != {current['metadata'].get(field_name)})")

    def _validate(self, method: str, path: str, resource: str, current: JSON, new: JSON) -> None:
        if resource == "pods" and new.get("spec") != current.get("spec"):
            raise self._error(method, path, 422, "Invalid", "pod updates may not change the spec")
        if resource in ("configmaps", "secrets") and current.get("immutable"):
            if any(new.get(f) != current.get(f) for f in ("data", "binaryData", "immutable")):
                raise self._error(method, path, 422, "Invalid", "field is immutable when `immutable` is set")
        if resource == "secrets" and (new.get("type") or "Opaque") != (current.get("type") or "Opaque"):
            raise self._error(method, path, 422, "Invalid", "type: field is immutable")

    def _write(self, method: str, path: str, where: Location, current: JSON, new: JSON) -> JSON:
        """Store ``new`` in place of ``current`` (identity kept); nothing is written when nothing changed."""
        if where.resource in STATUS_SUBRESOURCE:  # the status only through its subresource, and only it there
            if where.sub == "status":
                new = {**copy.deepcopy(current), "status": new.get("status")}
            else:
                new = {**new, "status": copy.deepcopy(current.get("status"))}
            if new["status"] is None:
                del new["status"]
        meta = new.setdefault("metadata", {})
        for field_name in ("uid", "name", "namespace", "creationTimestamp", "deletionTimestamp",
                           "deletionGracePeriodSeconds"):
            if field_name in current["metadata"]:
                meta[field_name] = current["metadata"][field_name]
            else:
                meta.pop(field_name, None)
        meta["resourceVersion"] = current["metadata"]["resourceVersion"]
        new.setdefault("apiVersion", current.get("apiVersion"))
        new.setdefault("kind", current.get("kind"))
        self._validate(method, path, where.resource, current, new)
        if new == current:
            return copy.deepcopy(current)
        stored = self._save(where.key, new, "MODIFIED")
        self._collect(where.key)
        return copy.deepcopy(stored)

    def _update(self, method: str, path: str, where: Location, body: JSON) -> JSON:
        current = self._current(method, path, where)
        self._preconditions(method, path, current, body.get("metadata") or {})
        return self._write(method, path, where, current, body)

    def _patch(self, method: str, path: str, where: Location, patch: JSON, *, strategic: bool) -> JSON:
        current = self._current(method, path, where)
        self._preconditions(method, path, current, patch.get("metadata") or {})
        new = strategic_merge_patch(current, patch, where.resource) if strategic else merge_patch(current, patch)
        return self._write(method, path, where, current, new)

    def _apply(self, method: str, path: str, where: Location, body: JSON) -> JSON:
        current = self.objects.get(where.key)
        if current is None:
            body.setdefault("metadata", {})["name"] = where.name
            return self._create(method, path, Location(where.resource, where.namespace, "", ""), body)
        self._preconditions(method, path, current, body.get("metadata") or {})
        return self._write(method, path, where, current, merge_patch(current, body))

    def _bind(self, method: str, path: str, where: Location, binding: JSON) -> JSON:
        pod = self._current(method, path, Location("pods", where.namespace, where.name, ""))
        meta = binding.get("metadata") or {}  # the API server honours both, as preconditions
        self._preconditions(method, path, pod, {"uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion")})
        name = pod["metadata"]["name"]
        if pod["metadata"].get("deletionTimestamp"):
            raise self._error(method, path, 409, "Conflict",
                              f"pod {name} is being deleted, cannot be assigned to a host")
        if pod["spec"].get("nodeName"):
            raise self._error(method, path, 409, "Conflict",
                              f"pod {name} is already assigned to node \"{pod['spec']['nodeName']}\"")
        new = copy.deepcopy(pod)
        new["spec"]["nodeName"] = binding["target"]["name"]
        _set_condition(new, {"type": "PodScheduled", "status": "True", "lastProbeTime": None,
                             "lastTransitionTime": stamp(self.clock())})
        self._save(where.key, new, "MODIFIED")
        return {"apiVersion": "v1", "kind": "Status", "status": "Success", "code": 201}

    def _delete(self, method: str, path: str, where: Location, options: JSON) -> JSON:
        current = self._current(method, path, where)
        self._preconditions(method, path, current, options.get("preconditions") or {})
        new = copy.deepcopy(current)
        meta = new["metadata"]
        grace = 0
        if where.resource == "pods":
            requested = options.get("gracePeriodSeconds")
            grace = int(requested if requested is not None else
                        new["spec"].get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS))
            if not new["spec"].get("nodeName") or (new.get("status") or {}).get("phase") in _TERMINAL:
                grace = 0
        if meta.get("deletionTimestamp"):
            if where.resource != "pods" or grace != 0 or meta.get("deletionGracePeriodSeconds") == 0:
                return copy.deepcopy(current)  # being deleted already
        else:
            meta["deletionTimestamp"] = stamp(self.clock())
        if where.resource == "pods":
            meta["deletionGracePeriodSeconds"] = grace
        if not meta.get("finalizers") and not self._awaits_kubelet(new):
            self._drop(where.key)
            return new
        stored = self._save(where.key, new, "MODIFIED")
        return copy.deepcopy(stored)

    # -- bookkeeping -------------------------------------------------------------------------------------

    def _awaits_kubelet(self, obj: JSON) -> bool:
        """A pod being deleted gracefully on a node whose kubelet must confirm, which no kubelet here does."""
        if obj.get("kind") != "Pod" or not obj["metadata"].get("deletionGracePeriodSeconds"):
            return False
        node = obj["spec"].get("nodeName")
        if not node or (obj.get("status") or {}).get("phase") in _TERMINAL:
            return False
        real = self.objects.get(("nodes", "", node))
        return real is None or labels_match(f"{VIRTUAL_NODE_TYPE_LABEL}={VIRTUAL_NODE_TYPE_VALUE}", real)

    def _collect(self, key: tuple[str, str, str]) -> None:
        """Remove an object being deleted once nothing holds it any more."""
        obj = self.objects.get(key)
        if obj is not None and obj["metadata"].get("deletionTimestamp") and not obj["metadata"].get("finalizers") \
                and not self._awaits_kubelet(obj):
            self._drop(key)

    def _save(self, key: tuple[str, str, str], obj: JSON, event: str) -> JSON:
        self._revision += 1
        obj["metadata"]["resourceVersion"] = str(self._revision)
        self.objects[key] = obj
        self._notify(key, event, obj)
        return obj

    def _drop(self, key: tuple[str, str, str]) -> None:
        obj = self.objects.pop(key)
        self._revision += 1
        obj["metadata"]["resourceVersion"] = str(self._revision)
        self._notify(key, "DELETED", obj)

    def _notify(self, key: tuple[str, str, str], event: str, obj: JSON) -> None:
        for subscriber in self._subscribers:
            if subscriber.resource == key[0] and subscriber.namespace in ("", key[1]):
                subscriber.informer.observe(event, copy.deepcopy(obj))

    def subscribe(self, informer: FakeInformer, resource: str, namespace: str) -> list[JSON]:
        """Feed ``informer`` every later change of ``resource``; returns what there is now."""
        self._subscribers.append(_Subscriber(informer, resource, namespace))
        return [copy.deepcopy(o) for (r, ns, _), o in sorted(self.objects.items())
                if r == resource and namespace in ("", ns)]

    def set_reachable(self, reachable: bool) -> None:
        """Cut the cluster off from every client and cache (False), or bring it back (True)."""
        self.unreachable = not reachable
        for subscriber in self._subscribers:
            subscriber.informer.healthy = reachable and subscriber.informer.synced.is_set()
            subscriber.informer._wakeup.set()

    def unsubscribe(self, informer: FakeInformer) -> None:
        self._subscribers = [s for s in self._subscribers if s.informer is not informer]

    @property
    def revision(self) -> int:
        """The cluster's current resourceVersion."""
        return self._revision

    # -- tests and other actors --------------------------------------------------------------------------

    def find(self, resource: str, namespace: str, name: str) -> JSON | None:
        obj = self.objects.get((resource, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def pod(self, namespace: str, name: str) -> JSON | None:
        return self.find("pods", namespace, name)

    def select(self, resource: str, namespace: str | None = None, label_selector: str | None = None) -> list[JSON]:
        return [copy.deepcopy(o) for (r, ns, _), o in sorted(self.objects.items())
                if r == resource and namespace in (None, ns) and labels_match(label_selector, o)]

    def writes(self) -> list[Call]:
        """Every request but reads, refused ones included."""
        return [c for c in self.calls if c.method != "GET"]

    def events_about(self, uid: str) -> list[JSON]:
        return [e for e in self.select("events") if e.get("involvedObject", {}).get("uid") == uid]

    def fail(self, method: str, path: str, status: int = 500, times: int = 1) -> None:
        """Refuse the next ``times`` ``method`` requests on ``path`` (a fault of the API server)."""
        self.faults.append(Fault(method, path, status, times))

    def put(self, resource: str, obj: JSON) -> JSON:
        """Create or replace ``obj`` as an actor with every right would (status and spec included)."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        key = (resource, str(meta.get("namespace") or ""), meta["name"])
        current = self.objects.get(key)
        if current is None:
            if key[1] and ("namespaces", "", key[1]) not in self.objects:
                raise ValueError(f"{self.name}: namespace {key[1]} does not exist")
            return copy.deepcopy(self._add(resource, obj, keep_status=True))
        for field_name in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds"):
            if field_name in current["metadata"]:
                meta[field_name] = current["metadata"][field_name]
        obj.setdefault("apiVersion", current.get("apiVersion"))
        obj.setdefault("kind", current.get("kind"))
        stored = self._save(key, obj, "MODIFIED")
        self._collect(key)
        return copy.deepcopy(stored)

    def modify(self, resource: str, namespace: str, name: str, change: Callable[[JSON], None]) -> JSON:
        """Change an object in place (``change`` edits a copy), as its controller or kubelet would."""
        obj = self.objects.get((resource, namespace, name))
        if obj is None:
            raise KeyError(f"{self.name}: no {resource} {namespace}/{name}")
        new = copy.deepcopy(obj)
        change(new)
        return self.put(resource, new)

    def remove(self, resource: str, namespace: str, name: str) -> None:
        """The object is gone at once (``kubectl delete --force --grace-period=0``, finalizers aside)."""
        self._drop((resource, namespace, name))

    def bind_pod(self, namespace: str, name: str, node: str) -> JSON:
        """What a scheduler does once it placed a pod (the binding subresource)."""
        self._bind("POST", f"/api/v1/namespaces/{namespace}/pods/{name}/binding",
                   Location("pods", namespace, name, "binding"),
                   {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name, "namespace": namespace},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": node}})
        return self.find("pods", namespace, name) or {}

    def refuse_pod(self, namespace: str, name: str, message: str, *, nominated_node: str | None = None) -> JSON:
        """What kube-scheduler writes on a pod it cannot place (``nominated_node``: preemption under way)."""
        def change(pod: JSON) -> None:
            _set_condition(pod, {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                 "message": message, "lastProbeTime": None,
                                 "lastTransitionTime": stamp(self.clock())})
            if nominated_node:
                pod["status"]["nominatedNodeName"] = nominated_node

        return self.modify("pods", namespace, name, change)

    def set_pod_phase(self, namespace: str, name: str, phase: str, *, ready: bool | None = None,
                      pod_ip: str = "10.0.0.7") -> JSON:
        """What a kubelet writes as a pod's containers start (``Running``) or end (``Succeeded``/``Failed``)."""
        def change(pod: JSON) -> None:
            status = pod.setdefault("status", {})
            now = stamp(self.clock())
            running = phase == "Running"
            is_ready = running if ready is None else ready
            status.update({"phase": phase, "podIP": pod_ip, "podIPs": [{"ip": pod_ip}], "hostIP": "192.168.0.2",
                           "hostIPs": [{"ip": "192.168.0.2"}], "startTime": status.get("startTime") or now})
            for kind in ("Initialized", "ContainersReady", "Ready"):
                _set_condition(pod, {"type": kind, "status": "True" if is_ready or kind == "Initialized" else "False",
                                     "lastProbeTime": None, "lastTransitionTime": now})
            state: JSON = {"running": {"startedAt": now}} if running else \
                {"terminated": {"exitCode": 0 if phase == "Succeeded" else 1,
                                "reason": "Completed" if phase == "Succeeded" else "Error", "finishedAt": now}}
            status["containerStatuses"] = [{"name": c["name"], "image": c.get("image", ""), "ready": is_ready,
                                            "restartCount": 0, "started": running, "state": state}
                                           for c in pod["spec"].get("containers") or []]

        return self.modify("pods", namespace, name, change)


def _set_condition(pod: JSON, condition: JSON) -> None:
    status = pod.setdefault("status", {})
    others = [c for c in status.get("conditions") or [] if c.get("type") != condition["type"]]
    status["conditions"] = [*others, condition]


# -- caches -------------------------------------------------------------------------------------------------

_SYNCED = "SYNCED"


class FakeInformer(Informer):
    """An :class:`~mcsched.kube.Informer` fed by a :class:`FakeCluster`'s changes instead of a watch.

    Handlers are called as the real informer calls them (in order, awaited,
    from the informer's own task; a failing handler is logged and recorded in
    ``errors``). The first events are the objects there when :meth:`start`
    ran, then ``synced`` is set. After :meth:`lag` the events wait until
    :meth:`flush` (all, or some of them): a cache that lags behind its API server.
    """

    def __init__(self, client: FakeCluster, path: str, *, label_selector: str | None = None,
                 field_selector: str | None = None, name: str = "") -> None:
        super().__init__(client, path, label_selector=label_selector, field_selector=field_selector, name=name)
        self.cluster = client
        where = locate(path)
        self.resource, self.namespace = where.resource, where.namespace
        self.label_selector, self.field_selector = label_selector, field_selector
        self.lagging = False
        self.errors: list[BaseException] = []
        self._queue: deque[tuple[str, JSON]] = deque()
        self._wakeup = asyncio.Event()
        self._lock = asyncio.Lock()
        self._busy = False

    def start(self) -> None:
        for obj in self.cluster.subscribe(self, self.resource, self.namespace):
            self._queue.append(("ADDED", obj))
        self._queue.append((_SYNCED, {}))
        self._wakeup.set()
        self._task = asyncio.create_task(self._run(), name=f"informer {self.name}")

    async def stop(self) -> None:
        self.cluster.unsubscribe(self)
        await super().stop()

    def observe(self, event: str, obj: JSON) -> None:
        """A change in the cluster (called by it)."""
        self._queue.append((event, obj))
        self._wakeup.set()

    # -- lag ------------------------------------------------------------------------------------------

    def lag(self) -> None:
        """Hold every later event back until :meth:`flush`."""
        self.lagging = True

    async def flush(self, count: int | None = None) -> None:
        """Deliver the events held back: ``count`` of them (still lagging after), or all (lagging no more)."""
        if count is None:
            self.lagging = False
        await self._deliver(count)

    @property
    def pending(self) -> int:
        """Events not delivered yet."""
        return len(self._queue)

    @property
    def idle(self) -> bool:
        """Nothing being delivered, nothing deliverable waiting."""
        return not self._busy and (self.lagging or self.cluster.unreachable or not self._queue)

    # -- delivery -------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self._deliver(None)

    async def _deliver(self, count: int | None) -> None:
        async with self._lock:
            delivered = 0
            while self._queue and not self.cluster.unreachable and \
                    (delivered < count if count is not None else not self.lagging):
                event, obj = self._queue.popleft()
                self._busy = True
                try:
                    await self._apply(event, obj)
                finally:
                    self._busy = False
                delivered += 1

    async def _apply(self, event: str, obj: JSON) -> None:
        if event == _SYNCED:
            self.synced.set()
            self.healthy = True
            return
        key = object_key(obj)
        old = self.store.get(key)
        if event != "DELETED" and not (labels_match(self.label_selector, obj)
                                       and fields_match(self.field_selector, obj)):
            event = "DELETED"  # no longer selected: a watch with a selector says so
        if event == "DELETED":
            if old is None:
                return
            del self.store[key]
        else:
            event = "MODIFIED" if old is not None else "ADDED"
            self.store[key] = obj
        await self._dispatch(event, obj, old)

    def _handler_failed(self, exc: Exception, kind: str, obj: JSON) -> None:
        self.errors.append(exc)  # a test fails on any of them
        super()._handler_failed(exc, kind, obj)
