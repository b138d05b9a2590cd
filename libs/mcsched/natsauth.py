"""Who may say what on the bus: bus names, and the NATS permissions of each stage.

Pure functions, no I/O. One place names every subject, stream, durable
consumer and queue group, and derives from those names the least each stage
needs: a watcher can publish elect messages of its sources and nothing else,
a candidate-scheduler serving c2 can take c2's delegate requests and answer
c2's questions, never c3's. :func:`authorization` turns users and their
permissions into the ``authorization`` block of a nats-server configuration
(the local environment, the compose stack and ``mcsctl nats-config`` use
it; the Helm chart renders the same lists in ``templates/_nats.tpl``, and a
test compares the two).

How a stage uses NATS, and so what it is granted:

* JetStream publishes go to ``<prefix>.<kind>.<cluster>``; the acknowledgement
  comes back on the client's inbox, ``_INBOX.<user>.>`` (each user has its own
  inbox prefix, so no user can read another's replies).
* A durable pull consumer ``D`` on stream ``S`` filtered on ``F`` is created
  through ``$JS.API.CONSUMER.CREATE.S.D.F`` (the server checks that the filter
  in the subject is the consumer's), read with ``$JS.API.CONSUMER.MSG.NEXT.S.D``
  and acknowledged on ``$JS.ACK.S.D.>``. Granting exactly these keeps a stage
  to its own consumer and filter.
* A stage creates (and updates) the streams it uses; it can neither delete
  nor purge them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .shards import PARTITIONS, SHARDED_STAGES

JS_API = "$JS.API"
# Granted in place of a list of targets: every target, those the sources name at runtime too (a NATS
# wildcard token). Stages that serve every target get it; a candidate-scheduler limited to some, those.
ANY_TARGET = "*"
# The kinds of work kept in JetStream streams, and the dead-letter stream beside them.
STREAM_KINDS = ("elect", "delegate", "status")
DEAD_LETTER_KIND = "dead"
STAGES = ("watcher", "proxy-scheduler", "candidate-scheduler", "feedback")
# The streams each stage uses (publishes to or consumes from), and therefore creates.
STAGE_STREAMS: dict[str, tuple[str, ...]] = {
    "watcher": ("elect",),
    "proxy-scheduler": ("elect", "delegate", DEAD_LETTER_KIND),
    "candidate-scheduler": ("delegate", DEAD_LETTER_KIND),
    "feedback": ("status", "delegate", DEAD_LETTER_KIND),
}


# -- names ---------------------------------------------------------------------

def subject(prefix: str, kind: str, cluster: str) -> str:
    return f"{prefix}.{kind}.{cluster}"


def stream_name(prefix: str, kind: str) -> str:
    return f"{prefix}_{kind}".upper().replace("-", "_")


def inbox_prefix(user: str) -> str:
    """The inbox prefix of a user's connection: replies to it arrive under ``_INBOX.<user>.``."""
    return f"_INBOX.{user}"


def proxy_scheduler_durable() -> str:
    return "proxy-scheduler"


def candidate_durable(target: str) -> str:
    return "*" if target == ANY_TARGET else f"candidate-scheduler-{target}"


def candidate_queue(target: str) -> str:
    return f"candidate-{target}"


def feedback_durable(source: str, partition: int) -> str:
    return f"feedback-{source}-{partition}"


def status_subject(prefix: str, source: str, partition: int | str) -> str:
    """Status of the delegates of one partition of a source's proxies (``*``: of every partition): read
    by the feedback process that owns that partition."""
    return f"{subject(prefix, 'status', source)}.{partition}"


def digest_subject(prefix: str, source: str, partition: int | str) -> str:
    """Digests of the delegates of one partition of a source's proxies, in every target (core NATS):
    read by the feedback process that owns that partition."""
    return f"{prefix}.digest.{source}.{partition}"


def members_subject(prefix: str, stage: str) -> str:
    """Where the processes of a sharded stage tell each other they are alive (mcsched.membership)."""
    return f"{prefix}.members.{stage}"


# -- permissions ---------------------------------------------------------------

@dataclass(frozen=True)
class Permissions:
    """Subjects a user may publish to and subscribe to (NATS wildcards allowed)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False  # may answer requests it received (on their reply subjects)

    def as_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"publish": {"allow": list(self.publish)},
                                  "subscribe": {"allow": list(self.subscribe)}}
        if self.allow_responses:
            config["allow_responses"] = True
        return config


def _streams(prefix: str, kinds: Iterable[str]) -> list[str]:
    subjects = []
    for kind in kinds:
        stream = stream_name(prefix, kind)
        subjects += [f"{JS_API}.STREAM.CREATE.{stream}", f"{JS_API}.STREAM.UPDATE.{stream}",
                     f"{JS_API}.STREAM.INFO.{stream}"]
    return subjects


def _consumer(prefix: str, kind: str, durable: str, filter_subject: str) -> list[str]:
    stream = stream_name(prefix, kind)
    return [f"{JS_API}.CONSUMER.INFO.{stream}.{durable}",
            f"{JS_API}.CONSUMER.CREATE.{stream}.{durable}.{filter_subject}",
            f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.{durable}",
            f"$JS.ACK.{stream}.{durable}.>",
            subject(prefix, DEAD_LETTER_KIND, kind)]


def stage_permissions(stage: str, user: str, prefix: str, sources: Iterable[str],
                      targets: Iterable[str]) -> Permissions:
    """What a process of ``stage`` connecting as ``user`` may do, serving these sources and targets.

    ``targets`` of a candidate-scheduler are the targets it serves; of the
    proxy-scheduler and feedback, every target; ``[ANY_TARGET]`` grants every
    target there is or will be (:func:`granted_targets`).
    """
    if stage not in STAGE_STREAMS:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    sources, targets = sorted(set(sources)), sorted(set(targets))
    publish = _streams(prefix, STAGE_STREAMS[stage])
    subscribe = [f"{inbox_prefix(user)}.>"]
    allow_responses = False
    if stage == "watcher":
        publish += [subject(prefix, "elect", s) for s in sources]
        # how far the proxy-scheduler got (its resync does not queue again what still waits there)
        publish.append(f"{JS_API}.CONSUMER.INFO.{stream_name(prefix, 'elect')}.{proxy_scheduler_durable()}")
    elif stage == "proxy-scheduler":
        publish += _consumer(prefix, "elect", proxy_scheduler_durable(), f"{prefix}.elect.>")
        publish += [subject(prefix, "candidate", t) for t in targets]
        publish += [subject(prefix, "delegate", t) for t in targets]
    elif stage == "candidate-scheduler":
        for target in targets:
            publish += _consumer(prefix, "delegate", candidate_durable(target), subject(prefix, "delegate", target))
            subscribe.append(subject(prefix, "candidate", target))
        allow_responses = True
    elif stage == "feedback":
        for source in sources:
            for partition in range(PARTITIONS):
                publish += _consumer(prefix, "status", feedback_durable(source, partition),
                                     status_subject(prefix, source, partition))
            publish.append(status_subject(prefix, source, "*"))
            publish.append(digest_subject(prefix, source, "*"))
            subscribe.append(digest_subject(prefix, source, "*"))
        publish += [subject(prefix, "delegate", t) for t in targets]  # a resync asks again for a missing delegate
    if stage in SHARDED_STAGES:
        publish.append(members_subject(prefix, stage))
        subscribe.append(members_subject(prefix, stage))
    return Permissions(tuple(dict.fromkeys(publish)), tuple(dict.fromkeys(subscribe)), allow_responses)


def granted_targets(stage: str, serve_targets: list[str] | None) -> list[str]:
    """The targets a stage's own user is granted: a candidate-scheduler's ``serve_targets`` when the
    settings limit it, else every target, including those added at runtime."""
    if stage == "candidate-scheduler" and serve_targets:
        return sorted(serve_targets)
    return [ANY_TARGET]


@dataclass(frozen=True)
class NatsUser:
    """A NATS user of the ``authorization`` block: ``permissions=None`` is an administrator."""

    name: str
    password: str
    permissions: Permissions | None


def authorization(users: Iterable[NatsUser]) -> dict[str, Any]:
    """The ``authorization`` block of a nats-server configuration granting these users."""
    entries = []
    for user in users:
        entry: dict[str, Any] = {"user": user.name, "password": user.password}
        if user.permissions is not None:
            entry["permissions"] = user.permissions.as_config()
        entries.append(entry)
    return {"authorization": {"users": entries}}
