"""``make image``: the project's image, built with podman from the unmodified Dockerfile, no registry needed.

No Docker engine runs on these machines, and no image registry is reachable;
Debian's podman (4.3) runs as root. The Dockerfile starts ``FROM
python:3.11-slim``, which cannot be pulled here, so a stand-in is made once
from Debian's own packages (``debootstrap --variant=minbase bookworm`` with
Python 3.11, pip and the host's CA certificates, imported under that name)
and kept in podman's image store. Then ``podman build`` runs the Dockerfile
as it is. What podman needs on these machines is in
``deploy/podman/containers.conf`` (runc, cgroupfs, a file events logger,
ulimits within the machine's), passed as ``CONTAINERS_CONF``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONTAINERS_CONF = ROOT / "deploy" / "podman" / "containers.conf"
IMAGE = "localhost/multicluster-scheduler:latest"
BASE_IMAGE = "docker.io/library/python:3.11-slim"  # the Dockerfile's FROM, as podman resolves it
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
# busybox: its wget for the stand-in NATS image's health check (the official image is alpine's)
BASE_PACKAGES = "python3,python3-pip,python-is-python3,ca-certificates,busybox"
# The images docker-compose.yml names that cannot be pulled here, built from the binaries the
# project has (deploy/podman/<name>.Containerfile): compose name -> (Containerfile, binary).
STAND_INS = {
    "docker.io/library/nats:2.10-alpine": ("nats", "nats-server"),
    "docker.io/jaegertracing/all-in-one:1.76.0": ("jaeger", "jaeger"),
}
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def podman_env() -> dict[str, str]:
    return dict(os.environ, CONTAINERS_CONF=str(CONTAINERS_CONF))


def usable() -> str | None:
    """Why podman cannot build images here, or None when it can."""
    if shutil.which("podman") is None:
        return "podman is not installed (apt-get install podman debootstrap runc)"
    if os.geteuid() != 0:
        return "podman builds images here as root only"
    return None


def podman(*args: str, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], env=podman_env(), text=True, check=check, **kwargs)  # type: ignore[call-overload, no-any-return]


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check=False).returncode == 0


def base_is_current() -> bool:
    """Whether the base image in podman's store was made with today's package list."""
    if not image_exists(BASE_IMAGE):
        return False
    label = podman("image", "inspect", "--format", '{{ index .Labels "mcs.packages" }}', BASE_IMAGE,
                   check=False, capture_output=True)
    return label.stdout.strip() == BASE_PACKAGES


def build_base(log: Callable[[str], None] = print) -> None:
    """The stand-in for python:3.11-slim: Debian bookworm, Python 3.11 and pip, trusting the host's CAs."""
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is not installed (apt-get install debootstrap)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mcs-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        log(f"  debootstrap bookworm (minbase, {BASE_PACKAGES}) from {DEBIAN_MIRROR} (about a minute)")
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(rootfs),
                        DEBIAN_MIRROR], check=True, stdout=subprocess.DEVNULL)
        # pip inside builds reaches PyPI through whatever the host trusts (an egress proxy's CA too)
        if HOST_CA_BUNDLE.exists():
            shutil.copyfile(HOST_CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
        # The official image's pip installs system-wide; Debian's refuses without this (PEP 668).
        (rootfs / "usr/lib/python3.11/EXTERNALLY-MANAGED").unlink(missing_ok=True)
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(rootfs / cache, ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        podman("import", "--change", 'CMD ["python3"]', "--change", f"LABEL mcs.packages={BASE_PACKAGES}", "--change",
               "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "-", BASE_IMAGE,
               stdin=tar.stdout, stdout=subprocess.DEVNULL)
        if tar.wait() != 0:
            raise RuntimeError("tar of the root filesystem failed")
    log(f"  {BASE_IMAGE} made from Debian's packages in {time.monotonic() - started:.0f}s")


def build(log: Callable[[str], None] = print) -> str:
    """Build the project's image (and the base image first, once); returns its name."""
    problem = usable()
    if problem is not None:
        raise RuntimeError(problem)
    if not base_is_current():
        build_base(log)
    else:
        log(f"  {BASE_IMAGE}: in podman's store")
    started = time.monotonic()
    log(f"  podman build -t {IMAGE} -f Dockerfile .")
    podman("build", "--quiet", "-t", IMAGE, "-f", str(ROOT / "Dockerfile"), str(ROOT), stdout=subprocess.DEVNULL)
    log(f"  {IMAGE} built in {time.monotonic() - started:.0f}s")
    return IMAGE


def binary(name: str) -> Path:
    """A binary the project has: nats-server from its wheel, the others from the tools cache."""
    if name == "nats-server":
        from .tools import nats_server_binary

        return nats_server_binary()
    from .tools import bin_dir

    return bin_dir() / name


def build_stand_ins(log: Callable[[str], None] = print) -> list[str]:
    """NATS and Jaeger images under the names docker-compose.yml uses, from the project's binaries."""
    if not base_is_current():
        build_base(log)
    for name, (containerfile, program) in STAND_INS.items():
        with tempfile.TemporaryDirectory(prefix="mcs-image-") as tmp:
            context = Path(tmp)
            shutil.copy2(binary(program), context / program)
            for extra in (ROOT / "deploy" / "podman").glob(f"{containerfile}-*"):
                shutil.copy2(extra, context / extra.name)
            recipe = ROOT / "deploy" / "podman" / f"{containerfile}.Containerfile"
            podman("build", "--quiet", "-t", name, "-f", str(recipe), str(context), stdout=subprocess.DEVNULL)
        log(f"  {name}: built from {binary(program)}")
    return list(STAND_INS)


def main() -> int:
    try:
        build(lambda m: print(m, flush=True))
        build_stand_ins(lambda m: print(m, flush=True))
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"make image failed: {exc}", file=sys.stderr)
        return 1
    return 0
