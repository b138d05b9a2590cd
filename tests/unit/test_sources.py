"""Admiralty's Source and ClusterSource turned into RBAC bindings (mcsched.sources), and the
source-controller's command line."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from mcsched.kube import KubeError
from mcsched.sources import AcceptanceRoles, cluster_source_bindings, source_binding, subjects, viewer_binding
from mcsched.testing import FakeCluster
from services.source_controller.__main__ import SourceController
from services.source_controller.__main__ import parse as parse_source_controller

ROLES = AcceptanceRoles.named("mcs")


def source(name: str = "c1", namespace: str = "team-a", **spec: object) -> dict[str, object]:
    return {"apiVersion": "multicluster.admiralty.io/v1alpha1", "kind": "Source",
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}"}, "spec": spec}


def cluster_source(name: str = "c1", **spec: object) -> dict[str, object]:
    return {"apiVersion": "multicluster.admiralty.io/v1alpha1", "kind": "ClusterSource",
            "metadata": {"name": name, "uid": f"uid-{name}"}, "spec": spec}


def test_a_source_grants_its_identities_the_work_role_in_its_namespace_only() -> None:
    binding = source_binding(source(serviceAccountName="c1-sa", userName="c1-user"), ROLES)
    assert binding["kind"] == "RoleBinding" and binding["metadata"]["namespace"] == "team-a"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": "mcs-accepted-source"}
    assert binding["subjects"] == [
        {"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": "c1-user"},
        {"kind": "ServiceAccount", "name": "c1-sa", "namespace": "team-a"}]  # the SA of the Source's namespace
    [owner] = binding["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"]) == ("Source", "uid-c1")  # deleted with the Source


def test_a_cluster_source_grants_work_everywhere_and_creating_namespaces() -> None:
    work, namespaces = cluster_source_bindings(
        cluster_source(serviceAccount={"name": "c1-sa", "namespace": "admiralty"}), ROLES)
    assert work["kind"] == namespaces["kind"] == "ClusterRoleBinding"
    assert (work["roleRef"]["name"], namespaces["roleRef"]["name"]) == (
        "mcs-accepted-source", "mcs-accepted-source-namespaces")
    assert work["subjects"] == [{"kind": "ServiceAccount", "name": "c1-sa", "namespace": "admiralty"}]
    assert all(b["metadata"]["ownerReferences"][0]["kind"] == "ClusterSource" for b in (work, namespaces))


def test_objects_naming_nobody_usable_grant_nothing() -> None:
    assert subjects(source()) == []
    assert subjects(cluster_source(serviceAccount={"name": "x"})) == []  # no namespace
    assert subjects(cluster_source(userName="")) == []
    assert subjects(source(serviceAccountName=7)) == []


def test_the_viewer_binding_lists_every_accepted_identity_once() -> None:
    accepted = [source(userName="c1"), source("c1b", "team-b", userName="c1"),
                cluster_source("c3", serviceAccount={"name": "c3", "namespace": "admiralty"}), source("none")]
    binding = viewer_binding(accepted, ROLES)
    assert binding["roleRef"]["name"] == "mcs-accepted-source-viewer"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "c3", "namespace": "admiralty"},
        {"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": "c1"}]
    assert viewer_binding([], ROLES)["subjects"] == []  # the last Source gone: nobody keeps reading


@pytest.mark.parametrize("seconds", ["0", "-5"])
def test_the_source_controller_refuses_a_resync_period_that_would_spin(
        seconds: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_status:
        parse_source_controller(["--resync-seconds", seconds])
    assert exit_status.value.code == 2 and "--resync-seconds must be more than 0" in capsys.readouterr().err
    assert parse_source_controller(["--resync-seconds", "0.5"]).resync_seconds == 0.5


class ListedInformer:
    """The controller's informer of Sources or ClusterSources, already listed."""

    def __init__(self, objs: list[dict[str, Any]]) -> None:
        self.objs = objs
        self.synced = asyncio.Event()
        self.synced.set()

    def items(self) -> list[dict[str, Any]]:
        return list(self.objs)

    def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def wait_synced(self, timeout: float | None = None) -> None:
        return None


def controller_of(target: FakeCluster, *sources: dict[str, object]) -> SourceController:
    controller = SourceController(target, ROLES, 60.0)
    controller.sources = ListedInformer(list(sources))  # type: ignore[assignment]
    controller.cluster_sources = ListedInformer([])  # type: ignore[assignment]
    return controller


async def test_a_source_edited_to_name_nobody_takes_back_what_it_granted() -> None:
    target = FakeCluster("c2", namespaces=("team-a",))
    await controller_of(target, source("c1", "team-a", serviceAccountName="c1-sa")).reconcile()
    assert target.find("rolebindings", "team-a", "multicluster-scheduler-source-c1")["subjects"]
    await controller_of(target, source("c1", "team-a")).reconcile()  # its administrator removed the identity
    assert target.find("rolebindings", "team-a", "multicluster-scheduler-source-c1")["subjects"] == []


async def test_a_source_naming_an_account_rbac_refuses_holds_up_no_other_grant() -> None:
    target = FakeCluster("c2", namespaces=("team-a", "team-b"))
    refused: list[str] = []
    applying = target.apply

    async def apply(path: str, body: Any, force: bool = True) -> Any:  # as RBAC validates subjects
        if any(not str(s["name"]).islower() for s in body.get("subjects") or []):
            refused.append(path)
            raise KubeError("c2", "PATCH", path, 422, json.dumps({"reason": "Invalid", "message": "bad subject"}))
        return await applying(path, body, force)

    target.apply = apply  # type: ignore[method-assign]
    await controller_of(target, source("c1", "team-a", serviceAccountName="c1-sa"),
                        source("typo", "team-b", serviceAccountName="My_SA")).reconcile()
    assert refused == []
    assert target.find("rolebindings", "team-a", "multicluster-scheduler-source-c1")["subjects"] == [
        {"kind": "ServiceAccount", "name": "c1-sa", "namespace": "team-a"}]
    assert target.find("rolebindings", "team-b", "multicluster-scheduler-source-typo")["subjects"] == []


async def test_the_source_controller_outlives_an_unexpected_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("services.source_controller.__main__.RETRY_SECONDS", 0.05)
    target = FakeCluster("c2", namespaces=("team-a",))
    controller = controller_of(target, source("c1", "team-a", serviceAccountName="c1-sa"))
    applying, calls = target.apply, []

    async def apply(path: str, body: Any, force: bool = True) -> Any:
        calls.append(path)
        if len(calls) == 1:
            raise RuntimeError("something nobody foresaw")
        return await applying(path, body, force)

    target.apply = apply  # type: ignore[method-assign]
    running = asyncio.create_task(controller.run())
    try:
        for _ in range(100):
            if target.find("rolebindings", "team-a", "multicluster-scheduler-source-c1") is not None:
                break
            await asyncio.sleep(0.05)
        assert not running.done()
        assert target.find("rolebindings", "team-a", "multicluster-scheduler-source-c1") is not None
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
