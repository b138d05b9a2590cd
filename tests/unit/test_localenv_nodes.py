"""The local environment's nodes (GPU workers) and its extra kwok stage, without starting anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from localenv import tools
from localenv.cluster import ClusterPorts, ClusterSpec, LocalCluster, gpu_workers
from localenv.processes import ProcessTable
from mcsched.placement import Resources, node_allocatable, node_unfit_reasons

WORKERS = ["c1-worker-0", "c1-worker-1", "c1-worker-2"]


def cluster(tmp_path: Path) -> LocalCluster:
    return LocalCluster(ClusterSpec("c1", 0, ClusterPorts(0, 0, 0, 0), 3), tmp_path, ProcessTable(tmp_path))


def test_the_last_worker_gets_gpus_unless_turned_off() -> None:
    assert gpu_workers(WORKERS, {}) == ["c1-worker-2"]
    assert gpu_workers(WORKERS, {"MCS_GPU_NODES": "1"}) == ["c1-worker-2"]
    assert gpu_workers(WORKERS, {"MCS_GPU_NODES": "0"}) == []
    assert gpu_workers(["only"], {}) == ["only"]
    assert gpu_workers([], {}) == []


def test_gpu_worker_manifest_has_gpus_and_the_label(tmp_path: Path) -> None:
    local = cluster(tmp_path)
    gpu = local.node_manifest("c1-worker-2", gpu=True)
    plain = local.node_manifest("c1-worker-0")
    assert gpu["status"]["capacity"]["nvidia.com/gpu"] == "2"
    assert gpu["status"]["allocatable"]["nvidia.com/gpu"] == "2"
    assert gpu["metadata"]["labels"]["nvidia.com/gpu.present"] == "true"
    assert gpu["status"]["allocatable"]["cpu"] == plain["status"]["allocatable"]["cpu"] == "3900m"
    assert "nvidia.com/gpu" not in plain["status"]["capacity"]
    assert "nvidia.com/gpu.present" not in plain["metadata"]["labels"]
    # The module's defaults are never changed in place.
    assert "nvidia.com/gpu" not in local.node_manifest("c1-worker-1")["status"]["allocatable"]
    custom = local.node_manifest("c2-worker-big", {"cpu": "8", "memory": "32Gi", "pods": "110"})
    assert custom["status"]["capacity"] == custom["status"]["allocatable"] == {
        "cpu": "8", "memory": "32Gi", "pods": "110"}


def test_a_gpu_pod_fits_only_the_gpu_worker(tmp_path: Path) -> None:
    local = cluster(tmp_path)
    pod = {"spec": {"containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}
    for name, gpu in (("c1-worker-0", False), ("c1-worker-2", True)):
        node = local.node_manifest(name, gpu=gpu)
        node["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
        expected = [] if gpu else ["insufficient nvidia.com/gpu"]
        assert node_unfit_reasons(pod, node, Resources()) == expected
        assert node_allocatable(node).get("nvidia.com/gpu") == (2 if gpu else 0)


# ---------------------------------------------------------------------------
# The extra kwok stage
# ---------------------------------------------------------------------------


def test_job_delegate_stage_is_a_pod_stage_selecting_running_job_delegates() -> None:
    (path,) = tools.EXTRA_KWOK_STAGES
    (stage,) = list(yaml.safe_load_all(path.read_text()))
    assert stage["apiVersion"] == "kwok.x-k8s.io/v1alpha1" and stage["kind"] == "Stage"
    assert stage["spec"]["resourceRef"] == {"apiGroup": "v1", "kind": "Pod"}
    expressions = {e["key"]: (e["operator"], e.get("values")) for e in stage["spec"]["selector"]["matchExpressions"]}
    assert expressions == {
        ".metadata.deletionTimestamp": ("DoesNotExist", None),
        ".status.phase": ("In", ["Running"]),  # pod-ready only takes Pending pods: the two never meet
        '.metadata.labels["multicluster.admiralty.io/job-name"]': ("Exists", None),
        '.metadata.labels["multicluster.admiralty.io/parent-uid"]': ("Exists", None),
        ".metadata.ownerReferences.[].kind": ("NotIn", ["Job"]),  # Job-owned pods are pod-complete's
    }
    template = stage["spec"]["next"]["statusTemplate"]
    assert "phase: Succeeded" in template and "reason: Completed" in template
    assert "delay" not in stage["spec"] and "weight" not in stage["spec"]


def test_kwok_stages_file_name_changes_with_the_extra_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCS_TOOLS_DIR", str(tmp_path))
    before = tools.kwok_stages_file()
    assert before.parent == tmp_path and before.name.startswith(f"kwok-stages-{tools.KWOK_VERSION}-")
    assert tools.kwok_stages_file() == before  # stable
    extra = tmp_path / "extra.yaml"
    extra.write_text((tools.EXTRA_KWOK_STAGES[0]).read_text() + "\n# changed\n")
    monkeypatch.setattr(tools, "EXTRA_KWOK_STAGES", [extra])
    assert tools.kwok_stages_file() != before


def test_ensure_kwok_stages_appends_ours_to_kwoks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCS_TOOLS_DIR", str(tmp_path / "tools"))
    module = tmp_path / "kwok"
    for rel in tools._KWOK_STAGE_FILES:
        (module / rel).parent.mkdir(parents=True, exist_ok=True)
        stage = {"apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "Stage", "metadata": {"name": Path(rel).stem}}
        (module / rel).write_text(yaml.safe_dump(stage))

    class Downloaded:
        stdout = json.dumps({"Dir": str(module)})

    calls: list[list[str]] = []

    def run(argv: list[str], **_: object) -> Downloaded:
        calls.append(argv)
        return Downloaded()

    monkeypatch.setattr(tools.subprocess, "run", run)
    path = tools.ensure_kwok_stages()
    names = [d["metadata"]["name"] for d in yaml.safe_load_all(path.read_text())]
    assert names == [Path(rel).stem for rel in tools._KWOK_STAGE_FILES] + ["pod-complete-job-delegate"]
    assert tools.ensure_kwok_stages() == path
    assert len(calls) == 1  # written once, then reused
