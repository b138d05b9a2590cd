"""kubectl logs, exec and port-forward on a proxy pod, through the real API servers end to end.

c1's API server calls the kubelet endpoint of the virtual node ``admiralty-c2`` (its address and
port are on the node), which forwards to the delegate's pod subresource in c2, whose API server
calls kwok: kwok answers every container's log with ``KWOK_LOG_LINES``, runs exec commands on this
machine, and echoes what a forwarded port receives.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import tempfile
from pathlib import Path

import pytest
from kubernetes_asyncio import client as k8s

from localenv import LocalEnvironment
from localenv.cluster import KWOK_LOG_LINES
from localenv.tools import bin_dir
from mcsched import pki
from mcsched.constants import PROXY_CONSTRAINTS_ANNOTATION
from tests.e2e.pipeline import JSON, SOURCE, create_when_ready
from tests.helpers import eventually

pytestmark = pytest.mark.e2e

REMOTE = "c2"


def _pod(name: str) -> JSON:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "annotations": {
                "multicluster.admiralty.io/elect": "",
                PROXY_CONSTRAINTS_ANNOTATION: f"nodeSelector:\n  topology.kubernetes.io/region: {REMOTE}\n"}},
            "spec": {"containers": [{"name": "app", "image": "nginx", "ports": [{"containerPort": 8080}],
                                     "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}}


def kubectl(env: LocalEnvironment, namespace: str, *args: str, stdin: str | None = None) -> str:
    run = subprocess.run([str(bin_dir() / "kubectl"), "--kubeconfig", env.info().kubeconfig, "--context", SOURCE,
                          "-n", namespace, *args], input=stdin, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"kubectl {' '.join(args)}: {run.stderr}"
    return run.stdout


async def _running_remote_proxy(kube: dict[str, object], namespace: str, name: str) -> None:
    core = k8s.CoreV1Api(kube[SOURCE])
    await create_when_ready(lambda: core.create_namespaced_pod(namespace, _pod(name)))

    async def running() -> bool:
        pod = await core.read_namespaced_pod(name, namespace)
        return pod.spec.node_name == f"admiralty-{REMOTE}" and pod.status.phase == "Running"

    await eventually(running, within=60)


async def test_kubectl_logs_exec_and_port_forward_on_a_proxy_reach_its_delegate(
        kube: dict[str, k8s.ApiClient], namespace: str, pipeline: LocalEnvironment) -> None:
    await _running_remote_proxy(kube, namespace, "web")
    logs = await asyncio.to_thread(kubectl, pipeline, namespace, "logs", "web")
    assert logs.splitlines() == list(KWOK_LOG_LINES)
    assert (await asyncio.to_thread(kubectl, pipeline, namespace, "logs", "web", "--tail=1")).splitlines() == \
        [KWOK_LOG_LINES[-1]]
    stamped = (await asyncio.to_thread(kubectl, pipeline, namespace, "logs", "web", "-c", "app",
                                       "--timestamps")).splitlines()
    assert [line.split(" ", 1)[1] for line in stamped] == list(KWOK_LOG_LINES)
    assert all(line.startswith("2026-01-01T00:00:0") for line in stamped)

    # Followed: the stream stays open after the lines logged so far, until the caller leaves.
    follow = await _kubectl_in_background(pipeline, namespace, "logs", "-f", "web")
    try:
        assert follow.stdout is not None
        lines = [await asyncio.wait_for(follow.stdout.readline(), 30) for _ in KWOK_LOG_LINES]
        assert [line.decode().strip() for line in lines] == list(KWOK_LOG_LINES)
        await asyncio.sleep(2)
        assert follow.returncode is None, "logs -f ended by itself"
    finally:
        follow.kill()
        await follow.wait()

    answer = await asyncio.to_thread(kubectl, pipeline, namespace, "exec", "web", "--", "sh", "-c", "echo $((6*7))")
    assert answer.strip() == "42"
    # Standard input goes through too (one line: kwok never closes a command's stdin at the caller's EOF).
    echoed = await asyncio.to_thread(kubectl, pipeline, namespace, "exec", "-i", "web", "--", "sh", "-c",
                                     'read line; echo "got $line"', stdin="through the delegate\n")
    assert echoed == "got through the delegate\n"

    forward = await _kubectl_in_background(pipeline, namespace, "port-forward", "pod/web", ":8080")
    try:
        assert forward.stdout is not None
        first = (await asyncio.wait_for(forward.stdout.readline(), 30)).decode()
        assert "Forwarding from 127.0.0.1:" in first, first  # Forwarding from 127.0.0.1:<port> -> 8080
        port = int(first.split("127.0.0.1:")[1].split()[0])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.readline(), 20) == b"ping\n"
        writer.close()
    finally:
        forward.kill()
        await forward.wait()


async def _kubectl_in_background(env: LocalEnvironment, namespace: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        str(bin_dir() / "kubectl"), "--kubeconfig", env.info().kubeconfig, "--context", SOURCE, "-n", namespace,
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)


def _call(address: str, port: int, path: str, cert: tuple[Path, Path] | None) -> str:
    """One HTTPS GET to the kubelet endpoint: the status line, "" if the server closed the connection,
    or why it failed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    if cert is not None:
        context.load_cert_chain(*cert)
    try:
        with socket.create_connection((address, port), timeout=10) as raw, \
                context.wrap_socket(raw) as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode())
            return tls.recv(4096).decode(errors="replace").split("\r\n", 1)[0]
    except (ssl.SSLError, ConnectionError) as exc:
        return f"refused: {exc}"


async def test_the_kubelet_endpoint_answers_only_the_source_api_server_s_identity(
        kube: dict[str, k8s.ApiClient], namespace: str, pipeline: LocalEnvironment) -> None:
    await _running_remote_proxy(kube, namespace, "guarded")
    node = await k8s.CoreV1Api(kube[SOURCE]).read_node(f"admiralty-{REMOTE}")
    address = next(a.address for a in node.status.addresses if a.type == "InternalIP")
    port = node.status.daemon_endpoints.kubelet_endpoint.port
    path = f"/containerLogs/{namespace}/guarded/app"
    source_dir = pipeline.root / "clusters" / SOURCE
    api_server = (source_dir / "apiserver-kubelet-client.crt", source_dir / "apiserver-kubelet-client.key")
    remote_dir = pipeline.root / "clusters" / REMOTE
    other_cluster = (remote_dir / "admin.crt", remote_dir / "admin.key")
    with tempfile.TemporaryDirectory() as tmp:
        ca = pki.KeyPair((source_dir / "ca.crt").read_bytes(), (source_dir / "ca.key").read_bytes())
        nobody = (Path(tmp) / "nobody.crt", Path(tmp) / "nobody.key")
        pki.issue(ca, "nobody", client=True).write(*nobody)  # signed by c1's CA, but granted nothing
        answers = await asyncio.gather(*(asyncio.to_thread(_call, address, port, path, cert)
                                         for cert in (api_server, None, other_cluster, nobody)))
    served, anonymous, foreign, nobody_answer = answers
    assert served == "HTTP/1.1 200 OK", answers
    # A refused client certificate ends the connection (under TLS 1.3, just after the handshake).
    assert not anonymous.startswith("HTTP"), f"a caller without a client certificate was answered: {anonymous}"
    assert not foreign.startswith("HTTP"), f"another cluster's certificate was accepted: {foreign}"
    assert nobody_answer == "HTTP/1.1 403 Forbidden", "a certificate of the source's CA without nodes/proxy was served"
