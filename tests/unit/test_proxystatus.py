"""What a waiting proxy says (mcsched.proxystatus), on the in-memory API server."""

from __future__ import annotations

from mcsched.events import EventRecorder
from mcsched.kube import pod_path
from mcsched.proxystatus import mark_unscheduled
from mcsched.testing import FakeCluster


async def test_a_proxy_bound_since_it_was_read_is_not_marked_unscheduled() -> None:
    cluster = FakeCluster("c1")
    cluster.put("namespaces", {"metadata": {"name": "ns"}})
    created = await cluster.create(pod_path("ns"), {"metadata": {"name": "p", "namespace": "ns"},
                                                   "spec": {"containers": [{"name": "c", "image": "x"}]}})
    events = EventRecorder("test")
    await mark_unscheduled(cluster, events, created, "0/2 clusters are available")
    waiting = cluster.pod("ns", "p")
    assert waiting is not None
    assert [(c["type"], c["status"]) for c in waiting["status"]["conditions"]] == [("PodScheduled", "False")]

    cluster.bind_pod("ns", "p", "admiralty-c2")
    await mark_unscheduled(cluster, events, waiting, "a late verdict, read before the binding")
    bound = cluster.pod("ns", "p")
    assert bound is not None
    assert [(c["type"], c["status"]) for c in bound["status"]["conditions"]] == [("PodScheduled", "True")]
