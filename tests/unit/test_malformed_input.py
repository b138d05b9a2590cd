"""A generated corpus of malformed bus messages, admission requests and manifests: no crash, no delegate.

Hypothesis generates the input; every property says what must hold for all of
it: decoding refuses with :class:`SchemaError`/``ValueError`` (the bus then
dead-letters the message) and never raises anything else; the webhook always
answers; a pod posing as a proxy yields a delegate built only from its own
spec; and forged delegate requests create nothing in any target.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import msgpack
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcsched.admission import review
from mcsched.choice import Placement
from mcsched.constants import (
    PARENT_CLUSTER_LABEL,
    PARENT_NAME_ANNOTATION,
    PARENT_NAME_LABEL,
    PARENT_NAMESPACE_LABEL,
    PARENT_UID_LABEL,
    PLACEMENT_ANNOTATION,
    PROXY_SCHEDULER_NAME,
    SOURCE_MANIFEST_ANNOTATION,
)
from mcsched.models import (
    CandidateRequest,
    DelegateRequest,
    ElectMessage,
    Message,
    PodRef,
    StatusUpdate,
    decode,
)
from mcsched.podspec import delegate_original, parent_ref
from tests.unit.test_placement_protocol import NS, SOURCE, World, admitted, user_pod

MODELS: list[type[Message]] = [ElectMessage, DelegateRequest, StatusUpdate, CandidateRequest]

# JSON-like values of any shape, as a hostile or buggy peer might send.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20)
names = st.sampled_from(["web-0", "p", "../secrets", "a/b", "", "x" * 300, "UPPER", "ns", "kube-system"])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_are_refused_as_unreadable(data: bytes) -> None:
    for model in MODELS:
        with pytest.raises(ValueError):  # SchemaError and pydantic's ValidationError are ValueErrors
            decode(data, model)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(MODELS), st.one_of(st.none(), st.integers(-3, 5), st.text(max_size=3)), json_values)
def test_envelopes_with_any_body_decode_or_are_refused_never_crash(model: type[Message], version: Any,
                                                                    body: Any) -> None:
    data = msgpack.packb({"type": model.__name__, "v": version, "body": body}, use_bin_type=True)
    try:
        decode(data, model)
    except ValueError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["proxy", "target", "round", "resource_version", "pod"]), json_values),
       st.fixed_dictionaries({"cluster": names, "namespace": names, "name": names, "uid": names}))
def test_a_delegate_request_naming_an_impossible_pod_is_refused_when_read(body: dict[str, Any],
                                                                          proxy: dict[str, str]) -> None:
    """Names Kubernetes would refuse never reach a request path (no "../secrets" lookups)."""
    body = {"target": "c2", "round": 1, **body, "proxy": proxy}
    data = msgpack.packb({"type": "DelegateRequest", "v": 2, "body": body}, use_bin_type=True)
    try:
        request = decode(data, DelegateRequest)
    except ValueError:
        return
    for value in (request.proxy.name, request.proxy.namespace):
        assert "/" not in value and ".." not in value and value == value.lower() and value


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values, st.sampled_from(["CREATE", "UPDATE", None]))
def test_the_webhook_answers_any_admission_review(obj: Any, operation: Any) -> None:
    answer = review({"request": {"uid": "u", "kind": {"kind": "Pod"}, "operation": operation, "object": obj}})
    assert isinstance(answer["response"]["allowed"], bool)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=12), st.text(max_size=30), max_size=4), json_values)
def test_the_webhook_answers_pods_with_any_annotations_and_spec(annotations: dict[str, str], spec: Any) -> None:
    pod = {"metadata": {"name": "p", "annotations": {"multicluster.admiralty.io/elect": "", **annotations}},
           "spec": spec}
    answer = review({"request": {"uid": "u", "kind": {"kind": "Pod"}, "operation": "CREATE", "object": pod}})
    assert isinstance(answer["response"]["allowed"], bool)
    if answer["response"].get("patch"):
        assert isinstance(orjson.loads(base64.b64decode(answer["response"]["patch"])), list)


privileged_spec = {"hostPID": True, "hostNetwork": True, "containers": [{
    "name": "evil", "image": "evil", "securityContext": {"privileged": True},
    "volumeMounts": [{"name": "root", "mountPath": "/host"}]}],
    "volumes": [{"name": "root", "hostPath": {"path": "/"}}]}


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=60), json_values.map(lambda v: orjson.dumps(v).decode()),
                 st.just(orjson.dumps({"metadata": {}, "spec": privileged_spec}).decode())))
def test_a_pod_posing_as_a_proxy_runs_only_its_own_spec(annotation: str) -> None:
    """Whatever its source-manifest annotation says, a delegate has the proxy's own admitted spec."""
    own = {"containers": [{"name": "app", "image": "nginx"}], "schedulerName": PROXY_SCHEDULER_NAME}
    proxy = {"metadata": {"name": "p", "annotations": {SOURCE_MANIFEST_ANNOTATION: annotation}}, "spec": own}
    try:
        original = delegate_original(proxy)
    except ValueError:
        return
    spec = original["spec"]
    assert spec["containers"] == own["containers"]
    assert not spec.get("hostPID") and not spec.get("hostNetwork") and "volumes" not in spec


label_values = st.one_of(st.sampled_from(["c1", "ns", "web-0", "u-1", "A_B", "../x", "a.b"]), st.text(max_size=8))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([PARENT_CLUSTER_LABEL, PARENT_NAMESPACE_LABEL, PARENT_NAME_LABEL,
                                        PARENT_UID_LABEL, "app"]), label_values),
       st.dictionaries(st.sampled_from([PARENT_NAME_ANNOTATION, "other"]), label_values))
def test_a_pod_in_a_target_with_any_parent_labels_names_a_valid_proxy_or_none(
        labels: dict[str, str], annotations: dict[str, str]) -> None:
    """Anyone who can create pods in a target can set our labels: they never name an impossible pod."""
    parent = parent_ref({"metadata": {"labels": labels, "annotations": annotations}})
    if parent is not None:
        PodRef(cluster=parent[0], namespace=parent[1], name=parent[2], uid=parent[3])  # valid, or it raises


# -- forged delegate requests, through the real candidate-scheduler on in-memory clusters ----------------

forged_refs = st.fixed_dictionaries({
    "which": st.sampled_from(["chosen elsewhere", "plain pod", "poser", "missing", "bound"]),
    "uid_matches": st.booleans(),
    "round": st.integers(0, 3),
    "target": st.sampled_from(["c2", "c3"]),
})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(forged_refs, min_size=1, max_size=6))
def test_forged_delegate_requests_create_nothing_in_any_target(requests: list[dict[str, Any]]) -> None:
    asyncio.run(_forged(requests))


def _with_placement(pod: dict[str, Any], target: str) -> dict[str, Any]:
    annotations = {**pod["metadata"].get("annotations", {}),
                   PLACEMENT_ANNOTATION: Placement().choose(target).annotation()}
    return {**pod, "metadata": {**pod["metadata"], "namespace": NS, "annotations": annotations}}


async def _forged(requests: list[dict[str, Any]]) -> None:
    world = await World().start()
    try:
        c1 = world.c1
        pods = {
            # a real proxy, chosen for c3: a request for c3 with its UID is the one legitimate request
            "chosen elsewhere": c1.put("pods", _with_placement(admitted(user_pod("chosen")), "c3")),
            "plain pod": c1.put("pods", {**user_pod("plain"), "metadata": {"name": "plain", "namespace": NS}}),
            # made without the webhook, claiming a privileged spec in its annotation and a choice of c2
            "poser": c1.put("pods", _with_placement({
                "metadata": {"name": "poser", "annotations": {
                    SOURCE_MANIFEST_ANNOTATION: orjson.dumps({"metadata": {}, "spec": privileged_spec}).decode()}},
                "spec": {"schedulerName": "default-scheduler", "containers": [{"name": "app", "image": "nginx"}]}},
                "c2")),
            # chosen for c2 but bound already: it had its delegate once, and a pod lives once
            "bound": c1.put("pods", {**_with_placement(admitted(user_pod("bound")), "c2"),
                                     "spec": {**admitted(user_pod("bound"))["spec"], "nodeName": "admiralty-c2"}}),
        }
        await world.settle()
        legitimate = set()
        for i, forged in enumerate(requests):
            pod = pods.get(forged["which"])
            name = pod["metadata"]["name"] if pod else "missing"
            uid = pod["metadata"]["uid"] if pod and forged["uid_matches"] else f"forged-{i}"
            if forged["which"] == "chosen elsewhere" and forged["uid_matches"] and forged["target"] == "c3":
                legitimate.add(("c3", uid))
            request = DelegateRequest.model_validate({
                "proxy": {"cluster": SOURCE, "namespace": NS, "name": name, "uid": uid},
                "target": forged["target"], "round": forged["round"]})
            await world.bus.publish(world.bus.subject("delegate", forged["target"]), request, f"forged-{i}")
        await world.run("delegate")
        created = {(t, d["metadata"]["labels"][PARENT_UID_LABEL]) for t in world.targets for d in world.delegates(t)}
        assert created == legitimate, "a forged or stale request created a delegate"
        assert not world.problems()
    finally:
        await world.close()
