"""The placement protocol across the four services, on in-memory clusters and NATS (``mcsched.testing``).

Source c1, targets c2 and c3, each with one real node. The services run as
their ``compose()`` wires them (watcher without its webhook), each on its own
:class:`FakeRuntime`; proxies are made by the admission webhook's own patch.
Nothing is delivered unless a test says so: a scenario hands messages to the
handlers one by one, or drops, duplicates and reorders them, plays the
targets' schedulers and kubelets (``bind_pod``, ``refuse_pod``,
``set_pod_phase``) and lags caches, then checks the clusters.

"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import json
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import orjson
import pytest

from mcsched.admission import review
from mcsched.choice import Placement
from mcsched.constants import (
    CLUSTER_CHOSEN_LABEL,
    CLUSTER_TARGET_NAME_LABEL,
    CLUSTER_WEIGHTS_ANNOTATION,
    ELECT_ANNOTATION,
    NAMESPACE_LABEL,
    NAMESPACE_LABEL_VALUE,
    PARENT_CLUSTER_LABEL,
    PARENT_UID_LABEL,
    PLACEMENT_ANNOTATION,
    PROXY_CONSTRAINTS_ANNOTATION,
    PROXY_FINALIZER,
    PROXY_SCHEDULER_NAME,
    SOURCE_MANIFEST_ANNOTATION,
    USE_SPEC_CONSTRAINTS_ANNOTATION,
)
from mcsched.kube import JSON, pod_path
from mcsched.models import CandidateReply, CandidateRequest, DelegateRequest, ElectMessage, PodRef, StatusUpdate
from mcsched.placement import cpu_milli
from mcsched.podspec import apply_patch, delegate_manifest, delegate_name, source_manifest
from mcsched.shards import PARTITIONS, Share, Shares, partition_of, stage_assignment
from mcsched.targetdirectory import Resolution, TargetDirectory
from mcsched.testing import (
    Delivery,
    Envelope,
    FakeBroker,
    FakeBus,
    FakeCluster,
    FakeInformer,
    FakeRuntime,
    fake_settings,
    settle,
)
from services.candidate_scheduler.__main__ import TargetScheduler
from services.candidate_scheduler.__main__ import compose as candidate_scheduler
from services.feedback import __main__ as feedback_module
from services.feedback.__main__ import Feedback
from services.feedback.__main__ import compose as feedback
from services.proxy_scheduler import __main__ as proxy_scheduler_module
from services.proxy_scheduler.__main__ import UNANSWERED_RETRIES, ProxyScheduler
from services.proxy_scheduler.__main__ import compose as proxy_scheduler
from services.watcher.__main__ import ElectPublisher
from services.watcher.__main__ import compose as watcher

SOURCE = "c1"
TARGETS = ("c2", "c3")
NS = "ns"
T = TypeVar("T")


def node(name: str, cpu: str = "4") -> JSON:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "type": "kwok"}},
            "spec": {},
            "status": {"allocatable": {"cpu": cpu, "memory": "16Gi", "pods": "110"},
                       "capacity": {"cpu": cpu, "memory": "16Gi", "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]}}


def user_pod(name: str, cpu: str = "500m") -> JSON:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": {"app": "web"},
                         "annotations": {ELECT_ANNOTATION: ""}},
            "spec": {"containers": [{"name": "app", "image": "busybox",
                                     "resources": {"requests": {"cpu": cpu, "memory": "64Mi"}}}]}}


def admitted(pod: JSON) -> JSON:
    """The pod as the admission webhook makes it a proxy."""
    answer = review({"request": {"uid": "r1", "kind": {"kind": "Pod"}, "operation": "CREATE", "namespace": NS,
                                 "object": pod}})["response"]
    assert answer["allowed"]
    return apply_patch(pod, orjson.loads(base64.b64decode(answer["patch"])))


def condition(pod: JSON, kind: str) -> JSON | None:
    return next((c for c in (pod.get("status") or {}).get("conditions") or [] if c["type"] == kind), None)


def ref(pod: JSON, cluster: str = SOURCE) -> PodRef:
    meta = pod["metadata"]
    return PodRef(cluster=cluster, namespace=meta["namespace"], name=meta["name"], uid=meta["uid"])


def owner(bus: FakeBus, durable: str, cls: type[T]) -> T:
    """The service object whose handler ``compose()`` registered on ``durable`` in this process."""
    [consumer] = [c for c in bus.broker.consumers[durable] if c.client == bus.client_name]
    instance = getattr(consumer.handler, "__self__", None)
    assert isinstance(instance, cls)
    return instance


class World:
    """The clusters, the broker and the services' processes of one scenario."""

    def __init__(self, targets: tuple[str, ...] = TARGETS) -> None:
        self.targets = targets
        self.clusters = {name: FakeCluster(name) for name in (SOURCE, *targets)}
        self.settings = fake_settings(sources=(SOURCE,), targets=targets)
        self.broker = FakeBroker()
        self.bus = FakeBus(self.broker, client_name="test")  # the test's own connection
        self.runtimes: list[FakeRuntime] = []
        self.c1.put("namespaces", {"metadata": {"name": NS, "labels": {NAMESPACE_LABEL: NAMESPACE_LABEL_VALUE}}})
        for target in targets:
            self.clusters[target].put("nodes", node(f"{target}-n1"))

    @property
    def c1(self) -> FakeCluster:
        return self.clusters[SOURCE]

    # -- the services --------------------------------------------------------------------------------

    def runtime(self, service: str) -> FakeRuntime:
        bus = FakeBus(self.broker, client_name=f"{service}#{len(self.runtimes)}")
        rt = FakeRuntime(service, self.settings, bus, self.clusters)
        self.runtimes.append(rt)
        return rt

    async def start(self) -> World:
        await watcher(self.runtime("watcher"))
        await self.add_proxy_scheduler()
        rt = self.runtime("candidate-scheduler")
        await candidate_scheduler(rt)
        self.target_schedulers = {t: owner(rt.fake_bus, f"candidate-scheduler-{t}", TargetScheduler)
                                  for t in self.targets}
        self.feedback_rt, self.feedback = await self.add_feedback()
        await self.settle()
        return self

    async def add_proxy_scheduler(self) -> tuple[FakeRuntime, ProxyScheduler]:
        rt = self.runtime("proxy-scheduler")
        await proxy_scheduler(rt)
        return rt, owner(rt.fake_bus, "proxy-scheduler", ProxyScheduler)

    async def add_feedback(self, scheduled_fold_seconds: float = 0.0) -> tuple[FakeRuntime, Feedback]:
        rt = self.runtime("feedback")
        await feedback(rt)
        service = owner(rt.fake_bus, f"feedback-{SOURCE}-0", Feedback)
        service.scheduled_fold_seconds = scheduled_fold_seconds  # scenarios play the kubelet step by step
        return rt, service

    async def close(self) -> None:
        for rt in self.runtimes:
            await rt.close()

    async def settle(self) -> None:
        await settle(*self.runtimes)

    async def run(self, kind: str | None = None) -> list[Delivery]:
        """Deliver every pending message (letting caches catch up before each) until only retries are left."""
        deliveries = await self.bus.deliver_all(kind, between=self.settle)
        await self.settle()
        return deliveries

    async def retry_unschedulable(self) -> None:
        """The proxy-schedulers' retry of the pods that fit nowhere comes now (its timer is
        ``unschedulable_retry_seconds``); the pipeline runs."""
        for rt in self.runtimes:
            if rt.service == "proxy-scheduler":
                scheduler = owner(rt.fake_bus, "proxy-scheduler", ProxyScheduler)
                for uid in list(scheduler.waiting):
                    scheduler.retries.add(uid)
        await self.settle()
        await self.run()

    def problems(self) -> list[str]:
        """Failures nobody awaited (cache handlers, spawned tasks) and handlers that raised."""
        return [f"{rt.service}: {e!r}" for rt in self.runtimes for e in rt.errors()] + \
            [f"{d.envelope}: {d.error!r}" for d in self.broker.deliveries if d.error is not None]

    def watcher_publisher(self) -> ElectPublisher:
        """The first watcher's publisher of elect messages (its informer calls ``on_event(source, ...)``)."""
        rt = next(rt for rt in self.runtimes if rt.service == "watcher")
        [publisher] = {h.func.__self__ for i in rt.fake_informers(SOURCE, "pods") for h in i.handlers
                       if isinstance(h, functools.partial)}
        assert isinstance(publisher, ElectPublisher)
        return publisher

    def informer(self, rt: FakeRuntime, cluster: str, resource: str = "pods") -> FakeInformer:
        """The process's main cache of ``resource`` in ``cluster`` (not the watch of pods strayed onto
        virtual nodes feedback also keeps)."""
        [informer] = [i for i in rt.fake_informers(cluster, resource)
                      if "spec.nodeName=" not in (i.field_selector or "")]
        return informer

    # -- pods ----------------------------------------------------------------------------------------

    async def create_proxy(self, name: str = "web-0") -> JSON:
        proxy = await self.c1.create(pod_path(NS), admitted(user_pod(name)))
        await self.settle()
        return proxy

    def proxy(self, proxy: JSON) -> JSON:
        current = self.c1.pod(NS, proxy["metadata"]["name"])
        assert current is not None, "the proxy is gone"
        return current

    def delegate(self, target: str, proxy: JSON) -> JSON | None:
        return self.clusters[target].pod(NS, delegate_name(proxy["metadata"]["name"], proxy["metadata"]["uid"]))

    def delegates(self, target: str) -> list[JSON]:
        return self.clusters[target].select("pods", label_selector=PARENT_UID_LABEL)

    async def chosen(self, name: str = "web-0") -> tuple[JSON, str]:
        """A new proxy whose cluster is chosen, its delegate request not handled yet: (proxy, target)."""
        proxy = await self.create_proxy(name)
        [elect] = self.bus.pending("elect")
        assert (await self.bus.deliver(elect)).acked
        await self.settle()
        target = Placement.of(self.proxy(proxy)).target
        assert target is not None
        return proxy, target

    async def place(self, name: str = "web-0") -> tuple[JSON, str]:
        """A new proxy, run until its delegate waits in the chosen target: (proxy, target)."""
        proxy = await self.create_proxy(name)
        await self.run()
        target = Placement.of(self.proxy(proxy)).target
        assert target is not None and self.delegate(target, proxy) is not None
        return self.proxy(proxy), target

    async def schedule(self, target: str, proxy: JSON) -> None:
        """The target's scheduler places the delegate; the pipeline runs."""
        self.clusters[target].bind_pod(NS, delegate_name(proxy["metadata"]["name"], proxy["metadata"]["uid"]),
                                       f"{target}-n1")
        await self.settle()
        await self.run()

    async def kubelet(self, target: str, proxy: JSON, phase: str) -> None:
        """The target's kubelet reports ``phase``; the pipeline runs."""
        self.clusters[target].set_pod_phase(NS, delegate_name(proxy["metadata"]["name"], proxy["metadata"]["uid"]),
                                            phase)
        await self.settle()
        await self.run()

    async def refuse(self, target: str, proxy: JSON, message: str = "0/1 nodes are available: 1 node(s) didn't "
                     "match pod anti-affinity rules.") -> None:
        """The target's scheduler cannot place the delegate (the pipeline does not run yet)."""
        self.clusters[target].refuse_pod(NS, delegate_name(proxy["metadata"]["name"], proxy["metadata"]["uid"]),
                                         message)
        await self.settle()

    async def running(self, name: str = "web-0") -> tuple[JSON, str]:
        """A proxy bound to its target, its delegate Running there, the status mirrored."""
        proxy, target = await self.place(name)
        await self.schedule(target, proxy)
        await self.kubelet(target, proxy, "Running")
        assert self.proxy(proxy)["status"]["phase"] == "Running"
        return self.proxy(proxy), target

    def other(self, target: str) -> str:
        [other] = [t for t in self.targets if t != target]
        return other

    def placement_writes(self, proxy: JSON) -> list[int]:
        """Statuses of every placement patch sent to the proxy."""
        path = pod_path(NS, proxy["metadata"]["name"])
        return [c.status for c in self.c1.calls if c.method == "PATCH" and c.path == path
                and PLACEMENT_ANNOTATION in ((c.body or {}).get("metadata", {}).get("annotations") or {})]

    def snapshot(self) -> dict[tuple[str, str, str, str], str]:
        """Every object's resourceVersion in every cluster, Events aside."""
        return {(name, *key): obj["metadata"]["resourceVersion"] for name, cluster in self.clusters.items()
                for key, obj in cluster.objects.items() if key[0] != "events"}


@pytest.fixture
async def world() -> AsyncIterator[World]:
    w = await World().start()
    try:
        yield w
        assert w.problems() == []
    finally:
        await w.close()


def reasons(cluster: FakeCluster, pod: JSON) -> list[str]:
    return [e["reason"] for e in cluster.events_about(pod["metadata"]["uid"])]


# -- a new proxy -------------------------------------------------------------------------------------------


async def test_a_new_proxy_gets_one_unbound_delegate_in_the_chosen_target_only(world: World) -> None:
    proxy = await world.create_proxy()
    uid = proxy["metadata"]["uid"]

    [elect] = world.bus.pending("elect")
    assert elect.msg_id == f"elect:{uid}:0" and isinstance(elect.message, ElectMessage)
    delivery = await world.bus.deliver(elect)
    assert delivery.acked
    assert sorted(r.subject for r in world.broker.requests) == ["mcs.candidate.c2", "mcs.candidate.c3"]
    assert all(isinstance(r.reply, CandidateReply) and r.reply.fits for r in world.broker.requests)

    await world.settle()
    placement = Placement.of(world.proxy(proxy))
    assert placement.target in TARGETS and placement.round == 1 and not placement.rejections
    target = placement.target
    assert world.placement_writes(proxy) == [200]
    [request] = world.bus.pending()  # nothing else: no delegate elsewhere, no status
    assert request.subject == f"mcs.delegate.{target}" and request.msg_id == f"delegate:{uid}:1"
    assert isinstance(request.message, DelegateRequest) and request.message.target == target

    assert (await world.bus.deliver(request)).acked
    await world.settle()
    delegate = world.delegate(target, proxy)
    assert delegate is not None
    assert not delegate["spec"].get("nodeName")  # the target's own scheduler places it
    assert delegate["spec"]["schedulerName"] == "default-scheduler"
    assert delegate["metadata"]["labels"][PARENT_UID_LABEL] == uid
    assert delegate["metadata"]["labels"][PARENT_CLUSTER_LABEL] == SOURCE
    [owner_ref] = delegate["metadata"]["ownerReferences"]
    assert owner_ref["kind"] == "Namespace" and owner_ref["controller"] is True
    assert delegate["spec"]["containers"] == proxy["spec"]["containers"]
    assert world.delegates(world.other(target)) == []
    assert world.clusters[world.other(target)].find("namespaces", "", NS) is None
    assert not world.proxy(proxy)["spec"].get("nodeName")
    assert world.bus.pending() == []  # an unscheduled delegate tells the source nothing yet


async def test_compose_wires_every_stage_on_the_fake_runtime(world: World) -> None:
    assert {d: len(c) for d, c in world.broker.consumers.items()} == {
        "proxy-scheduler": 1, "candidate-scheduler-c2": 1, "candidate-scheduler-c3": 1,
        **{f"feedback-c1-{p}": 1 for p in range(PARTITIONS)}}  # one per partition of the source's proxies
    assert sorted(r.subject for r in world.broker.responders) == ["mcs.candidate.c2", "mcs.candidate.c3"]
    assert "feedback resync" in world.feedback_rt.spawned

    await world.feedback.heartbeat()  # spawned, not started: the test is the clock
    await world.feedback.heartbeat()
    for target in TARGETS:
        virtual = world.c1.find("nodes", "", f"admiralty-{target}")
        assert virtual is not None and cpu_milli(virtual["status"]["allocatable"]["cpu"]) == 4000
        assert [c["status"] for c in virtual["status"]["conditions"]] == ["True"]
        lease = world.c1.find("leases", "kube-node-lease", f"admiralty-{target}")
        assert lease is not None and lease["metadata"]["ownerReferences"][0]["uid"] == virtual["metadata"]["uid"]


async def test_a_target_that_falls_silent_is_not_ready_though_its_watches_never_said_so(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A partition without a reset leaves every watch open and quiet for minutes; the heartbeat's own
    question to the target's API server is what notices."""
    monkeypatch.setattr(feedback_module, "PROBE_TIMEOUT_SECONDS", 0.05)
    await world.feedback.heartbeat()
    silent = world.clusters["c2"]
    answering = silent.get

    async def get(path: str, **params: Any) -> JSON:
        if path == "/version":
            await asyncio.sleep(3600)  # nothing comes back
        return await answering(path, **params)

    monkeypatch.setattr(silent, "get", get)
    await world.feedback.heartbeat()  # one unanswered probe is not yet silence
    assert ready_status(world.c1.find("nodes", "", "admiralty-c2")) == "True"
    world.feedback.answered["c2"] -= feedback_module.SILENT_TARGET_SECONDS
    await world.feedback.heartbeat()
    assert world.feedback.nodes["c2"].healthy, "its watches say nothing"
    assert ready_status(world.c1.find("nodes", "", "admiralty-c2")) == "False"
    assert ready_status(world.c1.find("nodes", "", "admiralty-c3")) == "True"
    monkeypatch.setattr(silent, "get", answering)  # heard again
    await world.feedback.heartbeat()
    assert ready_status(world.c1.find("nodes", "", "admiralty-c2")) == "True"


def ready_status(node: JSON | None) -> str | None:
    return next((c["status"] for c in ((node or {}).get("status") or {}).get("conditions") or []
                 if c["type"] == "Ready"), None)


async def test_a_label_that_no_longer_describes_the_whole_target_leaves_its_virtual_node(world: World) -> None:
    """Cluster constraints and spread match virtual-node labels: one left behind sends pods where it no
    longer holds. A label an operator put on the virtual node is not the heartbeat's, and stays."""
    zone = "topology.kubernetes.io/zone"
    world.clusters["c2"].modify("nodes", "", "c2-n1", lambda n: n["metadata"]["labels"].update({zone: "a"}))
    await world.settle()
    await world.feedback.heartbeat()
    world.c1.modify("nodes", "", "admiralty-c2", lambda n: n["metadata"]["labels"].update({"team": "ours"}))
    assert world.c1.find("nodes", "", "admiralty-c2")["metadata"]["labels"][zone] == "a"  # type: ignore[index]
    other = node("c2-n2")
    other["metadata"]["labels"][zone] = "b"  # a second node, in another zone
    world.clusters["c2"].put("nodes", other)
    await world.settle()
    await world.feedback.heartbeat()
    labels = world.c1.find("nodes", "", "admiralty-c2")["metadata"]["labels"]  # type: ignore[index]
    assert zone not in labels and labels["team"] == "ours"


async def test_the_heartbeat_never_brings_back_a_taint_the_node_lifecycle_controller_just_removed(
        world: World) -> None:
    await world.feedback.heartbeat()
    not_ready = {"key": "node.kubernetes.io/not-ready", "effect": "NoExecute", "timeAdded": "2026-01-01T00:00:00Z"}

    def lost(node: dict[str, Any]) -> None:  # c2 was unreachable; an operator also relabelled the node
        node["spec"]["taints"].append(not_ready)
        node["metadata"]["labels"][CLUSTER_TARGET_NAME_LABEL] = "someone-else"

    world.c1.modify("nodes", "", "admiralty-c2", lost)
    read = world.c1.request

    async def controller_acts_between_read_and_write(method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        answer = await read(method, path, *args, **kwargs)
        if method == "GET" and path == "/api/v1/nodes/admiralty-c2":  # c2 is back: the taint goes
            world.c1.modify("nodes", "", "admiralty-c2",
                            lambda node: node["spec"].update(taints=[t for t in node["spec"]["taints"]
                                                                     if t != not_ready]))
        return answer

    world.c1.request = controller_acts_between_read_and_write  # type: ignore[method-assign]
    await world.feedback.heartbeat()
    world.c1.request = read  # type: ignore[method-assign]
    node = world.c1.find("nodes", "", "admiralty-c2")
    assert node is not None and not_ready not in node["spec"]["taints"]
    await world.feedback.heartbeat()  # the labels are the heartbeat's own again at the next beat
    node = world.c1.find("nodes", "", "admiralty-c2")
    assert node is not None and node["metadata"]["labels"][CLUSTER_TARGET_NAME_LABEL] == "c2"
    assert node["spec"]["taints"] == [{"key": "virtual-kubelet.io/provider", "value": "admiralty",
                                       "effect": "NoSchedule"}]


async def test_a_pod_that_is_not_a_proxy_bound_to_a_virtual_node_is_failed_and_goes_when_deleted(
        world: World) -> None:
    """A DaemonSet's pod tolerating every taint lands on admiralty-c2: nothing could ever run it there."""
    daemon = world.c1.put("pods", {"metadata": {"name": "agent-x", "namespace": NS},
                                   "spec": {"nodeName": "admiralty-c2", "schedulerName": "default-scheduler",
                                            "containers": [{"name": "agent", "image": "agent"}]},
                                   "status": {"phase": "Pending"}})
    elsewhere = world.c1.put("pods", {"metadata": {"name": "agent-y", "namespace": NS},
                                      "spec": {"nodeName": "c1-n1", "containers": [{"name": "agent", "image": "a"}]},
                                      "status": {"phase": "Pending"}})
    await world.settle()
    failed = world.c1.pod(NS, "agent-x")
    assert failed is not None and failed["status"]["phase"] == "Failed" and failed["status"]["reason"] == "VirtualNode"
    assert [e["reason"] for e in world.c1.events_about(daemon["metadata"]["uid"])] == ["VirtualNode"]
    assert world.c1.pod(NS, "agent-y") == elsewhere, "a pod on a real node is none of our business"

    # Its controller deletes it with a grace period: no kubelet will confirm, so it is removed for good.
    world.c1.modify("pods", NS, "agent-x", lambda pod: pod["metadata"].update(
        deletionTimestamp="2026-01-01T00:00:00Z", deletionGracePeriodSeconds=30))
    await world.settle()
    assert world.c1.pod(NS, "agent-x") is None


async def test_a_delegate_scheduled_and_running_in_one_message_costs_one_binding_and_one_status_write(
        world: World) -> None:
    """Right after its own binding feedback does not know the proxy's resourceVersion: its status
    write needs none (no conflict, no read), keeps the binding's PodScheduled, drops stale conditions."""
    proxy, target = await world.place()
    uid = proxy["metadata"]["uid"]
    world.c1.modify("pods", NS, proxy["metadata"]["name"], lambda pod: pod["status"].setdefault(
        "conditions", []).append({"type": "DelegateWaiting", "status": "True"}))  # from an earlier wait
    name = delegate_name(proxy["metadata"]["name"], uid)
    world.clusters[target].bind_pod(NS, name, f"{target}-n1")
    world.clusters[target].set_pod_phase(NS, name, "Running")  # before feedback heard of the scheduling
    await world.settle()
    calls_before = len(world.c1.calls)
    await world.run()
    path = pod_path(NS, proxy["metadata"]["name"])
    calls = [(c.method, c.path.removeprefix(path), c.status) for c in world.c1.calls[calls_before:]
             if c.path.startswith(path)]
    assert calls == [("POST", "/binding", 200), ("PATCH", "/status", 200)], calls
    status = world.proxy(proxy)["status"]
    assert status["phase"] == "Running"
    assert {c["type"]: c["status"] for c in status["conditions"]}["PodScheduled"] == "True"
    assert "DelegateWaiting" not in {c["type"] for c in status["conditions"]}


async def test_a_delegate_waits_for_a_new_namespace_s_service_account_no_longer_than_its_bound_whatever_the_skew(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The namespace's age comes from the target's clock; the wait is bounded on ours. A target whose
    clock is an hour ahead made the handler wait an hour for a reason that never clears."""
    monkeypatch.setattr("services.candidate_scheduler.__main__.NEW_NAMESPACE_SECONDS", 0.3)
    scheduler = world.target_schedulers["c2"]
    asked: list[float] = []

    async def never_ready(source: str, namespace: str, spec: Any) -> str:
        asked.append(time.monotonic())
        return "ServiceAccount builder not found in c2"

    monkeypatch.setattr(scheduler.follower, "ensure", never_ready)
    ahead = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    namespace = {"metadata": {"name": NS, "creationTimestamp": ahead}}
    proxy = PodRef(cluster=SOURCE, namespace=NS, name="p", uid="p")
    reason = await asyncio.wait_for(scheduler._follow(proxy, {"spec": {}}, namespace), 3)
    assert reason == "ServiceAccount builder not found in c2"
    assert 0.25 <= asked[-1] - asked[0] <= 1.5 and len(asked) >= 2


# -- racing choices ------------------------------------------------------------------------------------------


async def test_two_proxy_schedulers_racing_on_one_elect_message_make_one_choice(world: World) -> None:
    # Each replica hears from one target only, so each would choose differently.
    first = world.runtimes[1]
    second, _ = await world.add_proxy_scheduler()
    first.fake_bus.unreachable.add("mcs.candidate.c3")
    second.fake_bus.unreachable.add("mcs.candidate.c2")
    proxy = await world.create_proxy()
    [elect] = world.bus.pending("elect")

    deliveries = await world.bus.deliver_together((elect, 0), (elect, 1))

    assert all(d.acked for d in deliveries)
    assert sorted(world.placement_writes(proxy)) == [200, 409]  # the loser's precondition failed
    placement = Placement.of(world.proxy(proxy))
    assert placement.target in TARGETS and placement.round == 1
    requests = [m for m in world.bus.messages("delegate") if isinstance(m, DelegateRequest)]
    assert [m.target for m in requests] == [placement.target]
    assert (f"mcs.delegate.{placement.target}", f"delegate:{proxy['metadata']['uid']}:1") in world.broker.duplicates
    await world.run()
    assert world.delegate(placement.target, proxy) is not None
    assert world.delegates(world.other(placement.target)) == []


async def test_a_redelivered_elect_message_with_a_stale_resource_version_makes_no_second_choice(world: World) -> None:
    proxy, target = await world.place()
    [first_elect] = [e for e in world.broker.published if e.kind == "elect"]
    await world.refuse(target, proxy)
    await world.run("status")  # the refusal is recorded; the watcher publishes round 1
    [next_elect] = world.bus.pending("elect")
    assert next_elect.msg_id == f"elect:{proxy['metadata']['uid']}:1"

    stale = world.bus.duplicate(first_elect)  # round 0 again, the resourceVersion of the new proxy
    assert (await world.bus.deliver(stale)).acked
    assert (await world.bus.deliver(next_elect)).acked
    await world.run()

    placement = Placement.of(world.proxy(proxy))
    other = world.other(target)
    assert placement.target == other and placement.round == 2 and set(placement.rejections) == {target}
    assert world.placement_writes(proxy).count(200) == 3  # choice, refusal, second choice: no third choice
    assert [m.target for m in world.bus.messages("delegate") if isinstance(m, DelegateRequest)] == [target, other]
    assert world.delegates(target) == []
    assert world.delegate(other, proxy) is not None


async def test_the_watcher_s_resync_queues_again_only_what_is_no_longer_waiting_in_the_stream(world: World) -> None:
    """A backlog is not a loss: a proxy whose elect message still waits for the proxy-scheduler gets no
    copy however long it waits (each copy would ask every cluster about a pod chosen for meanwhile);
    one whose message is gone from the stream does, three periods after it was last seen waiting."""
    publisher = world.watcher_publisher()
    waiting, lost = await world.create_proxy("web-0"), await world.create_proxy("web-1")
    elects = world.bus.pending("elect")
    assert len(elects) == 2
    world.bus.drop(next(e for e in elects if e.message.proxy.uid == lost["metadata"]["uid"]))
    period = world.settings.resync_period_seconds

    def age() -> None:  # as if four resync periods had passed since each was last published or seen waiting
        for uid, (round_, when, seq) in list(publisher.published.items()):
            publisher.published[uid] = (round_, when - 4 * period, seq)

    age()
    await publisher.resync()
    copies = [e for e in world.bus.pending("elect") if e.message.reason == "resync"]
    assert [e.message.proxy.uid for e in copies] == [lost["metadata"]["uid"]]
    age()
    await publisher.resync()  # the first one still waits; the copy of the second one too
    assert len(world.bus.pending("elect")) == 2
    await world.run()
    for proxy in (waiting, lost):
        target = Placement.of(world.proxy(proxy)).target
        assert target is not None and world.delegate(target, proxy) is not None


async def test_a_watcher_composed_again_republishes_a_ten_minute_backlog_under_ids_the_stream_still_drops(
        world: World) -> None:
    """A new composition (shares moved, targets changed) has published nothing yet and lists every proxy
    still waiting: its copies of a backlog ten minutes old must not double the proxy-scheduler's work."""
    proxies = [await world.create_proxy(f"web-{i}") for i in range(2)]
    assert len(world.bus.pending("elect")) == 2
    started = time.monotonic()
    world.broker.clock = lambda: time.monotonic() - started + 600.0
    await watcher(world.runtime("watcher"))
    await world.settle()
    assert sorted(msg_id for _, msg_id in world.broker.duplicates) == sorted(
        f"elect:{p['metadata']['uid']}:0" for p in proxies)
    assert len(world.bus.pending("elect")) == 2
    await world.run()
    assert all(Placement.of(world.proxy(p)).target is not None for p in proxies)


async def test_the_watcher_hears_nothing_of_a_proxy_from_its_choice_to_its_binding_unless_it_is_refused(
        world: World) -> None:
    """The choice marks the proxy (label cluster-chosen, in the same write), and the watcher's selector
    leaves marked proxies out: one event when the choice is made, none when the proxy is bound, and the
    proxy is back (and published again) once its cluster refuses it."""
    [watcher_rt] = [rt for rt in world.runtimes if rt.service == "watcher"]
    [cache] = watcher_rt.fake_informers(SOURCE, "pods")
    heard: list[tuple[str, str | None]] = []
    cache.add_handler(lambda kind, pod, _old=None: heard.append((kind, Placement.of(pod).target)))
    proxy, target = await world.place()
    assert proxy["metadata"]["labels"][CLUSTER_CHOSEN_LABEL] == "true"
    delegate = world.delegate(target, proxy)
    assert delegate is not None and CLUSTER_CHOSEN_LABEL not in delegate["metadata"]["labels"]
    assert heard == [("ADDED", None), ("DELETED", target)]
    assert cache.get(f"{NS}/{proxy['metadata']['name']}") is None

    await world.refuse(target, proxy)
    await world.run("status")
    assert CLUSTER_CHOSEN_LABEL not in world.proxy(proxy)["metadata"]["labels"]
    assert heard[2] == ("ADDED", None)
    [elect] = world.bus.pending("elect")
    assert elect.msg_id == f"elect:{proxy['metadata']['uid']}:1"
    await world.run()
    other = Placement.of(world.proxy(proxy)).target
    assert other == world.other(target) and world.proxy(proxy)["metadata"]["labels"][CLUSTER_CHOSEN_LABEL] == "true"
    await world.schedule(other, proxy)
    assert world.proxy(proxy)["spec"]["nodeName"]
    assert [kind for kind, _ in heard] == ["ADDED", "DELETED", "ADDED", "DELETED"]  # nothing of the binding


async def test_a_proxy_left_marked_with_no_cluster_chosen_is_unmarked_and_placed(world: World) -> None:
    """During an upgrade, a stage that still writes only the annotation can record a refusal and leave
    the label: feedback removes it, so the watcher sees the proxy again."""
    proxy, target = await world.place()
    await world.refuse(target, proxy)
    current = world.proxy(proxy)
    placement = Placement.of(current).reject(target, "0/1 nodes are available.", time.time())
    world.c1.put("pods", {**current, "metadata": {  # as an older feedback writes it: the annotation alone
        **current["metadata"], "annotations": {**current["metadata"]["annotations"],
                                               PLACEMENT_ANNOTATION: placement.annotation()}}})
    await world.settle()
    assert CLUSTER_CHOSEN_LABEL not in world.proxy(proxy)["metadata"]["labels"]
    await world.run()
    again = Placement.of(world.proxy(proxy))
    assert again.target == world.other(target) and again.round == 2
    assert world.proxy(proxy)["metadata"]["labels"][CLUSTER_CHOSEN_LABEL] == "true"


# -- delegate requests that must create nothing ------------------------------------------------------------------


async def test_stale_forged_and_mismatched_delegate_requests_create_nothing(world: World) -> None:
    proxy, target = await world.place()
    other = world.other(target)
    plain = await world.c1.create(pod_path(NS), {"metadata": {"name": "plain", "namespace": NS},
                                                 "spec": {"containers": [{"name": "app", "image": "busybox"}]}})
    chosen_but_not_yet = await world.create_proxy("web-1")  # no cluster chosen: its elect message is held back
    for envelope in world.bus.pending("elect"):
        world.bus.drop(envelope)
    requests = [
        DelegateRequest(proxy=ref(proxy), target=other, round=1),  # stale: the proxy names another target
        DelegateRequest(proxy=ref(plain), target=target, round=1),  # forged: not a proxy
        DelegateRequest(proxy=ref(proxy).model_copy(update={"uid": "another-incarnation"}), target=target, round=1),
        DelegateRequest(proxy=ref(proxy).model_copy(update={"cluster": "c9"}), target=target, round=1),
        DelegateRequest(proxy=ref(chosen_but_not_yet), target=target, round=1),
    ]
    before = {t: len(world.clusters[t].writes()) for t in TARGETS}
    for number, request in enumerate(requests):
        await world.bus.publish(f"mcs.delegate.{request.target}", request, f"forged:{number}")
    deliveries = await world.run()

    assert len(deliveries) == len(requests) and all(d.acked for d in deliveries)
    assert [d["metadata"]["labels"][PARENT_UID_LABEL] for d in world.delegates(target)] == [proxy["metadata"]["uid"]]
    assert world.delegates(other) == []
    assert {t: len(world.clusters[t].writes()) for t in TARGETS} == before  # not even a namespace


async def test_a_proxy_made_without_the_webhook_runs_no_more_than_its_own_spec(world: World) -> None:
    """A pod created directly as a "proxy", its annotation asking for a privileged pod, gets its own spec."""
    privileged = {"metadata": {"labels": {"app": "x"}, "annotations": {}}, "spec": {
        "hostPID": True, "volumes": [{"name": "root", "hostPath": {"path": "/"}}],
        "containers": [{"name": "app", "image": "evil", "securityContext": {"privileged": True},
                        "volumeMounts": [{"name": "root", "mountPath": "/host"}]}],
        "tolerations": [{"operator": "Exists"}]}}
    target = world.targets[0]
    forged = {"metadata": {"name": "forged", "namespace": NS, "annotations": {
                  SOURCE_MANIFEST_ANNOTATION: orjson.dumps(privileged).decode(),
                  PLACEMENT_ANNOTATION: Placement().choose(target).annotation()}},
              "spec": {"schedulerName": PROXY_SCHEDULER_NAME,
                       "containers": [{"name": "app", "image": "busybox"}]}}
    proxy = await world.c1.create(pod_path(NS), forged)
    await world.settle()
    await world.bus.publish(f"mcs.delegate.{target}", DelegateRequest(proxy=ref(proxy), target=target, round=1),
                            "forged")
    await world.run("delegate")
    delegate = world.delegate(target, proxy)
    assert delegate is not None
    spec = delegate["spec"]
    assert spec["containers"] == [{"name": "app", "image": "busybox"}], "the proxy's real containers only"
    assert "hostPID" not in spec and "volumes" not in spec
    assert spec["tolerations"] == [{"operator": "Exists"}], "scheduling fields come from the annotation"


# -- scheduled, bound, mirrored ---------------------------------------------------------------------------------


async def test_a_scheduled_delegate_binds_its_proxy_which_keeps_pod_scheduled_once_status_is_mirrored(
        world: World) -> None:
    proxy, target = await world.place()
    await world.schedule(target, proxy)

    bound = world.proxy(proxy)
    assert bound["spec"]["nodeName"] == f"admiralty-{target}"
    scheduled = condition(bound, "PodScheduled")
    assert scheduled is not None and scheduled["status"] == "True"
    assert "Scheduled" in reasons(world.c1, proxy)

    await world.kubelet(target, proxy, "Running")
    mirrored = world.proxy(proxy)
    delegate = world.delegate(target, proxy)
    assert delegate is not None
    assert mirrored["status"]["phase"] == "Running"
    for key in ("podIP", "podIPs", "hostIP", "startTime", "containerStatuses"):
        assert mirrored["status"][key] == delegate["status"][key], key
    assert {c["type"]: c["status"] for c in mirrored["status"]["conditions"]} == {
        "PodScheduled": "True", "Initialized": "True", "ContainersReady": "True", "Ready": "True"}
    assert world.bus.pending() == []


async def test_a_pending_preemption_is_not_a_refusal(world: World) -> None:
    proxy, target = await world.place()
    world.clusters[target].refuse_pod(NS, delegate_name(proxy["metadata"]["name"], proxy["metadata"]["uid"]),
                                      "0/1 nodes are available: preemption may help", nominated_node=f"{target}-n1")
    await world.settle()
    await world.run()
    assert Placement.of(world.proxy(proxy)).target == target and not Placement.of(world.proxy(proxy)).rejections
    assert world.delegate(target, proxy) is not None


# -- refusals ------------------------------------------------------------------------------------------------------


async def test_a_pod_no_candidate_scheduler_answered_for_is_asked_about_again_before_it_is_said_to_fit_nowhere(
        world: World) -> None:
    for rt in [rt for rt in world.runtimes if rt.service == "candidate-scheduler"]:
        await rt.close()  # every candidate-scheduler busy: no answer comes in time
    proxy = await world.create_proxy()
    await world.run("elect")
    for _ in range(UNANSWERED_RETRIES):
        pod = world.proxy(proxy)
        assert condition(pod, "PodScheduled") is None and reasons(world.c1, pod) == []  # nothing written yet
        await world.retry_unschedulable()
    scheduled = condition(world.proxy(proxy), "PodScheduled")
    assert scheduled is not None and scheduled["status"] == "False"
    assert "no candidate-scheduler answered" in scheduled["message"]
    assert "FailedScheduling" in reasons(world.c1, proxy)


async def test_a_refusal_is_recorded_and_the_next_target_tried_until_every_cluster_refused(world: World) -> None:
    proxy, target = await world.place()
    other = world.other(target)
    proxy_cache = world.informer(world.feedback_rt, SOURCE)
    proxy_cache.lag()  # feedback will not see the refusal it records before the delegate's DELETED event

    await world.refuse(target, proxy, "0/1 nodes are available: 1 Insufficient cpu.")
    [status] = world.bus.pending("status")
    assert isinstance(status.message, StatusUpdate) and status.message.unschedulable is not None
    assert (await world.bus.deliver(status)).acked
    await world.settle()

    current = world.proxy(proxy)  # not deleted: a refusal is not a delegate deleted by someone
    assert not current["metadata"].get("deletionTimestamp")
    placement = Placement.of(current)
    assert placement.target is None and placement.round == 1
    assert placement.rejections[target].reason == "0/1 nodes are available: 1 Insufficient cpu."
    assert world.delegate(target, proxy) is None
    assert proxy_cache.pending > 0  # the cache still shows the proxy placed in the target
    await proxy_cache.flush()
    await world.settle()
    assert "DelegateUnschedulable" in reasons(world.c1, proxy)

    [elect] = world.bus.pending("elect")
    assert elect.msg_id == f"elect:{proxy['metadata']['uid']}:1"
    asked_before = len(world.broker.requests)
    assert (await world.bus.deliver(elect)).acked
    assert [r.subject for r in world.broker.requests[asked_before:]] == [f"mcs.candidate.{other}"]
    await world.run()
    assert Placement.of(world.proxy(proxy)).target == other
    assert world.delegate(other, proxy) is not None

    await world.refuse(other, proxy, "0/1 nodes are available: 1 node(s) had untolerated taint {gpu: true}.")
    deliveries = await world.run()
    [last] = [d for d in deliveries if d.envelope.kind == "elect"]
    assert last.acked  # fits nowhere: acked, and tried again by the proxy-scheduler (no ack-pending slot held)
    assert proxy["metadata"]["uid"] in owner(world.runtimes[1].fake_bus, "proxy-scheduler", ProxyScheduler).waiting
    waiting = world.proxy(proxy)
    assert not waiting["spec"].get("nodeName") and not waiting["metadata"].get("deletionTimestamp")
    scheduled = condition(waiting, "PodScheduled")
    assert scheduled is not None and scheduled["status"] == "False" and scheduled["reason"] == "Unschedulable"
    refusals = Placement.of(waiting).rejections
    assert scheduled["message"] == "0/2 clusters are available: " + "; ".join(
        f"{t}: refused by its scheduler: {refusals[t].reason}" for t in sorted(TARGETS))
    assert "FailedScheduling" in reasons(world.c1, proxy)
    assert world.delegates(target) == [] and world.delegates(other) == []


async def test_a_refusal_is_taken_back_when_the_target_placed_the_delegate_after_all(world: World) -> None:
    proxy, target = await world.place()
    delegates_cache = world.informer(world.feedback_rt, target)
    await world.refuse(target, proxy)
    [status] = world.bus.pending("status")
    delegates_cache.lag()  # feedback does not see yet that the scheduler placed it right after refusing
    world.clusters[target].bind_pod(NS, delegate_name(proxy["metadata"]["name"], proxy["metadata"]["uid"]),
                                    f"{target}-n1")
    assert (await world.bus.deliver(status)).acked
    await world.settle()
    assert world.delegate(target, proxy) is not None, "a placed delegate is never removed as refused"
    placement = Placement.of(world.proxy(proxy))
    assert placement.target == target and target not in placement.rejections
    await delegates_cache.flush()
    await world.settle()
    await world.run()
    assert world.proxy(proxy)["spec"]["nodeName"] == f"admiralty-{target}"
    assert world.delegates(world.other(target)) == []


async def test_two_changes_of_one_delegate_handled_together_bind_its_proxy_once(world: World) -> None:
    proxy, target = await world.place()
    proxy_cache = world.informer(world.feedback_rt, SOURCE)
    proxy_cache.lag()  # the binding is not seen by the time the second message is handled
    name = delegate_name(proxy["metadata"]["name"], proxy["metadata"]["uid"])
    world.clusters[target].bind_pod(NS, name, f"{target}-n1")
    await world.settle()
    world.clusters[target].set_pod_phase(NS, name, "Running")
    await world.settle()
    statuses = world.bus.pending("status")
    assert len(statuses) == 2
    deliveries = await world.bus.deliver_together(*((s, None) for s in statuses))
    assert all(d.acked for d in deliveries)
    binding = pod_path(NS, proxy["metadata"]["name"], "binding")
    assert len([c for c in world.c1.calls if c.path == binding]) == 1, "bound twice"
    assert world.proxy(proxy)["status"]["phase"] == "Running"
    await proxy_cache.flush()


async def test_a_delegate_that_starts_right_after_being_scheduled_is_reported_once(world: World) -> None:
    world.feedback.scheduled_fold_seconds = 0.2
    proxy, target = await world.place()
    name = delegate_name(proxy["metadata"]["name"], proxy["metadata"]["uid"])
    world.clusters[target].bind_pod(NS, name, f"{target}-n1")
    await world.settle()
    world.clusters[target].set_pod_phase(NS, name, "Running")
    await world.settle()
    await asyncio.sleep(0.3)  # the folded report of the scheduling comes due, and finds it published
    await world.settle()
    [status] = world.bus.pending("status")
    assert isinstance(status.message, StatusUpdate) and status.message.status["phase"] == "Running"
    await world.run()
    assert world.proxy(proxy)["spec"]["nodeName"] == f"admiralty-{target}"
    assert world.proxy(proxy)["status"]["phase"] == "Running"


async def test_a_delegate_scheduled_but_slow_to_start_binds_its_proxy_after_the_fold(world: World) -> None:
    world.feedback.scheduled_fold_seconds = 0.1
    proxy, target = await world.place()
    world.clusters[target].bind_pod(NS, delegate_name(proxy["metadata"]["name"], proxy["metadata"]["uid"]),
                                    f"{target}-n1")
    await world.settle()
    assert world.bus.pending("status") == []
    await asyncio.sleep(0.2)
    await world.settle()
    await world.run()
    assert world.proxy(proxy)["spec"]["nodeName"] == f"admiralty-{target}"


async def test_a_proxy_is_never_bound_to_a_cluster_that_refused_it_meanwhile(world: World) -> None:
    """Another replica recorded a refusal this process's cache has not seen: the late 'scheduled' binds nothing."""
    proxy, target = await world.place()
    proxy_cache = world.informer(world.feedback_rt, SOURCE)
    proxy_cache.lag()
    current = world.proxy(proxy)
    refused = Placement.of(current).reject(target, "0/1 nodes are available", 1.0)
    await world.c1.merge_patch(pod_path(NS, proxy["metadata"]["name"]), refused.patch(None))
    world.clusters[target].bind_pod(NS, delegate_name(proxy["metadata"]["name"], proxy["metadata"]["uid"]),
                                    f"{target}-n1")
    await world.settle()
    await world.run("status")
    assert not world.proxy(proxy)["spec"].get("nodeName"), "bound to a cluster that had refused it"
    assert world.delegate(target, proxy) is None, "the delegate left there is removed as a stray"
    await proxy_cache.flush()


async def test_a_pod_placed_in_a_cluster_that_cannot_take_it_is_freed_for_the_others(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    import services.feedback.__main__ as feedback_module

    monkeypatch.setattr(feedback_module, "DELEGATE_GRACE_SECONDS", 0.0)
    proxy = await world.create_proxy()
    for envelope in world.bus.pending("elect"):
        world.bus.drop(envelope)
    gone = Placement().choose("c9")  # e.g. a target removed from the settings since
    await world.c1.merge_patch(pod_path(NS, proxy["metadata"]["name"]), gone.patch(None))
    await world.settle()
    await world.feedback.resync()
    await world.settle()
    placement = Placement.of(world.proxy(proxy))
    assert placement.target is None and "not a target" in placement.rejections["c9"].reason
    await world.run()
    assert Placement.of(world.proxy(proxy)).target in world.targets, "placed in a cluster that can take it"


async def test_a_pod_whose_delegate_waits_in_a_lost_cluster_is_freed_only_after_failover_seconds(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """That delegate may still be bound and run there, cut off from us: freeing the pod at once (as one
    whose cluster never got a delegate) could run it twice. It waits as a bound pod waits to be evicted."""
    monkeypatch.setattr(feedback_module, "DELEGATE_GRACE_SECONDS", 0.0)
    proxy, target = await world.place()
    await world.feedback.resync()  # the digests list its delegate
    await world.settle()
    world.clusters[target].set_reachable(False)  # a partition: the cluster itself goes on
    await world.settle()
    await world.feedback.heartbeat()  # its virtual node turns NotReady
    for _ in range(2):
        await world.feedback.resync()
        await world.settle()
    assert Placement.of(world.proxy(proxy)).target == target, "freed while its delegate may run there"
    world.feedback.unusable_since[proxy["metadata"]["uid"]] -= world.settings.failover_seconds or 0
    await world.feedback.resync()
    await world.settle()
    placement = Placement.of(world.proxy(proxy))
    assert placement.target is None and "unreachable" in placement.rejections[target].reason


async def test_proxies_deleted_on_a_lost_cluster_hold_up_no_deletion_elsewhere(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each delete of a delegate in a cluster that does not answer waits out a request's timeout: while
    its virtual node says it is unreachable, those proxies are tried again later instead."""
    running = [await world.running(f"web-{i}") for i in range(12)]
    lost = running[0][1]
    on_lost = [p for p, t in running if t == lost]
    elsewhere = [p for p, t in running if t != lost]
    assert len(on_lost) > 0 and elsewhere
    world.clusters[lost].set_reachable(False)
    await world.feedback.heartbeat()  # its virtual node turns NotReady
    await world.settle()
    world.clusters[lost].set_reachable(True)  # until the next heartbeat, it still says so
    answering = world.clusters[lost].delete
    hung: list[str] = []

    async def delete(path: str, body: JSON | None = None) -> JSON:
        hung.append(path)
        await asyncio.sleep(3600)  # a request that will time out
        return await answering(path, body)

    monkeypatch.setattr(world.clusters[lost], "delete", delete)
    for proxy in on_lost + elsewhere:
        await world.c1.delete(pod_path(NS, proxy["metadata"]["name"]))
    await world.run()
    assert hung == []
    for proxy in elsewhere:
        assert world.c1.pod(NS, proxy["metadata"]["name"]) is None, "held up behind the lost cluster"
    for proxy in on_lost:
        assert world.proxy(proxy)["metadata"].get("deletionTimestamp"), "released with its delegate left"


async def test_a_proxy_deleted_while_its_virtual_node_is_unknown_has_its_delegate_deleted_all_the_same(
        world: World) -> None:
    """Unknown says that the target's owner stopped heartbeating (it is down, or cut off from this source),
    not that the target does not answer: waiting would leave the delegate running beside its replacement."""
    proxy, target = await world.running()
    await world.feedback.heartbeat()

    def unknown(node: JSON) -> None:  # as the node lifecycle controller marks a node whose heartbeats stopped
        node["status"]["conditions"] = [{"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown"}]

    world.c1.modify("nodes", "", f"admiralty-{target}", unknown)
    await world.settle()
    await world.c1.delete(pod_path(NS, proxy["metadata"]["name"]))
    await world.run()
    assert world.delegate(target, proxy) is None
    assert world.c1.pod(NS, proxy["metadata"]["name"]) is None


# -- choosing clusters ----------------------------------------------------------------------------------------------


def virtual_node(target: str, **spec: object) -> JSON:
    return {"metadata": {"name": f"admiralty-{target}", "labels": {
        "type": "virtual-kubelet", "multicluster.admiralty.io/cluster-target-name": target,
        "topology.kubernetes.io/region": f"region-{target}"}},
        "spec": {"taints": [{"key": "virtual-kubelet.io/provider", "value": "admiralty", "effect": "NoSchedule"}],
                 **spec}}


async def test_cluster_constraints_and_a_cordon_leave_clusters_out_and_say_why(world: World) -> None:
    world.c1.put("nodes", virtual_node("c2", unschedulable=True))  # an operator cordoned c2
    world.c1.put("nodes", virtual_node("c3"))
    await world.settle()
    proxy = await world.create_proxy()
    await world.run()
    placement = Placement.of(world.proxy(proxy))
    assert (placement.target, dict(placement.rejections)) == ("c3", {})
    assert world.delegates("c2") == []

    pinned = user_pod("pinned")
    pinned["metadata"]["annotations"][PROXY_CONSTRAINTS_ANNOTATION] = \
        "nodeSelector:\n  topology.kubernetes.io/region: region-c2\n"
    waiting = await world.c1.create(pod_path(NS), admitted(pinned))
    await world.settle()
    await world.run()
    scheduled = condition(world.proxy(waiting), "PodScheduled")
    assert scheduled is not None and scheduled["status"] == "False"
    assert "c2: excluded: its virtual node is cordoned" in scheduled["message"]
    assert "c3: excluded: the pod's cluster constraints" in scheduled["message"]

    world.c1.put("nodes", virtual_node("c2"))  # uncordoned
    await world.settle()
    await world.retry_unschedulable()
    assert Placement.of(world.proxy(waiting)).target == "c2"


async def test_pods_nobody_answered_about_are_forgotten_once_gone(world: World) -> None:
    """The count of unanswered questions about a pod is kept while it waits, not after it is deleted."""
    for rt in [rt for rt in world.runtimes if rt.service == "candidate-scheduler"]:
        await rt.close()  # every candidate-scheduler away
    scheduler = owner(next(rt for rt in world.runtimes if rt.service == "proxy-scheduler").fake_bus,
                      "proxy-scheduler", ProxyScheduler)
    uids = [(await world.create_proxy(f"web-{i}"))["metadata"]["uid"] for i in range(3)]
    await world.run("elect")
    assert set(scheduler.unanswered) == set(uids)
    for i in range(3):
        await world.c1.delete(pod_path(NS, f"web-{i}"))
    await world.settle()
    await world.retry_unschedulable()
    assert scheduler.waiting == {} and scheduler.unanswered == {}


async def test_a_gated_pod_waits_unelected_until_its_gates_are_lifted(world: World) -> None:
    """As kube-scheduler ignores a gated pod (Kueue's admission, say), so does the pipeline; the delegate
    of a pod whose gates were lifted on the proxy has none either (nothing in the target would lift them)."""
    gated = user_pod("gated")
    gated["spec"]["schedulingGates"] = [{"name": "kueue.x-k8s.io/admission"}]
    proxy = await world.c1.create(pod_path(NS), admitted(gated))
    await world.settle()
    assert world.bus.pending("elect") == []
    await world.watcher_publisher().resync()
    assert world.bus.pending("elect") == []

    world.c1.modify("pods", NS, "gated", lambda pod: pod["spec"].pop("schedulingGates"))  # admitted by its queue
    await world.settle()
    await world.run()
    target = Placement.of(world.proxy(proxy)).target
    assert target is not None
    delegate = world.delegate(target, proxy)
    assert delegate is not None and "schedulingGates" not in delegate["spec"]


async def test_a_proxy_scheduler_decides_nothing_before_it_has_listed_the_virtual_nodes(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """At start and after each recomposition the cache of virtual nodes is empty for a moment; a
    cordon and the pod's cluster constraints must hold then too (an unknown node excludes nothing)."""
    monkeypatch.setattr(proxy_scheduler_module, "SOURCE_CACHE_SYNC_SECONDS", 0.2)
    world.c1.put("nodes", virtual_node("c2", unschedulable=True))  # an operator cordoned c2
    world.c1.put("nodes", virtual_node("c3"))
    await world.settle()
    rt = world.runtime("proxy-scheduler")  # a process composed just now
    await proxy_scheduler(rt)
    [nodes] = rt.fake_informers(SOURCE, "nodes")
    nodes.lag()  # its list is still on its way
    pinned = user_pod("pinned")  # may only run in region-c2, which is cordoned
    pinned["metadata"]["annotations"][PROXY_CONSTRAINTS_ANNOTATION] = \
        "nodeSelector:\n  topology.kubernetes.io/region: region-c2\n"
    await world.c1.create(pod_path(NS), admitted(pinned))
    await world.settle()
    [elect] = world.bus.pending("elect")
    delivery = await world.bus.deliver(elect, replica=1)
    assert not delivery.acked and "not listed yet" in delivery.outcome.note
    assert Placement.of(world.c1.pod(NS, "pinned") or {}).target is None
    await nodes.flush()
    [elect] = world.bus.pending("elect")
    assert (await world.bus.deliver(elect, replica=1)).acked
    assert Placement.of(world.c1.pod(NS, "pinned") or {}).target is None
    scheduled = condition(world.c1.pod(NS, "pinned") or {}, "PodScheduled")
    assert scheduled is not None and "c2: excluded: its virtual node is cordoned" in scheduled["message"]


async def test_preferred_cluster_affinity_fills_the_preferred_cluster_then_bursts(world: World) -> None:
    for target in TARGETS:
        world.c1.put("nodes", virtual_node(target))
    world.clusters["c2"].put("nodes", node("c2-n1", cpu="1"))  # room for one 500m pod besides nothing else
    await world.settle()
    prefer_c2 = json.dumps({"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 50, "preference": {"matchExpressions": [
            {"key": "topology.kubernetes.io/region", "operator": "In", "values": ["region-c2"]}]}}]}}})
    placed = []
    for i in range(3):
        pod = user_pod(f"bursty-{i}", cpu="400m")
        pod["metadata"]["annotations"][PROXY_CONSTRAINTS_ANNOTATION] = prefer_c2
        proxy = await world.c1.create(pod_path(NS), admitted(pod))
        await world.settle()
        await world.run()
        target = Placement.of(world.proxy(proxy)).target
        placed.append(target)
        if target == "c2":  # c2's scheduler places it, so its room is taken for the next estimate
            name = world.delegate("c2", proxy)["metadata"]["name"]  # type: ignore[index]
            world.clusters["c2"].bind_pod(NS, name, "c2-n1")
            await world.settle()
    assert placed == ["c2", "c2", "c3"], placed


async def test_with_use_constraints_from_spec_the_pods_own_constraints_choose_the_cluster_not_the_node(
        world: World) -> None:
    for target in TARGETS:
        world.c1.put("nodes", virtual_node(target))
    await world.settle()
    pod = user_pod("regional")
    pod["metadata"]["annotations"][USE_SPEC_CONSTRAINTS_ANNOTATION] = "true"
    pod["spec"]["nodeSelector"] = {"topology.kubernetes.io/region": "region-c3"}  # no real node has it
    proxy = await world.c1.create(pod_path(NS), admitted(pod))
    await world.settle()
    await world.run()
    assert Placement.of(world.proxy(proxy)).target == "c3"
    delegate = world.delegate("c3", proxy)
    assert delegate is not None and "nodeSelector" not in delegate["spec"], "the constraint was the cluster's"


# -- spreading a workload across clusters ---------------------------------------------------------------------------

SPREAD_BY_CLUSTER = json.dumps({"topologySpreadConstraints": [{
    "maxSkew": 1, "topologyKey": CLUSTER_TARGET_NAME_LABEL, "whenUnsatisfiable": "DoNotSchedule",
    "labelSelector": {"matchLabels": {"app": "web"}}, "matchLabelKeys": ["pod-template-hash"]}]})


def replica_pod(name: str, annotations: dict[str, str] | None = None, replica_set: str = "web-abc") -> JSON:
    """A pod as a ReplicaSet of a Deployment makes it."""
    pod = user_pod(name, cpu="100m")
    pod["metadata"]["labels"]["pod-template-hash"] = replica_set.rsplit("-", 1)[-1]
    pod["metadata"]["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": replica_set,
                                           "uid": f"uid-{replica_set}", "controller": True}]
    pod["metadata"]["annotations"].update(annotations or {})
    return pod


async def burst(world: World, count: int, annotations: dict[str, str] | None = None,
                lagging_cache: bool = False, unseen: int = 0) -> list[JSON]:
    """``count`` replicas created at once, their elect messages handled concurrently by one proxy-scheduler
    (whose cache of proxies shows none of its choices until all are written, with ``lagging_cache``; nor
    the last ``unseen`` pods themselves)."""
    # The proxy-scheduler opens its cache of proxies for the first pod that counts them: open now,
    # so the test can make it lag.
    await owner(world.runtimes[1].fake_bus, "proxy-scheduler", ProxyScheduler).counts[SOURCE].activate(5.0)
    cache = world.informer(world.runtimes[1], SOURCE)
    lagging_cache = lagging_cache or unseen > 0
    proxies = []
    for i in range(count):
        if i == count - unseen:
            await world.settle()
            cache.lag()
        proxies.append(await world.c1.create(pod_path(NS), admitted(replica_pod(f"web-abc-{i}", annotations))))
    await world.settle()
    elects = world.bus.pending("elect")
    assert len(elects) == count
    if lagging_cache:
        cache.lag()
    handling = asyncio.ensure_future(world.bus.deliver_together(*((e, 0) for e in elects)))
    if lagging_cache:
        for _ in range(5000):
            await asyncio.sleep(0)
            if all(world.placement_writes(p) for p in proxies):
                break
        assert all(world.placement_writes(p) for p in proxies), "every choice made while the cache lags"
        await cache.flush()
    deliveries = await handling
    assert all(d.acked for d in deliveries)
    await world.run()
    return [world.proxy(p) for p in proxies]


def split_of(proxies: list[JSON]) -> dict[str | None, int]:
    targets = [Placement.of(p).target for p in proxies]
    return {t: targets.count(t) for t in sorted(set(targets), key=str)}


async def test_two_copies_of_an_elect_message_in_one_process_decide_one_after_the_other(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy handled while the first still waits for its choice to come back through the watch (the
    spread check) must not take that wait over: the first would wait for ever, its choice unchecked."""
    monkeypatch.setattr(proxy_scheduler_module, "CONFIRM_SECONDS", 3600.0)
    for target in TARGETS:
        world.c1.put("nodes", virtual_node(target))
    await world.settle()
    scheduler = owner(world.runtimes[1].fake_bus, "proxy-scheduler", ProxyScheduler)
    await scheduler.counts[SOURCE].activate(5.0)
    cache = world.informer(world.runtimes[1], SOURCE)
    proxy = await world.c1.create(pod_path(NS), admitted(replica_pod(
        "web-abc-0", {PROXY_CONSTRAINTS_ANNOTATION: SPREAD_BY_CLUSTER})))
    await world.settle()
    [elect] = world.bus.pending("elect")
    cache.lag()
    handling = asyncio.ensure_future(world.bus.deliver_together((elect, 0), (world.bus.duplicate(elect), 0)))
    for _ in range(5000):  # the copy tries to write too, if nothing holds it back, before the watch shows any
        await asyncio.sleep(0)
        if len(world.placement_writes(proxy)) == 2:
            break
    await cache.flush()
    deliveries = await asyncio.wait_for(handling, 10)
    assert all(d.acked for d in deliveries)
    assert Placement.of(world.proxy(proxy)).target is not None


async def test_a_burst_of_8_replicas_spread_with_max_skew_1_splits_4_4(world: World) -> None:
    for target in TARGETS:
        world.c1.put("nodes", virtual_node(target))
    await world.settle()
    # With a preference for c2 besides, every pod would go to c2 but for the spread.
    prefer_c2 = {**json.loads(SPREAD_BY_CLUSTER), "affinity": {"nodeAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 10, "preference": {"matchExpressions": [
            {"key": CLUSTER_TARGET_NAME_LABEL, "operator": "In", "values": ["c2"]}]}}]}}}
    proxies = await burst(world, 8, {PROXY_CONSTRAINTS_ANNOTATION: json.dumps(prefer_c2)}, lagging_cache=True)
    assert split_of(proxies) == {"c2": 4, "c3": 4}
    # one write each, none withdrawn: the process's own choices counted before its cache showed them
    assert [world.placement_writes(p) for p in proxies] == [[200]] * 8
    assert all(world.delegate(Placement.of(p).target or "", p) is not None for p in proxies)


async def test_a_burst_split_by_weights_1_to_3_from_the_namespace_goes_2_6_and_a_pods_own_weights_win(
        world: World) -> None:
    namespace = world.c1.find("namespaces", "", NS)
    assert namespace is not None
    namespace["metadata"]["annotations"] = {CLUSTER_WEIGHTS_ANNOTATION: "c2=1,c3=3"}
    world.c1.put("namespaces", namespace)
    await world.settle()
    proxies = await burst(world, 8)
    assert split_of(proxies) == {"c2": 2, "c3": 6}
    own = await world.c1.create(pod_path(NS), admitted(replica_pod("own", {CLUSTER_WEIGHTS_ANNOTATION: "c2=1"},
                                                                   replica_set="own-xyz")))
    await world.settle()
    await world.run()
    assert Placement.of(world.proxy(own)).target == "c2"


async def test_weights_split_a_burst_2_6_even_when_the_cache_has_not_seen_its_pods_yet(world: World) -> None:
    # The elect messages come first: the pods' controller must come from them, not from the cache, or
    # pods the cache has not seen form sets of their own and the split drifts (3 of 8 in c1 instead of 2, in CI).
    namespace = world.c1.find("namespaces", "", NS)
    assert namespace is not None
    namespace["metadata"]["annotations"] = {CLUSTER_WEIGHTS_ANNOTATION: "c2=1,c3=3"}
    world.c1.put("namespaces", namespace)
    await world.settle()
    proxies = await burst(world, 8, unseen=2)
    assert split_of(proxies) == {"c2": 2, "c3": 6}


async def test_malformed_namespace_weights_leave_the_pod_pending_and_say_why(world: World) -> None:
    namespace = world.c1.find("namespaces", "", NS)
    assert namespace is not None
    namespace["metadata"]["annotations"] = {CLUSTER_WEIGHTS_ANNOTATION: "c2=1;c3=3"}  # the webhook sees pods only
    world.c1.put("namespaces", namespace)
    await world.settle()
    proxy = await world.create_proxy()
    await world.run()
    scheduled = condition(world.proxy(proxy), "PodScheduled")
    assert scheduled is not None and scheduled["status"] == "False"
    assert f"c2: excluded: the namespace's annotation {CLUSTER_WEIGHTS_ANNOTATION}: 'c2=1;c3=3' is not " \
        "<cluster>=<weight>" in scheduled["message"]


async def test_a_replica_whose_cache_lags_withdraws_a_choice_that_overshoots_max_skew(world: World) -> None:
    for target in TARGETS:
        world.c1.put("nodes", virtual_node(target))
    await world.settle()
    first = world.runtimes[1]
    second, _ = await world.add_proxy_scheduler()
    await world.settle()
    await owner(second.fake_bus, "proxy-scheduler", ProxyScheduler).counts[SOURCE].activate(5.0)
    lagging = world.informer(second, SOURCE)  # the second replica's proxies: it misses the first's choice
    lagging.lag()
    constrained = {PROXY_CONSTRAINTS_ANNOTATION: SPREAD_BY_CLUSTER}
    web0 = await world.c1.create(pod_path(NS), admitted(replica_pod("web-abc-0", constrained)))
    await world.settle()
    [elect] = world.bus.pending("elect")
    assert (await world.bus.deliver(elect, replica=0)).acked
    await world.settle()
    taken = Placement.of(world.proxy(web0)).target
    assert taken is not None and first is not None
    free = world.other(taken)
    second.fake_bus.unreachable.add(f"mcs.candidate.{free}")  # the second replica hears from `taken` only

    web1 = await world.c1.create(pod_path(NS), admitted(replica_pod("web-abc-1", constrained)))
    await world.settle()
    [elect] = world.bus.pending("elect")
    handling = asyncio.create_task(world.bus.deliver(elect, replica=1))
    for _ in range(1000):  # until its choice (from a cache that shows no pod anywhere) is written
        await asyncio.sleep(0)
        if world.placement_writes(web1):
            break
    assert world.placement_writes(web1) == [200]
    assert Placement.of(world.proxy(web1)).target == taken, "the race: both pods in one cluster"
    await lagging.flush()  # its own write comes back, after web-0's: it overshoots, it is withdrawn
    assert (await handling).acked
    await world.settle()
    placement = Placement.of(world.proxy(web1))
    assert placement.target is None and placement.round == 1
    assert world.placement_writes(web1) == [200, 200]
    assert world.delegate(taken, web1) is None
    scheduled = condition(world.proxy(web1), "PodScheduled")
    assert scheduled is not None and f"{taken}: excluded: topology spread" in scheduled["message"]

    second.fake_bus.unreachable.clear()
    asked = len(world.broker.requests)
    await world.retry_unschedulable()
    assert Placement.of(world.proxy(web1)).target == free
    assert {r.subject for r in world.broker.requests[asked:]} == {f"mcs.candidate.{free}"}, \
        "a cluster the spread excludes is not asked (by either replica)"
    assert world.delegate(free, web1) is not None


# -- targets choose whom they accept ------------------------------------------------------------------------------


async def test_a_target_that_does_not_accept_the_source_in_a_namespace_is_never_chosen_and_says_why(
        world: World) -> None:
    world.clusters["c2"].forbidden_namespaces.add(NS)  # c2 has no Source in NS, nor a ClusterSource for us
    proxy = await world.create_proxy()
    answer = await world.target_schedulers["c2"].on_candidate(CandidateRequest(proxy=ref(proxy), pod=proxy))
    assert isinstance(answer, CandidateReply) and not answer.fits
    assert answer.reason == f"cluster c2 does not accept this source's pods in namespace {NS} " \
        "(no Source there nor ClusterSource names this source's identity)"
    await world.run()
    placement = Placement.of(world.proxy(proxy))
    assert (placement.target, placement.round, dict(placement.rejections)) == ("c3", 1, {}), \
        "c2 must be left out by its estimate, not tried and refused"
    assert world.delegates("c2") == [] and world.delegate("c3", proxy) is not None

    world.clusters["c3"].forbidden_namespaces.add(NS)
    world.target_schedulers["c3"].acceptance.clear()  # what c3's RBAC said is remembered for a while
    waiting = await world.create_proxy("web-1")
    await world.run()
    scheduled = condition(world.proxy(waiting), "PodScheduled")
    assert scheduled is not None and scheduled["status"] == "False"
    for target in TARGETS:
        assert f"cluster {target} does not accept this source's pods in namespace {NS}" in scheduled["message"]
    assert world.delegate("c2", waiting) is None and world.delegate("c3", waiting) is None


async def test_a_target_whose_admission_refuses_one_delegate_refuses_that_pod_not_the_namespace(
        world: World) -> None:
    """A 403 from admission (a quota, Pod Security, an unknown PriorityClass) is about this pod: its
    reason is recorded and the pod goes elsewhere, and the namespace's other pods are still welcome."""
    proxy, target = await world.chosen()
    world.clusters[target].fail("POST", pod_path(NS), status=403, times=1)
    await world.run("delegate")
    placement = Placement.of(world.proxy(proxy))
    assert placement.target is None and "does not accept" not in placement.rejections[target].reason
    other = await world.create_proxy("web-1")
    answer = await world.target_schedulers[target].on_candidate(CandidateRequest(proxy=ref(other),
                                                                                  pod=user_pod("web-1")))
    assert isinstance(answer, CandidateReply) and answer.fits, answer


async def test_a_target_whose_rbac_refuses_the_delegate_after_the_estimate_is_recorded_as_refusing(
        world: World) -> None:
    proxy, target = await world.chosen()
    world.clusters[target].forbidden_namespaces.add(NS)  # its Source was deleted between estimate and create
    await world.run("delegate")
    placement = Placement.of(world.proxy(proxy))
    assert placement.target is None and "does not accept" in placement.rejections[target].reason
    assert "DelegateRefused" in reasons(world.c1, proxy)
    await world.run()
    other = world.other(target)
    assert Placement.of(world.proxy(proxy)).target == other and world.delegate(other, proxy) is not None
    assert world.delegates(target) == []


# -- a pod lives once -----------------------------------------------------------------------------------------------


async def test_a_running_delegate_deleted_by_someone_ends_its_proxy(world: World) -> None:
    proxy, target = await world.running()
    name = delegate_name(proxy["metadata"]["name"], proxy["metadata"]["uid"])

    await world.clusters[target].delete(pod_path(NS, name))  # kubectl delete pod in the target
    await world.run()

    assert world.c1.pod(NS, proxy["metadata"]["name"]) is None
    assert "DelegateDeleted" in reasons(world.c1, proxy)
    assert world.delegates(target) == [] and world.bus.pending("delegate") == []


async def test_a_late_deletion_message_ends_nothing_once_a_delegate_of_that_name_runs_again(world: World) -> None:
    proxy, target = await world.running()
    ref_ = ref(proxy)
    name = delegate_name(proxy["metadata"]["name"], proxy["metadata"]["uid"])
    # The deletion of an earlier incarnation of the delegate (an earlier round in this cluster), late.
    late = StatusUpdate(proxy=ref_, target=target, delegate_name=name, delegate_uid="an-earlier-one", status={},
                        gone=True, round=Placement.of(world.proxy(proxy)).round)
    await world.bus.publish(f"mcs.status.{SOURCE}.{partition_of(proxy['metadata']['labels'])}", late, "late")
    await world.run()
    assert world.c1.pod(NS, proxy["metadata"]["name"]) is not None  # its delegate runs: the pod lives on


async def test_a_delegate_deleted_and_made_again_under_its_name_is_reported_both_times(world: World) -> None:
    proxy, target = await world.running()
    name = delegate_name(proxy["metadata"]["name"], proxy["metadata"]["uid"])
    delegates = world.clusters[target]
    again = {**delegates.find("pods", NS, name), "status": {}}
    again["metadata"] = {k: v for k, v in again["metadata"].items() if k not in ("uid", "resourceVersion")}
    again["spec"] = {k: v for k, v in again["spec"].items() if k != "nodeName"}
    world.feedback.scheduled_fold_seconds = 60.0  # only the deletion and the start are reported here
    # Deleted, made again under the same name (a new uid), placed and started, all before the
    # process publishes: its one queued key carries both the deletion and the new delegate.
    delegates.remove("pods", NS, name)
    delegates.put("pods", again)
    delegates.bind_pod(NS, name, f"{target}-n1")
    delegates.set_pod_phase(NS, name, "Running")
    await world.settle()
    published = [e.message for e in world.bus.pending("status")]
    assert [m.gone for m in published if isinstance(m, StatusUpdate)] == [True, False]
    assert isinstance(published[1], StatusUpdate)
    assert published[1].delegate_uid == delegates.find("pods", NS, name)["metadata"]["uid"]


async def test_a_finished_proxy_keeps_its_status_when_its_delegate_is_deleted(world: World) -> None:
    proxy, target = await world.running()
    await world.kubelet(target, proxy, "Succeeded")
    finished = world.proxy(proxy)
    assert finished["status"]["phase"] == "Succeeded"
    name = delegate_name(proxy["metadata"]["name"], proxy["metadata"]["uid"])

    await world.clusters[target].delete(pod_path(NS, name))
    await world.run()
    await world.feedback.resync()
    await world.settle()

    kept = world.proxy(proxy)
    assert not kept["metadata"].get("deletionTimestamp")
    assert kept["status"] == finished["status"]
    assert PROXY_FINALIZER in kept["metadata"]["finalizers"]
    assert world.bus.pending() == []  # the resync asks for no delegate


async def test_a_delegate_deleted_once_finished_ends_nothing_even_before_its_final_status_is_mirrored(
        world: World) -> None:
    """Its "gone" message carries the final status; the Succeeded message is handled after it (it failed
    once, say): the proxy shows Succeeded and lives on, so its Job counts it done and runs nothing again."""
    proxy, target = await world.running()
    name = delegate_name(proxy["metadata"]["name"], proxy["metadata"]["uid"])
    world.clusters[target].set_pod_phase(NS, name, "Succeeded")
    await world.settle()
    await world.clusters[target].delete(pod_path(NS, name))  # pod garbage collection, moments later
    await world.settle()
    [gone] = [e for e in world.bus.pending("status") if isinstance(e.message, StatusUpdate) and e.message.gone]
    assert isinstance(gone.message, StatusUpdate) and gone.message.status.get("phase") == "Succeeded"
    assert (await world.bus.deliver(gone)).acked
    await world.settle()
    assert world.proxy(proxy)["status"]["phase"] == "Succeeded"
    await world.run()  # the Succeeded message, late
    kept = world.proxy(proxy)
    assert kept["status"]["phase"] == "Succeeded" and not kept["metadata"].get("deletionTimestamp")


async def test_a_delegate_that_finishes_and_goes_at_once_gives_its_proxy_the_final_status(world: World) -> None:
    """Both changes reach feedback's delegate cache together, so only the deletion is published."""
    proxy, target = await world.running()
    name = delegate_name(proxy["metadata"]["name"], proxy["metadata"]["uid"])
    delegates = world.informer(world.feedback_rt, target)
    delegates.lag()
    world.clusters[target].set_pod_phase(NS, name, "Succeeded")
    await world.clusters[target].delete(pod_path(NS, name))
    await world.settle()
    await delegates.flush()
    await world.settle()
    assert [m.gone for m in (e.message for e in world.bus.pending("status")) if isinstance(m, StatusUpdate)] == [True]
    await world.run()
    kept = world.proxy(proxy)
    assert kept["status"]["phase"] == "Succeeded" and not kept["metadata"].get("deletionTimestamp")


async def test_a_redelivered_delegate_request_never_recreates_the_delegate_of_a_finished_pod(world: World) -> None:
    proxy, target = await world.running()
    [request] = [e for e in world.broker.published if e.kind == "delegate"]
    await world.kubelet(target, proxy, "Succeeded")
    await world.clusters[target].delete(pod_path(NS, delegate_name(proxy["metadata"]["name"],
                                                                   proxy["metadata"]["uid"])))
    await world.settle()

    redelivered = world.bus.duplicate(request)  # e.g. its first ack was lost
    assert (await world.bus.deliver(redelivered)).acked
    await world.settle()

    assert world.delegates(target) == []
    assert world.proxy(proxy)["status"]["phase"] == "Succeeded"


# -- late, duplicated and reordered status messages ---------------------------------------------------------------


async def running_in_two_steps(world: World) -> tuple[JSON, str, list[Envelope]]:
    """A bound proxy whose delegate reported ContainerCreating, then Running: their two status messages."""
    proxy, target = await world.place()
    await world.schedule(target, proxy)
    name = delegate_name(proxy["metadata"]["name"], proxy["metadata"]["uid"])

    def creating(pod: JSON) -> None:
        pod["status"]["containerStatuses"] = [{"name": "app", "image": "busybox", "ready": False, "restartCount": 0,
                                               "state": {"waiting": {"reason": "ContainerCreating"}}}]

    world.clusters[target].modify("pods", NS, name, creating)
    await world.settle()
    world.clusters[target].set_pod_phase(NS, name, "Running")
    await world.settle()
    messages = world.bus.pending("status")
    assert len(messages) == 2
    return proxy, target, messages


async def test_an_older_status_message_handled_after_a_newer_one_changes_nothing(world: World) -> None:
    proxy, _target, (older, newer) = await running_in_two_steps(world)

    assert (await world.bus.deliver(newer)).acked
    await world.settle()
    running = world.proxy(proxy)
    assert running["status"]["phase"] == "Running"
    assert (await world.bus.deliver(older)).acked
    await world.settle()
    assert world.proxy(proxy) == running


async def test_an_older_status_message_handled_long_after_a_newer_one_changes_nothing(world: World) -> None:
    """It failed a few times first (back-off 1, 2, 4, 8, 16 s): later than the memory of a write made
    moments ago, but still older than what was written."""
    proxy, _target, (older, newer) = await running_in_two_steps(world)
    assert (await world.bus.deliver(newer)).acked
    await world.settle()
    running = world.proxy(proxy)
    uid = proxy["metadata"]["uid"]
    world.feedback.mirrored[uid] = dataclasses.replace(world.feedback.mirrored[uid],
                                                       at=world.feedback.mirrored[uid].at - 60.0)
    assert (await world.bus.deliver(older)).acked
    await world.settle()
    assert world.proxy(proxy) == running


async def test_a_drained_proxy_s_siblings_in_other_partitions_are_listed_once_a_second_from_the_watch_cache(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process owning some partitions lists the namespace's proxies to count a drained pod's siblings;
    every drained proxy asks every second, so the list is shared and read from the API server's cache."""
    proxies = [await world.create_proxy(f"web-{i}") for i in range(3)]
    monkeypatch.setattr(world.feedback.rt, "shares", Shares(frozenset({Share(SOURCE, 0)}), ("a", "b")))
    gets: list[tuple[str, Any]] = []
    answering = world.c1.get

    async def get(path: str, **params: Any) -> JSON:
        gets.append((path, params.get("resourceVersion")))
        return await answering(path, **params)

    monkeypatch.setattr(world.c1, "get", get)
    for _ in range(5):
        siblings = await world.feedback._proxies_of_namespace(SOURCE, NS)
    assert sorted(p["metadata"]["name"] for p in siblings) == sorted(p["metadata"]["name"] for p in proxies)
    assert gets == [(f"/api/v1/namespaces/{NS}/pods", "0")]


async def test_a_source_that_drops_status_fields_it_does_not_know_is_not_written_again_at_every_digest(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A source older than its targets drops the fields it does not know (here hostIPs): the proxy never
    shows the delegate's fingerprint, and the digests must not take that for a lost message each time."""
    answering = world.c1.request

    async def request(method: str, path: str, params: Any = None, body: Any = None,
                      content_type: str = "application/json") -> JSON:
        if path.endswith("/status") and isinstance(body, dict):
            body = {**body, "status": {k: v for k, v in (body.get("status") or {}).items() if k != "hostIPs"}}
        return await answering(method, path, params, body, content_type)

    monkeypatch.setattr(world.c1, "request", request)
    proxy, _ = await world.running()
    assert "hostIPs" not in world.proxy(proxy)["status"]
    status_writes = len([c for c in world.c1.writes() if c.path.endswith("/status")])
    for _ in range(3):
        await world.feedback.resync()
        await world.run()
    assert len([c for c in world.c1.writes() if c.path.endswith("/status")]) == status_writes


async def test_a_late_status_message_of_an_earlier_round_s_delegate_changes_nothing(world: World) -> None:
    """Refused in a cluster, then sent there again: news of the first delegate, late, is not the pod's."""
    proxy, _target, (_, newer) = await running_in_two_steps(world)
    assert (await world.bus.deliver(newer)).acked
    await world.settle()
    running = world.proxy(proxy)
    assert isinstance(newer.message, StatusUpdate) and newer.message.round is not None
    earlier = newer.message.model_copy(update={
        "round": newer.message.round - 1, "delegate_uid": "uid-of-the-refused-delegate",
        "delegate_resource_version": "999999", "status": {**newer.message.status, "phase": "Pending"}})
    await world.bus.publish(newer.subject, earlier, "status:earlier")
    await world.run()
    assert world.proxy(proxy) == running


async def test_a_late_status_message_never_turns_a_finished_pod_back(world: World) -> None:
    proxy, target = await world.running()
    [running] = [e for e in world.broker.published if isinstance(e.message, StatusUpdate)
                 and e.message.status.get("phase") == "Running"]
    await world.kubelet(target, proxy, "Succeeded")
    finished = world.proxy(proxy)
    assert finished["status"]["phase"] == "Succeeded"
    await world.clusters[target].delete(pod_path(NS, delegate_name(proxy["metadata"]["name"],
                                                                   proxy["metadata"]["uid"])))
    await world.settle()  # feedback's cache no longer has the delegate to compare with

    assert (await world.bus.deliver(world.bus.duplicate(running))).acked
    await world.settle()
    assert world.proxy(proxy) == finished


async def test_an_older_status_message_never_turns_a_status_back_on_a_replica_whose_cache_lags(
        world: World) -> None:
    replica, _ = await world.add_feedback()
    await world.settle()
    world.informer(replica, world.targets[0]).lag()
    world.informer(replica, world.targets[1]).lag()
    proxy, _target, (older, newer) = await running_in_two_steps(world)
    durable = f"feedback-{SOURCE}-{newer.subject.rsplit('.', 1)[1]}"  # the partition's
    index = [c.client for c in world.broker.consumers[durable]].index(replica.fake_bus.client_name)

    assert (await world.bus.deliver(newer, replica=index)).acked
    await world.settle()
    assert world.proxy(proxy)["status"]["phase"] == "Running"
    assert (await world.bus.deliver(older, replica=index)).acked
    await world.settle()
    assert world.proxy(proxy)["status"]["phase"] == "Running"
    assert world.proxy(proxy)["status"]["containerStatuses"][0]["state"].keys() == {"running"}


async def test_duplicated_and_reordered_messages_change_nothing_further(world: World) -> None:
    proxy, target = await world.place()
    await world.refuse(target, proxy)
    await world.run()
    other = world.other(target)
    await world.schedule(other, proxy)
    await world.kubelet(other, proxy, "Running")
    assert world.proxy(proxy)["spec"]["nodeName"] == f"admiralty-{other}"
    before = world.snapshot()
    kinds = {e.kind for e in world.broker.published}
    assert kinds == {"elect", "delegate", "status"}

    for envelope in reversed(list(world.broker.published)):  # every message again, newest first
        world.bus.duplicate(envelope)
    deliveries = await world.run()

    assert deliveries and all(d.acked for d in deliveries)
    assert world.snapshot() == before
    assert world.bus.pending() == []
    # and published again under the same ids, they are dropped
    for envelope in world.broker.published[:3]:
        assert envelope.msg_id is not None
        await world.bus.publish(envelope.subject, envelope.message, envelope.msg_id)
    assert world.bus.pending() == []


# -- strays --------------------------------------------------------------------------------------------------------


async def stray(world: World, proxy: JSON, target: str) -> JSON:
    """A delegate of ``proxy`` in ``target``, as a stale request that raced a refusal would have made it."""
    cluster = world.clusters[target]
    if cluster.find("namespaces", "", NS) is None:
        await cluster.create("/api/v1/namespaces", {"metadata": {"name": NS}})
    namespace = cluster.find("namespaces", "", NS)
    manifest = delegate_manifest(source_manifest(proxy), source=SOURCE, namespace=NS,
                                 proxy_name=proxy["metadata"]["name"], proxy_uid=proxy["metadata"]["uid"],
                                 owner=namespace)
    created = await cluster.create(pod_path(NS), manifest)
    await world.settle()
    return created


async def test_a_delegate_in_a_target_its_proxy_did_not_choose_is_removed(world: World) -> None:
    proxy, target = await world.place()
    other = world.other(target)

    await stray(world, proxy, other)  # found by the resync
    await world.feedback.resync()
    await world.settle()
    assert world.delegates(other) == []

    again = await stray(world, proxy, other)  # found when the target's scheduler places it
    world.clusters[other].bind_pod(NS, again["metadata"]["name"], f"{other}-n1")
    await world.settle()
    await world.run()
    assert world.delegates(other) == []
    assert world.delegate(target, proxy) is not None
    assert not world.proxy(proxy)["spec"].get("nodeName")


async def lagging_after_a_second_choice(world: World) -> tuple[JSON, str, FakeInformer]:
    """A proxy refused by one target and placed in the other, while feedback's proxy cache shows the first choice."""
    proxy, target = await world.place()
    proxy_cache = world.informer(world.feedback_rt, SOURCE)
    proxy_cache.lag()
    await world.refuse(target, proxy)
    await world.run()
    other = world.other(target)
    assert Placement.of(world.proxy(proxy)).target == other and world.delegate(other, proxy) is not None
    assert Placement.of(proxy_cache.store[f"{NS}/{proxy['metadata']['name']}"]).target == target
    return proxy, other, proxy_cache


async def test_a_delegate_is_not_removed_on_a_lagging_cache_s_word_alone(world: World) -> None:
    proxy, placed, proxy_cache = await lagging_after_a_second_choice(world)

    await world.feedback.resync()
    await world.settle()
    assert world.delegate(placed, proxy) is not None

    world.clusters[placed].bind_pod(NS, delegate_name(proxy["metadata"]["name"], proxy["metadata"]["uid"]),
                                    f"{placed}-n1")
    await world.settle()
    await world.run()
    assert world.delegate(placed, proxy) is not None
    assert not world.proxy(proxy)["metadata"].get("deletionTimestamp")

    await proxy_cache.flush()
    await world.settle()
    await world.feedback.resync()  # the cache caught up: the resync re-publishes the status
    await world.run()
    assert world.proxy(proxy)["spec"]["nodeName"] == f"admiralty-{placed}"


async def test_a_scheduled_delegate_binds_its_proxy_even_when_feedback_s_proxy_cache_lags(world: World) -> None:
    proxy, placed, _ = await lagging_after_a_second_choice(world)

    world.clusters[placed].bind_pod(NS, delegate_name(proxy["metadata"]["name"], proxy["metadata"]["uid"]),
                                    f"{placed}-n1")
    await world.settle()
    [status] = world.bus.pending("status")
    delivery = await world.bus.deliver(status)
    await world.settle()

    assert delivery.retried or world.proxy(proxy)["spec"].get("nodeName") == f"admiralty-{placed}"


# -- targets removed at runtime (a ClusterTarget deleted) ----------------------------------------------


async def test_a_proxy_whose_chosen_cluster_was_removed_is_placed_again_among_the_others(world: World) -> None:
    proxy = await world.c1.create(pod_path(NS), admitted(user_pod("web-0")))
    chosen = Placement().choose("gone").patch("0")["metadata"]["annotations"]
    world.c1.modify("pods", NS, "web-0", lambda pod: pod["metadata"]["annotations"].update(chosen))
    await world.settle()
    await world.run()
    assert Placement.of(world.proxy(proxy)).target == "gone"
    # A copy of its elect message (a redelivery, a resync's) finds a cluster that is no target any more.
    await world.bus.publish("mcs.elect.c1", ElectMessage(proxy=ref(proxy), reason="resync"), "elect:again")
    await world.run()
    placement = Placement.of(world.proxy(proxy))
    assert placement.target in TARGETS
    assert world.delegate(placement.target, proxy) is not None


async def test_a_virtual_node_of_a_removed_target_goes_with_its_proxies_and_nothing_else(world: World) -> None:
    running, target = await world.running()
    world.c1.put("nodes", virtual_node("gone"))
    stranded = world.c1.put("pods", {**admitted(user_pod("stranded")), "spec": {
        **admitted(user_pod("stranded"))["spec"], "nodeName": "admiralty-gone"}})
    await world.settle()
    incomplete = TargetDirectory(world.settings, {}, 1.0)
    incomplete.current = Resolution(complete=False)  # a source could not be read: nothing may go
    world.feedback.rt.directory = incomplete
    await world.feedback.remove_unknown_virtual_nodes()
    assert world.c1.find("nodes", "", "admiralty-gone") is not None

    world.feedback.rt.directory = None  # the settings alone: "gone" is no target
    await world.feedback.remove_unknown_virtual_nodes()
    await world.settle()
    await world.run()
    assert world.c1.find("nodes", "", "admiralty-gone") is None
    assert world.c1.pod(NS, "stranded") is None, "its proxy is deleted (its controller replaces it)"
    assert world.proxy(running)["spec"]["nodeName"] == f"admiralty-{target}", "a known target's pods stay"
    assert world.delegate(target, running) is not None
    assert stranded["metadata"]["finalizers"], "the proxy's finalizer let it go: its cluster is unknown now"


async def test_two_cluster_keys_naming_one_cluster_leave_each_other_s_delegates_alone() -> None:
    """A Target per namespace, both naming one cluster: each key's reconcilers see the other's delegates
    in that cluster and must not take them for strays of their own."""
    world = World()
    world.clusters["c3"] = world.clusters["c2"]
    await world.start()
    try:
        placed = [await world.place(f"web-{i}") for i in range(6)]
        assert {target for _, target in placed} == {"c2", "c3"}, "both keys used"
        for proxy, target in placed:
            await world.schedule(target, proxy)
            await world.kubelet(target, proxy, "Running")
        await world.feedback.resync()
        await world.settle()
        await world.run()
        for proxy, target in placed:
            assert world.delegate(target, proxy) is not None, f"{proxy['metadata']['name']}'s delegate was removed"
            current = world.proxy(proxy)
            assert current["spec"]["nodeName"] == f"admiralty-{target}" and current["status"]["phase"] == "Running"
        assert world.problems() == []
    finally:
        await world.close()


async def test_the_proxy_scheduler_watches_proxies_only_once_a_pod_counts_them(world: World) -> None:
    def proxy_watches() -> list[FakeInformer]:
        return [i for i in world.runtimes[1].fake_informers(SOURCE, "pods")]

    await world.place("plain")
    assert proxy_watches() == []  # no spread constraints, no weights: nothing to count, nothing watched
    for target in TARGETS:
        world.c1.put("nodes", virtual_node(target))
    await world.settle()
    spread = await world.c1.create(pod_path(NS), admitted(
        replica_pod("web-abc-0", {PROXY_CONSTRAINTS_ANNOTATION: SPREAD_BY_CLUSTER})))
    await world.run()
    assert Placement.of(world.proxy(spread)).target is not None
    [watch] = proxy_watches()
    assert watch.field_selector == f"spec.schedulerName={PROXY_SCHEDULER_NAME}"


async def test_feedback_processes_sharing_partitions_each_handle_only_their_own_proxies(world: World) -> None:
    """Two feedback processes with the shares two members compute: each watches only its partitions'
    proxies and takes only their status messages, and watches only its own targets' delegates and
    virtual nodes; a status goes from the process watching the delegate's target to the one owning
    its proxy's partition. Together every pod ends Running."""
    await world.feedback_rt.close()
    world.runtimes.remove(world.feedback_rt)
    members = ("feedback@a", "feedback@b")
    processes = []
    for me in members:
        rt = world.runtime("feedback")
        rt.shares = Shares(stage_assignment("feedback", [SOURCE], list(TARGETS), members, me), members)
        await feedback(rt)
        processes.append((rt, next(c.handler.__self__ for cs in world.broker.consumers.values() for c in cs
                                   if c.client == rt.fake_bus.client_name)))
    await world.settle()
    placed = [await world.place(f"web-{i}") for i in range(12)]
    for proxy, target in placed:
        await world.schedule(target, proxy)
        await world.kubelet(target, proxy, "Running")
    for proxy, target in placed:
        assert world.proxy(proxy)["status"]["phase"] == "Running"
        assert world.proxy(proxy)["spec"]["nodeName"] == f"admiralty-{target}"
    by_partition = {p["metadata"]["uid"]: partition_of(p["metadata"]["labels"]) for p, _ in placed}
    assert len(set(by_partition.values())) > 1  # the 12 pods fall in several partitions
    for rt, service in processes:
        mine = rt.shares.partitions(SOURCE)
        assert mine
        cached = {p["metadata"]["uid"] for p in service.proxies[SOURCE].items()}
        assert cached == {uid for uid, partition in by_partition.items() if partition in mine}
        owned_targets = {s.cluster for s in rt.shares.owned or () if s.partition is None}
        assert set(service.delegates) == owned_targets  # every delegate of its targets, of any partition
        for target in owned_targets:
            assert {d["metadata"]["labels"][PARENT_UID_LABEL] for d in service.delegates[target].items()} == \
                {p["metadata"]["uid"] for p, t in placed if t == target}
        consumed = {c.durable for cs in world.broker.consumers.values() for c in cs
                    if c.client == rt.fake_bus.client_name}
        assert consumed == {f"feedback-{SOURCE}-{p}" for p in mine}
        assert set(service.nodes) == {s.cluster for s in rt.shares.owned or () if s.partition is None}
    statuses = [d for d in world.broker.deliveries if isinstance(d.envelope.message, StatusUpdate)]
    assert {d.envelope.subject for d in statuses} == {f"mcs.status.{SOURCE}.{p}" for p in set(by_partition.values())}
    clients = {service: rt.fake_bus.client_name for rt, service in processes}
    hand_overs = 0
    for delivery in statuses:
        update = delivery.envelope.message
        assert isinstance(update, StatusUpdate)
        [(publisher, _)] = [(rt, s) for rt, s in processes if update.target in s.delegates]
        [(writer, _)] = [(rt, s) for rt, s in processes
                         if by_partition[update.proxy.uid] in (rt.shares.partitions(SOURCE) or ())]
        assert delivery.envelope.publisher == publisher.fake_bus.client_name
        hand_overs += publisher is not writer
    assert hand_overs > 0, clients  # some statuses went from one process to the other
    assert world.problems() == []
