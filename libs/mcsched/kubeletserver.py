"""The kubelet endpoint of a source's virtual nodes: logs, exec, attach and port-forward on proxies.

A source's API server calls ``https://<node address>:<daemon port>/containerLogs/...``
(or ``/exec``, ``/attach``, ``/portForward``) when a user runs ``kubectl logs``
or ``exec`` on a pod of a virtual node. :class:`KubeletServer` listens for
one source:

1. TLS, requiring a client certificate signed by the source's CA (the API
   server's ``--kubelet-client-certificate``); its CN is the user, its O the groups;
2. the call is parsed (:mod:`.kubeletapi`) and its pod resolved to the
   proxy's target and delegate;
3. the caller must be allowed ``nodes/proxy`` on the virtual node in the
   source (a SubjectAccessReview, as the kubelet's webhook authorizer does);
4. the same call goes to the delegate's pod subresource in the target with
   the services' identity there, and the answer comes back: a log stream as
   it arrives, or, after ``101 Switching Protocols``, the raw bytes of the
   SPDY or WebSocket stream both ways until either side closes.

HTTP/1.1 framing on both sides is h11's; nothing of the stream is interpreted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import h11

from . import pki
from .kube import Informer, KubeClient, KubeError, pod_path
from .kubeletapi import Delegate, KubeletCall, KubeletCallError, access_review, delegate_of, parse, target_request
from .settings import KubeletSettings

log = logging.getLogger(__name__)

ACCESS_REVIEW_PATH = "/apis/authorization.k8s.io/v1/subjectaccessreviews"
# Request headers that carry the stream protocol negotiation to the target (the rest stay here).
_FORWARDED = {b"upgrade", b"connection", b"x-stream-protocol-version", b"sec-websocket-key",
              b"sec-websocket-version", b"sec-websocket-protocol", b"sec-websocket-extensions", b"accept"}
# Response headers that describe this hop only: h11 frames the answer again.
_HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"upgrade"}
_CHUNK = 64 * 1024
# How long the target's API server may take to accept the connection, and then to answer the call
# (its response head: a log stream or a stream upgrade starts at once); a call past them is answered 502/504.
CONNECT_SECONDS = 10.0
ANSWER_SECONDS = 30.0


Resolver = Callable[[KubeletCall], Awaitable[Delegate | str]]  # the call's delegate, or why there is none


def serving_context(cert_file: Path | None, key_file: Path | None, client_ca_files: Sequence[str]) -> ssl.SSLContext:
    """TLS for the endpoint: our certificate (self-signed when none is given: the API servers do
    not check kubelets' certificates unless told to), and client certificates required."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.verify_mode = ssl.CERT_REQUIRED
    for ca_file in client_ca_files:
        context.load_verify_locations(cafile=ca_file)
    if cert_file is not None and key_file is not None:
        context.load_cert_chain(cert_file, key_file)
    else:
        ca = pki.new_ca("multicluster-scheduler-kubelet-ca")
        pki.issue(ca, "multicluster-scheduler-kubelet", server=True, ip_addresses=("127.0.0.1",)).load_into(context)
    return context


def identity(peercert: Mapping[str, object] | None) -> tuple[str, list[str]]:
    """(user, groups) of a verified client certificate: its CN and its O values."""
    user, groups = "", []
    for rdn in peercert.get("subject", ()) if peercert else ():  # type: ignore[attr-defined]
        for key, value in rdn:
            if key == "commonName":
                user = str(value)
            elif key == "organizationName":
                groups.append(str(value))
    return user, groups


class KubeletServer:
    def __init__(self, source: str, source_client: KubeClient, targets: Mapping[str, KubeClient],
                 resolve: Resolver) -> None:
        self.source, self.source_client, self.targets, self.resolve = source, source_client, targets, resolve
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int, context: ssl.SSLContext, *, reuse_port: bool = False) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, ssl=context,
                                                  reuse_port=reuse_port or None)
        log.info("kubelet endpoint of %s's virtual nodes on %s:%d", self.source, host, port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            request = await _next_event(conn, reader)
            if not isinstance(request, h11.Request):
                return
            while not isinstance(await _next_event(conn, reader), h11.EndOfMessage):
                pass  # these calls have no body worth reading; a stream starts after the 101
            user, groups = identity(writer.get_extra_info("peercert"))
            try:
                call = parse(request.method.decode(), request.target.decode(errors="replace"))
            except KubeletCallError as exc:
                await _answer(conn, writer, exc.status, str(exc))
                return
            found = await self.resolve(call)
            if isinstance(found, str):
                await _answer(conn, writer, 404, found)
                return
            if not await self._allowed(call, found.node, user, groups):
                log.warning("%s (%s) may not %s on %s in %s", user, ",".join(groups), call.kind, found.node,
                            self.source)
                await _answer(conn, writer, 403, f"{user} may not use nodes/proxy on {found.node}")
                return
            await self._forward(conn, reader, writer, request, call, found)
        except (ConnectionError, h11.ProtocolError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            log.debug("kubelet call ended: %s", exc)
        except Exception as exc:  # the source or the target failed us (an error status, no answer): said
            log.warning("kubelet call on %s's virtual node failed: %s", self.source, exc)
            if conn.our_state is h11.SEND_RESPONSE:  # nothing answered yet: a status, not a dropped connection
                with contextlib.suppress(Exception):
                    await _answer(conn, writer, 504 if isinstance(exc, TimeoutError) else 502, str(exc) or repr(exc))
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _allowed(self, call: KubeletCall, node: str, user: str, groups: list[str]) -> bool:
        if not user:
            return False
        try:
            review = await self.source_client.create(ACCESS_REVIEW_PATH, access_review(call, node, user, groups))
        except KubeError as exc:
            log.warning("cannot review %s's access in %s: %s", user, self.source, exc)
            return False
        return bool((review.get("status") or {}).get("allowed"))

    async def _forward(self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       request: h11.Request, call: KubeletCall, delegate: Delegate) -> None:
        client = self.targets.get(delegate.target)
        if client is None:
            await _answer(conn, writer, 404, f"cluster {delegate.target} is not a target")
            return
        method, path = target_request(call, delegate.name)
        try:
            up_reader, up_writer, host, prefix = await asyncio.wait_for(client.open_connection(), CONNECT_SECONDS)
        except OSError as exc:  # (a timeout too)
            await _answer(conn, writer, 502, f"cluster {delegate.target} cannot be reached: {exc!r}")
            return
        try:
            upstream = h11.Connection(h11.CLIENT)
            headers = [(b"host", host.encode()),
                       *((k.encode(), v.encode()) for k, v in (await client.authorization()).items()),
                       *((k, v) for k, v in request.headers if k.lower() in _FORWARDED)]
            if not call.streaming:
                headers.append((b"connection", b"close"))
            if method == "POST":
                headers.append((b"content-length", b"0"))
            up_writer.write(upstream.send(h11.Request(method=method, target=prefix + path, headers=headers)) or b"")
            up_writer.write(upstream.send(h11.EndOfMessage()) or b"")
            await up_writer.drain()
            answer = await asyncio.wait_for(_next_event(upstream, up_reader), ANSWER_SECONDS)
            if isinstance(answer, h11.InformationalResponse) and answer.status_code == 101:
                writer.write(conn.send(h11.InformationalResponse(
                    status_code=101, headers=list(answer.headers), reason=answer.reason)) or b"")
                await writer.drain()
                await _splice(conn.trailing_data[0], reader, up_writer, upstream.trailing_data[0], up_reader, writer)
            elif isinstance(answer, h11.Response):
                writer.write(conn.send(h11.Response(
                    status_code=answer.status_code, reason=answer.reason,
                    headers=[(k, v) for k, v in answer.headers if k.lower() not in _HOP_BY_HOP])) or b"")
                await writer.drain()
                await _relay_body(upstream, up_reader, conn, reader, writer)
        finally:
            up_writer.close()
            with contextlib.suppress(Exception):
                await up_writer.wait_closed()


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> object:
    """The next h11 event, reading from ``reader`` as needed; h11.ConnectionClosed at EOF."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(_CHUNK))
            continue
        return event


async def _answer(conn: h11.Connection, writer: asyncio.StreamWriter, status: int, message: str) -> None:
    body = message.encode()
    writer.write(conn.send(h11.Response(status_code=status, reason=HTTPStatus(status).phrase.encode(), headers=[
        (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")])) or b"")
    writer.write(conn.send(h11.Data(data=body)) or b"")
    writer.write(conn.send(h11.EndOfMessage()) or b"")
    await writer.drain()


async def _relay_body(upstream: h11.Connection, up_reader: asyncio.StreamReader, conn: h11.Connection,
                      reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy a response body as it arrives (``logs -f`` never ends) until it ends or the caller leaves."""
    async def copy() -> None:
        while True:
            event = await _next_event(upstream, up_reader)
            if isinstance(event, h11.Data):
                writer.write(conn.send(h11.Data(data=event.data)) or b"")
                await writer.drain()
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                writer.write(conn.send(h11.EndOfMessage()) or b"")
                await writer.drain()
                return

    copying = asyncio.ensure_future(copy())
    caller_left = asyncio.ensure_future(reader.read(1))  # the API server sends nothing more: EOF is a hang-up
    try:
        await asyncio.wait({copying, caller_left}, return_when=asyncio.FIRST_COMPLETED)
        if copying.done():
            copying.result()
    finally:
        for task in (copying, caller_left):
            task.cancel()
        await asyncio.gather(copying, caller_left, return_exceptions=True)


async def _splice(down_rest: bytes, reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter,
                  up_rest: bytes, up_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Both directions of an upgraded stream, byte for byte, until one side closes."""
    async def pump(first: bytes, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        if first:
            sink.write(first)
            await sink.drain()
        while data := await source.read(_CHUNK):
            sink.write(data)
            await sink.drain()

    pumps = [asyncio.ensure_future(pump(down_rest, reader, up_writer)),
             asyncio.ensure_future(pump(up_rest, up_reader, writer))]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


def advertised_address(configured: str | None) -> str:
    """The address virtual nodes give the API servers: the setting, else $POD_IP, else this host's."""
    return configured or os.environ.get("POD_IP") or socket.gethostbyname(socket.gethostname())


def proxy_resolver(source: KubeClient, proxies: Informer | None) -> Resolver:
    """Find a call's proxy in the cache of the source's proxies (read from the API server when the
    cache does not have it yet, or this process caches none of the source's), then its delegate."""
    async def resolve(call: KubeletCall) -> Delegate | str:
        proxy = proxies.get(f"{call.namespace}/{call.pod}") if proxies is not None else None
        if proxy is None:
            try:
                proxy = await source.get(pod_path(call.namespace, call.pod))
            except KubeError as exc:
                if not exc.not_found:
                    raise
        return delegate_of(proxy, call)

    return resolve


@dataclass(frozen=True)
class Endpoint:
    """Where a source's API server reaches its virtual nodes' kubelet API."""

    address: str
    port: int
    server: KubeletServer


async def start_endpoints(settings: KubeletSettings, sources: Sequence[str], clusters: Mapping[str, KubeClient],
                          targets: Sequence[str], proxies: Mapping[str, Informer]) -> dict[str, Endpoint]:
    """One endpoint per source, the n-th on ``port + n``.

    A source whose client CA is unknown (no ``client_ca_file``, no CA in its kubeconfig) gets none,
    with a warning: its API server could not prove who calls.
    """
    address = advertised_address(settings.address)
    endpoints: dict[str, Endpoint] = {}
    for index, source in enumerate(sources):
        client = clusters[source]
        ca_file = str(settings.client_ca_file) if settings.client_ca_file else client.config.ssl_ca_cert
        if not ca_file:
            log.warning("no CA for %s's kubelet client certificates (kubelet.client_ca_file): kubectl logs and "
                        "exec on its proxies will not work", source)
            continue
        resolve = proxy_resolver(client, proxies.get(source))
        server = KubeletServer(source, client, {t: clusters[t] for t in targets}, resolve)
        await server.start(settings.listen_host, settings.port + index,
                           serving_context(settings.cert_file, settings.key_file, [ca_file]),
                           reuse_port=settings.reuse_port)
        endpoints[source] = Endpoint(address, settings.port + index, server)
    return endpoints
