"""One round of the chaos suite (libs/localenv/chaos.py) on the test session's environment: every
service, NATS (and its store) and both API servers fail in turn while pods are placed and deleted."""

from __future__ import annotations

import pytest

from localenv import LocalEnvironment
from localenv.chaos import Chaos, passed, restore, table

pytestmark = pytest.mark.e2e


async def test_one_round_of_faults_loses_nothing_and_never_breaks_an_invariant(pipeline: LocalEnvironment) -> None:
    try:
        report = await Chaos(pipeline, lambda m: print(f"[chaos] {m}", flush=True)).run(rounds=1)
    finally:
        await restore(pipeline)
    print(table(report))
    assert report["samples"] > 20, "the invariants were hardly sampled"
    assert report["violations"] == [], report["violations"]
    assert passed(report), table(report)
