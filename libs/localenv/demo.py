"""The demo: Admiralty's getting-started scenario on the local environment.

Labels ``default`` in the first cluster ``multicluster-scheduler=enabled``,
applies ``deploy/examples/nginx.yaml`` (10 elected nginx replicas), waits until
every proxy pod is Running, and prints the pods of each cluster like
``kubectl get pods -o wide``, then the source's nodes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .environment import LocalEnvironment

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "nginx.yaml"


def _kubectl(env: LocalEnvironment, context: str, *args: str) -> str:
    return env.cluster(context).kubectl(*args)


def run(env: LocalEnvironment, timeout: float = 120.0) -> int:
    clusters = env.info().cluster_names()
    source = clusters[0]
    print(f"$ kubectl --context {source} label namespace default multicluster-scheduler=enabled")
    _kubectl(env, source, "label", "namespace", "default", "multicluster-scheduler=enabled", "--overwrite")
    print(f"$ kubectl --context {source} apply -f {EXAMPLE.relative_to(EXAMPLE.parents[2])}")
    deadline = time.monotonic() + timeout
    while True:  # the webhook registers a moment after the services start
        try:
            print(_kubectl(env, source, "apply", "-f", str(EXAMPLE)).strip())
            break
        except RuntimeError as exc:
            if time.monotonic() > deadline:
                raise
            print(f"  (waiting for the services: {exc})", flush=True)
            time.sleep(2)
    started = time.monotonic()
    print("waiting for 10 proxy pods and their delegates to be Running ...", flush=True)
    while True:
        pods = json.loads(_kubectl(env, source, "get", "pods", "-l", "app=nginx", "-o", "json"))["items"]
        proxies = [p for p in pods if (p["spec"].get("nodeName") or "").startswith("admiralty-")]
        running = [p for p in proxies if p.get("status", {}).get("phase") == "Running"]
        if len(running) == 10:
            break
        if time.monotonic() > deadline:
            print(f"only {len(running)}/10 proxies Running after {timeout:.0f}s; see `make status` and .local/logs",
                  file=sys.stderr)
            return 1
        time.sleep(0.5)
    print(f"all 10 proxies Running in {time.monotonic() - started:.1f}s\n")
    for cluster in clusters:
        print(f"$ kubectl --context {cluster} get pods -o wide")
        print(_kubectl(env, cluster, "get", "pods", "-o", "wide"))
    print(f"$ kubectl --context {source} get nodes")
    print(_kubectl(env, source, "get", "nodes"))
    info = env.info()
    print(f"Try it yourself:\n  export KUBECONFIG={info.kubeconfig} PATH={info.bin_dir}:$PATH\n"
          f"  kubectl --context {source} scale deployment nginx --replicas=30\n"
          f"Jaeger UI/API: {info.jaeger_query_url}   Stop everything with `make down`.")
    return 0
