"""Names shared with Admiralty's multicluster-scheduler, and our own.

Manifests written for Admiralty (the elect annotation, the namespace label,
virtual nodes named ``admiralty-<target>``) must work unchanged, so every
name a user or another tool can see lives here.
"""

from __future__ import annotations

DOMAIN = "multicluster.admiralty.io"

# What a user writes.
ELECT_ANNOTATION = f"{DOMAIN}/elect"
NAMESPACE_LABEL = "multicluster-scheduler"
NAMESPACE_LABEL_VALUE = "enabled"
# Cluster-level constraints (mcsched.cluster_constraints): Admiralty's two annotations.
PROXY_CONSTRAINTS_ANNOTATION = f"{DOMAIN}/proxy-pod-scheduling-constraints"
USE_SPEC_CONSTRAINTS_ANNOTATION = f"{DOMAIN}/use-constraints-from-spec-for-proxy-pod-scheduling"
# A weighted split of a workload's pods across clusters ("c1=1,c2=3"), on a pod or its namespace (mcsched.spread).
CLUSTER_WEIGHTS_ANNOTATION = f"{DOMAIN}/cluster-weights"
# On a virtual node: the label keys its heartbeat set last (those it may remove when they no longer apply).
VIRTUAL_NODE_LABELS_ANNOTATION = f"{DOMAIN}/heartbeat-labels"
# Label keys (comma-separated) a delegate keeps as they are instead of moving them into our domain.
SKIP_PREFIXING_ANNOTATION = f"{DOMAIN}/label-keys-to-skip-prefixing"

# What a proxy pod carries.
PROXY_SCHEDULER_NAME = "admiralty-proxy"
SOURCE_MANIFEST_ANNOTATION = f"{DOMAIN}/sourcepod-manifest"
PROXY_FINALIZER = f"{DOMAIN}/multiclusterForegroundDeletion"
TRACE_ID_ANNOTATION = f"{DOMAIN}/trace-id"
TRACEPARENT_ANNOTATION = f"{DOMAIN}/traceparent"
# The cluster chosen for the proxy and the clusters that refused it (see mcsched.choice).
PLACEMENT_ANNOTATION = f"{DOMAIN}/placement"
# On a proxy while the placement names a cluster ("true"), written with it: the watcher watches only
# proxies without it, so the API server sends it nothing about a proxy from its choice to its binding.
CLUSTER_CHOSEN_LABEL = f"{DOMAIN}/cluster-chosen"

# What a delegate pod carries (labels, so they can be selected).
PARENT_CLUSTER_LABEL = f"{DOMAIN}/parent-cluster"
PARENT_NAMESPACE_LABEL = f"{DOMAIN}/parent-namespace"
PARENT_NAME_LABEL = f"{DOMAIN}/parent-name"
PARENT_UID_LABEL = f"{DOMAIN}/parent-uid"
# The target (cluster key) a delegate was created for: several keys may name one cluster (a Target
# per namespace), and each key's reconcilers look only at its own delegates.
DELEGATE_TARGET_LABEL = f"{DOMAIN}/for-target"
# A label value holds at most 63 characters: the parent's full name is kept in an annotation too.
PARENT_NAME_ANNOTATION = f"{DOMAIN}/parent-name"
# The placement round of the proxy (see mcsched.choice) that the candidate-scheduler read when it created the delegate.
PLACEMENT_ROUND_ANNOTATION = f"{DOMAIN}/placement-round"

# Virtual nodes: one per target in each source.
VIRTUAL_NODE_PREFIX = "admiralty-"
VIRTUAL_NODE_TAINT_KEY = "virtual-kubelet.io/provider"
VIRTUAL_NODE_TAINT_VALUE = "admiralty"
VIRTUAL_NODE_TYPE_LABEL = "type"
VIRTUAL_NODE_TYPE_VALUE = "virtual-kubelet"
VIRTUAL_NODE_TARGET_LABEL = f"{DOMAIN}/target"
CLUSTER_TARGET_NAME_LABEL = f"{DOMAIN}/cluster-target-name"  # Admiralty's name for the same label
NODE_ROLE_LABEL = "kubernetes.io/role"
NODE_LEASE_NAMESPACE = "kube-node-lease"

FIELD_MANAGER = "multicluster-scheduler"


def virtual_node_name(target: str) -> str:
    return f"{VIRTUAL_NODE_PREFIX}{target}"


def target_of_virtual_node(node_name: str | None) -> str | None:
    if node_name and node_name.startswith(VIRTUAL_NODE_PREFIX):
        return node_name[len(VIRTUAL_NODE_PREFIX):]
    return None
