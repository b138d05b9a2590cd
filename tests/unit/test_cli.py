"""mcsctl's rendering of an explanation, whatever its trace in Jaeger holds yet."""

from __future__ import annotations

import http.server
import threading
from typing import Any

import pytest

from mcsched.cli import NO_ANSWERS_YET, JaegerError, Operator, _render


def explanation(answers: list[dict[str, Any]], trace_url: str | None) -> dict[str, Any]:
    return {"pod": "demo/web", "phase": "Running", "decision": "bound to admiralty-c2", "target": "c2",
            "delegate": None, "answers": answers, "why": None, "events": [], "answers_error": None,
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


def test_an_unreachable_jaeger_is_not_mistaken_for_a_trace_still_on_its_way() -> None:
    result = explanation([], "http://jaeger/trace/4bf92f3577b34da6a3ce929d0e0e4736")
    result["answers_error"] = "Jaeger at http://jaeger cannot be reached: connection refused"
    text = _render("explain", result)
    assert NO_ANSWERS_YET not in text
    assert "Targets asked: unknown (Jaeger at http://jaeger cannot be reached: connection refused)" in text


def test_jaeger_s_answers_are_told_apart_from_its_failures() -> None:
    operator = Operator.__new__(Operator)
    operator.jaeger_url = "http://127.0.0.1:1"  # nothing listens on port 1
    with pytest.raises(JaegerError, match="cannot be reached"):
        operator._answers("4bf92f3577b34da6a3ce929d0e0e4736")
    operator.jaeger_url = None
    assert operator._answers("4bf92f3577b34da6a3ce929d0e0e4736") == ([], None)


def test_a_trace_jaeger_does_not_have_yet_has_no_answers_and_a_server_error_is_one() -> None:
    statuses = {"/api/traces/known-later": 404, "/api/traces/broken": 500}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(statuses[self.path])
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        operator = Operator.__new__(Operator)
        operator.jaeger_url = f"http://127.0.0.1:{server.server_port}"
        assert operator._answers("known-later") == ([], None)
        with pytest.raises(JaegerError, match="answered 500"):
            operator._answers("broken")
    finally:
        server.shutdown()
