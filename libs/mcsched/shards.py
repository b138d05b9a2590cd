"""Shares of a stage's work, and which process of the stage takes which (pure, no I/O).

Work is cut into *shares*: a whole cluster (a target's nodes and delegates
for the candidate-scheduler, a target's delegates and virtual nodes for
feedback), or one *partition* of a cluster's pods. Every proxy carries a
partition label, a number below :data:`PARTITIONS` drawn by the admission
webhook, and its delegate carries the same label, so a process that owns
partition 3 of source c1 watches, with a label selector, only the proxies of
that partition (the API servers filter for it), and the news of their
delegates comes to it on that partition's subjects.

The processes of a stage announce themselves on the bus
(:mod:`mcsched.membership`); each one computes, from the same sorted list of
members, the same assignment (:func:`assign`), so no one hands shares out.
When a member joins or leaves, every member computes the new assignment and
takes up or lets go of its shares.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .constants import DOMAIN

# How many partitions a cluster's pods are cut into: divisible by 1, 2, 3, 4 and 6, so up to
# four processes (and six) get equal shares of one cluster. Fixed: a proxy keeps its label for life.
PARTITIONS = 12
PARTITION_LABEL = f"{DOMAIN}/partition"
ALL_PARTITIONS = frozenset(range(PARTITIONS))
PARTITION_VALUES = frozenset(map(str, ALL_PARTITIONS))


@dataclass(frozen=True)
class Share:
    """A cluster (``partition`` None: all of it) or one partition of its pods."""

    cluster: str
    partition: int | None = None

    def __str__(self) -> str:
        return self.cluster if self.partition is None else f"{self.cluster}/{self.partition}"


def _order(share: Share) -> tuple[str, int]:
    return share.cluster, -1 if share.partition is None else share.partition


def partitions_of(clusters: Iterable[str]) -> list[Share]:
    """Every partition of these clusters' pods."""
    return [Share(cluster, p) for cluster in sorted(set(clusters)) for p in range(PARTITIONS)]


def wholes(clusters: Iterable[str]) -> list[Share]:
    return [Share(cluster) for cluster in sorted(set(clusters))]


def assign(shares: Iterable[Share], members: Iterable[str], me: str, *, replicate: bool = False) -> frozenset[Share]:
    """The shares ``me`` takes among ``members`` (``me`` included): a contiguous run of the sorted
    shares, as even as can be, so a process gets whole clusters when there are many and a slice
    of one when there are few.

    With fewer shares than members, each share goes to one member and the others get none; or,
    when ``replicate``, each member takes one share and each share is taken by about the same
    number of members (work that cannot be cut finer but can be shared, such as one target's
    delegate requests).
    """
    ordered = sorted(set(shares), key=_order)
    everyone = sorted({*members, me})
    count, index = len(everyone), everyone.index(me)
    if not ordered:
        return frozenset()
    if len(ordered) >= count:
        return frozenset(ordered[index * len(ordered) // count:(index + 1) * len(ordered) // count])
    if replicate:
        return frozenset({ordered[index % len(ordered)]})
    return frozenset({ordered[index]}) if index < len(ordered) else frozenset()


# The stages whose processes share their work out by shares (the proxy-scheduler needs none: any of
# its processes can take any elect message, and the stream hands each to one of them).
SHARDED_STAGES = ("watcher", "candidate-scheduler", "feedback")


def stage_assignment(stage: str, sources: Iterable[str], targets: Iterable[str], members: Iterable[str],
                     me: str, served_targets: Iterable[str] | None = None) -> frozenset[Share]:
    """What ``me`` takes of ``stage``'s work among ``members``.

    * watcher: partitions of the sources' proxies;
    * candidate-scheduler: whole targets of ``served_targets`` (default: all ``targets``; each
      one's nodes and pods make its estimates), several processes to a target when there are
      more processes than targets. Every process of the stage must serve the same targets: they
      divide that one list among themselves;
    * feedback: partitions of the sources' proxies (the source side: binding, mirroring, ending
      them) and whole targets, every one of them whatever the candidate-schedulers serve (the
      target side: their delegates and virtual nodes).
    """
    members = list(members)
    if stage == "watcher":
        return assign(partitions_of(sources), members, me)
    if stage == "candidate-scheduler":
        return assign(wholes(targets if served_targets is None else served_targets), members, me, replicate=True)
    if stage == "feedback":
        return assign(partitions_of(sources), members, me) | assign(wholes(targets), members, me)
    raise ValueError(f"stage {stage!r} is not sharded")


@dataclass(frozen=True)
class Shares:
    """What one process owns of its stage's work. ``None``: everything (a single process, tests)."""

    owned: frozenset[Share] | None = None
    members: tuple[str, ...] = ()

    def owns(self, cluster: str, partition: int | None = None) -> bool:
        return self.owned is None or Share(cluster, partition) in self.owned

    def clusters(self, candidates: Iterable[str]) -> list[str]:
        """Those of ``candidates`` this process owns whole."""
        return [c for c in candidates if self.owns(c)]

    def owns_every_partition(self, cluster: str) -> bool:
        partitions = self.partitions(cluster)
        return partitions is None or partitions >= ALL_PARTITIONS

    def partitions(self, cluster: str) -> frozenset[int] | None:
        """The partitions of ``cluster`` owned here (None: all of them)."""
        if self.owned is None:
            return None
        return frozenset(s.partition for s in self.owned if s.cluster == cluster and s.partition is not None)

    def sources(self, candidates: Iterable[str]) -> list[str]:
        """Those of ``candidates`` with at least one partition owned here."""
        return [c for c in candidates if self.partitions(c) != frozenset()]

    def describe(self) -> str:
        if self.owned is None:
            return "everything"
        return ", ".join(_runs(self.owned)) or "nothing"


def _runs(owned: frozenset[Share]) -> list[str]:
    """``c1/0-3, c2`` rather than twelve entries."""
    by_cluster: dict[str, list[int]] = {}
    whole = sorted(s.cluster for s in owned if s.partition is None)
    for share in owned:
        if share.partition is not None:
            by_cluster.setdefault(share.cluster, []).append(share.partition)
    out = list(whole)
    for cluster, numbers in sorted(by_cluster.items()):
        numbers.sort()
        out.append(f"{cluster}/{numbers[0]}-{numbers[-1]}" if numbers == list(range(numbers[0], numbers[-1] + 1))
                   and len(numbers) > 1 else f"{cluster}/" + ",".join(map(str, numbers)))
    return out


def selector(partitions: frozenset[int] | None) -> str | None:
    """The label selector for pods of ``partitions`` (None: no restriction).

    Pods without the label (made before partitions existed) belong to partition 0,
    so the owner of partition 0 selects "not in the others" rather than "in mine".
    """
    if partitions is None or partitions >= ALL_PARTITIONS:
        return None
    if 0 in partitions:
        others = sorted(ALL_PARTITIONS - partitions)
        return f"{PARTITION_LABEL} notin ({','.join(map(str, others))})"
    if not partitions:
        return f"{PARTITION_LABEL} in (none)"
    return f"{PARTITION_LABEL} in ({','.join(map(str, sorted(partitions)))})"


def partition_selector(partitions: frozenset[int] | None, *others: str) -> dict[str, str]:
    """``label_selector=`` keyword of an informer for pods of ``partitions`` that also match ``others``
    (empty when nothing restricts it)."""
    requirements = [*others, *filter(None, [selector(partitions)])]
    return {"label_selector": ",".join(requirements)} if requirements else {}


def partition_of(labels: Mapping[str, str] | None) -> int:
    """A pod's partition: 0 without a label spelt as :func:`draw_partition` spells one, as the label
    selectors of :func:`selector` compare strings ("01" is not "1": its pod is partition 0's)."""
    value = (labels or {}).get(PARTITION_LABEL, "")
    return int(value) if value in PARTITION_VALUES else 0


def draw_partition() -> str:
    """A new proxy's partition label: uniform, so every partition holds about as many pods."""
    return str(random.randrange(PARTITIONS))
