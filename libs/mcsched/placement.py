"""Placement logic: Kubernetes quantities, pod requests, node filtering and scoring.

Pure functions over pods and nodes as the API server returns them (plain dicts,
camelCase). This module decides whether a pod fits on a node, which node of a
cluster it would land on (kube-scheduler's "least allocated" rule), and how to
rank target clusters by the capacity they would have left. Every resource
kube-scheduler counts is counted: cpu, memory, pods, ephemeral storage, huge
pages and extended resources such as ``nvidia.com/gpu``. No I/O.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, Context, Decimal, InvalidOperation, localcontext
from typing import Any, TypeAlias

__all__ = [
    "Extended",
    "NodeChoice",
    "Resources",
    "choose_node",
    "counts_as_extended",
    "cpu_milli",
    "first_fit",
    "matches_node_selector",
    "memory_bytes",
    "node_allocatable",
    "node_unfit_reasons",
    "parse_quantity",
    "pod_requests",
    "target_score",
    "tolerates",
]

# ---------------------------------------------------------------------------
# Quantities
# ---------------------------------------------------------------------------

_QUANTITY = re.compile(
    r"(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?:(?P<exponent>[eE][+-]?[0-9]+)|(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E))?"
)
_BINARY_SUFFIXES: dict[str, int] = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_DECIMAL_SUFFIXES: dict[str, int] = {
    "n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18,
}
# Far beyond anything meaningful (int64 tops out near 1e19), small enough that
# turning a parsed value into an int can never blow up.
_MAX_EXPONENT = 308


def _exact_context(digits: int) -> Context:
    """A decimal context precise enough that arithmetic on ``digits``-digit numbers never rounds."""
    return Context(prec=max(28, digits + 40), Emax=999_999, Emin=-999_999)


def parse_quantity(value: str | int | float | Decimal) -> Decimal:
    """Parse a Kubernetes quantity ("100m", "1.5Gi", "1e3", "128974848", ...) into its exact value.

    Accepts the full grammar: an optionally signed decimal number followed by
    nothing, a decimal exponent (``e3``, ``E-2``), a decimal SI suffix
    (``n u m k M G T P E``) or a binary suffix (``Ki Mi Gi Ti Pi Ei``).
    Raises ``ValueError`` on anything else.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid quantity {value!r}: a boolean is not a quantity")
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float | Decimal):
        number = Decimal(repr(value)) if isinstance(value, float) else value
        if not number.is_finite():
            raise ValueError(f"invalid quantity {value!r}: must be a finite number")
        return number
    if not isinstance(value, str):
        kind = type(value).__name__
        raise ValueError(f"invalid quantity {value!r}: expected a string or a number, got {kind}")
    if not value:
        raise ValueError("invalid quantity '': empty string")
    match = _QUANTITY.fullmatch(value)
    if match is None:
        raise ValueError(
            f"invalid quantity {value!r}: expected a number optionally followed by an exponent (e.g. 1e3), "
            "a decimal suffix (n, u, m, k, M, G, T, P, E) or a binary suffix (Ki, Mi, Gi, Ti, Pi, Ei)"
        )
    number_text = match["number"]
    exponent_text = match["exponent"]
    suffix = match["suffix"] or ""
    ctx = _exact_context(len(number_text))
    try:
        number = Decimal(number_text, context=ctx)
    except InvalidOperation as exc:  # pragma: no cover - the regex only lets valid numbers through
        raise ValueError(f"invalid quantity {value!r}: {exc}") from exc
    if suffix in _BINARY_SUFFIXES:
        return ctx.multiply(number, Decimal(2 ** _BINARY_SUFFIXES[suffix]))
    exponent = int(exponent_text[1:]) if exponent_text else _DECIMAL_SUFFIXES[suffix]
    if abs(exponent) > _MAX_EXPONENT:
        raise ValueError(
            f"invalid quantity {value!r}: exponent {exponent} out of range (|e| <= {_MAX_EXPONENT})"
        )
    return ctx.scaleb(number, exponent)


def _ceil(value: Decimal, scale: int) -> int:
    """``ceil(value * 10**scale)`` computed exactly."""
    digits = len(value.as_tuple().digits)
    with localcontext(_exact_context(digits + abs(scale))):
        return int(value.scaleb(scale).to_integral_value(rounding=ROUND_CEILING))


@functools.lru_cache(maxsize=4096)
def _scaled_text(value: str, scale: int) -> int:
    """``ceil(quantity * 10**scale)`` for a quantity string; few distinct strings recur, so it is cached."""
    return _ceil(parse_quantity(value), scale)


def cpu_milli(value: str | int | float | Decimal) -> int:
    """A CPU quantity in millicores, rounded up ("100m" -> 100, "0.5" -> 500, "1" -> 1000)."""
    if isinstance(value, str):
        return _scaled_text(value, 3)
    return _ceil(parse_quantity(value), 3)


def memory_bytes(value: str | int | float | Decimal) -> int:
    """A memory (or count) quantity as a whole number, rounded up ("1Ki" -> 1024, "1k" -> 1000)."""
    if isinstance(value, str):
        return _scaled_text(value, 0)
    return _ceil(parse_quantity(value), 0)


# ---------------------------------------------------------------------------
# Resources
# ---------------------------------------------------------------------------

# Resources beyond cpu, memory and pods as ``((name, amount), ...)``: sorted by name, no zero amounts.
Extended: TypeAlias = tuple[tuple[str, int], ...]


def counts_as_extended(name: str) -> bool:
    """Whether a resource name is accounted for beyond cpu, memory and pods, as kube-scheduler does.

    That is ``ephemeral-storage``, ``hugepages-<size>``, and every ``domain/name``
    resource: extended resources (``nvidia.com/gpu``) and prefixed native ones
    (``kubernetes.io/...``). Other names without a slash (``storage``, typos)
    mean nothing to kube-scheduler and are ignored here too.
    """
    if "/" in name:
        return not name.startswith("requests.")  # a quota name, never a pod's or a node's resource
    return name == "ephemeral-storage" or name.startswith("hugepages-")


def _normalised(entries: Iterable[tuple[str, int]]) -> Extended:
    return tuple(sorted((name, amount) for name, amount in entries if amount))


def _combined(a: Extended, b: Extended, sign: int) -> Extended:
    """``a + sign * b``, entry by entry (a missing entry counts as 0)."""
    if not b:
        return a
    if not a:
        return b if sign > 0 else tuple((name, -amount) for name, amount in b)
    merged = dict(a)
    for name, amount in b:
        merged[name] = merged.get(name, 0) + sign * amount
    return _normalised(merged.items())


@dataclass(frozen=True, slots=True)
class Resources:
    """The resources the scheduler accounts for.

    ``cpu_milli`` (millicores), ``memory_bytes`` and ``pods`` (pod slots), plus
    ``extended``: every other resource kube-scheduler counts (see
    :func:`counts_as_extended`), as whole units (bytes for ``ephemeral-storage``
    and ``hugepages-*``), sorted by name, zero amounts left out, so equal
    resources compare equal. It is empty in the common case, which keeps the
    arithmetic as cheap as for three integers.
    """

    cpu_milli: int = 0
    memory_bytes: int = 0
    pods: int = 0
    extended: Extended = ()

    def __post_init__(self) -> None:
        if self.extended:
            object.__setattr__(self, "extended", _normalised(self.extended))

    def __add__(self, other: Resources) -> Resources:
        return _make(
            self.cpu_milli + other.cpu_milli, self.memory_bytes + other.memory_bytes, self.pods + other.pods,
            _combined(self.extended, other.extended, 1),
        )

    def __sub__(self, other: Resources) -> Resources:
        return _make(
            self.cpu_milli - other.cpu_milli, self.memory_bytes - other.memory_bytes, self.pods - other.pods,
            _combined(self.extended, other.extended, -1),
        )

    def get(self, name: str) -> int:
        """One resource by its Kubernetes name ("cpu" in millicores, "nvidia.com/gpu", ...); 0 when absent."""
        if name == "cpu":
            return self.cpu_milli
        if name == "memory":
            return self.memory_bytes
        if name == "pods":
            return self.pods
        for key, amount in self.extended:
            if key == name:
                return amount
        return 0

    def fits_in(self, other: Resources) -> bool:
        """True if every component of ``self`` is at most the same component of ``other`` (absent = 0)."""
        return (
            self.cpu_milli <= other.cpu_milli
            and self.memory_bytes <= other.memory_bytes
            and self.pods <= other.pods
            and all(amount <= 0 for _, amount in _combined(self.extended, other.extended, -1))
        )

    def max(self, other: Resources) -> Resources:
        """Component-wise maximum (an absent extended resource counts as 0)."""
        extended: Extended = ()
        if self.extended or other.extended:
            mine, theirs = dict(self.extended), dict(other.extended)
            extended = _normalised((name, max(mine.get(name, 0), theirs.get(name, 0)))
                                   for name in mine.keys() | theirs.keys())
        return _make(
            max(self.cpu_milli, other.cpu_milli),
            max(self.memory_bytes, other.memory_bytes),
            max(self.pods, other.pods),
            extended,
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, str | int | float] | None) -> Resources:
        """Read a Kubernetes resource list ("cpu", "memory", "pods" and every extended resource).

        Missing keys count as 0; names kube-scheduler ignores are ignored. An
        extended quantity is rounded up to a whole number ("1Gi" of
        ``hugepages-2Mi`` is 1073741824).
        """
        if not d:
            return cls()
        return _resource_list(d, count_pods=True)

    def to_dict(self) -> dict[str, str]:
        """As a Kubernetes resource list of quantity strings.

        ``{"cpu": "3900m", "memory": "16106127360", "pods": "110", "nvidia.com/gpu": "2"}``:
        cpu in millicores, everything else as a whole number.
        """
        result = {"cpu": f"{self.cpu_milli}m", "memory": str(self.memory_bytes), "pods": str(self.pods)}
        for name, amount in self.extended:
            result[name] = str(amount)
        return result


_NOTHING = Resources()
_new_object = object.__new__
_set = object.__setattr__


def _make(cpu: int, memory: int, pods: int, extended: Extended) -> Resources:
    """``Resources(cpu, memory, pods, extended)`` for an ``extended`` known to be normalised already."""
    resources: Resources = _new_object(Resources)
    _set(resources, "cpu_milli", cpu)
    _set(resources, "memory_bytes", memory)
    _set(resources, "pods", pods)
    _set(resources, "extended", extended)
    return resources


def _resource_list(d: Mapping[str, Any], *, count_pods: bool) -> Resources:
    cpu = memory = pods = 0
    extended: list[tuple[str, int]] = []
    for name, value in d.items():
        if name == "cpu":
            cpu = cpu_milli(value)
        elif name == "memory":
            memory = memory_bytes(value)
        elif name == "pods":
            if count_pods:
                pods = memory_bytes(value)
        elif counts_as_extended(name):
            extended.append((name, memory_bytes(value)))
    return _make(cpu, memory, pods, _normalised(extended) if extended else ())


def _container_requests(container: Mapping[str, Any]) -> Resources:
    """A container's requests, each resource's request defaulting to its limit when only the limit is set.

    That is what the API server's defaulting does (and what extended resources,
    which cannot be over-committed, rely on: they are usually given as limits only).
    """
    resources: Mapping[str, Any] = container.get("resources") or {}
    requests: Mapping[str, Any] = resources.get("requests") or {}
    limits: Mapping[str, Any] = resources.get("limits") or {}
    if not limits:
        return _resource_list(requests, count_pods=False) if requests else Resources()
    effective = dict(limits)
    effective.update(requests)
    return _resource_list(effective, count_pods=False)


def pod_requests(pod: Mapping[str, Any]) -> Resources:
    """The pod's effective requests, computed as kube-scheduler does; ``pods`` is always 1.

    Every resource counts the same way (cpu, memory and each extended one):
    regular containers and sidecars (init containers with ``restartPolicy: Always``)
    add up; each other init container runs alone next to the sidecars started before
    it, and the pod needs the maximum of all of these; ``spec.overhead`` comes on top.
    A container's limit stands for its request when only the limit is set.
    """
    spec: Mapping[str, Any] = pod.get("spec") or {}
    total = Resources()
    for container in spec.get("containers") or []:
        total += _container_requests(container)
    sidecars = Resources()
    init_peak = Resources()
    for container in spec.get("initContainers") or []:
        requests = _container_requests(container)
        if container.get("restartPolicy") == "Always":
            total += requests
            sidecars += requests
            init_peak = init_peak.max(sidecars)
        else:
            init_peak = init_peak.max(requests + sidecars)
    total = total.max(init_peak)
    overhead: Mapping[str, Any] | None = spec.get("overhead")
    if overhead:
        total += _resource_list(overhead, count_pods=False)
    return _make(total.cpu_milli, total.memory_bytes, 1, total.extended)


def node_allocatable(node: Mapping[str, Any]) -> Resources:
    """What the node offers pods: ``status.allocatable``, any missing key taken from ``status.capacity``."""
    status: Mapping[str, Any] = node.get("status") or {}
    merged: dict[str, Any] = dict(status.get("capacity") or {})
    merged.update(status.get("allocatable") or {})
    return Resources.from_dict(merged)


# ---------------------------------------------------------------------------
# Taints and tolerations
# ---------------------------------------------------------------------------

UNSCHEDULABLE_TAINT_KEY = "node.kubernetes.io/unschedulable"


def _tolerates_one(toleration: Mapping[str, Any], taint: Mapping[str, Any]) -> bool:
    effect = toleration.get("effect") or ""
    if effect and effect != (taint.get("effect") or ""):
        return False
    key = toleration.get("key") or ""
    if key and key != (taint.get("key") or ""):
        return False
    operator = toleration.get("operator") or "Equal"
    if operator == "Exists":
        return True
    if operator == "Equal":
        return (toleration.get("value") or "") == (taint.get("value") or "")
    return False


def tolerates(tolerations: Sequence[Mapping[str, Any]], taint: Mapping[str, Any]) -> bool:
    """True if any toleration tolerates the taint (Kubernetes ``Toleration.ToleratesTaint`` semantics)."""
    return any(_tolerates_one(toleration, taint) for toleration in tolerations)


def taint_text(taint: Mapping[str, Any]) -> str:
    key = taint.get("key") or ""
    value = taint.get("value") or ""
    effect = taint.get("effect") or ""
    return f"{key}={value}:{effect}" if value else f"{key}:{effect}"


# ---------------------------------------------------------------------------
# Node selector and required node affinity
# ---------------------------------------------------------------------------


def _parse_int64(text: str) -> int | None:
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        return None
    number = int(text)
    return number if -(2**63) <= number < 2**63 else None


def _expression_matches(expression: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """One ``matchExpressions`` requirement; invalid requirements match nothing, as in Kubernetes."""
    key = expression.get("key") or ""
    operator = expression.get("operator") or ""
    values: list[str] = list(expression.get("values") or [])
    present = key in labels
    if operator == "In":
        return bool(values) and present and labels[key] in values
    if operator == "NotIn":
        return bool(values) and (not present or labels[key] not in values)
    if operator == "Exists":
        return not values and present
    if operator == "DoesNotExist":
        return not values and not present
    if operator in ("Gt", "Lt"):
        if len(values) != 1 or not present:
            return False
        bound = _parse_int64(values[0])
        actual = _parse_int64(labels[key])
        if bound is None or actual is None:
            return False
        return actual > bound if operator == "Gt" else actual < bound
    return False


def _field_matches(expression: Mapping[str, Any], node_name: str) -> bool:
    """One ``matchFields`` requirement: only ``metadata.name`` with In/NotIn and exactly one value."""
    values: list[str] = list(expression.get("values") or [])
    if expression.get("key") != "metadata.name" or len(values) != 1:
        return False
    operator = expression.get("operator")
    if operator == "In":
        return node_name == values[0]
    if operator == "NotIn":
        return node_name != values[0]
    return False


def _term_matches(term: Mapping[str, Any], labels: Mapping[str, str], node_name: str) -> bool:
    expressions: list[Mapping[str, Any]] = term.get("matchExpressions") or []
    fields: list[Mapping[str, Any]] = term.get("matchFields") or []
    if not expressions and not fields:
        return False  # an empty term selects nothing
    return all(_expression_matches(e, labels) for e in expressions) and all(
        _field_matches(f, node_name) for f in fields
    )


def preferred_weight(pod: Mapping[str, Any], node: Mapping[str, Any]) -> int:
    """The summed weights of the pod's preferred node-affinity terms the node matches (0: no preference)."""
    affinity: Mapping[str, Any] = (pod.get("spec") or {}).get("affinity") or {}
    terms = (affinity.get("nodeAffinity") or {}).get("preferredDuringSchedulingIgnoredDuringExecution") or []
    metadata: Mapping[str, Any] = node.get("metadata") or {}
    labels: Mapping[str, str] = metadata.get("labels") or {}
    total = 0
    for term in terms:
        if isinstance(term, Mapping) and _term_matches(term.get("preference") or {}, labels,
                                                       metadata.get("name") or ""):
            total += int(term.get("weight") or 0)
    return total


def matches_node_selector(pod: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    """True if the node satisfies the pod's ``nodeSelector`` and its required node affinity."""
    spec: Mapping[str, Any] = pod.get("spec") or {}
    metadata: Mapping[str, Any] = node.get("metadata") or {}
    labels: Mapping[str, str] = metadata.get("labels") or {}
    node_name: str = metadata.get("name") or ""
    selector: Mapping[str, str] = spec.get("nodeSelector") or {}
    if any(labels.get(key) != value for key, value in selector.items()):
        return False
    affinity: Mapping[str, Any] = spec.get("affinity") or {}
    node_affinity: Mapping[str, Any] = affinity.get("nodeAffinity") or {}
    required: Mapping[str, Any] | None = node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution")
    if required is None:
        return True
    terms: list[Mapping[str, Any]] = required.get("nodeSelectorTerms") or []
    return any(_term_matches(term, labels, node_name) for term in terms)


# ---------------------------------------------------------------------------
# Filtering and scoring
# ---------------------------------------------------------------------------


def node_ready(node: Mapping[str, Any]) -> bool:
    """Whether the node's Ready condition is True."""
    status: Mapping[str, Any] = node.get("status") or {}
    return any(
        condition.get("type") == "Ready" and condition.get("status") == "True"
        for condition in status.get("conditions") or []
    )


def scheduling_blocks(tolerations: Sequence[Mapping[str, Any]], node: Mapping[str, Any]) -> list[str]:
    """What keeps new pods with these tolerations off the node: its cordon, then each untolerated
    NoSchedule/NoExecute taint (as text), in that order; ``[]`` when nothing does."""
    node_spec: Mapping[str, Any] = node.get("spec") or {}
    blocks: list[str] = []
    if node_spec.get("unschedulable") and not tolerates(
        tolerations, {"key": UNSCHEDULABLE_TAINT_KEY, "effect": "NoSchedule"}
    ):
        blocks.append(CORDONED)
    for taint in node_spec.get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not tolerates(tolerations, taint):
            blocks.append(taint_text(taint))
    return blocks


CORDONED = "cordoned"


def node_unfit_reasons(pod: Mapping[str, Any], node: Mapping[str, Any], used: Resources,
                       request: Resources | None = None, *, allocatable: Resources | None = None) -> list[str]:
    """Why the pod cannot go on the node, given the resources already used there; ``[]`` if it fits.

    ``request`` is the pod's :func:`pod_requests` and ``allocatable`` the node's
    :func:`node_allocatable`, when the caller has them already. Resources are
    checked as kube-scheduler's NodeResourcesFit does: each resource the pod
    requests (a zero request is no request) must be free on the node, and a
    resource the node does not list at all has none free ("insufficient nvidia.com/gpu").
    """
    pod_spec: Mapping[str, Any] = pod.get("spec") or {}
    tolerations: list[Mapping[str, Any]] = pod_spec.get("tolerations") or []
    blocks = scheduling_blocks(tolerations, node)
    reasons: list[str] = ["node is unschedulable"] if blocks[:1] == [CORDONED] else []
    if not node_ready(node):
        reasons.append("node is not Ready")
    reasons += [f"untolerated taint {block}" for block in blocks if block != CORDONED]
    if not matches_node_selector(pod, node):
        reasons.append("node selector/affinity mismatch")
    if request is None:
        request = pod_requests(pod)
    free = (node_allocatable(node) if allocatable is None else allocatable) - used
    # Like kube-scheduler, a zero request fits even on an over-committed node.
    if request.cpu_milli > 0 and request.cpu_milli > free.cpu_milli:
        reasons.append("insufficient cpu")
    if request.memory_bytes > 0 and request.memory_bytes > free.memory_bytes:
        reasons.append("insufficient memory")
    for name, amount in request.extended:
        if amount > 0 and amount > free.get(name):
            reasons.append(f"insufficient {name}")
    if request.pods > free.pods:
        reasons.append("too many pods")
    return reasons


@dataclass(frozen=True)
class NodeChoice:
    """Where a pod would land in one cluster, and why not if nowhere."""

    node: str | None
    free_after: Resources
    score: float
    reason: str


def _ratio(free: int, total: int) -> float:
    if total <= 0:
        return 0.0
    return min(max(free / total, 0.0), 1.0)


def _least_allocated(free_after: Resources, allocatable: Resources) -> float:
    return (_ratio(free_after.cpu_milli, allocatable.cpu_milli)
            + _ratio(free_after.memory_bytes, allocatable.memory_bytes)) / 2 * 100


def choose_node(
    pod: Mapping[str, Any], nodes: Sequence[Mapping[str, Any]], used: Mapping[str, Resources]
) -> NodeChoice:
    """The best node for the pod: fitting nodes scored "least allocated", ties to the smallest name."""
    request = pod_requests(pod)
    best: NodeChoice | None = None
    counts: Counter[str] = Counter()
    for node in nodes:
        name: str = (node.get("metadata") or {}).get("name") or ""
        node_used = used.get(name, _NOTHING)
        allocatable = node_allocatable(node)
        reasons = node_unfit_reasons(pod, node, node_used, request, allocatable=allocatable)
        if reasons:
            counts.update(reasons)
            continue
        free_after = allocatable - node_used - request
        score = _least_allocated(free_after, allocatable)
        if (
            best is None
            or score > best.score
            or (score == best.score and best.node is not None and name < best.node)
        ):
            best = NodeChoice(node=name, free_after=free_after, score=score, reason="")
    if best is not None:
        return best
    if not nodes:
        summary = "0/0 nodes fit: no nodes"
    else:
        parts = [f"{count} {text}" for text, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
        summary = f"0/{len(nodes)} nodes fit: {', '.join(parts)}"
    return NodeChoice(node=None, free_after=Resources(), score=0.0, reason=summary)


def first_fit(pod: Mapping[str, Any], nodes: Sequence[Mapping[str, Any]], used: Mapping[str, Resources],
              start: int = 0) -> tuple[NodeChoice, int]:
    """A node the pod fits on, looking from ``nodes[start]`` on round the list, and its index.

    Cheaper than :func:`choose_node` when many nodes fit (an estimate needs one, not the best: the
    target's scheduler picks the node); when none fits, the same summary of why.
    """
    count = len(nodes)
    if count:
        request = pod_requests(pod)
        for step in range(count):
            index = (start + step) % count
            node = nodes[index]
            name: str = (node.get("metadata") or {}).get("name") or ""
            node_used = used.get(name, _NOTHING)
            allocatable = node_allocatable(node)
            if not node_unfit_reasons(pod, node, node_used, request, allocatable=allocatable):
                free_after = allocatable - node_used - request
                return NodeChoice(node=name, free_after=free_after, score=_least_allocated(free_after, allocatable),
                                  reason=""), index
    return choose_node(pod, nodes, used), start


def target_score(free_after: Resources, allocatable_total: Resources) -> float:
    """Rank a target cluster by the share of its cpu and memory left free after placing the pod (0..100)."""
    return _least_allocated(free_after, allocatable_total)
