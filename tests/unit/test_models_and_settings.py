"""Message codecs and settings validation."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
from pydantic import ValidationError

from mcsched.models import CandidateReply, ElectMessage, PodRef, SchemaError, decode
from mcsched.settings import Settings, WebhookSettings


def ref() -> PodRef:
    return PodRef(cluster="c1", namespace="default", name="nginx-1", uid="u1")


def test_message_round_trip() -> None:
    message = ElectMessage(proxy=ref(), reason="resync")
    assert decode(message.encode(), ElectMessage) == message


def test_elect_message_carries_the_users_pod() -> None:
    manifest = {"metadata": {"name": "nginx-1", "labels": {"app": "nginx"}},
                "spec": {"containers": [{"name": "nginx", "image": "nginx",
                                         "resources": {"requests": {"cpu": "100m"}}}]}}
    message = ElectMessage(proxy=ref(), manifest=manifest, created="2026-11-27T05:00:00Z")
    decoded = decode(message.encode(), ElectMessage)
    assert decoded.manifest == manifest
    assert decoded.created == "2026-11-27T05:00:00Z"


def test_elect_message_of_an_older_writer_has_no_manifest() -> None:
    data = msgpack.packb({"type": "ElectMessage", "v": 1, "body": {"proxy": ref().model_dump(), "reason": "created"}})
    decoded = decode(data, ElectMessage)
    assert decoded.manifest is None and decoded.created is None


def test_decode_refuses_another_type() -> None:
    with pytest.raises(SchemaError, match="expected a CandidateReply"):
        decode(ElectMessage(proxy=ref()).encode(), CandidateReply)


def test_decode_refuses_a_newer_schema() -> None:
    data = msgpack.packb({"type": "ElectMessage", "v": 99, "body": {"proxy": ref().model_dump()}})
    with pytest.raises(SchemaError, match="newer"):
        decode(data, ElectMessage)


def test_decode_refuses_garbage() -> None:
    with pytest.raises(SchemaError):
        decode(b"\xc1not msgpack", ElectMessage)


def clusters() -> list[dict[str, object]]:
    return [{"name": "c1", "kubeconfig": "/tmp/k", "source": True, "target": True},
            {"name": "c2", "kubeconfig": "/tmp/k", "target": True}]


def test_settings_roles() -> None:
    settings = Settings(clusters=clusters())
    assert settings.source_names == ["c1"] and settings.target_names == ["c1", "c2"]
    assert settings.served_targets() == ["c1", "c2"]


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c.append(dict(c[0])), "must be unique"),
    (lambda c: [x.update(source=False) for x in c], "no source cluster"),
    (lambda c: [x.update(target=False) for x in c], "no target cluster"),
    (lambda c: c[0].update(name="C_1"), "DNS label"),
])
def test_settings_refuse_bad_clusters(change, message: str) -> None:  # type: ignore[no-untyped-def]
    configured = clusters()
    change(configured)
    with pytest.raises(ValidationError, match=message):
        Settings(clusters=configured)


def test_settings_from_yaml_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "mcs.yaml"
    config.write_text("clusters:\n- {name: c1, kubeconfig: /k, source: true, target: true}\n"
                      "nats_url: nats://nats:4222\n")
    monkeypatch.setenv("MCS_CONFIG", str(config))
    monkeypatch.setenv("MCS_SUBJECT_PREFIX", "prod")
    monkeypatch.setenv("MCS_WEBHOOK__PORT", "9443")
    settings = Settings()
    assert settings.nats_url == "nats://nats:4222"
    assert settings.subject_prefix == "prod" and settings.webhook.port == 9443


def test_settings_missing_config_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCS_CONFIG", "/nonexistent/mcs.yaml")
    with pytest.raises(FileNotFoundError, match=r"MCS_CONFIG names /nonexistent/mcs\.yaml"):
        Settings()


def test_a_webhook_port_shared_by_several_watchers_needs_one_certificate() -> None:
    with pytest.raises(ValidationError, match=r"reuse_port needs webhook\.cert_file"):
        WebhookSettings(reuse_port=True)  # each watcher would register its own self-signed CA
    shared = WebhookSettings(reuse_port=True, cert_file=Path("/tls/tls.crt"), key_file=Path("/tls/tls.key"))
    assert shared.reuse_port
    assert not WebhookSettings(reuse_port=True, enabled=False).enabled  # a watcher not serving it: no matter
