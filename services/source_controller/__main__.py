"""source-controller: in each target, the RBAC its Sources and ClusterSources grant, kept level.

It runs with the target's own credentials, never a source's. It reads
Admiralty's Source and ClusterSource objects and writes RoleBindings and
ClusterRoleBindings (``mcsched.sources``) to the three accepted-source
ClusterRoles only: RBAC's ``bind`` verb on those roles is all it holds, so
even a bug here cannot grant anything else. Bindings of a deleted Source or
ClusterSource go with it (owner references); the shared viewer binding is
rewritten whole on every change.

    python -m services.source_controller                         # in-cluster
    python -m services.source_controller --kubeconfig K --context c2 --context c3
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from mcsched.kube import Informer, KubeClient, KubeError
from mcsched.runtime import setup_logging
from mcsched.settings import ClusterSettings
from mcsched.sources import (
    CLUSTER_SOURCES_PATH,
    RBAC,
    SOURCES_PATH,
    AcceptanceRoles,
    cluster_source_bindings,
    source_binding,
    subjects,
    viewer_binding,
)

log = logging.getLogger("source-controller")
# How long after a failed pass (an API server away, a binding refused) the next one starts.
RETRY_SECONDS = 2.0


def _path(binding: dict[str, object]) -> str:
    meta = binding["metadata"]
    assert isinstance(meta, dict)
    if binding["kind"] == "RoleBinding":
        return f"/apis/{RBAC}/v1/namespaces/{meta['namespace']}/rolebindings/{meta['name']}"
    return f"/apis/{RBAC}/v1/clusterrolebindings/{meta['name']}"


class SourceController:
    """One target: Sources and ClusterSources in, bindings out."""

    def __init__(self, client: KubeClient, roles: AcceptanceRoles, resync_seconds: float) -> None:
        self.client, self.roles, self.resync_seconds = client, roles, resync_seconds
        self.sources = Informer(client, SOURCES_PATH, name=f"{client.name} sources")
        self.cluster_sources = Informer(client, CLUSTER_SOURCES_PATH, name=f"{client.name} clustersources")
        self.changed = asyncio.Event()
        for informer in (self.sources, self.cluster_sources):
            informer.add_handler(lambda *_: self.changed.set())

    async def run(self) -> None:
        self.sources.start()
        self.cluster_sources.start()
        try:
            await self.sources.wait_synced()
            await self.cluster_sources.wait_synced()
            while True:
                self.changed.clear()
                try:
                    await self.reconcile()
                except (KubeError, OSError) as exc:
                    log.warning("%s: reconciling failed (%s); retrying", self.client.name, exc)
                    await asyncio.sleep(RETRY_SECONDS)
                    continue
                except Exception:  # anything else: said loudly, and tried again (the target's RBAC must follow)
                    log.exception("%s: reconciling failed; retrying", self.client.name)
                    await asyncio.sleep(RETRY_SECONDS)
                    continue
                try:
                    async with asyncio.timeout(self.resync_seconds):
                        await self.changed.wait()
                except TimeoutError:
                    pass
        finally:
            await self.sources.stop()
            await self.cluster_sources.stop()

    async def reconcile(self) -> None:
        # Listed objects come without their kind, which says how their identities are named.
        accepted = [{**obj, "kind": kind} for kind, informer in (("Source", self.sources),
                                                                 ("ClusterSource", self.cluster_sources))
                    for obj in informer.items() if not obj["metadata"].get("deletionTimestamp")]
        bindings = [viewer_binding(accepted, self.roles)]
        for obj in accepted:
            if not subjects(obj):  # its bindings are still applied, empty: what it granted before is taken back
                log.warning("%s: %s %s names no usable identity (userName, serviceAccountName or "
                            "serviceAccount): it grants nothing", self.client.name, obj["kind"],
                            obj["metadata"]["name"])
            if obj["kind"] == "Source":
                bindings.append(source_binding(obj, self.roles))
            else:
                bindings += cluster_source_bindings(obj, self.roles)
        failed: list[Exception] = []
        for binding in bindings:  # each on its own: one refused binding holds up no other
            try:
                await self.client.apply(_path(binding), binding)
            except KubeError as exc:
                log.warning("%s: cannot apply %s %s: %s", self.client.name, binding["kind"],
                            binding["metadata"]["name"], exc.message)
                failed.append(exc)
        log.info("%s: %d accepted sources, %d of %d bindings applied", self.client.name, len(accepted),
                 len(bindings) - len(failed), len(bindings))
        if failed:
            raise failed[0]


async def main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    roles = AcceptanceRoles.named(args.role_prefix)
    contexts = args.context or [None]
    clients = [await KubeClient.connect(ClusterSettings(name=context or "local", kubeconfig=args.kubeconfig,
                                                        context=context)) for context in contexts]
    tasks = [asyncio.create_task(SourceController(c, roles, args.resync_seconds).run()) for c in clients]
    log.info("source-controller running for %s (roles %s, %s, %s)", ", ".join(c.name for c in clients),
             roles.work, roles.viewer, roles.namespaces)
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for client in clients:
        await client.close()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="source-controller", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--kubeconfig", type=Path, help="kubeconfig (default: in-cluster)")
    parser.add_argument("--context", action="append", help="a target's context (repeat for several targets)")
    parser.add_argument("--role-prefix", default="multicluster-scheduler",
                        help="prefix of the accepted-source ClusterRoles (the chart's fullname)")
    parser.add_argument("--resync-seconds", type=float, default=60.0,
                        help="how often every binding is applied again, whatever the watches said (> 0)")
    parser.add_argument("--log-level", default="INFO")
    arguments = parser.parse_args(argv)
    if arguments.resync_seconds <= 0:
        parser.error(f"--resync-seconds must be more than 0, not {arguments.resync_seconds:g}")
    return arguments


if __name__ == "__main__":
    arguments = parse()
    setup_logging(arguments.log_level, "source-controller")
    asyncio.run(main(arguments))
