"""The virtual nodes' kubelet endpoint: kubelet paths and their mapping (pure), and the forwarding server
against a stand-in for the target's API server (TLS and client certificates real, on localhost)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from mcsched import pki
from mcsched.kube import KubeError
from mcsched.kubeletapi import Delegate, KubeletCallError, access_review, delegate_of, parse, target_request
from mcsched.kubeletserver import KubeletServer, identity, serving_context
from mcsched.podspec import delegate_name

PROXY = {"metadata": {"name": "web", "namespace": "ns", "uid": "u-1"},
         "spec": {"schedulerName": "admiralty-proxy", "nodeName": "admiralty-c2"}}


# -- paths and mapping -------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "target", "expected"), [
    ("GET", "/containerLogs/ns/web/app?follow=true&tailLines=5&timestamps=true&limitBytes=9&previous=false",
     ("GET", f"/api/v1/namespaces/ns/pods/{delegate_name('web', 'u-1')}/log?container=app&follow=true&tailLines=5"
             "&timestamps=true&limitBytes=9&previous=false")),
    ("GET", "/containerLogs/ns/web/app?tail=all", ("GET", f"/api/v1/namespaces/ns/pods/"
                                                           f"{delegate_name('web', 'u-1')}/log?container=app")),
    ("POST", "/exec/ns/web/app?command=sh&command=-c&command=echo+hi&input=1&output=1&error=1&tty=0",
     ("POST", f"/api/v1/namespaces/ns/pods/{delegate_name('web', 'u-1')}/exec?container=app&command=sh&command=-c"
              "&command=echo+hi&stdin=true&stdout=true&stderr=true&tty=false")),
    ("POST", "/exec/ns/web/u-1/app?command=ls&output=1",
     ("POST", f"/api/v1/namespaces/ns/pods/{delegate_name('web', 'u-1')}/exec?container=app&command=ls&stdout=true")),
    ("POST", "/attach/ns/web/app?input=1&output=1&tty=1",
     ("POST", f"/api/v1/namespaces/ns/pods/{delegate_name('web', 'u-1')}/attach?container=app&stdin=true"
              "&stdout=true&tty=true")),
    ("POST", "/portForward/ns/web", ("POST", f"/api/v1/namespaces/ns/pods/{delegate_name('web', 'u-1')}/portforward")),
    # A WebSocket upgrade comes as a GET and must go on as one (RFC 6455; the target refuses a POST).
    ("GET", "/portForward/ns/web/u-1?port=8080",
     ("GET", f"/api/v1/namespaces/ns/pods/{delegate_name('web', 'u-1')}/portforward?ports=8080")),
    ("GET", "/exec/ns/web/app?command=ls&output=1",
     ("GET", f"/api/v1/namespaces/ns/pods/{delegate_name('web', 'u-1')}/exec?container=app&command=ls&stdout=true")),
    ("GET", "/containerLogs/ns/web/app?stream=Stderr&tailLines=5",
     ("GET", f"/api/v1/namespaces/ns/pods/{delegate_name('web', 'u-1')}/log?container=app&stream=Stderr&tailLines=5")),
])
def test_kubelet_calls_map_to_the_delegate_s_subresource(method: str, target: str, expected: tuple[str, str]) -> None:
    call = parse(method, target)
    delegate = delegate_of(PROXY, call)
    assert delegate == Delegate("c2", delegate_name("web", "u-1"), "admiralty-c2")
    assert target_request(call, delegate.name) == expected


@pytest.mark.parametrize(("method", "target", "status"), [
    ("GET", "/stats/summary", 404),
    ("GET", "/pods", 404),
    ("GET", "/containerLogs/ns/web", 400),
    ("GET", "/containerLogs/NS/web/app", 400),
    ("GET", "/containerLogs/ns/../app", 400),
    ("GET", "/exec/ns/web/u-1/app/extra", 400),
    ("POST", "/containerLogs/ns/web/app", 405),
    ("DELETE", "/exec/ns/web/app", 405),
])
def test_anything_else_is_refused_with_a_status(method: str, target: str, status: int) -> None:
    with pytest.raises(KubeletCallError) as refused:
        parse(method, target)
    assert refused.value.status == status


@pytest.mark.parametrize(("proxy", "why"), [
    (None, "not found"),
    ({**PROXY, "spec": {"schedulerName": "default-scheduler", "nodeName": "admiralty-c2"}}, "not a proxy pod"),
    ({**PROXY, "spec": {"schedulerName": "admiralty-proxy"}}, "no delegate running yet"),
    ({**PROXY, "metadata": {**PROXY["metadata"], "uid": "u-2"}}, "another incarnation"),
])
def test_a_call_without_a_running_delegate_says_why(proxy: dict[str, Any] | None, why: str) -> None:
    answer = delegate_of(proxy, parse("POST", "/exec/ns/web/u-1/app?command=ls"))
    assert isinstance(answer, str) and why in answer


def test_the_access_review_is_the_kubelet_s() -> None:
    logs, exec_ = parse("GET", "/containerLogs/ns/web/app"), parse("GET", "/exec/ns/web/app?command=ls")
    spec = access_review(logs, "admiralty-c2", "apiserver", ["g"])["spec"]
    assert spec == {"user": "apiserver", "groups": ["g"], "resourceAttributes": {
        "verb": "get", "resource": "nodes", "subresource": "proxy", "name": "admiralty-c2"}}
    # Opening a stream is create, even over GET (a WebSocket upgrade).
    assert access_review(exec_, "admiralty-c2", "u", [])["spec"]["resourceAttributes"]["verb"] == "create"


def test_the_identity_is_the_certificate_s_common_name_and_organizations() -> None:
    subject = ((("organizationName", "system:masters"),), (("organizationName", "ops"),),
               (("commonName", "kube-apiserver-kubelet-client"),))
    assert identity({"subject": subject}) == ("kube-apiserver-kubelet-client", ["system:masters", "ops"])
    assert identity(None) == ("", [])


# -- the server, against a stand-in for the target's API server -----------------------------------------


class Upstream:
    """The target's API server: records each request head; answers an exec with 101 and an echo,
    a log with two chunks and then nothing (a followed log), until the connection closes."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.closed = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        if b"/exec?" in head:
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
                         b"X-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\nspdy-from-target")
            while data := await reader.read(1024):
                writer.write(data.upper())
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"6\r\nline1\n\r\n6\r\nline2\n\r\n")
            await writer.drain()
            await reader.read()  # until the caller goes
        self.closed.set()
        writer.close()


class Served(NamedTuple):
    port: int
    upstream: Upstream
    source: SourceClient
    certs: Path
    server: KubeletServer


class TargetClient:
    def __init__(self, port: int) -> None:
        self.port = port

    async def open_connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        return reader, writer, f"127.0.0.1:{self.port}", "/prefix"

    async def authorization(self) -> dict[str, str]:
        return {"Authorization": "Bearer services-token"}


class SourceClient:
    """Answers SubjectAccessReviews: only the API server's identity may use nodes/proxy."""

    def __init__(self) -> None:
        self.reviews: list[dict[str, Any]] = []

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.reviews.append(body)
        return {**body, "status": {"allowed": body["spec"]["user"] == "kube-apiserver-kubelet-client"}}


@pytest.fixture
async def endpoint(tmp_path: Path) -> AsyncIterator[Served]:
    upstream = Upstream()
    target_server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    target_port = target_server.sockets[0].getsockname()[1]
    ca = pki.new_ca("c1-ca")
    ca.write(tmp_path / "ca.crt", tmp_path / "ca.key")
    for user in ("kube-apiserver-kubelet-client", "nobody"):
        pki.issue(ca, user, client=True).write(tmp_path / f"{user}.crt", tmp_path / f"{user}.key")
    source = SourceClient()

    async def resolve(call: Any) -> Delegate | str:
        return delegate_of(PROXY if call.pod == "web" else None, call)

    server = KubeletServer("c1", source, {"c2": TargetClient(target_port)}, resolve)  # type: ignore[arg-type,dict-item]
    await server.start("127.0.0.1", 0, serving_context(None, None, [str(tmp_path / "ca.crt")]))
    assert server._server is not None
    port = server._server.sockets[0].getsockname()[1]
    yield Served(port, upstream, source, tmp_path, server)
    await server.stop()
    target_server.close()


async def _connect(port: int, certs: Path, user: str | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    if user is not None:
        context.load_cert_chain(certs / f"{user}.crt", certs / f"{user}.key")
    return await asyncio.open_connection("127.0.0.1", port, ssl=context)


async def _open_exec(port: int, certs: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An exec session as the API server opens it, past the target's 101 and its first bytes."""
    reader, writer = await _connect(port, certs, "kube-apiserver-kubelet-client")
    writer.write(b"POST /exec/ns/web/app?command=sh&input=1&output=1 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                 b"Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\nContent-Length: 0\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101 ") and b"x-stream-protocol-version: v4.channel.k8s.io" in head.lower()
    assert await asyncio.wait_for(reader.readexactly(16), 5) == b"spdy-from-target"
    return reader, writer


async def test_an_exec_stream_is_spliced_both_ways_after_the_target_s_101(
        endpoint: Served) -> None:
    port, upstream, source, certs, _ = endpoint
    reader, writer = await _open_exec(port, certs)
    writer.write(b"frames")
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(6), 5) == b"FRAMES"
    [forwarded] = upstream.heads
    assert forwarded.startswith(f"POST /prefix/api/v1/namespaces/ns/pods/{delegate_name('web', 'u-1')}/exec?"
                                "container=app&command=sh&stdin=true&stdout=true HTTP/1.1".encode())
    assert b"authorization: bearer services-token" in forwarded.lower()
    assert b"upgrade: spdy/3.1" in forwarded.lower()
    assert source.reviews[0]["spec"]["resourceAttributes"]["verb"] == "create"
    writer.close()
    await asyncio.wait_for(upstream.closed.wait(), 5)  # the caller left: the target's side is closed too


async def test_an_open_exec_session_outlives_the_endpoint_s_stop(endpoint: Served) -> None:
    """A recomposition stops the endpoint (docs/architecture.md): new calls are refused meanwhile,
    but a session already open goes on."""
    port, upstream, _, certs, server = endpoint
    reader, writer = await _open_exec(port, certs)
    await server.stop()
    with pytest.raises(OSError):
        await _connect(port, certs, "kube-apiserver-kubelet-client")
    writer.write(b"still here")
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(10), 5) == b"STILL HERE"
    writer.close()
    await asyncio.wait_for(upstream.closed.wait(), 5)


async def test_a_followed_log_streams_until_the_caller_leaves(
        endpoint: Served) -> None:
    port, upstream, _, certs, _ = endpoint
    reader, writer = await _connect(port, certs, "kube-apiserver-kubelet-client")
    writer.write(b"GET /containerLogs/ns/web/app?follow=true HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding: chunked" in head.lower()
    body = b""
    while b"line2" not in body:
        body += await asyncio.wait_for(reader.read(1024), 5)
    assert b"line1\n" in body
    assert not upstream.closed.is_set()
    writer.close()
    await asyncio.wait_for(upstream.closed.wait(), 5)


@pytest.mark.parametrize(("user", "path", "status"), [
    ("nobody", "/containerLogs/ns/web/app", b"403"),
    ("kube-apiserver-kubelet-client", "/containerLogs/ns/gone/app", b"404"),
    ("kube-apiserver-kubelet-client", "/runningpods/", b"404"),
])
async def test_callers_without_rights_and_pods_without_delegates_are_answered_plainly(
        endpoint: Served, user: str, path: str, status: bytes) -> None:
    port, upstream, _, certs, _ = endpoint
    reader, writer = await _connect(port, certs, user)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    assert (await asyncio.wait_for(reader.readline(), 5)).split(b" ")[1] == status
    assert upstream.heads == []
    writer.close()


async def test_a_caller_without_a_client_certificate_is_refused(
        endpoint: Served) -> None:
    port, upstream, _, certs, _ = endpoint
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        reader, writer = await _connect(port, certs, None)
        writer.write(b"GET /containerLogs/ns/web/app HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        if not await asyncio.wait_for(reader.read(100), 5):
            raise ConnectionError("closed")
    assert upstream.heads == []


async def _serving(tmp_path: Path, resolve: Any, source: Any, target_port: int = 1) -> tuple[int, KubeletServer]:
    """An endpoint of c1 whose proxies are resolved by ``resolve`` and reviewed by ``source``."""
    ca = pki.new_ca("c1-ca")
    ca.write(tmp_path / "ca.crt", tmp_path / "ca.key")
    pki.issue(ca, "kube-apiserver-kubelet-client", client=True).write(
        tmp_path / "kube-apiserver-kubelet-client.crt", tmp_path / "kube-apiserver-kubelet-client.key")
    server = KubeletServer("c1", source, {"c2": TargetClient(target_port)}, resolve)  # type: ignore[arg-type,dict-item]
    await server.start("127.0.0.1", 0, serving_context(None, None, [str(tmp_path / "ca.crt")]))
    assert server._server is not None
    return server._server.sockets[0].getsockname()[1], server


async def _first_line(port: int, certs: Path, request: bytes) -> bytes:
    reader, writer = await _connect(port, certs, "kube-apiserver-kubelet-client")
    writer.write(request)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()


async def test_a_source_that_fails_is_answered_with_a_status_not_a_dropped_connection(tmp_path: Path) -> None:
    async def failing(call: Any) -> Delegate | str:
        raise KubeError("c1", "GET", "/api/v1/namespaces/ns/pods/web", 500, "etcdserver: request timed out")

    class Unanswered(SourceClient):
        async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
            raise TimeoutError("the source's API server did not answer")

    async def found(call: Any) -> Delegate | str:
        return delegate_of(PROXY, call)

    request = b"GET /containerLogs/ns/web/app HTTP/1.1\r\nHost: x\r\n\r\n"
    for resolve, source, status in ((failing, SourceClient(), b"502"), (found, Unanswered(), b"504")):
        port, server = await _serving(tmp_path, resolve, source)
        try:
            assert (await _first_line(port, tmp_path, request)).split(b" ")[1] == status
        finally:
            await server.stop()


async def test_a_target_that_never_answers_is_given_up_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mcsched.kubeletserver.ANSWER_SECONDS", 0.2)
    let_go = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.read()  # never answers; returns once the endpoint lets go
        let_go.set()
        writer.close()

    target = await asyncio.start_server(silent, "127.0.0.1", 0)

    async def found(call: Any) -> Delegate | str:
        return delegate_of(PROXY, call)

    port, server = await _serving(tmp_path, found, SourceClient(), target.sockets[0].getsockname()[1])
    try:
        request = b"GET /containerLogs/ns/web/app?follow=true HTTP/1.1\r\nHost: x\r\n\r\n"
        line = await _first_line(port, tmp_path, request)
        assert line.split(b" ")[1] == b"504"
        await asyncio.wait_for(let_go.wait(), 5)
    finally:
        await server.stop()
        target.close()
