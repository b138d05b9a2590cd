"""mcsctl's rendering of an explanation, whatever its trace in Jaeger holds yet."""

from __future__ import annotations

from typing import Any

from mcsched.cli import NO_ANSWERS_YET, _render


def explanation(answers: list[dict[str, Any]], trace_url: str | None) -> dict[str, Any]:
    return {"pod": "demo/web", "phase": "Running", "decision": "bound to admiralty-c2", "target": "c2",
            "delegate": None, "answers": answers, "why": None, "events": [],
            "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736" if trace_url else None, "trace_url": trace_url}


def test_an_explanation_whose_trace_has_no_answers_yet_says_so() -> None:
    text = _render("explain", explanation([], "http://jaeger/trace/4bf92f3577b34da6a3ce929d0e0e4736"))
    assert f"Targets asked: {NO_ANSWERS_YET}" in text


def test_answers_from_the_trace_are_listed_with_the_chosen_target() -> None:
    answers = [{"target": "c1", "fits": False, "node": None, "score": 0.0, "reason": "insufficient cpu"},
               {"target": "c2", "fits": True, "node": "kwok-0", "score": 71.5, "reason": None}]
    text = _render("explain", explanation(answers, "http://jaeger/trace/4bf92f3577b34da6a3ce929d0e0e4736"))
    assert NO_ANSWERS_YET not in text
    assert "  c1: refused: insufficient cpu" in text and "  c2: fits on kwok-0 (score 71.5)  <- chosen" in text


def test_without_jaeger_nothing_is_said_about_answers() -> None:
    assert "Targets asked" not in _render("explain", explanation([], None))
