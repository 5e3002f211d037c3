"""Shared pieces of the benchmarks: latency summaries, CPU accounting, tables, machine facts."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import uvloop

_T = TypeVar("_T")


def run_loop(main: Coroutine[Any, Any, _T]) -> _T:
    """``asyncio.run`` on uvloop, the event loop every Shoal service runs on (uvicorn picks it):
    the load generator and the raw baseline's processor run on it too, so ratios compare
    Python on the same loop."""
    return uvloop.run(main)


@dataclass(frozen=True)
class Latency:
    """Percentiles of a set of samples, in milliseconds."""

    count: int
    p50: float
    p95: float
    p99: float
    max: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency:
        if not seconds:
            return cls(0, float("nan"), float("nan"), float("nan"), float("nan"))
        ordered = sorted(seconds)

        def pct(q: float) -> float:
            # Nearest rank: the smallest sample at or above the q-th fraction of the samples.
            index = min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))
            return ordered[index] * 1000.0

        return cls(len(ordered), pct(0.50), pct(0.95), pct(0.99), ordered[-1] * 1000.0)


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds user + system) from Linux's /proc/<pid>/stat; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name in parentheses may hold spaces; fields after the last ")" are fixed.
    fields = stat.rsplit(")", 1)[-1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS


def _cpu_by_group(groups: Mapping[str, Iterable[int]]) -> dict[str, dict[int, float]]:
    """CPU seconds of each group's processes alive now: its roots and every descendant whose
    nearest root is one of them (so a child started by the bench but named in another group,
    like a service, counts there)."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            stats[int(entry.name)] = stat
    owner = {pid: label for label, pids in groups.items() for pid in pids}
    found: dict[str, dict[int, float]] = {label: {} for label in groups}
    for pid, (_, cpu) in stats.items():
        walk, hops = pid, 0
        while walk not in owner and walk in stats and hops < 64:
            walk, hops = stats[walk][0], hops + 1
        if walk in owner:
            found[owner[walk]][pid] = cpu
    return found


class CpuMeter:
    """CPU seconds (user + system) spent by named groups of process trees over a window (Linux).

    Descendants are counted while they live (PostgreSQL's backends, a service's workers);
    a process that exits inside the window takes its last reading with it.
    """

    def __init__(self, groups: Mapping[str, Iterable[int]]) -> None:
        self._groups = {label: list(pids) for label, pids in groups.items()}
        self._start: dict[str, dict[int, float]] = {}
        self._started_at = 0.0

    def start(self) -> None:
        self._start = _cpu_by_group(self._groups)
        self._started_at = time.perf_counter()

    def stop(self) -> tuple[dict[str, float], float]:
        """(CPU seconds used per group, wall seconds elapsed) since ``start``."""
        end = _cpu_by_group(self._groups)
        wall = time.perf_counter() - self._started_at
        used = {
            label: sum(cpu - self._start[label].get(pid, 0.0) for pid, cpu in procs.items())
            for label, procs in end.items()
        }
        return used, wall


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: first column left-aligned, the figures right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        first, *rest = cells
        parts = [first.ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(rest, widths[1:], strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([title, line(headers), rule, *(line(r) for r in rows)])


def fmt(value: float, digits: int = 1) -> str:
    if value != value:  # NaN: nothing measured
        return "-"
    return f"{value:,.{digits}f}"


def nats_server_version() -> str:
    from shoal.devtools.embedded import nats_server_binary

    try:
        out = subprocess.run(
            [nats_server_binary(), "--version"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({type(exc).__name__})"
    return out.stdout.strip().removeprefix("nats-server: ") or "unknown"


def _cpu_model() -> str:
    try:
        for row in Path("/proc/cpuinfo").read_text().splitlines():
            if row.startswith("model name"):
                return row.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> list[tuple[str, str]]:
    """What the figures were measured on."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return [
        ("cores", f"{os.cpu_count()} ({_cpu_model()})"),
        ("memory", f"{memory:.1f} GiB"),
        ("python", f"{platform.python_implementation()} {sys.version.split()[0]}"),
        ("nats-server", nats_server_version()),
        ("platform", platform.platform()),
        ("fsync p50 (temp dir)", f"{fsync_latency_ms():.2f} ms"),
        ("load average (1/5/15 min)", " / ".join(f"{x:.2f}" for x in os.getloadavg())),
    ]


def fsync_latency_ms(writes: int = 200) -> float:
    """Median time of a 4 KiB append + fsync in the temp directory (where the servers store)."""
    samples = []
    with tempfile.NamedTemporaryFile(prefix="shoal-bench-fsync-") as file:
        for _ in range(writes):
            started = time.perf_counter()
            file.write(b"x" * 4096)
            file.flush()
            os.fsync(file.fileno())
            samples.append(time.perf_counter() - started)
    return Latency.of(samples).p50


@dataclass(frozen=True)
class PathResult:
    """One run of a command path: completed commands in the measured window and their latency."""

    commands: int
    seconds: float
    latency: Latency
    errors: int
    cpu_seconds: Mapping[str, float]  # by process group (servers, services, load generator)

    @property
    def rate(self) -> float:
        return self.commands / self.seconds if self.seconds > 0 else float("nan")

    @property
    def cpu_ms_per_command(self) -> float:
        total = sum(self.cpu_seconds.values())
        return total * 1000.0 / self.commands if self.commands else float("nan")

    def cores(self, label: str) -> float:
        """How many cores ``label`` kept busy on average over the window."""
        return self.cpu_seconds.get(label, 0.0) / self.seconds if self.seconds else float("nan")


def latency_cell(latency: Latency) -> str:
    return f"{fmt(latency.p50, 2)} / {fmt(latency.p95, 2)} / {fmt(latency.p99, 2)} ms"


def fsync_label(sync_always: bool) -> str:
    return "sync_interval: always" if sync_always else "sync_interval: default (2 min)"
