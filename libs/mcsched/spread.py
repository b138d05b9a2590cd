"""Spreading a set of pods across clusters: topology spread over virtual-node labels, and weighted splits.

Pure functions, no I/O. The proxy-scheduler counts the proxies of the
source (bound to a virtual node, or with a cluster recorded in their
placement annotation, so a burst counts before any binding) and asks:

* :func:`spread_refusals`: which clusters a ``DoNotSchedule`` topology spread
  constraint of the pod's cluster-level constraints excludes, because placing
  the pod there would make its domain's skew exceed ``maxSkew``;
* :func:`spread_ranked`: which clusters a ``ScheduleAnyway`` one prefers (those
  within ``maxSkew``, else the least excess);
* :func:`weighted`: which clusters a weighted split (``cluster-weights``,
  e.g. ``c1=1,c2=3``) prefers: the one whose share of the set's pods is
  furthest below its weight's share.

Topology spread follows kube-scheduler's PodTopologySpread, with virtual nodes
as the nodes: the domains are the values of ``topologyKey`` on the virtual
nodes that are eligible (carry the key; match the constraints'
nodeSelector/required affinity unless ``nodeAffinityPolicy: Ignore``; have
no untolerated taint or cordon only under ``nodeTaintsPolicy: Honor``, which
is not the default). The pods counted are the proxies in the pod's
namespace that ``labelSelector`` (plus ``matchLabelKeys`` with the pod's own
values) selects, on eligible clusters; no ``labelSelector`` selects nothing.
A cluster's skew is its domain's count, plus one if the pod matches its own
selector, minus the least count of an eligible domain (0 while fewer than
``minDomains`` domains exist).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .choice import Placement
from .constants import CLUSTER_WEIGHTS_ANNOTATION, target_of_virtual_node
from .placement import _expression_matches, matches_node_selector, scheduling_blocks
from .podspec import VIRTUAL_NODE_TOLERATION

JSON = dict[str, Any]
DO_NOT_SCHEDULE = "DoNotSchedule"
SCHEDULE_ANYWAY = "ScheduleAnyway"
_FINISHED = ("Succeeded", "Failed")


class SpreadError(ValueError):
    """A topology spread constraint or a weights annotation that cannot be read."""


# -- the pods counted ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """A pod as the counts see it: where it is (or is going), its namespace, labels and controller."""

    uid: str
    namespace: str
    labels: Mapping[str, str]
    owner: str | None  # the controller's UID (a ReplicaSet, a StatefulSet...), if any
    target: str | None = None

    def same_set(self, other: Member) -> bool:
        """Pods of one workload: the same controller, or for pods without one the same labels."""
        if self.namespace != other.namespace:
            return False
        if self.owner is not None or other.owner is not None:
            return self.owner == other.owner
        return dict(self.labels) == dict(other.labels)


def controller_uid(pod: Mapping[str, Any]) -> str | None:
    for reference in (pod.get("metadata") or {}).get("ownerReferences") or []:
        if reference.get("controller"):
            return str(reference.get("uid"))
    return None


def member(proxy: Mapping[str, Any]) -> Member | None:
    """A proxy as counted: None unless it is alive (not finished, not being deleted) and has a cluster."""
    meta = proxy.get("metadata") or {}
    if meta.get("deletionTimestamp") or (proxy.get("status") or {}).get("phase") in _FINISHED:
        return None
    target = target_of_virtual_node((proxy.get("spec") or {}).get("nodeName")) or Placement.of(proxy).target
    if target is None:
        return None
    return Member(str(meta.get("uid")), str(meta.get("namespace")), dict(meta.get("labels") or {}),
                  controller_uid(proxy), target)


# -- topology spread -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    key: str
    max_skew: int
    hard: bool  # DoNotSchedule
    selector: Mapping[str, Any] | None  # labelSelector with matchLabelKeys merged; None selects nothing
    min_domains: int
    honor_affinity: bool
    honor_taints: bool


def check_spread_constraints(raw: Any) -> None:
    """Raise :class:`SpreadError` unless ``raw`` is a list of topology spread constraints this code reads."""
    if not isinstance(raw, list):
        raise SpreadError("topologySpreadConstraints must be a list")
    for i, item in enumerate(raw):
        where = f"topologySpreadConstraints[{i}]"
        if not isinstance(item, dict):
            raise SpreadError(f"{where} must be a mapping")
        if not isinstance(item.get("topologyKey"), str) or not item["topologyKey"]:
            raise SpreadError(f"{where}.topologyKey must be a label key")
        skew = item.get("maxSkew")
        if not isinstance(skew, int) or isinstance(skew, bool) or skew < 1:
            raise SpreadError(f"{where}.maxSkew must be an integer of at least 1")
        if item.get("whenUnsatisfiable") not in (DO_NOT_SCHEDULE, SCHEDULE_ANYWAY):
            raise SpreadError(f"{where}.whenUnsatisfiable must be {DO_NOT_SCHEDULE} or {SCHEDULE_ANYWAY}")
        if "minDomains" in item:
            domains = item["minDomains"]
            if not isinstance(domains, int) or isinstance(domains, bool) or domains < 1:
                raise SpreadError(f"{where}.minDomains must be an integer of at least 1")
            if item["whenUnsatisfiable"] != DO_NOT_SCHEDULE:
                raise SpreadError(f"{where}.minDomains needs whenUnsatisfiable: {DO_NOT_SCHEDULE}")
        selector = item.get("labelSelector")
        if selector is not None and not (isinstance(selector, dict) and
                                         isinstance(selector.get("matchLabels") or {}, dict) and
                                         isinstance(selector.get("matchExpressions") or [], list)):
            raise SpreadError(f"{where}.labelSelector must be a label selector (matchLabels, matchExpressions)")
        keys = item.get("matchLabelKeys") or []
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise SpreadError(f"{where}.matchLabelKeys must be a list of label keys")
        for policy in ("nodeAffinityPolicy", "nodeTaintsPolicy"):
            if item.get(policy, "Honor") not in ("Honor", "Ignore"):
                raise SpreadError(f"{where}.{policy} must be Honor or Ignore")


def spread_constraints(constraints: Mapping[str, Any], labels: Mapping[str, str]) -> list[Spread]:
    """The topology spread constraints of cluster-level ``constraints`` for a pod with ``labels``."""
    found = []
    for item in (constraints.get("spec") or {}).get("topologySpreadConstraints") or []:
        selector = item.get("labelSelector")
        keys = [k for k in item.get("matchLabelKeys") or [] if k in labels]  # kube-scheduler ignores the others
        if selector is not None and keys:
            selector = {"matchLabels": dict(selector.get("matchLabels") or {}),
                        "matchExpressions": [*(selector.get("matchExpressions") or []),
                                             *({"key": k, "operator": "In", "values": [labels[k]]} for k in keys)]}
        found.append(Spread(item["topologyKey"], int(item["maxSkew"]),
                            item.get("whenUnsatisfiable") == DO_NOT_SCHEDULE, selector,
                            int(item.get("minDomains") or 1), item.get("nodeAffinityPolicy", "Honor") == "Honor",
                            item.get("nodeTaintsPolicy", "Ignore") == "Honor"))
    return found


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A metav1.LabelSelector: None selects nothing, ``{}`` everything."""
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    return all(e.get("operator") in ("In", "NotIn", "Exists", "DoesNotExist") and _expression_matches(e, labels)
               for e in selector.get("matchExpressions") or [])


@dataclass(frozen=True)
class Skew:
    domain: str | None  # None: the cluster's virtual node lacks the topology key (or is unknown)
    count: int = 0
    least: int = 0
    skew: int = 0


def _skews(spread: Spread, constraints: Mapping[str, Any], pod: Member,
           nodes: Mapping[str, Mapping[str, Any] | None], members: Iterable[Member],
           targets: Iterable[str]) -> dict[str, Skew]:
    tolerations = [VIRTUAL_NODE_TOLERATION, *((constraints.get("spec") or {}).get("tolerations") or [])]
    eligible: dict[str, str] = {}  # target -> its domain
    for target, node in nodes.items():
        value = ((node or {}).get("metadata") or {}).get("labels", {}).get(spread.key)
        if node is None or value is None:
            continue
        if spread.honor_affinity and not matches_node_selector(constraints, node):
            continue
        if spread.honor_taints and scheduling_blocks(tolerations, node):
            continue
        eligible[target] = value
    counts = dict.fromkeys(eligible.values(), 0)
    for other in members:
        if other.uid != pod.uid and other.namespace == pod.namespace and other.target in eligible \
                and selects(spread.selector, other.labels):
            counts[eligible[other.target]] += 1
    least = min(counts.values(), default=0) if len(counts) >= spread.min_domains else 0
    own = 1 if selects(spread.selector, pod.labels) else 0
    skews = {}
    for target in targets:
        value = ((nodes.get(target) or {}).get("metadata") or {}).get("labels", {}).get(spread.key)
        count = counts.get(value, 0) if value is not None else 0
        skews[target] = Skew(value, count, least, count + own - least)
    return skews


def spread_refusals(constraints: Mapping[str, Any], pod: Member, nodes: Mapping[str, Mapping[str, Any] | None],
                    members: Sequence[Member], targets: Iterable[str]) -> dict[str, str]:
    """The ``targets`` a DoNotSchedule constraint excludes for ``pod``, with why.

    ``nodes``: every target's virtual node (None if not created yet); ``members``: the source's proxies.
    """
    targets = list(targets)
    refused: dict[str, str] = {}
    for spread in spread_constraints(constraints, pod.labels):
        if not spread.hard:
            continue
        for target, skew in _skews(spread, constraints, pod, nodes, members, targets).items():
            if target in refused:
                continue
            if skew.domain is None:
                refused[target] = f"its virtual node has no label {spread.key} (topology spread)"
            elif skew.skew > spread.max_skew:
                refused[target] = (f"topology spread: {spread.key}={skew.domain} would have a skew of {skew.skew} "
                                   f"> maxSkew {spread.max_skew} ({skew.count} matching pods there, "
                                   f"{skew.least} in the emptiest domain)")
    return refused


def spread_allows(constraints: Mapping[str, Any], pod: Member, nodes: Mapping[str, Mapping[str, Any] | None],
                  target: str, members: Sequence[Member]) -> bool:
    """Whether ``pod`` on ``target`` keeps every DoNotSchedule constraint, given ``members``."""
    return target not in spread_refusals(constraints, pod, nodes, members, [target])


def spread_ranked(constraints: Mapping[str, Any], pod: Member, nodes: Mapping[str, Mapping[str, Any] | None],
                  members: Sequence[Member], candidates: list[str]) -> list[str]:
    """The candidates ScheduleAnyway constraints rank first: within maxSkew, else the least excess over it.

    A candidate whose virtual node lacks the key comes last. Without such constraints: all of them.
    """
    excess = dict.fromkeys(candidates, 0.0)
    for spread in spread_constraints(constraints, pod.labels):
        if spread.hard:
            continue
        for target, skew in _skews(spread, constraints, pod, nodes, members, candidates).items():
            excess[target] += float("inf") if skew.domain is None else max(0, skew.skew - spread.max_skew)
    best = min(excess.values(), default=0.0)
    return [t for t in candidates if excess[t] == best]


# -- weighted splits -------------------------------------------------------------------------------------

_WEIGHT = re.compile(r"^\s*([A-Za-z0-9]([-A-Za-z0-9._]*[A-Za-z0-9])?)\s*=\s*([0-9]+)\s*$")


def parse_weights(raw: str) -> dict[str, int]:
    """``c1=1,c2=3`` -> {"c1": 1, "c2": 3}; raises :class:`SpreadError` saying what is wrong."""
    weights: dict[str, int] = {}
    for part in raw.split(","):
        if not part.strip() and raw.strip():
            raise SpreadError(f"annotation {CLUSTER_WEIGHTS_ANNOTATION}: an empty entry in {raw!r}")
        if not part.strip():
            continue
        found = _WEIGHT.match(part)
        if found is None:
            raise SpreadError(f"annotation {CLUSTER_WEIGHTS_ANNOTATION}: {part.strip()!r} is not <cluster>=<weight> "
                              "(a cluster name and a non-negative integer), e.g. c1=1,c2=3")
        name, weight = found.group(1), int(found.group(3))
        if name in weights:
            raise SpreadError(f"annotation {CLUSTER_WEIGHTS_ANNOTATION}: cluster {name} is given twice")
        weights[name] = weight
    if not any(weights.values()):
        raise SpreadError(f"annotation {CLUSTER_WEIGHTS_ANNOTATION}: at least one cluster needs a weight above 0")
    return weights


def weights_of(pod_annotations: Mapping[str, str], namespace_annotations: Mapping[str, str]) -> dict[str, int]:
    """The weights that apply to a pod: its own annotation, else its namespace's; {} without either."""
    if CLUSTER_WEIGHTS_ANNOTATION in pod_annotations:
        return parse_weights(pod_annotations[CLUSTER_WEIGHTS_ANNOTATION])
    if CLUSTER_WEIGHTS_ANNOTATION in namespace_annotations:
        try:
            return parse_weights(namespace_annotations[CLUSTER_WEIGHTS_ANNOTATION])
        except SpreadError as exc:  # no webhook checks namespaces: the pods say what is wrong
            raise SpreadError(f"the namespace's {exc}") from exc
    return {}


def weighted(weights: Mapping[str, int], pod: Member, members: Iterable[Member], candidates: list[str]) -> list[str]:
    """The candidates whose share of ``pod``'s set is furthest below their weight's share.

    Only candidates with a weight above 0 share; a cluster not listed (or
    weighted 0) is chosen only when no weighted cluster fits. The shares are
    among the weighted candidates (the fitting ones): a cluster full now is
    made up for once it has room again. Without weights: all candidates.
    """
    shared = [t for t in candidates if weights.get(t, 0) > 0]
    if not shared:
        return candidates
    counts = dict.fromkeys(shared, 0)
    for other in members:
        if other.uid != pod.uid and other.target in counts and other.same_set(pod):
            counts[other.target] += 1
    total_weight = sum(weights[t] for t in shared)
    after = sum(counts.values()) + 1
    # deficit_t = w_t * after / W - count_t, compared times W to stay in integers
    deficit = {t: weights[t] * after - counts[t] * total_weight for t in shared}
    best = max(deficit.values())
    return [t for t in shared if deficit[t] == best]
