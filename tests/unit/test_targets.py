"""Admiralty's Target and ClusterTarget objects read as clusters (mcsched.targets, mcsched.targetdirectory)."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import pytest
import yaml

from mcsched.kube import KubeError
from mcsched.runtime import SettingsFile, nats_credentials
from mcsched.settings import ClusterSettings, Settings, load_settings
from mcsched.targetdirectory import QUIET_POLL_SECONDS, TargetDirectory, resolve_all, target_status
from mcsched.targets import (
    CLUSTER_TARGETS_PATH,
    TARGETS_PATH,
    TargetError,
    TargetObject,
    encode_kubeconfig,
    excluded_label,
    resolve,
    secret_ref,
)
from mcsched.testing import FakeCluster, FakeInformer

KUBECONFIG = {"apiVersion": "v1", "kind": "Config", "current-context": "c2",
              "clusters": [{"name": "c2", "cluster": {"server": "https://c2.example:6443"}}],
              "users": [{"name": "c1-in-c2", "user": {"token": "t"}}],
              "contexts": [{"name": "c2", "context": {"cluster": "c2", "user": "c1-in-c2"}},
                           {"name": "empty", "context": {"cluster": "nowhere", "user": "c1-in-c2"}}]}


def _with(kubeconfig: dict[str, Any], *, user: dict[str, Any], cluster: dict[str, Any]) -> dict[str, Any]:
    """``kubeconfig`` with these fields added to its current context's user and cluster."""
    return {**kubeconfig,
            "users": [{"name": "c1-in-c2", "user": {"token": "t", **user}}],
            "clusters": [{"name": "c2", "cluster": {"server": "https://c2.example:6443", **cluster}}]}


def cluster_target(name: str, spec: dict[str, Any], created: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    return {"apiVersion": "multicluster.admiralty.io/v1alpha1", "kind": "ClusterTarget",
            "metadata": {"name": name, "creationTimestamp": created}, "spec": spec}


def target(namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "multicluster.admiralty.io/v1alpha1", "kind": "Target",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def secret(data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "data": data}


def settings() -> Settings:
    return Settings(clusters=[{"name": "c1", "source": True, "target": True}])


def test_a_cluster_target_with_its_kubeconfig_secret_is_a_target_of_its_source_only() -> None:
    obj = cluster_target("c2", {"kubeconfigSecret": {"name": "c2", "namespace": "admiralty"},
                                "excludedLabelsRegexp": "^team="})
    origin = TargetObject.of("c1", obj)
    assert secret_ref(obj) is not None and secret_ref(obj).key == "config"  # type: ignore[union-attr]
    cluster = resolve(origin, obj, secret({"config": encode_kubeconfig(KUBECONFIG)}))
    assert (cluster.name, cluster.target, cluster.sources, cluster.namespace) == ("c2", True, ["c1"], None)
    assert cluster.kubeconfig_data == KUBECONFIG and cluster.excluded_labels_regexp == "^team="
    assert cluster.serves("c1", "any") and not cluster.serves("c3")
    assert excluded_label(cluster.excluded_labels_regexp, "team", "a")
    assert not excluded_label(cluster.excluded_labels_regexp, "topology.kubernetes.io/region", "team=")


def test_a_namespaced_target_serves_its_namespace_and_is_keyed_by_it() -> None:
    obj = target("team-a", "c2", {"kubeconfigSecret": {"name": "c2", "key": "kubeconfig", "context": "c2"}})
    origin = TargetObject.of("c1", obj)
    assert (origin.kind, origin.key) == ("Target", "team-a-c2")
    ref = secret_ref(obj)
    assert ref is not None and (ref.namespace, ref.name, ref.key) == ("team-a", "c2", "kubeconfig")
    cluster = resolve(origin, obj, secret({"kubeconfig": encode_kubeconfig(KUBECONFIG)}))
    assert cluster.context == "c2" and cluster.serves("c1", "team-a") and not cluster.serves("c1", "team-b")
    s = settings().with_targets([cluster])
    assert s.targets_for("c1", "team-a") == ["c1", "team-a-c2"] and s.targets_for("c1", "team-b") == ["c1"]
    assert s.sources_of("team-a-c2") == ["c1"]


def test_a_self_target_is_the_source_itself() -> None:
    obj = cluster_target("me", {"self": True})
    cluster = resolve(TargetObject.of("c1", obj), obj, None)
    assert cluster.same_as == "c1" and cluster.kubeconfig_data is None


@pytest.mark.parametrize(("spec", "the_secret", "reason", "words"), [
    ({}, None, "InvalidSpec", "exactly one"),
    ({"self": True, "kubeconfigSecret": {"name": "x", "namespace": "y"}}, None, "InvalidSpec", "exactly one"),
    ({"self": "yes"}, None, "InvalidSpec", "true or false"),
    ({"kubeconfigSecret": {"name": "x"}}, None, "InvalidSpec", "namespace"),
    ({"kubeconfigSecret": {"name": "", "namespace": "y"}}, None, "InvalidSpec", "name a Secret"),
    ({"kubeconfigSecret": {"name": "x", "namespace": "y"}}, None, "SecretNotFound", "y/x not found"),
    ({"kubeconfigSecret": {"name": "x", "namespace": "y"}}, {"other": "e30="}, "SecretKeyNotFound", "'config'"),
    ({"kubeconfigSecret": {"name": "x", "namespace": "y"}}, {"config": "%%%"}, "InvalidKubeconfig", "not a kubeconfig"),
    ({"kubeconfigSecret": {"name": "x", "namespace": "y"}}, {"config": base64.b64encode(b"[1, 2]").decode()},
     "InvalidKubeconfig", "YAML mapping"),
    ({"kubeconfigSecret": {"name": "x", "namespace": "y", "context": "gone"}},
     {"config": encode_kubeconfig(KUBECONFIG)}, "InvalidKubeconfig", "no context 'gone'"),
    ({"kubeconfigSecret": {"name": "x", "namespace": "y", "context": "empty"}},
     {"config": encode_kubeconfig(KUBECONFIG)}, "InvalidKubeconfig", "no cluster with a server"),
    ({"self": True, "excludedLabelsRegexp": "("}, None, "InvalidSpec", "excludedLabelsRegexp"),
    # a name that climbs out of the Secret's namespace in the request path (kube-system's admin kubeconfig)
    ({"kubeconfigSecret": {"name": "../../kube-system/secrets/admin", "namespace": "y"}}, None, "InvalidSpec",
     "DNS subdomain"),
    ({"kubeconfigSecret": {"name": "x", "namespace": "y/secrets"}}, None, "InvalidSpec", "DNS label"),
    # credentials that are not inline: a command to run, or files of the services to read and send on
    *((({"kubeconfigSecret": {"name": "x", "namespace": "y"}},
        {"config": encode_kubeconfig(_with(KUBECONFIG, user=user, cluster=cluster))}, "InvalidKubeconfig", word)
       for user, cluster, word in [
           ({"exec": {"command": "sh", "apiVersion": "client.authentication.k8s.io/v1"}}, {}, "uses exec"),
           ({"auth-provider": {"name": "oidc"}}, {}, "uses auth-provider"),
           ({"tokenFile": "/var/run/secrets/kubernetes.io/serviceaccount/token"}, {}, "uses tokenFile"),
           ({"client-certificate": "/etc/mcs/a.crt", "client-key": "/etc/mcs/a.key"}, {}, "client-certificate"),
           ({}, {"certificate-authority": "/etc/ssl/ca.crt"}, "uses certificate-authority"),
       ])),
])
def test_a_misconfigured_cluster_target_says_why(spec: dict[str, Any], the_secret: dict[str, str] | None,
                                                 reason: str, words: str) -> None:
    obj = cluster_target("c2", spec)
    with pytest.raises(TargetError) as refused:
        resolve(TargetObject.of("c1", obj), obj, None if the_secret is None else secret(the_secret))
    assert refused.value.reason == reason and words in refused.value.message, refused.value.message


def test_a_key_that_is_no_dns_label_is_refused() -> None:
    obj = target("a-rather-long-namespace-name-for-a-team", "and-a-long-target-name-too", {"self": True})
    with pytest.raises(TargetError) as refused:
        resolve(TargetObject.of("c1", obj), obj, None)
    assert refused.value.reason == "InvalidName"


def test_resolving_every_source_defers_to_the_settings_and_refuses_conflicts_oldest_first() -> None:
    good = secret({"config": encode_kubeconfig(KUBECONFIG)})
    spec = {"kubeconfigSecret": {"name": "k", "namespace": "admiralty"}}
    older = cluster_target("c2", spec, "2026-01-01T00:00:00Z")
    newer = cluster_target("c2", spec, "2026-02-01T00:00:00Z")
    named_in_settings = cluster_target("c1", {"self": True})
    s = Settings(clusters=[{"name": "c1", "source": True, "target": True}, {"name": "c3", "source": True}])
    resolution = resolve_all(s, {
        "c3": [(TargetObject.of("c3", newer), newer, good)],
        "c1": [(TargetObject.of("c1", older), older, good),
               (TargetObject.of("c1", named_in_settings), named_in_settings, None)]})
    assert [(t.name, t.sources) for t in resolution.targets] == [("c2", ["c1"])]
    assert resolution.problems[TargetObject.of("c1", older)] is None
    assert resolution.problems[TargetObject.of("c1", named_in_settings)] is None  # the settings win, no error
    conflict = resolution.problems[TargetObject.of("c3", newer)]
    assert conflict is not None and conflict.reason == "Conflict" and "ClusterTarget c2 of c1" in conflict.message
    # What a composition depends on: the same objects read again give the same fingerprint.
    again = resolve_all(s, {"c1": [(TargetObject.of("c1", older), older, good)]})
    assert again.fingerprint() == resolution.fingerprint()
    assert resolve_all(s, {}).fingerprint() != resolution.fingerprint()


def test_the_ready_condition_says_used_or_why_not() -> None:
    assert target_status(None)["conditions"][0]["status"] == "True"
    refused = target_status(TargetError("SecretNotFound", "Secret a/b not found"))["conditions"][0]
    assert (refused["status"], refused["reason"], refused["message"]) == ("False", "SecretNotFound",
                                                                        "Secret a/b not found")


def test_settings_clusters_serve_every_source_unless_limited() -> None:
    c = ClusterSettings(name="c2", target=True)
    assert c.serves("c1") and c.serves("c9", "ns")
    assert not ClusterSettings(name="c2", source=True).serves("c1")


# -- the settings file read again (sources and targets of the settings, at runtime) ------------------------


async def test_a_changed_settings_file_is_used_and_an_invalid_one_is_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "mcs.yaml"
    base = {"nats_auth": {"allow_anonymous": True}, "target_poll_seconds": 0.02,
            "clusters": [{"name": "c1", "source": True, "target": True}]}
    config.write_text(yaml.safe_dump(base))
    monkeypatch.setenv("MCS_CONFIG", str(config))
    first = load_settings()
    watched = SettingsFile("feedback", first, nats_credentials("feedback", first))
    running = asyncio.create_task(watched.run())
    try:
        config.write_text("clusters: [")  # broken YAML: logged, the running settings stay
        await asyncio.sleep(0.1)
        assert not watched.changed.is_set() and watched.settings == first
        config.write_text(yaml.safe_dump({**base, "clusters": [*base["clusters"], {"name": "c3", "source": True}]}))
        await asyncio.wait_for(watched.changed.wait(), 2)
        assert watched.settings.source_names == ["c1", "c3"]
    finally:
        running.cancel()


# -- the directory, on a fake source ---------------------------------------------------------------------


async def test_the_directory_reads_secrets_sparingly_and_keeps_its_last_answer_when_a_source_fails() -> None:
    source = FakeCluster("c1", namespaces=("default", "admiralty"))
    source.put("secrets", {"metadata": {"name": "k", "namespace": "admiralty"},
                           "data": {"config": encode_kubeconfig(KUBECONFIG)}})
    source.put("clustertargets", cluster_target("c2", {"kubeconfigSecret": {"name": "k", "namespace": "admiralty"}}))
    directory = TargetDirectory(settings(), {"c1": source}, every=1.0, informer=FakeInformer)
    try:
        for _ in range(3):
            await directory.refresh()
        assert [t.name for t in directory.current.targets] == ["c2"] and directory.current.complete
        secret_reads = [c for c in source.calls if c.method == "GET" and "/secrets/" in c.path]
        assert len(secret_reads) == 1, "a Secret is not read again at every poll"
        assert directory.changed.is_set()  # from none to c2
        directory.changed.clear()

        source.set_reachable(False)  # the source does not answer: nothing is removed
        await directory.refresh()
        assert [t.name for t in directory.current.targets] == ["c2"] and not directory.changed.is_set()
        source.set_reachable(True)
        source.remove("clustertargets", "", "c2")  # deleted: removed, and said
        await directory.refresh()
        assert directory.current.targets == [] and directory.changed.is_set()
    finally:
        await directory.close()


async def test_the_directory_reads_the_objects_when_its_watch_sees_a_change_and_rarely_otherwise() -> None:
    source = FakeCluster("c1", namespaces=("default", "admiralty"))
    source.put("secrets", {"metadata": {"name": "k", "namespace": "admiralty"},
                           "data": {"config": encode_kubeconfig(KUBECONFIG)}})
    directory = TargetDirectory(settings(), {"c1": source}, every=0.05, informer=FakeInformer)
    running = asyncio.create_task(directory.run())
    try:
        await directory.refresh()  # the first read, as the runtime does it
        for watch in directory.watches.values():
            await watch.wait_synced(5)
        assert sorted(path for _, path in directory.watches) == sorted([CLUSTER_TARGETS_PATH, TARGETS_PATH])
        assert directory.poll_seconds() == QUIET_POLL_SECONDS  # watched: no need to list every few seconds
        await asyncio.sleep(0.5)  # ten fast polls' worth
        lists = [c for c in source.calls if c.method == "GET" and c.path.endswith("/clustertargets")]
        assert len(lists) <= 2, "the objects are listed again only after a change"

        source.put("clustertargets", cluster_target("c2", {"kubeconfigSecret": {"name": "k",
                                                                               "namespace": "admiralty"}}))
        await asyncio.wait_for(directory.changed.wait(), 5)  # seen through the watch
        assert [t.name for t in directory.current.targets] == ["c2"]

        # a Target naming a Secret not there yet: read every few seconds until it appears
        source.put("clustertargets", cluster_target("c3", {"kubeconfigSecret": {"name": "later",
                                                                               "namespace": "admiralty"}}))
        for _ in range(100):
            if directory.poll_seconds() == 0.05:
                break
            await asyncio.sleep(0.05)
        assert directory.poll_seconds() == 0.05
        directory.changed.clear()
        source.put("secrets", {"metadata": {"name": "later", "namespace": "admiralty"},
                               "data": {"config": encode_kubeconfig(KUBECONFIG)}})
        await asyncio.wait_for(directory.changed.wait(), 5)
        assert sorted(t.name for t in directory.current.targets) == ["c2", "c3"]
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await directory.close()


async def test_a_source_without_the_crds_names_no_targets() -> None:
    source = FakeCluster("c1")
    real = source.request

    async def no_crds(method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        if "multicluster.admiralty.io" in path:
            raise KubeError("c1", method, path, 404, '{"reason": "NotFound", "message": "the server could not '
                            'find the requested resource"}')
        return await real(method, path, *args, **kwargs)

    source.request = no_crds  # type: ignore[method-assign]
    directory = TargetDirectory(settings(), {"c1": source}, every=1.0, informer=FakeInformer)
    await directory.refresh()
    assert directory.current.targets == [] and directory.current.complete
    assert directory.watches == {}  # nothing to watch
    assert directory.poll_seconds() == QUIET_POLL_SECONDS
