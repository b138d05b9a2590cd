"""The cluster chosen for a proxy pod, recorded on the proxy itself: pure, no I/O.

The proxy-scheduler chooses a *cluster*; the target's own kube-scheduler
chooses the node. The choice is written onto the proxy (the annotation
``multicluster.admiralty.io/placement``) with a resourceVersion precondition
*before* any delegate exists, so two racing proxy-schedulers or a redelivered
message can never start delegates in two targets: the candidate-scheduler
creates a delegate only in the target the proxy names, and feedback removes
any delegate elsewhere.

The record also keeps the targets whose scheduler found the delegate
unschedulable (with its reason and when), so the next choice skips them for
a while and the proxy can say why each cluster refused it.

``round`` counts choices: every new choice increments it, so message ids
derived from it (``elect:<uid>:<round>``, ``delegate:<uid>:<round>``) are new
for every attempt and identical for redeliveries of one attempt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from .constants import CLUSTER_CHOSEN_LABEL, PLACEMENT_ANNOTATION, PLACEMENT_ROUND_ANNOTATION


@dataclass(frozen=True)
class Rejection:
    reason: str
    at: float  # seconds since the epoch


@dataclass(frozen=True)
class Placement:
    target: str | None = None
    round: int = 0
    rejections: Mapping[str, Rejection] = field(default_factory=dict)

    # -- reading and writing --------------------------------------------------------

    @classmethod
    def parse(cls, raw: str | None) -> Placement:
        """The record from its annotation value; an absent or unreadable value is an empty record."""
        if not raw:
            return cls()
        try:
            data = orjson.loads(raw)
            rejections = {str(t): Rejection(str(r["reason"]), float(r["at"]))
                          for t, r in (data.get("rejected") or {}).items()}
            target = data.get("target")
            return cls(str(target) if target else None, int(data.get("round", 0)), rejections)
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            return cls()

    @classmethod
    def of(cls, pod: Mapping[str, Any]) -> Placement:
        return cls.parse((pod.get("metadata", {}).get("annotations") or {}).get(PLACEMENT_ANNOTATION))

    def annotation(self) -> str:
        body: dict[str, Any] = {"round": self.round}
        if self.target:
            body["target"] = self.target
        if self.rejections:
            body["rejected"] = {t: {"reason": r.reason, "at": round(r.at, 3)}
                                for t, r in sorted(self.rejections.items())}
        return orjson.dumps(body).decode()

    # -- transitions ------------------------------------------------------------------

    def choose(self, target: str) -> Placement:
        """The record once ``target`` is chosen (a new round)."""
        return replace(self, target=target, round=self.round + 1)

    def reject(self, target: str, reason: str, now: float) -> Placement:
        """The record once ``target``'s scheduler refused the delegate: no target, the refusal kept."""
        return replace(self, target=None if self.target == target else self.target,
                       rejections={**self.rejections, target: Rejection(reason, now)})

    def take_back(self, target: str) -> Placement:
        """The record once a refusal by ``target`` turned out premature (it placed the pod after all)."""
        return replace(self, target=target, rejections={t: r for t, r in self.rejections.items() if t != target})

    def recent_rejections(self, now: float, memory_seconds: float) -> dict[str, str]:
        """Targets that refused the pod less than ``memory_seconds`` ago, with their reasons."""
        return {t: r.reason for t, r in self.rejections.items() if now - r.at < memory_seconds}

    def patch(self, resource_version: str | None) -> dict[str, Any]:
        """A merge patch writing this record (and the label saying whether it names a cluster),
        guarded by ``resource_version`` when given."""
        metadata: dict[str, Any] = {"annotations": {PLACEMENT_ANNOTATION: self.annotation()},
                                    "labels": {CLUSTER_CHOSEN_LABEL: "true" if self.target else None}}
        if resource_version:
            metadata["resourceVersion"] = resource_version
        return {"metadata": metadata}


def marked_without_a_choice(pod: Mapping[str, Any]) -> bool:
    """An unbound, live proxy labelled as having a cluster chosen while its placement names none.

    :meth:`Placement.patch` writes both together, so only a writer that set the annotation alone
    (an older version of a stage, during an upgrade) leaves this; the watcher, which watches only
    unlabelled proxies, would never see the pod again.
    """
    meta = pod.get("metadata") or {}
    return (meta.get("labels") or {}).get(CLUSTER_CHOSEN_LABEL) is not None and \
        not (pod.get("spec") or {}).get("nodeName") and not meta.get("deletionTimestamp") and \
        Placement.of(pod).target is None


def pick_target(pod_uid: str, scores: Mapping[str, float]) -> str | None:
    """One of the fitting targets, drawn with a probability proportional to its score.

    ``scores`` are each target's share of room left after the pod (0..100). The draw is
    derived from the pod's UID, so it is stable across redeliveries, while a
    burst of pods that all read the same estimates still spreads across targets
    in proportion to their room instead of piling onto the momentary best.
    Targets with a score of 0 (they fit, with nothing to spare) get a small
    weight, so they are chosen when nothing else fits.
    """
    if not scores:
        return None
    ordered: Sequence[tuple[str, float]] = sorted(scores.items())
    weights = [max(score, 0.0) + 0.1 for _, score in ordered]
    digest = hashlib.sha256(pod_uid.encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64 * sum(weights)
    for (target, _), weight in zip(ordered, weights, strict=True):
        if point < weight:
            return target
        point -= weight
    return ordered[-1][0]


def delegate_round(delegate: Mapping[str, Any]) -> int | None:
    """The placement round a delegate was created for (None for a delegate without the annotation)."""
    raw = (delegate.get("metadata", {}).get("annotations") or {}).get(PLACEMENT_ROUND_ANNOTATION)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def choice_reason(fitting: Sequence[str], narrowings: Sequence[tuple[str, Sequence[str]]], target: str) -> str:
    """Why ``target`` won among the ``fitting`` clusters, for people (``mcsctl explain``).

    ``narrowings`` are the successive rankings that kept only some clusters, each
    named (e.g. ``("preferred node affinity", ["c1"])``), in the order applied.
    """
    if len(fitting) == 1:
        return "the only cluster that fits"
    reasons: list[str] = []
    left = list(fitting)
    for name, kept in narrowings:
        if list(kept) != left:
            reasons.append(f"{name} kept {', '.join(kept)}")
            left = list(kept)
    if len(left) > 1:
        reasons.append(f"drawn among {', '.join(left)} in proportion to the room each has left")
    return "; ".join(reasons) if reasons else f"{target} was the only one left"
