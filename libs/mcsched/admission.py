"""The mutating admission webhook: AdmissionReview in, proxy-pod patch out.

:func:`review` is pure (AdmissionReview dict -> AdmissionReview response);
:func:`webhook_configuration` is the MutatingWebhookConfiguration the
watcher registers in each source. A CEL match condition sends only pods with
the elect annotation, and the namespace selector only enabled namespaces, so
the webhook never stands in the way of ordinary pods.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping
from typing import Any

import orjson

from .cluster_constraints import ConstraintError, split
from .constants import CLUSTER_WEIGHTS_ANNOTATION, ELECT_ANNOTATION, NAMESPACE_LABEL, NAMESPACE_LABEL_VALUE
from .podspec import DEFAULT_TOLERATION_SECONDS, ElectionError, election, proxy_patch
from .spread import SpreadError, parse_weights

log = logging.getLogger(__name__)

WEBHOOK_CONFIGURATION_NAME = "multicluster-scheduler"
WEBHOOK_NAME = "proxy-pods.multicluster.admiralty.io"
WEBHOOK_PATH = "/mutate-pods"


def _response(uid: str, allowed: bool, patch: list[dict[str, Any]] | None = None,
              message: str = "") -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(orjson.dumps(patch)).decode()
    if message:
        response["status"] = {"code": 400 if not allowed else 200, "message": message, "reason": "BadRequest"}
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


def _shape_problem(pod: Any) -> str | None:
    """What makes ``pod`` something other than a pod manifest (the API server sends only pods;
    anyone else reaching the webhook may send anything)."""
    if not isinstance(pod, dict):
        return "the request's object is not a pod"
    metadata = pod.get("metadata", {})
    if not isinstance(metadata, dict) or not isinstance(pod.get("spec", {}), dict):
        return "the pod's metadata and spec must be objects"
    for field in ("labels", "annotations"):
        values = metadata.get(field) or {}
        if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
            return f"the pod's {field} must map names to strings"
    return None


def review(admission_review: Mapping[str, Any], extra_annotations: Mapping[str, str] | None = None,
           failover_seconds: int | None = DEFAULT_TOLERATION_SECONDS) -> dict[str, Any]:
    request = admission_review.get("request") if isinstance(admission_review, Mapping) else None
    if not isinstance(request, dict):
        return _response("", False, message="not an AdmissionReview request")
    uid = str(request.get("uid", ""))
    kind = request.get("kind")
    if not isinstance(kind, dict) or kind.get("kind") != "Pod" or request.get("operation") != "CREATE":
        return _response(uid, True)
    pod = request.get("object") or {}
    problem = _shape_problem(pod)
    if problem is not None:
        log.warning("refusing an admission request: %s", problem)
        return _response(uid, False, message=problem)
    try:
        elected = election(pod)
    except ElectionError as exc:
        log.warning("refusing pod %s/%s: %s", request.get("namespace"),
                    pod.get("metadata", {}).get("name") or pod.get("metadata", {}).get("generateName"), exc)
        return _response(uid, False, message=str(exc))
    if not elected:
        return _response(uid, True)
    try:
        split(pod)  # the cluster-level constraints must be readable before the pod is accepted
        weights = (pod.get("metadata", {}).get("annotations") or {}).get(CLUSTER_WEIGHTS_ANNOTATION)
        if weights is not None:
            parse_weights(weights)
    except (ConstraintError, SpreadError) as exc:
        log.warning("refusing pod %s/%s: %s", request.get("namespace"), pod.get("metadata", {}).get("name"), exc)
        return _response(uid, False, message=str(exc))
    try:
        patch = proxy_patch(pod, extra_annotations, failover_seconds)
    except (AttributeError, TypeError, ValueError) as exc:  # a spec no API server would have sent
        log.warning("refusing pod %s/%s: malformed spec (%s)", request.get("namespace"),
                    pod.get("metadata", {}).get("name"), exc)
        return _response(uid, False, message=f"the pod cannot be made a proxy pod: malformed spec ({exc})")
    return _response(uid, True, patch)


def webhook_configuration(url: str, ca_bundle_pem: bytes, failure_policy: str,
                          timeout_seconds: int) -> dict[str, Any]:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": WEBHOOK_CONFIGURATION_NAME,
                     "labels": {"app.kubernetes.io/name": "multicluster-scheduler"}},
        "webhooks": [{
            "name": WEBHOOK_NAME,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": failure_policy,
            "timeoutSeconds": timeout_seconds,
            "reinvocationPolicy": "Never",
            "clientConfig": {"url": url, "caBundle": base64.b64encode(ca_bundle_pem).decode()},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                       "resources": ["pods"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchLabels": {NAMESPACE_LABEL: NAMESPACE_LABEL_VALUE}},
            "matchConditions": [{
                "name": "elected",
                "expression": f"has(object.metadata.annotations) && '{ELECT_ANNOTATION}' in "
                              "object.metadata.annotations",
            }],
        }],
    }
