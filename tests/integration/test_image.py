"""The project's image, built with podman from the unmodified Dockerfile (``make image``), runs the services.

Skipped where podman cannot build images (not installed, or not root); ``.ci/run``
installs podman, runc and debootstrap on Debian machines where it runs as root.
"""

from __future__ import annotations

import subprocess

import pytest

from localenv import image

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(image.usable() is not None, reason=str(image.usable()))]


@pytest.fixture(scope="module")
def built() -> str:
    return image.build(lambda _: None)


def run(name: str, *args: str, entrypoint: str | None = None) -> subprocess.CompletedProcess[str]:
    return image.podman("run", "--rm", *(["--entrypoint", entrypoint] if entrypoint else []), name, *args,
                        check=False, capture_output=True, timeout=120)


def test_the_image_runs_each_service_as_its_unprivileged_user(built: str) -> None:
    assert run(built, "-u", entrypoint="id").stdout.strip() == "10001"
    imports = run(built, "-c", "import services.watcher, services.proxy_scheduler, services.candidate_scheduler, "
                  "services.feedback, mcsched.runtime; print('ok')", entrypoint="python")
    assert imports.stdout.strip() == "ok", imports.stderr
    # A service without settings stops at once and says what is missing (exit status 2).
    watcher = run(built, "services.watcher")
    assert watcher.returncode == 2 and "no clusters configured" in watcher.stderr, watcher.stderr
    cli = run(built, "--help", entrypoint="mcsctl")
    assert cli.returncode == 0 and "nats-config" in cli.stdout, cli.stderr


def test_the_sources_are_not_in_the_image_only_the_installed_packages(built: str) -> None:
    where = run(built, "-c", "import mcsched, os; print(mcsched.__file__); print(os.path.exists('/tmp/src'))",
                entrypoint="python")
    module, sources_left = where.stdout.split()
    assert "site-packages" in module or "dist-packages" in module, module
    assert sources_left == "False"
