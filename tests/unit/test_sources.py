"""Admiralty's Source and ClusterSource turned into RBAC bindings (mcsched.sources), and the
source-controller's command line."""

from __future__ import annotations

import pytest

from mcsched.sources import AcceptanceRoles, cluster_source_bindings, source_binding, subjects, viewer_binding
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
