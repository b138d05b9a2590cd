"""The benchmark's arithmetic: percentiles and the CPU split by kind of process."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

from localenv import bench
from localenv.bench import cpu_split, percentiles, pod_manifest


def test_percentiles_pick_observed_values() -> None:
    stats = percentiles([float(v) for v in range(1, 101)])
    assert (stats["p50"], stats["p90"], stats["p99"], stats["max"]) == (51.0, 90.0, 99.0, 100.0)
    assert stats["mean"] == 50.5
    assert percentiles([]) == {}


def test_cpu_split_groups_processes_by_cluster_and_totals() -> None:
    baseline = {"environment_cpu_seconds_per_1000_pods": {"c1-kube-apiserver": 5.0, "c1-etcd": 1.0,
                                                           "c2-kube-apiserver": 0.5, "nats": 0.0},
                "service_cost": {}}
    pipeline = {"environment_cpu_seconds_per_1000_pods": {"c1-kube-apiserver": 8.0, "c1-etcd": 2.0,
                                                           "c2-kube-apiserver": 4.0, "nats": 2.0, "jaeger": 0.5},
                "service_cost": {"svc-watcher-0": {"cpu_seconds_per_1000_pods": 1.5},
                                 "svc-feedback-0": {"cpu_seconds_per_1000_pods": 2.5}}}
    split = cpu_split({"scenarios": {"baseline": baseline, "pipeline": pipeline}})
    assert split["c1 control plane"] == (6.0, 10.0)
    assert split["c2 control plane"] == (0.5, 4.0)
    assert split["nats"] == (0.0, 2.0) and split["jaeger"] == (0.0, 0.5)
    assert split["services"] == (0.0, 4.0)
    assert split["all but the services"] == (6.5, 16.5)
    assert split["total"] == (6.5, 20.5)


def test_only_elected_pods_carry_the_elect_annotation() -> None:
    assert "annotations" not in pod_manifest("p", False, {})["metadata"]
    assert pod_manifest("p", True, {})["metadata"]["annotations"] == {"multicluster.admiralty.io/elect": ""}


def test_stage_scaling_sums_a_stages_processes_and_finds_the_largest_share() -> None:
    def result(costs: dict[str, float], throughput: float = 30.0) -> dict[str, object]:
        return {"throughput_pods_per_s": throughput,
                "service_cost": {name: {"cpu_seconds_per_1000_pods": cpu, "peak_rss_mib": 100.0,
                                        "wakeups_per_pod": 2 * cpu} for name, cpu in costs.items()}}

    others = {"svc-watcher-0": 1.0, "svc-proxy-scheduler-0": 2.0, "svc-candidate-scheduler-0": 3.0}
    results = {"pipeline": result({**others, "svc-feedback-0": 6.0}),
               bench.scaled("feedback", 2): result({**others, "svc-feedback-0": 3.2, "svc-feedback-1": 3.0}),
               bench.scaled("feedback", 3): result({"svc-watcher-0": 1.1, "svc-proxy-scheduler-0": 2.2,
                                                    "svc-candidate-scheduler-0": 3.3, "svc-feedback-0": 2.0,
                                                    "svc-feedback-1": 2.4, "svc-feedback-2": 2.0}, 31.0)}
    stages = bench.stage_scaling(results)
    assert set(stages) == {"feedback"}  # only stages that were run with several processes
    feedback = stages["feedback"]
    assert feedback["1"] == {"processes": 1, "cpu_seconds_per_1000_pods": 6.0, "largest_share": 1.0,
                             "throughput_pods_per_s": 30.0, "wakeups_per_pod": 12.0,
                             "other_stages_cpu_seconds_per_1000_pods": 6.0}
    assert feedback["3"]["wakeups_per_pod"] == 12.8  # the processes' wake-ups add up
    assert feedback["2"]["cpu_seconds_per_1000_pods"] == 6.2 and feedback["2"]["largest_share"] == round(3.2 / 6.2, 3)
    assert feedback["3"]["processes"] == 3 and feedback["3"]["largest_share"] == round(2.4 / 6.4, 3)
    # The stages left at one process, in the same scenario: the machine's speed in that scenario.
    assert feedback["3"]["other_stages_cpu_seconds_per_1000_pods"] == 6.6


def test_a_steady_rate_creates_bare_pods_never_sooner_than_their_turn() -> None:
    created: list[tuple[float, str]] = []

    class Client:
        async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
            created.append((time.monotonic(), body["metadata"]["name"]))
            return body

    scenario = bench.Scenario(cast(Any, None), pods=6, elected=True, rate=50.0)
    started = time.monotonic()
    asyncio.run(scenario._create(cast(Any, Client()), "bench"))
    assert [name for _, name in created] == [f"bare-{i}" for i in range(6)]  # no Deployments
    for i, (when, _) in enumerate(created):
        assert when >= started + i / 50.0 - 0.001, f"pod {i} created before its turn"
