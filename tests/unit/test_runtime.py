"""What every service process sets up before it composes itself (mcsched.runtime)."""

from __future__ import annotations

import subprocess
import sys


def test_a_service_process_collects_garbage_rarely_and_never_rescans_what_it_imported() -> None:
    code = ("import gc; from mcsched.runtime import GC_YOUNG_THRESHOLD, tune_garbage_collection; "
            "before = gc.get_freeze_count(); tune_garbage_collection(); "
            "print(before, gc.get_freeze_count(), gc.get_threshold()[0] == GC_YOUNG_THRESHOLD)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, frozen, threshold = run.stdout.split()
    assert before == "0" and int(frozen) > 10_000  # the imports' objects: never traversed again
    assert threshold == "True"
