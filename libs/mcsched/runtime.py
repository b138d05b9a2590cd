"""What every service does around its own logic: settings, logging, bus, clusters, shutdown.

A service's ``__main__`` is ``run_service("name", compose)``: ``compose``
receives a :class:`Runtime` (settings, connected bus and cluster clients) and
starts its tasks; the runtime then waits for SIGTERM/SIGINT and closes
everything in order.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import signal
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import uvloop
import yaml
from pydantic import ValidationError

from .bus import Bus, Credentials
from .kube import Informer, KubeClient, KubeError
from .membership import Membership
from .natsauth import STAGE_STREAMS
from .settings import Settings, load_settings
from .shards import SHARDED_STAGES, Shares, stage_assignment
from .targetdirectory import TargetDirectory
from .telemetry import SHARES_OWNED, STAGE_MEMBERS, setup_tracing, start_http
from .workqueue import cancel_all

log = logging.getLogger(__name__)

# Drawn once per process: host name and PID alone do not tell processes apart, since containers in the
# host's network share its name and each has its own PID 1.
_INCARNATION = secrets.token_hex(4)


def process_identity(service: str) -> str:
    """This process among all processes of all stages: its name on the bus and in its stage's membership."""
    return f"{service}@{socket.gethostname()}:{os.getpid()}/{_INCARNATION}"


# Container objects allocated (less those freed) between two collections of the youngest generation;
# Python's default is 700. See tune_garbage_collection.
GC_YOUNG_THRESHOLD = 50_000


def tune_garbage_collection() -> None:
    """Collect garbage less often, and never look again at what the imports made.

    A service's caches hold tens of thousands of decoded objects and each watch event replaces some:
    with Python's defaults, the collector ran hundreds of times per 1000 pods and fully traversed
    everything several times, 7 to 16 % of a service's CPU (docs/performance.md). Nearly all our
    garbage is freed by reference counting at once; the collector is only for cycles, which are few.
    """
    gc.freeze()  # the modules, classes and functions loaded so far: alive for the whole process
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 10)


@dataclass
class Runtime:
    service: str
    settings: Settings
    bus: Bus
    clusters: dict[str, KubeClient]
    informers: list[Informer] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # The sources' Targets and ClusterTargets (services whose work depends on the targets only).
    directory: TargetDirectory | None = None
    # What this process owns of its stage's work (mcsched.shards): everything unless it is sharded.
    shares: Shares = field(default_factory=Shares)

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

    async def close(self, drain_seconds: float = 5.0) -> None:
        """Stop: its tasks, then its consumers (handlers at work finish and ack, with the caches and
        queues they use still running), then those caches and queues, then its clients."""
        await cancel_all(self.tasks)
        await self.bus.close(drain_seconds)
        for informer in self.informers:
            await informer.stop()
        for closer in reversed(self.closers):
            await closer()
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
    except (ValidationError, ValueError, FileNotFoundError, ssl.SSLError, yaml.YAMLError) as exc:
        print(f"{service}: invalid settings:\n{exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    setup_logging(settings.log_level, service)
    if settings.nats_auth.allow_anonymous:
        log.warning("connecting to NATS without credentials (nats_auth.allow_anonymous): anyone who can reach "
                    "NATS at %s can start pods in every target", settings.nats_url)
    tune_garbage_collection()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_main(service, settings, credentials, compose))


# The services whose work depends on the set of targets: composed again when the sources name others.
TARGET_DEPENDENT = frozenset({"proxy-scheduler", "candidate-scheduler", "feedback"})


class SettingsFile:
    """The ``MCS_CONFIG`` file, read again every few seconds: a valid change sets :attr:`changed`
    (the service composes itself again with it); an invalid one is logged and the running settings stay."""

    def __init__(self, service: str, settings: Settings, credentials: Credentials) -> None:
        self.service, self.settings, self.credentials = service, settings, credentials
        self.path = os.environ.get("MCS_CONFIG")
        self.text = self._read()
        self.changed = asyncio.Event()

    def _read(self) -> str | None:
        try:
            return Path(self.path).read_text() if self.path else None
        except OSError:
            return None

    async def run(self) -> None:
        while self.path:
            await asyncio.sleep(self.settings.target_poll_seconds)
            text = self._read()
            if text is None or text == self.text:
                continue
            self.text = text
            try:
                settings = load_settings()
                credentials = nats_credentials(self.service, settings)
            except Exception as exc:  # a YAML error, a validation error, a missing file: all the user's to fix
                log.error("%s changed but is not valid; the running settings stay:\n%s", self.path, exc)
                continue
            if settings != self.settings:
                log.info("%s changed: composing again with it", self.path)
                self.settings, self.credentials = settings, credentials
                self.changed.set()


async def _main(service: str, settings: Settings, credentials: Credentials,
                compose: Callable[[Runtime], Awaitable[None]]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    informers: list[Informer] = []
    loop.add_signal_handler(signal.SIGUSR1, lambda: dump_tasks(informers))
    provider = setup_tracing(service, settings.otlp_endpoint)
    settings_file = SettingsFile(service, settings, credentials)
    watching = asyncio.create_task(settings_file.run(), name="read the settings file")
    directory: TargetDirectory | None = None
    current: list[Runtime] = []
    member = process_identity(service)
    membership = await _membership(service, settings, credentials, member, stop) \
        if service in SHARDED_STAGES else None
    if service in SHARDED_STAGES and membership is None:
        return  # stopped before NATS answered
    http = None
    if settings.metrics_port:
        http = await start_http(settings.metrics_port,
                                lambda: not_ready(current[0].bus, informers) if current else ["starting"])
    while not stop.is_set():
        composed = settings
        if service in TARGET_DEPENDENT:
            if directory is None:
                directory = await TargetDirectory.open(settings)
            try:
                await asyncio.wait_for(directory.refresh(), settings.candidate_timeout_seconds * 5)
            except (TimeoutError, KubeError, OSError) as exc:
                log.warning("the sources' targets could not be read (%s); composing with those known", exc)
            directory.changed.clear()
            composed = settings.with_targets(directory.current.targets)
        def assignment(members: tuple[str, ...], composed: Settings = composed) -> Shares:
            return stage_shares(service, composed, members, member)

        shares = Shares()
        if membership is not None:
            membership.changed.clear()
            members = membership.members()
            shares = assignment(members)
            log.info("%s: %d processes of this stage; this one takes %s", service, len(members), shares.describe())
            STAGE_MEMBERS.set(len(members))
            SHARES_OWNED.set(len(shares.owned or ()))
        runtime = await _compose(service, composed, credentials, compose, stop, informers, directory, shares)
        if runtime is None:
            break
        current[:] = [runtime]
        log.info("%s running (sources: %s, targets: %s)", service, ",".join(composed.source_names),
                 ",".join(composed.target_names))
        waits = [asyncio.create_task(stop.wait()), asyncio.create_task(settings_file.changed.wait())]
        if directory is not None:
            waits.append(asyncio.create_task(directory.changed.wait()))
        while True:
            shuffle = asyncio.create_task(membership.changed.wait()) if membership is not None else None
            done, _ = await asyncio.wait([*waits, *([shuffle] if shuffle else [])],
                                         return_when=asyncio.FIRST_COMPLETED)
            if shuffle is None or shuffle not in done:
                if shuffle is not None:
                    shuffle.cancel()
                break
            assert membership is not None
            membership.changed.clear()
            members = membership.members()
            if assignment(members).owned != shares.owned:
                break  # this process's shares change: composed again with the new ones
            log.info("%s: %d processes of this stage now; this one keeps %s", service, len(members),
                     shares.describe())
            STAGE_MEMBERS.set(len(members))
        reason = "the settings changed" if settings_file.changed.is_set() else \
            "the sources name other targets" if directory is not None and directory.changed.is_set() else \
            "its shares of the work changed"
        for task in waits:
            task.cancel()
        if not stop.is_set():
            log.info("%s: %s; composing again in place", service, reason)
        # Every publish was acknowledged already: a new composition need not wait for a long drain.
        await runtime.close(drain_seconds=5.0 if stop.is_set() else 0.5)
        current.clear()
        informers.clear()
        if settings_file.changed.is_set():  # new sources (or anything else): a new directory of them too
            settings_file.changed.clear()
            settings, credentials = settings_file.settings, settings_file.credentials
            if directory is not None:
                await directory.close()
                directory = None
    log.info("%s stopping", service)
    watching.cancel()
    if membership is not None:
        await membership.stop()
        await membership.bus.close(0.0)
    if directory is not None:
        await directory.close()
    if http is not None:
        await http.cleanup()
    if provider is not None:
        provider.shutdown()  # flush the spans still buffered


def stage_shares(service: str, settings: Settings, members: tuple[str, ...], member: str) -> Shares:
    """What ``member`` of ``service``'s stage owns among ``members``, under these settings."""
    return Shares(stage_assignment(service, settings.source_names, settings.target_names, members, member,
                                   served_targets=settings.served_targets()), members)


async def _compose(service: str, settings: Settings, credentials: Credentials,
                   compose: Callable[[Runtime], Awaitable[None]], stop: asyncio.Event,
                   informers: list[Informer], directory: TargetDirectory | None,
                   shares: Shares) -> Runtime | None:
    """A connected bus, the clusters' clients and the service's own parts; None if stopped meanwhile."""
    bus = Bus(settings.nats_url, settings.subject_prefix, process_identity(service),
              max_failed_deliveries=settings.max_failed_deliveries, credentials=credentials,
              stream_replicas=settings.stream_replicas)
    if not await _unless_stopped(bus.connect(), stop):
        return None
    clusters: dict[str, KubeClient] = {}
    usable = []
    for cluster in settings.clusters:
        try:
            clusters[cluster.name] = await KubeClient.connect(
                settings.cluster(cluster.same_as).model_copy(update={"name": cluster.name})
                if cluster.same_as else cluster)
        except Exception as exc:
            if cluster.kubeconfig_data is None and cluster.same_as is None:
                raise  # a cluster of the settings: the operator fixes the file
            log.warning("target %s: its kubeconfig cannot be used: %s", cluster.name, exc)
            continue
        usable.append(cluster)
    settings = settings.model_copy(update={"clusters": usable})
    runtime = Runtime(service, settings, bus, clusters, informers, directory=directory, shares=shares)
    # Not awaited: while JetStream does not answer (a NATS cluster electing its leader) the Kubernetes
    # side of the shares (virtual nodes' heartbeats, finalizers) goes on; consumers and publishes
    # create a stream they miss themselves, and this retries until it has them all.
    runtime.spawn(bus.ensure_streams_patiently(STAGE_STREAMS[service]), "ensure streams")
    await compose(runtime)
    return runtime


async def _unless_stopped(step: Awaitable[None], stop: asyncio.Event) -> bool:
    """Await ``step`` (connecting: NATS may take a while to answer); False if ``stop`` came first,
    its error if it failed."""
    stepping = asyncio.ensure_future(step)
    stopping = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stepping, stopping], return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if stepping not in done:
        stepping.cancel()
        return False
    stepping.result()  # its error, if any
    return True


async def _membership(service: str, settings: Settings, credentials: Credentials, member: str,
                      stop: asyncio.Event) -> Membership | None:
    """This process's membership of its stage, on a connection of its own (it outlives compositions);
    None if stopped before NATS answered."""
    bus = Bus(settings.nats_url, settings.subject_prefix, f"{member}/members", credentials=credentials)
    if not await _unless_stopped(bus.connect(), stop):
        return None
    membership = Membership(bus, service, member, settings.shard_lease_seconds)
    await membership.start()
    return membership


def not_ready(bus: Bus, informers: list[Informer]) -> list[str]:
    problems = bus.problems()
    problems += [f"cache {i.name} cannot reach its API server" for i in informers if not i.healthy]
    return problems
