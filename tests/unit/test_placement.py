"""Unit tests for mcsched.placement: quantities, requests, taints, affinity, filtering and scoring."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from typing import Any

import pytest

from mcsched.placement import (
    NodeChoice,
    Resources,
    choose_node,
    cpu_milli,
    first_fit,
    matches_node_selector,
    memory_bytes,
    node_allocatable,
    node_unfit_reasons,
    parse_quantity,
    pod_requests,
    target_score,
    tolerates,
)

GI = 1024**3
MI = 1024**2
# make_node's nodes offer 90Gi of ephemeral storage: counted like any extended resource.
DISK = (("ephemeral-storage", 90 * GI),)

# ---------------------------------------------------------------------------
# Fixtures (plain dicts, as the API server returns them)
# ---------------------------------------------------------------------------


def container(
    name: str = "c",
    requests: dict[str, str] | None = None,
    limits: dict[str, str] | None = None,
    restart_policy: str | None = None,
) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    if requests is not None:
        resources["requests"] = requests
    if limits is not None:
        resources["limits"] = limits
    c: dict[str, Any] = {"name": name, "image": "busybox", "resources": resources}
    if restart_policy is not None:
        c["restartPolicy"] = restart_policy
    return c


def make_pod(
    cpu: str | None = "100m",
    memory: str | None = "128Mi",
    *,
    containers: list[dict[str, Any]] | None = None,
    init_containers: list[dict[str, Any]] | None = None,
    overhead: dict[str, str] | None = None,
    tolerations: list[dict[str, Any]] | None = None,
    node_selector: dict[str, str] | None = None,
    terms: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    if containers is None:
        requests = {k: v for k, v in (("cpu", cpu), ("memory", memory)) if v is not None}
        containers = [container(requests=requests)]
    spec: dict[str, Any] = {"containers": containers}
    if init_containers is not None:
        spec["initContainers"] = init_containers
    if overhead is not None:
        spec["overhead"] = overhead
    if tolerations is not None:
        spec["tolerations"] = tolerations
    if node_selector is not None:
        spec["nodeSelector"] = node_selector
    if terms is not None:
        spec["affinity"] = {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}
        }
    metadata = {"name": "p", "namespace": "default"}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def make_node(
    name: str,
    cpu: str = "4",
    memory: str = "16Gi",
    pods: str = "110",
    *,
    labels: dict[str, str] | None = None,
    taints: list[dict[str, Any]] | None = None,
    unschedulable: bool = False,
    ready: str | None = "True",
) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if taints is not None:
        spec["taints"] = taints
    if unschedulable:
        spec["unschedulable"] = True
    conditions = [{"type": "MemoryPressure", "status": "False"}]
    if ready is not None:
        conditions.append({"type": "Ready", "status": ready})
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
        "spec": spec,
        "status": {
            "capacity": {"cpu": cpu, "memory": memory, "pods": pods, "ephemeral-storage": "100Gi"},
            "allocatable": {"cpu": cpu, "memory": memory, "pods": pods, "ephemeral-storage": "90Gi"},
            "conditions": conditions,
        },
    }


def expr(key: str, operator: str, *values: str) -> dict[str, Any]:
    e: dict[str, Any] = {"key": key, "operator": operator}
    if values:
        e["values"] = list(values)
    return e


# ---------------------------------------------------------------------------
# Quantities
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100m", Decimal("0.1")),
        ("0.5", Decimal("0.5")),
        ("1", Decimal(1)),
        ("1.5Gi", Decimal(3 * 512 * MI)),
        ("1e3", Decimal(1000)),
        ("1E3", Decimal(1000)),
        ("5e-3", Decimal("0.005")),
        ("32Mi", Decimal(32 * MI)),
        ("128974848", Decimal(128974848)),
        ("129M", Decimal(129_000_000)),
        ("123Ki", Decimal(123 * 1024)),
        ("1k", Decimal(1000)),
        ("2G", Decimal(2 * 10**9)),
        ("1T", Decimal(10**12)),
        ("1P", Decimal(10**15)),
        ("1E", Decimal(10**18)),
        ("1Ti", Decimal(2**40)),
        ("1Pi", Decimal(2**50)),
        ("1Ei", Decimal(2**60)),
        ("250n", Decimal("0.00000025")),
        ("10u", Decimal("0.00001")),
        (".5", Decimal("0.5")),
        ("5.", Decimal(5)),
        ("+2", Decimal(2)),
        ("-1.5", Decimal("-1.5")),
        ("0", Decimal(0)),
    ],
)
def test_parse_quantity_strings(text: str, expected: Decimal) -> None:
    assert parse_quantity(text) == expected


def test_parse_quantity_numbers() -> None:
    assert parse_quantity(3) == Decimal(3)
    assert parse_quantity(0.1) == Decimal("0.1")  # no binary float artefacts
    assert parse_quantity(Decimal("2.5")) == Decimal("2.5")


def test_parse_quantity_is_exact_for_long_numbers() -> None:
    long = "123456789012345678901234567890123"
    assert parse_quantity(long) == Decimal(long)
    assert parse_quantity(long + "Ki") == Decimal(int(long) * 1024)
    assert memory_bytes(long + "Ki") == int(long) * 1024


@pytest.mark.parametrize(
    "bad",
    ["", " ", "abc", "1.2.3", "1Kb", "1ki", "1 Gi", " 1", "1 ", "1e", "1e3Mi", "Gi", "m", "--1", "1e1.5",
     "1x", "1\n", "0x10", "1_000", "nan", "inf", "\uff11"],
)
def test_parse_quantity_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid quantity"):
        parse_quantity(bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), True, None, [1]])
def test_parse_quantity_rejects_bad_types_and_non_finite(bad: Any) -> None:
    with pytest.raises(ValueError, match="invalid quantity"):
        parse_quantity(bad)


def test_parse_quantity_rejects_absurd_exponent() -> None:
    with pytest.raises(ValueError, match="exponent"):
        parse_quantity("1e999999")


def test_parse_quantity_error_message_is_helpful() -> None:
    with pytest.raises(ValueError) as info:
        parse_quantity("12Gb")
    assert "'12Gb'" in str(info.value)
    assert "Gi" in str(info.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("100m", 100), ("0.5", 500), ("1", 1000), ("2.5", 2500), ("1e3", 1_000_000), ("0.0001", 1),
     ("1500u", 2), ("250000n", 1), (2, 2000), ("0", 0)],
)
def test_cpu_milli_rounds_up(value: str | int, expected: int) -> None:
    assert cpu_milli(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("128974848", 128974848), ("129M", 129_000_000), ("123Mi", 123 * MI), ("1.5Gi", 3 * 512 * MI),
     ("1e3", 1000), ("0.5", 1), ("100m", 1), ("15Gi", 15 * GI), (1024, 1024)],
)
def test_memory_bytes_rounds_up(value: str | int, expected: int) -> None:
    assert memory_bytes(value) == expected


# ---------------------------------------------------------------------------
# Resources
# ---------------------------------------------------------------------------


def test_resources_arithmetic() -> None:
    a = Resources(1000, 2 * GI, 3)
    b = Resources(250, GI, 1)
    assert a + b == Resources(1250, 3 * GI, 4)
    assert a - b == Resources(750, GI, 2)
    assert b - a == Resources(-750, -GI, -2)
    assert Resources() + Resources() == Resources(0, 0, 0)


def test_resources_fits_in_checks_every_component() -> None:
    cap = Resources(1000, GI, 10)
    assert Resources(1000, GI, 10).fits_in(cap)
    assert Resources().fits_in(cap)
    assert not Resources(1001, 0, 0).fits_in(cap)
    assert not Resources(0, GI + 1, 0).fits_in(cap)
    assert not Resources(0, 0, 11).fits_in(cap)


def test_resources_from_dict_and_to_dict() -> None:
    r = Resources.from_dict({"cpu": "3900m", "memory": "15Gi", "pods": "110", "ephemeral-storage": "1Gi"})
    assert r == Resources(3900, 15 * GI, 110, (("ephemeral-storage", GI),))
    assert r.to_dict() == {"cpu": "3900m", "memory": "16106127360", "pods": "110", "ephemeral-storage": str(GI)}
    assert Resources(3900, 15 * GI, 110).to_dict() == {"cpu": "3900m", "memory": "16106127360", "pods": "110"}
    assert Resources.from_dict({}) == Resources()
    assert Resources.from_dict({"memory": "1Ki"}) == Resources(0, 1024, 0)
    assert Resources.from_dict(Resources(1, 2, 3).to_dict()) == Resources(1, 2, 3)


def test_resources_from_dict_rejects_malformed() -> None:
    with pytest.raises(ValueError, match="invalid quantity"):
        Resources.from_dict({"cpu": "lots"})


def test_resources_is_frozen() -> None:
    r = Resources(1, 2, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(r, "cpu_milli", 5)  # noqa: B010 - assigning a frozen field on purpose
    assert r.cpu_milli == 1


GPU = "nvidia.com/gpu"


def gpus(count: int) -> Resources:
    return Resources(extended=((GPU, count),))


def test_resources_extended_from_dict_reads_every_counted_name() -> None:
    r = Resources.from_dict({
        "cpu": "1", "nvidia.com/gpu": "2", "example.com/foo": "1k", "hugepages-2Mi": "1Gi",
        "ephemeral-storage": "10Gi", "kubernetes.io/batch-cpu": "3",
        "storage": "5Gi", "attachable": "9", "requests.nvidia.com/gpu": "1",  # not resources of pods or nodes
    })
    assert r.cpu_milli == 1000 and r.memory_bytes == 0 and r.pods == 0
    assert r.extended == (
        ("ephemeral-storage", 10 * GI), ("example.com/foo", 1000), ("hugepages-2Mi", GI),
        ("kubernetes.io/batch-cpu", 3), ("nvidia.com/gpu", 2),
    )
    assert r.get(GPU) == 2 and r.get("cpu") == 1000 and r.get("storage") == 0 and r.get("amd.com/gpu") == 0


@pytest.mark.parametrize(("text", "expected"), [("2", 2), ("2.5", 3), ("1k", 1000), ("100m", 1), ("1e2", 100),
                                                ("0", 0)])
def test_resources_extended_quantity_strings_round_up_to_whole_units(text: str, expected: int) -> None:
    assert Resources.from_dict({GPU: text}).get(GPU) == expected


def test_resources_extended_are_normalised_so_equal_means_equal() -> None:
    assert Resources(extended=(("b.io/x", 1), ("a.io/y", 2), ("c.io/z", 0))) == Resources(
        extended=(("a.io/y", 2), ("b.io/x", 1)))
    assert Resources.from_dict({GPU: "0"}) == Resources()
    assert gpus(2) - gpus(2) == Resources()
    assert hash(gpus(1) + gpus(1)) == hash(gpus(2))


def test_resources_extended_arithmetic() -> None:
    a = Resources(1000, GI, 1, ((GPU, 2), ("example.com/foo", 5)))
    b = Resources(500, 0, 0, ((GPU, 1), ("hugepages-1Gi", GI)))
    assert (a + b).extended == (("example.com/foo", 5), ("hugepages-1Gi", GI), (GPU, 3))
    assert (a - b).extended == (("example.com/foo", 5), ("hugepages-1Gi", -GI), (GPU, 1))
    assert (b - a).extended == (("example.com/foo", -5), ("hugepages-1Gi", GI), (GPU, -1))
    assert (a - b) + b == a
    assert Resources() - gpus(1) == gpus(-1)
    assert sum((gpus(1), gpus(1), Resources(1, 2, 3)), Resources()) == Resources(1, 2, 3, ((GPU, 2),))


def test_resources_extended_max_is_per_name_with_absent_as_zero() -> None:
    a = Resources(100, 0, 0, ((GPU, 2), ("example.com/foo", 1)))
    b = Resources(0, GI, 0, ((GPU, 1), ("hugepages-2Mi", 4 * MI)))
    assert a.max(b) == Resources(100, GI, 0, (("example.com/foo", 1), ("hugepages-2Mi", 4 * MI), (GPU, 2)))
    assert a.max(b) == b.max(a)
    assert gpus(-1).max(Resources()) == Resources()
    assert Resources().max(gpus(3)) == gpus(3)


def test_resources_extended_fits_in() -> None:
    node = Resources(4000, 16 * GI, 110, ((GPU, 2),))
    assert gpus(2).fits_in(node)
    assert not gpus(3).fits_in(node)
    assert not Resources(extended=(("amd.com/gpu", 1),)).fits_in(node)  # the node has none at all
    assert Resources(1000, GI, 1).fits_in(node)
    assert not Resources().fits_in(gpus(-1))  # over-committed: every component counts, absent = 0
    assert Resources().fits_in(Resources())


def test_resources_extended_to_dict_round_trip() -> None:
    r = Resources(3900, 15 * GI, 110, ((GPU, 2), ("hugepages-2Mi", 512 * MI), ("ephemeral-storage", 90 * GI)))
    assert r.to_dict() == {"cpu": "3900m", "memory": str(15 * GI), "pods": "110", "ephemeral-storage": str(90 * GI),
                           "hugepages-2Mi": str(512 * MI), GPU: "2"}
    assert Resources.from_dict(r.to_dict()) == r
    assert Resources.from_dict(gpus(-1).to_dict()) == gpus(-1)
    assert all(isinstance(v, str) for v in r.to_dict().values())


# ---------------------------------------------------------------------------
# Pod requests
# ---------------------------------------------------------------------------


def test_pod_requests_sums_containers() -> None:
    pod = make_pod(containers=[
        container("a", requests={"cpu": "100m", "memory": "64Mi"}),
        container("b", requests={"cpu": "0.25", "memory": "128Mi"}),
    ])
    assert pod_requests(pod) == Resources(350, 192 * MI, 1)


def test_pod_requests_without_any_resources_is_one_pod_slot() -> None:
    pod = make_pod(containers=[{"name": "c", "image": "busybox"}])
    assert pod_requests(pod) == Resources(0, 0, 1)
    assert pod_requests({"spec": {}}) == Resources(0, 0, 1)


def test_pod_requests_limits_only_default_requests() -> None:
    pod = make_pod(containers=[
        container("limits-only", limits={"cpu": "500m", "memory": "1Gi"}),
        container("mixed", requests={"cpu": "100m"}, limits={"cpu": "2", "memory": "256Mi"}),
    ])
    # "mixed": cpu request stays 100m (not the 2-core limit), memory defaults to its limit.
    assert pod_requests(pod) == Resources(600, GI + 256 * MI, 1)


def test_pod_requests_init_container_larger_than_containers_wins() -> None:
    pod = make_pod("100m", "64Mi", init_containers=[
        container("init-big", requests={"cpu": "2", "memory": "32Mi"}),
        container("init-small", requests={"cpu": "50m", "memory": "16Mi"}),
    ])
    # cpu: max(100m, 2000m); memory: max(64Mi, 32Mi).
    assert pod_requests(pod) == Resources(2000, 64 * MI, 1)


def test_pod_requests_init_containers_are_maxed_not_summed() -> None:
    pod = make_pod("0", "0", init_containers=[
        container("i1", requests={"cpu": "1", "memory": "1Gi"}),
        container("i2", requests={"cpu": "1", "memory": "1Gi"}),
    ])
    assert pod_requests(pod) == Resources(1000, GI, 1)


def test_pod_requests_sidecars_are_added() -> None:
    pod = make_pod("1", "1Gi", init_containers=[
        container("sidecar", requests={"cpu": "200m", "memory": "128Mi"}, restart_policy="Always"),
    ])
    assert pod_requests(pod) == Resources(1200, GI + 128 * MI, 1)


def test_pod_requests_init_after_sidecar_runs_next_to_it() -> None:
    pod = make_pod("100m", "64Mi", init_containers=[
        container("sidecar", requests={"cpu": "200m", "memory": "64Mi"}, restart_policy="Always"),
        container("migrate", requests={"cpu": "1", "memory": "32Mi"}),
    ])
    # Regular phase: 100m + 200m = 300m, 128Mi. Init peak: migrate (1000m) + sidecar (200m) = 1200m, 96Mi.
    assert pod_requests(pod) == Resources(1200, 128 * MI, 1)


def test_pod_requests_init_before_sidecar_does_not_include_it() -> None:
    pod = make_pod("100m", "64Mi", init_containers=[
        container("migrate", requests={"cpu": "1", "memory": "32Mi"}),
        container("sidecar", requests={"cpu": "200m", "memory": "64Mi"}, restart_policy="Always"),
    ])
    assert pod_requests(pod) == Resources(1000, 128 * MI, 1)


def test_pod_requests_non_always_restart_policy_is_a_plain_init_container() -> None:
    pod = make_pod("1", "1Gi", init_containers=[
        container("init", requests={"cpu": "500m", "memory": "128Mi"}, restart_policy="Never"),
    ])
    assert pod_requests(pod) == Resources(1000, GI, 1)


def test_pod_requests_adds_overhead_on_top() -> None:
    pod = make_pod("1", "1Gi", init_containers=[container("i", requests={"cpu": "3", "memory": "2Gi"})],
                   overhead={"cpu": "250m", "memory": "120Mi"})
    assert pod_requests(pod) == Resources(3250, 2 * GI + 120 * MI, 1)


def test_pod_requests_extended_limits_only_stand_for_requests() -> None:
    pod = make_pod(containers=[container(limits={"cpu": "1", GPU: "1"})])
    assert pod_requests(pod) == Resources(1000, 0, 1, ((GPU, 1),))


def test_pod_requests_extended_request_wins_over_limit_and_containers_add_up() -> None:
    pod = make_pod(containers=[
        container("a", requests={GPU: "1"}, limits={GPU: "2"}),  # invalid for the API server; the request wins
        container("b", limits={GPU: "2", "example.com/foo": "3"}),
        container("c", requests={"hugepages-2Mi": "64Mi", "ephemeral-storage": "1Gi"}),
    ])
    assert pod_requests(pod).extended == (
        ("ephemeral-storage", GI), ("example.com/foo", 3), ("hugepages-2Mi", 64 * MI), (GPU, 3))


def test_pod_requests_extended_init_containers_are_maxed_and_sidecars_added() -> None:
    pod = make_pod("100m", "64Mi", containers=[container("main", limits={GPU: "1"})], init_containers=[
        container("init-gpu", limits={GPU: "4"}),  # alone: 4 GPUs
        container("sidecar", limits={GPU: "1"}, restart_policy="Always"),
        container("init-after", limits={GPU: "2"}),  # next to the sidecar: 3 GPUs
    ])
    # Regular phase: main (1) + sidecar (1) = 2; init peak: max(4, 1, 2 + 1) = 4.
    assert pod_requests(pod).get(GPU) == 4
    pod["spec"]["initContainers"][0]["resources"]["limits"][GPU] = "1"
    assert pod_requests(pod).get(GPU) == 3  # the init container after the sidecar is now the peak


def test_pod_requests_extended_init_only_resource_counts() -> None:
    pod = make_pod(init_containers=[container("init", limits={"example.com/dongle": "1"})])
    assert pod_requests(pod).get("example.com/dongle") == 1


def test_pod_requests_extended_overhead_and_ignored_names() -> None:
    pod = make_pod(None, None, containers=[container(requests={"pods": "5", "storage": "1Gi", GPU: "1"})],
                   overhead={"cpu": "250m", "ephemeral-storage": "1Gi", "pods": "3"})
    assert pod_requests(pod) == Resources(250, 0, 1, ((GPU, 1), ("ephemeral-storage", GI)))


# ---------------------------------------------------------------------------
# Node allocatable
# ---------------------------------------------------------------------------


def test_node_allocatable_prefers_allocatable() -> None:
    node = make_node("n1", cpu="3900m", memory="15Gi")
    node["status"]["capacity"] = {"cpu": "4", "memory": "16Gi", "pods": "110"}
    assert node_allocatable(node) == Resources(3900, 15 * GI, 110, DISK)


def test_node_allocatable_falls_back_to_capacity() -> None:
    node = make_node("n1")
    del node["status"]["allocatable"]
    node["status"]["capacity"] = {"cpu": "8", "memory": "32Gi", "pods": "250"}
    assert node_allocatable(node) == Resources(8000, 32 * GI, 250)
    node["status"]["allocatable"] = {"cpu": "7"}
    assert node_allocatable(node) == Resources(7000, 32 * GI, 250)
    assert node_allocatable({"metadata": {"name": "bare"}}) == Resources()


def test_node_allocatable_extended_from_allocatable_or_capacity() -> None:
    node = make_node("gpu-node")
    node["status"]["capacity"][GPU] = "4"
    node["status"]["allocatable"][GPU] = "2"
    node["status"]["capacity"]["hugepages-1Gi"] = "2Gi"  # only in capacity: taken from there
    node["status"]["allocatable"]["hugepages-2Mi"] = "0"
    assert node_allocatable(node) == Resources(4000, 16 * GI, 110, (*DISK, (GPU, 2), ("hugepages-1Gi", 2 * GI)))


# ---------------------------------------------------------------------------
# Tolerations
# ---------------------------------------------------------------------------

TAINT = {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}


@pytest.mark.parametrize(
    ("toleration", "expected"),
    [
        ({"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}, True),
        ({"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}, True),  # Equal is the default
        ({"key": "dedicated", "value": "gpu"}, True),  # empty effect tolerates every effect
        ({"key": "dedicated", "value": "cpu", "effect": "NoSchedule"}, False),
        ({"key": "dedicated", "effect": "NoSchedule"}, False),  # Equal with empty value vs "gpu"
        ({"key": "dedicated", "operator": "Exists"}, True),
        ({"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}, True),
        ({"key": "dedicated", "operator": "Exists", "effect": "NoExecute"}, False),
        ({"key": "other", "operator": "Exists"}, False),
        ({"operator": "Exists"}, True),  # empty key + Exists tolerates everything
        ({"key": "", "operator": "Exists", "effect": "NoSchedule"}, True),
        ({"operator": "Exists", "effect": "PreferNoSchedule"}, False),
        ({"key": "dedicated", "operator": "Bogus", "value": "gpu"}, False),
    ],
)
def test_tolerates(toleration: dict[str, Any], expected: bool) -> None:
    assert tolerates([toleration], TAINT) is expected


def test_tolerates_any_of_several_and_none() -> None:
    assert not tolerates([], TAINT)
    assert tolerates([{"key": "x", "operator": "Exists"}, {"key": "dedicated", "operator": "Exists"}], TAINT)
    assert not tolerates([{"key": "x", "operator": "Exists"}, {"key": "y", "operator": "Exists"}], TAINT)


def test_tolerates_taint_without_value() -> None:
    taint = {"key": "virtual-kubelet.io/provider", "effect": "NoSchedule"}
    assert tolerates([{"key": "virtual-kubelet.io/provider", "operator": "Equal", "value": ""}], taint)
    assert tolerates([{"key": "virtual-kubelet.io/provider", "operator": "Exists"}], taint)
    assert not tolerates([{"key": "virtual-kubelet.io/provider", "value": "admiralty"}], taint)


# ---------------------------------------------------------------------------
# Node selector and required node affinity
# ---------------------------------------------------------------------------

LABELED = make_node("node-a", labels={"zone": "eu-1", "disk": "ssd", "cores": "16"})


def test_no_selector_matches_any_node() -> None:
    assert matches_node_selector(make_pod(), LABELED)
    assert matches_node_selector(make_pod(), {"metadata": {"name": "unlabeled"}})


def test_node_selector_requires_all_labels() -> None:
    assert matches_node_selector(make_pod(node_selector={"zone": "eu-1", "disk": "ssd"}), LABELED)
    assert not matches_node_selector(make_pod(node_selector={"zone": "eu-1", "disk": "hdd"}), LABELED)
    assert not matches_node_selector(make_pod(node_selector={"gpu": "true"}), LABELED)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        (expr("zone", "In", "eu-1", "eu-2"), True),
        (expr("zone", "In", "us-1"), False),
        (expr("missing", "In", "x"), False),
        (expr("zone", "In"), False),  # In needs values
        (expr("zone", "NotIn", "us-1"), True),
        (expr("zone", "NotIn", "eu-1"), False),
        (expr("missing", "NotIn", "x"), True),  # absent label is "not in"
        (expr("disk", "Exists"), True),
        (expr("gpu", "Exists"), False),
        (expr("gpu", "DoesNotExist"), True),
        (expr("disk", "DoesNotExist"), False),
        (expr("cores", "Gt", "8"), True),
        (expr("cores", "Gt", "16"), False),
        (expr("cores", "Lt", "32"), True),
        (expr("cores", "Lt", "16"), False),
        (expr("zone", "Gt", "1"), False),  # non-integer label
        (expr("cores", "Gt", "eight"), False),  # non-integer bound
        (expr("cores", "Gt", "1", "2"), False),  # exactly one value
        (expr("missing", "Lt", "100"), False),
        (expr("zone", "Like", "eu-1"), False),  # unknown operator
    ],
)
def test_affinity_match_expression_operators(expression: dict[str, Any], expected: bool) -> None:
    pod = make_pod(terms=[{"matchExpressions": [expression]}])
    assert matches_node_selector(pod, LABELED) is expected


def test_affinity_expressions_are_anded_terms_ored() -> None:
    both = {"matchExpressions": [expr("zone", "In", "eu-1"), expr("disk", "In", "ssd")]}
    one_wrong = {"matchExpressions": [expr("zone", "In", "eu-1"), expr("disk", "In", "hdd")]}
    wrong = {"matchExpressions": [expr("zone", "In", "us-1")]}
    assert matches_node_selector(make_pod(terms=[both]), LABELED)
    assert not matches_node_selector(make_pod(terms=[one_wrong]), LABELED)
    assert matches_node_selector(make_pod(terms=[wrong, both]), LABELED)
    assert not matches_node_selector(make_pod(terms=[wrong, one_wrong]), LABELED)


def test_affinity_empty_terms_match_nothing() -> None:
    assert not matches_node_selector(make_pod(terms=[]), LABELED)
    assert not matches_node_selector(make_pod(terms=[{}]), LABELED)
    assert not matches_node_selector(make_pod(terms=[{"matchExpressions": []}]), LABELED)


def test_affinity_match_fields_on_node_name() -> None:
    def fields(operator: str, *values: str) -> dict[str, Any]:
        return {"matchFields": [{"key": "metadata.name", "operator": operator, "values": list(values)}]}

    assert matches_node_selector(make_pod(terms=[fields("In", "node-a")]), LABELED)
    assert not matches_node_selector(make_pod(terms=[fields("In", "node-b")]), LABELED)
    assert matches_node_selector(make_pod(terms=[fields("NotIn", "node-b")]), LABELED)
    assert not matches_node_selector(make_pod(terms=[fields("NotIn", "node-a")]), LABELED)
    assert not matches_node_selector(make_pod(terms=[fields("Exists")]), LABELED)
    bad_key = {"matchFields": [{"key": "metadata.uid", "operator": "In", "values": ["node-a"]}]}
    assert not matches_node_selector(make_pod(terms=[bad_key]), LABELED)


def test_affinity_fields_and_expressions_are_anded() -> None:
    term = {
        "matchExpressions": [expr("zone", "In", "eu-1")],
        "matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-a"]}],
    }
    assert matches_node_selector(make_pod(terms=[term]), LABELED)
    term["matchExpressions"] = [expr("zone", "In", "us-1")]
    assert not matches_node_selector(make_pod(terms=[term]), LABELED)


def test_node_selector_and_affinity_must_both_match() -> None:
    term = {"matchExpressions": [expr("zone", "In", "eu-1")]}
    assert matches_node_selector(make_pod(node_selector={"disk": "ssd"}, terms=[term]), LABELED)
    assert not matches_node_selector(make_pod(node_selector={"disk": "hdd"}, terms=[term]), LABELED)


# ---------------------------------------------------------------------------
# Unfit reasons
# ---------------------------------------------------------------------------


def test_fitting_node_has_no_reasons() -> None:
    assert node_unfit_reasons(make_pod(), make_node("n1"), Resources()) == []


def test_unschedulable_node() -> None:
    node = make_node("n1", unschedulable=True)
    assert node_unfit_reasons(make_pod(), node, Resources()) == ["node is unschedulable"]
    tolerant = make_pod(tolerations=[{"key": "node.kubernetes.io/unschedulable", "operator": "Exists",
                                      "effect": "NoSchedule"}])
    assert node_unfit_reasons(tolerant, node, Resources()) == []


@pytest.mark.parametrize("ready", ["False", "Unknown", None])
def test_not_ready_node(ready: str | None) -> None:
    node = make_node("n1", ready=ready)
    assert node_unfit_reasons(make_pod(), node, Resources()) == ["node is not Ready"]


def test_untolerated_taints() -> None:
    node = make_node("n1", taints=[
        {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"},
        {"key": "evict", "value": "now", "effect": "NoExecute"},
        {"key": "soft", "value": "x", "effect": "PreferNoSchedule"},  # ignored
        {"key": "virtual-kubelet.io/provider", "effect": "NoSchedule"},
    ])
    assert node_unfit_reasons(make_pod(), node, Resources()) == [
        "untolerated taint dedicated=gpu:NoSchedule",
        "untolerated taint evict=now:NoExecute",
        "untolerated taint virtual-kubelet.io/provider:NoSchedule",
    ]
    pod = make_pod(tolerations=[{"key": "dedicated", "value": "gpu"}, {"key": "evict", "operator": "Exists"}])
    assert node_unfit_reasons(pod, node, Resources()) == [
        "untolerated taint virtual-kubelet.io/provider:NoSchedule"
    ]
    assert node_unfit_reasons(make_pod(tolerations=[{"operator": "Exists"}]), node, Resources()) == []


def test_selector_mismatch_reason() -> None:
    pod = make_pod(node_selector={"zone": "us-1"})
    node = make_node("n1", labels={"zone": "eu-1"})
    assert node_unfit_reasons(pod, node, Resources()) == ["node selector/affinity mismatch"]


def test_insufficient_cpu_memory_and_pods() -> None:
    node = make_node("n1", cpu="2", memory="4Gi", pods="10")
    assert node_unfit_reasons(make_pod("2", "4Gi"), node, Resources()) == []  # exactly fills the node
    assert node_unfit_reasons(make_pod("2001m", "1Gi"), node, Resources()) == ["insufficient cpu"]
    assert node_unfit_reasons(make_pod("1", "1Gi"), node, Resources(1500, 0, 0)) == ["insufficient cpu"]
    assert node_unfit_reasons(make_pod("1", "2Gi"), node, Resources(0, 3 * GI, 0)) == ["insufficient memory"]
    assert node_unfit_reasons(make_pod("1", "1Gi"), node, Resources(0, 0, 9)) == []
    assert node_unfit_reasons(make_pod("1", "1Gi"), node, Resources(0, 0, 10)) == ["too many pods"]


def test_zero_request_fits_on_overcommitted_node() -> None:
    node = make_node("n1", cpu="1", memory="1Gi")
    overcommitted = Resources(2000, 2 * GI, 5)
    assert node_unfit_reasons(make_pod(None, None), node, overcommitted) == []
    assert node_unfit_reasons(make_pod("1m", None), node, overcommitted) == ["insufficient cpu"]


def test_all_reasons_at_once_in_order() -> None:
    node = make_node("n1", cpu="1", memory="1Gi", pods="1", unschedulable=True, ready="False",
                     taints=[{"key": "k", "value": "v", "effect": "NoExecute"}])
    pod = make_pod("2", "2Gi", node_selector={"zone": "eu-1"})
    assert node_unfit_reasons(pod, node, Resources(0, 0, 1)) == [
        "node is unschedulable",
        "node is not Ready",
        "untolerated taint k=v:NoExecute",
        "node selector/affinity mismatch",
        "insufficient cpu",
        "insufficient memory",
        "too many pods",
    ]


def gpu_node(name: str, count: str = "2", **kwargs: Any) -> dict[str, Any]:
    node = make_node(name, **kwargs)
    for key in ("capacity", "allocatable"):
        node["status"][key][GPU] = count
    return node


def gpu_pod(count: str = "1", **kwargs: Any) -> dict[str, Any]:
    return make_pod(containers=[container(requests={"cpu": "100m"}, limits={"cpu": "100m", GPU: count})], **kwargs)


def test_extended_resource_fits_and_is_insufficient_when_used() -> None:
    node = gpu_node("g1")
    assert node_unfit_reasons(gpu_pod("2"), node, Resources()) == []
    assert node_unfit_reasons(gpu_pod("3"), node, Resources()) == [f"insufficient {GPU}"]
    assert node_unfit_reasons(gpu_pod("1"), node, gpus(1)) == []
    assert node_unfit_reasons(gpu_pod("1"), node, gpus(2)) == [f"insufficient {GPU}"]
    assert node_unfit_reasons(make_pod(), node, gpus(2)) == []  # no GPU asked: a busy GPU does not matter


def test_node_lacking_an_extended_resource_does_not_fit_a_pod_asking_for_it() -> None:
    assert node_unfit_reasons(gpu_pod("1"), make_node("plain"), Resources()) == [f"insufficient {GPU}"]
    assert node_unfit_reasons(gpu_pod("1"), gpu_node("zero", "0"), Resources()) == [f"insufficient {GPU}"]
    # A zero request is no request, as in kube-scheduler.
    assert node_unfit_reasons(gpu_pod("0"), make_node("plain"), Resources()) == []


def test_extended_reasons_come_after_memory_sorted_by_name_and_before_pods() -> None:
    pod = make_pod(containers=[container(requests={"cpu": "8", "memory": "1Ti", "hugepages-2Mi": "2Mi",
                                                   "ephemeral-storage": "1Ti"}, limits={GPU: "1"})])
    node = make_node("n1", pods="1")
    assert node_unfit_reasons(pod, node, Resources(0, 0, 1)) == [
        "insufficient cpu", "insufficient memory", "insufficient ephemeral-storage",
        "insufficient hugepages-2Mi", f"insufficient {GPU}", "too many pods",
    ]


def test_node_unfit_reasons_uses_given_allocatable() -> None:
    node = make_node("n1")
    assert node_unfit_reasons(gpu_pod(), node, Resources(), allocatable=node_allocatable(node) + gpus(1)) == []


# ---------------------------------------------------------------------------
# choose_node
# ---------------------------------------------------------------------------


def test_choose_node_picks_least_allocated() -> None:
    nodes = [make_node("n1"), make_node("n2"), make_node("n3")]
    used = {
        "n1": Resources(3000, 8 * GI, 5),
        "n2": Resources(1000, 4 * GI, 2),
        "n3": Resources(2000, 2 * GI, 1),
    }
    choice = choose_node(make_pod("1", "4Gi"), nodes, used)
    assert choice.node == "n2"
    assert choice.free_after == Resources(2000, 8 * GI, 107, DISK)
    assert choice.score == pytest.approx((2000 / 4000 + 8 / 16) / 2 * 100)
    assert choice.reason == ""
    # n3 scores (1000/4000 + 10/16) / 2 * 100 = 43.75 < 50 for n2.


def test_choose_node_accounts_for_allocatable_size() -> None:
    small, big = make_node("small", cpu="2", memory="4Gi"), make_node("big", cpu="16", memory="64Gi")
    choice = choose_node(make_pod("1", "2Gi"), [small, big], {})
    assert choice.node == "big"
    assert choice.score == pytest.approx((15 / 16 + 62 / 64) / 2 * 100)


def test_choose_node_empty_node_with_zero_request_scores_100() -> None:
    choice = choose_node(make_pod(None, None), [make_node("n1")], {})
    assert choice == NodeChoice(node="n1", free_after=Resources(4000, 16 * GI, 109, DISK), score=100.0, reason="")


def test_choose_node_tie_breaks_on_smallest_name_regardless_of_order() -> None:
    nodes = [make_node("node-c"), make_node("node-a"), make_node("node-b")]
    assert choose_node(make_pod(), nodes, {}).node == "node-a"
    assert choose_node(make_pod(), list(reversed(nodes)), {}).node == "node-a"


def test_choose_node_skips_unfit_nodes() -> None:
    nodes = [
        make_node("a-cordoned", unschedulable=True),
        make_node("b-tainted", taints=[{"key": "k", "value": "v", "effect": "NoSchedule"}]),
        make_node("c-ok", cpu="1", memory="1Gi"),
    ]
    choice = choose_node(make_pod(), nodes, {})
    assert choice.node == "c-ok"
    assert choice.free_after == Resources(900, GI - 128 * MI, 109, DISK)


def test_choose_node_used_defaults_to_empty() -> None:
    nodes = [make_node("n1", cpu="2"), make_node("n2", cpu="2")]
    choice = choose_node(make_pod("1", "1Gi"), nodes, {"n1": Resources(500, 0, 1)})
    assert choice.node == "n2"
    assert choice.free_after == Resources(1000, 15 * GI, 109, DISK)


def test_choose_node_summary_when_nothing_fits() -> None:
    nodes = [
        make_node("n1", cpu="1"),
        make_node("n2", cpu="1"),
        make_node("n3", unschedulable=True),
    ]
    choice = choose_node(make_pod("2", "1Gi"), nodes, {})
    assert choice == NodeChoice(
        node=None, free_after=Resources(), score=0.0,
        reason="0/3 nodes fit: 2 insufficient cpu, 1 node is unschedulable",
    )


def test_choose_node_summary_counts_every_reason_and_sorts_ties_by_text() -> None:
    nodes = [
        make_node("n1", cpu="1", memory="1Gi"),  # insufficient cpu + memory
        make_node("n2", ready="False"),
        make_node("n3", cpu="1", taints=[{"key": "k", "effect": "NoExecute"}]),  # cpu + taint
    ]
    choice = choose_node(make_pod("2", "2Gi"), nodes, {})
    assert choice.node is None
    assert choice.reason == (
        "0/3 nodes fit: 2 insufficient cpu, 1 insufficient memory, 1 node is not Ready, "
        "1 untolerated taint k:NoExecute"
    )


def test_choose_node_without_nodes() -> None:
    choice = choose_node(make_pod(), [], {})
    assert choice.node is None
    assert choice.score == 0.0
    assert choice.free_after == Resources()
    assert choice.reason.startswith("0/0 nodes fit")


def test_choose_node_sends_gpu_pods_to_gpu_nodes_only() -> None:
    nodes = [make_node("a-plain"), gpu_node("b-gpu"), gpu_node("c-gpu")]
    used = {"b-gpu": Resources(100, 0, 1, ((GPU, 1),))}
    choice = choose_node(gpu_pod("1"), nodes, used)
    assert choice.node == "c-gpu"  # b-gpu has one GPU left, but c-gpu has more cpu free
    assert choice.free_after.get(GPU) == 1
    choice = choose_node(gpu_pod("2"), nodes, used)
    assert choice.node == "c-gpu"
    assert choice.free_after.get(GPU) == 0
    choice = choose_node(gpu_pod("3"), nodes, used)
    assert choice.node is None
    assert choice.reason == f"0/3 nodes fit: 3 insufficient {GPU}"
    # A pod without GPUs still goes anywhere, GPU nodes included.
    assert choose_node(make_pod(), [gpu_node("gpu")], {}).node == "gpu"


# ---------------------------------------------------------------------------
# target_score
# ---------------------------------------------------------------------------


def test_target_score_mean_of_free_ratios() -> None:
    total = Resources(10_000, 40 * GI, 330)
    assert target_score(Resources(5000, 10 * GI, 100), total) == pytest.approx((0.5 + 0.25) / 2 * 100)
    assert target_score(total, total) == pytest.approx(100.0)
    assert target_score(Resources(), total) == 0.0


def test_target_score_prefers_more_free_capacity() -> None:
    total = Resources(8000, 32 * GI, 110)
    roomy = target_score(Resources(6000, 24 * GI, 50), total)
    tight = target_score(Resources(2000, 8 * GI, 50), total)
    assert 0.0 < tight < roomy < 100.0


def test_target_score_zero_totals() -> None:
    assert target_score(Resources(1000, GI, 1), Resources()) == 0.0
    # Only memory known: cpu ratio counts as 0.
    assert target_score(Resources(0, GI, 0), Resources(0, 2 * GI, 0)) == pytest.approx(25.0)


def test_target_score_is_bounded() -> None:
    total = Resources(1000, GI, 10)
    assert target_score(Resources(-500, -GI, 0), total) == 0.0
    assert target_score(Resources(5000, 5 * GI, 0), total) == 100.0


def test_first_fit_finds_a_fitting_node_from_where_it_left_off_and_explains_when_none_fits() -> None:
    pod = make_pod(cpu="500m", memory=None)
    nodes = [make_node("full", cpu="100m"), make_node("a", cpu="1"), make_node("b", cpu="1")]
    choice, index = first_fit(pod, nodes, {}, start=0)
    assert (choice.node, index) == ("a", 1) and choice.free_after.cpu_milli == 500
    choice, index = first_fit(pod, nodes, {}, start=2)
    assert (choice.node, index) == ("b", 2)
    used = {"a": Resources(cpu_milli=800), "b": Resources(cpu_milli=800)}
    choice, index = first_fit(pod, nodes, used, start=2)  # round the list, none fits: choose_node's summary
    assert choice.node is None and choice.reason == choose_node(pod, nodes, used).reason
    assert choice.reason.startswith("0/3 nodes fit")
