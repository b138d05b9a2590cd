"""The list+watch cache (mcsched.kube.Informer): what a relist tells its handlers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from kubernetes_asyncio.client import Configuration

from mcsched.kube import JSON, Informer, KubeClient


class ListingClient:
    name = "c1"

    def __init__(self) -> None:
        self.items: list[JSON] = []

    async def get(self, path: str, **params: Any) -> JSON:
        return {"metadata": {"resourceVersion": "9"}, "items": list(self.items)}


def pod(uid: str, version: str) -> JSON:
    return {"metadata": {"name": "web-0", "namespace": "ns", "uid": uid, "resourceVersion": version}}


async def test_a_pod_replaced_under_the_same_name_while_the_watch_was_away_is_deleted_then_added() -> None:
    client = ListingClient()
    informer = Informer(cast(KubeClient, client), "/api/v1/pods")
    events: list[tuple[str, str]] = []
    informer.add_handler(lambda kind, obj, old: events.append((kind, obj["metadata"]["uid"])))
    client.items = [pod("u1", "1")]
    await informer._relist()
    client.items = [pod("u2", "5")]  # a StatefulSet's pod, re-created with a new UID
    await informer._relist()
    assert events == [("ADDED", "u1"), ("DELETED", "u1"), ("ADDED", "u2")]
    client.items = [pod("u2", "6")]
    await informer._relist()
    assert events[-1] == ("MODIFIED", "u2")


class ClosingClient(ListingClient):
    """An API server behind a proxy that ends every watch at once, cleanly, saying nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.watches = 0

    async def watch(self, path: str, resource_version: str, connected: Any = None,
                    **params: Any) -> AsyncIterator[JSON]:
        self.watches += 1
        if connected is not None:
            connected()
        for event in ():
            yield event


async def test_watches_ended_at_once_without_a_word_are_retried_with_back_off_not_in_a_spin() -> None:
    client = ClosingClient()
    informer = Informer(cast(KubeClient, client), "/api/v1/pods")
    running = asyncio.create_task(informer._run())
    await asyncio.sleep(1.2)
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    assert 2 <= client.watches <= 3  # at 0, 0.5 and 1.5 s: back-off, where it spun thousands of times
    assert informer.synced.is_set()


async def test_a_server_that_hangs_up_without_an_answer_is_an_oserror_every_caller_copes_with() -> None:
    """aiohttp says so with errors that are not OSErrors (ServerDisconnectedError): callers that retry
    on (KubeError, OSError), such as the webhook's registration, must not crash on them."""
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = Configuration()
    config.host = f"http://127.0.0.1:{port}"
    client = KubeClient("c1", config)
    try:
        with pytest.raises(ConnectionError, match="GET c1/api/v1/pods: ServerDisconnectedError"):
            await client.get("/api/v1/pods")
    finally:
        await client.close()
        server.close()
