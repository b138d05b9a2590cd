"""What a target cluster has and uses, from its node and pod caches.

``TargetView`` follows a target's informers and keeps, incrementally, the
resources requested on each node by the pods bound there, the resources
requested by the pods not bound yet (``pending``), and the set of proxies
that already have a delegate in the target. Every resource counts, extended
ones (``nvidia.com/gpu``) included. Virtual nodes (a target can also be a
source) are never candidates for delegates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .constants import PROXY_SCHEDULER_NAME, VIRTUAL_NODE_TYPE_LABEL, VIRTUAL_NODE_TYPE_VALUE
from .kube import JSON, Informer
from .placement import Resources, node_allocatable, node_ready, pod_requests
from .podspec import delegate_name, is_gated, parent_ref, unschedulable_reason

_TERMINAL = ("Succeeded", "Failed")


def is_virtual_node(node: Mapping[str, Any]) -> bool:
    labels = node.get("metadata", {}).get("labels") or {}
    return bool(labels.get(VIRTUAL_NODE_TYPE_LABEL) == VIRTUAL_NODE_TYPE_VALUE)


class TargetView:
    def __init__(self, name: str, nodes: Informer, pods: Informer) -> None:
        self.name = name
        self.nodes = nodes
        self.pods = pods
        self.usage: dict[str, Resources] = {}  # node -> requests of the live pods bound to it
        # Requests of the live pods not bound to a node yet (delegates the target's own
        # scheduler has still to place); ``pending.pods`` is how many there are.
        self.pending = Resources()
        self._pod_usage: dict[str, tuple[str, Resources]] = {}  # pod uid -> (node or "" if unbound, requests)
        self.delegates: dict[str, JSON] = {}  # proxy uid -> delegate pod
        # (allocatable, used) over the real schedulable nodes, and which nodes those are: computed
        # again after a node changes, kept up to date by pod events (an estimate per request reads it)
        self._totals: tuple[Resources, Resources, frozenset[str]] | None = None
        self.cursor = 0  # where the next estimate starts looking for a node that fits
        self._real_nodes: list[JSON] | None = None
        pods.add_handler(self._on_pod)
        nodes.add_handler(self._on_node)

    def _on_node(self, _kind: str, _node: JSON, _old: JSON | None) -> None:
        self._totals = None
        self._real_nodes = None

    @property
    def ready(self) -> bool:
        return self.nodes.synced.is_set() and self.pods.synced.is_set() and self.nodes.healthy and self.pods.healthy

    def real_nodes(self) -> list[JSON]:
        if self._real_nodes is None:
            self._real_nodes = real_nodes(self.nodes.items())
        return self._real_nodes

    def _on_pod(self, kind: str, pod: JSON, _old: JSON | None) -> None:
        uid = pod["metadata"]["uid"]
        previous = self._pod_usage.pop(uid, None)
        if previous is not None:
            node, requests = previous
            if node:
                left = self.usage.get(node, Resources()) - requests
                if left == Resources():
                    self.usage.pop(node, None)  # nothing there: no entry (nodes come and go)
                else:
                    self.usage[node] = left
                self._count_used(node, requests, -1)
            else:
                self.pending = self.pending - requests
        spec = pod.get("spec") or {}
        node_name: str = spec.get("nodeName") or ""
        live = kind != "DELETED" and (pod.get("status") or {}).get("phase") not in _TERMINAL
        # An unbound proxy (the target is also a source) waits for a target, not for this cluster's nodes;
        # a gated pod waits for its gates, and one its scheduler found no room for takes none: neither
        # is about to use the room an estimate looks for.
        if live and (node_name or (spec.get("schedulerName") != PROXY_SCHEDULER_NAME and not is_gated(pod)
                                   and unschedulable_reason(pod) is None)):
            requests = pod_requests(pod)
            self._pod_usage[uid] = (node_name, requests)
            if node_name:
                self.usage[node_name] = self.usage.get(node_name, Resources()) + requests
                self._count_used(node_name, requests, 1)
            else:
                self.pending = self.pending + requests
        index_delegate(self.delegates, kind, pod)

    def _count_used(self, node: str, requests: Resources, sign: int) -> None:
        if self._totals is not None and node in self._totals[2]:
            allocatable, used, names = self._totals
            self._totals = (allocatable, used + requests if sign > 0 else used - requests, names)

    def totals(self) -> tuple[Resources, Resources]:
        """(allocatable, used) summed over the target's real, schedulable nodes, every resource included."""
        if self._totals is None:
            allocatable, used, names = Resources(), Resources(), set()
            for node in self.real_nodes():
                if node.get("spec", {}).get("unschedulable"):
                    continue
                names.add(node["metadata"]["name"])
                allocatable = allocatable + node_allocatable(node)
                used = used + self.usage.get(node["metadata"]["name"], Resources())
            self._totals = (allocatable, used, frozenset(names))
        return self._totals[0], self._totals[1]

    def common_labels(self) -> dict[str, str]:
        """Labels every real node of the target carries with the same value."""
        return common_labels(self.real_nodes())


def index_delegate(delegates: dict[str, JSON], kind: str, pod: JSON) -> None:
    """Keep ``delegates`` (proxy uid -> delegate) up to date with a watch event of a target's pod."""
    parent = parent_ref(pod)
    # Only the delegate itself, named after its proxy: a copy carrying its labels is not it.
    if parent is None or pod["metadata"]["name"] != delegate_name(parent[2], parent[3]):
        return
    if kind == "DELETED":
        current = delegates.get(parent[3])
        if current is not None and current["metadata"]["uid"] == pod["metadata"]["uid"]:
            del delegates[parent[3]]
    else:
        delegates[parent[3]] = pod


def real_nodes(nodes: Iterable[JSON]) -> list[JSON]:
    return [n for n in nodes if not is_virtual_node(n)]


def schedulable_allocatable(nodes: Iterable[JSON]) -> Resources:
    """Allocatable summed over the real, schedulable ``nodes``, every resource included."""
    total = Resources()
    for node in real_nodes(nodes):
        if not node.get("spec", {}).get("unschedulable"):
            total = total + node_allocatable(node)
    return total


# The taint a cloud provider's node controller keeps on a new node until it has labelled it.
UNINITIALIZED_TAINT = "node.cloudprovider.kubernetes.io/uninitialized"


def _settled(node: JSON) -> bool:
    """Ready, and initialized by its cloud provider: its labels are the ones it keeps."""
    taints = node.get("spec", {}).get("taints") or []
    return node_ready(node) and not any(t.get("key") == UNINITIALIZED_TAINT for t in taints)


def common_labels(nodes: Iterable[JSON]) -> dict[str, str]:
    """Labels every real node of ``nodes`` carries with the same value: every settled one (Ready and
    initialized; a node that has just joined gets its zone and region labels moments later), or every
    one when none is settled."""
    real = real_nodes(nodes)
    real = [n for n in real if _settled(n)] or real
    if not real:
        return {}
    common = dict(real[0]["metadata"].get("labels") or {})
    for node in real[1:]:
        labels = node["metadata"].get("labels") or {}
        common = {k: v for k, v in common.items() if labels.get(k) == v}
    return common
