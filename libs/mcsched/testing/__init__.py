"""Fakes to run the services' handlers without clusters or NATS, as FastStream's TestNatsBroker does.

* :mod:`.cluster`: :class:`FakeCluster`, an in-memory API server for one cluster
  (a :class:`~mcsched.kube.KubeClient`), and :class:`FakeInformer`, a cache fed
  by it that can lag;
* :mod:`.bus`: :class:`FakeBroker` and :class:`FakeBus` (a :class:`~mcsched.bus.Bus`),
  where the test delivers, drops, duplicates and reorders messages and sees each
  handler's outcome;
* :mod:`.jetstream`: :class:`FakeJetStream`, the nats-py JetStream calls answered in
  memory, under a real :class:`~mcsched.bus.Bus` (``connect_bus``): its pull loop,
  ``in_progress``, and re-creating a deleted stream or consumer run as written;
* :mod:`.runtime`: :class:`FakeRuntime` (a :class:`~mcsched.runtime.Runtime`) for
  ``compose()`` and the service classes, :func:`fake_settings` and :func:`settle`.

They model what the services use and nothing more; each module says what it
leaves out. Used by ``tests/unit`` (e.g. ``test_placement_protocol.py``).
"""

from .bus import Delivery, Envelope, FakeBroker, FakeBus, RequestRecord
from .cluster import Call, FakeCluster, FakeInformer, merge_patch, stamp, strategic_merge_patch
from .jetstream import FakeJetStream, connect_bus
from .runtime import FakeRuntime, fake_settings, settle

__all__ = [
    "Call",
    "Delivery",
    "Envelope",
    "FakeBroker",
    "FakeBus",
    "FakeCluster",
    "FakeInformer",
    "FakeJetStream",
    "FakeRuntime",
    "RequestRecord",
    "connect_bus",
    "fake_settings",
    "merge_patch",
    "settle",
    "stamp",
    "strategic_merge_patch",
]
