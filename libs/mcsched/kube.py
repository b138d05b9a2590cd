"""Cluster clients and watch-fed caches, on raw JSON for speed.

``KubeClient`` takes its connection settings (kubeconfig or in-cluster
service account with its token refreshed, TLS, a kubeconfig's ``proxy-url``)
from kubernetes_asyncio's ``Configuration`` but talks to the API server over
its own aiohttp session, exchanging plain dicts encoded with orjson: no model
(de)serialisation, no per-request lookups of ``.netrc`` or ``HTTPS_PROXY``.
``Informer`` keeps an in-memory copy of one resource (list, then watch,
re-list on 410 Gone) and calls handlers on every change; services read from
informers, never list per pod.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
import orjson
from kubernetes_asyncio.client import Configuration
from kubernetes_asyncio.config import load_incluster_config, load_kube_config, load_kube_config_from_dict

from .constants import FIELD_MANAGER
from .settings import ClusterSettings
from .telemetry import API_REQUESTS
from .workqueue import cancel_all

log = logging.getLogger(__name__)

JSON = dict[str, Any]

REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30)
WATCH_SECONDS = 300
# A watch that ends cleanly sooner than this, having said nothing, is not one the server timed out.
QUICK_WATCH_END_SECONDS = 1.0


class KubeError(Exception):
    """A non-2xx answer from an API server."""

    def __init__(self, cluster: str, method: str, path: str, status: int, body: str) -> None:
        self.cluster, self.status = cluster, status
        try:
            self.reason = json.loads(body).get("reason", "")
            message = json.loads(body).get("message", body)
        except ValueError:
            self.reason, message = "", body
        self.message = message
        super().__init__(f"{cluster}: {method} {path}: {status} {message}")

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409


ACCESS_REVIEWS_PATH = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"


def pod_path(namespace: str, name: str = "", sub: str = "") -> str:
    path = f"/api/v1/namespaces/{quote(namespace)}/pods"
    if name:
        path += f"/{quote(name)}"
    if sub:
        path += f"/{sub}"
    return path


class KubeClient:
    """Raw JSON access to one cluster's API server."""

    def __init__(self, name: str, config: Configuration, *, pool_size: int = 32) -> None:
        self.name = name
        self.config = config
        self.base = str(config.host).rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        self._pool_size = pool_size  # kept connections; a burst beyond them waits rather than handshakes

    @classmethod
    async def connect(cls, cluster: ClusterSettings) -> KubeClient:
        config = Configuration()
        if cluster.kubeconfig_data is not None:
            await load_kube_config_from_dict(cluster.kubeconfig_data, context=cluster.context,
                                             client_configuration=config)
        elif cluster.kubeconfig is None:
            load_incluster_config(client_configuration=config)  # type: ignore[no-untyped-call]
        else:
            await load_kube_config(config_file=str(cluster.kubeconfig), context=cluster.context,
                                   client_configuration=config)
        return cls(cluster.name, config)

    def _ssl_context(self) -> ssl.SSLContext:
        config = self.config
        context = ssl.create_default_context(cafile=config.ssl_ca_cert)
        if config.cert_file:
            context.load_cert_chain(config.cert_file, keyfile=config.key_file)
        if not config.verify_ssl:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def _client_session(self) -> aiohttp.ClientSession:
        if self._session is None:  # made on first use, inside the running loop
            connector = aiohttp.TCPConnector(limit=self._pool_size, ssl=self._ssl_context())
            # Watch events of big objects can exceed aiohttp's default read buffer.
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False, read_bufsize=2**21)
        return self._session

    async def _headers(self, content_type: str) -> dict[str, str]:
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        auth = (await self.config.auth_settings()).get("BearerToken")
        if auth:
            headers["Authorization"] = auth["value"]
        elif self.config.username and self.config.password:
            headers["Authorization"] = self.config.get_basic_auth_token()
        return headers

    async def open_connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str, str]:
        """A new TLS connection to the API server, for a request the caller frames itself (an upgrade
        to a stream protocol, which aiohttp's client does not do): (reader, writer, Host header value,
        path prefix of the server URL). Not through ``config.proxy``."""
        url = urlsplit(self.base)
        host, port = url.hostname or "localhost", url.port or (443 if url.scheme == "https" else 80)
        ssl_context = self._ssl_context() if url.scheme == "https" else None
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ssl_context,
            server_hostname=(self.config.tls_server_name or host) if ssl_context else None)
        return reader, writer, url.netloc, url.path.rstrip("/")

    async def authorization(self) -> dict[str, str]:
        """The Authorization header of this client's requests (empty with a client certificate)."""
        headers = await self._headers("application/json")
        return {"Authorization": headers["Authorization"]} if "Authorization" in headers else {}

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _raw(self, method: str, path: str, params: Mapping[str, Any] | None = None,
                   body: Any = None, content_type: str = "application/json",
                   timeout: aiohttp.ClientTimeout = REQUEST_TIMEOUT) -> aiohttp.ClientResponse:
        API_REQUESTS.labels(self.name, method).inc()
        query = [(k, str(v).lower() if isinstance(v, bool) else str(v)) for k, v in (params or {}).items()]
        return await self._client_session().request(
            method, self.base + path, params=query, headers=await self._headers(content_type),
            data=orjson.dumps(body) if body is not None else None,
            timeout=timeout, server_hostname=self.config.tls_server_name,
            proxy=self.config.proxy or None)

    async def request(self, method: str, path: str, params: Mapping[str, Any] | None = None,
                      body: Any = None, content_type: str = "application/json") -> JSON:
        """The answer's JSON; :class:`KubeError` for an error status, :class:`OSError` when there is no
        answer (aiohttp's own errors that are not OSErrors, such as a kept-alive connection the server
        closed, become ConnectionError: every caller copes with OSError)."""
        try:
            response = await self._raw(method, path, params, body, content_type)
            async with response:
                data = await response.read()
        except aiohttp.ClientError as exc:
            if isinstance(exc, OSError):
                raise
            raise ConnectionError(f"{method} {self.name}{path}: {type(exc).__name__}: {exc}") from exc
        if not 200 <= response.status < 300:
            suffix = f"?{urlencode(params)}" if params else ""
            raise KubeError(self.name, method, path + suffix, response.status, data.decode(errors="replace"))
        return orjson.loads(data) if data else {}

    async def get(self, path: str, **params: Any) -> JSON:
        return await self.request("GET", path, params)

    async def create(self, path: str, body: JSON) -> JSON:
        return await self.request("POST", path, {"fieldManager": FIELD_MANAGER}, body)

    async def delete(self, path: str, body: JSON | None = None) -> JSON:
        return await self.request("DELETE", path, None, body)

    async def merge_patch(self, path: str, patch: JSON) -> JSON:
        return await self.request("PATCH", path, {"fieldManager": FIELD_MANAGER}, patch,
                                  "application/merge-patch+json")

    async def strategic_patch(self, path: str, patch: JSON) -> JSON:
        """A strategic merge patch: lists with a merge key (e.g. pod conditions by type) are merged."""
        return await self.request("PATCH", path, {"fieldManager": FIELD_MANAGER}, patch,
                                  "application/strategic-merge-patch+json")

    async def json_patch(self, path: str, ops: list[JSON]) -> JSON:
        return await self.request("PATCH", path, {"fieldManager": FIELD_MANAGER}, ops,
                                  "application/json-patch+json")

    async def apply(self, path: str, body: JSON, force: bool = True) -> JSON:
        """Server-side apply of ``body`` (our field manager owns what it sets)."""
        return await self.request("PATCH", path, {"fieldManager": FIELD_MANAGER, "force": force},
                                  body, "application/apply-patch+yaml")

    async def watch(self, path: str, resource_version: str, connected: Callable[[], None] | None = None,
                    **params: Any) -> AsyncIterator[JSON]:
        """Yield watch events (dicts with ``type`` and ``object``) until the server closes the stream.

        ``connected`` is called once the API server has accepted the watch.
        """
        query = {"watch": True, "resourceVersion": resource_version, "allowWatchBookmarks": True,
                 "timeoutSeconds": WATCH_SECONDS, **params}
        # The server ends a watch after WATCH_SECONDS; silence well beyond that is a dead connection.
        response = await self._raw("GET", path, query,
                                   timeout=aiohttp.ClientTimeout(total=None, sock_read=WATCH_SECONDS + 30))
        async with response:
            if response.status != 200:
                raise KubeError(self.name, "WATCH", path, response.status, await response.text())
            if connected is not None:
                connected()
            async for line in response.content:
                if line.strip():
                    yield orjson.loads(line)


Handler = Callable[[str, JSON, JSON | None], Awaitable[None] | None]


def object_key(obj: Mapping[str, Any]) -> str:
    meta = obj["metadata"]
    namespace = meta.get("namespace")
    return f"{namespace}/{meta['name']}" if namespace else str(meta["name"])


class Informer:
    """An in-memory copy of one resource, kept current by list+watch.

    ``handlers`` are called as ``handler(event_type, obj, old)`` for ADDED,
    MODIFIED and DELETED, in order, from one task per informer.
    """

    def __init__(self, client: KubeClient, path: str, *, label_selector: str | None = None,
                 field_selector: str | None = None, name: str = "") -> None:
        self.client = client
        self.path = path
        self.params: dict[str, str] = {}
        if label_selector:
            self.params["labelSelector"] = label_selector
        if field_selector:
            self.params["fieldSelector"] = field_selector
        self.name = name or f"{client.name}:{path}"
        self.store: dict[str, JSON] = {}
        self.handlers: list[Handler] = []
        self.synced = asyncio.Event()
        self.healthy = False  # False while the API server cannot be reached
        self._task: asyncio.Task[None] | None = None

    def add_handler(self, handler: Handler) -> None:
        self.handlers.append(handler)

    def get(self, key: str) -> JSON | None:
        return self.store.get(key)

    def items(self) -> list[JSON]:
        return list(self.store.values())

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"informer {self.name}")

    async def stop(self) -> None:
        if self._task:
            await cancel_all([self._task])

    async def wait_synced(self, timeout: float | None = None) -> None:
        async with asyncio.timeout(timeout):  # (not wait_for, which can lose its caller's cancellation)
            await self.synced.wait()

    async def _dispatch(self, kind: str, obj: JSON, old: JSON | None) -> None:
        for handler in self.handlers:
            try:
                result = handler(kind, obj, old)
                if result is not None:
                    await result
            except Exception as exc:
                self._handler_failed(exc, kind, obj)

    def _handler_failed(self, exc: Exception, kind: str, obj: JSON) -> None:
        """A handler raised: logged, and the other handlers and events go on."""
        log.error("%s: handler failed on %s %s", self.name, kind, object_key(obj), exc_info=exc)

    def _connected(self) -> None:
        self.healthy = True

    async def _relist(self) -> str:
        listing = await self.client.get(self.path, **self.params)
        fresh = {object_key(o): o for o in listing.get("items", [])}
        old_store, self.store = self.store, fresh
        for key, obj in fresh.items():
            previous = old_store.get(key)
            if previous is not None and previous["metadata"].get("uid") != obj["metadata"].get("uid"):
                await self._dispatch("DELETED", previous, previous)  # replaced while the watch was away
                previous = None
            if previous is None:
                await self._dispatch("ADDED", obj, None)
            elif previous["metadata"].get("resourceVersion") != obj["metadata"].get("resourceVersion"):
                await self._dispatch("MODIFIED", obj, previous)
        for key, obj in old_store.items():
            if key not in fresh:
                await self._dispatch("DELETED", obj, obj)
        self.synced.set()
        self.healthy = True
        return str(listing["metadata"]["resourceVersion"])

    async def _run(self) -> None:
        backoff = 0.5
        resource_version = ""
        while True:
            try:
                if not resource_version:
                    resource_version = await self._relist()
                # Back after an outage without a re-list (the resourceVersion was still good): healthy again.
                watched, events = time.monotonic(), 0
                async for event in self.client.watch(self.path, resource_version, self._connected, **self.params):
                    backoff, events = 0.5, events + 1
                    kind, obj = event["type"], event["object"]
                    if kind == "ERROR":
                        if obj.get("code") == 410:  # too old: list again
                            resource_version = ""
                            break
                        raise KubeError(self.client.name, "WATCH", self.path, int(obj.get("code", 500)),
                                        json.dumps(obj))
                    resource_version = obj["metadata"]["resourceVersion"]
                    if kind == "BOOKMARK":
                        continue
                    key = object_key(obj)
                    old = self.store.get(key)
                    if kind == "DELETED":
                        self.store.pop(key, None)
                    else:
                        self.store[key] = obj
                    await self._dispatch(kind, obj, old)
                if not events and time.monotonic() - watched < QUICK_WATCH_END_SECONDS:
                    # Ended cleanly at once with nothing said (a proxy in the way closing every watch):
                    # watching again at once would spin on the API server.
                    log.warning("%s: the watch ended at once without an event; watching again in %.1fs",
                                self.name, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 10)
            except asyncio.CancelledError:
                raise
            except KubeError as exc:
                if exc.status == 410:
                    resource_version = ""
                    continue
                self.healthy = False
                log.warning("%s: watch failed (%s); retrying in %.1fs", self.name, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10)
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
                self.healthy = False
                log.warning("%s: API server unreachable (%s); retrying in %.1fs", self.name,
                            exc.__class__.__name__ + (f": {exc}" if str(exc) else ""), backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10)


async def read_pod(client: KubeClient, namespace: str, name: str, uid: str, *,
                   not_older_than: str | None = None) -> JSON | None:
    """One incarnation (``uid``) of a pod, as its API server has it now; None when it no longer exists.

    ``not_older_than``: a resourceVersion the answer must include; the API server then
    answers from its watch cache (once it has caught up), sparing etcd a quorum read.
    """
    params = {"resourceVersion": not_older_than} if not_older_than else {}
    try:
        pod = await client.get(pod_path(namespace, name), **params)
    except KubeError as exc:
        if exc.not_found:
            return None
        raise
    return pod if pod["metadata"]["uid"] == uid else None


async def pod_by_uid(pods: Informer, namespace: str, name: str, uid: str) -> JSON | None:
    """A pod from a pod cache, or from its API server when the cache has not seen it yet.

    Only that exact incarnation (``uid``) is returned; None when it no longer exists.
    """
    pod = pods.get(f"{namespace}/{name}")
    if pod is not None and pod["metadata"]["uid"] == uid:
        return pod
    return await read_pod(pods.client, namespace, name, uid)


