"""How a service sends its spans (mcsched.telemetry)."""

from __future__ import annotations

import os
import subprocess
import sys

# In a child interpreter: the tracer provider is process-wide.
PRINT_SCHEDULE = (
    "from mcsched.telemetry import setup_tracing; "
    "provider = setup_tracing('test', '127.0.0.1:1'); "
    "[processor] = provider._active_span_processor._span_processors; "
    "print(processor._batch_processor._schedule_delay, processor._batch_processor._max_export_batch_size); "
    "provider.shutdown()")


def schedule(**environment: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_BSP_")} | environment
    run = subprocess.run([sys.executable, "-c", PRINT_SCHEDULE], capture_output=True, text=True, check=True,
                         env=env, timeout=60)
    return run.stdout.split()


def test_spans_go_in_the_sdk_s_batches_unless_the_standard_variables_say_otherwise() -> None:
    # Every 5 s or 512 spans: each export wakes a thread and makes a gRPC call in every process.
    assert schedule() == ["5.0", "512"]
    assert schedule(OTEL_BSP_SCHEDULE_DELAY="1500", OTEL_BSP_MAX_EXPORT_BATCH_SIZE="64") == ["1.5", "64"]
