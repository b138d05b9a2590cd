"""mcsched.follower.Follower against in-memory clusters (no API server).

``FakeCluster`` keeps objects by (resource, namespace, name) and answers the
few calls the Follower makes (GET, POST, PUT with a resourceVersion
precondition, DELETE with preconditions) as an API server would, including
409 and 422. ``FakeInformer`` mirrors it synchronously, or holds its events
back while paused to act as a lagging cache.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from mcsched.constants import PARENT_CLUSTER_LABEL, PARENT_UID_LABEL
from mcsched.follow import FOLLOWED_LABEL, SOURCE_UID_ANNOTATION
from mcsched.follower import Follower
from mcsched.kube import KubeError

JSON = dict[str, Any]
START = 1_700_000_000.0
GRACE = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


class FakeCluster:
    def __init__(self, name: str, clock: Clock, namespaces: tuple[str, ...] = ("ns",)) -> None:
        self.name, self.clock = name, clock
        self.objects: dict[tuple[str, str, str], JSON] = {}
        self.namespaces = set(namespaces)
        self.informers: list[FakeInformer] = []
        self.calls: list[tuple[str, str]] = []
        self._rv = 100
        self._uid = 0
        for namespace in namespaces:
            self.put("serviceaccounts", {"metadata": {"name": "default", "namespace": namespace}})

    # -- test set-up: direct changes, seen by informers --------------------------------------------

    def put(self, resource: str, obj: JSON) -> JSON:
        """Create or replace ``obj`` directly (as another actor would)."""
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        key = (resource, meta.get("namespace", ""), meta["name"])
        previous = self.objects.get(key)
        if previous is None:
            self._uid += 1
            meta.setdefault("uid", f"{self.name}-uid-{self._uid}")
            meta.setdefault("creationTimestamp", stamp(self.clock.now))
        else:
            meta["uid"] = previous["metadata"]["uid"]
            meta["creationTimestamp"] = previous["metadata"]["creationTimestamp"]
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        self.objects[key] = obj
        self._notify(resource, "MODIFIED" if previous else "ADDED", obj)
        return copy.deepcopy(obj)

    def remove(self, resource: str, namespace: str, name: str) -> None:
        obj = self.objects.pop((resource, namespace, name))
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._notify(resource, "DELETED", obj)

    def find(self, resource: str, namespace: str, name: str) -> JSON | None:
        return self.objects.get((resource, namespace, name))

    def _notify(self, resource: str, event: str, obj: JSON) -> None:
        for informer in self.informers:
            if informer.resource == resource:
                informer.deliver(event, copy.deepcopy(obj))

    # -- the KubeClient surface ----------------------------------------------------------------------

    def _error(self, method: str, path: str, status: int, reason: str) -> KubeError:
        return KubeError(self.name, method, path, status, json.dumps({"reason": reason, "message": reason}))

    @staticmethod
    def _parse(path: str) -> tuple[str, str, str | None]:
        parts = path.strip("/").split("/")  # api v1 namespaces <ns> <resource> [<name>]
        assert parts[:3] == ["api", "v1", "namespaces"], path
        return parts[4], parts[3], parts[5] if len(parts) > 5 else None

    async def get(self, path: str, **_params: Any) -> JSON:
        self.calls.append(("GET", path))
        resource, namespace, name = self._parse(path)
        obj = self.objects.get((resource, namespace, name or ""))
        if obj is None:
            raise self._error("GET", path, 404, "NotFound")
        return copy.deepcopy(obj)

    async def create(self, path: str, body: JSON) -> JSON:
        self.calls.append(("POST", path))
        resource, namespace, _ = self._parse(path)
        if namespace not in self.namespaces:
            raise self._error("POST", path, 404, "NotFound")
        if (resource, namespace, body["metadata"]["name"]) in self.objects:
            raise self._error("POST", path, 409, "AlreadyExists")
        assert "uid" not in body["metadata"] and "resourceVersion" not in body["metadata"]
        return self.put(resource, body)

    async def request(self, method: str, path: str, params: Any = None, body: Any = None,
                      content_type: str = "application/json") -> JSON:
        assert method == "PUT", method
        self.calls.append(("PUT", path))
        resource, namespace, name = self._parse(path)
        current = self.objects.get((resource, namespace, name or ""))
        if current is None:
            raise self._error("PUT", path, 404, "NotFound")
        if body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
            raise self._error("PUT", path, 409, "Conflict")
        if current.get("immutable") and any(body.get(f) != current.get(f) for f in ("data", "binaryData")):
            raise self._error("PUT", path, 422, "Invalid")
        if current.get("type", "Opaque") != body.get("type", "Opaque") and resource == "secrets":
            raise self._error("PUT", path, 422, "Invalid")
        return self.put(resource, body)

    async def delete(self, path: str, body: JSON | None = None) -> JSON:
        self.calls.append(("DELETE", path))
        resource, namespace, name = self._parse(path)
        current = self.objects.get((resource, namespace, name or ""))
        if current is None:
            raise self._error("DELETE", path, 404, "NotFound")
        for field, value in ((body or {}).get("preconditions") or {}).items():
            if value is not None and current["metadata"].get(field) != value:
                raise self._error("DELETE", path, 409, "Conflict")
        self.remove(resource, namespace, name or "")
        return {}


class FakeInformer:
    def __init__(self, client: FakeCluster, path: str, label_selector: str | None = None,
                 field_selector: str | None = None) -> None:
        self.client, self.path = client, path
        self.params = {"labelSelector": label_selector} if label_selector else {}
        self.resource = path.rstrip("/").split("/")[-1]
        self.selector = dict([label_selector.split("=", 1)]) if label_selector else {}
        self.store: dict[str, JSON] = {}
        self.handlers: list[Callable[..., Any]] = []
        self.synced = asyncio.Event()
        self.healthy = True
        self.paused = False
        self.held: list[tuple[str, JSON]] = []
        client.informers.append(self)
        for (resource, _ns, _name), obj in client.objects.items():
            if resource == self.resource and self._matches(obj):
                self.store[key_of(obj)] = copy.deepcopy(obj)
        self.synced.set()

    def _matches(self, obj: JSON) -> bool:
        labels = obj["metadata"].get("labels") or {}
        return all(labels.get(k) == v for k, v in self.selector.items())

    def add_handler(self, handler: Callable[..., Any]) -> None:
        self.handlers.append(handler)

    def get(self, key: str) -> JSON | None:
        return self.store.get(key)

    def items(self) -> list[JSON]:
        return list(self.store.values())

    async def wait_synced(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self.synced.wait(), timeout)

    def deliver(self, event: str, obj: JSON) -> None:
        if self.paused:
            self.held.append((event, obj))
            return
        key = key_of(obj)
        old = self.store.get(key)
        if event != "DELETED" and not self._matches(obj):
            if old is None:
                return
            event = "DELETED"  # no longer selected
        if event == "DELETED":
            if old is None:
                return
            self.store.pop(key, None)
        else:
            event = "MODIFIED" if old is not None else "ADDED"
            self.store[key] = obj
        for handler in self.handlers:
            assert handler(event, obj, old) is None  # handlers never wait

    def resume(self) -> None:
        self.paused = False
        held, self.held = self.held, []
        for event, obj in held:
            self.deliver(event, obj)


def key_of(obj: JSON) -> str:
    return f"{obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"


def stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeRuntime:
    def __init__(self, clusters: dict[str, FakeCluster], sources: list[str],
                 same_as: dict[str, str] | None = None) -> None:
        self.clusters = clusters
        self.settings = SimpleNamespace(source_names=sources, resync_period_seconds=3600.0, clusters=[
            SimpleNamespace(name=name, same_as=(same_as or {}).get(name)) for name in clusters])
        self.informers: list[FakeInformer] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.closers: list[Callable[[], Awaitable[None]]] = []

    def informer(self, cluster: str, path: str, **selectors: str) -> FakeInformer:
        informer = FakeInformer(self.clusters[cluster], path, **selectors)
        self.informers.append(informer)
        return informer

    def spawn(self, coro: Awaitable[None], name: str) -> None:
        self.tasks.append(asyncio.ensure_future(coro))  # type: ignore[arg-type]

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for closer in reversed(self.closers):
            await closer()


class Env:
    """Source c1 (and c3), target c2, one Follower for c2."""

    def __init__(self, grace: float = GRACE, clock: Callable[[], float] | None = None) -> None:
        self.clock = Clock()
        self.c1 = FakeCluster("c1", self.clock)
        self.c2 = FakeCluster("c2", self.clock)
        self.c3 = FakeCluster("c3", self.clock)
        self.rt = FakeRuntime({"c1": self.c1, "c2": self.c2, "c3": self.c3}, ["c1", "c3"])
        self.delegates = self.rt.informer("c2", "/api/v1/pods")
        self.follower = Follower(self.rt, "c2", self.delegates,  # type: ignore[arg-type]
                                 grace_seconds=grace, clock=clock or self.clock)

    def copies(self, resource: str = "configmaps") -> FakeInformer:
        [informer] = [i for i in self.rt.informers if i.client is self.c2 and i.resource == resource]
        return informer

    async def settle(self) -> None:
        deadline = time.monotonic() + 5
        queue = self.follower.queue
        while len(queue) or queue._active:
            assert time.monotonic() < deadline, "work queue did not settle"
            await asyncio.sleep(0.005)
        await asyncio.sleep(0)


@pytest.fixture
async def env() -> Any:
    environment = Env()
    yield environment
    await environment.rt.close()


def configmap(name: str = "cfg", data: dict[str, str] | None = None, namespace: str = "ns", **meta: Any) -> JSON:
    return {"metadata": {"name": name, "namespace": namespace, **meta}, "data": data or {"k": "v1"}}


def secret(name: str = "db", data: dict[str, str] | None = None, namespace: str = "ns", **extra: Any) -> JSON:
    return {"metadata": {"name": name, "namespace": namespace}, "type": "Opaque",
            "data": data or {"password": "aHVudGVyMg=="}, **extra}


def pod_spec(*, config_maps: tuple[str, ...] = ("cfg",), secrets: tuple[str, ...] = (),
             service_account: str | None = None) -> JSON:
    spec: JSON = {
        "containers": [{"name": "app", "image": "busybox",
                        "envFrom": [{"secretRef": {"name": s}} for s in secrets]}],
        "volumes": [{"name": f"v-{c}", "configMap": {"name": c}} for c in config_maps],
    }
    if service_account:
        spec["serviceAccountName"] = service_account
    return spec


def add_delegate(cluster: FakeCluster, spec: JSON, uid: str = "p1", source: str = "c1",
                 namespace: str = "ns") -> JSON:
    return cluster.put("pods", {
        "metadata": {"name": f"web-{uid}", "namespace": namespace,
                     "labels": {PARENT_CLUSTER_LABEL: source, PARENT_UID_LABEL: uid}},
        "spec": spec, "status": {"phase": "Running"}})


def writes(cluster: FakeCluster) -> list[tuple[str, str]]:
    return [c for c in cluster.calls if c[0] != "GET"]


# -- ensure: copying -----------------------------------------------------------------------------


async def test_ensure_copies_configmaps_and_secrets(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    env.c1.put("configmaps", configmap(labels={"app": "web"}))
    source_secret = env.c1.put("secrets", secret())
    caplog.set_level(logging.INFO, logger="mcsched.follower")

    assert await env.follower.ensure("c1", "ns", pod_spec(secrets=("db",))) is None

    cm = env.c2.find("configmaps", "ns", "cfg")
    assert cm is not None and cm["data"] == {"k": "v1"}
    assert cm["metadata"]["labels"] == {"app": "web", PARENT_CLUSTER_LABEL: "c1", FOLLOWED_LABEL: "true"}
    copied = env.c2.find("secrets", "ns", "db")
    assert copied is not None and copied["data"] == source_secret["data"] and copied["type"] == "Opaque"
    assert copied["metadata"]["annotations"] == {SOURCE_UID_ANNOTATION: source_secret["metadata"]["uid"]}
    assert "copied ConfigMap ns/cfg from c1 to c2" in caplog.text
    assert "copied Secret ns/db from c1 to c2" in caplog.text

    # a second delegate using them: nothing written
    before = len(writes(env.c2))
    assert await env.follower.ensure("c1", "ns", pod_spec(secrets=("db",))) is None
    assert len(writes(env.c2)) == before


async def test_ensure_skips_objects_missing_in_the_source_and_the_target_s_own(env: Env) -> None:
    spec = pod_spec(config_maps=("absent", "kube-root-ca.crt"))
    assert await env.follower.ensure("c1", "ns", spec) is None
    assert writes(env.c2) == []
    assert ("GET", "/api/v1/namespaces/ns/configmaps/absent") in env.c1.calls  # the cache's miss is confirmed


async def test_ensure_reads_the_source_when_its_cache_is_not_synced(env: Env) -> None:
    [informer] = [i for i in env.rt.informers if i.client is env.c1 and i.resource == "configmaps"]
    informer.synced.clear()
    informer.store.clear()
    env.c1.objects[("configmaps", "ns", "cfg")] = {**configmap(), "metadata": {
        **configmap()["metadata"], "uid": "u", "resourceVersion": "5"}}
    assert await env.follower.ensure("c1", "ns", pod_spec()) is None
    assert env.c2.find("configmaps", "ns", "cfg") is not None


async def test_ensure_does_nothing_when_the_target_is_the_source(env: Env) -> None:
    assert await env.follower.ensure("c2", "ns", pod_spec(service_account="nobody")) is None
    assert env.c2.calls == []


async def test_ensure_never_overwrites_an_object_we_did_not_make(env: Env) -> None:
    env.c1.put("secrets", secret())
    env.c2.put("secrets", secret(data={"password": "dGhlaXJz"}))
    env.c1.put("configmaps", configmap())

    reason = await env.follower.ensure("c1", "ns", pod_spec(secrets=("db",)))

    assert reason == "Secret db exists in c2/ns and was not made by multicluster-scheduler"
    assert env.c2.find("secrets", "ns", "db")["data"] == {"password": "dGhlaXJz"}  # type: ignore[index]
    assert env.c2.find("configmaps", "ns", "cfg") is not None  # the rest is copied all the same
    assert ("PUT", "/api/v1/namespaces/ns/secrets/db") not in env.c2.calls


async def test_ensure_does_not_take_over_another_source_s_copy(env: Env) -> None:
    env.c3.put("configmaps", configmap(data={"from": "c3"}))
    assert await env.follower.ensure("c3", "ns", pod_spec()) is None
    env.c1.put("configmaps", configmap(data={"from": "c1"}))

    reason = await env.follower.ensure("c1", "ns", pod_spec())

    assert reason == "ConfigMap cfg exists in c2/ns as a copy from c3"
    assert env.c2.find("configmaps", "ns", "cfg")["data"] == {"from": "c3"}  # type: ignore[index]


async def test_ensure_joins_several_reasons_on_one_line(env: Env) -> None:
    env.c1.put("configmaps", configmap("a"))
    env.c1.put("configmaps", configmap("b"))
    env.c2.put("configmaps", configmap("a"))
    env.c2.put("configmaps", configmap("b"))
    reason = await env.follower.ensure("c1", "ns", pod_spec(config_maps=("b", "a")))
    assert reason == ("ConfigMap a exists in c2/ns and was not made by multicluster-scheduler; "
                      "ConfigMap b exists in c2/ns and was not made by multicluster-scheduler")


async def test_ensure_when_the_target_cache_lags_behind_a_copy_already_made(env: Env) -> None:
    env.c1.put("configmaps", configmap())
    env.copies().paused = True
    assert await env.follower.ensure("c1", "ns", pod_spec()) is None
    assert await env.follower.ensure("c1", "ns", pod_spec()) is None  # 409, read, ours, up to date
    assert [c for c in writes(env.c2) if c[0] == "POST"] == [("POST", "/api/v1/namespaces/ns/configmaps")] * 2
    assert not [c for c in writes(env.c2) if c[0] in ("PUT", "DELETE")]


async def test_ensure_updates_a_stale_copy_after_a_conflict(env: Env) -> None:
    env.c1.put("configmaps", configmap())
    assert await env.follower.ensure("c1", "ns", pod_spec()) is None
    env.copies().paused = True  # the copy changes behind the cache's back
    copied = env.c2.find("configmaps", "ns", "cfg")
    env.c2.put("configmaps", {**copied, "data": {"k": "edited in c2"}})  # type: ignore[dict-item]
    env.c1.objects[("configmaps", "ns", "cfg")]["data"] = {"k": "v2"}  # not seen by the handler
    [informer] = [i for i in env.rt.informers if i.client is env.c1 and i.resource == "configmaps"]
    informer.store["ns/cfg"]["data"] = {"k": "v2"}

    assert await env.follower.ensure("c1", "ns", pod_spec()) is None

    assert env.c2.find("configmaps", "ns", "cfg")["data"] == {"k": "v2"}  # type: ignore[index]
    puts = [c for c in env.c2.calls if c[0] == "PUT"]
    assert len(puts) == 2  # the stale one (409), then the one after reading again


async def test_ensure_reports_a_missing_namespace(env: Env) -> None:
    env.c1.put("configmaps", configmap(namespace="new"))
    env.c2.put("serviceaccounts", {"metadata": {"name": "default", "namespace": "new"}})
    reason = await env.follower.ensure("c1", "new", pod_spec())
    assert reason == "namespace new does not exist in c2"


async def test_ensure_reports_api_errors_as_reasons(env: Env) -> None:
    env.c1.put("configmaps", configmap())

    async def forbidden(path: str, body: JSON) -> JSON:
        raise KubeError("c2", "POST", path, 403, json.dumps({"reason": "Forbidden",
                                                             "message": "configmaps is forbidden"}))

    env.c2.create = forbidden  # type: ignore[method-assign]
    reason = await env.follower.ensure("c1", "ns", pod_spec())
    assert reason == "cannot copy ConfigMap cfg from c1 to c2/ns: configmaps is forbidden"


# -- ensure: the ServiceAccount ------------------------------------------------------------------


async def test_a_missing_service_account_is_a_reason(env: Env) -> None:
    env.c1.put("configmaps", configmap())
    reason = await env.follower.ensure("c1", "ns", pod_spec(service_account="builder"))
    assert reason == "ServiceAccount builder does not exist in c2/ns"
    assert writes(env.c2) == []  # nothing is copied for a delegate that cannot be created yet

    env.c2.put("serviceaccounts", {"metadata": {"name": "builder", "namespace": "ns"}})
    assert await env.follower.ensure("c1", "ns", pod_spec(service_account="builder")) is None


async def test_a_new_namespace_s_default_service_account_does_not_exist_yet(env: Env) -> None:
    env.c2.namespaces.add("fresh")
    reason = await env.follower.ensure("c1", "fresh", pod_spec(config_maps=()))
    assert reason == "ServiceAccount default does not exist in c2/fresh yet"


async def test_an_existing_service_account_is_remembered(env: Env) -> None:
    for _ in range(3):
        assert await env.follower.ensure("c1", "ns", pod_spec(config_maps=())) is None
    assert env.c2.calls.count(("GET", "/api/v1/namespaces/ns/serviceaccounts/default")) == 1


# -- keeping in step -----------------------------------------------------------------------------


async def test_a_source_change_updates_the_copy(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mcsched.follower")
    env.c1.put("configmaps", configmap())
    assert await env.follower.ensure("c1", "ns", pod_spec()) is None
    add_delegate(env.c2, pod_spec())
    await env.settle()

    env.c1.put("configmaps", configmap(data={"k": "v2"}, annotations={"note": "new"}))
    await env.settle()

    copied = env.c2.find("configmaps", "ns", "cfg")
    assert copied is not None and copied["data"] == {"k": "v2"}
    assert copied["metadata"]["annotations"]["note"] == "new"
    assert "updated ConfigMap ns/cfg in c2: c1 changed it" in caplog.text


async def test_a_source_change_is_not_copied_where_nothing_uses_it(env: Env) -> None:
    env.c1.put("configmaps", configmap())
    env.c1.put("configmaps", configmap(data={"k": "v2"}))
    await env.settle()
    assert env.c2.find("configmaps", "ns", "cfg") is None
    assert writes(env.c2) == []


async def test_an_immutable_copy_is_replaced(env: Env) -> None:
    env.c1.put("configmaps", {**configmap(), "immutable": True})
    assert await env.follower.ensure("c1", "ns", pod_spec()) is None
    add_delegate(env.c2, pod_spec())
    old_uid = env.c2.find("configmaps", "ns", "cfg")["metadata"]["uid"]  # type: ignore[index]

    # immutable: only a new object can change it
    env.c1.remove("configmaps", "ns", "cfg")
    env.c1.put("configmaps", {**configmap(data={"k": "v2"}), "immutable": True})
    await env.settle()

    copied = env.c2.find("configmaps", "ns", "cfg")
    assert copied is not None and copied["data"] == {"k": "v2"}
    assert copied["metadata"]["uid"] != old_uid


async def test_a_copy_deleted_in_the_target_is_made_again_while_a_delegate_uses_it(env: Env) -> None:
    env.c1.put("configmaps", configmap())
    assert await env.follower.ensure("c1", "ns", pod_spec()) is None
    add_delegate(env.c2, pod_spec())
    await env.settle()

    env.c2.remove("configmaps", "ns", "cfg")
    await env.settle()

    assert env.c2.find("configmaps", "ns", "cfg") is not None


async def test_a_new_delegate_gets_a_copy_that_is_missing(env: Env) -> None:
    env.c1.put("secrets", secret())
    add_delegate(env.c2, pod_spec(config_maps=(), secrets=("db",)))  # e.g. made by another replica
    await env.settle()
    assert env.c2.find("secrets", "ns", "db") is not None


async def test_a_copy_stays_while_used_when_its_source_is_deleted(env: Env) -> None:
    env.c1.put("configmaps", configmap())
    assert await env.follower.ensure("c1", "ns", pod_spec()) is None
    add_delegate(env.c2, pod_spec())
    env.c1.remove("configmaps", "ns", "cfg")
    await env.settle()
    assert env.c2.find("configmaps", "ns", "cfg") is not None


# -- garbage collection ----------------------------------------------------------------------------


async def made_and_used(env: Env) -> JSON:
    env.c1.put("configmaps", configmap())
    assert await env.follower.ensure("c1", "ns", pod_spec()) is None
    delegate = add_delegate(env.c2, pod_spec())
    await env.settle()
    return delegate


async def test_a_copy_is_removed_when_its_last_delegate_goes(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mcsched.follower")
    await made_and_used(env)
    add_delegate(env.c2, pod_spec(), uid="p2")
    env.clock.now += GRACE + 1

    env.c2.remove("pods", "ns", "web-p1")
    await env.settle()
    assert env.c2.find("configmaps", "ns", "cfg") is not None  # p2 still uses it

    env.c2.remove("pods", "ns", "web-p2")
    await env.settle()
    assert env.c2.find("configmaps", "ns", "cfg") is None
    assert "removed ConfigMap ns/cfg from c2: no delegate uses it" in caplog.text
    delete = next(c for c in env.c2.calls if c[0] == "DELETE")
    assert delete == ("DELETE", "/api/v1/namespaces/ns/configmaps/cfg")


async def test_a_finished_delegate_uses_nothing(env: Env) -> None:
    delegate = await made_and_used(env)
    env.clock.now += GRACE + 1
    env.c2.put("pods", {**delegate, "status": {"phase": "Succeeded"}})
    await env.settle()
    assert env.c2.find("configmaps", "ns", "cfg") is None


async def test_a_young_copy_is_removed_once_its_grace_period_is_over() -> None:
    env = Env(grace=0.2, clock=time.time)  # real time: the follower looks again by itself
    env.clock.now = time.time()  # creation timestamps (whole seconds) from the same clock
    try:
        env.c1.put("configmaps", configmap())
        assert await env.follower.ensure("c1", "ns", pod_spec()) is None
        add_delegate(env.c2, pod_spec())
        env.c2.remove("pods", "ns", "web-p1")
        await env.settle()
        assert env.c2.find("configmaps", "ns", "cfg") is not None
        deadline = time.monotonic() + 5
        while env.c2.find("configmaps", "ns", "cfg") is not None:
            assert time.monotonic() < deadline, "the young copy was never removed"
            await asyncio.sleep(0.05)
    finally:
        await env.rt.close()


async def test_the_sweep_removes_unused_copies_past_the_grace_period(env: Env) -> None:
    env.c1.put("configmaps", configmap())
    assert await env.follower.ensure("c1", "ns", pod_spec()) is None  # its delegate never came

    await env.follower.sweep()
    assert env.c2.find("configmaps", "ns", "cfg") is not None  # young: its delegate may be on its way

    env.clock.now += GRACE - 1
    await env.follower.sweep()
    assert env.c2.find("configmaps", "ns", "cfg") is not None

    env.clock.now += 2
    await env.follower.sweep()
    await env.settle()
    assert env.c2.find("configmaps", "ns", "cfg") is None


async def test_a_young_copy_another_replica_made_is_not_removed(env: Env) -> None:
    source = env.c1.put("configmaps", configmap())
    env.c2.put("configmaps", configmap(labels={FOLLOWED_LABEL: "true", PARENT_CLUSTER_LABEL: "c1"},
                                       annotations={SOURCE_UID_ANNOTATION: source["metadata"]["uid"]}))
    await env.settle()
    await env.follower.sweep()
    assert env.c2.find("configmaps", "ns", "cfg") is not None  # its delegate may be on its way
    env.clock.now += GRACE
    await env.follower.sweep()
    assert env.c2.find("configmaps", "ns", "cfg") is None


async def test_a_copy_ensured_again_recently_is_not_removed(env: Env) -> None:
    env.c1.put("configmaps", configmap())
    assert await env.follower.ensure("c1", "ns", pod_spec()) is None
    env.clock.now += GRACE + 60  # old copy...
    assert await env.follower.ensure("c1", "ns", pod_spec()) is None  # ...wanted again just now
    await env.follower.sweep()
    assert env.c2.find("configmaps", "ns", "cfg") is not None


async def test_the_sweep_keeps_copies_live_delegates_use(env: Env) -> None:
    await made_and_used(env)
    env.clock.now += GRACE + 1
    await env.follower.sweep()
    await env.settle()
    assert env.c2.find("configmaps", "ns", "cfg") is not None
    assert not [c for c in env.c2.calls if c[0] == "DELETE"]


async def test_a_delegate_of_another_source_or_namespace_does_not_keep_a_copy(env: Env) -> None:
    env.c1.put("configmaps", configmap())
    assert await env.follower.ensure("c1", "ns", pod_spec()) is None
    env.c2.namespaces.add("other")
    add_delegate(env.c2, pod_spec(), uid="p-c3", source="c3")  # c3 has no cfg: nothing copied for it
    add_delegate(env.c2, pod_spec(), uid="p-other", namespace="other")
    env.clock.now += GRACE + 1
    await env.follower.sweep()
    await env.settle()
    assert env.c2.find("configmaps", "ns", "cfg") is None


@pytest.mark.parametrize("broken", ["unsynced", "unhealthy"])
async def test_nothing_is_removed_without_a_synced_healthy_delegate_cache(env: Env, broken: str) -> None:
    await made_and_used(env)
    env.clock.now += GRACE + 1
    if broken == "unsynced":
        env.delegates.synced.clear()
    else:
        env.delegates.healthy = False
    env.c2.remove("pods", "ns", "web-p1")
    await env.follower.sweep()
    await env.settle()
    assert env.c2.find("configmaps", "ns", "cfg") is not None

    env.delegates.synced.set()
    env.delegates.healthy = True
    await env.follower.sweep()
    await env.settle()
    assert env.c2.find("configmaps", "ns", "cfg") is None


async def test_objects_we_did_not_make_are_never_removed(env: Env) -> None:
    # one the user labelled like ours by hand (no source uid), one of theirs without labels
    env.c2.put("configmaps", configmap("lookalike", labels={FOLLOWED_LABEL: "true", PARENT_CLUSTER_LABEL: "c1"}))
    env.c2.put("configmaps", configmap("theirs"))
    env.clock.now += GRACE + 1
    await env.follower.sweep()
    await env.settle()
    assert env.c2.find("configmaps", "ns", "lookalike") is not None
    assert env.c2.find("configmaps", "ns", "theirs") is not None
    assert not [c for c in env.c2.calls if c[0] == "DELETE"]


async def test_a_copy_changed_since_it_was_read_is_not_removed(env: Env) -> None:
    env.c1.put("configmaps", configmap())
    assert await env.follower.ensure("c1", "ns", pod_spec()) is None
    env.copies().paused = True
    copied = env.c2.find("configmaps", "ns", "cfg")
    env.c2.put("configmaps", {**copied, "metadata": {  # type: ignore[dict-item]
        **copied["metadata"], "labels": {"claimed": "by-someone"}}})  # type: ignore[index]
    env.clock.now += GRACE + 1
    await env.follower.sweep()
    assert env.c2.find("configmaps", "ns", "cfg") is not None  # resourceVersion precondition: 409


async def test_a_copy_removed_while_the_cache_lags_is_made_again_by_ensure(env: Env) -> None:
    env.c1.put("configmaps", configmap())
    assert await env.follower.ensure("c1", "ns", pod_spec()) is None
    env.copies().paused = True  # the DELETED event will come late
    env.clock.now += GRACE + 1
    await env.follower.sweep()
    assert env.c2.find("configmaps", "ns", "cfg") is None
    assert env.copies().get("ns/cfg") is not None  # the cache still shows it

    assert await env.follower.ensure("c1", "ns", pod_spec()) is None
    assert env.c2.find("configmaps", "ns", "cfg") is not None

    env.copies().resume()  # DELETED (of the old one), ADDED (of the new one)
    await env.settle()
    assert env.c2.find("configmaps", "ns", "cfg") is not None


# -- wiring ----------------------------------------------------------------------------------------


async def test_followers_of_several_targets_share_the_source_caches(env: Env) -> None:
    env.c3.put("configmaps", configmap())
    delegates_c1 = env.rt.informer("c1", "/api/v1/pods")
    before = len(env.rt.informers)
    Follower(env.rt, "c1", delegates_c1)  # type: ignore[arg-type]
    made = env.rt.informers[before:]
    # c1 as a target: its two copy caches; c3's source caches are shared, c1 is not its own source
    assert sorted((i.client.name, i.resource, bool(i.params)) for i in made) == [
        ("c1", "configmaps", True), ("c1", "secrets", True)]
    sources = [i for i in env.rt.informers if i.client is env.c3 and not i.params]
    assert len(sources) == 2 and all(len(i.handlers) == 2 for i in sources)


def iter_handlers(env: Env) -> Iterator[Callable[..., Any]]:
    for informer in env.rt.informers:
        yield from informer.handlers


async def test_handlers_never_wait(env: Env) -> None:
    env.c1.put("configmaps", configmap())
    add_delegate(env.c2, pod_spec())
    for handler in iter_handlers(env):
        assert not asyncio.iscoroutinefunction(handler)
    await env.settle()


async def test_queued_work_waits_for_the_source_cache(env: Env) -> None:
    env.c1.put("secrets", secret())
    [informer] = [i for i in env.rt.informers if i.client is env.c1 and i.resource == "secrets"]
    informer.synced.clear()
    add_delegate(env.c2, pod_spec(config_maps=(), secrets=("db",)))
    await asyncio.sleep(0.05)
    assert env.c2.find("secrets", "ns", "db") is None
    assert await env.follower.ensure("c1", "ns", pod_spec(config_maps=(), secrets=("db",))) is None  # not blocked
    assert env.c2.find("secrets", "ns", "db") is not None
    informer.synced.set()
    await env.settle()


async def test_a_target_that_is_the_source_under_a_key_of_its_own_copies_nothing() -> None:
    """A ``self: true`` Target (key ``me``, the cluster c1): the pod's own ConfigMap is there already;
    copying it onto itself would find it "not made by multicluster-scheduler" and hold the delegate."""
    clock = Clock()
    c1 = FakeCluster("c1", clock)
    rt = FakeRuntime({"c1": c1, "me": c1}, ["c1"], same_as={"me": "c1"})
    try:
        c1.put("configmaps", configmap())
        follower = Follower(rt, "me", rt.informer("me", "/api/v1/pods"), clock=clock)  # type: ignore[arg-type]
        assert await follower.ensure("c1", "ns", pod_spec()) is None
        assert [call for call in c1.calls if call[0] != "GET"] == []
    finally:
        await rt.close()


async def test_a_copy_another_process_just_made_is_young_by_this_one_s_clock_whatever_the_target_s_says(
        env: Env) -> None:
    """Two processes serve one target; the target's clock runs a minute behind theirs. The copy one makes
    for the delegate it is about to create must not look a minute old to the other, which would delete it."""
    env.c1.put("configmaps", configmap())
    other = Follower(env.rt, "c2", env.delegates, grace_seconds=GRACE,  # type: ignore[arg-type]
                     clock=lambda: env.clock.now + 60)
    assert await env.follower.ensure("c1", "ns", pod_spec()) is None
    await env.settle()
    deadline = time.monotonic() + 5
    while len(other.queue) or other.queue._active:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    await other.sweep()
    assert env.c2.find("configmaps", "ns", "cfg") is not None, "deleted by the other process"


async def test_a_copy_from_a_source_no_longer_in_the_settings_stays_while_used_then_goes_without_errors(
        env: Env) -> None:
    """c9 was a source of this target; composed again without it, its copies have nothing to follow."""
    env.c2.put("configmaps", configmap(labels={FOLLOWED_LABEL: "true", PARENT_CLUSTER_LABEL: "c9"},
                                       annotations={SOURCE_UID_ANNOTATION: "uid-in-c9"}))
    add_delegate(env.c2, pod_spec(), source="c9")  # its delegate runs on
    await env.settle()
    env.clock.now += GRACE
    await env.follower.sweep()
    await env.settle()
    assert env.c2.find("configmaps", "ns", "cfg") is not None
    assert env.follower.queue._failures == {}, "reading a source that is not there any more failed"
    env.c2.remove("pods", "ns", "web-p1")
    await env.settle()
    await env.follower.sweep()
    await env.settle()
    assert env.c2.find("configmaps", "ns", "cfg") is None
