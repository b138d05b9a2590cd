"""Which clusters a pod may use: Admiralty's cluster-level constraints, matched against virtual nodes.

Pure functions, no I/O. A pod's own nodeSelector, affinity, tolerations and
topology spread apply in the target, to its real nodes. Two annotations (the
ones Admiralty v0.13 introduced, with its meaning) add constraints on the
clusters themselves, matched against the virtual nodes ``admiralty-<target>``
and their labels (the target's name, and every label all of its nodes share,
such as ``topology.kubernetes.io/region``):

* ``multicluster.admiralty.io/proxy-pod-scheduling-constraints``: a pod-spec
  fragment (YAML or JSON: nodeSelector, affinity, tolerations,
  topologySpreadConstraints) applied to virtual nodes, *in addition* to the
  pod's own constraints, which still apply in the target;
* ``multicluster.admiralty.io/use-constraints-from-spec-for-proxy-pod-scheduling``:
  the pod's own constraints apply to virtual nodes *instead* of the target's
  nodes (the delegate gets none of them).

Preferred node affinity in the constraints ranks the clusters: among those
that can take the pod, only the ones with the highest summed weight are
drawn from ("run in c1, burst to c2 when c1 is full"). Topology spread
constraints in them count the source's proxies per domain of virtual-node
labels (:mod:`mcsched.spread`).

A virtual node also refuses pods while it is cordoned (``spec.unschedulable``)
or has a NoSchedule/NoExecute taint the constraints do not tolerate, as any
node would: that is how an operator stops new placements in a cluster.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from .constants import PROXY_CONSTRAINTS_ANNOTATION, USE_SPEC_CONSTRAINTS_ANNOTATION
from .placement import CORDONED, matches_node_selector, preferred_weight, scheduling_blocks
from .podspec import VIRTUAL_NODE_TOLERATION
from .spread import SpreadError, check_spread_constraints

JSON = dict[str, Any]
CONSTRAINT_FIELDS = ("nodeSelector", "affinity", "tolerations", "topologySpreadConstraints")
# What the pod's own constraints become in the target under use-constraints-from-spec: nothing
# (tolerations stay: they allow, never restrict).
_TARGET_FIELDS_MOVED = ("nodeSelector", "affinity", "topologySpreadConstraints")


class ConstraintError(ValueError):
    """The proxy-pod-scheduling-constraints annotation cannot be read."""


# -- the shape of the fragment, as the API server would check it on a pod (types only; what the
# fields mean is checked where they are read) -------------------------------------------------------

def _stringly(value: object) -> object:
    """A YAML scalar where Kubernetes wants a string, as Admiralty reads it (sigs.k8s.io/yaml turns a
    number or a boolean into a string for a string field: ``gpu: true``, ``rack: 1``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int):
        return str(value)
    return value


Text = Annotated[str, BeforeValidator(_stringly)]


class _Shape(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class _Requirement(_Shape):
    key: Text
    operator: Text
    values: list[Text] | None = None


class _NodeSelectorTerm(_Shape):
    matchExpressions: list[_Requirement] | None = None
    matchFields: list[_Requirement] | None = None


class _NodeSelector(_Shape):
    nodeSelectorTerms: list[_NodeSelectorTerm]


class _PreferredTerm(_Shape):
    weight: int = Field(ge=1, le=100)
    preference: _NodeSelectorTerm


class _NodeAffinity(_Shape):
    requiredDuringSchedulingIgnoredDuringExecution: _NodeSelector | None = None
    preferredDuringSchedulingIgnoredDuringExecution: list[_PreferredTerm] | None = None


class _Affinity(_Shape):
    nodeAffinity: _NodeAffinity | None = None


class _Toleration(_Shape):
    key: Text | None = None
    operator: Text | None = None
    value: Text | None = None
    effect: Text | None = None
    tolerationSeconds: int | None = None


class _LabelSelector(_Shape):
    matchLabels: dict[str, Text] | None = None
    matchExpressions: list[_Requirement] | None = None


class _SpreadConstraint(_Shape):
    labelSelector: _LabelSelector | None = None


class _Fragment(_Shape):
    model_config = ConfigDict(strict=True, extra="forbid")
    nodeSelector: dict[str, Text] | None = None
    affinity: _Affinity | None = None
    tolerations: list[_Toleration] | None = None
    topologySpreadConstraints: list[_SpreadConstraint] | None = None


_SAID = {"dict_type": "must be a mapping", "model_type": "must be a mapping", "list_type": "must be a list",
         "int_type": "must be an integer", "string_type": "must be a string", "missing": "is required",
         "extra_forbidden": "is not a constraint field"}


def _shape_error(error: ValidationError) -> str:
    """The first problem and where: ``affinity.nodeAffinity.preferred...[0].weight must be an integer``."""
    first = error.errors()[0]
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]).lstrip(".")
    said = _SAID.get(first["type"]) or str(first["msg"]).replace("Input should be", "must be", 1)
    return f"{where} {said}"


def split(original: Mapping[str, Any]) -> tuple[JSON, JSON]:
    """(cluster constraints as a pod, the pod as its target sees it) for the user's pod ``original``.

    ``original`` is :func:`mcsched.podspec.delegate_original`'s pod (the user's
    spec, labels and annotations). Raises :class:`ConstraintError` for an
    annotation that is not a pod-spec fragment.
    """
    annotations = (original.get("metadata") or {}).get("annotations") or {}
    spec = original.get("spec") or {}
    target_pod: JSON = {"metadata": original.get("metadata") or {}, "spec": spec}
    if PROXY_CONSTRAINTS_ANNOTATION in annotations:
        constraints = _parse(annotations[PROXY_CONSTRAINTS_ANNOTATION])
    elif USE_SPEC_CONSTRAINTS_ANNOTATION in annotations:
        constraints = {k: copy.deepcopy(spec[k]) for k in CONSTRAINT_FIELDS if k in spec}
        target_pod = {"metadata": target_pod["metadata"],
                      "spec": {k: v for k, v in spec.items() if k not in _TARGET_FIELDS_MOVED}}
    else:
        constraints = {}
    return {"spec": constraints}, target_pod


def _parse(raw: str) -> JSON:
    try:
        fragment = yaml.safe_load(raw) if raw.strip() else {}
    except yaml.YAMLError as exc:
        raise ConstraintError(f"annotation {PROXY_CONSTRAINTS_ANNOTATION} is not YAML: {exc}") from exc
    if fragment is None:
        return {}
    if not isinstance(fragment, dict):
        raise ConstraintError(f"annotation {PROXY_CONSTRAINTS_ANNOTATION} must be a pod-spec fragment (a mapping)")
    unknown = sorted(set(fragment) - set(CONSTRAINT_FIELDS))
    if unknown:
        raise ConstraintError(f"annotation {PROXY_CONSTRAINTS_ANNOTATION} has fields other than "
                              f"{', '.join(CONSTRAINT_FIELDS)}: {', '.join(map(str, unknown))}")
    try:  # numbers and booleans in string fields read as strings, as Admiralty reads them
        fragment = _Fragment.model_validate(fragment).model_dump(exclude_unset=True)
    except ValidationError as exc:
        raise ConstraintError(f"annotation {PROXY_CONSTRAINTS_ANNOTATION}: {_shape_error(exc)}") from exc
    if "topologySpreadConstraints" in fragment:
        try:
            check_spread_constraints(fragment["topologySpreadConstraints"])
        except SpreadError as exc:
            raise ConstraintError(f"annotation {PROXY_CONSTRAINTS_ANNOTATION}: {exc}") from exc
    return dict(fragment)


def refusal(constraints: Mapping[str, Any], virtual_node: Mapping[str, Any] | None) -> str | None:
    """Why the cluster of ``virtual_node`` is excluded for a pod with these constraints; None if it is not.

    An unknown virtual node (not created yet) excludes nothing: the cluster's
    own answer says whether it can take the pod.
    """
    if virtual_node is None:
        return None
    spec = constraints.get("spec") or {}
    blocks = scheduling_blocks([VIRTUAL_NODE_TOLERATION, *(spec.get("tolerations") or [])], virtual_node)
    if blocks:
        return ("its virtual node is cordoned" if blocks[0] == CORDONED
                else f"its virtual node has the untolerated taint {blocks[0]}")
    if not matches_node_selector(constraints, virtual_node):
        return "the pod's cluster constraints (nodeSelector/affinity on virtual-node labels) exclude it"
    return None


def preferred(constraints: Mapping[str, Any], virtual_nodes: Mapping[str, Mapping[str, Any] | None],
              candidates: list[str]) -> list[str]:
    """The candidates the constraints' preferred node affinity ranks first (all of them without preferences)."""
    weights = {t: preferred_weight(constraints, node) if (node := virtual_nodes.get(t)) is not None else 0
               for t in candidates}
    best = max(weights.values(), default=0)
    return [t for t in candidates if weights[t] == best]
