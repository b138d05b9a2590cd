"""The kubelet API calls a virtual node answers, and where each goes: pure, no I/O.

A source's API server serves ``kubectl logs``, ``exec``, ``attach`` and
``port-forward`` on a pod by calling the kubelet of the pod's node. For a
proxy pod that node is a virtual node, so the call reaches us; each call is
forwarded to the same subresource of the proxy's delegate in its target
(:func:`target_request`). This module parses the kubelet paths
(:func:`parse`), finds the delegate of a proxy (:func:`delegate_of`), says
what the caller must be allowed in the source, as the kubelet's own
authorizer does (:func:`access_review`), and maps the query.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from .constants import PROXY_SCHEDULER_NAME, target_of_virtual_node
from .models import DNS_LABEL, DNS_SUBDOMAIN
from .podspec import delegate_name

CallKind = Literal["containerLogs", "exec", "attach", "portForward"]

# kubelet query -> pod subresource query (the API server names them differently for the kubelet).
_STREAM_PARAMS = {"input": "stdin", "output": "stdout", "error": "stderr", "tty": "tty"}
_LOG_PARAMS = ("follow", "previous", "timestamps", "tailLines", "sinceSeconds", "sinceTime", "limitBytes",
               "stream")  # stream: Stdout, Stderr or All (the PodLogsQuerySplitStreams feature)
_SUBRESOURCE = {"containerLogs": "log", "exec": "exec", "attach": "attach", "portForward": "portforward"}


class KubeletCallError(ValueError):
    """The request is not a kubelet call we forward; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class KubeletCall:
    kind: CallKind
    namespace: str
    pod: str
    container: str | None  # None for portForward
    query: tuple[tuple[str, str], ...]
    uid: str | None = None  # the pod's uid, when the path names it
    method: str = "POST"  # as the API server called: GET for a WebSocket upgrade, POST for SPDY

    @property
    def streaming(self) -> bool:
        """Whether the call upgrades to a stream protocol (SPDY or WebSocket) instead of a plain response."""
        return self.kind != "containerLogs"


def parse(method: str, target: str) -> KubeletCall:
    """The kubelet call of a request line (``GET /containerLogs/ns/pod/container?follow=true``)."""
    split = urlsplit(target)
    parts = [p for p in split.path.split("/") if p]
    if not parts or parts[0] not in _SUBRESOURCE:
        raise KubeletCallError(404, f"{split.path}: a virtual node serves only containerLogs, exec, attach "
                                    "and portForward")
    kind: CallKind = parts[0]  # type: ignore[assignment]
    expected = 3 if kind == "portForward" else 4
    uid = None
    if len(parts) == expected + 1 and kind != "containerLogs":  # the form with the pod's uid
        uid = parts[3]
        parts = parts[:3] + parts[4:]
    if len(parts) != expected:
        raise KubeletCallError(400, f"{split.path}: expected /{kind}/<namespace>/<pod>"
                                    f"{'' if kind == 'portForward' else '/<container>'}")
    namespace, pod = parts[1], parts[2]
    container = parts[3] if expected == 4 else None
    if not re.match(DNS_LABEL, namespace) or not re.match(DNS_SUBDOMAIN, pod) or len(pod) > 253 or (
            container is not None and not re.match(DNS_LABEL, container)):
        raise KubeletCallError(400, f"{split.path}: namespace, pod and container must be Kubernetes names")
    if method not in ("GET", "POST") or (kind == "containerLogs" and method != "GET"):
        raise KubeletCallError(405, f"{method} is not allowed on {kind}")
    return KubeletCall(kind, namespace, pod, container, tuple(parse_qsl(split.query, keep_blank_values=True)), uid,
                       method)


@dataclass(frozen=True)
class Delegate:
    """Where a proxy's calls go: its target, its delegate's name there, its virtual node in the source."""

    target: str
    name: str
    node: str


def delegate_of(proxy: Mapping[str, Any] | None, call: KubeletCall) -> Delegate | str:
    """The delegate ``call`` goes to, or why there is none (the answer's 404 message)."""
    where = f"pod {call.namespace}/{call.pod}"
    if proxy is None:
        return f"{where} not found"
    meta, spec = proxy.get("metadata") or {}, proxy.get("spec") or {}
    if spec.get("schedulerName") != PROXY_SCHEDULER_NAME:
        return f"{where} is not a proxy pod"
    if call.uid is not None and call.uid != meta.get("uid"):
        return f"{where} is another incarnation (uid {meta.get('uid')}, not {call.uid})"
    node = spec.get("nodeName") or ""
    target = target_of_virtual_node(node)
    if target is None:
        return f"{where} has no delegate running yet"
    return Delegate(target, delegate_name(str(meta.get("name")), str(meta.get("uid"))), node)


def access_review(call: KubeletCall, node: str, user: str, groups: Sequence[str]) -> dict[str, Any]:
    """The SubjectAccessReview the kubelet's authorizer would make: ``nodes/proxy`` on the node,
    ``get`` to read logs, ``create`` to open a stream (whatever the HTTP method, as for websockets)."""
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": user, "groups": list(groups),
                     "resourceAttributes": {"verb": "create" if call.streaming else "get",
                                            "resource": "nodes", "subresource": "proxy", "name": node}}}


def target_request(call: KubeletCall, delegate: str) -> tuple[str, str]:
    """(method, path with query) of the delegate's pod subresource in its target."""
    query: list[tuple[str, str]] = []
    if call.container is not None:
        query.append(("container", call.container))
    for key, value in call.query:
        if call.kind == "containerLogs" and key in _LOG_PARAMS:
            query.append((key, value))
        elif call.kind == "containerLogs" and key == "tail":  # the kubelet's old name
            if value != "all":
                query.append(("tailLines", value))
        elif call.kind in ("exec", "attach") and key in _STREAM_PARAMS:
            query.append((_STREAM_PARAMS[key], "true" if value in ("1", "true") else "false"))
        elif call.kind == "exec" and key == "command":
            query.append((key, value))
        elif call.kind == "portForward" and key == "port":
            query.append(("ports", value))
    path = f"/api/v1/namespaces/{call.namespace}/pods/{quote(delegate)}/{_SUBRESOURCE[call.kind]}"
    # A stream keeps its method: a WebSocket upgrade is a GET (RFC 6455), which the target's API server
    # and kubelet refuse as a POST; SPDY comes as a POST.
    return ("GET" if call.kind == "containerLogs" else call.method), path + (f"?{urlencode(query)}" if query else "")
