"""Service settings: clusters and their roles, NATS, subjects, timings, webhook.

Settings come from a YAML file named by ``MCS_CONFIG`` and from environment
variables prefixed ``MCS_`` (nested fields with ``__``, e.g.
``MCS_WEBHOOK__PORT=9443``); environment variables win. Every field is
validated at start-up so a typo stops a service with a clear message instead
of misbehaving later. See ``docs/configuration.md`` for the reference.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class ClusterSettings(BaseModel):
    """One Kubernetes cluster the services talk to."""

    name: str = Field(description="cluster name; virtual nodes are named admiralty-<name>")
    kubeconfig: Path | None = Field(None, description="kubeconfig file; none means in-cluster config")
    context: str | None = Field(None, description="context in the kubeconfig (default: current)")
    source: bool = Field(False, description="elected pods in this cluster are scheduled to targets")
    target: bool = Field(False, description="delegate pods may run in this cluster")
    scheduler_name: str | None = Field(
        None, description="scheduler of this target that places delegates (default: the pod's own, "
        "usually the target's default-scheduler)")
    labels: dict[str, str] = Field(
        default_factory=dict, description="target only: labels of its virtual nodes, for cluster-level "
        "constraints (besides its name and the labels all its nodes share)")
    excluded_labels_regexp: str | None = Field(
        None, description="target only: virtual-node labels whose key=value matches this are left off")
    # Set for targets read from a source's Target and ClusterTarget objects (mcsched.targets), not in files.
    kubeconfig_data: dict[str, Any] | None = Field(None, exclude=True, repr=False)
    same_as: str | None = Field(None, description="a target that is this source cluster (self: true)")
    sources: list[str] | None = Field(None, description="target only: the sources whose pods may use it (default: all)")
    namespace: str | None = Field(None, description="target only: only pods of this namespace may use it")

    @field_validator("name")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if not is_cluster_name(value):
            raise ValueError(f"cluster name {value!r} must be a DNS label (lowercase letters, digits, '-')")
        return value

    def serves(self, source: str, namespace: str | None = None) -> bool:
        """Whether pods of ``source`` (in ``namespace``, when given) may go to this target."""
        if not self.target or (self.sources is not None and source not in self.sources):
            return False
        return self.namespace is None or namespace is None or namespace == self.namespace


def is_cluster_name(value: str) -> bool:
    return _DNS_LABEL.match(value) is not None


class WebhookSettings(BaseModel):
    """The mutating admission webhook that turns elected pods into proxy pods."""

    enabled: bool = True
    listen_host: str = "0.0.0.0"
    port: int = Field(8443, ge=1, le=65535)
    url: str | None = Field(None, description="URL the API servers call; default https://127.0.0.1:<port>")
    cert_file: Path | None = Field(None, description="serving certificate; default: self-signed at start")
    key_file: Path | None = None
    ca_file: Path | None = Field(None, description="CA bundle registered with the API servers")
    reuse_port: bool = Field(False, description="several watchers on one host serve one port (SO_REUSEPORT: the "
                             "kernel spreads the API servers' connections); give them one cert_file/key_file")
    register_webhook: bool = Field(True, description="create/update the MutatingWebhookConfiguration in sources")
    failure_policy: Literal["Fail", "Ignore"] = "Fail"
    timeout_seconds: int = Field(5, ge=1, le=30)

    def called_url(self) -> str:
        """The URL the API servers call (``url``, else this host's ``port``)."""
        return self.url or f"https://127.0.0.1:{self.port}"

    def called_host(self) -> str:
        """The host of :meth:`called_url`: what its serving certificate must name."""
        return urlparse(self.called_url()).hostname or "127.0.0.1"

    @model_validator(mode="after")
    def _shared_port_needs_a_shared_certificate(self) -> WebhookSettings:
        # Each watcher would make and register its own self-signed CA: the API servers would trust one of
        # them, and the connections the kernel hands to the others would fail.
        if self.enabled and self.reuse_port and not (self.cert_file and self.key_file):
            raise ValueError("webhook.reuse_port needs webhook.cert_file and webhook.key_file: the watchers "
                             "sharing the port must serve one certificate")
        return self


class KubeletSettings(BaseModel):
    """feedback only: the kubelet endpoint of the virtual nodes (kubectl logs, exec, attach, port-forward)."""

    enabled: bool = True
    listen_host: str = "0.0.0.0"
    port: int = Field(10250, ge=1, le=65535, description="for the first source; the n-th source's is port + n")
    address: str | None = Field(
        None, description="the address virtual nodes advertise (InternalIP), which the sources' API servers "
        "connect to; default: $POD_IP, else this host's address")
    cert_file: Path | None = Field(None, description="serving certificate (default: self-signed at start)")
    key_file: Path | None = None
    client_ca_file: Path | None = Field(
        None, description="CA of the API servers' kubelet client certificates (default: each source's cluster CA)")
    reuse_port: bool = Field(False, description="several feedback processes on one host serve one port "
                             "(SO_REUSEPORT, e.g. replicas in the host's network): any of them serves any call")


class NatsAuthSettings(BaseModel):
    """How a service proves who it is to NATS, and how it checks NATS (docs/security.md)."""

    user: str | None = Field(None, description="NATS user; default: the service's stage name when a password is set")
    password: SecretStr | None = Field(None, description="password (prefer password_file or MCS_NATS_AUTH__PASSWORD)")
    password_file: Path | None = Field(None, description="file holding the password (e.g. a mounted Secret)")
    allow_anonymous: bool = Field(
        False, description="connect without credentials: anyone who reaches NATS can then place pods")
    tls_ca_file: Path | None = Field(None, description="CA bundle to verify NATS's certificate (enables TLS)")
    tls_cert_file: Path | None = Field(None, description="client certificate, when NATS asks for one")
    tls_key_file: Path | None = None

    @model_validator(mode="after")
    def _one_way(self) -> NatsAuthSettings:
        if self.password is not None and self.password_file is not None:
            raise ValueError("nats_auth: set password or password_file, not both")
        if self.user is not None and self.password is None and self.password_file is None:
            raise ValueError(f"nats_auth: user {self.user!r} has no password or password_file")
        if self.allow_anonymous and (self.user or self.password or self.password_file):
            raise ValueError("nats_auth: allow_anonymous contradicts the credentials also set")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("nats_auth: tls_cert_file and tls_key_file go together")
        return self

    @property
    def has_credentials(self) -> bool:
        return self.password is not None or self.password_file is not None

    def read_password(self) -> str:
        """The password, read from its file when it comes from one (so a rotated Secret is used)."""
        if self.password_file is not None:
            try:
                return self.password_file.read_text().strip()
            except OSError as exc:
                raise ValueError(f"nats_auth.password_file {self.password_file}: {exc.strerror}") from exc
        return self.password.get_secret_value() if self.password is not None else ""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MCS_", env_nested_delimiter="__", extra="forbid")

    clusters: list[ClusterSettings] = Field(default_factory=list)
    nats_url: str = Field("nats://127.0.0.1:4222", description="a NATS URL, or several (a cluster's seeds) "
                          "separated by commas")
    stream_replicas: int = Field(1, ge=1, le=5, description="replicas of each JetStream stream (3 on a "
                                 "three-node NATS cluster)")
    nats_auth: NatsAuthSettings = Field(default_factory=NatsAuthSettings)
    subject_prefix: str = Field("mcs", pattern=r"^[A-Za-z0-9_-]+$")
    resync_period_seconds: float = Field(30.0, gt=0)
    candidate_timeout_seconds: float = Field(2.0, gt=0)
    rejection_memory_seconds: float = Field(
        30.0, gt=0, description="a target whose scheduler refused a pod is not chosen again for it for this long")
    unschedulable_retry_seconds: float = Field(5.0, gt=0)
    heartbeat_seconds: float = Field(10.0, gt=0)
    shard_lease_seconds: float = Field(
        6.0, gt=0, description="a process of a sharded stage not heard from for this long is gone: the others "
        "take its shares of the work")
    target_poll_seconds: float = Field(
        3.0, gt=0, description="how often the sources' Target and ClusterTarget objects are read while a change "
        "could go unseen (a watch down, a named Secret missing); watched, they are read when they change and "
        "every 30 s")
    failover_seconds: int | None = Field(
        300, ge=0, description="how long a proxy stays on a NotReady virtual node (its cluster lost) before it is "
        "evicted and its controller replaces it elsewhere; a pod's own tolerationSeconds win; null: never")
    max_failed_deliveries: int = Field(
        10, ge=1, description="a bus message whose handling failed this many times is dead-lettered")
    serve_targets: list[str] | None = Field(
        None, description="targets this candidate-scheduler serves (default: all targets)")
    otlp_endpoint: str | None = Field(None, description="OTLP gRPC endpoint for traces, e.g. localhost:4317")
    metrics_port: int | None = Field(9090, ge=0, le=65535, description="/metrics, /healthz, /readyz; 0 or null: off")
    log_level: str = "INFO"
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    kubelet: KubeletSettings = Field(default_factory=KubeletSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        import os

        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("MCS_CONFIG")
        if config_file:
            if not Path(config_file).is_file():
                raise FileNotFoundError(f"MCS_CONFIG names {config_file}, which is not a file")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)

    @model_validator(mode="after")
    def _roles(self) -> Settings:
        names = [c.name for c in self.clusters]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"cluster names must be unique; repeated: {', '.join(duplicates)}")
        if not self.clusters:
            raise ValueError("no clusters configured: set `clusters` in the MCS_CONFIG file or MCS_CLUSTERS")
        if not any(c.source for c in self.clusters):
            raise ValueError("no source cluster: mark at least one cluster `source: true`")
        if not any(c.target for c in self.clusters):
            raise ValueError("no target cluster: mark at least one cluster `target: true`")
        unknown = sorted(set(self.serve_targets or []) - set(self.target_names))
        if unknown:
            raise ValueError(f"serve_targets names clusters that are not targets: {', '.join(unknown)}")
        return self

    @property
    def source_names(self) -> list[str]:
        return [c.name for c in self.clusters if c.source]

    @property
    def target_names(self) -> list[str]:
        return [c.name for c in self.clusters if c.target]

    def targets_for(self, source: str, namespace: str | None = None) -> list[str]:
        """The targets pods of ``source`` may go to (those of ``namespace``, when given)."""
        return [c.name for c in self.clusters if c.serves(source, namespace)]

    def sources_of(self, target: str) -> list[str]:
        """The sources whose pods may go to ``target``."""
        cluster = self.cluster(target)
        return [s for s in self.source_names if cluster.serves(s)]

    def with_targets(self, found: list[ClusterSettings]) -> Settings:
        """These settings with the targets read from the sources' Target and ClusterTarget objects."""
        return self.model_copy(update={"clusters": [*self.clusters, *found]})

    def cluster(self, name: str) -> ClusterSettings:
        for cluster in self.clusters:
            if cluster.name == name:
                return cluster
        raise KeyError(f"unknown cluster {name!r}; known: {', '.join(c.name for c in self.clusters)}")

    def served_targets(self) -> list[str]:
        return list(self.serve_targets) if self.serve_targets else self.target_names


def load_settings(**overrides: Any) -> Settings:
    """Settings from MCS_CONFIG and MCS_* variables; keyword overrides win (for tests)."""
    return Settings(**overrides)
