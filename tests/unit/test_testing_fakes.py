"""The fakes of ``mcsched.testing`` answer as an API server and NATS would, for what they model."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from mcsched.bus import ACK, Outcome, retry_later
from mcsched.kube import JSON, KubeError, pod_path
from mcsched.models import CandidateReply, CandidateRequest, DelegateRequest, ElectMessage, PodRef
from mcsched.testing import FakeBroker, FakeBus, FakeCluster, FakeInformer, FakeRuntime, fake_settings, settle

REF = PodRef(cluster="c1", namespace="default", name="p", uid="u")


def pod(name: str = "p", **spec: Any) -> JSON:
    return {"metadata": {"name": name, "namespace": "default"},
            "spec": {"containers": [{"name": "app", "image": "busybox"}], **spec}}


async def status_of(call: Any) -> int:
    try:
        await call
    except KubeError as exc:
        return exc.status
    return 200


# -- FakeCluster -------------------------------------------------------------------------------------------


async def test_create_assigns_identity_and_refuses_duplicates_and_missing_namespaces() -> None:
    cluster = FakeCluster("c1")
    created = await cluster.create(pod_path("default"), {**pod(), "status": {"phase": "Running"}})
    assert created["metadata"]["uid"] and int(created["metadata"]["resourceVersion"]) > 100
    assert created["status"] == {"phase": "Pending"} and created["spec"]["schedulerName"] == "default-scheduler"
    assert await status_of(cluster.create(pod_path("default"), pod())) == 409
    assert await status_of(cluster.create(pod_path("nowhere"), {"metadata": {"name": "p"}, "spec": {}})) == 404
    assert await status_of(cluster.create(pod_path("kube-system"), pod())) == 400  # the body names another
    again = FakeCluster("c1")
    assert (await again.create(pod_path("default"), pod()))["metadata"]["uid"] == created["metadata"]["uid"]
    namespace = await cluster.create("/api/v1/namespaces", {"metadata": {"name": "fresh"}})
    assert namespace["status"]["phase"] == "Active"
    assert cluster.find("serviceaccounts", "fresh", "default") is not None


async def test_merge_patch_honours_the_resource_version_deletes_nulls_and_writes_nothing_unchanged() -> None:
    cluster = FakeCluster("c1")
    created = await cluster.create(pod_path("default"), {**pod(), "metadata": {
        "name": "p", "namespace": "default", "annotations": {"a": "1", "b": "2"}}})
    stale = created["metadata"]["resourceVersion"]
    patched = await cluster.merge_patch(pod_path("default", "p"), {"metadata": {
        "annotations": {"a": None, "c": "3"}, "resourceVersion": stale}})
    assert patched["metadata"]["annotations"] == {"b": "2", "c": "3"}
    assert await status_of(cluster.merge_patch(pod_path("default", "p"), {"metadata": {
        "annotations": {"d": "4"}, "resourceVersion": stale}})) == 409
    same = await cluster.merge_patch(pod_path("default", "p"), {"metadata": {"annotations": {"b": "2"}}})
    assert same["metadata"]["resourceVersion"] == patched["metadata"]["resourceVersion"]
    assert await status_of(cluster.merge_patch(pod_path("default", "p"), {"spec": {"nodeName": "n"}})) == 422
    ignored = await cluster.merge_patch(pod_path("default", "p"), {"status": {"phase": "Running"}})
    assert ignored["status"]["phase"] == "Pending"  # the status only through its subresource
    assert await status_of(cluster.merge_patch(pod_path("default", "gone"), {})) == 404


async def test_strategic_status_patch_merges_conditions_by_type() -> None:
    cluster = FakeCluster("c1")
    await cluster.create(pod_path("default"), pod())
    cluster.bind_pod("default", "p", "n1")
    patched = await cluster.strategic_patch(pod_path("default", "p", "status"), {"status": {
        "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}})
    assert {c["type"]: c["status"] for c in patched["status"]["conditions"]} == {"PodScheduled": "True",
                                                                                 "Ready": "True"}
    replaced = await cluster.merge_patch(pod_path("default", "p", "status"), {"status": {
        "conditions": [{"type": "Ready", "status": "False"}]}})
    assert [c["type"] for c in replaced["status"]["conditions"]] == ["Ready"]  # a merge patch replaces lists


async def test_binding_sets_the_node_once_for_one_incarnation() -> None:
    cluster = FakeCluster("c1")
    created = await cluster.create(pod_path("default"), pod())
    path = pod_path("default", "p", "binding")

    def binding(uid: str) -> JSON:
        return {"metadata": {"name": "p", "uid": uid}, "target": {"kind": "Node", "name": "n1"}}

    assert await status_of(cluster.create(path, binding("other"))) == 409
    await cluster.create(path, binding(created["metadata"]["uid"]))
    bound = cluster.pod("default", "p")
    assert bound is not None and bound["spec"]["nodeName"] == "n1"
    assert bound["status"]["conditions"][0]["type"] == "PodScheduled"
    assert await status_of(cluster.create(path, binding(created["metadata"]["uid"]))) == 409


async def test_deletion_preconditions_finalizers_and_kubelets() -> None:
    cluster = FakeCluster("c1")
    cluster.put("nodes", {"metadata": {"name": "real"}})
    first = await cluster.create(pod_path("default"), {**pod(), "metadata": {
        "name": "p", "namespace": "default", "finalizers": ["f"]}})
    assert await status_of(cluster.delete(pod_path("default", "p"), {"preconditions": {"uid": "x"}})) == 409
    await cluster.delete(pod_path("default", "p"), {"preconditions": {"uid": first["metadata"]["uid"]}})
    held = cluster.pod("default", "p")
    assert held is not None and held["metadata"]["deletionTimestamp"]
    await cluster.merge_patch(pod_path("default", "p"), {"metadata": {"finalizers": None}})
    assert cluster.pod("default", "p") is None

    for node, waits in (("virtual", True), ("real", False)):
        await cluster.create(pod_path("default"), pod(node))
        cluster.bind_pod("default", node, node)
        await cluster.delete(pod_path("default", node))
        assert (cluster.pod("default", node) is not None) is waits  # only a real node's kubelet confirms
        if waits:
            await cluster.delete(pod_path("default", node), {"gracePeriodSeconds": 0})
        assert cluster.pod("default", node) is None


async def test_an_informer_applies_selectors_and_lags_until_flushed() -> None:
    cluster = FakeCluster("c1")
    informer = FakeInformer(cluster, "/api/v1/pods", field_selector="spec.nodeName=", label_selector="app")
    seen: list[tuple[str, str]] = []
    informer.add_handler(lambda kind, obj, old: seen.append((kind, obj["metadata"]["name"])))
    informer.start()
    try:
        await cluster.create(pod_path("default"), {**pod("a"), "metadata": {
            "name": "a", "namespace": "default", "labels": {"app": "x"}}})
        await cluster.create(pod_path("default"), pod("b"))
        await informer.flush(0)
        for _ in range(5):
            await informer.flush(1)
        assert informer.synced.is_set() and seen == [("ADDED", "a")]

        informer.lag()
        cluster.bind_pod("default", "a", "n1")
        for _ in range(5):
            await informer.flush(0)
        assert informer.get("default/a") is not None and informer.pending == 1
        await informer.flush()
        assert seen == [("ADDED", "a"), ("DELETED", "a")] and informer.get("default/a") is None
    finally:
        await informer.stop()


# -- FakeBus -------------------------------------------------------------------------------------------------


@pytest.fixture
async def bus() -> AsyncIterator[FakeBus]:
    bus = FakeBus(FakeBroker(), client_name="me")
    yield bus
    await bus.close()


async def test_publish_deduplicates_by_id_and_refuses_subjects_without_a_stream(bus: FakeBus) -> None:
    message = DelegateRequest(proxy=REF, target="c2")
    await bus.publish("mcs.delegate.c2", message, "id-1")
    await bus.publish("mcs.delegate.c2", message, "id-1")
    assert len(bus.pending()) == 1 and bus.broker.duplicates == [("mcs.delegate.c2", "id-1")]
    bus.broker.forget_message_ids()
    await bus.publish("mcs.delegate.c2", message, "id-1")
    assert len(bus.pending()) == 2
    with pytest.raises(RuntimeError):
        await bus.publish("mcs.candidate.c2", message, "id-2")


async def test_deliveries_ack_retry_and_terminate(bus: FakeBus) -> None:
    outcomes: list[Outcome] = [retry_later(1.0, "later"), ACK]

    async def handler(message: DelegateRequest) -> Outcome:
        return outcomes.pop(0)

    bus.consume("delegate", "d", "mcs.delegate.>", DelegateRequest, handler)
    await bus.publish("mcs.delegate.c2", DelegateRequest(proxy=REF, target="c2"), "a")
    first = await bus.deliver()
    assert first.retried and first.outcome is not None and first.outcome.note == "later" and bus.pending()
    second = await bus.deliver()
    assert second.acked and not bus.pending() and second.envelope.delivered == 2

    await bus.publish("mcs.delegate.c2", ElectMessage(proxy=REF), "b")  # not what the consumer reads
    wrong = await bus.deliver()
    assert wrong.terminated and not bus.pending()


async def test_requests_reach_one_responder_unless_unreachable(bus: FakeBus) -> None:
    async def answer(request: CandidateRequest) -> CandidateReply:
        return CandidateReply(target="c2", fits=True, score=50.0)

    question = CandidateRequest(proxy=REF, pod={})
    assert await bus.request("mcs.candidate.c2", question, CandidateReply, 1.0) is None  # no responders
    await bus.respond("mcs.candidate.c2", "q", CandidateRequest, answer)
    reply = await bus.request("mcs.candidate.c2", question, CandidateReply, 1.0)
    assert reply is not None and reply.score == 50.0
    bus.unreachable.add("mcs.candidate.c2")
    assert await bus.request("mcs.candidate.c2", question, CandidateReply, 1.0) is None


async def test_a_runtime_records_crashed_spawned_tasks_and_settles() -> None:
    cluster = FakeCluster("c1")
    rt = FakeRuntime("svc", fake_settings(sources=("c1",), targets=("c1",)), FakeBus(), {"c1": cluster},
                     run_spawned=True)

    async def crash() -> None:
        raise ValueError("boom")

    rt.spawn(crash(), "crasher")
    informer = rt.informer("c1", "/api/v1/pods")
    await settle(rt)
    assert informer.synced.is_set() and [n for n, _ in rt.failures] == ["crasher"]
    await rt.close()
