"""Messages on the bus: pydantic models, msgpack on the wire, with a schema version.

Every body is ``msgpack({"type": <model name>, "v": <schema version>, "body": {...}})``.
A reader refuses a message of another type or of a newer schema version with
:class:`SchemaError`, so a mixed-version deployment fails loudly, not subtly.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, TypeVar

import msgpack
from pydantic import BaseModel, ConfigDict

SCHEMA_VERSION = 1


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


class PodRef(BaseModel):
    """A pod in one cluster, pinned to one incarnation by its UID."""

    model_config = ConfigDict(frozen=True)
    cluster: str
    namespace: str
    name: str
    uid: str

    def __str__(self) -> str:
        return f"{self.cluster}/{self.namespace}/{self.name}"


class ElectMessage(Message):
    """watcher -> proxy-scheduler: this proxy pod needs a target.

    ``manifest`` is the pod as the user created it (the proxy's source-manifest
    annotation) and ``created`` the proxy's creation time, so the proxy-scheduler
    needs no cache of proxies; without a manifest it reads the proxy itself.
    """

    proxy: PodRef
    reason: Literal["created", "resync"] = "created"
    manifest: dict[str, Any] | None = None
    created: str | None = None


class CandidateRequest(Message):
    """proxy-scheduler -> candidate-scheduler (request/reply): does this pod fit, and where?"""

    proxy: PodRef
    pod: dict[str, Any]  # the original pod manifest (spec with requests and constraints)
    reserve: bool = True


class CandidateReply(Message):
    target: str
    fits: bool
    node: str | None = None
    score: float = 0.0
    reason: str = ""


class DelegateRequest(Message):
    """proxy-scheduler or feedback -> candidate-scheduler: create this proxy's delegate."""

    proxy: PodRef
    target: str
    node: str | None = None  # node reserved by the candidate reply, if any
    manifest: dict[str, Any]  # the original pod manifest
    created: str | None = None  # the proxy's creation time, for the placement metrics (first placement only)


class StatusUpdate(Message):
    """feedback (target side) -> feedback (source side): mirror this delegate's status."""

    proxy: PodRef
    target: str
    delegate_name: str
    delegate_uid: str
    delegate_node: str | None = None
    status: dict[str, Any]
    # The delegate's resourceVersion when it had this status: the newer of this and the
    # consumer's cache wins, so neither a late message nor a lagging cache turns a status back.
    delegate_resource_version: str | None = None


class CandidateRelease(Message):
    """proxy-scheduler -> candidate-scheduler (fire and forget): drop a reservation that was not chosen."""

    proxy_uid: str
