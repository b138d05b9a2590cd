"""Certificates (mcsched.pki): a serving certificate that several processes share."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from cryptography import x509

from mcsched import pki
from mcsched.cli import main as mcsctl
from mcsched.settings import WebhookSettings
from services.watcher.__main__ import _serving_material


def _names(cert_file: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n.value) for n in alt]


def test_a_shared_serving_certificate_is_kept_while_valid_for_its_host_and_made_again_for_another(
        tmp_path: Path) -> None:
    first = pki.write_serving(tmp_path, "watcher", "test-ca")
    assert _names(first.cert_file) == ["watcher", "127.0.0.1"]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(first.cert_file, first.key_file)  # the key belongs to the certificate
    x509.load_pem_x509_certificate(first.ca_file.read_bytes())
    kept = first.cert_file.read_bytes()
    assert pki.write_serving(tmp_path, "watcher", "test-ca") == first
    assert first.cert_file.read_bytes() == kept  # a watcher started later serves the same certificate
    pki.write_serving(tmp_path, "10.0.0.7", "test-ca")
    assert _names(first.cert_file) == ["10.0.0.7"]
    first.key_file.unlink()
    pki.write_serving(tmp_path, "10.0.0.7", "test-ca")
    assert first.key_file.exists()
    assert first.key_file.stat().st_mode & 0o777 == 0o600


def test_files_that_do_not_belong_together_are_made_anew(tmp_path: Path) -> None:
    """A run cut short, or a CA replaced by hand, leaves a certificate the API servers would refuse."""
    files = pki.write_serving(tmp_path, "watcher", "test-ca")
    other = pki.write_serving(tmp_path / "other", "watcher", "test-ca")
    for swapped in (files.ca_file, files.key_file):
        kept = files.cert_file.read_bytes()
        swapped.write_bytes((other.ca_file if swapped == files.ca_file else other.key_file).read_bytes())
        pki.write_serving(tmp_path, "watcher", "test-ca")
        assert files.cert_file.read_bytes() != kept
        cert = x509.load_pem_x509_certificate(files.cert_file.read_bytes())
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(files.ca_file.read_bytes()))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(files.cert_file, files.key_file)


def test_mcsctl_writes_the_webhook_certificate_for_the_host_of_webhook_url(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.yaml"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    config.write_text(f"clusters:\n- name: c1\n  kubeconfig: {kubeconfig}\n  source: true\n  target: true\n"
                      "webhook:\n  url: https://watcher:8443\n")
    monkeypatch.setenv("MCS_CONFIG", str(config))  # mcsctl --config sets it: restored after the test
    assert mcsctl(["--config", str(config), "webhook-certificate", str(tmp_path / "webhook")]) == 0
    assert _names(tmp_path / "webhook" / "tls.crt") == ["watcher", "127.0.0.1"]


def test_a_watcher_composed_again_serves_and_registers_the_self_signed_ca_it_made_first() -> None:
    # A new CA at each composition (a member joined, a target was added) left the API servers calling
    # a certificate they did not trust until the new registration landed: pods refused meanwhile.
    settings = WebhookSettings(url="https://watcher.mcs.svc:8443")
    first_context, first_ca = _serving_material(settings)
    again_context, again_ca = _serving_material(settings)
    assert again_ca == first_ca and again_context is first_context
    other_ca = _serving_material(WebhookSettings(url="https://elsewhere.example:8443"))[1]
    assert other_ca != first_ca
