"""``make bench``: how fast elected pods go from created to Running, against plain scheduling.

Each scenario starts a fresh local environment (clusters ``c1..cM``, every one
a target, ``c1`` the source; ``BENCH_NODES`` kwok nodes each), creates
``BENCH_PODS`` pods, half through Deployments and half as bare pods, and
times every step from the API servers' watch events as this process receives
them:

    created -> proxy bound to a virtual node -> delegate created -> delegate Running -> proxy Running

The baseline is the same pods without the elect annotation, scheduled by
kube-scheduler onto c1's kwok nodes. Scenarios: the baseline, the pipeline
with one replica per stage, the baseline again (the ratios use the mean of
the two baselines around the pipeline, as the machine's speed drifts), and
the pipeline with two and with three processes of each stage in turn
(``BENCH_SCALING=0``: without those): for each stage, its CPU per 1000 pods
with 1, 2 and 3 processes, the largest share of it one process had, and
how often its processes' event loops were woken per pod (voluntary context
switches of their main threads).
Results go to ``.local/bench/latest.json`` and a PNG of the latency
distributions beside it; the previous ``latest.json`` becomes ``previous.json``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from mcsched.constants import ELECT_ANNOTATION, NAMESPACE_LABEL, NAMESPACE_LABEL_VALUE, PARENT_UID_LABEL
from mcsched.kube import JSON, Informer, KubeClient, KubeError
from mcsched.settings import ClusterSettings
from mcsched.shards import SHARDED_STAGES

from .environment import LocalEnvironment
from .processes import ProcessRecord
from .services import SERVICES, start_service, start_services, wait_services_ready, write_config

BASELINE_AGAIN = "baseline, again"
SCALES = (2, 3)  # processes of one stage in the scaling scenarios (1 is the pipeline's)
SHARES_SETTLE_SECONDS = 4.0
# Before a scenario's pods are created, the services together must use less than this share of a core
# (each idles at a few thousandths), so what starting them costs is not counted as the pods' cost.
QUIET_CORES = 0.05
STARTED_WITHIN_SECONDS = 90.0
RESYNC_MEASURE_PODS = 5000  # from this many pods, each pipeline scenario also times a full resync of them
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")  # <cluster>-<this>
STEPS = ("proxy_bound", "delegate_created", "delegate_running", "proxy_running")
BASELINE_STEPS = ("bound", "running")
NAMESPACE = "bench"
# A bare pod whose create the API server refuses for now (5xx) is created again this many times at most.
CREATE_ATTEMPTS = 5
PROFILE_SECONDS = int(os.environ.get("BENCH_PROFILE", "0") or 0)


@dataclass
class PodTimes:
    created: float
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, step: str, when: float) -> None:
        self.marks.setdefault(step, when)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1],
            "mean": statistics.fmean(ordered)}


def pod_manifest(name: str | None, elected: bool, labels: dict[str, str]) -> JSON:
    metadata: JSON = {"labels": labels}
    if name:
        metadata["name"] = name
    if elected:
        metadata["annotations"] = {ELECT_ANNOTATION: ""}
    return {"metadata": metadata, "spec": {"containers": [{
        "name": "app", "image": "nginx", "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}}


class Scenario:
    """One timed run: create the pods, watch every step, stop when all are Running."""

    def __init__(self, env: LocalEnvironment, pods: int, elected: bool, rate: float = 0.0) -> None:
        self.env, self.pods, self.elected = env, pods, elected
        self.rate = rate  # pods created per second (bare pods), or 0: all at once, half through Deployments
        self.times: dict[str, PodTimes] = {}  # proxy (or pod) uid -> times
        self.by_name: dict[str, str] = {}
        self.done = asyncio.Event()
        self.clients: dict[str, KubeClient] = {}

    async def _client(self, name: str) -> KubeClient:
        info = self.env.info()
        return await KubeClient.connect(ClusterSettings(name=name, kubeconfig=Path(info.kubeconfig), context=name))

    def _on_source(self, kind: str, pod: JSON, _old: JSON | None) -> None:
        if kind == "DELETED":
            return
        now = time.monotonic()
        uid = pod["metadata"]["uid"]
        times = self.times.setdefault(uid, PodTimes(now))
        self.by_name[f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"] = uid
        if pod["spec"].get("nodeName"):
            times.mark("proxy_bound" if self.elected else "bound", now)
        if pod.get("status", {}).get("phase") == "Running":
            times.mark("proxy_running" if self.elected else "running", now)
        self._check_done()

    def _on_delegate(self, kind: str, pod: JSON, _old: JSON | None) -> None:
        if kind == "DELETED":
            return
        now = time.monotonic()
        parent = (pod["metadata"].get("labels") or {}).get(PARENT_UID_LABEL)
        times = self.times.get(parent or "")
        if times is None:
            return
        times.mark("delegate_created", now)
        if pod.get("status", {}).get("phase") == "Running":
            times.mark("delegate_running", now)

    def _check_done(self) -> None:
        last = "proxy_running" if self.elected else "running"
        if len(self.times) >= self.pods and all(last in t.marks for t in self.times.values()):
            self.done.set()

    async def run(self, timeout: float) -> JSON:
        info = self.env.info()
        source = info.cluster_names()[0]
        for name in info.cluster_names():
            self.clients[name] = await self._client(name)
        client = self.clients[source]
        namespace = NAMESPACE if self.elected else f"{NAMESPACE}-baseline"
        labels = {NAMESPACE_LABEL: NAMESPACE_LABEL_VALUE} if self.elected else {}
        await client.create("/api/v1/namespaces", {"metadata": {"name": namespace, "labels": labels}})
        await _wait_service_account(client, namespace)
        # In the source, follow the proxies only (with "target self", c1's delegates live there too).
        proxies = "spec.schedulerName=admiralty-proxy" if self.elected else None
        informers = [Informer(client, f"/api/v1/namespaces/{namespace}/pods", field_selector=proxies)]
        informers[0].add_handler(self._on_source)
        if self.elected:
            for name, target in self.clients.items():
                informer = Informer(target, f"/api/v1/namespaces/{namespace}/pods", label_selector=PARENT_UID_LABEL,
                                    name=f"{name} delegates")
                informer.add_handler(self._on_delegate)
                informers.append(informer)
        for informer in informers:
            informer.start()
        for informer in informers:
            await informer.wait_synced(30)
        before = _service_usage(self.env)
        started = time.monotonic()
        profiling = asyncio.ensure_future(self._profile()) if self.elected and PROFILE_SECONDS else None
        await self._create(client, namespace)
        created_in = time.monotonic() - started
        try:
            await asyncio.wait_for(self.done.wait(), timeout)
        except TimeoutError:
            pass
        elapsed = time.monotonic() - started
        after = _service_usage(self.env)
        if profiling is not None:
            await profiling
        for informer in informers:
            await informer.stop()
        for c in self.clients.values():
            await c.close()
        return self._report(elapsed, created_in, before, after)

    async def _profile(self) -> None:
        """``BENCH_PROFILE=<seconds>``: CPU profiles of every API server (pprof) and service
        (py-spy, if installed) from the start of creation, into ``.local/bench/profile/``."""
        out = Path(os.environ.get("MCS_LOCAL_DIR", ".local")) / "bench" / "profile"
        out.mkdir(parents=True, exist_ok=True)

        async def api_server(name: str, client: KubeClient) -> None:
            response = await client._raw("GET", "/debug/pprof/profile", {"seconds": PROFILE_SECONDS},
                                         timeout=aiohttp.ClientTimeout(total=PROFILE_SECONDS + 30))
            async with response:
                (out / f"{name}-kube-apiserver.pprof").write_bytes(await response.read())

        jobs: list[Any] = [api_server(name, c) for name, c in self.clients.items()]
        py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if py_spy:
            for record in self.env.processes.load():
                if record.name.startswith("svc-") and record.alive():
                    jobs.append(asyncio.create_subprocess_exec(
                        py_spy, "record", "--gil", "--nonblocking", "--format", "raw", "-d", str(PROFILE_SECONDS),
                        "-p", str(record.pid), "-o", str(out / f"{record.name}.txt"),
                        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL))
        started = await asyncio.gather(*jobs, return_exceptions=True)
        await asyncio.gather(*(p.wait() for p in started if isinstance(p, asyncio.subprocess.Process)))
        print(f"    profiles in {out}", flush=True)

    async def _create(self, client: KubeClient, namespace: str) -> None:
        if self.rate > 0:
            await self._create_steadily(client, namespace)
            return
        deployments = self.pods // 2
        bare = self.pods - deployments
        per_deployment = max(1, deployments // 5) if deployments else 0
        created = 0
        index = 0
        while created < deployments:
            replicas = min(per_deployment, deployments - created)
            labels = {"app": f"load-{index}"}
            await client.create(f"/apis/apps/v1/namespaces/{namespace}/deployments", {
                "metadata": {"name": f"load-{index}"},
                "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                         "template": pod_manifest(None, self.elected, labels)}})
            created += replicas
            index += 1
        gate = asyncio.Semaphore(32)

        async def one(i: int) -> None:
            async with gate:
                await self._create_bare(client, namespace, i)

        await asyncio.gather(*(one(i) for i in range(bare)))

    async def _create_steadily(self, client: KubeClient, namespace: str) -> None:
        """``BENCH_RATE``: bare pods, one every 1/rate seconds (never earlier), so the machine is
        not saturated: each stage's CPU per pod then shows what its processes cost, not the
        contention for the cores."""
        started = time.monotonic()
        creating = []
        for i in range(self.pods):
            await asyncio.sleep(max(0.0, started + i / self.rate - time.monotonic()))
            creating.append(asyncio.ensure_future(self._create_bare(client, namespace, i)))
        await asyncio.gather(*creating)

    async def _create_bare(self, client: KubeClient, namespace: str, i: int) -> None:
        for attempt in range(CREATE_ATTEMPTS):
            try:
                await client.create(f"/api/v1/namespaces/{namespace}/pods",
                                    pod_manifest(f"bare-{i}", self.elected, {"app": "bare"}))
                return
            except KubeError as exc:
                # Refused for now (e.g. the admission webhook did not answer in time under the
                # burst): tried again, as a controller would; one that got through is kept.
                if exc.conflict and attempt > 0:
                    return
                if exc.status < 500 or attempt == CREATE_ATTEMPTS - 1:
                    raise
            await asyncio.sleep(1.0 + attempt)

    def _report(self, elapsed: float, created_in: float, before: JSON, after: JSON) -> JSON:
        last = "proxy_running" if self.elected else "running"
        steps = STEPS if self.elected else BASELINE_STEPS
        finished = [t for t in self.times.values() if last in t.marks]
        latency = {}
        previous = "created"
        for step in steps:
            values = []
            for t in finished:
                start = t.created if previous == "created" else t.marks.get(previous)
                end = t.marks.get(step)
                if start is not None and end is not None:
                    values.append(max(0.0, end - start))
            latency[f"{previous}->{step}"] = percentiles(values)
            previous = step
        latency[f"created->{last}"] = percentiles([t.marks[last] - t.created for t in finished])
        first = min((t.created for t in self.times.values()), default=0.0)
        end_time = max((t.marks[last] for t in finished), default=first)
        span = max(end_time - first, 1e-9)
        cost = {}
        per_k = 1000 / max(1, len(finished))
        for name, usage in after["processes"].items():
            start = before["processes"].get(name, {"cpu_seconds": 0.0, "wakeups": 0})
            wakeups = usage["wakeups"] - start["wakeups"]
            cost[name] = {"cpu_seconds_per_1000_pods": round((usage["cpu_seconds"] - start["cpu_seconds"]) * per_k, 2),
                          "wakeups_per_pod": round(wakeups * per_k / 1000, 1),
                          "peak_rss_mib": usage["peak_rss_mib"],
                          **{k: usage[k] for k in ("resync_seconds", "resync_items") if k in usage}}
        environment = {name: round((cpu - before["environment"].get(name, 0.0)) * per_k, 2)
                       for name, cpu in sorted(after["environment"].items())}
        # Per cluster ("c1"), and per service, method and cluster ("feedback PATCH c1").
        api = {key: round((count - before["api_requests"].get(key, 0)) / max(1, len(finished)), 2)
               for key, count in sorted(after["api_requests"].items())}
        return {
            "pods": self.pods, "completed": len(finished), "elapsed_seconds": round(elapsed, 2),
            "create_seconds": round(created_in, 2),
            "throughput_pods_per_s": round(len(finished) / span, 2),
            "latency_seconds": latency, "service_cost": cost, "api_requests_per_pod": api,
            "environment_cpu_seconds_per_1000_pods": environment,
            "environment_peak_rss_mib": after.get("environment_peak_rss_mib", {}),
            "samples": {f"created->{last}": [round(t.marks[last] - t.created, 4) for t in finished],
                        **{step: [round(t.marks[step] - t.created, 4) for t in finished if step in t.marks]
                           for step in steps}},
        }


async def _wait_service_account(client: KubeClient, namespace: str) -> None:
    for _ in range(100):
        try:
            await client.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/default")
            return
        except Exception:
            await asyncio.sleep(0.2)


def _service_usage(env: LocalEnvironment) -> JSON:
    """CPU seconds and peak RSS of every service process, their API requests per cluster,
    and the CPU seconds of every other process of the environment (control planes, NATS, Jaeger)."""
    processes: dict[str, JSON] = {}
    environment: dict[str, float] = {}
    environment_rss: dict[str, float] = {}
    api: dict[str, float] = {}
    for record in env.processes.load():
        if not record.alive():
            continue
        try:
            cpu = _cpu_seconds(record.pid)
            status = Path(f"/proc/{record.pid}/status").read_text()
        except OSError:  # exited meanwhile
            continue
        hwm = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")), 0)
        if not record.name.startswith("svc-"):
            environment[record.name] = cpu
            environment_rss[record.name] = round(hwm / 1024, 1)
            continue
        # Each time its main thread (the event loop; /proc/<pid>/status counts that thread alone) went to
        # sleep waiting for a socket or a timer and was woken again: its wake-ups.
        wakeups = sum(int(line.split()[1]) for line in status.splitlines()
                      if line.startswith("voluntary_ctxt_switches"))
        processes[record.name] = {"cpu_seconds": cpu, "peak_rss_mib": round(hwm / 1024, 1), "wakeups": wakeups}
        try:
            with urllib.request.urlopen(record.meta["metrics_url"] + "/metrics", timeout=5) as response:
                for line in response.read().decode().splitlines():
                    if line.startswith(("mcs_resync_seconds{", "mcs_resync_items{")):  # the last full resync's
                        key = "resync_seconds" if line.startswith("mcs_resync_seconds") else "resync_items"
                        processes[record.name][key] = float(line.rsplit(" ", 1)[1])
                    if line.startswith("mcs_api_requests_total{"):
                        cluster = line.split('cluster="', 1)[1].split('"', 1)[0]
                        method = line.split('method="', 1)[1].split('"', 1)[0]
                        count = float(line.rsplit(" ", 1)[1])
                        api[cluster] = api.get(cluster, 0) + count
                        service = record.name.removeprefix("svc-").rsplit("-", 1)[0]
                        key = f"{service} {method} {cluster}"
                        api[key] = api.get(key, 0) + count
        except (OSError, KeyError):
            pass
    return {"processes": processes, "environment": environment, "environment_peak_rss_mib": environment_rss,
            "api_requests": api}


def full_resync(env: LocalEnvironment, pods: int, within: float = 120.0) -> JSON:
    """The first resync of feedback's processes that goes through every proxy and delegate (2 per pod,
    after the pods run): how long it took, per process."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        processes = _service_usage(env)["processes"]
        feedback = {name: usage for name, usage in processes.items() if name.startswith("svc-feedback-")}
        if feedback and sum(u.get("resync_items", 0) for u in feedback.values()) >= 2 * pods:
            return {name: {"objects": u.get("resync_items"), "seconds": u.get("resync_seconds")}
                    for name, u in feedback.items()}
        time.sleep(2)
    return {"error": f"no resync through {2 * pods} objects within {within:.0f}s"}


def _git_revision() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return proc.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _start_env(env: LocalEnvironment, clusters: list[str], nodes: int, replicas: dict[str, int] | None) -> None:
    env.up(clusters, nodes=nodes, log=lambda m: None)
    if replicas is not None:
        write_config(env)
        start_services(env)
        for service, count in replicas.items():
            for replica in range(1, count):
                start_service(env, service, replica)
        wait_services_ready(env)
        if any(count > 1 for count in replicas.values()):
            time.sleep(SHARES_SETTLE_SECONDS)  # the processes of a stage share the work out among themselves
        _wait_started(env)


def _cpu_seconds(pid: int) -> float:
    """User and system CPU seconds a process has used (OSError once it is gone)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _started(record: ProcessRecord, processes: list[ProcessRecord]) -> bool:
    """The process answers /readyz, and hears every process of its stage (if its stage is sharded)."""
    url = record.meta["metrics_url"]
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2):
            pass
        with urllib.request.urlopen(url + "/metrics", timeout=2) as response:
            members = [float(line.split()[1]) for line in response.read().decode().splitlines()
                       if line.startswith("mcs_stage_members ")]
    except OSError:
        return False
    stage = record.name.rsplit("-", 1)[0]  # svc-feedback-2 -> svc-feedback
    if stage.removeprefix("svc-") not in SHARDED_STAGES:
        return True
    return bool(members) and members[0] == sum(1 for p in processes if p.name.rsplit("-", 1)[0] == stage)


def _wait_started(env: LocalEnvironment) -> None:
    """Until every service process is ready and knows its stage's members, and all of them together are
    quiet (under ``QUIET_CORES`` over a second): starting them is then over, and not measured."""
    began = time.monotonic()
    deadline = began + STARTED_WITHIN_SECONDS
    while time.monotonic() < deadline:
        processes = [r for r in env.processes.load() if r.name.startswith("svc-") and r.alive()]
        if not all(_started(r, processes) for r in processes):
            time.sleep(0.5)
            continue
        try:
            before = sum(_cpu_seconds(r.pid) for r in processes)
            time.sleep(1.0)
            if sum(_cpu_seconds(r.pid) for r in processes) - before < QUIET_CORES:
                print(f"    services ready and quiet {time.monotonic() - began:.1f}s after they answered", flush=True)
                return
        except OSError:  # one exited meanwhile: the scenario will say so
            return
    print(f"    (the services were still busy starting after {STARTED_WITHIN_SECONDS:.0f}s; measuring anyway)",
          flush=True)


def run(pods: int, clusters: int, nodes: int, root: Path, timeout: float, rate: float = 0.0) -> JSON:
    names = [f"c{i + 1}" for i in range(clusters)]
    env = LocalEnvironment(root / "env")
    results: JSON = {}
    scenarios: list[tuple[str, dict[str, int] | None]] = [
        ("baseline", None), ("pipeline", {}), (BASELINE_AGAIN, None)]
    if os.environ.get("BENCH_SCALING", "1") != "0":  # BENCH_SCALING=0: no runs with two processes of a stage
        scenarios += [(scaled(s, n), {s: n}) for s in SERVICES for n in SCALES]
    try:
        for label, replicas in scenarios:
            print(f"==> {label}: {pods} pods over {clusters} clusters x {nodes} nodes", flush=True)
            _start_env(env, names, nodes, replicas)
            result = asyncio.run(Scenario(env, pods, elected=replicas is not None, rate=rate).run(timeout))
            if replicas is not None and pods >= RESYNC_MEASURE_PODS:
                result["full_resync"] = full_resync(env, pods)
                print(f"    full resync: {result['full_resync']}", flush=True)
            results[label] = result
            latency = result["latency_seconds"]
            total = latency.get("created->proxy_running") or latency.get("created->running") or {}
            print(f"    {result['completed']}/{pods} Running, {result['throughput_pods_per_s']} pods/s, "
                  f"p99 created->Running {total.get('p99', float('nan')):.2f}s", flush=True)
    finally:
        env.down()
    ours = results["pipeline"]
    baselines = [results["baseline"], results[BASELINE_AGAIN]]
    base_throughput = round(statistics.mean(b["throughput_pods_per_s"] for b in baselines), 2)
    base_p99 = statistics.mean(b["latency_seconds"]["created->running"].get("p99", 0.0) for b in baselines)
    our_p99 = ours["latency_seconds"]["created->proxy_running"].get("p99", 0.0)
    summary = {
        "git_revision": _git_revision(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {"pods": pods, "clusters": clusters, "nodes_per_cluster": nodes, "source": "c1",
                     "targets": names, "pod_requests": {"cpu": "10m", "memory": "16Mi"},
                     "half_deployments_half_bare_pods": not rate, "created_per_second": rate or None,
                     "machine_cpus": os.cpu_count()},
        "throughput_pods_per_s": ours["throughput_pods_per_s"],
        "baseline_throughput_pods_per_s": base_throughput,
        "baseline_runs_pods_per_s": [b["throughput_pods_per_s"] for b in baselines],
        "throughput_ratio_to_baseline": round(ours["throughput_pods_per_s"] / max(base_throughput, 1e-9), 3),
        "p99_seconds": our_p99, "baseline_p99_seconds": base_p99,
        "p99_ratio_to_baseline": round(our_p99 / max(base_p99, 1e-9), 3),
        "cpu_seconds_per_1000_pods": {},
        "steps": {step: {k: round(v, 4) for k, v in stats.items()}
                  for step, stats in ours["latency_seconds"].items()},
        "scaling": {label: {"throughput_pods_per_s": r["throughput_pods_per_s"],
                            "p99_seconds": r["latency_seconds"].get("created->proxy_running", {}).get("p99")}
                    for label, r in results.items() if label.startswith("pipeline")},
        "scenarios": results,
    }
    summary["cpu_seconds_per_1000_pods"] = {group: {"baseline": round(b, 2), "pipeline": round(o, 2)}
                                            for group, (b, o) in cpu_split(summary).items()}
    summary["stages"] = stage_scaling(results)
    return summary


def scaled(service: str, processes: int) -> str:
    return f"pipeline, {processes}x {service.replace('_', '-')}"


def stage_cost(result: JSON, service: str) -> JSON:
    """A stage's CPU per 1000 pods in one scenario (all its processes) and the largest share one had.

    ``other_stages_cpu_seconds_per_1000_pods`` is the CPU of every other stage in the same scenario:
    they run one process each and do the same work in every scenario, so how it moves between two
    scenarios shows how much the machine's own speed moved between them (docs/performance.md).
    """
    prefix = f"svc-{service.replace('_', '-')}-"
    costs = [cost for name, cost in result["service_cost"].items() if name.startswith(prefix)]
    others = sum(cost["cpu_seconds_per_1000_pods"] for name, cost in result["service_cost"].items()
                 if not name.startswith(prefix))
    cpus = [cost["cpu_seconds_per_1000_pods"] for cost in costs]
    total = sum(cpus)
    return {"processes": len(cpus), "cpu_seconds_per_1000_pods": round(total, 2),
            "other_stages_cpu_seconds_per_1000_pods": round(others, 2),
            "wakeups_per_pod": round(sum(cost.get("wakeups_per_pod", 0.0) for cost in costs), 1),
            "largest_share": round(max(cpus) / total, 3) if total > 0 else None,
            "throughput_pods_per_s": result["throughput_pods_per_s"]}


def stage_scaling(results: JSON) -> JSON:
    """stage -> processes -> its cost, from the pipeline (1 process each) and the scaling scenarios."""
    stages: JSON = {}
    for service in SERVICES:
        runs = {1: results["pipeline"], **{n: results[scaled(service, n)] for n in SCALES
                                           if scaled(service, n) in results}}
        if len(runs) > 1:
            stages[service.replace("_", "-")] = {str(n): stage_cost(r, service) for n, r in runs.items()}
    return stages


def print_table(summary: JSON) -> None:
    print()
    print(f"revision {summary['git_revision']}, {summary['settings']['pods']} pods, "
          f"{summary['settings']['clusters']} clusters x {summary['settings']['nodes_per_cluster']} nodes")
    print(f"{'scenario':<34} {'pods/s':>8} {'p50 s':>7} {'p90 s':>7} {'p99 s':>7} {'max s':>7}")
    for label, result in summary["scenarios"].items():
        key = "created->proxy_running" if label.startswith("pipeline") else "created->running"
        stats = result["latency_seconds"].get(key, {})
        print(f"{label:<34} {result['throughput_pods_per_s']:>8.1f} {stats.get('p50', 0):>7.2f} "
              f"{stats.get('p90', 0):>7.2f} {stats.get('p99', 0):>7.2f} {stats.get('max', 0):>7.2f}")
    print()
    print(f"{'step (pipeline, 1 replica each)':<34} {'p50 s':>7} {'p90 s':>7} {'p99 s':>7} {'max s':>7}")
    for step, stats in summary["steps"].items():
        print(f"{step:<34} {stats.get('p50', 0):>7.3f} {stats.get('p90', 0):>7.3f} {stats.get('p99', 0):>7.3f} "
              f"{stats.get('max', 0):>7.3f}")
    print()
    ours = summary["scenarios"]["pipeline"]
    print(f"{'service cost':<34} {'cpu s/1000 pods':>16} {'peak RSS MiB':>13} {'last resync':>22}")
    for name, cost in ours["service_cost"].items():
        resync = f"{cost['resync_items']:.0f} objects in {cost['resync_seconds']:.2f}s" \
            if "resync_seconds" in cost and "resync_items" in cost else ""
        print(f"{name:<34} {cost['cpu_seconds_per_1000_pods']:>16.2f} {cost['peak_rss_mib']:>13.1f} {resync:>22}")
    rss = ours.get("environment_peak_rss_mib", {})
    if rss:
        print("peak RSS MiB of the environment's processes: "
              + ", ".join(f"{name} {mib:.0f}" for name, mib in sorted(rss.items(), key=lambda kv: -kv[1])))
    requests = ours["api_requests_per_pod"]
    print(f"API requests per pod, by cluster: { {k: v for k, v in requests.items() if ' ' not in k} }")
    print("  by service, method and cluster: " + ", ".join(f"{k} {v}" for k, v in requests.items() if " " in k))
    print()
    print(f"{'CPU s per 1000 pods':<34} {'baseline':>9} {'pipeline':>9}")
    for group, (base_cpu, our_cpu) in cpu_split(summary).items():
        print(f"{group:<34} {base_cpu:>9.1f} {our_cpu:>9.1f}")
    if summary.get("stages"):
        print()
        print(f"{'stage':<22} {'processes':>9} {'cpu s/1000 pods':>16} {'vs 1':>6} {'largest share':>14} "
              f"{'pods/s':>7} {'wake-ups/pod':>13} {'other stages vs 1':>18}")
        for stage, runs in summary["stages"].items():
            one = runs["1"]["cpu_seconds_per_1000_pods"] or 1e-9
            others_one = runs["1"].get("other_stages_cpu_seconds_per_1000_pods") or 1e-9
            for count, cost in runs.items():
                share = cost["largest_share"]
                others = cost.get("other_stages_cpu_seconds_per_1000_pods", 0.0) / others_one
                print(f"{stage:<22} {count:>9} {cost['cpu_seconds_per_1000_pods']:>16.2f} "
                      f"{cost['cpu_seconds_per_1000_pods'] / one:>6.2f} "
                      f"{'-' if share is None else f'{share:.2f}':>14} {cost['throughput_pods_per_s']:>7.1f} "
                      f"{cost.get('wakeups_per_pod', 0.0):>13.1f} {others:>18.2f}")
    print()
    runs = " and ".join(str(t) for t in summary["baseline_runs_pods_per_s"])
    print(f"throughput {summary['throughput_pods_per_s']} pods/s vs baseline "
          f"{summary['baseline_throughput_pods_per_s']} pods/s (mean of {runs}): "
          f"ratio {summary['throughput_ratio_to_baseline']}")
    print(f"p99 created->Running {summary['p99_seconds']:.2f}s vs baseline {summary['baseline_p99_seconds']:.2f}s: "
          f"ratio {summary['p99_ratio_to_baseline']}")


def _cpu_groups(result: JSON) -> dict[str, float]:
    """A scenario's CPU per 1000 pods by kind of process: each cluster's control plane, NATS, Jaeger, services."""
    groups: dict[str, float] = {}
    for name, cpu in result.get("environment_cpu_seconds_per_1000_pods", {}).items():
        cluster, _, component = name.partition("-")
        group = f"{cluster} control plane" if component in CONTROL_PLANE else name
        groups[group] = groups.get(group, 0.0) + cpu
    groups["services"] = sum(c["cpu_seconds_per_1000_pods"] for c in result.get("service_cost", {}).values())
    return groups


def cpu_split(summary: JSON) -> dict[str, tuple[float, float]]:
    """(baseline, pipeline) CPU seconds per 1000 pods by kind of process, with the totals."""
    base = _cpu_groups(summary["scenarios"]["baseline"])
    ours = _cpu_groups(summary["scenarios"]["pipeline"])
    split = {group: (base.get(group, 0.0), ours.get(group, 0.0)) for group in sorted(set(base) | set(ours))}
    split["all but the services"] = (sum(v for k, v in base.items() if k != "services"),
                                     sum(v for k, v in ours.items() if k != "services"))
    split["total"] = (sum(base.values()), sum(ours.values()))
    return split


def chart(summary: JSON, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = summary["scenarios"]["pipeline"]["samples"]
    base = summary["scenarios"]["baseline"]["samples"]
    series = [("baseline: created->Running", base.get("running", []))]
    series += [(f"created->{step}", ours.get(step, [])) for step in STEPS]
    fig, ax = plt.subplots(figsize=(10, 5))
    ax.boxplot([s for _, s in series], vert=False, whis=(1, 99), showfliers=False)
    ax.set_yticks(range(1, len(series) + 1), [label for label, _ in series])
    ax.set_xlabel("seconds since the pod was created (whiskers: p1..p99)")
    ax.set_title(f"{summary['settings']['pods']} pods, rev {summary['git_revision']}: "
                 f"{summary['throughput_pods_per_s']} pods/s (baseline {summary['baseline_throughput_pods_per_s']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    pods = int(os.environ.get("BENCH_PODS", "1000"))
    clusters = int(os.environ.get("BENCH_CLUSTERS", "3"))
    # Enough kwok nodes (110 pods each) that even the baseline fits in one cluster.
    nodes = int(os.environ.get("BENCH_NODES", str(max(3, -(-pods // 100)))))
    # BENCH_RATE: pods created per second, steadily (bare pods); unset or 0: all at once.
    rate = float(os.environ.get("BENCH_RATE", "0") or 0)
    if rate < 0:
        raise SystemExit(f"BENCH_RATE={rate}: give pods per second, or 0 to create them all at once")
    # How long to wait for the last pods once all are created.
    timeout = float(os.environ.get("BENCH_TIMEOUT", str(max(120, pods * 0.6))))
    root = Path(os.environ.get("MCS_LOCAL_DIR", ".local")) / "bench"
    root.mkdir(parents=True, exist_ok=True)
    summary = run(pods, clusters, nodes, root, timeout, rate)
    latest = root / "latest.json"
    if latest.exists():
        shutil.copy(latest, root / "previous.json")
    latest.write_text(json.dumps(summary, indent=1))
    chart(summary, root / "latest.png")
    print_table(summary)
    previous = root / "previous.json"
    if previous.exists():
        old: Any = json.loads(previous.read_text())
        steady = (old.get("settings") or {}).get("created_per_second")
        how = f", pods created at {steady}/s" if steady else ""
        print(f"previous run ({old.get('git_revision')}{how}): {old.get('throughput_pods_per_s')} pods/s, "
              f"p99 {old.get('p99_seconds')}s")
    print(f"results: {latest} and {root / 'latest.png'}")
    return 0
