"""Bus names, each stage's NATS permissions, and the NATS settings of a service."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from mcsched.cli import nats_config
from mcsched.natsauth import STAGES, NatsUser, authorization, candidate_durable, stage_permissions
from mcsched.runtime import nats_credentials
from mcsched.settings import NatsAuthSettings, Settings
from mcsched.shards import PARTITIONS

CLUSTERS = [{"name": "c1", "source": True, "target": True}, {"name": "c2", "target": True},
            {"name": "c3", "target": True}]


def covered(subject: str, allowed: tuple[str, ...]) -> bool:
    """Whether a NATS subject matches one of the allowed patterns (``*`` one token, ``>`` the rest)."""
    tokens = subject.split(".")
    for pattern in allowed:
        parts = pattern.split(".")
        for i, part in enumerate(parts):
            if part == ">":
                if len(tokens) > i:
                    return True
                break
            if i >= len(tokens) or (part != "*" and part != tokens[i]):
                break
        else:
            if len(parts) == len(tokens):
                return True
    return False


def test_the_watcher_publishes_only_elect_messages_of_its_sources() -> None:
    p = stage_permissions("watcher", "watcher", "mcs", ["c1"], ["c1", "c2"])
    assert covered("mcs.elect.c1", p.publish)
    for forbidden in ("mcs.elect.c2", "mcs.delegate.c2", "mcs.status.c1", "mcs.candidate.c2",
                      "$JS.API.CONSUMER.MSG.NEXT.MCS_ELECT.proxy-scheduler", "$JS.API.STREAM.DELETE.MCS_ELECT",
                      "$JS.API.STREAM.CREATE.MCS_DELEGATE"):
        assert not covered(forbidden, p.publish), forbidden
    # its inbox, and the heartbeats of the other watchers (they share the sources' partitions out)
    assert p.subscribe == ("_INBOX.watcher.>", "mcs.members.watcher") and not p.allow_responses
    assert covered("mcs.members.watcher", p.publish) and not covered("mcs.members.feedback", p.publish)


def test_a_candidate_scheduler_takes_and_answers_only_its_targets_work() -> None:
    p = stage_permissions("candidate-scheduler", "cs-c2", "mcs", ["c1"], ["c2"])
    assert covered("mcs.candidate.c2", p.subscribe) and not covered("mcs.candidate.c3", p.subscribe)
    assert covered(f"$JS.API.CONSUMER.MSG.NEXT.MCS_DELEGATE.{candidate_durable('c2')}", p.publish)
    assert covered(f"$JS.API.CONSUMER.CREATE.MCS_DELEGATE.{candidate_durable('c2')}.mcs.delegate.c2", p.publish)
    for forbidden in (f"$JS.API.CONSUMER.MSG.NEXT.MCS_DELEGATE.{candidate_durable('c3')}",
                      f"$JS.API.CONSUMER.CREATE.MCS_DELEGATE.{candidate_durable('c2')}.mcs.delegate.c3",
                      f"$JS.API.CONSUMER.DURABLE.CREATE.MCS_DELEGATE.{candidate_durable('c2')}",
                      "mcs.delegate.c2", "mcs.elect.c1", "mcs.status.c1"):
        assert not covered(forbidden, p.publish), forbidden
    assert p.allow_responses  # it answers the proxy-scheduler's questions
    assert covered("mcs.dead.delegate", p.publish) and not covered("mcs.dead.elect", p.publish)


def test_the_proxy_scheduler_asks_every_target_and_takes_every_sources_elect_messages() -> None:
    p = stage_permissions("proxy-scheduler", "proxy-scheduler", "mcs", ["c1"], ["c1", "c2"])
    for allowed in ("mcs.candidate.c1", "mcs.candidate.c2", "mcs.delegate.c2",
                    "$JS.API.CONSUMER.CREATE.MCS_ELECT.proxy-scheduler.mcs.elect.>",
                    "$JS.ACK.MCS_ELECT.proxy-scheduler.1.2.3.4.5.6.7"):
        assert covered(allowed, p.publish), allowed
    assert not covered("mcs.candidate.c3", p.publish) and not covered("mcs.status.c1", p.publish)
    assert not covered("mcs.candidate.c1", p.subscribe)


def test_feedback_publishes_status_and_asks_again_for_missing_delegates() -> None:
    p = stage_permissions("feedback", "feedback", "mcs", ["c1"], ["c1", "c2"])
    assert covered("mcs.status.c1.0", p.publish) and covered("mcs.status.c1.11", p.publish)
    assert covered("mcs.delegate.c2", p.publish) and not covered("mcs.status.c2.0", p.publish)
    for partition in range(PARTITIONS):  # a durable per partition, each pinned to its own subject
        assert covered(f"$JS.API.CONSUMER.MSG.NEXT.MCS_STATUS.feedback-c1-{partition}", p.publish)
        assert covered(f"$JS.API.CONSUMER.CREATE.MCS_STATUS.feedback-c1-{partition}.mcs.status.c1.{partition}",
                       p.publish)
    assert not covered("$JS.API.CONSUMER.CREATE.MCS_STATUS.feedback-c1-1.mcs.status.c1.2", p.publish)
    assert not covered("$JS.API.CONSUMER.CREATE.MCS_STATUS.feedback-c1-12.mcs.status.c1.12", p.publish)
    assert not covered("mcs.elect.c1", p.publish) and not covered("mcs.candidate.c1", p.publish)


def test_nats_config_gives_every_stage_a_user_and_keeps_existing_passwords(tmp_path: Path) -> None:
    settings = Settings(clusters=CLUSTERS, serve_targets=["c2"])
    (tmp_path / "watcher").write_text("kept")
    config = nats_config(settings, tmp_path, per_target_candidates=True)
    users = {u["user"]: u for u in json.loads(config.read_text())["authorization"]["users"]}
    assert set(users) == {"admin", *STAGES, "candidate-scheduler-c1", "candidate-scheduler-c2",
                          "candidate-scheduler-c3"}
    assert users["watcher"]["password"] == "kept"
    assert "permissions" not in users["admin"]
    assert all(users[u]["password"] == (tmp_path / u).read_text() for u in users)
    served = users["candidate-scheduler"]["permissions"]["subscribe"]["allow"]
    assert "mcs.candidate.c2" in served and "mcs.candidate.c3" not in served  # serve_targets
    assert "mcs.candidate.c3" in users["candidate-scheduler-c3"]["permissions"]["subscribe"]["allow"]
    assert oct(config.stat().st_mode & 0o777) == "0o600" and oct((tmp_path / "admin").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(ValueError, match="unknown stage"):
        stage_permissions("scheduler", "x", "mcs", [], [])


def test_the_authorization_block_lists_users_and_leaves_the_administrator_unrestricted() -> None:
    block = authorization([NatsUser("admin", "a", None),
                           NatsUser("watcher", "w", stage_permissions("watcher", "watcher", "mcs", ["c1"], []))])
    admin, watcher = block["authorization"]["users"]
    assert admin == {"user": "admin", "password": "a"}
    assert "mcs.elect.c1" in watcher["permissions"]["publish"]["allow"]
    assert "allow_responses" not in watcher["permissions"]


def test_a_service_without_nats_credentials_refuses_to_start_unless_anonymity_is_asked_for(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no NATS credentials"):
        nats_credentials("watcher", Settings(clusters=CLUSTERS))
    anonymous = nats_credentials("watcher", Settings(clusters=CLUSTERS, nats_auth={"allow_anonymous": True}))
    assert anonymous.user is None
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    credentials = nats_credentials("feedback", Settings(clusters=CLUSTERS, nats_auth={"password_file": secret}))
    assert (credentials.user, credentials.password) == ("feedback", "s3cret")  # the user defaults to the stage
    named = nats_credentials("feedback", Settings(clusters=CLUSTERS, nats_auth={"user": "fb-eu", "password": "x"}))
    assert (named.user, named.password) == ("fb-eu", "x")
    with pytest.raises(ValueError, match="password_file"):
        nats_credentials("feedback", Settings(clusters=CLUSTERS,
                                              nats_auth={"password_file": tmp_path / "missing"}))


@pytest.mark.parametrize("auth, message", [
    ({"user": "w"}, "no password"),
    ({"password": "a", "password_file": "/x"}, "not both"),
    ({"allow_anonymous": True, "password": "a"}, "contradicts"),
    ({"tls_cert_file": "/c"}, "go together"),
])
def test_contradictory_nats_settings_are_refused(auth: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        NatsAuthSettings.model_validate(auth)
