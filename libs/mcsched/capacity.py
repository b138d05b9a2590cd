"""What a target cluster has and uses, from its node and pod caches.

``TargetView`` follows a target's informers and keeps, incrementally, the
resources requested on each node by the pods bound there, the resources
requested by the pods not bound yet (``pending``), and the set of proxies
that already have a delegate in the target. Every resource counts, extended
ones (``nvidia.com/gpu``) included. Virtual nodes (a target can also be a
source) are never candidates for delegates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .constants import PROXY_SCHEDULER_NAME, VIRTUAL_NODE_TYPE_LABEL, VIRTUAL_NODE_TYPE_VALUE
from .kube import JSON, Informer
from .placement import Resources, node_allocatable, pod_requests
from .podspec import delegate_name, parent_ref

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
        pods.add_handler(self._on_pod)

    @property
    def ready(self) -> bool:
        return self.nodes.synced.is_set() and self.pods.synced.is_set() and self.nodes.healthy and self.pods.healthy

    def real_nodes(self) -> list[JSON]:
        return [n for n in self.nodes.items() if not is_virtual_node(n)]

    def _on_pod(self, kind: str, pod: JSON, _old: JSON | None) -> None:
        uid = pod["metadata"]["uid"]
        previous = self._pod_usage.pop(uid, None)
        if previous is not None:
            node, requests = previous
            if node:
                self.usage[node] = self.usage.get(node, Resources()) - requests
            else:
                self.pending = self.pending - requests
        spec = pod.get("spec") or {}
        node_name: str = spec.get("nodeName") or ""
        live = kind != "DELETED" and (pod.get("status") or {}).get("phase") not in _TERMINAL
        # An unbound proxy (the target is also a source) waits for a target, not for this cluster's nodes.
        if live and (node_name or spec.get("schedulerName") != PROXY_SCHEDULER_NAME):
            requests = pod_requests(pod)
            self._pod_usage[uid] = (node_name, requests)
            if node_name:
                self.usage[node_name] = self.usage.get(node_name, Resources()) + requests
            else:
                self.pending = self.pending + requests
        parent = parent_ref(pod)
        # Only the delegate itself, named after its proxy: a copy carrying its labels is not it.
        if parent is not None and pod["metadata"]["name"] == delegate_name(parent[2], parent[3]):
            if kind == "DELETED":
                current = self.delegates.get(parent[3])
                if current is not None and current["metadata"]["uid"] == uid:
                    del self.delegates[parent[3]]
            else:
                self.delegates[parent[3]] = pod

    def totals(self) -> tuple[Resources, Resources]:
        """(allocatable, used) summed over the target's real, schedulable nodes, every resource included."""
        allocatable, used = Resources(), Resources()
        for node in self.real_nodes():
            if node.get("spec", {}).get("unschedulable"):
                continue
            allocatable = allocatable + node_allocatable(node)
            used = used + self.usage.get(node["metadata"]["name"], Resources())
        return allocatable, used

    def common_labels(self) -> dict[str, str]:
        """Labels every real node of the target carries with the same value."""
        nodes = self.real_nodes()
        if not nodes:
            return {}
        common = dict(nodes[0]["metadata"].get("labels") or {})
        for node in nodes[1:]:
            labels = node["metadata"].get("labels") or {}
            common = {k: v for k, v in common.items() if labels.get(k) == v}
        return common
