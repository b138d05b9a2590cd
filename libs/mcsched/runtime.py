"""What every service does around its own logic: settings, logging, bus, clusters, shutdown.

A service's ``__main__`` is ``run_service("name", compose)``: ``compose``
receives a :class:`Runtime` (settings, connected bus and cluster clients) and
starts its tasks; the runtime then waits for SIGTERM/SIGINT and closes
everything in order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pydantic import ValidationError

from .bus import Bus, Credentials
from .kube import Informer, KubeClient
from .natsauth import STAGE_STREAMS
from .settings import Settings, load_settings
from .telemetry import setup_tracing, start_http

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    service: str
    settings: Settings
    bus: Bus
    clusters: dict[str, KubeClient]
    informers: list[Informer] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def informer(self, cluster: str, path: str, **selectors: str) -> Informer:
        informer = Informer(self.clusters[cluster], path, **selectors)
        self.informers.append(informer)
        informer.start()
        return informer

    def spawn(self, coro: Awaitable[None], name: str) -> None:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("task %s crashed; stopping the service so it restarts clean", name)
                os.kill(os.getpid(), signal.SIGTERM)

        self.tasks.append(asyncio.create_task(guarded(), name=name))

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for informer in self.informers:
            await informer.stop()
        for closer in reversed(self.closers):
            await closer()
        await self.bus.close()
        for client in self.clusters.values():
            await client.close()


def setup_logging(level: str, service: str) -> None:
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s",
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


async def periodic(every: float, action: Callable[[], Awaitable[None]], what: str) -> None:
    """Run ``action`` every ``every`` seconds, logging (not raising) its failures."""
    while True:
        await asyncio.sleep(every)
        try:
            await action()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("%s failed: %s", what, exc)


def dump_tasks(informers: list[Informer]) -> None:
    """Log where every task waits and what each cache holds (send the service SIGUSR1)."""
    for informer in informers:
        log.warning("cache %s: %d objects, synced=%s healthy=%s", informer.name, len(informer.store),
                    informer.synced.is_set(), informer.healthy)
    for task in asyncio.all_tasks():
        frames = task.get_stack(limit=8)
        where = " <- ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in reversed(frames))
        log.warning("task %s: %s", task.get_name(), where or "(not started)")


def nats_credentials(service: str, settings: Settings) -> Credentials:
    """The service's NATS identity; ValueError when there is none and anonymity was not asked for."""
    auth = settings.nats_auth
    if not auth.has_credentials and not auth.allow_anonymous:
        raise ValueError(
            "no NATS credentials: set nats_auth.password_file (or MCS_NATS_AUTH__PASSWORD_FILE) to this "
            f"service's NATS password (user {service!r} unless nats_auth.user says otherwise), or "
            "nats_auth.allow_anonymous: true to connect without authentication (then anyone who can "
            "reach NATS can start pods in every target)")
    tls: ssl.SSLContext | None = None
    if auth.tls_ca_file is not None or auth.tls_cert_file is not None:
        tls = ssl.create_default_context(cafile=str(auth.tls_ca_file) if auth.tls_ca_file else None)
        if auth.tls_cert_file is not None and auth.tls_key_file is not None:
            tls.load_cert_chain(str(auth.tls_cert_file), str(auth.tls_key_file))
    if not auth.has_credentials:
        return Credentials(tls=tls)
    return Credentials(user=auth.user or service, password=auth.read_password(), tls=tls)


def run_service(service: str, compose: Callable[[Runtime], Awaitable[None]]) -> None:
    try:
        settings = load_settings()
        credentials = nats_credentials(service, settings)
    except (ValidationError, ValueError, FileNotFoundError, ssl.SSLError) as exc:
        print(f"{service}: invalid settings:\n{exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    setup_logging(settings.log_level, service)
    if settings.nats_auth.allow_anonymous:
        log.warning("connecting to NATS without credentials (nats_auth.allow_anonymous): anyone who can reach "
                    "NATS at %s can start pods in every target", settings.nats_url)
    asyncio.run(_main(service, settings, credentials, compose))


async def _main(service: str, settings: Settings, credentials: Credentials,
                compose: Callable[[Runtime], Awaitable[None]]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    informers: list[Informer] = []
    loop.add_signal_handler(signal.SIGUSR1, lambda: dump_tasks(informers))
    bus = Bus(settings.nats_url, settings.subject_prefix, f"{service}@{socket.gethostname()}:{os.getpid()}",
              max_failed_deliveries=settings.max_failed_deliveries, credentials=credentials)
    connecting = asyncio.create_task(bus.connect())
    done, _ = await asyncio.wait([connecting, asyncio.create_task(stop.wait())],
                                 return_when=asyncio.FIRST_COMPLETED)
    if connecting not in done:
        connecting.cancel()
        return
    await bus.ensure_streams(STAGE_STREAMS[service])
    provider = setup_tracing(service, settings.otlp_endpoint)
    clusters: dict[str, KubeClient] = {}
    for cluster in settings.clusters:
        clusters[cluster.name] = await KubeClient.connect(cluster)
    runtime = Runtime(service, settings, bus, clusters, informers)
    if settings.metrics_port:
        http = await start_http(settings.metrics_port, lambda: not_ready(bus, informers))
        runtime.closers.append(http.cleanup)
    await compose(runtime)
    log.info("%s running (sources: %s, targets: %s)", service, ",".join(settings.source_names),
             ",".join(settings.target_names))
    await stop.wait()
    log.info("%s stopping", service)
    await runtime.close()
    if provider is not None:
        provider.shutdown()  # flush the spans still buffered


def not_ready(bus: Bus, informers: list[Informer]) -> list[str]:
    problems = bus.problems()
    problems += [f"cache {i.name} cannot reach its API server" for i in informers if not i.healthy]
    return problems
