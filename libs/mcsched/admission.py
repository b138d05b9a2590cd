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

from .constants import ELECT_ANNOTATION, NAMESPACE_LABEL, NAMESPACE_LABEL_VALUE
from .podspec import ElectionError, election, proxy_patch

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


def review(admission_review: Mapping[str, Any], extra_annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    request = admission_review.get("request") or {}
    uid = str(request.get("uid", ""))
    pod = request.get("object") or {}
    if request.get("kind", {}).get("kind") != "Pod" or request.get("operation") != "CREATE":
        return _response(uid, True)
    try:
        elected = election(pod)
    except ElectionError as exc:
        log.warning("refusing pod %s/%s: %s", request.get("namespace"),
                    pod.get("metadata", {}).get("name") or pod.get("metadata", {}).get("generateName"), exc)
        return _response(uid, False, message=str(exc))
    if not elected:
        return _response(uid, True)
    return _response(uid, True, proxy_patch(pod, extra_annotations))


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
