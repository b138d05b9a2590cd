"""Unit tests for mcsched.capacity.TargetView, fed by a fake informer (no cluster)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from mcsched.capacity import TargetView, common_labels
from mcsched.kube import JSON, Handler, Informer
from mcsched.placement import Resources
from mcsched.podspec import delegate_name

GI = 1024**3
GPU = "nvidia.com/gpu"


class FakeInformer:
    """What TargetView uses of an Informer: a store, handlers, ``synced`` and ``healthy``."""

    def __init__(self, objects: list[JSON] | None = None) -> None:
        self.store: dict[str, JSON] = {o["metadata"]["name"]: o for o in objects or []}
        self.handlers: list[Handler] = []
        self.synced = asyncio.Event()
        self.healthy = True

    def add_handler(self, handler: Handler) -> None:
        self.handlers.append(handler)

    def items(self) -> list[JSON]:
        return list(self.store.values())

    def emit(self, kind: str, obj: JSON) -> None:
        """Store the object and call the handlers, as Informer does for a watch event."""
        key = obj["metadata"]["name"]
        old = self.store.get(key)
        if kind == "DELETED":
            self.store.pop(key, None)
        else:
            self.store[key] = obj
        for handler in self.handlers:
            result = handler(kind, obj, old)
            assert result is None  # TargetView's handler is synchronous


def node(name: str, cpu: str = "4", *, gpus: str | None = None, unschedulable: bool = False,
         virtual: bool = False) -> JSON:
    allocatable = {"cpu": cpu, "memory": "16Gi", "pods": "110"}
    if gpus is not None:
        allocatable[GPU] = gpus
    labels = {"type": "virtual-kubelet"} if virtual else {"type": "kwok"}
    return {"metadata": {"name": name, "labels": labels}, "spec": {"unschedulable": unschedulable},
            "status": {"capacity": dict(allocatable), "allocatable": allocatable}}


def pod(name: str, *, node_name: str | None = None, cpu: str = "500m", gpus: str | None = None,
        phase: str = "Pending", scheduler: str | None = None, parent_uid: str | None = None) -> JSON:
    resources: dict[str, Any] = {"requests": {"cpu": cpu, "memory": "1Gi"}}
    if gpus is not None:
        resources["limits"] = {GPU: gpus}
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": "busybox", "resources": resources}]}
    if node_name:
        spec["nodeName"] = node_name
    if scheduler:
        spec["schedulerName"] = scheduler
    labels: dict[str, str] = {}
    if parent_uid:  # a delegate: named after its proxy ``name``
        labels.update({"multicluster.admiralty.io/parent-cluster": "c1",
                       "multicluster.admiralty.io/parent-namespace": "default",
                       "multicluster.admiralty.io/parent-name": name,
                       "multicluster.admiralty.io/parent-uid": parent_uid})
        name = delegate_name(name, parent_uid)
    return {"metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}", "labels": labels},
            "spec": spec, "status": {"phase": phase}}


def view(nodes: list[JSON]) -> tuple[TargetView, FakeInformer]:
    pods = FakeInformer()
    return TargetView("c2", cast(Informer, FakeInformer(nodes)), cast(Informer, pods)), pods


def request(cpu_milli: int, gpus: int = 0, count: int = 1) -> Resources:
    return Resources(cpu_milli, count * GI, count, ((GPU, gpus),))


# ---------------------------------------------------------------------------
# totals and usage
# ---------------------------------------------------------------------------


def test_totals_sum_extended_resources_over_real_schedulable_nodes() -> None:
    target, _ = view([
        node("w0"), node("w1"), node("w2", gpus="2"),
        node("cordoned", gpus="4", unschedulable=True),
        node("admiralty-c1", cpu="100", gpus="8", virtual=True),
    ])
    allocatable, used = target.totals()
    assert allocatable == Resources(12000, 48 * GI, 330, ((GPU, 2),))
    assert allocatable.to_dict() == {"cpu": "12000m", "memory": str(48 * GI), "pods": "330", GPU: "2"}
    assert used == Resources()


def test_totals_without_any_extended_resource_keep_the_plain_resource_list() -> None:
    target, _ = view([node("w0"), node("w1")])
    assert target.totals()[0].to_dict() == {"cpu": "8000m", "memory": str(32 * GI), "pods": "220"}


def test_usage_counts_extended_requests_of_bound_pods() -> None:
    target, pods = view([node("w0"), node("w2", gpus="2")])
    pods.emit("ADDED", pod("a", node_name="w2", gpus="1", phase="Running"))
    pods.emit("ADDED", pod("b", node_name="w2", gpus="1", phase="Running"))
    pods.emit("ADDED", pod("c", node_name="w0", phase="Running"))
    assert target.usage["w2"] == request(1000, gpus=2, count=2)
    assert target.usage["w0"] == request(500)
    assert target.totals()[1] == request(1500, gpus=2, count=3)
    pods.emit("MODIFIED", pod("a", node_name="w2", gpus="1", phase="Succeeded"))
    assert target.usage["w2"] == request(500, gpus=1)
    pods.emit("DELETED", pod("b", node_name="w2", gpus="1", phase="Running"))
    assert "w2" not in target.usage  # nothing left there: no entry kept (nodes come and go)
    assert target.pending == Resources()


def test_totals_kept_up_to_date_by_events_equal_totals_computed_afresh() -> None:
    """totals() is computed once per node change and then follows pod events: it must always equal
    the sum over the nodes as they are (a cordoned node's pods not counted, a node added counted)."""
    nodes = FakeInformer([node("w0"), node("w1"), node("w2", gpus="2")])
    pods = FakeInformer()
    target = TargetView("c2", cast(Informer, nodes), cast(Informer, pods))

    def afresh() -> tuple[Resources, Resources]:
        return TargetView("c2", cast(Informer, FakeInformer(nodes.items())), cast(Informer, FakeInformer()))\
            .totals()[0], sum((target.usage.get(n["metadata"]["name"], Resources()) for n in nodes.items()
                               if not n["spec"].get("unschedulable")), Resources())

    steps = [
        lambda: pods.emit("ADDED", pod("a", node_name="w0", phase="Running")),
        lambda: pods.emit("ADDED", pod("b")),  # pending: not in "used"
        lambda: pods.emit("MODIFIED", pod("b", node_name="w2", gpus="1", phase="Running")),
        lambda: nodes.emit("MODIFIED", node("w2", gpus="2", unschedulable=True)),  # cordoned: its pods leave
        lambda: pods.emit("ADDED", pod("c", node_name="w2", phase="Running")),
        lambda: nodes.emit("ADDED", node("w3", cpu="8")),
        lambda: pods.emit("ADDED", pod("d", node_name="w3", cpu="2", phase="Running")),
        lambda: pods.emit("MODIFIED", pod("a", node_name="w0", phase="Succeeded")),
        lambda: pods.emit("DELETED", pod("d", node_name="w3", cpu="2", phase="Running")),
        lambda: nodes.emit("MODIFIED", node("w2", gpus="2")),  # uncordoned
    ]
    for step in steps:
        target.totals()  # read between events, as estimates do
        step()
        assert target.totals() == afresh()


# ---------------------------------------------------------------------------
# pending: requests of pods not bound to a node yet
# ---------------------------------------------------------------------------


def test_pending_counts_unbound_pods_and_moves_to_usage_on_bind() -> None:
    target, pods = view([node("w2", gpus="2")])
    assert target.pending == Resources()
    pods.emit("ADDED", pod("a", gpus="1", parent_uid="p-a"))
    pods.emit("ADDED", pod("b", cpu="1"))
    assert target.pending == Resources(1500, 2 * GI, 2, ((GPU, 1),))
    # A status change of a still unbound pod is not counted twice.
    pods.emit("MODIFIED", pod("a", gpus="1", parent_uid="p-a"))
    pods.emit("MODIFIED", pod("a", gpus="1", parent_uid="p-a"))
    assert target.pending == Resources(1500, 2 * GI, 2, ((GPU, 1),))
    # Bound by the target's scheduler: it leaves pending and uses room on its node.
    pods.emit("MODIFIED", pod("a", node_name="w2", gpus="1", parent_uid="p-a"))
    assert target.pending == request(1000)
    assert target.usage["w2"] == request(500, gpus=1)
    assert target.delegates["p-a"]["spec"]["nodeName"] == "w2"
    pods.emit("MODIFIED", pod("a", node_name="w2", gpus="1", phase="Running", parent_uid="p-a"))
    assert target.usage["w2"] == request(500, gpus=1)
    assert target.pending == request(1000)


def test_pending_forgets_deleted_and_terminal_pods() -> None:
    target, pods = view([node("w0")])
    pods.emit("ADDED", pod("a", gpus="1"))
    pods.emit("ADDED", pod("b"))
    pods.emit("ADDED", pod("c"))
    pods.emit("DELETED", pod("a", gpus="1"))
    assert target.pending == request(1000, count=2)
    pods.emit("MODIFIED", pod("b", phase="Failed"))  # e.g. refused by an admission plugin on the node
    assert target.pending == request(500)
    pods.emit("DELETED", pod("b", phase="Failed"))  # gone after being terminal: nothing left to take back
    pods.emit("DELETED", pod("c"))
    assert target.pending == Resources()
    pods.emit("DELETED", pod("never-seen"))  # a deletion missed while listing is harmless
    assert target.pending == Resources()
    assert target.usage == {}


def test_pending_counts_a_pod_added_already_terminal_never() -> None:
    target, pods = view([node("w0")])
    pods.emit("ADDED", pod("done", phase="Succeeded"))
    pods.emit("ADDED", pod("bound-done", node_name="w0", phase="Failed"))
    assert target.pending == Resources()
    assert target.usage == {}


def test_unbound_proxy_is_not_pending_in_a_target_that_is_also_a_source() -> None:
    target, pods = view([node("w0")])
    pods.emit("ADDED", pod("proxy", scheduler="admiralty-proxy"))
    assert target.pending == Resources()
    # Bound to its virtual node, it counts there, as before (never on a real node's room).
    pods.emit("MODIFIED", pod("proxy", scheduler="admiralty-proxy", node_name="admiralty-c2"))
    assert target.usage["admiralty-c2"] == request(500)
    assert target.totals()[1] == Resources()
    assert target.pending == Resources()


def test_pending_goes_back_when_a_bound_pod_is_replaced_by_an_unbound_one_with_the_same_uid() -> None:
    # Not something the API server does (nodeName is never unset), but the book-keeping must stay exact.
    target, pods = view([node("w0")])
    pods.emit("ADDED", pod("a", node_name="w0"))
    pods.emit("MODIFIED", pod("a"))
    assert "w0" not in target.usage
    assert target.pending == request(500)


@pytest.mark.parametrize("synced", [True, False])
def test_ready_follows_both_informers(synced: bool) -> None:
    target, pods = view([node("w0")])
    nodes = cast(FakeInformer, target.nodes)
    if synced:
        nodes.synced.set()
        pods.synced.set()
    assert target.ready is synced
    pods.healthy = False
    assert target.ready is False


def test_a_pod_that_only_copies_a_delegates_labels_is_not_taken_for_it() -> None:
    target, pods = view([node("w1")])
    real = pod("a", node_name="w1", parent_uid="p-a")
    pods.emit("ADDED", real)
    copy = dict(real, metadata=dict(real["metadata"], name="a-debug", uid="uid-copy"))
    pods.emit("ADDED", copy)
    assert target.delegates["p-a"]["metadata"]["uid"] == real["metadata"]["uid"]
    pods.emit("DELETED", copy)
    assert "p-a" in target.delegates


def test_pending_leaves_out_gated_pods_and_pods_their_scheduler_found_no_room_for() -> None:
    """Neither is about to take the room an estimate looks for: a queue's gated 100-CPU job must not
    make a roomy target look full."""
    target, pods = view([node("w0")])
    gated = pod("gated", cpu="100")
    gated["spec"]["schedulingGates"] = [{"name": "kueue.x-k8s.io/admission"}]
    pods.emit("ADDED", gated)
    refused = pod("too-big", cpu="100")
    refused["status"] = {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/1 nodes are available"}]}
    pods.emit("ADDED", refused)
    assert target.pending == Resources()
    pods.emit("ADDED", pod("waiting"))
    assert target.pending == request(500)
    ungated = pod("gated", cpu="100")  # its gates lifted: now it is on its way to a node
    pods.emit("MODIFIED", ungated)
    assert target.pending == request(100_500, count=2)


def test_common_labels_wait_for_a_new_node_to_be_ready_and_initialized() -> None:
    """A node that has just joined gets its zone and region moments later (from its cloud provider): until
    then it must not take them off the virtual node, which cluster constraints and spread match."""
    def ready(n: dict[str, Any], *, taints: tuple[str, ...] = ()) -> dict[str, Any]:
        n["metadata"]["labels"]["topology.kubernetes.io/region"] = "eu"
        n["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
        n["spec"]["taints"] = [{"key": key, "effect": "NoSchedule"} for key in taints]
        return n

    settled = [ready(node("w0")), ready(node("w1"))]
    joining = node("w2")  # not Ready yet, no region
    initializing = ready(node("w3"), taints=("node.cloudprovider.kubernetes.io/uninitialized",))
    initializing["metadata"]["labels"].pop("topology.kubernetes.io/region")
    assert common_labels([*settled, joining, initializing])["topology.kubernetes.io/region"] == "eu"
    other = ready(node("w4"))
    other["metadata"]["labels"]["topology.kubernetes.io/region"] = "us"  # settled, elsewhere: not common
    assert "topology.kubernetes.io/region" not in common_labels([*settled, other])
    assert common_labels([joining]) == {"type": "kwok"}  # none settled: all of them count
