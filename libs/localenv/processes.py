"""Start, record and stop the local environment's background processes.

Every process runs in its own session with its output in ``logs/<name>.log``.
Its PID, command line and start time are recorded in ``processes.json`` so
``down`` can stop exactly what ``up`` started: a recorded PID is only signalled
while ``/proc/<pid>`` still shows the same process (PIDs get reused).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ProcessRecord:
    name: str
    pid: int
    argv: list[str]
    start_ticks: int
    log: str
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. the ports a service listens on

    def alive(self) -> bool:
        return _start_ticks(self.pid) == self.start_ticks

    def rss_bytes(self) -> int:
        """Resident memory, 0 once the process is gone."""
        try:
            fields = Path(f"/proc/{self.pid}/statm").read_text().split()
        except OSError:
            return 0
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE") if self.alive() else 0


def _start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if it is not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie has exited already
        return None
    return int(fields[19])


class ProcessTable:
    """The processes of one environment directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "processes.json"
        self.logs = root / "logs"

    def load(self) -> list[ProcessRecord]:
        if not self.path.exists():
            return []
        return [ProcessRecord(**r) for r in json.loads(self.path.read_text())]

    def _save(self, records: list[ProcessRecord]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps([asdict(r) for r in records], indent=1))
        os.replace(tmp, self.path)

    def get(self, name: str) -> ProcessRecord | None:
        return next((r for r in self.load() if r.name == name), None)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              cwd: Path | None = None, meta: dict[str, Any] | None = None) -> ProcessRecord:
        """Start ``argv`` in the background and record it under ``name``."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=env, cwd=cwd,
            )
        ticks = None
        for _ in range(50):
            ticks = _start_ticks(proc.pid)
            if ticks is not None:
                break
            time.sleep(0.01)
        record = ProcessRecord(name, proc.pid, argv, ticks or 0, str(log_path), meta or {})
        records = [r for r in self.load() if r.name != name]
        self._save([*records, record])
        return record

    def stop(self, name: str, timeout: float = 10.0, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop one process: ``sig`` first, SIGKILL after ``timeout`` seconds."""
        record = self.get(name)
        if record is not None:
            _terminate([record], timeout, sig)
            self._save([r for r in self.load() if r.name != name])

    def stop_all(self, timeout: float = 15.0) -> None:
        """Stop every recorded process, the services first, and forget them.

        Then stop any server still running on this environment's files (its
        command line names them) that the table lost track of,
        so an interrupted start never leaves servers behind. Only PIDs are used.
        """
        records = list(reversed(self.load()))
        # Clients first (the services drain their NATS connection on the way out), then the servers.
        _terminate([r for r in records if r.name.startswith("svc-")], timeout)
        _terminate([r for r in records if not r.name.startswith("svc-")], timeout)
        _terminate(self._strays(), timeout)
        if self.path.exists():
            self.path.unlink()

    def _strays(self) -> list[ProcessRecord]:
        root = str(self.root.resolve())
        # Paths only this environment's servers name (nested environments, such as
        # .local/test inside .local, have paths of their own and are left alone).
        markers = (f"{root}/clusters/", f"{root}/nats", f"{root}/jaeger.yaml")
        strays = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if any(marker in arg for arg in argv for marker in markers):
                ticks = _start_ticks(int(entry.name))
                if ticks is not None:
                    strays.append(ProcessRecord(f"stray-{entry.name}", int(entry.name), argv, ticks, ""))
        return strays


def _terminate(records: list[ProcessRecord], timeout: float, sig: signal.Signals = signal.SIGTERM) -> None:
    live = [r for r in records if r.alive()]
    for record in live:
        _signal(record, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(r.alive() for r in live):
        time.sleep(0.1)
    for record in live:
        if record.alive():
            _signal(record, signal.SIGKILL)
    while any(r.alive() for r in live):
        time.sleep(0.05)


def _signal(record: ProcessRecord, sig: signal.Signals) -> None:
    try:
        os.kill(record.pid, sig)
    except ProcessLookupError:
        pass
    # Reap our own children so they do not linger as zombies.
    try:
        os.waitpid(record.pid, os.WNOHANG)
    except ChildProcessError:
        pass
