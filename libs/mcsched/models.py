"""Messages on the bus: pydantic models, msgpack on the wire, with a schema version.

Every body is ``msgpack({"type": <model name>, "v": <schema version>, "body": {...}})``.
A reader refuses a message of another type or of a newer schema version with
:class:`SchemaError`, so a mixed-version deployment fails loudly, not subtly.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, TypeVar

import msgpack
from pydantic import BaseModel, ConfigDict, Field

# 2: the target's scheduler places delegates (no reservations; delegate requests name the round).
SCHEMA_VERSION = 2


class SchemaError(ValueError):
    """A message that this version cannot read."""


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    schema_version: ClassVar[int] = SCHEMA_VERSION

    def encode(self) -> bytes:
        packed: bytes = msgpack.packb(
            {"type": type(self).__name__, "v": self.schema_version, "body": self.model_dump(mode="json")},
            use_bin_type=True,
        )
        return packed


M = TypeVar("M", bound=Message)


def decode(data: bytes, model: type[M]) -> M:
    try:
        envelope = msgpack.unpackb(data, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise SchemaError(f"not a msgpack message: {exc}") from exc
    if not isinstance(envelope, dict) or "body" not in envelope:
        raise SchemaError("message has no envelope")
    if envelope.get("type") != model.__name__:
        raise SchemaError(f"expected a {model.__name__}, got a {envelope.get('type')!r}")
    version = envelope.get("v")
    if not isinstance(version, int) or version > model.schema_version:
        raise SchemaError(f"{model.__name__} schema version {version!r} is newer than {model.schema_version}")
    return model.model_validate(envelope["body"])


# What Kubernetes accepts as names (a message naming anything else is refused when decoded, so
# no request path is ever built from, say, "../secrets").
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class PodRef(BaseModel):
    """A pod in one cluster, pinned to one incarnation by its UID."""

    model_config = ConfigDict(frozen=True)
    cluster: str = Field(pattern=DNS_LABEL)
    namespace: str = Field(pattern=DNS_LABEL)
    name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253)
    uid: str = Field(pattern=r"^[A-Za-z0-9-]{1,128}$")

    def __str__(self) -> str:
        return f"{self.cluster}/{self.namespace}/{self.name}"


class ElectMessage(Message):
    """watcher -> proxy-scheduler: this proxy pod needs a target.

    ``manifest`` is the pod as the user created it (the proxy's source-manifest
    annotation) and ``created`` the proxy's creation time, so the proxy-scheduler
    needs no cache of proxies; without a manifest it reads the proxy itself.
    ``placement`` (the proxy's placement annotation: the clusters that refused
    it) and ``resource_version`` let it record its choice with a precondition.
    ``controller`` is the UID of the proxy's controller (its ReplicaSet,
    StatefulSet...): the pods that topology spread and cluster weights count
    together, known before the proxy-scheduler's cache has seen the proxy.
    """

    proxy: PodRef
    reason: Literal["created", "resync", "rejected"] = "created"
    manifest: dict[str, Any] | None = None
    controller: str | None = None
    created: str | None = None
    placement: str | None = None
    resource_version: str | None = None


class CandidateRequest(Message):
    """proxy-scheduler -> candidate-scheduler (request/reply): would this pod fit in your target?"""

    proxy: PodRef
    pod: dict[str, Any]  # the original pod manifest (spec with requests and constraints)


class CandidateReply(Message):
    """An estimate from the target's caches: nothing is held; the target's scheduler decides."""

    target: str
    fits: bool
    node: str | None = None  # a node the pod would fit on, by the estimate
    score: float = 0.0  # the share of the target's cpu and memory left free after the pod, 0..100
    reason: str = ""


class DelegateRequest(Message):
    """proxy-scheduler or feedback -> candidate-scheduler: create this proxy's delegate.

    The message names the proxy only: the delegate is built from the proxy as its
    source's API server has it, and only if the proxy's placement names this target.
    """

    proxy: PodRef
    target: str
    round: int = 0  # the placement round this request belongs to (for message ids and logs)
    # The proxy's resourceVersion once the choice was recorded: it is read at least that new.
    resource_version: str | None = None
    created: str | None = None  # the proxy's creation time, for the placement metrics (first placement only)


class StatusUpdate(Message):
    """feedback (target side) -> feedback (source side): mirror this delegate's status.

    The source side also binds the proxy once the delegate is scheduled, and
    records a refusal when the target's scheduler finds it unschedulable.
    """

    proxy: PodRef
    target: str
    delegate_name: str
    delegate_uid: str
    delegate_node: str | None = None
    status: dict[str, Any]
    # The delegate's resourceVersion when it had this status: the newer of this and the
    # consumer's cache wins, so neither a late message nor a lagging cache turns a status back.
    delegate_resource_version: str | None = None
    # Why the target's scheduler could not place the delegate (its PodScheduled message), if it could not.
    unschedulable: str | None = None
    # The delegate was deleted in its target (a pod lives once: its proxy ends too, unless it finished).
    gone: bool = False
    # The placement round the delegate was made for (a delegate of an earlier round ends nothing).
    round: int | None = None


class DelegateSummary(BaseModel):
    """One delegate as a digest lists it: enough for its proxy's owner to see that it exists, and
    whether the proxy mirrors it, without its whole status."""

    model_config = ConfigDict(frozen=True)

    proxy: PodRef
    name: str
    uid: str
    resource_version: str
    node: str | None = None
    refused: bool = False
    # :func:`mcsched.podspec.status_fingerprint` of its status.
    status: str
    round: int | None = None
    deleting: bool = False


class DelegateDigest(Message):
    """feedback (target side) -> feedback (source side), every resync: every delegate of one partition
    of a source's proxies in one target, in ``parts`` messages of one ``epoch``.

    What a lost status message would have told is found here: a proxy whose
    delegate is missing, a delegate whose proxy is gone or chose another
    cluster, a status the proxy does not mirror.
    """

    target: str
    source: str
    partition: int
    epoch: str
    part: int = 0
    parts: int = 1
    delegates: list[DelegateSummary] = Field(default_factory=list)


class MemberHeartbeat(Message):
    """A process of a stage says it is alive (or, ``leaving``, that it stops): the members of a
    stage share its work out among those heard lately (:mod:`mcsched.membership`)."""

    member: str = Field(max_length=253)
    leaving: bool = False
