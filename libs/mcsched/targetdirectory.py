"""The targets each source names at runtime: its Target and ClusterTarget objects, watched.

:class:`TargetDirectory` lists the objects (and GETs the kubeconfig Secrets
they name) in every source, resolves them with :mod:`mcsched.targets`, and
says when the result differs from the set a service was composed with; the
runtime then composes the service again in place (see
:func:`mcsched.runtime.run_service`). It reads them again when a watch of
the objects sees a change, and every ``QUIET_POLL_SECONDS`` for the Secrets
(a rotated kubeconfig); every ``target_poll_seconds`` instead while a watch
is down or a named Secret is missing, which no watch of ours would see
appear. A listing that fails keeps the last good result for that source, so
an API server that does not answer never removes a cluster; a source without
the CRDs simply names no targets.

A target that cannot be used (its Secret missing, a kubeconfig without a
server, a key two objects claim) is left out and its problem kept in
:attr:`problems`; feedback writes these as the object's ``Ready`` condition
and an Event (:func:`target_status`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote

from .kube import JSON, Informer, KubeClient, KubeError
from .settings import ClusterSettings, Settings
from .targets import CLUSTER_TARGETS_PATH, TARGETS_PATH, TargetError, TargetObject, resolve, secret_ref

log = logging.getLogger(__name__)


@dataclass
class Resolution:
    """What the sources' objects say: the usable targets, and every object's problem or None."""

    targets: list[ClusterSettings] = field(default_factory=list)
    problems: dict[TargetObject, TargetError | None] = field(default_factory=dict)
    complete: bool = True  # every source answered: a target missing here was really removed

    def fingerprint(self) -> list[str]:
        """What a composition depends on (a change of anything else needs no new composition)."""
        return sorted(t.model_dump_json() + json.dumps(t.kubeconfig_data, sort_keys=True) for t in self.targets)


async def _list(client: KubeClient, path: str) -> list[JSON] | None:
    """The items at ``path``; None when the API (the CRD) is not installed there."""
    try:
        return list((await client.get(path)).get("items") or [])
    except KubeError as exc:
        if exc.not_found:
            return None
        raise


async def _secret(client: KubeClient, namespace: str, name: str) -> JSON | None:
    try:
        return await client.get(f"/api/v1/namespaces/{quote(namespace, safe='')}/secrets/{quote(name, safe='')}")
    except KubeError as exc:
        if exc.not_found:
            return None
        raise


# A kubeconfig Secret is read again at most this often (a rotated one is used within this time),
# unless the object naming it changed: many namespaced Targets must not mean many reads every poll.
SECRET_REFRESH_SECONDS = 30.0
# With every source watched and every Secret found, the objects are read this often (for the Secrets).
QUIET_POLL_SECONDS = SECRET_REFRESH_SECONDS
# A burst of changes (many Targets applied at once) is read once, this long after its first.
FOLD_SECONDS = 0.2


class SecretCache:
    """The kubeconfig Secrets the objects name, each read again after ``SECRET_REFRESH_SECONDS`` or when
    the object naming it changed (its resourceVersion); one not found yet, at every poll."""

    def __init__(self) -> None:
        self._read: dict[tuple[str, str, str], tuple[JSON | None, float, str]] = {}

    async def get(self, source: str, client: KubeClient, namespace: str, name: str, named_by: str) -> JSON | None:
        key = (source, namespace, name)
        cached = self._read.get(key)
        now = time.monotonic()
        # a missing Secret is looked for at every poll: created after its Target, it is used at once
        if cached is not None and cached[0] is not None and now - cached[1] < SECRET_REFRESH_SECONDS \
                and cached[2] == named_by:
            return cached[0]
        secret = await _secret(client, namespace, name)
        self._read[key] = (secret, now, named_by)
        return secret


async def read_source(source: str, client: KubeClient, secrets: SecretCache,
                      served: set[str] | None = None) -> list[tuple[TargetObject, JSON, JSON | None]]:
    """Every Target and ClusterTarget of one source, with the Secret each names (None if none/missing).

    The paths the source serves (its CRDs are installed) are added to ``served``.
    """
    objects: list[JSON] = []
    for path in (CLUSTER_TARGETS_PATH, TARGETS_PATH):
        items = await _list(client, path)
        if items is not None:
            objects += items
            if served is not None:
                served.add(path)
    found = []
    for obj in objects:
        origin = TargetObject.of(source, obj)
        try:
            ref = secret_ref(obj)
        except TargetError:
            ref = None  # resolve says what is wrong
        version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        secret = await secrets.get(source, client, ref.namespace, ref.name, version) if ref is not None else None
        found.append((origin, obj, secret))
    return found


def resolve_all(settings: Settings, read: Mapping[str, list[tuple[TargetObject, JSON, JSON | None]]],
                complete: bool = True) -> Resolution:
    """The targets the objects name, after the settings' own clusters and in a stable order.

    A key already taken (by a cluster of the settings, or an object read
    before, oldest first) is refused as a conflict, except a ClusterTarget
    that names a cluster of the settings, which just defers to the settings.
    """
    resolution = Resolution(complete=complete)
    taken = {c.name: "the services' settings" for c in settings.clusters}
    entries = sorted(((o, obj, s) for objects in read.values() for o, obj, s in objects),
                     key=lambda e: ((e[1].get("metadata") or {}).get("creationTimestamp") or "", e[0].source,
                                    e[0].namespace or "", e[0].name))
    for origin, obj, secret in entries:
        owner = taken.get(origin.key)
        if owner == "the services' settings" and origin.namespace is None:
            resolution.problems[origin] = None  # the settings name this cluster already: they win
            continue
        if owner is not None:
            resolution.problems[origin] = TargetError(
                "Conflict", f"cluster key {origin.key} is taken by {owner}; rename this object")
            continue
        try:
            resolution.targets.append(resolve(origin, obj, secret))
        except TargetError as exc:
            resolution.problems[origin] = exc
            continue
        resolution.problems[origin] = None
        taken[origin.key] = str(origin)
    return resolution


class TargetDirectory:
    """Reads every source's targets when they change; :attr:`changed` is set when the result changes.

    ``informer`` makes the watches (the real :class:`~mcsched.kube.Informer`; tests give a fake one).
    """

    def __init__(self, settings: Settings, sources: dict[str, KubeClient], every: float,
                 informer: Callable[..., Informer] = Informer) -> None:
        self.settings, self.sources, self.every = settings, sources, every
        self.last: dict[str, list[tuple[TargetObject, JSON, JSON | None]]] = {}
        self.current = Resolution()
        self.changed = asyncio.Event()
        self.secrets = SecretCache()
        self.informer = informer
        self.watches: dict[tuple[str, str], Informer] = {}  # (source, path) -> its watch
        self.answered: set[str] = set()  # the sources whose last read succeeded
        self._poked = asyncio.Event()
        self._polling: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, settings: Settings) -> TargetDirectory:
        """A directory of the settings' sources, reading them every ``target_poll_seconds`` from now on."""
        sources = {c.name: await KubeClient.connect(c) for c in settings.clusters if c.source}
        directory = cls(settings, sources, settings.target_poll_seconds)
        directory._polling = asyncio.create_task(directory.run(), name="read the sources' targets")
        return directory

    async def close(self) -> None:
        if self._polling is not None:
            self._polling.cancel()
            await asyncio.gather(self._polling, return_exceptions=True)
        for watch in self.watches.values():
            await watch.stop()
        for client in self.sources.values():
            await client.close()

    async def read(self) -> Resolution:
        """The targets as the sources name them now (a source that fails keeps its last good answer)."""
        complete = True
        for source, client in self.sources.items():
            served: set[str] = set()
            try:
                self.last[source] = await read_source(source, client, self.secrets, served)
                self.answered.add(source)
            except (TimeoutError, KubeError, OSError) as exc:
                self.answered.discard(source)
                log.warning("could not read the Targets and ClusterTargets of %s: %s", source, exc)
                complete = complete and source in self.last
            for path in served:
                self._watch(source, path)
        return resolve_all(self.settings, self.last, complete)

    def _watch(self, source: str, path: str) -> None:
        """Watch ``path`` in ``source`` from now on (once its API is known to be there)."""
        if (source, path) in self.watches:
            return
        watch = self.informer(self.sources[source], path, name=f"{source}:{path.rsplit('/', 1)[-1]}")
        watch.add_handler(self._seen)
        watch.start()
        self.watches[(source, path)] = watch

    def _seen(self, _kind: str, _obj: JSON, _old: JSON | None) -> None:
        self._poked.set()

    def poll_seconds(self) -> float:
        """How long until the objects are read again if no watch sees a change: soon while something
        could change unseen (a source that did not answer, a watch down, a Secret not there yet), else
        later (a source without the CRDs included: they are rarely installed afterwards)."""
        unseen = any(source not in self.answered for source in self.sources) or \
            any(not w.healthy for w in self.watches.values())
        missing = any(p is not None and p.reason == "SecretNotFound" for p in self.current.problems.values())
        return self.every if unseen or missing else max(self.every, QUIET_POLL_SECONDS)

    async def refresh(self) -> None:
        resolution = await self.read()
        if resolution.fingerprint() != self.current.fingerprint():
            log.info("targets named by the sources changed: %s", ", ".join(t.name for t in resolution.targets)
                     or "none")
            self.changed.set()
        self.current = resolution

    async def run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.poll_seconds()):
                    await self._poked.wait()
                await asyncio.sleep(FOLD_SECONDS)
            except TimeoutError:
                pass
            self._poked.clear()
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reading the sources' targets failed")


def target_status(problem: TargetError | None, now: datetime | None = None) -> JSON:
    """The ``status`` of a Target or ClusterTarget: its Ready condition."""
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    if problem is None:
        condition = {"type": "Ready", "status": "True", "reason": "Resolved",
                     "message": "the services use this cluster"}
    else:
        condition = {"type": "Ready", "status": "False", "reason": problem.reason, "message": problem.message}
    return {"conditions": [{**condition, "lastTransitionTime": stamp}]}
