"""The list+watch cache (mcsched.kube.Informer): what a relist tells its handlers."""

from __future__ import annotations

from typing import Any, cast

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
