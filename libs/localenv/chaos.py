"""``make chaos``: faults injected while pods are placed and deleted; invariants sampled; recovery timed.

On a local environment whose services run (``c1`` the source and a target,
``c2`` a target), a churn task keeps placing and deleting pods in the
namespace ``chaos``: a Deployment scaled up and down, a StatefulSet whose
pods must never run twice under one name, and bare pods created and
deleted. Every pod tolerates a lost cluster for ``FAILOVER_SECONDS``.

Each round injects every fault in turn while the churn goes on: ``kill -9``
of each service (started again a second later), ``kill -9`` of NATS and of
NATS after wiping its JetStream store, c2's API server stopped past the
failover delay, and c1's API server restarted. Once each fault is repaired
(the process started again), the churn pauses and the time until the
pipeline converges is measured.

While it runs, a sampler checks every ``SAMPLE_SECONDS`` what must never
happen, in the clusters it can reach (:func:`invariant_violations`): two
live delegates for one proxy, two live delegates for one StatefulSet pod
name, a node whose pods request more than it has. At the end
(:func:`convergence_problems`): every proxy bound and Running with exactly
one Running delegate in its cluster, nothing orphaned or left Terminating,
every JetStream consumer drained.

``make chaos`` starts its own environment in ``<MCS_LOCAL_DIR>/chaos``
(``CHAOS_ROUNDS`` rounds, 1 by default), prints the figures and writes them
into docs/reliability.md; ``tests/e2e/test_chaos.py`` runs one round on the
test session's environment.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from mcsched.constants import ELECT_ANNOTATION, NAMESPACE_LABEL, NAMESPACE_LABEL_VALUE, PARENT_UID_LABEL
from mcsched.kube import JSON, KubeClient, KubeError
from mcsched.placement import Resources, node_allocatable, pod_requests
from mcsched.podspec import delegate_name
from mcsched.settings import ClusterSettings

from .environment import LocalEnvironment, nats_process_name, nats_store
from .services import SERVICES, process_name, start_service, start_services, wait_services_ready, write_config

NAMESPACE = "chaos"
SOURCE, LOST = "c1", "c2"
FAILOVER_SECONDS = 15
SAMPLE_SECONDS = 2.0
CONVERGE_SECONDS = 240.0
PROXY_SCHEDULER = "admiralty-proxy"
_TERMINAL = ("Succeeded", "Failed")
# What a request to a cluster that is the fault right now raises.
_UNREACHABLE = (KubeError, OSError, TimeoutError, aiohttp.ClientError)
DOCS = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"


# -- what the clusters show, and what must hold (pure) ------------------------------------------------


@dataclass
class Snapshot:
    """Pods of the chaos namespace and the real nodes of every cluster that answered."""

    proxies: list[JSON]
    delegates: dict[str, list[JSON]]  # cluster -> delegate pods (those it answered for)
    nodes: dict[str, list[JSON]] = field(default_factory=dict)  # cluster -> real nodes
    bound: dict[str, list[JSON]] = field(default_factory=dict)  # cluster -> every pod bound to a node


def _live(pod: JSON) -> bool:
    return not pod["metadata"].get("deletionTimestamp") and (pod.get("status") or {}).get("phase") not in _TERMINAL


def invariant_violations(snapshot: Snapshot) -> list[str]:
    """What must never be seen, even mid-fault: two live delegates for one proxy or one StatefulSet
    pod name, or a node whose pods request more than it has."""
    problems: list[str] = []
    names = {p["metadata"]["uid"]: p["metadata"]["name"] for p in snapshot.proxies}
    stateful = {p["metadata"]["uid"] for p in snapshot.proxies
                if any(o.get("kind") == "StatefulSet" for o in p["metadata"].get("ownerReferences") or [])}
    per_proxy: Counter[str] = Counter()
    per_name: Counter[str] = Counter()
    for pods in snapshot.delegates.values():
        for delegate in pods:
            if not _live(delegate):
                continue
            uid = delegate["metadata"]["labels"].get(PARENT_UID_LABEL, "")
            per_proxy[uid] += 1
            if uid in stateful:
                per_name[names[uid]] += 1
    problems += [f"proxy {names.get(uid, uid)} has {n} live delegates" for uid, n in per_proxy.items() if n > 1]
    problems += [f"StatefulSet pod {name} runs {n} times" for name, n in per_name.items() if n > 1]
    for cluster, nodes in snapshot.nodes.items():
        used: dict[str, Resources] = {}
        for pod in snapshot.bound.get(cluster, []):
            node = pod["spec"].get("nodeName")
            if node and (pod.get("status") or {}).get("phase") not in _TERMINAL:
                used[node] = used.get(node, Resources()) + pod_requests(pod)
        for node in nodes:
            name = node["metadata"]["name"]
            if name in used and not used[name].fits_in(node_allocatable(node)):
                problems.append(f"node {cluster}/{name} is over-committed")
    return problems


def convergence_problems(snapshot: Snapshot, expected: int) -> list[str]:
    """Everything between the clusters and the converged state; [] once converged."""
    problems: list[str] = []
    live = [p for p in snapshot.proxies if not p["metadata"].get("deletionTimestamp")]
    stuck = [p["metadata"]["name"] for p in snapshot.proxies if p["metadata"].get("deletionTimestamp")]
    if len(live) != expected:
        problems.append(f"{len(live)} proxies, expected {expected}")
    problems += [f"proxy {name} still Terminating" for name in stuck]
    uids = {p["metadata"]["uid"] for p in snapshot.proxies}
    for cluster, pods in snapshot.delegates.items():
        problems += [f"orphan delegate {cluster}/{d['metadata']['name']}" for d in pods
                     if d["metadata"]["labels"].get(PARENT_UID_LABEL) not in uids]
    for proxy in live:
        meta = proxy["metadata"]
        node = proxy["spec"].get("nodeName") or ""
        target = node.removeprefix("admiralty-")
        if not node.startswith("admiralty-"):
            problems.append(f"proxy {meta['name']} is not bound to a virtual node")
            continue
        mine = [d for d in snapshot.delegates.get(target, [])
                if d["metadata"]["labels"].get(PARENT_UID_LABEL) == meta["uid"] and _live(d)]
        if [d["metadata"]["name"] for d in mine] != [delegate_name(meta["name"], meta["uid"])]:
            problems.append(f"proxy {meta['name']} has {len(mine)} live delegates in {target}")
        elif (proxy.get("status") or {}).get("phase") != "Running" or mine[0]["status"].get("phase") != "Running":
            problems.append(f"proxy {meta['name']} is {proxy['status'].get('phase')}, its delegate "
                            f"{mine[0]['status'].get('phase')}")
    return problems


def pending_consumers(jsz: JSON) -> list[str]:
    """The JetStream consumers (from the monitoring endpoint's /jsz?consumers=true) with work left."""
    problems = []
    for account in jsz.get("account_details") or []:
        for stream in account.get("stream_detail") or []:
            for consumer in stream.get("consumer_detail") or []:
                pending = consumer.get("num_pending", 0) + consumer.get("num_ack_pending", 0)
                if pending:
                    problems.append(f"consumer {consumer.get('name')} of {stream.get('name')} has {pending} "
                                    "messages left")
    return problems


# -- the workload ---------------------------------------------------------------------------------------


def _template(app: str) -> JSON:
    tolerations = [{"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": FAILOVER_SECONDS}
                   for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")]
    return {"metadata": {"labels": {"app": app}, "annotations": {ELECT_ANNOTATION: ""}},
            "spec": {"terminationGracePeriodSeconds": 2, "tolerations": tolerations,
                     "containers": [{"name": "app", "image": "nginx",
                                     "resources": {"requests": {"cpu": "200m", "memory": "64Mi"}}}]}}


class Churn:
    """Keeps placing and deleting pods: a Deployment scaled between 4 and 10, a StatefulSet of 2,
    and bare pods (about 3 alive, one replaced per step). Pausable; API errors are retried."""

    def __init__(self, source: KubeClient) -> None:
        self.source = source
        self.running = asyncio.Event()
        self.replicas = 4
        self.bare: list[str] = []
        self.steps = 0
        self.created = 0

    @property
    def expected(self) -> int:
        return self.replicas + 2 + len(self.bare)

    async def setup(self) -> None:
        await self.source.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": NAMESPACE, "labels": {NAMESPACE_LABEL: NAMESPACE_LABEL_VALUE}}})
        await _retry(lambda: self.source.get(f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/default"))
        apps = f"/apis/apps/v1/namespaces/{NAMESPACE}"
        await _retry(lambda: self.source.create(f"{apps}/deployments", {
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "churn"},
            "spec": {"replicas": self.replicas, "selector": {"matchLabels": {"app": "churn"}},
                     "template": _template("churn")}}))
        await _retry(lambda: self.source.create(f"{apps}/statefulsets", {
            "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "ident"},
            "spec": {"replicas": 2, "serviceName": "ident", "selector": {"matchLabels": {"app": "ident"}},
                     "template": _template("ident")}}))

    async def run(self) -> None:
        while True:
            await self.running.wait()
            try:
                await self.step()
            except _UNREACHABLE:
                pass  # a fault under way: the next step tries again
            await asyncio.sleep(2)

    async def step(self) -> None:
        self.steps += 1
        replicas = 10 if self.replicas == 4 else 4
        await self.source.merge_patch(f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/churn/scale",
                                      {"spec": {"replicas": replicas}})
        self.created += max(0, replicas - self.replicas)
        self.replicas = replicas
        name = f"bare-{self.steps}"
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **_template("bare")["metadata"]},
               "spec": _template("bare")["spec"]}
        await self.source.create(f"/api/v1/namespaces/{NAMESPACE}/pods", pod)
        self.bare.append(name)
        self.created += 1
        if len(self.bare) > 3:
            gone = self.bare.pop(0)
            try:
                await self.source.delete(f"/api/v1/namespaces/{NAMESPACE}/pods/{gone}")
            except KubeError as exc:
                if not exc.not_found:
                    self.bare.insert(0, gone)
                    raise

    async def reconcile_bare(self) -> None:
        """Forget bare pods that are gone (evicted from a lost cluster: a pod lives once)."""
        alive = []
        for name in self.bare:
            try:
                pod = await self.source.get(f"/api/v1/namespaces/{NAMESPACE}/pods/{name}")
                if not pod["metadata"].get("deletionTimestamp"):
                    alive.append(name)
            except KubeError as exc:
                if not exc.not_found:
                    alive.append(name)
        self.bare = alive


async def _retry(action: Callable[[], Awaitable[Any]], seconds: float = 60.0) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await action()
        except _UNREACHABLE as exc:
            if isinstance(exc, KubeError) and exc.conflict:
                return None  # exists already
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


# -- faults ----------------------------------------------------------------------------------------------


@dataclass
class FaultResult:
    fault: str
    seconds_to_converge: float | None
    problems: list[str] = field(default_factory=list)


def _kill_service(env: LocalEnvironment, service: str) -> Callable[[], Awaitable[None]]:
    async def fault() -> None:
        env.processes.stop(process_name(service, 0), sig=signal.SIGKILL)
        await asyncio.sleep(1)
        start_service(env, service, 0)
    return fault


def _kill_nats(env: LocalEnvironment, wipe: bool, index: int = 0) -> Callable[[], Awaitable[None]]:
    """kill -9 the ``index``-th NATS server (the only one, or one node of a cluster), then start it again."""
    async def fault() -> None:
        name = nats_process_name(index)
        record = env.processes.get(name)
        assert record is not None
        env.processes.stop(name, sig=signal.SIGKILL)
        if wipe:
            shutil.rmtree(nats_store(env.root, index), ignore_errors=True)
        await asyncio.sleep(1)
        env.processes.start(name, record.argv)
        info = env.info()
        monitor = (info.nats_monitor_urls or [info.nats_monitor_url])[index]
        await asyncio.to_thread(_wait_url, monitor + "/healthz?js-enabled-only=true")
    return fault


def _stop_api_server(env: LocalEnvironment, cluster: str, down_seconds: float) -> Callable[[], Awaitable[None]]:
    async def fault() -> None:
        local = env.cluster(cluster)
        await asyncio.to_thread(local.stop_api_server)
        await asyncio.sleep(down_seconds)
        await asyncio.to_thread(local.start_api_server)  # its controllers' recovery counts in the convergence
    return fault


def _nats_faults(env: LocalEnvironment) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
    nodes = len(env.info().nats_monitor_urls) or 1
    if nodes == 1:
        return [("kill -9 NATS", _kill_nats(env, wipe=False)),
                ("kill -9 NATS, JetStream store wiped", _kill_nats(env, wipe=True))]
    return [(f"kill -9 NATS node 1 of {nodes}", _kill_nats(env, wipe=False, index=1)),
            (f"kill -9 NATS node 2 of {nodes}, its JetStream store wiped", _kill_nats(env, wipe=True, index=2))]


def faults(env: LocalEnvironment) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
    return [
        *((f"kill -9 {service.replace('_', '-')}", _kill_service(env, service)) for service in SERVICES),
        *_nats_faults(env),
        (f"{LOST} API server down {FAILOVER_SECONDS + 30}s (past the failover delay)",
         _stop_api_server(env, LOST, FAILOVER_SECONDS + 30)),
        (f"{SOURCE} API server restarted", _stop_api_server(env, SOURCE, 2)),
    ]


def _wait_url(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer in {timeout:.0f}s")
        time.sleep(0.5)


# -- the run ---------------------------------------------------------------------------------------------


class Chaos:
    def __init__(self, env: LocalEnvironment, log: Callable[[str], None] = print) -> None:
        self.env, self.log = env, log
        self.clients: dict[str, KubeClient] = {}
        self.violations: list[tuple[float, str]] = []
        self.samples = 0

    async def _client(self, cluster: str) -> KubeClient:
        if cluster not in self.clients:
            info = self.env.info()
            self.clients[cluster] = await KubeClient.connect(
                ClusterSettings(name=cluster, kubeconfig=Path(info.kubeconfig), context=cluster))
        return self.clients[cluster]

    async def snapshot(self, with_nodes: bool) -> Snapshot:
        """What every cluster that answers shows now (a cluster that does not is left out)."""
        source = await self._client(SOURCE)
        pods = (await source.get(f"/api/v1/namespaces/{NAMESPACE}/pods"))["items"]
        snap = Snapshot([p for p in pods if p["spec"].get("schedulerName") == PROXY_SCHEDULER], {})
        for cluster in self.env.info().cluster_names():
            client = await self._client(cluster)
            try:
                found = (await client.get(f"/api/v1/namespaces/{NAMESPACE}/pods",
                                          labelSelector=PARENT_UID_LABEL))["items"]
                if with_nodes:
                    nodes = (await client.get("/api/v1/nodes"))["items"]
                    snap.nodes[cluster] = [n for n in nodes if not n["metadata"]["name"].startswith("admiralty-")]
                    snap.bound[cluster] = (await client.get("/api/v1/pods", fieldSelector="spec.nodeName!="))["items"]
            except _UNREACHABLE:
                continue
            snap.delegates[cluster] = found
        return snap

    async def sample_forever(self, started: float) -> None:
        while True:
            try:
                snap = await self.snapshot(with_nodes=True)
                self.samples += 1
                for problem in invariant_violations(snap):
                    self.violations.append((round(time.monotonic() - started, 1), problem))
                    self.log(f"  VIOLATION: {problem}")
            except _UNREACHABLE:
                pass  # the source is the fault right now
            await asyncio.sleep(SAMPLE_SECONDS)

    async def converge(self, churn: Churn) -> tuple[float | None, list[str]]:
        started = time.monotonic()
        problems: list[str] = ["not checked"]
        while time.monotonic() - started < CONVERGE_SECONDS:
            try:
                await churn.reconcile_bare()
                problems = convergence_problems(await self.snapshot(with_nodes=False), churn.expected)
                if not problems:
                    problems = pending_consumers(_read_json(self.env.info().nats_monitor_url +
                                                            "/jsz?consumers=true"))
            except _UNREACHABLE as exc:
                problems = [f"cannot observe: {exc}"]
            if not problems:
                return round(time.monotonic() - started, 1), []
            await asyncio.sleep(1)
        return None, problems

    async def run(self, rounds: int) -> JSON:
        churn = Churn(await self._client(SOURCE))
        await churn.setup()
        started = time.monotonic()
        sampler = asyncio.create_task(self.sample_forever(started))
        churner = asyncio.create_task(churn.run())
        results: list[FaultResult] = []
        try:
            first, problems = await self.converge(churn)
            self.log(f"workload placed ({churn.expected} pods) in {first}s" if first is not None
                     else f"workload never converged: {problems[:5]}")
            for round_ in range(rounds):
                for name, fault in faults(self.env):
                    self.log(f"round {round_ + 1}: {name}")
                    churn.running.set()
                    await asyncio.sleep(random.uniform(2, 6))
                    await fault()  # the churn goes on during the fault, and stops once it is repaired
                    churn.running.clear()
                    seconds, problems = await self.converge(churn)
                    results.append(FaultResult(name, seconds, problems[:10]))
                    self.log(f"  converged in {seconds}s" if seconds is not None else
                             f"  NOT converged after {CONVERGE_SECONDS:.0f}s: {problems[:5]}")
        finally:
            for task in (sampler, churner):
                task.cancel()
            await asyncio.gather(sampler, churner, return_exceptions=True)
            for client in self.clients.values():
                await client.close()
        return {"rounds": rounds, "faults": [asdict(r) for r in results], "pods_created": churn.created,
                "churn_steps": churn.steps, "samples": self.samples,
                "violations": [{"at_seconds": t, "problem": p} for t, p in self.violations],
                "seconds": round(time.monotonic() - started, 1)}


async def restore(env: LocalEnvironment) -> None:
    """Leave the environment as found, for one that goes on being used (the test session's): wait
    until every cluster's controllers act again, delete the chaos namespace's workload, wait until
    the pipeline removed every delegate, then delete the namespace everywhere."""
    info = env.info()
    for cluster in info.cluster_names():
        await asyncio.to_thread(env.cluster(cluster).wait_recovered)
    clients = {c: await KubeClient.connect(ClusterSettings(name=c, kubeconfig=Path(info.kubeconfig), context=c))
               for c in info.cluster_names()}
    try:
        source = clients[SOURCE]
        apps = f"/apis/apps/v1/namespaces/{NAMESPACE}"
        for kind in ("deployments", "statefulsets"):
            await source.request("DELETE", f"{apps}/{kind}", {"propagationPolicy": "Foreground"})
        await source.request("DELETE", f"/api/v1/namespaces/{NAMESPACE}/pods")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            left = [len((await c.get(f"/api/v1/namespaces/{NAMESPACE}/pods"))["items"]) for c in clients.values()]
            if not any(left):
                break
            await asyncio.sleep(1)
        for client in clients.values():
            try:
                await client.delete(f"/api/v1/namespaces/{NAMESPACE}")
            except KubeError as exc:
                if not exc.not_found:
                    raise
    finally:
        for client in clients.values():
            await client.close()


def _read_json(url: str) -> JSON:
    with urllib.request.urlopen(url, timeout=5) as response:
        result: JSON = json.load(response)
        return result


def passed(report: JSON) -> bool:
    return not report["violations"] and all(f["seconds_to_converge"] is not None for f in report["faults"])


def table(report: JSON) -> str:
    lines = ["| fault | converged after |", "|---|---|"]
    for fault in report["faults"]:
        seconds = fault["seconds_to_converge"]
        after = f"{seconds:.1f} s" if seconds is not None else "never: " + "; ".join(fault["problems"][:3])
        lines.append(f"| {fault['fault']} | {after} |")
    lines.append("")
    lines.append(f"{len(report['faults'])} faults in {report['rounds']} round(s), {report['pods_created']} pods "
                 f"created over {report['churn_steps']} churn steps, {report['samples']} invariant samples, "
                 f"{len(report['violations'])} violations, {report['seconds']:.0f} s in all.")
    return "\n".join(lines)


def write_docs(report: JSON, path: Path = DOCS, marker: str = "chaos") -> None:
    """Replace the figures between the ``<!-- <marker>:begin/end -->`` markers of docs/reliability.md
    (``chaos`` for one NATS server, ``chaos-nats-cluster`` for a NATS cluster)."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    text = path.read_text()
    if begin not in text or end not in text:
        return
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{table(report)}\n{end}{tail}")


def main() -> int:
    rounds = int(os.environ.get("CHAOS_ROUNDS", "1"))
    root = Path(os.environ.get("MCS_LOCAL_DIR", ".local")) / "chaos"
    env = LocalEnvironment(root)
    env.down()
    print(f"starting a local environment in {root} (c1 source and target, c2 target)", flush=True)
    nats_nodes = int(os.environ.get("NATS_NODES", "1"))
    env.up([SOURCE, LOST], nodes=3, log=lambda m: print(f"  {m}", flush=True), nats_nodes=nats_nodes)
    try:
        write_config(env, resync_seconds=5.0)
        start_services(env)
        wait_services_ready(env)
        report = asyncio.run(Chaos(env, lambda m: print(m, flush=True)).run(rounds))
    finally:
        env.down()
    (root / "latest.json").write_text(json.dumps(report, indent=1))
    print(table(report))
    write_docs(report, marker="chaos" if nats_nodes == 1 else "chaos-nats-cluster")
    print(f"figures written to {DOCS} and {root / 'latest.json'}")
    return 0 if passed(report) else 1
