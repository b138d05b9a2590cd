"""``mcsctl``: look at multicluster scheduling from an operator's chair.

    mcsctl clusters                 clusters, roles, virtual nodes and capacity
    mcsctl proxies [-n NS]          proxy pods with their target, delegate and phase
    mcsctl explain NS/POD           why a pod is where it is: decision, refusals, trace
    mcsctl nats-config DIR          NATS users for the stages: a password file per stage in DIR
                                    (kept if present) and DIR/auth.conf for nats-server
    mcsctl webhook-certificate DIR  a CA and a serving certificate for webhook.url's host in DIR
                                    (kept if still valid), for watchers that share one webhook URL

Reads the services' settings (``--config`` or ``MCS_CONFIG``) for the
clusters; ``--jaeger`` (or ``MCS_JAEGER_URL``) adds each target's answer from
the pod's trace and a link to it. ``-o json`` prints machine-readable output.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from . import pki
from .capacity import is_virtual_node
from .constants import PARENT_UID_LABEL, PROXY_SCHEDULER_NAME, TRACE_ID_ANNOTATION, target_of_virtual_node
from .kube import JSON, KubeClient, KubeError, pod_path
from .natsauth import STAGES, NatsUser, authorization, granted_targets, stage_permissions
from .placement import Resources, node_allocatable
from .podspec import delegate_name
from .settings import Settings


class CliError(Exception):
    """An error the user can fix; printed without a traceback."""


class JaegerError(Exception):
    """Jaeger could not tell a trace's answers (unreachable, or not a Jaeger query API)."""


def _ready(node: JSON) -> str:
    conditions = node.get("status", {}).get("conditions") or []
    ready = next((c for c in conditions if c.get("type") == "Ready"), None)
    return "Ready" if ready and ready.get("status") == "True" else "NotReady"


def _fmt(resources: Resources) -> str:
    return f"{resources.cpu_milli / 1000:g} cpu, {resources.memory_bytes / 2**30:.0f}Gi, {resources.pods} pods"


class Operator:
    def __init__(self, settings: Settings, jaeger_url: str | None) -> None:
        self.settings = settings
        self.jaeger_url = jaeger_url.rstrip("/") if jaeger_url else None
        self.clients: dict[str, KubeClient] = {}

    async def __aenter__(self) -> Operator:
        for cluster in self.settings.clusters:
            self.clients[cluster.name] = await KubeClient.connect(cluster)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in self.clients.values():
            await client.close()

    def _client(self, cluster: str) -> KubeClient:
        if cluster not in self.clients:
            raise CliError(f"unknown cluster {cluster!r}; configured: {', '.join(self.clients)}")
        return self.clients[cluster]

    async def _get(self, cluster: str, path: str, **params: Any) -> JSON:
        try:
            return await self._client(cluster).get(path, **params)
        except KubeError:
            raise
        except OSError as exc:
            raise CliError(f"cluster {cluster} cannot be reached: {exc}") from exc

    async def clusters(self) -> list[JSON]:
        rows = []
        for cluster in self.settings.clusters:
            nodes = (await self._get(cluster.name, "/api/v1/nodes"))["items"]
            real = [n for n in nodes if not is_virtual_node(n)]
            allocatable = sum((node_allocatable(n) for n in real), Resources())
            virtual = [{"name": n["metadata"]["name"], "status": _ready(n),
                        "allocatable": n.get("status", {}).get("allocatable", {})}
                       for n in nodes if is_virtual_node(n)]
            rows.append({"name": cluster.name, "source": cluster.source, "target": cluster.target,
                         "nodes": len(real), "ready_nodes": sum(_ready(n) == "Ready" for n in real),
                         "allocatable": allocatable.to_dict(), "allocatable_text": _fmt(allocatable),
                         "virtual_nodes": virtual})
        return rows

    async def proxies(self, namespace: str | None, source: str | None) -> list[JSON]:
        sources = [source] if source else self.settings.source_names
        for name in sources:
            self._client(name)
        delegates: dict[str, tuple[str | None, JSON | None]] = {}
        for target in self.settings.target_names:
            for pod in (await self._get(target, "/api/v1/pods", labelSelector=PARENT_UID_LABEL))["items"]:
                delegates[pod["metadata"]["labels"][PARENT_UID_LABEL]] = (target, pod)
        rows = []
        for name in sources:
            path = f"/api/v1/namespaces/{namespace}/pods" if namespace else "/api/v1/pods"
            pods = (await self._get(name, path, fieldSelector=f"spec.schedulerName={PROXY_SCHEDULER_NAME}"))["items"]
            for pod in pods:
                meta = pod["metadata"]
                where, delegate = delegates.get(meta["uid"], (None, None))
                rows.append({
                    "source": name, "namespace": meta["namespace"], "name": meta["name"],
                    "target": target_of_virtual_node(pod["spec"].get("nodeName")),
                    "phase": pod.get("status", {}).get("phase"),
                    "delegate": delegate["metadata"]["name"] if delegate else None,
                    "delegate_cluster": where,
                    "delegate_node": delegate["spec"].get("nodeName") if delegate else None,
                    "delegate_phase": delegate.get("status", {}).get("phase") if delegate else None,
                })
        return rows

    async def explain(self, namespace: str, name: str, source: str | None) -> JSON:
        source = source or self.settings.source_names[0]
        try:
            pod = await self._get(source, pod_path(namespace, name))
        except KubeError as exc:
            if exc.not_found:
                raise CliError(f"pod {namespace}/{name} not found in cluster {source}") from exc
            raise
        if pod["spec"].get("schedulerName") != PROXY_SCHEDULER_NAME:
            raise CliError(f"pod {namespace}/{name} in {source} is not a proxy pod (is it elected, in an enabled "
                           "namespace?)")
        meta = pod["metadata"]
        target = target_of_virtual_node(pod["spec"].get("nodeName"))
        conditions = pod.get("status", {}).get("conditions") or []
        scheduled: JSON = next((c for c in conditions if c.get("type") == "PodScheduled"), {})
        events = (await self._get(source, f"/api/v1/namespaces/{namespace}/events",
                                  fieldSelector=f"involvedObject.uid={meta['uid']}"))["items"]
        delegate = None
        if target in self.clients:
            try:
                delegate = await self._get(target, pod_path(namespace, delegate_name(name, meta["uid"])))
            except KubeError as exc:
                if not exc.not_found:
                    raise
        trace_id = (meta.get("annotations") or {}).get(TRACE_ID_ANNOTATION)
        result: JSON = {
            "pod": f"{source}/{namespace}/{name}", "phase": pod.get("status", {}).get("phase"),
            "target": target, "decision": (f"bound to {pod['spec']['nodeName']}" if target else
                                           f"not placed: {scheduled.get('message', 'waiting for a decision')}"),
            "delegate": None if delegate is None else {
                "cluster": target, "name": delegate["metadata"]["name"], "node": delegate["spec"].get("nodeName"),
                "phase": delegate.get("status", {}).get("phase"), "pod_ip": delegate.get("status", {}).get("podIP")},
            "events": [{"type": e.get("type"), "reason": e.get("reason"), "message": e.get("message")}
                       for e in events],
            "trace_id": trace_id,
            "trace_url": f"{self.jaeger_url}/trace/{trace_id}" if self.jaeger_url and trace_id else None,
            "answers": [], "why": None, "answers_error": None,
        }
        if trace_id:
            try:
                result["answers"], result["why"] = self._answers(trace_id)
            except JaegerError as exc:
                result["answers_error"] = str(exc)
        return result

    def _answers(self, trace_id: str) -> tuple[list[JSON], str | None]:
        """Each target's answer to the last placement round, and why the chosen one won, from the pod's
        trace (a cluster the pod's cluster-level constraints, a cordon or a taint left out answers
        "excluded: ..."). A trace Jaeger does not have (yet) has none; JaegerError when Jaeger cannot be
        asked or answers something else than traces."""
        if not self.jaeger_url:
            return [], None
        try:
            with urllib.request.urlopen(f"{self.jaeger_url}/api/traces/{trace_id}", timeout=5) as response:
                data = json.load(response)["data"]
        except urllib.error.HTTPError as exc:
            if exc.code == 404:  # not (yet) in Jaeger
                return [], None
            raise JaegerError(f"Jaeger at {self.jaeger_url} answered {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise JaegerError(f"Jaeger at {self.jaeger_url} cannot be reached: {exc}") from exc
        except (ValueError, KeyError) as exc:
            raise JaegerError(f"Jaeger at {self.jaeger_url} answered something else than traces: {exc}") from exc
        answers: dict[str, JSON] = {}
        why: str | None = None
        for span in sorted((s for t in data for s in t["spans"]), key=lambda s: s["startTime"]):
            tags = {t["key"]: t["value"] for t in span.get("tags", [])}
            if span["operationName"].startswith(("ask ", "exclude ")):
                answers[str(tags.get("target"))] = {
                    "target": tags.get("target"), "fits": tags.get("fits"), "node": tags.get("node") or None,
                    "score": tags.get("score"), "reason": tags.get("reason") or None}
            if tags.get("why"):
                why = str(tags["why"])
        return list(answers.values()), why


# What explain says when the pod's trace in Jaeger holds no answer (yet): services send spans in batches.
NO_ANSWERS_YET = ("none in Jaeger yet (each service sends its spans every few seconds: ask again; "
                  "an old trace may have expired)")


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [list(header)] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def _render(command: str, result: Any) -> str:
    if command == "clusters":
        lines = [_table([(r["name"], "source" if r["source"] else "", "target" if r["target"] else "",
                          f"{r['ready_nodes']}/{r['nodes']}", r["allocatable_text"]) for r in result],
                        ["CLUSTER", "SOURCE", "TARGET", "NODES READY", "ALLOCATABLE"])]
        virtual = [(r["name"], v["name"], v["status"], v["allocatable"].get("cpu"), v["allocatable"].get("memory"),
                    v["allocatable"].get("pods")) for r in result for v in r["virtual_nodes"]]
        lines += ["", _table(virtual, ["IN CLUSTER", "VIRTUAL NODE", "STATUS", "CPU", "MEMORY", "PODS"])]
        return "\n".join(lines)
    if command == "proxies":
        return _table([(r["source"], r["namespace"], r["name"], r["target"], r["phase"], r["delegate"],
                        r["delegate_node"], r["delegate_phase"]) for r in result],
                      ["SOURCE", "NAMESPACE", "PROXY", "TARGET", "PHASE", "DELEGATE", "DELEGATE NODE",
                       "DELEGATE PHASE"])
    r = result
    lines = [f"Pod:       {r['pod']} ({r['phase']})", f"Decision:  {r['decision']}"]
    if r["delegate"]:
        d = r["delegate"]
        lines.append(f"Delegate:  {d['cluster']}/{d['name']} on {d['node']} ({d['phase']}, IP {d['pod_ip']})")
    if r["answers"]:
        lines.append("Targets asked:")
        for a in r["answers"]:
            verdict = f"fits on {a['node']} (score {a['score']:.1f})" if a["fits"] else f"refused: {a['reason']}"
            chosen = "  <- chosen" if a["target"] == r["target"] else ""
            lines.append(f"  {a['target']}: {verdict}{chosen}")
    elif r["answers_error"]:
        lines.append(f"Targets asked: unknown ({r['answers_error']})")
    elif r["trace_url"]:
        lines.append(f"Targets asked: {NO_ANSWERS_YET}")
    if r.get("why"):
        lines.append(f"Why:       {r['why']}")
    if r["events"]:
        lines.append("Events:")
        lines += [f"  {e['type']:<8} {e['reason']:<18} {e['message']}" for e in r["events"]]
    lines.append(f"Trace:     {r['trace_id'] or '(none recorded)'}")
    if r["trace_url"]:
        lines.append(f"Jaeger:    {r['trace_url']}")
    return "\n".join(lines)


def nats_config(settings: Settings, directory: Path, per_target_candidates: bool = False) -> Path:
    """Write a password file per stage and an administrator (new random ones, existing ones kept) and
    the nats-server ``authorization`` block granting each stage its permissions; returns its path.

    ``per_target_candidates`` adds a user ``candidate-scheduler-<target>`` per target, allowed that
    target's work only, for a candidate-scheduler process per target.
    """
    directory.mkdir(parents=True, exist_ok=True)
    prefix, sources = settings.subject_prefix, settings.source_names
    grants = [(stage, stage, granted_targets(stage, settings.serve_targets)) for stage in STAGES]
    if per_target_candidates:
        grants += [("candidate-scheduler", f"candidate-scheduler-{t}", [t]) for t in settings.target_names]
    passwords: dict[str, str] = {}
    for user in ("admin", *(user for _, user, _ in grants)):
        path = directory / user
        if not path.exists():
            pki.write_private(path, secrets.token_urlsafe(24).encode())
        passwords[user] = path.read_text().strip()
    users = [NatsUser("admin", passwords["admin"], None)]
    users += [NatsUser(user, passwords[user], stage_permissions(stage, user, prefix, sources, targets))
              for stage, user, targets in grants]
    config = directory / "auth.conf"
    # nats-server reads JSON as its own format
    pki.write_private(config, json.dumps(authorization(users), indent=1).encode())
    return config


async def _run(args: argparse.Namespace, settings: Settings) -> Any:
    async with Operator(settings, args.jaeger) as operator:
        if args.command == "clusters":
            return await operator.clusters()
        if args.command == "proxies":
            return await operator.proxies(args.namespace, args.source)
        if "/" not in args.pod:
            raise CliError(f"name the pod as NAMESPACE/NAME, e.g. default/{args.pod}")
        namespace, name = args.pod.split("/", 1)
        return await operator.explain(namespace, name, args.source)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mcsctl", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", help="settings file (default: $MCS_CONFIG)")
    parser.add_argument("--jaeger", default=os.environ.get("MCS_JAEGER_URL"), help="Jaeger query URL")
    parser.add_argument("--kubeconfig", default=os.environ.get("MCS_KUBECONFIG"),
                        help="your own credentials, one context per cluster named as in the settings "
                             "(default: $MCS_KUBECONFIG, else the services' kubeconfigs from the settings)")
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("clusters", help="clusters, their roles, virtual nodes and capacity")
    proxies = sub.add_parser("proxies", help="proxy pods with their target, delegate and phase")
    proxies.add_argument("-n", "--namespace")
    proxies.add_argument("--source", help="only this source cluster")
    explain = sub.add_parser("explain", help="why a pod is where it is")
    explain.add_argument("pod", help="NAMESPACE/NAME of the proxy pod")
    explain.add_argument("--source", help="source cluster (default: the first)")
    nats_users = sub.add_parser("nats-config", help="NATS users and permissions for the stages (docs/security.md)")
    nats_users.add_argument("directory", type=Path, help="where the password files and auth.conf go")
    nats_users.add_argument("--per-target-candidates", action="store_true",
                            help="also a user candidate-scheduler-<target> per target, for a process per target")
    certificate = sub.add_parser("webhook-certificate",
                                 help="a serving certificate for webhook.url's host, shared by the watchers")
    certificate.add_argument("directory", type=Path, help="where tls.crt, tls.key and ca.crt go")
    args = parser.parse_args(argv)
    if args.config:
        os.environ["MCS_CONFIG"] = args.config
    try:
        settings = Settings()
    except (ValidationError, ValueError, FileNotFoundError) as exc:
        print(f"mcsctl: cannot read settings: {exc}", file=sys.stderr)
        return 2
    if args.command == "nats-config":
        print(f"wrote {nats_config(settings, args.directory, args.per_target_candidates)}")
        return 0
    if args.command == "webhook-certificate":
        files = pki.write_serving(args.directory, settings.webhook.called_host(), pki.WEBHOOK_CA_NAME)
        print(f"{files.cert_file} serves {settings.webhook.called_url()}; the API servers trust {files.ca_file}")
        return 0
    if args.kubeconfig:  # an operator reads with their own rights, not the services'
        kubeconfig = Path(args.kubeconfig)
        settings = settings.model_copy(update={"clusters": [
            c.model_copy(update={"kubeconfig": kubeconfig, "context": c.name}) for c in settings.clusters]})
    try:
        result = asyncio.run(_run(args, settings))
    except CliError as exc:
        print(f"mcsctl: {exc}", file=sys.stderr)
        return 1
    except KubeError as exc:
        print(f"mcsctl: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.output == "json" else _render(args.command, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
