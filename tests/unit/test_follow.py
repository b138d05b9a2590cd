"""mcsched.follow: what a pod references, what our copies in a target look like."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from mcsched.constants import PARENT_CLUSTER_LABEL, PARENT_UID_LABEL
from mcsched.follow import (
    FOLLOWED_LABEL,
    LAST_APPLIED_ANNOTATION,
    SOURCE_UID_ANNOTATION,
    copy_differs,
    copy_key,
    copy_source,
    created_at,
    delegate_references,
    delegates_using,
    followed_objects,
    follower_copy,
    is_our_copy,
    referenced_objects,
    updated_copy,
)

# -- referenced_objects --------------------------------------------------------------------------


def test_every_kind_of_reference_in_every_kind_of_container() -> None:
    spec = {
        "volumes": [
            {"name": "a", "configMap": {"name": "cm-volume"}},
            {"name": "b", "secret": {"secretName": "secret-volume"}},
            {"name": "c", "projected": {"sources": [
                {"configMap": {"name": "cm-projected"}},
                {"secret": {"name": "secret-projected"}},
                {"serviceAccountToken": {"path": "token"}},
                {"downwardAPI": {"items": []}},
            ]}},
            {"name": "d", "emptyDir": {}},
        ],
        "containers": [{"name": "app", "env": [
            {"name": "A", "value": "plain"},
            {"name": "B", "valueFrom": {"configMapKeyRef": {"name": "cm-env", "key": "k"}}},
            {"name": "C", "valueFrom": {"secretKeyRef": {"name": "secret-env", "key": "k"}}},
            {"name": "D", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ]}],
        "initContainers": [{"name": "init", "envFrom": [
            {"configMapRef": {"name": "cm-envfrom"}},
            {"secretRef": {"name": "secret-envfrom"}, "prefix": "S_"},
        ]}],
        "ephemeralContainers": [{"name": "debug", "envFrom": [{"configMapRef": {"name": "cm-ephemeral"}}]}],
        "imagePullSecrets": [{"name": "registry"}],
    }
    assert referenced_objects(spec) == {
        ("ConfigMap", "cm-volume"), ("Secret", "secret-volume"),
        ("ConfigMap", "cm-projected"), ("Secret", "secret-projected"),
        ("ConfigMap", "cm-env"), ("Secret", "secret-env"),
        ("ConfigMap", "cm-envfrom"), ("Secret", "secret-envfrom"),
        ("ConfigMap", "cm-ephemeral"), ("Secret", "registry"),
    }


def test_a_configmap_and_a_secret_of_one_name_are_two_objects_and_repeats_are_one() -> None:
    spec = {"volumes": [{"name": "a", "configMap": {"name": "x"}}, {"name": "b", "secret": {"secretName": "x"}}],
            "containers": [{"name": "c", "envFrom": [{"configMapRef": {"name": "x"}}]}]}
    assert referenced_objects(spec) == {("ConfigMap", "x"), ("Secret", "x")}


@pytest.mark.parametrize("spec", [
    {},
    {"volumes": None, "containers": None, "imagePullSecrets": None},
    {"volumes": [{"name": "a", "configMap": {}}, {"name": "b", "secret": {"secretName": ""}},
                 {"name": "c", "secret": {"name": "wrong-field"}},  # a secret volume names secretName
                 {"name": "d", "projected": {"sources": None}},
                 {"name": "e", "projected": {"sources": [{"configMap": {"name": None}}, None]}}]},
    {"containers": [{"name": "c", "env": [{"name": "A", "valueFrom": {"configMapKeyRef": {"key": "k"}}},
                                          {"name": "B", "valueFrom": None}],
                     "envFrom": [{"prefix": "P_"}, {"secretRef": {}}, None]}]},
    {"imagePullSecrets": [{}, {"name": ""}]},
])
def test_entries_without_a_name_are_ignored(spec: dict[str, Any]) -> None:
    assert referenced_objects(spec) == frozenset()


def test_optional_references_are_included() -> None:
    spec = {"volumes": [{"name": "a", "configMap": {"name": "maybe", "optional": True}}]}
    assert referenced_objects(spec) == {("ConfigMap", "maybe")}


def test_the_service_account_volume_s_root_ca_is_not_followed() -> None:
    spec = {"volumes": [{"name": "kube-api-access-x1z2", "projected": {"sources": [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
    ]}}, {"name": "conf", "configMap": {"name": "app"}}]}
    assert ("ConfigMap", "kube-root-ca.crt") in referenced_objects(spec)
    assert followed_objects(spec) == {("ConfigMap", "app")}


# -- copies ----------------------------------------------------------------------------------------


def source_secret(**extra: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "db", "namespace": "ns", "uid": "u-1", "resourceVersion": "42",
            "creationTimestamp": "2024-05-01T10:00:00Z", "generation": 1,
            "labels": {"app": "web"},
            "annotations": {"team": "data", LAST_APPLIED_ANNOTATION: '{"kind": "Secret"}'},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": "p", "uid": "p-1"}],
            "finalizers": ["example.com/keep"],
            "managedFields": [{"manager": "kubectl"}],
        },
        "type": "Opaque",
        "data": {"password": base64.b64encode(b"hunter2").decode()},
        **extra,
    }


def test_follower_copy_keeps_content_and_user_metadata_and_adds_ours() -> None:
    copy = follower_copy(source_secret(immutable=True), "c1", kind="Secret")
    assert copy == {
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {
            "name": "db", "namespace": "ns",
            "labels": {"app": "web", PARENT_CLUSTER_LABEL: "c1", FOLLOWED_LABEL: "true"},
            "annotations": {"team": "data", SOURCE_UID_ANNOTATION: "u-1"},
        },
        "type": "Opaque", "data": {"password": base64.b64encode(b"hunter2").decode()}, "immutable": True,
    }
    assert is_our_copy(copy, "c1") and not is_our_copy(copy, "c3")
    assert copy_source(copy) == "c1"
    assert copy_key(copy, "Secret") == ("c1", "ns", "Secret", "db")


def test_follower_copy_of_a_configmap_takes_kind_from_the_object_and_binary_data() -> None:
    source = {"kind": "ConfigMap", "apiVersion": "v1",
              "metadata": {"name": "cfg", "namespace": "ns", "uid": "u-2"},
              "data": {"a": "1"}, "binaryData": {"b": "AA=="}}
    copy = follower_copy(source, "c1")
    assert copy["kind"] == "ConfigMap"
    assert (copy["data"], copy["binaryData"]) == ({"a": "1"}, {"b": "AA=="})
    assert "type" not in copy and "immutable" not in copy
    assert copy["metadata"]["labels"] == {PARENT_CLUSTER_LABEL: "c1", FOLLOWED_LABEL: "true"}


def test_follower_copy_folds_string_data_into_data_as_the_api_server_does() -> None:
    copy = follower_copy(source_secret(stringData={"password": "s3cret", "user": "admin"}), "c1", kind="Secret")
    assert copy["data"] == {"password": base64.b64encode(b"s3cret").decode(),
                            "user": base64.b64encode(b"admin").decode()}
    assert "stringData" not in copy


def test_follower_copy_overrides_labels_of_a_copy_made_elsewhere() -> None:
    chained = source_secret()
    chained["metadata"]["labels"] = {PARENT_CLUSTER_LABEL: "c0", FOLLOWED_LABEL: "true"}
    chained["metadata"]["annotations"] = {SOURCE_UID_ANNOTATION: "u-0"}
    copy = follower_copy(chained, "c1", kind="Secret")
    assert copy["metadata"]["labels"] == {PARENT_CLUSTER_LABEL: "c1", FOLLOWED_LABEL: "true"}
    assert copy["metadata"]["annotations"] == {SOURCE_UID_ANNOTATION: "u-1"}


def test_follower_copy_needs_a_followed_kind() -> None:
    with pytest.raises(ValueError, match="only ConfigMap and Secret"):
        follower_copy(source_secret(), "c1")
    with pytest.raises(ValueError, match="Pod"):
        follower_copy({**source_secret(), "kind": "Pod"}, "c1")


@pytest.mark.parametrize("obj", [
    {"metadata": {"name": "x"}},
    {"metadata": {"name": "x", "labels": {PARENT_CLUSTER_LABEL: "c1"}, "annotations": {SOURCE_UID_ANNOTATION: "u"}}},
    {"metadata": {"name": "x", "labels": {PARENT_CLUSTER_LABEL: "c1", FOLLOWED_LABEL: "yes"},
                  "annotations": {SOURCE_UID_ANNOTATION: "u"}}},
    # labelled by hand, without the source's uid: not ours
    {"metadata": {"name": "x", "labels": {PARENT_CLUSTER_LABEL: "c1", FOLLOWED_LABEL: "true"}}},
    {"metadata": {"name": "x", "labels": {FOLLOWED_LABEL: "true"}, "annotations": {SOURCE_UID_ANNOTATION: "u"}}},
    {"metadata": {"name": "x", "labels": None, "annotations": None}},
])
def test_objects_we_did_not_make_are_not_our_copies(obj: dict[str, Any]) -> None:
    assert not is_our_copy(obj, "c1")
    assert copy_source(obj) is None
    assert copy_key(obj, "Secret") is None


def stored(copy: dict[str, Any]) -> dict[str, Any]:
    """``copy`` as the target's API server returns it."""
    return {**copy, "metadata": {**copy["metadata"], "uid": "t-1", "resourceVersion": "7",
                                 "creationTimestamp": "2024-05-01T10:00:01Z", "managedFields": [{}]}}


def test_copy_differs_only_on_content_labels_and_annotations() -> None:
    wanted = follower_copy(source_secret(), "c1", kind="Secret")
    current = stored(wanted)
    assert not copy_differs(current, wanted)
    changed = follower_copy(source_secret(data={"password": "bmV3"}), "c1", kind="Secret")
    assert copy_differs(current, changed)
    relabelled = source_secret()
    relabelled["metadata"]["labels"] = {"app": "api"}
    assert copy_differs(current, follower_copy(relabelled, "c1", kind="Secret"))
    recreated = source_secret()
    recreated["metadata"]["uid"] = "u-2"  # deleted and created again in the source: same content
    assert copy_differs(current, follower_copy(recreated, "c1", kind="Secret"))
    assert copy_differs(current, follower_copy(source_secret(immutable=True), "c1", kind="Secret"))
    assert copy_differs(current, follower_copy(source_secret(type="kubernetes.io/tls"), "c1", kind="Secret"))


def test_copy_differs_treats_empty_and_missing_alike() -> None:
    source = {"metadata": {"name": "cfg", "namespace": "ns", "uid": "u"}, "data": {}, "immutable": False}
    wanted = follower_copy(source, "c1", kind="ConfigMap")
    current = stored(wanted)
    del current["data"]
    del current["immutable"]
    assert not copy_differs(current, wanted)
    secret = follower_copy({"metadata": {"name": "s", "namespace": "ns", "uid": "u"}}, "c1", kind="Secret")
    assert not copy_differs({**stored(secret), "type": "Opaque"}, secret)  # the server's default type


def test_updated_copy_keeps_the_target_s_metadata_and_takes_the_wanted_content() -> None:
    wanted = follower_copy(source_secret(data={"password": "bmV3"}), "c1", kind="Secret")
    current = stored(follower_copy(source_secret(binaryData={"old": "AA=="}), "c1", kind="Secret"))
    current["metadata"]["labels"]["added-in-target"] = "x"
    current["metadata"]["finalizers"] = ["target.example/keep"]
    body = updated_copy(current, wanted)
    assert body["metadata"]["uid"] == "t-1" and body["metadata"]["resourceVersion"] == "7"
    assert body["metadata"]["finalizers"] == ["target.example/keep"]
    assert body["metadata"]["labels"] == wanted["metadata"]["labels"]
    assert body["data"] == {"password": "bmV3"} and "binaryData" not in body
    assert body["kind"] == "Secret" and body["apiVersion"] == "v1"
    assert not copy_differs(body, wanted)
    assert current["data"] != body["data"]  # the input is left alone


def test_created_at() -> None:
    assert created_at({"metadata": {"creationTimestamp": "1970-01-01T00:01:00Z"}}) == 60.0
    assert created_at({"metadata": {}}) is None
    assert created_at({"metadata": {"creationTimestamp": "yesterday"}}) is None


# -- what delegates use ----------------------------------------------------------------------------


def delegate(source: str = "c1", namespace: str = "ns", phase: str = "Running", uid: str = "p-1",
             **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "web-x", "namespace": namespace, "uid": f"d-{uid}",
                         "labels": {PARENT_CLUSTER_LABEL: source, PARENT_UID_LABEL: uid}},
            "spec": {"containers": [{"name": "c"}], **spec}, "status": {"phase": phase}}


def test_delegate_references_are_keyed_by_source_and_namespace() -> None:
    pod = delegate(volumes=[{"name": "a", "configMap": {"name": "cfg"}},
                            {"name": "k", "projected": {"sources": [{"configMap": {"name": "kube-root-ca.crt"}}]}}],
                   imagePullSecrets=[{"name": "registry"}])
    assert delegate_references(pod) == {("c1", "ns", "ConfigMap", "cfg"), ("c1", "ns", "Secret", "registry")}


@pytest.mark.parametrize("pod", [
    delegate(phase="Succeeded", imagePullSecrets=[{"name": "r"}]),
    delegate(phase="Failed", imagePullSecrets=[{"name": "r"}]),
    {"metadata": {"name": "plain", "namespace": "ns", "labels": {"app": "x"}},
     "spec": {"imagePullSecrets": [{"name": "r"}]}},
    {"metadata": {"name": "half", "namespace": "ns", "labels": {PARENT_CLUSTER_LABEL: "c1"}},
     "spec": {"imagePullSecrets": [{"name": "r"}]}},
])
def test_finished_delegates_and_other_pods_use_nothing(pod: dict[str, Any]) -> None:
    assert delegate_references(pod) == frozenset()


def test_delegates_using_unions_live_delegates() -> None:
    pods = [
        delegate("c1", "ns", uid="1", imagePullSecrets=[{"name": "r"}]),
        delegate("c3", "ns", uid="2", imagePullSecrets=[{"name": "r"}]),
        delegate("c1", "other", uid="3", phase="Pending", imagePullSecrets=[{"name": "r"}]),
        delegate("c1", "ns", uid="4", phase="Succeeded", imagePullSecrets=[{"name": "gone"}]),
    ]
    assert delegates_using(pods) == {("c1", "ns", "Secret", "r"), ("c3", "ns", "Secret", "r"),
                                     ("c1", "other", "Secret", "r")}
    assert delegates_using([]) == set()


def test_the_secrets_of_volume_drivers_are_followed() -> None:
    spec = {"containers": [{"name": "app"}], "volumes": [
        {"name": "a", "csi": {"driver": "secrets-store", "nodePublishSecretRef": {"name": "csi-creds"}}},
        {"name": "b", "azureFile": {"secretName": "azure-creds", "shareName": "s"}},
        {"name": "c", "cephfs": {"monitors": ["m"], "secretRef": {"name": "ceph-creds"}}},
        {"name": "d", "rbd": {"image": "i", "monitors": ["m"], "secretRef": {"name": "rbd-creds"}}},
        {"name": "e", "flexVolume": {"driver": "x", "secretRef": {}}},  # no name: nothing
        {"name": "f", "iscsi": "not a mapping"}]}
    assert referenced_objects(spec) == {("Secret", "csi-creds"), ("Secret", "azure-creds"), ("Secret", "ceph-creds"),
                                        ("Secret", "rbd-creds")}
