"""Command line for the local environment: ``python -m localenv up|down|status``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import demo
from .environment import LocalEnvironment
from .services import start_services, wait_services_ready, write_config
from .tools import main as build_tools

DEFAULT_ROOT = Path(os.environ.get("MCS_LOCAL_DIR", ".local"))


def _print_usage(env: LocalEnvironment) -> None:
    info = env.info()
    kubectl = f"{info.bin_dir}/kubectl --kubeconfig {info.kubeconfig}"
    print()
    print("The local environment is up:")
    for name, cluster in info.clusters.items():
        print(f"  cluster {name:<4} {cluster['server']}  nodes: {', '.join(cluster['nodes'])}")
    print(f"  NATS      {info.nats_url} (monitoring {info.nats_monitor_url}); a user per stage, passwords in "
          f"{Path(info.nats_password_files['admin']).parent}")
    print(f"  Jaeger    {info.jaeger_query_url} (OTLP gRPC {info.otlp_grpc_endpoint}, "
          f"HTTP {info.otlp_http_endpoint})")
    print()
    print("Use it with:")
    print(f"  export KUBECONFIG={info.kubeconfig} PATH={info.bin_dir}:$PATH")
    print(f"  kubectl --context {next(iter(info.clusters))} get nodes")
    print(f"or without exporting anything:\n  {kubectl} --context c1 get nodes")
    print(f"Endpoints for scripts: {env.info_path}; stop it with `make down`.")
    if (env.root / "mcs.yaml").exists():
        print(f"Operator CLI: MCS_CONFIG={env.root / 'mcs.yaml'} MCS_KUBECONFIG={info.kubeconfig} "
              f"MCS_JAEGER_URL={info.jaeger_query_url} .venv/bin/mcsctl proxies")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localenv", description=__doc__)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="environment directory")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the clusters, NATS and Jaeger")
    up.add_argument("--clusters", default=os.environ.get("CLUSTERS", "c1,c2"))
    up.add_argument("--nodes", type=int, default=int(os.environ.get("NODES", "3")))
    up.add_argument("--nats-nodes", type=int, default=int(os.environ.get("NATS_NODES", "1")),
                    help="NATS servers: more than 1 runs a NATS cluster (streams on min(3, n) of them)")
    up.add_argument("--no-services", action="store_true", default=os.environ.get("SERVICES", "1") == "0",
                    help="start only the clusters, NATS and Jaeger (SERVICES=0)")
    up.add_argument("--replicas", type=int, default=int(os.environ.get("REPLICAS", "1")),
                    help="processes per service")
    sub.add_parser("down", help="stop everything this environment started")
    sub.add_parser("bench", help="benchmark placement against plain scheduling (BENCH_PODS, BENCH_CLUSTERS)")
    sub.add_parser("chaos", help="inject faults while pods are placed and deleted; check invariants (CHAOS_ROUNDS)")
    sub.add_parser("demo", help="run Admiralty's getting-started scenario on the running environment")
    sub.add_parser("image", help="build the project's image with podman from the Dockerfile (root)")
    compose = sub.add_parser("compose", help="docker-compose.yml on the running environment, through podman")
    compose.add_argument("action", nargs="?", default="up", choices=["up", "down", "healthchecks"])
    sub.add_parser("namespaces", help="thousands of elected pods in thousands of namespaces on the running "
                   "environment, and a probe placed meanwhile (NAMESPACES_COUNT)")
    tools = sub.add_parser("tools", help="build the control-plane tools that are missing")
    tools.add_argument("--force", action="store_true")
    status = sub.add_parser("status", help="show what runs and where")
    status.add_argument("-o", "--output", choices=["table", "json"], default="table")
    args = parser.parse_args(argv)

    if args.command == "bench":
        from .bench import main as bench_main

        return bench_main()
    if args.command == "chaos":
        from .chaos import main as chaos_main

        return chaos_main()
    if args.command == "compose":
        from .compose import main as compose_main

        return compose_main([args.action])
    if args.command == "image":
        from .image import main as image_main

        return image_main()
    if args.command == "namespaces":
        from .namespaces import main as namespaces_main

        return namespaces_main()
    if args.command == "tools":
        build_tools(["--force"] if args.force else [])
        return 0
    env = LocalEnvironment(args.root)
    if args.command == "up":
        clusters = [c.strip() for c in args.clusters.split(",") if c.strip()]
        if not clusters:
            parser.error("--clusters needs at least one cluster name")
        if args.nats_nodes < 1:
            parser.error("--nats-nodes (NATS_NODES) must be at least 1")
        env.up(clusters, nodes=args.nodes, log=lambda m: print(m, flush=True), nats_nodes=args.nats_nodes)
        if not args.no_services:
            config = write_config(env)
            start_services(env, replicas=args.replicas)
            wait_services_ready(env)
            print(f"started watcher, proxy-scheduler, candidate-scheduler, feedback ({args.replicas} each; "
                  f"settings in {config})", flush=True)
        _print_usage(env)
        return 0
    if args.command == "demo":
        return demo.run(env)
    if args.command == "down":
        env.down()
        print(f"local environment in {env.root} stopped")
        return 0
    rows = env.status()
    if args.output == "json":
        print(json.dumps({"root": str(env.root), "processes": rows,
                          "info": json.loads(env.info_path.read_text()) if env.info_path.exists() else None},
                         indent=1))
        return 0
    if not rows:
        print(f"nothing is running from {env.root}")
        return 0
    print(f"{'PROCESS':<30} {'PID':>8} {'STATE':<8} {'RSS MiB':>8}  LOG")
    for row in rows:
        state = "running" if row["running"] else "exited"
        print(f"{row['name']:<30} {row['pid']:>8} {state:<8} {row['rss_mib']:>8}  {row['log']}")
    print(f"total RSS: {env.total_rss_bytes() / 2**20:.0f} MiB")
    if env.info_path.exists():
        _print_usage(env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
