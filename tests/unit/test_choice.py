"""The placement record on a proxy and the draw of a target (mcsched.choice)."""

from __future__ import annotations

from collections import Counter

from mcsched.choice import Placement, Rejection, choice_reason, pick_target
from mcsched.constants import PLACEMENT_ANNOTATION


def test_empty_and_unreadable_records() -> None:
    assert Placement.parse(None) == Placement() and Placement.parse("") == Placement()
    assert Placement.parse("not json") == Placement()
    assert Placement.parse('{"round": "x"}') == Placement()
    assert Placement.parse("[1, 2]") == Placement()
    assert Placement.of({"metadata": {}}) == Placement()


def test_round_trip_through_the_annotation() -> None:
    record = Placement().choose("c2").reject("c2", "0/3 nodes are available", 100.0).choose("c1")
    pod = {"metadata": {"annotations": {PLACEMENT_ANNOTATION: record.annotation()}}}
    assert Placement.of(pod) == record
    assert record.target == "c1" and record.round == 2
    assert record.rejections == {"c2": Rejection("0/3 nodes are available", 100.0)}


def test_a_refusal_frees_the_pod_only_from_the_refusing_target() -> None:
    chosen = Placement().choose("c2")
    assert chosen.reject("c2", "no", 1.0).target is None
    assert chosen.reject("c1", "no", 1.0).target == "c2", "a late refusal from another target changes no choice"
    assert chosen.reject("c2", "no", 1.0).round == chosen.round, "the next choice makes the new round"


def test_recent_rejections_expire() -> None:
    record = Placement().reject("c1", "full", 100.0).reject("c2", "taint", 125.0)
    assert record.recent_rejections(now=126.0, memory_seconds=30) == {"c1": "full", "c2": "taint"}
    assert record.recent_rejections(now=131.0, memory_seconds=30) == {"c2": "taint"}
    assert record.recent_rejections(now=200.0, memory_seconds=30) == {}


def test_patch_is_guarded_by_the_resource_version() -> None:
    patch = Placement().choose("c1").patch("42")
    assert patch["metadata"]["resourceVersion"] == "42"
    assert PLACEMENT_ANNOTATION in patch["metadata"]["annotations"]
    assert "resourceVersion" not in Placement().patch(None)["metadata"]


def test_pick_target_is_stable_per_pod_and_spreads_by_room() -> None:
    scores = {"c1": 25.0, "c2": 75.0}
    assert pick_target("uid-1", scores) == pick_target("uid-1", dict(reversed(scores.items())))
    picks = Counter(pick_target(f"uid-{i}", scores) for i in range(4000))
    assert 0.2 < picks["c1"] / 4000 < 0.3, picks
    assert pick_target("u", {}) is None
    assert pick_target("u", {"c1": 0.0}) == "c1", "a target with nothing to spare still fits"
    full = Counter(pick_target(f"u{i}", {"c1": 0.0, "c2": 90.0}) for i in range(1000))
    assert full["c1"] < 10, full


def test_a_premature_refusal_is_taken_back() -> None:
    chosen = Placement().reject("c1", "full", 1.0).choose("c2")
    refused = chosen.reject("c2", "no node", 2.0)
    assert refused.take_back("c2") == chosen


def test_the_round_a_delegate_was_made_for() -> None:
    from mcsched.choice import delegate_round
    from mcsched.constants import PLACEMENT_ROUND_ANNOTATION

    assert delegate_round({"metadata": {"annotations": {PLACEMENT_ROUND_ANNOTATION: "2"}}}) == 2
    assert delegate_round({"metadata": {}}) is None
    assert delegate_round({"metadata": {"annotations": {PLACEMENT_ROUND_ANNOTATION: "x"}}}) is None


def test_the_reason_a_cluster_won_names_what_narrowed_the_choice() -> None:
    assert choice_reason(["c2"], [], "c2") == "the only cluster that fits"
    assert choice_reason(["c1", "c2"], [("preferred node affinity", ["c1", "c2"])], "c1") == \
        "drawn among c1, c2 in proportion to the room each has left"
    assert choice_reason(["c1", "c2", "c3"], [("preferred node affinity", ["c1", "c3"]),
                                              ("topology spread", ["c1", "c3"]), ("cluster weights", ["c3"])], "c3") \
        == "preferred node affinity kept c1, c3; cluster weights kept c3"
