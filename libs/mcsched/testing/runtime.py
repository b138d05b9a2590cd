"""A :class:`~mcsched.runtime.Runtime` on fakes: what ``compose()`` and the service classes are given.

:class:`FakeRuntime` holds real :class:`~mcsched.settings.Settings`, a
:class:`~mcsched.testing.bus.FakeBus` and :class:`~mcsched.testing.cluster.FakeCluster`
clients; its informers are :class:`~mcsched.testing.cluster.FakeInformer`. So
``ProxyScheduler(rt)``, ``TargetScheduler(rt, target)``, ``Feedback(rt)`` or a
service's ``compose(rt)`` run unchanged. Several runtimes may share clusters
and a broker: each is one process of a service.

Spawned tasks (resyncs, heartbeats, sweeps) are not started unless
``run_spawned``: a test calls ``feedback.resync()`` itself when it wants one,
so nothing happens behind its back. A spawned task that crashes is recorded
in ``failures`` (the real runtime stops the process). :func:`settle` waits
until every cache has delivered its events (lagging ones excepted) and every
work queue is empty.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Mapping
from typing import Any

from ..kube import KubeClient
from ..runtime import Runtime
from ..settings import ClusterSettings, KubeletSettings, Settings, WebhookSettings
from ..workqueue import WorkQueue
from .bus import FakeBus
from .cluster import FakeCluster, FakeInformer


def fake_settings(*, sources: tuple[str, ...] = ("c1",), targets: tuple[str, ...] = ("c2",),
                  **overrides: Any) -> Settings:
    """Settings for clusters named ``sources`` and ``targets`` (a name in both is both), no webhook, no metrics,
    no kubelet endpoint.

    Timers that would act behind a test's back are an hour long unless overridden.
    """
    names = list(dict.fromkeys([*sources, *targets]))
    clusters = [ClusterSettings(name=n, source=n in sources, target=n in targets) for n in names]
    values: dict[str, Any] = {"metrics_port": None, "resync_period_seconds": 3600.0, "heartbeat_seconds": 3600.0,
                              "webhook": WebhookSettings(enabled=False, register_webhook=False),
                              "kubelet": KubeletSettings(enabled=False)}
    values.update(overrides)
    return Settings(clusters=clusters, **values)


class FakeRuntime(Runtime):
    """One process of a service, on fake clusters and a fake bus."""

    def __init__(self, service: str, settings: Settings, bus: FakeBus, clusters: Mapping[str, FakeCluster],
                 *, run_spawned: bool = False) -> None:
        clients: dict[str, KubeClient] = dict(clusters)
        super().__init__(service, settings, bus, clients)
        self.fake_bus = bus
        self.fake_clusters = dict(clusters)
        self.run_spawned = run_spawned
        self.spawned: list[str] = []
        self.failures: list[tuple[str, BaseException]] = []

    def informer(self, cluster: str, path: str, **selectors: str) -> FakeInformer:
        informer = FakeInformer(self.fake_clusters[cluster], path, **selectors)
        self.informers.append(informer)
        informer.start()
        return informer

    def fake_informers(self, cluster: str | None = None, resource: str | None = None) -> list[FakeInformer]:
        """This process's caches (of one cluster, of one resource)."""
        return [i for i in self.informers if isinstance(i, FakeInformer)
                and cluster in (None, i.cluster.name) and resource in (None, i.resource)]

    def spawn(self, coro: Awaitable[None], name: str) -> None:
        self.spawned.append(name)
        if not self.run_spawned:
            if inspect.iscoroutine(coro):
                coro.close()
            return

        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures.append((name, exc))

        self.tasks.append(asyncio.create_task(guarded(), name=name))

    def work_queues(self) -> list[WorkQueue[Any]]:
        """The work queues the service registered for shutdown."""
        return [q for q in (getattr(c, "__self__", None) for c in self.closers) if isinstance(q, WorkQueue)]

    @property
    def idle(self) -> bool:
        return all(i.idle for i in self.fake_informers()) and \
            all(not len(q) and not q._active for q in self.work_queues())

    def errors(self) -> list[BaseException]:
        """Everything that failed where nobody awaits it: cache handlers, spawned tasks."""
        return [e for i in self.fake_informers() for e in i.errors] + [e for _, e in self.failures]


async def settle(*runtimes: FakeRuntime, quiet: int = 20, limit: int = 20_000) -> None:
    """Let every task run until each runtime's caches and work queues are idle ``quiet`` turns in a row."""
    calm = 0
    for _ in range(limit):
        await asyncio.sleep(0)
        calm = calm + 1 if all(rt.idle for rt in runtimes) else 0
        if calm >= quiet:
            return
    busy = [f"{rt.service}: {[i.name for i in rt.fake_informers() if not i.idle]}" for rt in runtimes if not rt.idle]
    raise AssertionError(f"still busy after {limit} turns: {busy}")
