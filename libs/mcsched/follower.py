"""Copies of the ConfigMaps and Secrets delegate pods use, kept in one target cluster.

A :class:`Follower` serves one target (the candidate-scheduler makes one per
target it serves). Before a delegate is created, :meth:`Follower.ensure`
copies every ConfigMap and Secret the pod references from its source into
the delegate's namespace in the target, and checks that the pod's
ServiceAccount exists there; it returns why the delegate must wait, if it must.

Afterwards the copies are kept in step: a change of a source object (seen by
the source's informer), of a copy, or a new delegate queues the object's key
in a :class:`~mcsched.workqueue.WorkQueue`, whose worker creates or updates
the copy (resourceVersion precondition). Copies that no live delegate of the
target uses any more are deleted (uid and resourceVersion preconditions) when
a delegate goes away and by a periodic sweep, once they are older than a
grace period, and only while the delegate cache is synced and healthy.

An object of the same name that we did not make (see :mod:`mcsched.follow`)
is never overwritten or deleted: :meth:`Follower.ensure` then names it in its
reason. A referenced object missing in the source is skipped (the pod could
not start in its source either). When the target is the pod's own source,
there is nothing to copy.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

from .constants import FIELD_MANAGER
from .follow import (
    FOLLOWED_KINDS,
    FOLLOWED_SELECTOR,
    FollowKey,
    copy_differs,
    copy_key,
    copy_source,
    created_at,
    delegate_references,
    delegates_using,
    followed_objects,
    follower_copy,
    updated_copy,
)
from .kube import JSON, Handler, Informer, KubeError
from .runtime import Runtime, periodic
from .workqueue import WorkQueue

log = logging.getLogger(__name__)

GRACE_SECONDS = 30.0  # a copy made just before its delegate is created survives the sweep
SERVICE_ACCOUNT_CACHE_SECONDS = 300.0  # how long an existing ServiceAccount is not looked up again
SOURCE_SYNC_TIMEOUT = 30.0  # a queued reconcile waits this long for a source cache, then retries
_GONE_MEMORY_SECONDS = 600.0
_ATTEMPTS = 3


def shared_informer(rt: Runtime, cluster: str, path: str, label_selector: str | None = None) -> Informer:
    """The runtime's informer on ``path`` in ``cluster`` (with ``label_selector``); started if none yet.

    Followers of several targets read the same source caches: one informer each, not one per target.
    """
    client = rt.clusters[cluster]
    params = {"labelSelector": label_selector} if label_selector else {}
    for informer in rt.informers:
        if informer.client is client and informer.path == path and informer.params == params:
            return informer
    if label_selector:
        return rt.informer(cluster, path, label_selector=label_selector)
    return rt.informer(cluster, path)


def _collection(kind: str, namespace: str) -> str:
    return f"/api/v1/namespaces/{quote(namespace)}/{FOLLOWED_KINDS[kind]}"


def _object_path(kind: str, namespace: str, name: str) -> str:
    return f"{_collection(kind, namespace)}/{quote(name)}"


def _describe(key: FollowKey) -> str:
    _source, namespace, kind, name = key
    return f"{kind} {namespace}/{name}"


class Follower:
    """The ConfigMaps and Secrets delegates use, copied into one target and kept in step."""

    def __init__(self, rt: Runtime, target: str, delegates: Informer, *,
                 grace_seconds: float = GRACE_SECONDS, clock: Callable[[], float] = time.time) -> None:
        """``delegates``: an informer on the target's pods (delegates carry the parent-* labels).

        ``grace_seconds`` and ``clock`` (seconds since the epoch) are for tests.
        """
        self.rt, self.target, self.delegates = rt, target, delegates
        # The sources that are this target's cluster itself (a ``self: true`` Target is the source under
        # a key of its own): their pods' objects are there already, and are never ours to copy or remove.
        self.local = frozenset({target, *(c.same_as for c in rt.settings.clusters if c.name == target and c.same_as)})
        self.client = rt.clusters[target]
        self.grace_seconds = grace_seconds
        self._clock = clock
        self.queue: WorkQueue[FollowKey] = WorkQueue(f"follow {target}", self._reconcile, workers=4)
        self._refs: dict[str, frozenset[FollowKey]] = {}  # delegate uid -> what it uses
        self._used: Counter[FollowKey] = Counter()  # key -> how many live delegates use it
        self._touched: dict[FollowKey, float] = {}  # key -> when ensure() last wanted it
        self._gone: dict[str, float] = {}  # uid of a copy we deleted -> when (until the cache sees it go)
        self._first_seen: dict[str, float] = {}  # uid of a copy -> when this process's cache first had it
        self._locks: weakref.WeakValueDictionary[FollowKey, asyncio.Lock] = weakref.WeakValueDictionary()
        self._service_accounts: dict[tuple[str, str], float] = {}  # (namespace, name) -> when seen
        self._rechecks: set[FollowKey] = set()  # unused copies to look at again after their grace period
        self._sources: dict[tuple[str, str], Informer] = {}  # (source, kind) -> informer
        for source in rt.settings.source_names:
            if source in self.local:
                continue  # a pod of the target itself already has its objects
            for kind, resource in FOLLOWED_KINDS.items():
                informer = shared_informer(rt, source, f"/api/v1/{resource}")
                informer.add_handler(self._source_handler(source, kind))
                self._sources[(source, kind)] = informer
        self.copies: dict[str, Informer] = {}  # kind -> our copies in the target
        for kind, resource in FOLLOWED_KINDS.items():
            informer = shared_informer(rt, target, f"/api/v1/{resource}", FOLLOWED_SELECTOR)
            informer.add_handler(self._copy_handler(kind))
            self.copies[kind] = informer
        for pod in delegates.items():  # a cache already filled: its ADDED events are past
            self._on_delegate("ADDED", pod, None)
        delegates.add_handler(self._on_delegate)
        self.queue.start()
        rt.closers.append(self.queue.stop)
        rt.spawn(periodic(rt.settings.resync_period_seconds, self.sweep, f"sweep of copies in {target}"),
                 f"follow sweep {target}")

    # -- the caller's entry point --------------------------------------------------------------

    async def ensure(self, source: str, namespace: str, spec: Mapping[str, Any]) -> str | None:
        """Copy every ConfigMap/Secret ``spec`` references from ``source`` into the target namespace.

        Returns None when the delegate may be created, else a one-line reason, e.g.
        ``Secret db-password exists in c2/ns and was not made by multicluster-scheduler`` or
        ``ServiceAccount builder does not exist in c2/ns``. Call it once the namespace exists.
        """
        if source in self.local:
            return None
        reason = await self._service_account_reason(namespace, spec)
        if reason is not None:
            return reason
        keys = [(source, namespace, kind, name) for kind, name in sorted(followed_objects(spec))]
        reasons = await asyncio.gather(*(self._ensure_one(key) for key in keys))
        return "; ".join(r for r in reasons if r) or None

    async def _ensure_one(self, key: FollowKey) -> str | None:
        source, namespace, kind, name = key
        async with self._lock(key):
            self._touched[key] = self._clock()
            try:
                obj = await self._read_source(key)
                if obj is None:
                    log.debug("%s does not exist in %s: nothing to copy to %s", _describe(key), source, self.target)
                    return None
                return await self._converge(key, obj)
            except KubeError as exc:
                return f"cannot copy {kind} {name} from {source} to {self.target}/{namespace}: {exc.message}"

    async def _service_account_reason(self, namespace: str, spec: Mapping[str, Any]) -> str | None:
        name = str(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default")
        now = self._clock()
        if now - self._service_accounts.get((namespace, name), float("-inf")) < SERVICE_ACCOUNT_CACHE_SECONDS:
            return None
        try:
            await self.client.get(f"/api/v1/namespaces/{quote(namespace)}/serviceaccounts/{quote(name)}")
        except KubeError as exc:
            if exc.not_found:
                # A new namespace's "default" account is made by the controller-manager within a second.
                yet = " yet" if name == "default" else ""
                return f"ServiceAccount {name} does not exist in {self.target}/{namespace}{yet}"
            return f"cannot read ServiceAccount {name} in {self.target}/{namespace}: {exc.message}"
        if len(self._service_accounts) > 10_000:
            self._service_accounts.clear()
        self._service_accounts[(namespace, name)] = now
        return None

    # -- reading -------------------------------------------------------------------------------

    def _lock(self, key: FollowKey) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    async def _read_source(self, key: FollowKey) -> JSON | None:
        """The source object from its cache, else from its API server; None when it does not exist."""
        source, namespace, kind, name = key
        informer = self._sources.get((source, kind))
        if informer is not None:
            if informer.synced.is_set():
                cached = informer.get(f"{namespace}/{name}")
                if cached is not None:
                    return cached
        client = self.rt.clusters.get(source)
        if client is None:  # a copy from a source no longer in the settings: nothing to keep it in step with
            return None
        # Not synced yet, or not in the cache (possibly only just created): ask.
        try:
            return await client.get(_object_path(kind, namespace, name))
        except KubeError as exc:
            if exc.not_found:
                return None
            raise

    def _cached_copy(self, kind: str, namespace: str, name: str) -> JSON | None:
        """Our copy (of any source) from the target's cache; one we just deleted counts as gone."""
        obj = self.copies[kind].get(f"{namespace}/{name}")
        if obj is not None and obj["metadata"].get("uid") in self._gone:
            return None
        return obj

    async def _read_copy(self, kind: str, namespace: str, name: str) -> JSON | None:
        """Whatever the target has under that name (ours or not); None when nothing."""
        try:
            return await self.client.get(_object_path(kind, namespace, name))
        except KubeError as exc:
            if exc.not_found:
                return None
            raise

    def _foreign(self, current: Mapping[str, Any], key: FollowKey) -> str | None:
        source, namespace, kind, name = key
        owner = copy_source(current)
        if owner == source:
            return None
        where = f"{self.target}/{namespace}"
        if owner is None:
            return f"{kind} {name} exists in {where} and was not made by multicluster-scheduler"
        return f"{kind} {name} exists in {where} as a copy from {owner}"

    # -- writing -------------------------------------------------------------------------------

    async def _converge(self, key: FollowKey, source_obj: Mapping[str, Any]) -> str | None:
        """Make the target's copy match ``source_obj``; a reason when something else holds the name."""
        source, namespace, kind, name = key
        wanted = follower_copy(source_obj, source, kind=kind)
        current = self._cached_copy(kind, namespace, name)
        for _ in range(_ATTEMPTS):
            if current is None:
                try:
                    await self.client.create(_collection(kind, namespace), wanted)
                except KubeError as exc:
                    if exc.conflict:  # AlreadyExists: made meanwhile (by us?) or someone else's
                        current = await self._read_copy(kind, namespace, name)
                        continue
                    if exc.not_found:
                        return f"namespace {namespace} does not exist in {self.target}"
                    raise
                log.info("copied %s from %s to %s", _describe(key), source, self.target)
                return None
            reason = self._foreign(current, key)
            if reason is not None:
                return reason
            if not copy_differs(current, wanted):
                return None
            try:
                await self.client.request("PUT", _object_path(kind, namespace, name),
                                          {"fieldManager": FIELD_MANAGER}, updated_copy(current, wanted))
            except KubeError as exc:
                if exc.conflict:  # changed since we read it: read again
                    current = await self._read_copy(kind, namespace, name)
                    continue
                if exc.not_found:
                    current = None
                    continue
                if exc.status == 422:  # an immutable copy, or a Secret's type changed: replace it
                    if await self._delete_copy(current, kind, f"{source} changed what cannot be updated"):
                        current = None
                    else:
                        current = await self._read_copy(kind, namespace, name)
                    continue
                raise
            log.info("updated %s in %s: %s changed it", _describe(key), self.target, source)
            return None
        return f"{kind} {name} in {self.target}/{namespace} kept changing while it was copied"

    async def _delete_copy(self, obj: Mapping[str, Any], kind: str, why: str) -> bool:
        """Delete one of our copies, unless it changed since ``obj`` was read; True when it is gone."""
        if copy_source(obj) is None:  # never delete what we did not make
            return False
        meta = obj["metadata"]
        namespace, name, uid = str(meta.get("namespace") or ""), str(meta["name"]), str(meta["uid"])
        options = {"apiVersion": "v1", "kind": "DeleteOptions",
                   "preconditions": {"uid": uid, "resourceVersion": meta.get("resourceVersion")}}
        try:
            await self.client.delete(_object_path(kind, namespace, name), options)
        except KubeError as exc:
            if exc.not_found:
                self._gone[uid] = self._clock()
                return True
            if exc.conflict:  # changed or replaced meanwhile: looked at again on its next event
                return False
            raise
        self._gone[uid] = self._clock()
        log.info("removed %s %s/%s from %s: %s", kind, namespace, name, self.target, why)
        return True

    # -- keeping in step and collecting --------------------------------------------------------

    def _collectable_now(self) -> bool:
        """Only a synced, healthy delegate cache can say that nothing uses a copy."""
        return (self.delegates.synced.is_set() and self.delegates.healthy
                and all(i.synced.is_set() and i.healthy for i in self.copies.values()))

    def _wait_before_collecting(self, copy: Mapping[str, Any], key: FollowKey) -> float | None:
        """0 when an unused copy may be deleted now, seconds until it may, None when it may not."""
        if self._used[key] or not self._collectable_now():
            return None
        created = created_at(copy)
        if created is None:
            return None
        # Its age by our clock too: made by another process serving this target a moment ago, a copy
        # whose target's clock runs behind ours would look old by its creationTimestamp alone.
        born = max(created, self._first_seen.get(str(copy.get("metadata", {}).get("uid")), created))
        now = self._clock()
        # Young (its delegate may be on its way), or ensure() wanted it a moment ago.
        last_wanted = max(born, self._touched.get(key, float("-inf")))
        return max(0.0, last_wanted + self.grace_seconds - now)

    def _may_collect(self, copy: Mapping[str, Any], key: FollowKey) -> bool:
        return self._wait_before_collecting(copy, key) == 0.0

    async def _reconcile(self, key: FollowKey) -> None:
        source, namespace, kind, name = key
        if source in self.local:
            return
        informer = self._sources.get((source, kind))
        if informer is not None and not informer.synced.is_set():
            await informer.wait_synced(SOURCE_SYNC_TIMEOUT)  # before the lock: ensure() need not wait for it
        async with self._lock(key):
            current = self._cached_copy(kind, namespace, name)
            if current is not None and copy_source(current) != source:
                return  # another source's copy, or (from a stale read) not ours
            used = self._used[key] > 0
            wait = None if current is None or used else self._wait_before_collecting(current, key)
            if wait == 0.0 and current is not None:
                await self._delete_copy(current, kind, "no delegate uses it")
                return
            if wait is not None and key not in self._rechecks:
                # Look again once the grace period is over (the sweep would, but later).
                self._rechecks.add(key)
                asyncio.get_running_loop().call_later(wait + 0.5, self._recheck, key)
            if current is None and not used:
                return
            source_obj = await self._read_source(key)
            if source_obj is None:
                return  # gone from the source: the copy stays while delegates use it
            reason = await self._converge(key, source_obj)
            if reason is not None:
                log.debug("%s in %s: %s", _describe(key), self.target, reason)

    def _recheck(self, key: FollowKey) -> None:
        self._rechecks.discard(key)
        self.queue.add(key)

    async def sweep(self) -> None:
        """Delete copies no live delegate uses (past the grace period); queue the rest for a check."""
        now = self._clock()
        self._touched = {k: t for k, t in self._touched.items() if now - t < self.grace_seconds}
        self._gone = {u: t for u, t in self._gone.items() if now - t < _GONE_MEMORY_SECONDS}
        collect = self._collectable_now()
        used = delegates_using(self.delegates.items()) if collect else set()
        for kind, informer in self.copies.items():
            for obj in informer.items():
                key = copy_key(obj, kind)
                if key is None or key[0] in self.local:
                    continue
                if not collect or key in used or self._used[key]:
                    self.queue.add(key)  # still in use: compare with its source
                    continue
                async with self._lock(key):
                    current = self._cached_copy(kind, key[1], key[3])
                    if current is None or current["metadata"].get("uid") != obj["metadata"].get("uid"):
                        continue
                    if self._may_collect(current, key):
                        await self._delete_copy(current, kind, "no delegate uses it")

    # -- informer handlers (never wait on the network) -----------------------------------------

    def _source_handler(self, source: str, kind: str) -> Handler:
        def on_source(_event: str, obj: JSON, _old: JSON | None) -> None:
            meta = obj["metadata"]
            namespace, name = str(meta.get("namespace") or ""), str(meta["name"])
            key = (source, namespace, kind, name)
            if self._used[key] or self.copies[kind].get(f"{namespace}/{name}") is not None:
                self.queue.add(key)

        return on_source

    def _copy_handler(self, kind: str) -> Handler:
        def on_copy(event: str, obj: JSON, _old: JSON | None) -> None:
            uid = str(obj["metadata"].get("uid"))
            if event == "DELETED":
                self._gone.pop(uid, None)
                self._first_seen.pop(uid, None)
            else:
                self._first_seen.setdefault(uid, self._clock())
            key = copy_key(obj, kind)
            if key is not None and key[0] not in self.local:
                self.queue.add(key)  # changed or deleted by someone: restore it if delegates use it

        return on_copy

    def _on_delegate(self, event: str, pod: JSON, _old: JSON | None) -> None:
        uid = str(pod["metadata"].get("uid"))
        uses = frozenset() if event == "DELETED" else delegate_references(pod)
        previous = self._refs.pop(uid, frozenset())
        if uses:
            self._refs[uid] = uses
        for key in previous - uses:
            self._used[key] -= 1
            if self._used[key] <= 0:
                del self._used[key]
        for key in uses - previous:
            self._used[key] += 1
        for key in uses ^ previous:  # new users: make sure the copy is there; former: collect
            if key[0] not in self.local:
                self.queue.add(key)
